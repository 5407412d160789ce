"""The read-journal protocol between secondaryd (pulls) and primaryd (serves), sans-I/O.

`messages` holds the wire messages and their strict msgpack encoding; `protocol` holds the
connection state machine that frames them and enforces who may send what, and when.
"""
