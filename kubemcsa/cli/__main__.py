"""`python -m kubemcsa.cli`: the kubemcsa command (exec plugins name it so)."""

import sys

from kubemcsa.cli import main

if __name__ == "__main__":
    sys.exit(main())
