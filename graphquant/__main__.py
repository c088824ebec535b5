"""``python -m graphquant``: the same as the ``graphquant`` command."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from graphquant.cli import main  # noqa: E402

sys.exit(main())
