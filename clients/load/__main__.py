"""`python -m clients.load`: the load script's command line (clients/load/cli.py)."""

import sys

from clients.load.cli import main

sys.exit(main())
