"""`python -m luffy_fast train|demo`."""

import sys

from luffy_fast.cli import main

sys.exit(main())
