"""The pair state machine: every allowed (role, state, input) -> next state, in one table.

Names and meanings follow HUR / RAID Manager (ARCHITECTURE.md "Pair states"). Each site looks
up its own role: the daemon where an operation starts applies its input, tells the peer, and
the peer applies the same input under its role. A key missing from TRANSITIONS is a refused
operation (`Refused`, "cannot resync: pair is PAIR"); nothing outside this module decides
whether a transition is allowed. The README's table is `render_markdown()`'s output.

    SMPL ─create─► COPY ─copy done─► PAIR ◄─journal low / high─► PFUL
                    │                 │                            │
                    │      split ─► PSUS (P) / SSUS (S), or SSWS (S) with --rw
                    │      link lost ─► PSUE        journal full ─► PFUS
                    ▼
    PSUS / SSUS / PSUE / PFUS ─resync─► COPY        any state ─delete─► SMPL
    secondary: takeover ─► SSWS (primary silent) or swap (primary answers)

Role swaps. The table has no role in its result: for the two inputs below, the caller switches
the site's role, persisting new state and role together (invariant 6), and the key names the
role *before* the swap.
- RESYNC_SWAP: (PRIMARY, PSUS|PSUE|PFUS) -> COPY as the new secondary;
  (SECONDARY, SSWS) -> COPY as the new primary, which copies the union of both bitmaps.
- TAKEOVER_SWAP (the primary answers): (SECONDARY, PAIR|PFUL) -> PAIR as the new primary,
  after the journal was drained; the old primary applies (PRIMARY, PAIR|PFUL) -> PAIR as the
  new secondary when the swap reaches it.

Guards. A few rows (GUARDS) also need `svol_consistent=True`: a pair suspended mid-copy has
a half-copied S-VOL that the state alone does not reveal, so the caller keeps that flag.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import Enum, StrEnum
from types import MappingProxyType

__all__ = [
    "GUARDS",
    "HIGH_WATER_DEFAULT",
    "TRANSITIONS",
    "PairInput",
    "PairState",
    "Refused",
    "Role",
    "allowed",
    "host_writable",
    "is_suspended",
    "journals_writes",
    "next_state",
    "render_markdown",
    "secondary_view",
    "verb",
]

# Journal use (fraction of capacity) above which PAIR becomes PFUL.
HIGH_WATER_DEFAULT = 0.8


class PairState(StrEnum):
    SMPL = "SMPL"
    COPY = "COPY"
    PAIR = "PAIR"
    PFUL = "PFUL"
    PFUS = "PFUS"
    PSUS = "PSUS"
    SSUS = "SSUS"
    PSUE = "PSUE"
    SSWS = "SSWS"


class PairInput(Enum):
    # Operator commands (pairctl verbs).
    CREATE = "create"
    SPLIT = "split"
    SPLIT_RW = "split --rw"
    RESYNC = "resync"
    RESYNC_SWAP = "resync --swap"
    DELETE = "delete"
    TAKEOVER_SWAP = "takeover (swap)"  # the primary answers
    TAKEOVER_SSWS = "takeover (SSWS)"  # the primary does not answer
    # Events inside the daemons.
    COPY_DONE = "copy done"
    JOURNAL_HIGH = "journal over high-water"
    JOURNAL_LOW = "journal back under high-water"
    JOURNAL_FULL = "journal full"
    LINK_LOST = "link lost"  # path-watch time expired, or the secondary failed
    # The old primary took the COMMIT of a takeover swap, its answer was lost (it says so when
    # the link is back): the secondary finishes the swap.
    SWAP_COMMITTED = "swap committed by the old primary"


class Role(StrEnum):
    PRIMARY = "primary"
    SECONDARY = "secondary"


_VERBS: Mapping[PairInput, str] = {
    PairInput.CREATE: "create",
    PairInput.SPLIT: "split",
    PairInput.SPLIT_RW: "split",
    PairInput.RESYNC: "resync",
    PairInput.RESYNC_SWAP: "resync",
    PairInput.DELETE: "delete",
    PairInput.TAKEOVER_SWAP: "takeover",
    PairInput.TAKEOVER_SSWS: "takeover",
    PairInput.COPY_DONE: "complete the copy",
    PairInput.JOURNAL_HIGH: "enter PFUL",
    PairInput.JOURNAL_LOW: "leave PFUL",
    PairInput.JOURNAL_FULL: "suspend for journal full",
    PairInput.LINK_LOST: "suspend for link loss",
    PairInput.SWAP_COMMITTED: "finish the takeover (swap)",
}


class Refused(Exception):
    """An input the table does not allow in this state: str() is the one-line reason."""

    def __init__(self, role: Role, state: PairState, inp: PairInput, why: str = "") -> None:
        self.role = role
        self.state = state
        self.input = inp
        self.verb = _VERBS[inp]
        self.reason = f"cannot {self.verb}: pair is {state.value}"
        if why:
            self.reason += f" ({why})"
        super().__init__(self.reason)


S = PairState
In = PairInput
P, SEC = (Role.PRIMARY,), (Role.SECONDARY,)
BOTH = (Role.PRIMARY, Role.SECONDARY)
_ACTIVE = (S.COPY, S.PAIR, S.PFUL)  # journal being sent
_IN_SYNC = (S.PAIR, S.PFUL)
_SUSPENDED = (S.PFUS, S.PSUS, S.SSUS, S.PSUE, S.SSWS)

# (roles, from-states, input, to). Expanded into TRANSITIONS; one row per rule, in life order.
_RULES: tuple[tuple[Iterable[Role], Iterable[PairState], PairInput, PairState], ...] = (
    (BOTH, (S.SMPL,), In.CREATE, S.COPY),
    (BOTH, (S.COPY,), In.COPY_DONE, S.PAIR),
    (BOTH, (S.PAIR,), In.JOURNAL_HIGH, S.PFUL),
    (BOTH, (S.PFUL,), In.JOURNAL_LOW, S.PAIR),
    # The journal can overflow during a copy too; the bitmap then holds what the copy still
    # owes, and a resync finishes it.
    (BOTH, _ACTIVE, In.JOURNAL_FULL, S.PFUS),
    (BOTH, _ACTIVE, In.LINK_LOST, S.PSUE),
    (P, _ACTIVE, In.SPLIT, S.PSUS),
    (SEC, _ACTIVE, In.SPLIT, S.SSUS),
    # split --rw only from PAIR/PFUL: during COPY the S-VOL is not consistent (see _WHY).
    (P, _IN_SYNC, In.SPLIT_RW, S.PSUS),
    (SEC, _IN_SYNC, In.SPLIT_RW, S.SSWS),
    (P, (S.PSUS, S.PSUE, S.PFUS), In.RESYNC, S.COPY),
    # From SSWS the S-VOL's own writes are discarded: its bitmap joins the union copied from
    # the P-VOL (HUR's pairresync after split -rw).
    (SEC, (S.SSUS, S.PSUE, S.PFUS, S.SSWS), In.RESYNC, S.COPY),
    (P, (S.PSUS, S.PSUE, S.PFUS), In.RESYNC_SWAP, S.COPY),  # becomes the secondary
    (SEC, (S.SSWS,), In.RESYNC_SWAP, S.COPY),  # becomes the primary
    (SEC, _IN_SYNC, In.TAKEOVER_SWAP, S.PAIR),  # becomes the primary
    (P, _IN_SYNC, In.TAKEOVER_SWAP, S.PAIR),  # becomes the secondary
    # Read-only here, everything of the old primary applied: PSUE if the link stayed down.
    (SEC, (S.PAIR, S.PFUL, S.PSUE), In.SWAP_COMMITTED, S.PAIR),  # becomes the primary
    # A suspended S-VOL holds a consistent prefix, unless it was suspended mid-copy: GUARDS.
    (SEC, (S.PAIR, S.PFUL, S.PSUE, S.PFUS, S.SSUS), In.TAKEOVER_SSWS, S.SSWS),
    (BOTH, tuple(s for s in S if s is not S.SMPL), In.DELETE, S.SMPL),
)


def _expand(
    rules: Iterable[tuple[Iterable[Role], Iterable[PairState], PairInput, PairState]],
) -> Mapping[tuple[Role, PairState, PairInput], PairState]:
    table: dict[tuple[Role, PairState, PairInput], PairState] = {}
    for roles, states, inp, to in rules:
        for role in roles:
            for state in states:
                assert (role, state, inp) not in table, f"duplicate rule {role} {state} {inp}"
                table[role, state, inp] = to
    return MappingProxyType(table)


TRANSITIONS: Mapping[tuple[Role, PairState, PairInput], PairState] = _expand(_RULES)

# Transitions that also need the S-VOL consistent (`svol_consistent=True`). A pair that
# suspends during COPY (link lost, journal full, split) reaches these states with a half-copied
# S-VOL, and the state alone cannot tell: the caller persists the flag (True on COPY_DONE, False
# on entering COPY) next to the state. HUR refuses S-VOL takeover of such a pair likewise.
GUARDS: Mapping[tuple[Role, PairState, PairInput], str] = {
    (Role.SECONDARY, state, In.TAKEOVER_SSWS): "the S-VOL is consistent (its last copy completed)"
    for state in (S.PSUE, S.PFUS, S.SSUS)
}
_NOT_CONSISTENT = "the S-VOL is not consistent: the pair was suspended before its copy completed"

# Why some refusals happen, where "pair is X" alone does not tell the operator what to do.
_WHY: Mapping[tuple[Role, PairState, PairInput], str] = {
    **{
        (Role.SECONDARY, S.COPY, inp): "the S-VOL is not consistent until the copy completes"
        for inp in (In.TAKEOVER_SSWS, In.TAKEOVER_SWAP, In.SPLIT_RW)
    },
    (Role.PRIMARY, S.COPY, In.SPLIT_RW): "the S-VOL is not consistent until the copy completes",
    **{
        (Role.SECONDARY, state, In.RESYNC_SWAP): "a swap resync needs SSWS: take over first"
        for state in (S.SSUS, S.PSUE, S.PFUS)
    },
    **{
        (Role.SECONDARY, state, In.TAKEOVER_SWAP): "a swap takeover needs PAIR or PFUL"
        for state in (S.SSUS, S.PSUE, S.PFUS)
    },
    **{(Role.PRIMARY, state, In.TAKEOVER_SSWS): "takeover runs on the secondary" for state in S},
    **{(role, S.SMPL, inp): "not paired" for role in BOTH for inp in In if inp is not In.CREATE},
}


_ORDER: Mapping[Enum, int] = {
    member: i for enum in (Role, PairState, PairInput) for i, member in enumerate(enum)
}

del S, In, P, SEC, BOTH


def verb(inp: PairInput) -> str:
    """The operation an input stands for, as in "cannot <verb>: pair is <STATE>"."""
    return _VERBS[inp]


def allowed(role: Role, state: PairState, inp: PairInput, *, svol_consistent: bool = False) -> bool:
    key = (role, state, inp)
    return key in TRANSITIONS and (svol_consistent or key not in GUARDS)


def next_state(
    role: Role, state: PairState, inp: PairInput, *, svol_consistent: bool = False
) -> PairState:
    """The state after `inp`; Refused when the table has no such transition.

    `svol_consistent` matters only for the GUARDS rows; it defaults to the safe answer.
    """
    key = (role, state, inp)
    if key not in TRANSITIONS:
        raise Refused(role, state, inp, _WHY.get(key, ""))
    if key in GUARDS and not svol_consistent:
        raise Refused(role, state, inp, _NOT_CONSISTENT)
    return TRANSITIONS[key]


def is_suspended(state: PairState) -> bool:
    """Paired, but no journal flows: changes are kept in the difference bitmap instead."""
    return state in _SUSPENDED


def journals_writes(state: PairState) -> bool:
    """Host writes on the primary go to the master journal (else, when paired, the bitmap)."""
    return state in _ACTIVE


def host_writable(role: Role, state: PairState) -> bool:
    """Whether hosts may write this site's volumes: a P-VOL always, an S-VOL in SMPL or SSWS."""
    return role is Role.PRIMARY or state in (PairState.SMPL, PairState.SSWS)


