"""pairctl: operates a pair through a daemon's control socket.

The control API arrives with the journal pipeline; until then every verb is
refused with one clear line and exit status 2, never a traceback.
"""

import sys


def main() -> None:
    print(
        "pairctl: refused: this build has no control API yet (pairing arrives with the journal "
        "pipeline)",
        file=sys.stderr,
    )
    sys.exit(2)
