"""Type aliases of graphquant's public options (for annotations; nothing here runs).

* :data:`FormatLike`: what ``format=`` / ``weight_format=`` / ``weight_storage=`` accept:
  a :class:`~graphquant.formats.Format`, a format string (``"fixed8[0,1]"``,
  ``"e4m3"``, ``"mxfp4"``, a name registered with
  :func:`graphquant.formats.register_format`) or a dict from ``Format.get_config()``.
* :data:`Selector`: one entry of ``include=`` / ``exclude=``: a regular expression
  matched against layer/node names and paths, ``"class:Name"``, or a layer class.
* :data:`Selectors`: one selector or a sequence of them.
* :data:`PathLike`: a path, as a string or ``os.PathLike``.
* :data:`ModelLike`: a model to compare, export or convert: a ``keras.Model``, a
  ``.keras``/``.h5`` file or a SavedModel folder.
* :data:`DataLike`: calibration or evaluation data: a numpy array or tensor, a dict
  of arrays (one per model input), a ``tf.data.Dataset``, or any iterable of batches
  (``(x, y)`` pairs keep ``x``); see :func:`graphquant.ranges.iter_batches`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence, Union

if TYPE_CHECKING:  # pragma: no cover - annotations only; importing TensorFlow here would slow `import graphquant`
    import os

    import keras
    import numpy as np
    import tensorflow as tf

    from .formats import Format

__all__ = ["FormatLike", "Selector", "Selectors", "PathLike", "ModelLike", "DataLike"]

FormatLike = Union["Format", str, Mapping[str, Any]]
Selector = Union[str, type]
Selectors = Union[Selector, Sequence[Selector]]
PathLike = Union[str, "os.PathLike[str]"]
ModelLike = Union["keras.Model", PathLike]
DataLike = Union["np.ndarray", "tf.Tensor", Mapping[str, Any], "tf.data.Dataset", Iterable[Any]]
