"""``python -m pyquant ...`` runs the ``pyquant`` command line (``pyquant/cli.py``), for environments where the
console script is not on PATH."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
