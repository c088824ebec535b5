"""Weight rounding on a weight's own range: the one rule both front ends call.

An :class:`~graphquant.formats.Affine` format without a ``range`` rounds a
weight on the weight's own range, per channel along ``fmt.axis`` (or over the
whole tensor): symmetric formats use ``(-m, m)`` with ``m = max|w|``, others
``(min w, max w)`` widened to contain zero (floored so that ``hi > lo``). The
range carries no gradient. Every other format is just
:func:`graphquant.ops.quantize`.

The Keras layers (:class:`graphquant.keras.QuantizeWeights`, BN folding) and
the graph front end (constants, checkpoints, variable reads in a GraphDef) all
round weights through :func:`round_weight`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, List, Optional, Tuple

import numpy as np
import tensorflow as tf

from .formats import Affine, Format
from .ops import fake_quant, per_output_channel, quantize, symmetric_fake_quant

__all__ = ["weight_range", "round_weight", "round_weight_array", "int8_export", "exporting_int8", "int8_export_max"]

# Set while graphquant.tflite traces a model for the converter (see :func:`int8_export`).
_INT8_EXPORT = [False]


@contextlib.contextmanager
def int8_export() -> Iterator[None]:
    """Within the block, weights rounded to fewer than 8 symmetric bits are traced as an 8-bit
    FakeQuant whose step is the same (range +-127 steps).

    The TFLite converter then stores int8 values that lie on the sub-8-bit grid
    (it would otherwise pack int4 tensors that LiteRT's reference kernels do not
    load). The values are the same; :mod:`graphquant.tflite` uses it while it
    traces a model, and the Keras layers' integer kernels step aside meanwhile
    (:func:`exporting_int8`).
    """
    before = _INT8_EXPORT[0]
    _INT8_EXPORT[0] = True
    try:
        yield
    finally:
        _INT8_EXPORT[0] = before


def exporting_int8() -> bool:
    """Whether a TFLite export trace is under way (:func:`int8_export`)."""
    return _INT8_EXPORT[0]


def _reduce_axes(fmt: Affine, rank: int) -> Optional[List[int]]:
    return None if fmt.axis is None else [i for i in range(rank) if i != fmt.axis % rank]


def weight_range(w: Any, fmt: Affine) -> Tuple[tf.Tensor, tf.Tensor]:
    """``(lo, hi)`` (float32, no gradient) of weight ``w`` for an Affine format without a range:
    per channel along ``fmt.axis`` (or over the tensor), ``(-max|w|, max|w|)`` if
    ``fmt.symmetric``, else ``(min w, max w)`` widened to contain 0, with ``hi >= lo + 1e-12``."""
    w = tf.convert_to_tensor(w)
    wf = tf.stop_gradient(tf.cast(w, tf.float32))
    red = _reduce_axes(fmt, w.shape.rank)
    if fmt.symmetric:
        m = tf.maximum(tf.reduce_max(tf.abs(wf), axis=red), 1e-12)
        return -m, m
    lo = tf.minimum(tf.reduce_min(wf, axis=red), 0.0)
    hi = tf.maximum(tf.maximum(tf.reduce_max(wf, axis=red), 0.0), lo + 1e-12)
    return lo, hi


def _fast_symmetric(fmt: Affine, w: tf.Tensor, rounding: str) -> bool:
    return fmt.symmetric and rounding == "nearest" and fmt.bits <= 16 and w.dtype == tf.float32 and w.shape.rank is not None


def int8_export_max(m: Any, bits: int) -> tf.Tensor:
    """``hi`` of the 8-bit FakeQuant range ``(-hi, hi)`` (narrow range, 127 steps) that the TFLite export
    traces for a symmetric ``bits``-bit weight (``bits < 8``) with ``max |w| = m`` (float32, per channel):
    ``127 * step`` with the ``bits``-bit step ``m * float32(1 / (2**(bits-1) - 1))``, all in float32.

    A multiplication by the float32 reciprocal, not ``m / 7``: the converter's TF-dialect canonicalizer
    rewrites ``tf.RealDiv(x, const)`` into ``tf.Mul(x, reciprocal(const))`` before it folds the range
    (``RealDivOp::getCanonicalizationPatterns``, ``RealDivWithConstDivisor``), so a traced ``m / 7`` was
    stored as ``m * float32(1/7)``: one or two float32 ulps off ``float32(m / 7)`` on about half the
    channels (measured on the digits CNN). Traced as a multiplication, TensorFlow and the converter compute
    the same value, and the simulation (:func:`graphquant.keras.integer_ops.integer_call`) uses this function.
    """
    recip = np.float32(1.0) / np.float32(2 ** (bits - 1) - 1)  # IEEE float32 division, as the converter folds it
    step = tf.cast(m, tf.float32) * tf.constant(recip, tf.float32)
    return tf.constant(127.0, tf.float32) * step


def _as_int8_grid(w: tf.Tensor, fmt: Affine) -> tf.Tensor:
    hi = int8_export_max(weight_range(w, fmt)[1], fmt.bits)
    f8 = Affine(8, symmetric=True, narrow_range=True, axis=fmt.axis)
    return fake_quant(w, f8, -hi, hi)  # TF's FakeQuant under use_xla(False)


def _round_own_range(w: Any, fmt: Format, rounding: str, seed: Any, fused: bool) -> tf.Tensor:
    if not (isinstance(fmt, Affine) and fmt.range is None):
        return quantize(w, fmt, rounding, seed=seed)
    w = tf.convert_to_tensor(w)
    if fused and _fast_symmetric(fmt, w, rounding):
        if _INT8_EXPORT[0] and fmt.bits < 8:
            return _as_int8_grid(w, fmt)
        return symmetric_fake_quant(w, fmt)  # bit for bit the general path below
    return quantize(w, fmt, rounding, range=weight_range(w, fmt), seed=seed)


def round_weight(
    w: Any, fmt: Format, rounding: str = "nearest", seed: Any = None, *, depthwise: bool = False, fused: bool = False
) -> tf.Tensor:
    """Round a weight tensor; an Affine format without a range uses the weight's own range
    (:func:`weight_range`).

    Args:
        depthwise: ``w`` is a depthwise kernel ``(..., in_channels, multiplier)``:
            one scale per output channel (:func:`graphquant.ops.per_output_channel`).
        fused: a symmetric format rounding to nearest may take
            :func:`graphquant.ops.symmetric_fake_quant` (one XLA cluster when XLA
            is on; same values) and honours :func:`int8_export`. The Keras layers
            set it; the graph front end writes plain TensorFlow ops.
    """
    return per_output_channel(w, fmt, lambda t: _round_own_range(t, fmt, rounding, seed, fused), depthwise)


def round_weight_array(
    value: Any, fmt: Format, rounding: str, seed: Optional[int] = None, depthwise: bool = False
) -> np.ndarray:
    """:func:`round_weight` once, eagerly, on an array (frozen constants, checkpoints);
    stochastic rounding draws with op seed ``seed`` (0 if None)."""
    op_seed = (0 if seed is None else int(seed)) if rounding == "stochastic" else None
    return np.asarray(round_weight(tf.convert_to_tensor(value), fmt, rounding, op_seed, depthwise=depthwise))
