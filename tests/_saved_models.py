"""The tiny SavedModel and command-line helpers that test_batch, test_cli and test_safety share.

``Tiny(seed)``: conv (3x3, 1 -> 2 channels, weights from ``seed``) -> ReLU, input ``x`` of shape
(None, 6, 6, 1), output ``y``; :func:`save_tiny` writes it as a SavedModel with that signature.
"""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf


def tiny_module(seed=0, side=6):
    """conv -> relu on an input ``x`` of shape (None, side, side, 1): a ``tf.Module`` with its signature ``serve``."""

    class Tiny(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(np.random.RandomState(seed).normal(size=(3, 3, 1, 2)).astype("float32"))

        @tf.function(input_signature=[tf.TensorSpec([None, side, side, 1], tf.float32, name="x")])
        def serve(self, x):
            return {"y": tf.nn.relu(tf.nn.conv2d(x, self.w, 1, "SAME"))}

    return Tiny()


def save_tiny(path, seed=0, side=6):
    """Save :func:`tiny_module` as a SavedModel at ``path`` (signature ``serving_default``); return the path."""
    m = tiny_module(seed, side)
    tf.saved_model.save(m, str(path), signatures=m.serve)
    return Path(path)


def tree_hash(path):
    """SHA-1 of every file under ``path`` (relative names and contents)."""
    h = hashlib.sha1()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for f in sorted(files):
            h.update(str(Path(root, f).relative_to(path)).encode() + Path(root, f).read_bytes())
    return h.hexdigest()


def run(*args, timeout=300, **kw):
    """``python -m graphquant ARGS`` as a subprocess (TensorFlow's start-up lines held back)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "graphquant", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, **kw)
