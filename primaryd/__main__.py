"""primaryd: serves the primary site's volumes over NBD."""

import sys

from common.daemon import run
from primaryd.service import serve


def main() -> None:
    sys.exit(run("primaryd", "primary", serve))


if __name__ == "__main__":
    main()
