"""Load ``.keras`` files of very deep quantized models.

Keras rebuilds a Functional model from its file with one recursive Python call
per layer on the longest path (``Functional.__init__`` -> ``map_graph``), the
same path ``quantize_model`` passes with a raised recursion limit. A copy with
a rounding layer after each convolution group is about a third longer than its
source, so a source just under Python's limit (a chain of 400 conv -> BN pairs,
EfficientNetV2L) can give a copy whose file ``keras.models.load_model`` cannot
rebuild (``RecursionError``). :func:`load_model` is ``keras.models.load_model``
with the recursion limit raised for the duration of the call, sized to the
number of layers in the file. :func:`load_keras_file` is how graphquant's
commands and reports open a model file the user names.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any, Optional

import keras

from ._speedups import recursion_room

__all__ = ["load_model", "load_keras_file"]


def _count(config: Any) -> int:
    """Layers in a serialized model config (nested models' layers included)."""
    n = 0
    if isinstance(config, dict):
        layers = config.get("config", {}).get("layers") if isinstance(config.get("config"), dict) else None
        if isinstance(layers, list):
            n += len(layers)
        for v in config.values():
            n += _count(v)
    elif isinstance(config, list):
        for v in config:
            n += _count(v)
    return n


def load_model(filepath: Any, **kwargs: Any) -> keras.Model:
    """``keras.models.load_model(filepath, **kwargs)`` with room for deep models.

    Python's recursion limit is raised (by a few frames per layer in the file)
    while Keras rebuilds the model, and restored after. For a file that is not
    a ``.keras`` zip archive the limit is left alone.
    """
    layers = 0
    try:
        with zipfile.ZipFile(filepath) as z:
            layers = _count(json.loads(z.read("config.json")))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        pass
    with recursion_room(4 * layers):
        return keras.models.load_model(filepath, **kwargs)


def load_keras_file(path: Any, what: Optional[str] = None) -> keras.Model:
    """Load a ``.keras``/``.h5`` model file the user named (graphquant's layers registered, safe mode, not
    compiled, room for deep models: :func:`load_model`). A missing file, or one Keras cannot read, raises
    ``ValueError`` naming the path, after ``what`` (the argument it came from) when given."""
    prefix = f"{what}: " if what else ""
    if not Path(path).is_file():
        raise ValueError(f"{prefix}{path}: no such file")
    try:
        return load_model(path, safe_mode=True, compile=False)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{prefix}{path}: cannot load the Keras model ({msg})") from None
