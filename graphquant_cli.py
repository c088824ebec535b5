"""The ``graphquant`` console script: quiet TensorFlow start-up, then :func:`graphquant.cli.main`.

TensorFlow's C++ start-up messages (oneDNN, CUDA probing, CPU features) go to
file descriptor 2 before its logging is configured, whatever
``TF_CPP_MIN_LOG_LEVEL`` says, so a command-line error would come after a
screenful of them. This launcher lives outside the ``graphquant`` package
(importing anything inside the package imports TensorFlow first): it holds
back what is written to fd 2 while graphquant imports, and shows it only with
``-v``/``--verbose`` or when the import fails. :func:`batch_worker` does the
same for each worker process of ``graphquant batch`` (otherwise each of its
workers, restarted after a crash or recycled, prints its start-up lines).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Any, Iterator, Optional


@contextlib.contextmanager
def _held_stderr(show: bool = False) -> Iterator[None]:
    """Hold back what is written to file descriptor 2 inside the block; write
    it out afterwards only if ``show`` or the block raised."""
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 to redirect (a detached process): nothing to hold
        yield
        return
    with tempfile.TemporaryFile() as held:
        sys.stderr.flush()
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            show = True
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if show:
                held.seek(0)
                sys.stderr.buffer.write(held.read())
                sys.stderr.flush()


def main() -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    verbose = any(a in ("-v", "--verbose") for a in sys.argv[1:])
    with _held_stderr(show=verbose):
        from graphquant.cli import main as cli_main
    return cli_main()


def batch_worker(conn: Any, parent: Optional[int] = None) -> None:
    """Body of one reused ``convert_batch`` worker process: TensorFlow and the
    converter start up quietly (devices included), then the worker converts
    models as :func:`graphquant.batch._serve` receives them; what a conversion
    itself writes to stderr still shows."""
    with _held_stderr():
        import tensorflow as tf

        from graphquant.batch import _serve
        from graphquant.graph import saved_model  # noqa: F401

        tf.config.list_physical_devices()  # device probing logs too (e.g. no CUDA driver)
    _serve(conn, parent)


if __name__ == "__main__":
    sys.exit(main())
