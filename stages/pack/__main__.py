"""`python -m stages.pack --params params.yaml`."""

import sys

from stages.cli import main

sys.exit(main(["pack", *sys.argv[1:]]))
