"""Entry point of the MLproject's `search` step: `python search/run_search.py [cdi search options]`.

Thin by design: every option is `cdi search`'s (see `cdi search --help`); the logic is in `cdi.search`.
"""

from __future__ import annotations

import sys

from cdi.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["search", *sys.argv[1:]]))
