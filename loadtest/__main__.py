"""`python -m loadtest ...`, the same as `kvrelay loadtest ...`."""

import sys

from loadtest.cli import main

sys.exit(main())
