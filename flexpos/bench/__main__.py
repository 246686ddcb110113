"""``python -m flexpos.bench``."""

import sys

from .cli import main

sys.exit(main())
