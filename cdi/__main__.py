"""`python -m cdi ...` runs the `cdi` command."""

import sys

from cdi.cli import main

sys.exit(main())
