"""``python -m fastft ...`` is the ``fastft`` command (so ``torchrun -m fastft train ...`` works)."""
import sys

from fastft.cli import main

if __name__ == "__main__":
    sys.exit(main())
