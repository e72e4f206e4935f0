import sys

from hpd_fast.cli import main

sys.exit(main())
