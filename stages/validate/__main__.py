"""`python -m stages.validate --params params.yaml`."""

import sys

from stages.cli import main

sys.exit(main(["validate", *sys.argv[1:]]))
