"""Rounding a weight tensor of a graph on its own range: constants, checkpoints and runtime reads.

The graph rewriter (:mod:`graphquant.graph.rewrite`) traces :func:`round_weight`
into its rounding kernels; :mod:`graphquant.graph.planning` and
:mod:`graphquant.graph.saved_model` pre-round arrays with :func:`round_weight_array`.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

__all__ = ["round_weight", "round_weight_array"]


def round_weight(w, fmt, rounding: str, seed: Any = None, depthwise: bool = False):
    """Round a weight tensor on its own range: the one rule for constants, checkpoints and runtime reads.

    An :class:`Affine` format without a range takes each channel's (or the
    tensor's) min/max widened to contain 0; ``depthwise`` kernels get one
    scale per output channel (:func:`graphquant.ops.per_output_channel`).
    """
    import tensorflow as tf

    from ..formats import Affine
    from ..ops import per_output_channel, quantize

    def one(t):
        kw: Dict[str, Any] = {}
        if isinstance(fmt, Affine) and fmt.range is None:
            rank = len(t.shape)
            axis = None if fmt.axis is None else fmt.axis % rank
            reduce = [i for i in range(rank) if i != axis]
            lo = tf.minimum(tf.reduce_min(t, axis=reduce), 0.0)
            hi = tf.maximum(tf.reduce_max(t, axis=reduce), 0.0)
            kw["range"] = (lo, tf.maximum(hi, lo + 1e-12))
        return quantize(t, fmt, rounding, seed=seed, **kw)

    return per_output_channel(w, fmt, one, depthwise)


def round_weight_array(value, fmt, rounding: str, seed: Optional[int] = None, depthwise: bool = False):
    """:func:`round_weight` once, eagerly, on an array (frozen constants, checkpoints)."""
    import numpy as np
    import tensorflow as tf

    op_seed = (0 if seed is None else int(seed)) if rounding == "stochastic" else None
    return np.asarray(round_weight(tf.convert_to_tensor(value), fmt, rounding, op_seed, depthwise))
