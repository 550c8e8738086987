"""``python -m tinygpt_core``: the command line (see tinygpt_core/cli.py)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
