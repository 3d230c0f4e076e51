"""``python -m kubehv.cli``."""

import sys

from kubehv import cli

sys.exit(cli.main())
