"""``python -m tl_circuits``: the ``tl-circuits`` command (see :mod:`tl_circuits.cli.command`)."""

import sys

from tl_circuits.cli.command import main

if __name__ == "__main__":
    sys.exit(main())
