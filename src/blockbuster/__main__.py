"""``python -m blockbuster``: the same as the ``blockbuster`` command (:mod:`blockbuster.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
