"""`python -m cdi.cli`, the same as `cdi` and `python -m cdi`."""

from cdi.cli import main

raise SystemExit(main())
