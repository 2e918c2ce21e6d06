"""`python -m stages.decode --params params.yaml`."""

import sys

from stages.cli import main

sys.exit(main(["decode", *sys.argv[1:]]))
