"""``python -m server``: the same as the ``portrait-rig-server`` console script."""

import sys

from .cli import main

sys.exit(main())
