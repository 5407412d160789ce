"""The journal: a record codec (`record`, no I/O) and the segment-file store (`store`).

The same store backs the primary's master journal and the secondary's restore journal.
"""
