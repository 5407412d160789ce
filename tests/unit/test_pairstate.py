"""The pair state table: every (role, state, input), HUR's transitions, refusals, the rendering."""

from __future__ import annotations

import itertools

import pytest

from common.pairstate import (
    GUARDS,
    HIGH_WATER_DEFAULT,
    TRANSITIONS,
    PairInput,
    PairState,
    Refused,
    Role,
    allowed,
    host_writable,
    is_suspended,
    journals_writes,
    next_state,
    render_markdown,
    secondary_view,
    verb,
)

P, S = Role.PRIMARY, Role.SECONDARY
In = PairInput

EXPECTED_VERBS = {
    In.CREATE: "create",
    In.SPLIT: "split",
    In.SPLIT_RW: "split",
    In.RESYNC: "resync",
    In.RESYNC_SWAP: "resync",
    In.DELETE: "delete",
    In.TAKEOVER_SWAP: "takeover",
    In.TAKEOVER_SSWS: "takeover",
}


def test_every_role_state_input_is_a_transition_or_a_clear_refusal() -> None:
    refused = 0
    for role, state, inp in itertools.product(Role, PairState, PairInput):
        key = (role, state, inp)
        if key in TRANSITIONS:
            assert next_state(role, state, inp, svol_consistent=True) is TRANSITIONS[key]
            assert allowed(role, state, inp, svol_consistent=True)
            continue
        refused += 1
        assert not allowed(role, state, inp, svol_consistent=True)
        with pytest.raises(Refused) as info:
            next_state(role, state, inp, svol_consistent=True)
        error = info.value
        assert str(error) == error.reason
        assert error.reason.startswith(f"cannot {verb(inp)}: pair is {state.value}")
        assert (error.role, error.state, error.input, error.verb) == (role, state, inp, verb(inp))
    assert refused > len(TRANSITIONS)  # most combinations make no sense


def test_verbs_are_the_pairctl_verbs_and_internal_inputs_read_as_phrases() -> None:
    for inp in PairInput:
        assert verb(inp) == EXPECTED_VERBS.get(inp, verb(inp))
        assert verb(inp) and verb(inp) not in {"", inp.name}
    assert verb(In.COPY_DONE) == "complete the copy"


def test_the_table_only_holds_enum_members() -> None:
    for (role, state, inp), to in TRANSITIONS.items():
        assert isinstance(role, Role)
        assert isinstance(state, PairState)
        assert isinstance(inp, PairInput)
        assert isinstance(to, PairState)
    with pytest.raises(TypeError):
        TRANSITIONS[P, PairState.SMPL, In.CREATE] = PairState.PAIR  # type: ignore[index]


HUR = [
    # initial copy
    (P, "SMPL", In.CREATE, "COPY"),
    (S, "SMPL", In.CREATE, "COPY"),
    (P, "COPY", In.COPY_DONE, "PAIR"),
    (S, "COPY", In.COPY_DONE, "PAIR"),
    # journal use
    (P, "PAIR", In.JOURNAL_HIGH, "PFUL"),
    (P, "PFUL", In.JOURNAL_LOW, "PAIR"),
    (S, "PAIR", In.JOURNAL_HIGH, "PFUL"),
    (P, "PFUL", In.JOURNAL_FULL, "PFUS"),
    (P, "PAIR", In.JOURNAL_FULL, "PFUS"),
    (S, "PFUL", In.JOURNAL_FULL, "PFUS"),
    # split
    (P, "PAIR", In.SPLIT, "PSUS"),
    (P, "PFUL", In.SPLIT, "PSUS"),
    (P, "COPY", In.SPLIT, "PSUS"),
    (S, "PAIR", In.SPLIT, "SSUS"),
    (S, "COPY", In.SPLIT, "SSUS"),
    (P, "PAIR", In.SPLIT_RW, "PSUS"),
    (S, "PAIR", In.SPLIT_RW, "SSWS"),
    (S, "PFUL", In.SPLIT_RW, "SSWS"),
    # errors
    (P, "PAIR", In.LINK_LOST, "PSUE"),
    (P, "COPY", In.LINK_LOST, "PSUE"),
    (S, "PFUL", In.LINK_LOST, "PSUE"),
    # resync
    (P, "PSUS", In.RESYNC, "COPY"),
    (P, "PSUE", In.RESYNC, "COPY"),
    (P, "PFUS", In.RESYNC, "COPY"),
    (S, "SSUS", In.RESYNC, "COPY"),
    (S, "PSUE", In.RESYNC, "COPY"),
    (S, "PFUS", In.RESYNC, "COPY"),
    (S, "SSWS", In.RESYNC, "COPY"),
    (P, "PSUS", In.RESYNC_SWAP, "COPY"),
    (S, "SSWS", In.RESYNC_SWAP, "COPY"),
    # takeover
    (S, "PAIR", In.TAKEOVER_SWAP, "PAIR"),
    (S, "PFUL", In.TAKEOVER_SWAP, "PAIR"),
    (P, "PAIR", In.TAKEOVER_SWAP, "PAIR"),
    (S, "PAIR", In.TAKEOVER_SSWS, "SSWS"),
    (S, "PSUE", In.TAKEOVER_SSWS, "SSWS"),
    (S, "PFUS", In.TAKEOVER_SSWS, "SSWS"),
    # delete
    *(
        (role, state.value, In.DELETE, "SMPL")
        for role in Role
        for state in PairState
        if state.value != "SMPL"
    ),
]


