"""``python -m soupkit ...``: see :mod:`soupkit.cli`."""
import sys

from soupkit.cli import entry

if __name__ == "__main__":
    sys.exit(entry())