# The secondary's name for the primary's state (RAID Manager: a split shows PSUS on the primary,
# SSUS on the secondary).
_SECONDARY_VIEW: Mapping[PairState, PairState] = MappingProxyType(
    {PairState.PSUS: PairState.SSUS, PairState.SSUS: PairState.SSUS, PairState.SSWS: PairState.SSWS}
)


def secondary_view(primary_state: PairState, *, svol_writable: bool = False) -> PairState:
    """The state the secondary shows for the primary's state: SSUS for PSUS, or SSWS when the
    split was `split --rw`; the other states have the same name on both sides."""
    if primary_state is PairState.PSUS and svol_writable:
        return PairState.SSWS
    return _SECONDARY_VIEW.get(primary_state, primary_state)


def render_markdown() -> str:
    """TRANSITIONS as a markdown table (role | from | input | to), in enum order.

    Rows with a guard get a footnote mark in the `to` cell and the condition below the table.
    """
    keys = sorted(TRANSITIONS, key=lambda k: (_ORDER[k[0]], _ORDER[k[1]], _ORDER[k[2]]))
    lines = ["| role | from | input | to |", "|---|---|---|---|"]
    for role, state, inp in keys:
        to = TRANSITIONS[role, state, inp].value
        mark = " ¹" if (role, state, inp) in GUARDS else ""
        lines.append(f"| {role.value} | {state.value} | {inp.name} | {to}{mark} |")
    if GUARDS:
        conditions = sorted(set(GUARDS.values()))
        lines += ["", "¹ only when " + "; ".join(conditions) + "."]
    return "\n".join(lines) + "\n"