@pytest.mark.parametrize(("role", "state", "inp", "to"), HUR)
def test_hur_transitions(role: Role, state: str, inp: PairInput, to: str) -> None:
    assert next_state(role, PairState(state), inp, svol_consistent=True) is PairState(to)


REFUSALS = [
    (P, "PAIR", In.RESYNC, "cannot resync: pair is PAIR"),
    (S, "COPY", In.RESYNC, "cannot resync: pair is COPY"),
    (P, "SMPL", In.DELETE, "cannot delete: pair is SMPL (not paired)"),
    (P, "PAIR", In.CREATE, "cannot create: pair is PAIR"),
    (P, "PSUS", In.SPLIT, "cannot split: pair is PSUS"),
    (S, "SSWS", In.TAKEOVER_SSWS, "cannot takeover: pair is SSWS"),
    (
        S,
        "COPY",
        In.TAKEOVER_SSWS,
        "cannot takeover: pair is COPY (the S-VOL is not consistent until the copy completes)",
    ),
    (
        S,
        "COPY",
        In.TAKEOVER_SWAP,
        "cannot takeover: pair is COPY (the S-VOL is not consistent until the copy completes)",
    ),
    (
        S,
        "COPY",
        In.SPLIT_RW,
        "cannot split: pair is COPY (the S-VOL is not consistent until the copy completes)",
    ),
    (P, "PAIR", In.TAKEOVER_SSWS, "cannot takeover: pair is PAIR (takeover runs on the secondary)"),
    (
        S,
        "SSUS",
        In.RESYNC_SWAP,
        "cannot resync: pair is SSUS (a swap resync needs SSWS: take over first)",
    ),
    (
        S,
        "PSUE",
        In.TAKEOVER_SWAP,
        "cannot takeover: pair is PSUE (a swap takeover needs PAIR or PFUL)",
    ),
    (P, "PFUS", In.JOURNAL_LOW, "cannot leave PFUL: pair is PFUS"),
    (P, "PAIR", In.COPY_DONE, "cannot complete the copy: pair is PAIR"),
]


@pytest.mark.parametrize(("role", "state", "inp", "message"), REFUSALS)
def test_refusals_say_why(role: Role, state: str, inp: PairInput, message: str) -> None:
    with pytest.raises(Refused) as info:
        next_state(role, PairState(state), inp, svol_consistent=True)
    assert str(info.value) == message


@pytest.mark.parametrize("state", ["PSUE", "PFUS", "SSUS"])
def test_takeover_of_a_pair_suspended_mid_copy_is_refused(state: str) -> None:
    """A pair that suspended during COPY has a half-copied S-VOL: SSWS would expose it."""
    key = (S, PairState(state), In.TAKEOVER_SSWS)
    assert key in GUARDS
    assert not allowed(*key)
    with pytest.raises(Refused) as info:
        next_state(*key)
    assert str(info.value) == (
        f"cannot takeover: pair is {state} "
        "(the S-VOL is not consistent: the pair was suspended before its copy completed)"
    )
    assert next_state(*key, svol_consistent=True) is PairState.SSWS


def test_only_takeover_is_guarded() -> None:
    assert set(GUARDS) <= set(TRANSITIONS)
    assert {inp for _, _, inp in GUARDS} == {In.TAKEOVER_SSWS}
    # In PAIR/PFUL the copy has completed, so no flag is needed.
    assert next_state(S, PairState.PAIR, In.TAKEOVER_SSWS) is PairState.SSWS


def reachable(role: Role) -> set[PairState]:
    seen, todo = {PairState.SMPL}, [PairState.SMPL]
    while todo:
        state = todo.pop()
        for (r, s, _), to in TRANSITIONS.items():
            if r is role and s is state and to not in seen:
                seen.add(to)
                todo.append(to)
    return seen


def test_each_role_reaches_exactly_its_states() -> None:
    both = {"SMPL", "COPY", "PAIR", "PFUL", "PFUS", "PSUE"}
    assert reachable(P) == {PairState(s) for s in both | {"PSUS"}}
    assert reachable(S) == {PairState(s) for s in both | {"SSUS", "SSWS"}}


def test_only_delete_leads_back_to_smpl() -> None:
    for (_, state, inp), to in TRANSITIONS.items():
        if to is PairState.SMPL:
            assert inp is In.DELETE
            assert state is not PairState.SMPL


