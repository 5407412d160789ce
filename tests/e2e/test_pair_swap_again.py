"""A site takes its other role a second time, with what its first stint there left behind.

A primary ─► A killed, takeover on B (SSWS) ─► A back (PSUE) ─► resync --swap on B: B ─► A
B primary ─► B killed, takeover on A (SSWS) ─► B back (PSUE) ─► resync --swap on A: A ─► B
  A, primary again, holds its master journal at seq N: it must start a generation of its
  own (its secondary's "none" Welcome taken for one once made it offer seq 1, refused
  forever as needs_copy); B, secondary again, holds a restore journal at seq M: destaging
  starts there (from 0 it once raised "seq 1 not held" and secondaryd exited)
"""

from __future__ import annotations

import pytest

from tests.e2e.helpers import (
    Daemons,
    create_pair,
    display,
    pairctl,
    qemu_io,
    volumes_equal,
    wait_caught_up,
    wait_state,
    wait_until,
)
from tests.e2e.test_pair_swap import role_and_state, swappable_pair

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def test_a_second_takeover_and_resync_swap_bring_the_roles_back(daemons: Daemons) -> None:
    a, b = swappable_pair(daemons)
    create_pair(a, b)
    for old, new, pattern in ((a, b, 0x31), (b, a, 0x32)):
        qemu_io(old.uri("vol0"), f"write -P {pattern:#x} 0 1M")
        wait_caught_up(old)
        old.kill()
        wait_until(lambda n=new: not display(n)["link"]["up"], 30, "the link to drop")  # type: ignore[misc]
        assert pairctl(new, "takeover", check=False).returncode == 2
        qemu_io(new.uri("vol1"), f"write -P {pattern:#x} 1M 64k")
        old.start()
        wait_state(old, "PSUE", 30)
        pairctl(new, "resync", "--swap")
        wait_until(
            lambda n=new: role_and_state(n) == ("primary", "PAIR"),  # type: ignore[misc]
            60,
            f"{new.name} to be the primary",
        )
        wait_until(
            lambda o=old: role_and_state(o) == ("secondary", "PAIR"),  # type: ignore[misc]
            60,
            f"{old.name} to be the secondary",
        )
        wait_caught_up(new)
        assert volumes_equal(a, b)
        assert display(new)["generation"] not in ("", "none")
        assert old.running() and new.running()
