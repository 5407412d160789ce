"""Prometheus metrics of a daemon (config ``metrics.listen``): what is counted where, how it
is exposed. The counting classes (histogram) import nothing but the standard library, so the
hot paths that use them carry no dependency; the collector and the HTTP server use
prometheus_client for the exposition format."""
