"""``python -m flexpos``: the same as ``python -m flexpos.bench`` (flexpos vs the dense path)."""

import sys

from .bench import main

if __name__ == "__main__":
    sys.exit(main())
