"""`python -m stages.train --params params.yaml`."""

import sys

from stages.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