def test_an_s_vol_becomes_writable_only_by_operator_command() -> None:
    for (role, state, inp), to in TRANSITIONS.items():
        if role is S and host_writable(S, to) and not host_writable(S, state):
            assert inp in {In.SPLIT_RW, In.TAKEOVER_SSWS, In.DELETE}


def walk(inputs: list[PairInput], consistent: bool = True) -> list[tuple[PairState, PairState]]:
    """Apply each input on both sites, as the daemons do: each looks up its own role."""
    primary = secondary = PairState.SMPL
    states = []
    for inp in inputs:
        primary = next_state(P, primary, inp, svol_consistent=consistent)
        secondary = next_state(S, secondary, inp, svol_consistent=consistent)
        states.append((primary, secondary))
    return states


def test_both_sites_through_a_pair_life() -> None:
    states = walk(
        [
            In.CREATE,
            In.COPY_DONE,
            In.JOURNAL_HIGH,
            In.JOURNAL_FULL,
            In.RESYNC,
            In.COPY_DONE,
            In.SPLIT_RW,
            In.RESYNC,
            In.COPY_DONE,
            In.SPLIT,
            In.RESYNC,
            In.LINK_LOST,
            In.RESYNC,
            In.COPY_DONE,
            In.DELETE,
        ]
    )
    assert [f"{p}/{s}" for p, s in states] == [
        "COPY/COPY",
        "PAIR/PAIR",
        "PFUL/PFUL",
        "PFUS/PFUS",
        "COPY/COPY",
        "PAIR/PAIR",
        "PSUS/SSWS",
        "COPY/COPY",
        "PAIR/PAIR",
        "PSUS/SSUS",
        "COPY/COPY",
        "PSUE/PSUE",
        "COPY/COPY",
        "PAIR/PAIR",
        "SMPL/SMPL",
    ]


def test_disaster_recovery_and_swap_back() -> None:
    # The primary site is lost: the secondary takes over alone.
    secondary = next_state(S, PairState.PAIR, In.LINK_LOST)
    secondary = next_state(S, secondary, In.TAKEOVER_SSWS, svol_consistent=True)
    assert secondary is PairState.SSWS
    assert host_writable(S, secondary)
    # The old primary comes back suspended; resync --swap makes the old secondary the source.
    old_primary = next_state(P, PairState.PAIR, In.LINK_LOST)
    assert next_state(P, old_primary, In.RESYNC_SWAP) is PairState.COPY  # now the secondary
    assert next_state(S, secondary, In.RESYNC_SWAP) is PairState.COPY  # now the primary


def test_helpers() -> None:
    assert HIGH_WATER_DEFAULT == 0.8
    suspended = {s for s in PairState if is_suspended(s)}
    assert {s.value for s in suspended} == {"PFUS", "PSUS", "SSUS", "PSUE", "SSWS"}
    assert {s.value for s in PairState if journals_writes(s)} == {"COPY", "PAIR", "PFUL"}
    assert all(host_writable(P, s) for s in PairState)
    assert {s.value for s in PairState if host_writable(S, s)} == {"SMPL", "SSWS"}


def test_enum_values() -> None:
    assert all(s.value == s.name for s in PairState)
    assert f"{PairState.PFUL}" == "PFUL"
    assert PairState("PSUE") is PairState.PSUE
    assert [r.value for r in Role] == ["primary", "secondary"]
    assert Role("secondary") is S


def test_render_markdown_has_every_row() -> None:
    text = render_markdown()
    lines = text.splitlines()
    assert lines[:2] == ["| role | from | input | to |", "|---|---|---|---|"]
    rows = [line for line in lines[2:] if line.startswith("| ")]
    assert len(rows) == len(TRANSITIONS)
    for (role, state, inp), to in TRANSITIONS.items():
        mark = " ¹" if (role, state, inp) in GUARDS else ""
        assert f"| {role.value} | {state.value} | {inp.name} | {to.value}{mark} |" in rows
    assert "¹ only when the S-VOL is consistent" in text
    assert rows.index("| primary | SMPL | CREATE | COPY |") == 0


@pytest.mark.parametrize(
    ("primary", "writable", "shown"),
    [
        (PairState.PSUS, False, PairState.SSUS),
        (PairState.PSUS, True, PairState.SSWS),
        (PairState.PAIR, True, PairState.PAIR),  # only a split makes the S-VOL writable
        (PairState.PSUE, False, PairState.PSUE),
        (PairState.PFUS, False, PairState.PFUS),
        (PairState.COPY, False, PairState.COPY),
        (PairState.SMPL, False, PairState.SMPL),
    ],
)
def test_the_secondary_names_the_primarys_state_its_way(
    primary: PairState, writable: bool, shown: PairState
) -> None:
    assert secondary_view(primary, svol_writable=writable) is shown
