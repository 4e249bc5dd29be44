import sys

from heatmark.cli import main

sys.exit(main())
