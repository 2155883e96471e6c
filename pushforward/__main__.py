"""``python -m pushforward``: the ``pushforward`` command (also what ``torchrun -m pushforward``
runs in every process)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
