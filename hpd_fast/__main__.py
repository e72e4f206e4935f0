"""``python -m hpd_fast``: the ``hpd-fast`` command line."""

import sys

from hpd_fast.cli import main

if __name__ == "__main__":
    sys.exit(main())
