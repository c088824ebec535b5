"""Weight storage: every trainable float weight kept on a storage format after each optimizer update.

:func:`apply_weight_storage` (Gupta et al. 2015) sets a
:class:`~graphquant.keras.StorageRounding` constraint on each trainable variable
(composed with any existing one) and on the layer argument that holds it, so
``get_config`` and ``.keras`` files keep it.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import keras

from ..types import FormatLike
from .layers import StorageRounding

__all__ = ["apply_weight_storage"]


def apply_weight_storage(model: keras.Model, format: FormatLike, rounding: str = "nearest", seed: Optional[int] = None) -> int:
    """Round every trainable float weight of ``model`` onto ``format`` now and after every optimizer update.

    Sets a :class:`StorageRounding` constraint on each trainable variable
    (composed with any existing constraint); Keras optimizers apply it after
    each update. Returns the number of variables.
    """
    owners = _constraint_owners(model)
    n = 0
    for i, v in enumerate(model.trainable_variables):
        if not str(v.dtype).startswith(("float", "bfloat")):
            continue
        c = StorageRounding(format, rounding, inner=v.constraint, seed=None if seed is None else seed + i)
        v.constraint = c
        owner = owners.get(id(v))
        if owner is not None:  # the layer's constraint argument too, so get_config (and .keras files) keep it
            setattr(owner[0], owner[1], c)
        v.assign(c(v.value))
        n += 1
    return n


def _constraint_owners(model: keras.Model) -> Dict[int, Tuple[Any, str]]:
    """``id(variable) -> (layer, attribute)`` for weights whose layer takes their constraint as an argument
    (``kernel_constraint``, ``depthwise_constraint``, ``bias_constraint``, ``gamma_constraint``, ...): the
    attribute that holds, right now, the very constraint object the variable has."""
    out: Dict[int, Tuple[Any, str]] = {}
    for layer in model._flatten_layers(include_self=False, recursive=True):
        for name, attrs in _CONSTRAINT_ARGS.items():
            try:
                v = getattr(layer, name, None)
            except Exception:  # a property that needs something the layer does not have
                continue
            if not isinstance(v, keras.Variable) or id(v) in out:
                continue
            for attr in attrs:
                if attr in vars(layer) and getattr(layer, attr) is v.constraint:
                    out[id(v)] = (layer, attr)
                    break
    return out


#: weight attribute -> the constructor arguments of Keras' layers that hold its constraint
#: (DepthwiseConv*D keeps its kernel's in ``depthwise_constraint``)
_CONSTRAINT_ARGS = {
    "kernel": ("kernel_constraint", "depthwise_constraint"),
    "depthwise_kernel": ("depthwise_constraint",),
    "pointwise_kernel": ("pointwise_constraint",),
    "bias": ("bias_constraint",),
    "gamma": ("gamma_constraint",),
    "beta": ("beta_constraint",),
    "embeddings": ("embeddings_constraint",),
}
