"""Shared by the fuzz tests of the protocol cores: byte-stream damage (hypothesis draws)
and the peak memory an action allocates."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable

from hypothesis import strategies as st

KINDS = ("flip", "insert", "delete", "truncate", "repeat")


def mutate(draw: st.DrawFn, stream: bytes, max_run: int) -> bytes:
    """1 to 4 of: a bit flipped, up to `max_run` bytes inserted or deleted, a run of up to
    40 bytes repeated, or the rest cut off, at drawn positions."""
    data = bytearray(stream)
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(KINDS))
        if kind == "flip" and pos < len(data):
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=max_run))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, max_run))]
        elif kind == "repeat":
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 40))]
        else:
            del data[pos:]
    return bytes(data)


def peak_traced(action: Callable[[], object]) -> int:
    """Bytes allocated at the peak of `action`, above what was allocated before it."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        action()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
