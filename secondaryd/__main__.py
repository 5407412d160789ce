"""secondaryd: serves the secondary site's volumes over NBD."""

import sys

from common.daemon import run


def main() -> None:
    sys.exit(run("secondaryd", "secondary"))


if __name__ == "__main__":
    main()
