"""primaryd: serves the primary site's volumes over NBD."""

import sys

from common.daemon import run


def main() -> None:
    sys.exit(run("primaryd", "primary"))


if __name__ == "__main__":
    main()
