"""`python -m stages.tokenize --params params.yaml`."""

import sys

from stages.cli import main

sys.exit(main(["tokenize", *sys.argv[1:]]))
