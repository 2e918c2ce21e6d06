"""`python -m stages.register --params params.yaml`."""

import sys

from stages.cli import main

sys.exit(main(["register", *sys.argv[1:]]))
