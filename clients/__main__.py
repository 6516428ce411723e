"""`python -m clients`: the `lpi` command line (clients/cli.py)."""

import sys

from clients.cli import main

sys.exit(main())
