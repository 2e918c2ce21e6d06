"""`python -m stages.evaluate --params params.yaml [--checkpoint DIR]`."""

import sys

from stages.cli import main

sys.exit(main(["evaluate", *sys.argv[1:]]))
