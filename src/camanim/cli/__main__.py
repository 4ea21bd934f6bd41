"""``python -m camanim.cli``: the ``camanim`` command."""

import sys

from camanim.cli import main

sys.exit(main())
