"""``python -m heatmark.predict BUNDLE INPUT OUTPUT [options]``."""

import sys

from heatmark.predict.cli import main

if __name__ == "__main__":
    sys.exit(main())
