"""The ``graphquant`` console script: quiet TensorFlow start-up, then :func:`graphquant.cli.main`.

TensorFlow's C++ start-up messages (oneDNN, CUDA probing, CPU features) go to
file descriptor 2 before its logging is configured, whatever
``TF_CPP_MIN_LOG_LEVEL`` says, so a command-line error would come after a
screenful of them. This launcher lives outside the ``graphquant`` package
(importing anything inside the package imports TensorFlow first): it holds
back what is written to fd 2 while graphquant imports, and shows it only with
``-v``/``--verbose`` or when the import fails.
"""

from __future__ import annotations

import os
import sys
import tempfile


def main() -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    verbose = any(a in ("-v", "--verbose") for a in sys.argv[1:])
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            from graphquant.cli import main as cli_main
        except BaseException:
            verbose = True
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if verbose:
                held.seek(0)
                sys.stderr.flush()
                sys.stderr.buffer.write(held.read())
                sys.stderr.flush()
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
