import sys

from server.training.stylerig.cli import main

sys.exit(main())
