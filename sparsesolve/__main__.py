"""``python -m sparsesolve``: the command line."""

import sys

from sparsesolve.cli import main

sys.exit(main())
