"""``python -m maskprune``: the command line (see :mod:`maskprune.cli`)."""

import sys

from .cli import main

sys.exit(main())
