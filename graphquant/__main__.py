"""``python -m graphquant``: the ``graphquant`` command (:func:`graphquant.cli.main`), same quiet start-up."""

import sys

from graphquant.cli import main

if __name__ == "__main__":
    sys.exit(main())
