"""``python -m portrait_rig_cli``: the same as the ``portrait-rig`` command."""

import sys

from .cli import main

sys.exit(main())
