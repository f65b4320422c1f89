"""`python -m autopeft` runs the command line."""

from __future__ import annotations

import sys

from autopeft.cli import main

sys.exit(main())
