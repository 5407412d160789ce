"""secondaryd: serves the secondary site's volumes over NBD."""

import sys

from common.daemon import run
from secondaryd.service import serve


def main() -> None:
    sys.exit(run("secondaryd", "secondary", serve))


if __name__ == "__main__":
    main()
