"""``python -m camanim``: the ``camanim`` command."""

import sys

from camanim.cli import main

sys.exit(main())
