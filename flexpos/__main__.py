"""``python -m flexpos``: the same as ``python -m flexpos.bench`` (flexpos vs the dense path)."""

import sys

from .bench import main

sys.exit(main())
