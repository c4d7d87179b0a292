"""``python -m shared`` is the ``avma-remediator`` command."""

import sys

from shared.cli import main

sys.exit(main())
