"""Quiet TensorFlow start-up: hold back what its C++ runtime writes to file descriptor 2.

TensorFlow's C++ start-up messages (absl, CUDA probing, oneDNN, CPU features)
go to file descriptor 2 before its logging is configured, whatever
``TF_CPP_MIN_LOG_LEVEL`` says, so a command-line error would come after a
screenful of them. :func:`start_tensorflow` imports TensorFlow, Keras and
graphquant's layers with those messages held back, and shows them only when
asked (``-v``) or when the import fails. The ``graphquant`` command
(:func:`graphquant.cli.main`, also ``python -m graphquant``) calls it once the
arguments are parsed, and each worker process of ``graphquant batch`` when it
starts (otherwise each worker, restarted after a crash or recycled, prints its
own set of lines).

This module imports nothing from graphquant at module level and nothing heavy:
importing it (and the package, which is lazy) does not import TensorFlow.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Iterator

__all__ = ["held_stderr", "start_tensorflow"]


@contextlib.contextmanager
def held_stderr(show: bool = False) -> Iterator[None]:
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


def start_tensorflow(show: bool = False) -> None:
    """Import TensorFlow, Keras, graphquant's Keras layers and graph converter, and probe the devices, quietly.

    ``TF_CPP_MIN_LOG_LEVEL`` defaults to 3 (set it to see more); what is
    written to file descriptor 2 meanwhile is shown only if ``show`` or the
    import fails. Later messages (those of a conversion itself) still show.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with held_stderr(show=show):
        import tensorflow as tf

        from . import keras  # noqa: F401  (imports Keras; registers graphquant's layers)
        from .graph import saved_model  # noqa: F401  (the converter every command but compare-tflite uses)

        tf.config.list_physical_devices()  # device probing logs too (e.g. no CUDA driver)
