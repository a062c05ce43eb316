"""`python -m mixem.bench ...` is `mixem-fast bench ...`: one front end for every benchmark."""

import sys

from mixem.cli.app import app

if __name__ == "__main__":
    sys.exit(app(["bench", *sys.argv[1:]], prog_name="python -m mixem.bench"))
