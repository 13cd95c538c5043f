"""``python -m mambascope`` (and ``torchrun -m mambascope``): the command line."""

import sys

from mambascope.cli import main

sys.exit(main())
