"""``python -m qmpagent.cli``: the same as the ``qmpagent`` command."""

import sys

from .main import main

if __name__ == "__main__":
    sys.exit(main())
