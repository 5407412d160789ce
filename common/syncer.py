"""Group commit for fdatasync: concurrent callers share one sync.

A caller that arrives while a sync runs waits for the next one (which starts
after its own writes), so many FLUSH/FUA requests cost few fdatasync calls and
at most one executor thread per file.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class GroupSyncer:
    """`sync` runs in the executor. With `prepare`, prepare() runs on the loop first
    (e.g. to write out buffers and pick the files) and returns what the executor runs."""

    def __init__(
        self,
        sync: Callable[[], None] | None = None,
        *,
        prepare: Callable[[], Callable[[], None]] | None = None,
    ) -> None:
        if prepare is None:
            if sync is None:
                raise ValueError("GroupSyncer needs sync or prepare")
            fixed = sync
            prepare = lambda: fixed  # noqa: E731
        self._prepare: Callable[[], Callable[[], None]] = prepare
        self._next: asyncio.Future[None] | None = None
        self._running = False
        self._task: asyncio.Task[None] | None = None

    async def sync(self) -> None:
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            if not self._running:
                self._task = asyncio.get_running_loop().create_task(self._run())
        await asyncio.shield(self._next)

    async def _run(self) -> None:
        self._running = True
        try:
            while self._next is not None:
                batch, self._next = self._next, None
                try:
                    work = self._prepare()
                    await asyncio.get_running_loop().run_in_executor(None, work)
                except OSError as exc:
                    batch.set_exception(exc)
                else:
                    batch.set_result(None)
        finally:
            self._running = False
