"""What a site persists about its pair (data_dir/pair.json), written before it is acted on.

One small JSON file, replaced atomically (tmp + fsync + rename + fsync dir): the role this
site plays, the pair state and why, the journal generation, and the positions that recovery
needs. A missing file means a fresh site: SMPL in the role of its config.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.pairstate import PairInput, PairState, Role, next_state
from common.statefile import StateFileError, read_json, write_json_atomic

FILE_NAME = "pair.json"


class PairRecordError(Exception):
    """The state file exists but cannot be trusted: the daemon refuses to start."""


@dataclass
class PairRecord:
    role: Role
    state: PairState = PairState.SMPL
    reason: str = "not paired"
    generation: str = ""  # changes at every create; "" before the first
    start_seq: int = 1  # first seq of this generation
    # Primary: the last base-journal seq of the initial copy (0 while the copy still produces).
    copy_end_seq: int = 0
    copy_total_bytes: int = 0
    svol_consistent: bool = False  # the S-VOL holds a whole copy (set at COPY -> PAIR)
    # Secondary: the S-VOLs hold exactly the records up to applied_seq (durable), and records up
    # to destage_intent_seq may be partly applied (recovery re-applies them before serving).
    applied_seq: int = 0
    destage_intent_seq: int = 0
    # Primary: the last split was `split --rw` (the secondary shows SSWS, hosts write there).
    svol_writable: bool = False
    # Hosts wrote this site's volumes while the pair was split (primary: suspended; secondary:
    # SSWS). Both sites written is a split brain: resync then needs to be told who wins.
    written_while_split: bool = False
    # Secondary: the id of the primary site it is paired with (common.siteid); "" = not
    # known yet. A primary with another id is not followed.
    peer_site_id: str = ""
    # A swap made this site the secondary: it left generation swapped_out_of, its master
    # journal ending at swapped_out_seq, at step swapped_out_kind (SwapKind: "commit" of a
    # takeover, or "resync"). Until it joins the new primary's generation it answers the
    # other site's Hello with Swapped, so a swap whose last answer was lost is finished
    # there. "" = no such swap.
    swapped_out_of: str = ""
    swapped_out_seq: int = 0
    swapped_out_kind: str = ""

    @classmethod
    def load(cls, data_dir: Path, role: Role) -> PairRecord:
        path = data_dir / FILE_NAME
        try:
            raw = read_json(path)
        except StateFileError as exc:
            raise PairRecordError(str(exc)) from None
        if raw is None:
            return cls(role=role)
        try:
            return cls._from_json(raw)
        except (KeyError, ValueError, TypeError) as exc:
            raise PairRecordError(f"state file {path}: bad content: {exc}") from None

    @classmethod
    def _from_json(cls, raw: dict[str, Any]) -> PairRecord:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - fields
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}")
        record = cls(role=Role(raw["role"]))
        for name, value in raw.items():
            if name == "role":
                continue
            if name == "state":
                value = PairState(value)
            elif not isinstance(value, type(getattr(record, name))):
                raise TypeError(f"{name} must be {type(getattr(record, name)).__name__}")
            setattr(record, name, value)
        return record

    def next_state(self, inp: PairInput) -> PairState:
        """The state `inp` leads to from here, for this site's role (Refused if none)."""
        return next_state(self.role, self.state, inp, svol_consistent=self.svol_consistent)

    def to_json(self) -> dict[str, Any]:
        raw = dataclasses.asdict(self)
        raw["role"] = self.role.value
        raw["state"] = self.state.value
        return raw


class RecordSaver:
    """Saves a site's PairRecord from the loop or from an executor thread, never two at once,
    and never an older snapshot over a newer one."""

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir
        self._lock = threading.Lock()
        self._taken = 0
        self._written = 0

    def save_now(self, record: PairRecord) -> None:
        self._write(*self._snapshot(record))

    async def save(self, record: PairRecord) -> None:
        version, raw = self._snapshot(record)  # on the loop: a consistent view
        await asyncio.get_running_loop().run_in_executor(None, self._write, version, raw)

    def _snapshot(self, record: PairRecord) -> tuple[int, dict[str, Any]]:
        self._taken += 1
        return self._taken, record.to_json()

    def _write(self, version: int, raw: dict[str, Any]) -> None:
        with self._lock:
            if version <= self._written:
                return
            write_json_atomic(self._data_dir / FILE_NAME, raw)
            self._written = version
