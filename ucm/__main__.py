"""`python -m ucm ...` is the `ucm` command."""

import sys

from ucm.tools.cli import main

sys.exit(main())
