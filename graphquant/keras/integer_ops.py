"""The int8 runtime's integer arithmetic at inference, in TensorFlow ops (TFLite/LiteRT reference kernels).

A model quantized with ``target="tflite_int8"`` rounds where the runtime
rounds, but a float simulation of a convolution group (``conv(x) + b``, then a
FakeQuant) differs from the integer kernel by one LSB now and then: the
kernel accumulates ``(q_in - zp_in) * q_w`` in int32 with the bias rounded to
int32 at scale ``s_in * s_w[c]``, then requantizes with a fixed-point
multiplier and *two* roundings (gemmlowp's ``SaturatingRoundingDoublingHighMul``
then ``RoundingDivideByPOT``, both half away from zero), and deep nets amplify
those single LSBs. This module holds that arithmetic: :func:`integer_call`, the
kernel a linked convolution / depthwise / Dense layer runs instead of its float
call, and the ``call`` replacements of the ops without weights (ADD, MEAN,
AVERAGE_POOL_2D, CONCATENATION, LOGISTIC, MUL, the model input's QUANTIZE;
:func:`op_kernel`). Which layers run them is decided by
:func:`graphquant.keras.integer.link_integer`. With ``training=False`` and ``kernels="reference"`` a linked
layer computes exactly what the reference kernels (``tensorflow/lite/kernels/internal/reference/
integer_ops/conv.h``, ``depthwise_conv.h``, ``fully_connected.h`` with
``common.h``'s ``MultiplyByQuantizedMultiplier`` and
``quantization_util.cc``'s ``QuantizeMultiplier``) compute, and returns the
dequantized result as float32 (the group's ReLU/ReLU6 and rounding layer then
leave it unchanged, and reproduce the fused activation's clamp). While
training the layers stay float with straight-through rounding (differentiable).

With ``kernels="xnnpack"`` (:data:`DEFAULT_KERNELS`; ``link_integer(model, kernels=...)`` or
``quantize_model(..., kernels=...)`` chooses) it computes instead what the default interpreter runs, the XNNPACK
delegate (``src/operators/convolution-nhwc.c``,
``src/microparams-init.c``, the ``qs8-qc8w-gemm``/``-dwconv`` ``minmax_fp32`` microkernels, ``qs8-vadd``,
``reduce-nd.c``, ``qs8-vmul``, ``qs8-vcvt``, ``unary-elementwise-nc.c``): conv / depthwise / FULLY_CONNECTED
requantize as ``rint(float32(acc) * float32(s_in * s_w[c] / s_out)) + zp`` (float32 arithmetic, ties to even),
ADD with 20-bit multipliers ``lrintf(s_i / s_out * 2**shift)`` and an arithmetic right shift, MEAN as
``nearbyint(float32(sum q) * inv + zp')`` in float32, MUL as ``rint(float32((q1 - zp1)(q2 - zp2)) *
float32(s1 * s2 / s_out)) + zp``, LOGISTIC through a table XNNPACK fills from a double ``exp`` (ties to even;
:func:`_xnnpack_logistic`), the int8 -> int8 QUANTIZE (after a sigmoid, into a Concatenate, after
AVERAGE_POOL_2D) with an 8-bit multiplier ``lrintf(256 s_in / s_out)`` and ``>> 8``. Measured equal on every
element of the digits CNN, a ResNet-style net, MobileNetV2 and EfficientNetB0 (swish = LOGISTIC then MUL,
squeeze-and-excitation; 90 output LSB off before LOGISTIC, MUL and QUANTIZE were modelled); the reference
arithmetic is up to 50 output LSB off on MobileNetV2 and 70 on EfficientNetB0 (single LSB differences that
the network amplifies). AVERAGE_POOL_2D itself is not delegated (LiteRT's kernel, the reference arithmetic).

The accumulation runs as a float32 convolution of integer-valued tensors:
exact while every partial sum stays below 2**24 in magnitude (int8 x int8
products of up to 32,385; typical layers stay far below).

Speed (inference of the simulation against the float model, issue 13): a linked layer's requantization is one
XLA launch (one pass over the tensor); in a traced call the scales of every rounding point and the integer
operands of every linked layer (int8 weights, int32 bias, multipliers, clamps) are computed once, in one XLA
launch per kind (:func:`qparams`, :func:`_prepared`; TensorFlow's kernels' values bit for bit); and the layer's
output tensor carries ``q - zp`` (:func:`carry`): the next integer kernel reads the
integers instead of recovering them from the float tensor, the group's ReLU and rounding layers pass the tensor
through (the kernel applied the fused activation's clamp on the integers, as the runtime does), and layers that
keep the scale (ZeroPadding, MaxPooling, ...) carry it along (:func:`same_scale_call`), as does MEAN. The float
output ``(q - zp) * s`` is computed only where a float consumer reads it. The reference kernels' requantization
takes float64 only for the product (:func:`_requantize_f64`), rounds once under a fused ReLU (equal after the
clamp), and reads the multiplier from the float64 bits (:func:`_multiplier_value`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Tuple

import keras
import numpy as np
import tensorflow as tf

from ..formats import Affine
from ..rounding import fake_quant_levels, fake_quant_nudged, no_contract
from ..weights import exporting_int8, int8_export_max, weight_range

__all__ = ["KERNELS", "DEFAULT_KERNELS", "check_kernels", "integer_call", "qparams", "quantize_input_tf",
           "quantize_multiplier_tf", "multiply_by_quantized_multiplier_tf", "multiply_by_quantized_multiplier_single_tf",
           "logistic_int8_tf"]


#: The kernel sets the simulation reproduces: ``"reference"``, LiteRT's reference kernels (``BUILTIN_REF``);
#: ``"xnnpack"``, the default op resolver's XNNPACK delegate (the kernels a default ``Interpreter`` runs).
KERNELS = ("reference", "xnnpack")
#: The kernel set a ``tflite_int8`` model simulates unless told otherwise: ``"xnnpack"``, what a default LiteRT
#: ``Interpreter`` runs on CPU (it applies the XNNPACK delegate), so that the simulation predicts the deployed
#: model; ``"reference"`` for ``BUILTIN_REF`` and runtimes that follow the reference kernels.
DEFAULT_KERNELS = "xnnpack"


def check_kernels(kernels: Any, what: str = "kernels") -> str:
    """``kernels`` if it names a kernel set of :data:`KERNELS`, else a ValueError naming ``what``."""
    if not isinstance(kernels, str) or kernels not in KERNELS:
        raise ValueError(f"{what} must be one of {KERNELS}, got {kernels!r}")
    return kernels


def kernels_of(layer: Any) -> str:
    """The kernel set a linked layer or model simulates (:func:`graphquant.keras.integer.link_integer`
    records it); :data:`DEFAULT_KERNELS` if none was recorded."""
    return getattr(layer, "_gq_kernels", DEFAULT_KERNELS)


def _round_away(x: tf.Tensor) -> tf.Tensor:
    """``std::round``: half away from zero."""
    return tf.sign(x) * tf.floor(tf.abs(x) + 0.5)


#: The attribute an integer kernel's output tensor carries in a traced inference call: ``(point, c)``, the
#: rounding point whose grid the output is on and ``c = q - zp`` (float32 integers) at that point's scale.
_CARRIED = "_gq_q_minus_zp"


def carry(y: tf.Tensor, point: Any, c: tf.Tensor) -> tf.Tensor:
    """Record on ``y`` (a graph tensor; eager tensors are left alone) that it is ``c * scale`` of ``point``, so
    that the next integer kernel reads ``c`` instead of recovering it with ``round(y / scale)``, and the group's
    ReLU and rounding layers pass ``y`` through (:func:`pass_carried`). Returns ``y``."""
    if not tf.executing_eagerly():
        setattr(y, _CARRIED, (point, c))
    return y


def carried(x: Any, point: Any) -> Optional[tf.Tensor]:
    """``c = q - zp`` that an integer kernel recorded on ``x`` (:func:`carry`) for the rounding point ``point``,
    else ``None``."""
    rec = getattr(x, _CARRIED, None)
    return rec[1] if rec is not None and rec[0] is point else None


def pass_carried(layer: Any, orig: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
    """The ``call`` of a linked group's ReLU/ReLU6 layer and of its rounding point: ``inputs`` unchanged when
    the group's integer kernel produced them (it rounded them and applied the fused activation's clamp on the
    integers, as the runtime does), else the layer's own call."""
    if carried(inputs, layer._gq_pass()) is not None:
        return inputs
    return orig(inputs, *args, **kwargs)


def same_scale_call(layer: Any, orig: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
    """The ``call`` of a layer that keeps its input's scale and zero point (ZeroPadding, MaxPooling, Reshape, ...):
    its own call, and on a carried input the same call on ``q - zp`` carried along (padding with 0 there is
    padding with the zero point, as the runtime pads)."""
    out = orig(inputs, *args, **kwargs)
    rec = getattr(inputs, _CARRIED, None)
    if rec is not None and not tf.executing_eagerly():
        carry(out, rec[0], orig(rec[1], *args, **kwargs))
    return out


def _scale_owner(q: Any) -> Any:
    """The rounding point whose range the converter gives ``q``: a Concatenate's output point for a point whose
    only consumer is that Concatenate and whose producer is a weight layer (CONCATENATION needs one scale: the
    converter has the conv/depthwise/FC requantize straight to it; measured). Not a chain: a Concatenate's own
    output point keeps its range and is requantized into a Concatenate it feeds (also measured)."""
    f = getattr(q, "_gq_scale_of", None)
    return q if f is None else f()


def qparams(q: Any) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """``(scale as stored (float32, as float64), scale in float64, zero point)`` of an int8 rounding point.

    As the converter derives them from the FakeQuant range (MLIR's
    ``getNudgedScaleAndZeroPoint``: ``scale = (max - min) / 255`` in double,
    zero point ``round(-128 - min / scale)`` clamped to ``[-128, 127]``); those of the Concatenate it
    feeds for a point that shares that scale (:func:`_scale_owner`). In a traced call, the first ``qparams``
    computes those of every rounding point of the model (``q._gq_points()``, set by
    :func:`graphquant.keras.integer.link_integer`) in one XLA launch, once per call.
    """
    owner = _scale_owner(q)
    memo = _trace_memo("qparams")
    if memo is not None and id(owner) in memo:
        return memo[id(owner)][1]
    owners = [owner]
    if memo is not None:
        others = {id(o): o for o in map(_scale_owner, getattr(q, "_gq_points", lambda: ())())}
        owners += [o for i, o in others.items() if i != id(owner) and i not in memo]
    ranges = [tf.convert_to_tensor(o.range.value)[:2] for o in owners]
    if len(owners) == 1:
        out = [tuple(t[0] for t in _qparams_of([ranges[0][None]], tf.constant(255.0, tf.float64)))]
    else:
        stored, s64, zp = (tf.unstack(t) for t in _qparams_fn(ranges, tf.constant(255.0, tf.float64)))
        out = list(zip(stored, s64, zp))
    if memo is None:
        return out[0]
    for o, v in zip(owners, out):
        memo[id(o)] = (o, v)  # (holds o: its id stays its own while the memo lives)
    return out[0]


def _qparams_of(ranges: list, levels: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """:func:`qparams` of stacked ``[min, max]`` ranges (float32), vectors; ``levels``: 255 (a tensor in XLA:
    a division by a constant becomes a product by its reciprocal there)."""
    st = tf.cast(tf.reshape(tf.stack(ranges), [-1, 2]), tf.float64)
    lo, hi = st[:, 0], st[:, 1]
    s64 = no_contract((hi - lo) / levels)
    zp = tf.clip_by_value(_round_away(-128.0 - lo / s64), -128.0, 127.0)
    return tf.cast(tf.cast(s64, tf.float32), tf.float64), s64, zp


_qparams_fn = tf.function(_qparams_of, jit_compile=True, autograph=False)


def _trace_memo(name: str) -> Optional[dict]:
    """A dict for values computed once per traced model call: it lives on Keras' call context (one per outermost
    layer call) and is per graph (function graph, cond branch, loop body); ``None`` when executing eagerly or
    outside a layer call."""
    from keras.src.backend.common import global_state

    ctx = global_state.get_global_attribute("current_call_ctx")
    if tf.executing_eagerly() or ctx is None:
        return None
    memos = ctx.__dict__.setdefault("_gq_memos", {})
    return memos.setdefault((name, id(tf.compat.v1.get_default_graph())), {})


def quantize_multiplier_tf(m: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
    """TFLite's ``QuantizeMultiplier`` on a float64 tensor (:func:`graphquant.tflite.quantize_multiplier`): int64
    mantissa in ``[2**30, 2**31)`` and shift; ``(0, 0)`` for 0 and below ``2**-32``. ``std::frexp`` read from
    the float64 bits (:func:`_rounded_bits`): the 31 top bits of the significand and the exponent."""
    kb = _rounded_bits(m)
    e = tf.bitwise.bitwise_and(tf.bitwise.right_shift(kb, 52), 0x7FF) - 1022  # m ~= q * 2**e, q in [0.5, 1)
    qf = tf.bitwise.right_shift(tf.bitwise.bitwise_or(tf.bitwise.bitwise_and(kb, (1 << 52) - 1), 1 << 52), 22)
    zero = tf.logical_or(tf.cast(m, tf.float64) <= 0.0, e < -31)
    return tf.where(zero, tf.zeros_like(qf), qf), tf.where(zero, tf.zeros_like(e), e)


def _rounded_bits(m: tf.Tensor) -> tf.Tensor:
    """The float64 bits (int64) of ``m > 0`` with its significand rounded to 31 bits half up, as
    ``QuantizeMultiplier`` rounds ``q * 2**31`` (``TfLiteRound``, half away from zero; ``m = q * 2**e``, ``q`` in
    ``[0.5, 1)``): a carry out of the significand raises the exponent, which is the mantissa reaching ``2**31``
    (halved, shift + 1)."""
    bits = tf.bitcast(tf.cast(m, tf.float64), tf.int64)
    return tf.bitwise.bitwise_and(bits + (1 << 21), ~((1 << 22) - 1))


def _srdhm(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """gemmlowp's ``SaturatingRoundingDoublingHighMul`` (int64 tensors holding int32 values)."""
    ab = a * b
    nudge = tf.where(ab >= 0, tf.constant(1 << 30, tf.int64), tf.constant(1 - (1 << 30), tf.int64))
    return tf.truncatediv(ab + nudge, tf.constant(1 << 31, tf.int64))


def _rdbypot(x: tf.Tensor, exponent: tf.Tensor) -> tf.Tensor:
    """gemmlowp's ``RoundingDivideByPOT`` (half away from zero)."""
    one = tf.constant(1, tf.int64)
    mask = tf.bitwise.left_shift(one, exponent) - 1
    remainder = tf.bitwise.bitwise_and(x, mask)
    threshold = tf.bitwise.right_shift(mask, one) + tf.cast(x < 0, tf.int64)
    return tf.bitwise.right_shift(x, exponent) + tf.cast(remainder > threshold, tf.int64)


def multiply_by_quantized_multiplier_tf(acc: tf.Tensor, mantissa: tf.Tensor, shift: tf.Tensor) -> tf.Tensor:
    """TFLite's ``MultiplyByQuantizedMultiplier`` (double rounding), int64 tensors; broadcasts."""
    left = tf.maximum(shift, 0)
    right = tf.maximum(-shift, 0)
    x = acc * tf.bitwise.left_shift(tf.constant(1, tf.int64), left)
    return _rdbypot(_srdhm(x, mantissa), right)


def multiply_by_quantized_multiplier_single_tf(acc: tf.Tensor, mantissa: tf.Tensor, shift: tf.Tensor) -> tf.Tensor:
    """The *single-rounding* ``MultiplyByQuantizedMultiplier`` (ruy's, and ``common.h`` built with
    ``TFLITE_SINGLE_ROUNDING``): ``(acc * mantissa + 2**(30 - shift)) >> (31 - shift)``, ties toward +inf.
    The int8 FULLY_CONNECTED kernel of LiteRT's reference op set rounds this way (measured: the double
    rounding of conv.h is 1 LSB off on ~0.4 % of its outputs, this one on none); int64 tensors."""
    total = 31 - shift
    one = tf.constant(1, tf.int64)
    return tf.bitwise.right_shift(acc * mantissa + tf.bitwise.left_shift(one, total - 1), total)


def _requantize_f64(acc: tf.Tensor, k: tf.Tensor, p: tf.Tensor, single: bool, nonneg: bool = False) -> tf.Tensor:
    """``MultiplyByQuantizedMultiplier(acc, mantissa, shift)`` of ``acc`` (float64 integers, ``|acc| < 2**31``)
    as float32, exact on every result that survives the int8 clamp; ``k = mantissa * 2**(shift - 31)`` and ``p =
    2**shift`` (float64, :func:`_multiplier_value`).

    Double rounding: gemmlowp's ``SaturatingRoundingDoublingHighMul`` is ``y = floor(x + 1/2)`` for ``x = acc *
    2**left * mantissa / 2**31`` (its nudge of ``1 - 2**30`` for negative products and the truncating division
    make ties go toward +inf), and ``x`` is a multiple of ``2**-31``: exactly representable in float64 while
    ``|x| < 2**21``; then ``RoundingDivideByPOT`` is ``round half away from zero`` of ``y / 2**right``, in
    float32: exact while ``|y| < 2**24`` (a power-of-two scaling, then ``+ 1/2`` within 24 bits). A larger
    ``|x|`` (error at most 1 in ``y``) or ``|y|`` (float32 rounding, monotone) gives ``|result| >= 2**(21 -
    right) - 1``, clamped to the same int8 value when ``right <= 12``. Single rounding: ``floor(acc * mantissa /
    2**(31 - shift) + 1/2)``, exact while ``|result| < 2**(22 + shift)``, clamped alike when ``shift >= -13``.
    The caller checks those bounds (:func:`_exact_bound`, :func:`_requantize_choice`). (Only the product needs float64: the second rounding
    in float32 made the requantization about 1.3x faster.)

    ``nonneg``: only results clamped to ``[0, hi]`` matter (a fused ReLU/ReLU6): one rounding of the same
    value. For ``y >= 0`` the two roundings are ``floor((floor(x + 1/2) + h) / 2**right) = floor(x / 2**right +
    (h + 1/2) / 2**right)`` (``h = 2**(right - 1)``, 0 when ``right = 0``; ``floor((floor(z) + n) / N) =
    floor((z + n) / N)`` for integers ``n``, ``N > 0``), and for ``y < 0`` both that and the true result are
    ``<= 0``, so clamped to 0 alike. ``acc * mantissa * 2**(shift - 31 - ...)`` and the sum are exact in
    float64 within the same bounds, and rounding is monotone beyond them."""
    if single:
        return tf.cast(tf.floor(acc * k + 0.5), tf.float32)
    inv = tf.minimum(p, 1.0)  # 2**-right
    if nonneg:  # (mantissa * 2**(left - 31 - right) = k whatever the sign of shift; (h + 1/2) / 2**right)
        c = 0.5 + tf.where(p < 1.0, p / 2.0, tf.zeros_like(p))
        return tf.cast(tf.floor(acc * k + c), tf.float32)
    y = tf.cast(tf.floor(acc * (k / inv) + 0.5), tf.float32)  # k / inv = mantissa * 2**(left - 31)
    return tf.sign(y) * tf.floor(tf.abs(y) * tf.cast(inv, tf.float32) + 0.5)


def _multiplier_value(m: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
    """``(mantissa * 2**(shift - 31), 2**shift)`` of ``QuantizeMultiplier(m)`` (:func:`quantize_multiplier_tf`)
    for float64 ``m > 0``, in seven small ops: ``m`` with its significand rounded (:func:`_rounded_bits`), and
    the power of two of its exponent."""
    kb = _rounded_bits(m)
    p = 2.0 * tf.bitcast(tf.bitwise.bitwise_and(kb, 0x7FF << 52), tf.float64)
    return tf.bitcast(kb, tf.float64), p


def weight_scale_max(w: tf.Tensor, fmt: Affine, depthwise: bool) -> tf.Tensor:
    """``max |w|`` per output channel in output-channel order (a scalar for a per-tensor format):
    the symmetric weight range (:func:`graphquant.weights.weight_range`) of :func:`_channels_last` ``w``."""
    w, fmt = _channels_last(w, fmt, depthwise)
    return weight_range(w, fmt)[1]


def _channels_last(w: tf.Tensor, fmt: Affine, depthwise: bool) -> Tuple[tf.Tensor, Affine]:
    """``w`` and its symmetric format, a depthwise kernel ``(..., in_channels, multiplier)`` seen as ``(taps,
    in_channels * multiplier)`` with the output channels last (``graphquant.ops.per_output_channel``'s order)."""
    sym = dataclasses.replace(fmt, symmetric=True)
    if fmt.axis is not None and depthwise:
        w = tf.reshape(w, [-1, int(w.shape[-2]) * int(w.shape[-1])])
        sym = dataclasses.replace(sym, axis=-1)
    return w, sym


def _scale_divisor(fmt: Affine) -> float:
    """The divisor of :func:`_weight_scale64`: 127 below 8 bits (the int8 export), ``2**(bits-1) - 1`` else."""
    return 127.0 if fmt.bits < 8 else float(2 ** (fmt.bits - 1) - 1)


def _weight_scale64(m: tf.Tensor, fmt: Affine, divisor: Any) -> Tuple[tf.Tensor, tf.Tensor]:
    """``(scale as stored (float32, as float64), scale in float64)`` of a symmetric weight with ``max |w| = m``
    (:func:`weight_scales`); ``divisor`` is :func:`_scale_divisor` (a tensor inside an XLA function: XLA turns a
    division by a constant into a product by its reciprocal)."""
    if fmt.bits < 8:
        s64 = tf.cast(int8_export_max(m, fmt.bits), tf.float64) / divisor
    else:  # = (m - (-m)) / (2 * levels): the FakeQuant range (-m, m), narrow range
        s64 = tf.cast(m, tf.float64) / divisor
    return tf.cast(tf.cast(s64, tf.float32), tf.float64), s64


def weight_scales(w: tf.Tensor, fmt: Affine, depthwise: bool) -> Tuple[tf.Tensor, tf.Tensor]:
    """``(scale as stored (float32, as float64), scale in float64)`` per output channel of a symmetric weight
    (:func:`weight_scale_max` order), as the converter derives them from the weight's FakeQuant range
    ``(-hi, hi)`` (narrow range): ``(hi - (-hi)) / 254`` in double. ``hi = max |w|`` for 8 bits; fewer bits
    are exported as an 8-bit FakeQuant on the same grid with ``hi`` of
    :func:`graphquant.weights.int8_export_max` (float32 arithmetic, as the converter folds it)."""
    return _weight_scale64(weight_scale_max(w, fmt, depthwise), fmt, _scale_divisor(fmt))


def plain_operands(kernel: tf.Tensor, bias: Optional[tf.Tensor], *, depthwise: bool, guard: Optional[Callable] = None
                   ) -> Tuple[tf.Tensor, Optional[tf.Tensor]]:
    """The ``weights`` function (see :func:`integer_call`) of a layer whose kernel and bias are its variables."""
    return kernel, bias


def layer_operands(layer: Any) -> Tuple[tf.Tensor, Optional[tf.Tensor], Optional[tf.Tensor], Affine, bool]:
    """``(w_float, w_rounded, bias, fmt, depthwise)`` of a linked layer as TensorFlow ops (its
    ``_gq_operands()`` evaluated; ``w_rounded`` ``None``: rounded to nearest)."""
    weights, args, w_rounded, fmt, depthwise = layer._gq_operands()
    w, bias = weights(*args, depthwise=depthwise)
    return w, w_rounded, bias, fmt, depthwise


def integer_call(layer: Any, inner: Any, inputs: tf.Tensor) -> Optional[tf.Tensor]:
    """The runtime kernel's output of ``inner`` (the conv / depthwise / dense ``layer`` wraps), dequantized, as
    float32; ``layer._gq_operands()`` gives ``(weights, args, w_rounded, fmt, depthwise)``: ``weights(*args,
    depthwise=, guard=)`` returns the float weights before rounding (their per-channel ``max |w|`` gives the
    converter's weight scale) and the float bias (folded) or ``None``, in TensorFlow ops that also run inside
    an XLA function (a module-level function; ``guard`` wraps each product that an addition reads:
    :func:`graphquant.rounding.no_contract`); ``w_rounded`` the weights on their grid, or ``None``: rounded to
    nearest here; the weight format; whether depthwise. ``None`` while the rounding points are being
    calibrated or the model is traced for the TFLite converter (the caller then runs the float path)."""

    in_q, out_q = layer._gq_integer()
    if in_q.calibrating or out_q.calibrating or exporting_int8():
        return None  # being calibrated, or traced for the converter: the float path
    xnnpack = kernels_of(layer) == "xnnpack"
    single = rounds_once(inner)
    w_int, b_int, factor, exact, clamp, s_out = _prepared(layer)
    x_int = _ints(inputs, in_q, qparams(in_q)[1])
    acc = _accumulate(inner, x_int, w_int)
    if xnnpack:
        c = _xnnpack_requantize(acc, b_int, factor, clamp)
    else:
        nonneg = getattr(layer, "_gq_activation", "linear") in ("relu", "relu6")  # lo >= 0 (_activation_clamp)
        c = _requantize_choice(acc, b_int, factor, exact, clamp, single, nonneg)
    if not tf.executing_eagerly():  # (an XLA function's output has relaxed dimensions)
        c.set_shape(inner.compute_output_shape(tuple(x_int.shape)))
    return carry(c * s_out, out_q, c)


def rounds_once(inner: Any) -> bool:
    """Whether the runtime's kernel for ``inner`` requantizes with one rounding: LiteRT's int8 FULLY_CONNECTED
    (ruy's), where conv and depthwise round twice."""
    return type(inner).__name__ == "Dense"


def _batchable(w_rounded: Any, shape: Any) -> bool:
    """Whether a layer joins a batch of :func:`_prepare_batch`: its weights rounded to nearest there, static
    kernel shape."""
    return w_rounded is None and shape.is_fully_defined()


def _prepared(layer: Any) -> Tuple:
    """A linked layer's integer operands (see :func:`integer_call` and :func:`_prepare_batch`): ``(w_int, b_int,
    factor, exact, clamp, s_out)``. In a traced call the linked layers of the model (``layer._gq_batch()``,
    set by :func:`graphquant.keras.integer.link_integer`) are prepared together, once per call, in one XLA
    launch per kind (kernel set and weight format)."""
    memo = _trace_memo("prepared")
    if memo is not None and id(layer) in memo:
        return memo[id(layer)][1]
    ops = {id(layer): layer._gq_operands()}
    group = [layer]
    _, args, w_rounded, fmt, _ = ops[id(layer)]
    if memo is not None and _batchable(w_rounded, args[0].shape):
        for other in getattr(layer, "_gq_batch", lambda: ())():
            if other is layer or id(other) in memo or kernels_of(other) != kernels_of(layer):
                continue
            o = other._gq_operands()
            if o[3] == fmt and _batchable(o[2], o[1][0].shape):
                ops[id(other)] = o
                group.append(other)
    results = _prepare_batch(group, [ops[id(g)] for g in group])
    if memo is not None:
        for g, r in zip(group, results):
            memo[id(g)] = (g, r)  # (holds g: its id stays its own while the memo lives)
    return results[0]


def _prepare_batch(layers: list, operands: list, xla: bool = True) -> list:
    """:func:`_prepare` of ``layers`` (same weight format and kernel set; ``operands``: their
    ``_gq_operands()``) in one XLA launch, split per layer: ``(w_int, b_int, factor, exact, clamp, s_out)``:
    ``factor`` XNNPACK's scale per channel, or the reference ``[k, p, m]`` rows (:func:`_requantize_choice`);
    ``clamp`` ``[lo, hi, s_out]`` (the requantization reads the first two). Packed: every tensor a ``tf.cond``
    branch reads costs it a ``Switch``.
    A lone layer that :func:`_batchable` refuses, or ``xla=False``, takes the same arithmetic in TensorFlow
    ops."""
    fmt = operands[0][3]
    xnnpack = kernels_of(layers[0]) == "xnnpack"
    statics = tuple((o[0], o[4], getattr(l, "_gq_activation", "linear"), rounds_once(_inner(l)))
                    for l, o in zip(layers, operands))  # fmt: skip
    points = [(qparams(l._gq_integer()[0]), qparams(l._gq_integer()[1])) for l in layers]
    s_in = [p[0][0] for p in points]
    s_in64 = [p[0][1] for p in points]
    s_out = [p[1][0] for p in points]
    zp_out = [p[1][2] for p in points]
    consts = (tf.constant([float(fmt.quant_min), float(fmt.quant_max)], tf.float32),
              tf.constant(_scale_divisor(fmt), tf.float64))  # (runtime tensors in XLA: see _weight_scale64)
    args = [tuple(o[1]) for o in operands]
    lone = len(layers) == 1
    if not xla or (lone and not _batchable(operands[0][2], args[0][0].shape)):
        fn = functools.partial(_prepare, statics, fmt, xnnpack, w_rounded=operands[0][2] if lone else None)
    else:
        fn = _prepare_fn(statics, fmt, xnnpack)
    w_ints, b_int, per_channel, per_layer, exact = fn(args, s_in, s_in64, s_out, zp_out, consts)
    shapes = [o[1][0].shape for o in operands]
    channels = [_channels(sh, fmt, o[4]) for sh, o in zip(shapes, operands)]
    outs = [_bias_size(sh, o[4]) for sh, o in zip(shapes, operands)]
    b_ints = tf.split(b_int, outs) if len(layers) > 1 else [b_int]
    vecs = tf.split(per_channel, channels, axis=1) if len(layers) > 1 else [per_channel]
    clamps = tf.unstack(per_layer, axis=1)
    exacts = tf.unstack(exact)
    return [(w_ints[i], b_ints[i], vecs[i][0] if xnnpack else vecs[i], exacts[i], clamps[i], clamps[i][2])
            for i in range(len(layers))]


def _inner(layer: Any) -> Any:
    """The Keras layer a linked layer wraps (``FoldedConvBatchNorm.conv``, ``QuantizeWeights.layer``)."""
    return layer.conv if hasattr(layer, "conv") and hasattr(layer, "bn") else layer.layer


def _channels(shape: Any, fmt: Affine, depthwise: bool) -> int:
    """Weight scales of a kernel of ``shape``: its output channels (1 for a per-tensor format)."""
    return 1 if fmt.axis is None else _bias_size(shape, depthwise)


def _bias_size(shape: Any, depthwise: bool) -> int:
    """Output channels of a kernel of ``shape`` (the bias length)."""
    return int(shape[-2]) * int(shape[-1]) if depthwise else int(shape[-1])


@functools.lru_cache(maxsize=None)
def _prepare_fn(statics: Tuple, fmt: Affine, xnnpack: bool) -> Callable:
    """:func:`_prepare` as one XLA function: one launch per weight format and model call instead of about a
    hundred small TensorFlow ops per layer (the preparation was most of the simulation's cost over the float model; one XLA
    launch per layer was little better: XLA:CPU runs each of its dozen small fusions as a separate step). XLA's
    arithmetic differs from TensorFlow's kernels in two places, kept out of it: a division by a constant
    becomes a product by the reciprocal (so the divisors are arguments, and
    :func:`graphquant.rounding.no_contract` hides quotients from its algebraic simplifier), and ``rsqrt`` (the
    BatchNorm fold's ``inv`` is computed before); products that feed a sum are kept from FMA contraction
    (``guard``). ``test_xla_preparation_equals_tensorflow_ops`` checks every value against TensorFlow's kernels.
    (One trace per set of kernel shapes: with ``reduce_retracing`` a second model's call failed on mismatched
    shapes inside the relaxed trace.)"""

    def prepare(args, s_in, s_in64, s_out, zp_out, consts):
        return _prepare(statics, fmt, xnnpack, args, s_in, s_in64, s_out, zp_out, consts)

    prepare.__name__ = "graphquant_integer_operands"
    return tf.function(prepare, jit_compile=True, autograph=False)


def _prepare(statics: Tuple, fmt: Affine, xnnpack: bool, args: list, s_in: list, s_in64: list, s_out: list,
             zp_out: list, consts: Tuple[tf.Tensor, tf.Tensor], w_rounded: Optional[tf.Tensor] = None) -> Tuple:
    """The integer operands of a batch of linked layers, concatenated: ``(w_int, b_int, per_channel, per_layer,
    exact)``:

    - ``w_int``: per layer, the int8 weights (float32 integers, the kernel's shape);
    - ``b_int``: the int32 biases (float64 integers, ``s_in * s_w[c]``; zeros for a layer without bias);
    - ``per_channel``: per weight scale (output channel, or the tensor), stacked rows: XNNPACK's float32
      requantization scale ``s_in * s_w[c] / s_out``; reference: ``mantissa * 2**(shift - 31)``,
      ``2**shift`` (:func:`_multiplier_value`) and ``m = s_in * s_w[c] / s_out`` in double;
    - ``per_layer``: rows ``lo``, ``hi`` (the output clamp of ``q - zp``, :func:`_activation_clamps`) and the
      float32 output scale;
    - ``exact``: per layer, whether the float form of the reference requantization is exact
      (:func:`_requantize_choice`; ``True`` for XNNPACK).

    ``statics``: per layer ``(weights, depthwise, activation, rounds_once)`` (see :func:`integer_call`); ``args``
    the arguments of each ``weights``; ``s_in``, ``s_in64``, ``s_out``, ``zp_out``: :func:`qparams` of its two
    points; ``consts``: FakeQuant's ``[quant_min, quant_max]`` and :func:`_scale_divisor`; ``w_rounded``: a lone
    layer's weights as its inference rounds them (not to nearest)."""
    f32, f64 = tf.float32, tf.float64
    mats, biases, n_chan, n_out = [], [], [], []
    for (weights, depthwise, _, _), a in zip(statics, args):
        w, bias = weights(*a, depthwise=depthwise, guard=no_contract)
        wm, sym = _channels_last(w, fmt, depthwise)
        if sym.axis is not None and sym.axis % wm.shape.rank != wm.shape.rank - 1:
            raise ValueError(f"integer kernels need per-tensor or per-output-channel weight scales, got {fmt}")
        mats.append(tf.reshape(wm, [-1, 1 if sym.axis is None else int(wm.shape[-1])]))
        n_chan.append(int(mats[-1].shape[-1]))
        n_out.append(_bias_size(w.shape, depthwise))
        biases.append(tf.zeros([n_out[-1]], f64) if bias is None else tf.cast(tf.reshape(bias, [-1]), f64))
    m = tf.concat([weight_range(t, dataclasses.replace(fmt, symmetric=True, axis=-1))[1] for t in mats], 0)
    layer_of_chan = tf.constant(np.repeat(np.arange(len(statics)), n_chan), tf.int32)
    s_w, s_w64 = _weight_scale64(m, fmt, consts[1])
    s_w64 = no_contract(s_w64)
    w_ints = []
    nudged = fake_quant_nudged(-m, m, consts[0][0], consts[0][1])  # (once for all layers: fewer XLA fusions)
    for t, (lo_c, hi_c), a in zip(mats, _spans(n_chan), args):
        if w_rounded is None:  # round_weight(w, fmt, "nearest"): FakeQuant on (-m, m) per channel (or tensor),
            # whose value is k * s'[c] with s' its nudged scale: w_int is k (s' is the float32 (2m) / (2 levels),
            # within an ulp of s_w[c] = float32(m / levels); the quotient below would round to k)
            k = fake_quant_levels(t, tuple(v[lo_c:hi_c] for v in nudged), fmt.axis is not None)
        else:  # k * s'[c] with |k| <= 127 and s' within a few float32 ulps of s_w[c]: the float32 quotient lies
            # within 1e-4 of k, and rounds to it
            k = tf.round(tf.reshape(w_rounded, t.shape) / tf.cast(s_w[lo_c:hi_c], f32))
        w_ints.append(tf.reshape(k, a[0].shape))
    s_in, s_in64, s_out, zp_out = (tf.stack([tf.reshape(v, []) for v in t]) for t in (s_in, s_in64, s_out, zp_out))
    # the int32 bias at s_in * s_w[c] (c: the output channel's scale, or the tensor's)
    bias_chan = np.concatenate([lo_c + (np.zeros(n, int) if c == 1 and n != 1 else np.arange(n))
                                for (lo_c, _), c, n in zip(_spans(n_chan), n_chan, n_out)])
    bias_layer = np.repeat(np.arange(len(statics)), n_out)
    den = no_contract(tf.gather(s_in64, bias_layer) * tf.gather(s_w64, bias_chan))
    b_int = _round_away(tf.concat(biases, 0) / den)
    acts = [st[2] for st in statics]
    lo, hi = _activation_clamps(tf.constant([a in ("relu", "relu6") for a in acts]),
                                tf.constant([a == "relu6" for a in acts]), s_out, zp_out)
    per_layer = tf.stack([lo, hi, tf.cast(s_out, f32)])
    s_in_c, s_out_c = tf.gather(s_in, layer_of_chan), tf.gather(s_out, layer_of_chan)
    if xnnpack:  # XNNPACK's requantization scale, in float32 as its operator computes it
        factor = tf.cast(s_in_c, f32) * tf.cast(s_w, f32) / tf.cast(s_out_c, f32)
        return w_ints, b_int, factor[None], per_layer, tf.ones([len(statics)], tf.bool)
    mult = no_contract(s_in_c * s_w) / s_out_c  # the multiplier, QuantizeMultiplier'd at the requantization
    bound = tf.constant([_exact_bound(st[3]) for st in statics], f64)
    exact = tf.math.unsorted_segment_min(mult, layer_of_chan, len(statics)) >= bound
    return w_ints, b_int, tf.stack([*_multiplier_value(mult), mult]), per_layer, exact


def _spans(sizes: list) -> list:
    """``[(start, end)]`` of consecutive pieces of ``sizes``."""
    ends = np.cumsum(sizes).tolist()
    return [(e - n, e) for e, n in zip(ends, sizes)]


def _accumulate(inner: Any, x_int: tf.Tensor, w_int: tf.Tensor) -> tf.Tensor:
    """``inner``'s convolution / matmul of the integers ``x_int`` by ``w_int`` (float32), without its own bias
    and activation."""
    mapping = [(inner.kernel, w_int)]
    if getattr(inner, "use_bias", False) and getattr(inner, "bias", None) is not None:
        mapping.append((inner.bias, tf.zeros_like(inner.bias.value)))
    act = inner.activation
    inner.activation = keras.activations.linear  # the clamp happens on the integers
    try:
        with keras.StatelessScope(state_mapping=mapping):
            return inner.call(x_int)
    finally:
        inner.activation = act


def _activation_clamp(activation: str, s_out: tf.Tensor, zp_out: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
    """:func:`_activation_clamps` of one op with fused ``activation`` (``"linear"``, ``"relu"``, ``"relu6"``)."""
    return _activation_clamps(activation in ("relu", "relu6"), activation == "relu6", s_out, zp_out)


def _activation_clamps(relu: Any, relu6: Any, s_out: tf.Tensor, zp_out: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
    """The output clamp ``[lo, hi]`` of ``q - zp`` (float32): the int8 range, narrowed by the fused activation
    as the runtime narrows it (``CalculateActivationRangeQuantized``: ``zp + round(0 / s)`` and, for ReLU6,
    ``zp + round(6.0f / s)``); ``relu``: ReLU or ReLU6 fused, ``relu6``: ReLU6 (booleans, per op)."""
    zp = tf.cast(zp_out, tf.float32)
    lo, hi = -128.0 - zp, 127.0 - zp
    lo = tf.where(relu, tf.maximum(lo, 0.0), lo)
    six = tf.constant(6.0, tf.float32) / tf.cast(s_out, tf.float32)
    return lo, tf.where(relu6, tf.minimum(hi, tf.cast(_round_away(tf.cast(six, tf.float64)), tf.float32)), hi)


@tf.function(jit_compile=True, reduce_retracing=True)
def _xnnpack_requantize(acc: tf.Tensor, b_int: tf.Tensor, scale: tf.Tensor, clamp: tf.Tensor) -> tf.Tensor:
    """XNNPACK's ``fp32`` requantization of a qs8 conv / depthwise / fully connected (``qs8-qc8w-gemm``,
    ``qs8-qc8w-dwconv`` ``minmax_fp32`` microkernels): the int32 accumulator plus the int32 bias, converted to
    float32 (round to nearest even; the sum is exact in float64), times the float32 scale (one float32
    rounding), rounded to nearest *even* (``cvtps``/``lrintf``/magic bias), clamped to ``[clamp[0], clamp[1]]``:
    ``q - zp`` as float32. One XLA cluster: one pass over the tensor."""
    acc32 = tf.cast(tf.cast(acc, tf.float64) + b_int, tf.float32)
    return tf.clip_by_value(tf.round(acc32 * scale), clamp[0], clamp[1])  # tf.round: half to even


def _requantize_output(acc: tf.Tensor, b_int: Any, m: tf.Tensor, lo: tf.Tensor, hi: tf.Tensor, single: bool = False,
                       nonneg: bool = False) -> tf.Tensor:
    """``MultiplyByQuantizedMultiplier`` (double rounding, or ``single``) by ``QuantizeMultiplier(m)`` (``m`` the
    float64 multiplier per output channel) of the int32 accumulator ``acc`` (float32 or float64 integers) plus
    the int32 bias ``b_int`` (float64 integers), clamped to ``[lo, hi]``: ``q - zp`` as float32
    (:func:`_requantize_choice` with the multiplier's values and bound computed here)."""
    exact = tf.reduce_min(m) >= _exact_bound(single)
    kpm = tf.stack([*_multiplier_value(m), tf.cast(m, tf.float64)])
    return _requantize_choice(acc, b_int, kpm, exact, tf.stack([lo, hi]), single, nonneg)


def _exact_bound(single: bool) -> float:
    """The smallest multiplier for which :func:`_requantize_f64` is exact on every result the int8 clamp keeps
    (shift at least -12 for the double rounding, -13 for the single one)."""
    return 2.0**-14 if single else 2.0**-13


def _requantize_choice(acc: tf.Tensor, b_int: Any, kpm: tf.Tensor, exact: tf.Tensor, clamp: tf.Tensor, single: bool,
                       nonneg: bool) -> tf.Tensor:
    """:func:`_requantize_output` given the rows ``kpm = [k, p, m]`` (:func:`_prepare`), ``exact`` and ``clamp``
    (``[lo, hi, ...]``): the cheap float
    form where it is exact (:func:`_requantize_f64`: every ``m >= 2**-13``, ``2**-14`` for ``single``, so that
    the shift is at least -12 / -13; ``nonneg``: ``lo >= 0``), else int64; the choice is a ``tf.cond`` between
    two XLA launches (:func:`_requantize_fast`, :func:`_requantize_int64`): as a conditional inside one XLA
    function it cost 10-20 us more per launch (measured on MobileNetV2's layers)."""
    return tf.cond(exact, lambda: _requantize_fast(acc, b_int, kpm, clamp, single, nonneg),
                   lambda: _requantize_int64(acc, b_int, kpm, clamp, single))


@tf.function(jit_compile=True, reduce_retracing=True)
def _requantize_fast(acc: tf.Tensor, b_int: Any, kpm: tf.Tensor, clamp: tf.Tensor, single: bool, nonneg: bool
                     ) -> tf.Tensor:
    """:func:`_requantize_f64` of ``acc + b_int``, clamped, as one XLA cluster: a dozen elementwise
    float64/float32 ops fused into one pass over the tensor (about 4x cheaper than running them one by one);
    XLA keeps IEEE semantics (no fast math)."""
    y = _requantize_f64(tf.cast(acc, tf.float64) + b_int, kpm[0], kpm[1], single, nonneg)
    return tf.clip_by_value(y, clamp[0], clamp[1])


@tf.function(jit_compile=True, reduce_retracing=True)
def _requantize_int64(acc: tf.Tensor, b_int: Any, kpm: tf.Tensor, clamp: tf.Tensor, single: bool) -> tf.Tensor:
    """The int64 kernels' ``MultiplyByQuantizedMultiplier`` of ``acc + b_int`` by ``QuantizeMultiplier(m)``,
    clamped; one XLA cluster (integer ops only)."""
    mult, shift = quantize_multiplier_tf(kpm[2])
    fn = multiply_by_quantized_multiplier_single_tf if single else multiply_by_quantized_multiplier_tf
    out = tf.cast(fn(tf.cast(tf.cast(acc, tf.float64) + b_int, tf.int64), mult, shift), tf.float32)
    return tf.clip_by_value(out, clamp[0], clamp[1])


# --------------------------------------------------------------------------- ADD, MEAN (no weights)
def _training_now() -> bool:
    from keras.src.backend.common import global_state

    ctx = global_state.get_global_attribute("current_call_ctx")
    value = None if ctx is None else ctx.get_value("training")
    return bool(value) if value is not None else False


def _int_add(layer: Any, orig: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
    """TFLite's reference int8 ADD (``integer_ops/add.h``): inputs shifted left by 20, each scaled by
    ``s_i / (2 max(s_1, s_2))``, summed, scaled by ``2 max(s_1, s_2) / (2**20 s_out)``, zero point, clamp (the
    int8 range narrowed by a fused ReLU/ReLU6); XNNPACK's under ``"xnnpack"`` (:func:`_xnnpack_add_arith`)."""

    qs = layer._gq_integer()
    if _training_now() or exporting_int8() or any(q.calibrating for q in qs):
        return orig(inputs, *args, **kwargs)
    (s1, _, _), (s2, _, _), (so, _, zo) = (qparams(q) for q in qs)
    lo, hi = _activation_clamp(getattr(layer, "_gq_activation", "linear"), so, zo)
    arith = _xnnpack_add_arith if kernels_of(layer) == "xnnpack" else _add_arith
    c1, c2 = carried(inputs[0], qs[0]), carried(inputs[1], qs[1])
    c = arith(inputs[0] if c1 is None else c1, inputs[1] if c2 is None else c2, s1, s2, so, zo, lo, hi,
              c1 is not None, c2 is not None)  # fmt: skip
    if not tf.executing_eagerly():
        c.set_shape(inputs[0].shape)
    return carry(c * tf.cast(so, tf.float32), qs[2], c)


def _add_input(x: tf.Tensor, s: tf.Tensor, is_int: bool) -> tf.Tensor:
    """``q - zp`` (int64) of an ADD input: ``x`` itself if ``is_int`` (carried), else recovered from ``x = (q -
    zp) * s``."""
    if is_int:
        return tf.cast(x, tf.int64)
    return tf.cast(_round_away(tf.cast(x, tf.float64) / s), tf.int64)


@tf.function(jit_compile=True, reduce_retracing=True)
def _add_arith(x1: tf.Tensor, x2: tf.Tensor, s1: tf.Tensor, s2: tf.Tensor, so: tf.Tensor, zo: tf.Tensor,
               lo: tf.Tensor, hi: tf.Tensor, int1: bool, int2: bool) -> tf.Tensor:
    """The reference int8 ADD's integer arithmetic (see :func:`_int_add`), one XLA cluster; ``q_out - zo`` as
    float32, clamped to ``[lo, hi]``."""
    twice_max = 2.0 * tf.maximum(s1, s2)
    shift = 20
    ints = []
    for x, s, is_int in zip((x1, x2), (s1, s2), (int1, int2)):
        m, sh = quantize_multiplier_tf(s / twice_max)
        ints.append(multiply_by_quantized_multiplier_tf(_add_input(x, s, is_int) * (1 << shift), m, sh))
    m, sh = quantize_multiplier_tf(twice_max / (float(1 << shift) * so))
    out = tf.cast(multiply_by_quantized_multiplier_tf(ints[0] + ints[1], m, sh), tf.float32)
    return tf.clip_by_value(out, lo, hi)


@tf.function(jit_compile=True, reduce_retracing=True)
def _xnnpack_add_arith(x1: tf.Tensor, x2: tf.Tensor, s1: tf.Tensor, s2: tf.Tensor, so: tf.Tensor, zo: tf.Tensor,
                       lo: tf.Tensor, hi: tf.Tensor, int1: bool, int2: bool) -> tf.Tensor:
    """XNNPACK's qs8 ADD (``xnn_init_qs8_add_minmax_scalar_params``, ``qs8-vadd`` microkernels): float32
    ratios ``r_i = s_i / s_out``; ``shift = 20 - exponent(max r_i)``; multipliers ``lrintf(r_i * 2**shift)``
    (below ``2**21``); ``out = ((q1 - zp1) m1 + (q2 - zp2) m2 + 2**(shift-1)) >> shift`` (arithmetic shift:
    ties toward +inf), plus the zero point, clamped; one XLA cluster; ``q_out - zo`` as float32."""
    f32 = tf.float32
    r1, r2 = tf.cast(s1, f32) / tf.cast(so, f32), tf.cast(s2, f32) / tf.cast(so, f32)
    # exponent of the larger ratio, exactly (frexp-free: the float32 bits)
    bits = tf.bitwise.right_shift(tf.bitcast(tf.maximum(r1, r2), tf.int32), 23)
    shift = tf.cast(20 - (bits - 127), tf.int64)
    pot = tf.pow(tf.constant(2.0, tf.float64), tf.cast(shift, tf.float64))
    acc = tf.bitwise.left_shift(tf.constant(1, tf.int64), shift - 1)
    for x, s, r, is_int in zip((x1, x2), (s1, s2), (r1, r2), (int1, int2)):
        mult = tf.cast(tf.round(tf.cast(r, tf.float64) * pot), tf.int64)  # exact scaling; lrintf: half to even
        acc += _add_input(x, s, is_int) * mult  # (q - zp) * m
    out = tf.cast(tf.bitwise.right_shift(acc, shift), f32)
    return tf.clip_by_value(out, lo, hi)


def _int_mean(layer: Any, orig: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
    """TFLite's reference int8 MEAN over height and width (``reference/reduce.h`` ``QuantizedMeanOrSum``):
    the sum of ``q - zp_in``, requantized with the multiplier of ``s_in / s_out`` whose mantissa is shifted
    left by ``floor(log2(count))`` and divided by the count (int64, truncating), plus ``zp_out``, clamped."""

    qs = layer._gq_integer()
    if _training_now() or exporting_int8() or any(q.calibrating for q in qs):
        return orig(inputs, *args, **kwargs)
    (si, si64, zi), (so, _, zo) = (qparams(q) for q in qs)
    axes = list(range(1, inputs.shape.rank - 1))
    n = 1
    for a in axes:
        n *= int(inputs.shape[a])
    # the sum of q - zp_in (|q - zp_in| <= 255): exact in float32 while n * 255 < 2**24
    dtype = tf.float32 if n * 255 < 2**24 else tf.float64
    total = tf.reduce_sum(tf.cast(_ints(inputs, qs[0], si64), dtype), axis=axes,
                          keepdims=bool(getattr(layer, "keepdims", False)))
    acc = tf.cast(total, tf.int64)
    if kernels_of(layer) == "xnnpack":
        # XNNPACK's qs8 MEAN (reduce-nd.c, xnn_init_qs8_reduce_scalar_params, the reference int32 -> qs8
        # convert): the int32 sum of the raw values q, then nearbyint(float(sum) * inv + zp') with, in float32,
        # inv = (s_in / s_out) * (1 / count) and zp' = zp_out - (count * zp_in) * inv; clamped
        f32 = tf.float32
        inv = (tf.cast(si, f32) / tf.cast(so, f32)) * (tf.constant(1.0, f32) / float(n))
        zpp = tf.cast(zo, f32) - tf.cast(n * tf.cast(zi, tf.int64), f32) * inv
        raw_sum = tf.cast(acc + n * tf.cast(zi, tf.int64), f32)  # the sum of the raw int8 values
        out = tf.clip_by_value(tf.cast(tf.round(raw_sum * inv + zpp), tf.float64), -128.0, 127.0)
    else:
        m, sh = quantize_multiplier_tf(si / so)
        # reference_ops::QuantizedMeanOrSum: 1/count folded into the multiplier (int64 division truncates)
        pot = tf.minimum(tf.constant(min(n.bit_length() - 1, 32), tf.int64), 31 + sh)
        m = tf.truncatediv(tf.bitwise.left_shift(m, pot), tf.constant(n, tf.int64))
        acc = multiply_by_quantized_multiplier_tf(acc, m, sh - pot)
        out = tf.clip_by_value(tf.cast(acc + tf.cast(zo, tf.int64), tf.float64), -128.0, 127.0)
    c = tf.cast(out - zo, tf.float32)
    return carry(c * tf.cast(so, tf.float32), qs[1], c)


def _ints(x: Any, point: Any, s64: tf.Tensor) -> tf.Tensor:
    """``q - zp`` (float32 integers) of a tensor on ``point``'s grid (float64 scale ``s64``): the integers an
    integer kernel carried along (:func:`carried`), else recovered from ``x = (q - zp) * s`` (up to float32
    rounding; ``|q - zp| <= 255``: the float32 product by ``1 / s`` lies within 1e-4 of ``q - zp``)."""
    c = carried(x, point)
    if c is None:
        c = tf.round(tf.cast(x, tf.float32) * tf.cast(1.0 / s64, tf.float32))
    return c


def _int_avg_pool(layer: Any, orig: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
    """TFLite's int8 AVERAGE_POOL_2D (``reference/integer_ops/pooling.h``), then the int8 -> int8 QUANTIZE the
    converter inserts when the output's rounding point has a range of its own (``reference/requantize.h``).

    AVERAGE_POOL_2D keeps its input's scale and zero point: per window, the sum of the raw int8 values over the
    elements inside the input (``SAME`` padding counts fewer), divided by that count rounding half away from
    zero (``(acc +- count / 2) / count``, C division). The requantization: ``MultiplyByQuantizedMultiplier(q -
    zp_in, M, shift) + zp_out`` with ``M = s_in / s_out`` (float32 scales, in double), clamped; under ``"xnnpack"``
    XNNPACK's (:func:`_xnnpack_requantize_int8`: the delegate takes that QUANTIZE, not AVERAGE_POOL_2D)."""

    qs = layer._gq_integer()
    if _training_now() or exporting_int8() or any(q.calibrating for q in qs):
        return orig(inputs, *args, **kwargs)
    (si, _, zi), (so, _, zo) = (qparams(q) for q in qs)
    q_in = tf.cast(_q_minus_zp(inputs, qs[0]), tf.float64) + zi  # the raw int8 values
    ph, pw = layer.pool_size
    sh, sw = layer.strides
    pad = layer.padding.upper()
    channels = int(inputs.shape[-1])
    ones = tf.ones([ph, pw, channels, 1], tf.float32)
    # window sums of integers below 2**24 in magnitude: exact in float32
    acc = tf.nn.depthwise_conv2d(tf.cast(q_in, tf.float32), ones, [1, sh, sw, 1], pad)
    count = tf.nn.depthwise_conv2d(tf.ones_like(q_in[:1, :, :, :1], tf.float32), ones[:, :, :1], [1, sh, sw, 1], pad)
    acc, count = tf.cast(acc, tf.int64), tf.cast(count, tf.int64)
    avg = tf.sign(acc) * tf.math.floordiv(tf.abs(acc) + count // 2, count)
    avg = tf.clip_by_value(avg, -128, 127)
    requantize = _xnnpack_requantize_int8 if kernels_of(layer) == "xnnpack" else _requantize_int8
    out = tf.cast(requantize(avg - tf.cast(zi, tf.int64), si, so, zo) * so, tf.float32)
    if not tf.executing_eagerly():
        out.set_shape(layer.compute_output_shape(inputs.shape))
    return out


def quantize_input_tf(x: Any, scale: Any, zero_point: Any, qmin: float = -128.0, qmax: float = 127.0) -> tf.Tensor:
    """TFLite's QUANTIZE of a float tensor to int8 (``reference/quantize.h`` ``AffineQuantize``, and the
    optimized kernel's scalar path): ``clamp(std::round(x / float(scale)) + zp, qmin, qmax)``; the division in
    float32, ``std::round`` (half away from zero) applied exactly (in float64: ``|v| + 0.5`` in float32 rounds
    0.49999997 up). Returns ``q - zp`` as float64."""
    v = tf.cast(tf.cast(x, tf.float32) / tf.cast(scale, tf.float32), tf.float64)
    zp = tf.cast(zero_point, tf.float64)
    return tf.clip_by_value(_round_away(v) + zp, qmin, qmax) - zp


def int_quantize(layer: Any, orig: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
    """A rounding point on the runtime's grid (scale and zero point of :func:`qparams`), rounding as its QUANTIZE
    does (:func:`quantize_input_tf`), instead of TensorFlow's FakeQuant arithmetic (nudged minimum,
    ``floor((x - nudged_min) / scale + 1/2)``, a float32 scale computed in float32): they differ by one LSB on
    a few elements, which deep nets amplify. Used at the model input, and at points that take a Concatenate's
    scale (:func:`_scale_owner`) and that Concatenate's output."""

    if carried(inputs, layer) is not None:  # an integer kernel's output, already on this point's grid
        return inputs
    training = kwargs.get("training")
    train = bool(training) if training is not None else _training_now()
    if train or exporting_int8() or layer.calibrating:  # (inference rounds y, not pre_activation)
        return orig(inputs, *args, **kwargs)
    s, _, zp = qparams(layer)
    c = _quantize_fused(inputs, s, zp)
    if not tf.executing_eagerly():
        c.set_shape(inputs.shape)
    return carry(c * tf.cast(s, tf.float32), layer, c)


@tf.function(jit_compile=True, reduce_retracing=True)
def _quantize_fused(x: tf.Tensor, s: tf.Tensor, zp: tf.Tensor) -> tf.Tensor:
    """:func:`quantize_input_tf` as float32 ``q - zp``, one XLA cluster (a single pass over the tensor; as plain
    ops, its float64 steps each read and write the whole tensor)."""
    return tf.cast(quantize_input_tf(x, s, zp), tf.float32)


def int_concat(layer: Any, orig: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
    """TFLite's int8 CONCATENATION as the converter emits it: one scale for inputs and output. An input whose
    rounding point feeds only the Concatenate already has that scale (its producer requantizes to it,
    :func:`_scale_owner`); any other input goes through an int8 -> int8 QUANTIZE (``reference/requantize.h``:
    ``MultiplyByQuantizedMultiplier(q - zp_in, M, shift) + zp_out`` with ``M = s_in / s_out``, clamped; under
    ``"xnnpack"`` XNNPACK's, :func:`_xnnpack_requantize_int8`)."""

    qs = layer._gq_integer()
    if _training_now() or exporting_int8() or any(q.calibrating for q in qs):
        return orig(inputs, *args, **kwargs)
    ups, out_q = qs[:-1], qs[-1]
    so, _, zo = qparams(out_q)
    parts = []
    for x, u in zip(inputs, ups):
        if _scale_owner(u) is out_q:
            parts.append(x)
            continue
        si, _, zi = qparams(u)
        v = _q_minus_zp(x, u)
        requantize = _xnnpack_requantize_int8 if kernels_of(layer) == "xnnpack" else _requantize_int8
        part = tf.cast(requantize(v, si, so, zo) * so, tf.float32)
        if not tf.executing_eagerly():
            part.set_shape(x.shape)
        parts.append(part)
    return orig(parts, *args, **kwargs)



# --------------------------------------------------------------------------- LOGISTIC, swish, MUL
#: Keras activation names (``Activation(...)``) the converter emits as LOGISTIC / LOGISTIC then MUL.
LOGISTIC_ACTIVATIONS = ("sigmoid",)
SWISH_ACTIVATIONS = ("silu", "swish")


def _requantize_int8(v: tf.Tensor, si: tf.Tensor, so: tf.Tensor, zo: tf.Tensor) -> tf.Tensor:
    """The int8 -> int8 QUANTIZE (``reference/requantize.h``) of ``v = q - zp_in`` (int64) at scale ``si`` to
    ``(so, zo)``: ``MultiplyByQuantizedMultiplier(v, M, shift) + zo`` with ``M = si / so``, clamped; returns
    ``q_out - zo`` as float64."""
    m, shift = quantize_multiplier_tf(si / so)
    o = multiply_by_quantized_multiplier_tf(v, m, shift) + tf.cast(zo, tf.int64)
    return tf.clip_by_value(tf.cast(o, tf.float64), -128.0, 127.0) - zo


def logistic_int8_tf(v: tf.Tensor, s_in: tf.Tensor) -> tf.Tensor:
    """LiteRT's int8 LOGISTIC (reference and optimized kernels alike: the lookup table ``SigmoidPrepare`` fills
    with ``LUTPopulateInt8``): for ``v = q - zp_in`` (int64), ``clamp(TfLiteRound(1.0f / (1.0f + expf(-s_in *
    v)) * 256.0f) - 128, -128, 127)``, every step in float32 (``s_in`` the stored float32 scale). Returns the
    output ``q + 128`` (output scale 1/256, zero point -128) as int64."""
    d = tf.cast(s_in, tf.float32) * tf.cast(v, tf.float32)
    t = tf.constant(1.0, tf.float32) / (tf.constant(1.0, tf.float32) + tf.exp(-d))
    r = _round_away(tf.cast(t * tf.constant(256.0, tf.float32), tf.float64))
    return tf.cast(tf.clip_by_value(r - 128.0, -128.0, 127.0) + 128.0, tf.int64)


def _mul_int8(v1: tf.Tensor, v2: tf.Tensor, s1: tf.Tensor, s2: tf.Tensor, so: tf.Tensor, zo: tf.Tensor) -> tf.Tensor:
    """TFLite's reference int8 MUL (``integer_ops/mul.h`` ``MulElementwise``, broadcasting as
    ``BroadcastMul6DSlow``): ``MultiplyByQuantizedMultiplier((q1 - zp1) * (q2 - zp2), M, shift) + zo`` with
    ``M = s1 * s2 / so`` computed in *float32* (``mul.cc``'s ``double real_multiplier = input1->params.scale *
    input2->params.scale / output->params.scale``: float operands, so float arithmetic, then widened; in double
    the multiplier was 1 LSB off on one element of an EfficientNetB0 MUL, measured), clamped; ``v1, v2`` int64
    ``q - zp``. Returns ``(q_out - zo) * so`` as float32."""
    f32 = tf.float32
    m, shift = quantize_multiplier_tf(tf.cast((tf.cast(s1, f32) * tf.cast(s2, f32)) / tf.cast(so, f32), tf.float64))
    o = multiply_by_quantized_multiplier_tf(v1 * v2, m, shift) + tf.cast(zo, tf.int64)
    o = tf.clip_by_value(tf.cast(o, tf.float64), -128.0, 127.0)
    return tf.cast((o - zo) * so, tf.float32)


def _xnnpack_logistic(v: tf.Tensor, s_in: tf.Tensor) -> tf.Tensor:
    """XNNPACK's qs8 sigmoid (``unary-elementwise-nc.c``: no qs8 sigmoid microkernel, so a 256-entry lookup table
    filled by the reference unary kernel, ``src/reference/unary-elementwise.cc``): ``x = (float(q) - zp_in) *
    s_in`` in float32; ``e = exp(double(x))``, ``sigmoid = float(e / (1 + e))`` (1 above ``x = 100``, 0 below
    -100); ``nearbyint(sigmoid * (1.0f / s_out) + zp_out)`` (ties to even), clamped, with LOGISTIC's output
    ``s_out = 1/256``, ``zp_out = -128``. ``v = q - zp_in`` (int64). Returns the output ``q + 128`` as int64.
    Measured equal to the delegate's LOGISTIC on all 256 inputs at ten input scales where the reference
    kernels' table (float32 ``expf``, ties away from zero) differs from it by one LSB on one or two entries."""
    f32 = tf.float32
    x = tf.cast(v, f32) * tf.cast(s_in, f32)  # (float(q) - float(zp)) is the exact integer v
    e = tf.exp(tf.cast(x, tf.float64))
    sig = tf.cast(e / (1.0 + e), f32)
    sig = tf.where(x > 100.0, tf.ones_like(sig), tf.where(x < -100.0, tf.zeros_like(sig), sig))
    out = tf.round(sig * tf.constant(256.0, f32) + tf.constant(-128.0, f32))  # float32 ops; tf.round: half to even
    return tf.cast(tf.clip_by_value(out, -128.0, 127.0), tf.int64) + 128


def _xnnpack_requantize_int8(v: tf.Tensor, si: tf.Tensor, so: tf.Tensor, zo: tf.Tensor) -> tf.Tensor:
    """XNNPACK's qs8 -> qs8 convert (the delegate's int8 -> int8 QUANTIZE; ``xnn_init_qs8_cvt_scalar_params``,
    ``qs8-vcvt`` microkernels): an 8-bit fixed-point multiplier ``m = lrintf(256.0f * (s_in / s_out))`` (float32),
    ``out = ((q - zp_in) * m + 128) >> 8`` (arithmetic shift: ties toward +inf) ``+ zp_out``, clamped (the AVX2
    kernel's ``mulhrs`` of ``(zp_in - q) << 7`` by ``-m`` is the same integer). ``v = q - zp_in`` (int64); returns
    ``q_out - zp_out`` as float64. Measured equal to the delegate on a LOGISTIC -> QUANTIZE at eight output
    ranges (the reference kernels' ``MultiplyByQuantizedMultiplier`` was off on up to a third of the elements).
    A ratio ``s_in / s_out`` outside ``[2**-8, 2**7)`` (float32) is left to LiteRT's own QUANTIZE kernel by the
    delegate (measured below 2**-8: the reference arithmetic, :func:`_requantize_int8`, is exact there; the
    upper bound is XNNPACK's, not measured)."""
    f32 = tf.float32
    ratio = tf.cast(si, f32) / tf.cast(so, f32)
    m = tf.cast(tf.round(tf.constant(256.0, f32) * ratio), tf.int64)  # exact scaling; lrintf: half to even
    o = tf.bitwise.right_shift(v * m + 128, tf.constant(8, tf.int64)) + tf.cast(zo, tf.int64)
    xnn = tf.clip_by_value(tf.cast(o, tf.float64), -128.0, 127.0) - zo
    taken = tf.logical_and(ratio >= 2.0**-8, ratio < 2.0**7)
    return tf.where(taken, xnn, _requantize_int8(v, si, so, zo))


def _xnnpack_mul(v1: tf.Tensor, v2: tf.Tensor, s1: tf.Tensor, s2: tf.Tensor, so: tf.Tensor, zo: tf.Tensor
                 ) -> tf.Tensor:
    """XNNPACK's qs8 MUL (``xnn_init_qs8_mul_minmax_scalar_params``, the ``qs8-vmul``/``qs8-vmulc``
    ``minmax_fp32`` microkernels, x86): ``scale = (s1 * s2) / s_out`` in float32, ``acc = (q1 - zp1) * (q2 -
    zp2)`` (int32), ``out = rint(float(acc) * scale) + zp_out`` (ties to even: magic bias / ``cvtps``), clamped;
    broadcasting. ``v1, v2`` int64 ``q - zp``. Returns ``(q_out - zo) * so`` as float32. Measured equal to the
    delegate's MUL on every element of a swish and a squeeze-and-excitation Multiply (the reference arithmetic
    was 1 LSB off on 1.4 % and 0.3 % of them)."""
    f32 = tf.float32
    scale = (tf.cast(s1, f32) * tf.cast(s2, f32)) / tf.cast(so, f32)
    acc = tf.cast(v1 * v2, f32)  # |acc| <= 255 * 255: exact
    o = tf.round(acc * scale) + tf.cast(zo, f32)
    o = tf.clip_by_value(tf.cast(o, tf.float64), -128.0, 127.0)
    return tf.cast((o - zo) * so, tf.float32)


def _q_minus_zp(x: Any, point: Any) -> tf.Tensor:
    """``q - zp`` (int64) of a tensor on the rounding point ``point``'s grid (:func:`_ints`)."""
    return tf.cast(_ints(x, point, qparams(point)[1]), tf.int64)


def _int_activation(layer: Any, orig: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
    """``Activation("sigmoid")``: LOGISTIC (:func:`logistic_int8_tf`) then the converter's int8 -> int8 QUANTIZE
    to the point's range (none when that range is LOGISTIC's own ``[0, 255/256]``). ``Activation("swish")``:
    the converter's LOGISTIC then MUL of the input by it (:func:`_mul_int8`). Under ``"xnnpack"``:
    :func:`_xnnpack_logistic`, :func:`_xnnpack_requantize_int8`, :func:`_xnnpack_mul`. While training, the sigmoid is
    rounded to LOGISTIC's output grid (multiples of 1/256) with a straight-through gradient."""

    qs = layer._gq_integer()
    if exporting_int8() or any(q.calibrating for q in qs):
        return orig(inputs, *args, **kwargs)
    if _training_now():  # QAT: LOGISTIC's output grid (1/256) with a straight-through gradient
        x = tf.convert_to_tensor(inputs)
        sig = tf.sigmoid(x)
        sig_q = tf.clip_by_value(_round_away(sig * 256.0), 0.0, 255.0) / 256.0
        sig = sig + tf.stop_gradient(sig_q - sig)
        return x * sig if getattr(layer.activation, "__name__", "") in SWISH_ACTIVATIONS else sig
    (si, _, _), (so, _, zo) = (qparams(q) for q in qs)
    xnn = kernels_of(layer) == "xnnpack"
    v = _q_minus_zp(inputs, qs[0])
    sig = (_xnnpack_logistic if xnn else logistic_int8_tf)(v, si)  # q + 128 at scale 1/256
    s_sig = tf.constant(1.0 / 256.0, tf.float64)
    if getattr(layer.activation, "__name__", "") in SWISH_ACTIVATIONS:
        out = (_xnnpack_mul if xnn else _mul_int8)(v, sig, si, s_sig, so, zo)
    else:
        same = tf.logical_and(tf.equal(tf.cast(so, tf.float32), 1.0 / 256.0), tf.equal(zo, -128.0))
        requantize = _xnnpack_requantize_int8 if xnn else _requantize_int8
        o = tf.where(same, tf.cast(sig, tf.float64) - 128.0 - zo, requantize(sig, s_sig, so, zo))
        out = tf.cast(o * so, tf.float32)
    if not tf.executing_eagerly():
        out.set_shape(inputs.shape)
    return out


def _int_mul(layer: Any, orig: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
    """A two-input ``Multiply`` as TFLite's reference int8 MUL (:func:`_mul_int8`), or XNNPACK's
    (:func:`_xnnpack_mul`) under ``"xnnpack"``; broadcasting."""

    qs = layer._gq_integer()
    if _training_now() or exporting_int8() or any(q.calibrating for q in qs):
        return orig(inputs, *args, **kwargs)
    (s1, _, _), (s2, _, _), (so, _, zo) = (qparams(q) for q in qs)
    mul = _xnnpack_mul if kernels_of(layer) == "xnnpack" else _mul_int8
    out = mul(_q_minus_zp(inputs[0], qs[0]), _q_minus_zp(inputs[1], qs[1]), s1, s2, so, zo)
    if not tf.executing_eagerly():
        out.set_shape(layer.compute_output_shape([tuple(t.shape) for t in inputs]))
    return out




def op_kernel(layer: Any, ins: Any) -> Optional[Callable[..., Any]]:
    """The integer ``call`` replacement (``impl(layer, orig_call, inputs, *args, **kwargs)``) of an op layer
    without weights called on the input tensors ``ins``: a two-input Add, a GlobalAveragePooling2D or
    AveragePooling2D of known sizes, an Activation (sigmoid, swish) or a two-input Multiply; ``None`` for any
    other layer (a Concatenate takes :func:`int_concat`, the model input's rounding point
    :func:`int_quantize`)."""
    name = type(layer).__name__
    if name == "Add" and len(ins) == 2:
        return _int_add
    if name == "GlobalAveragePooling2D" and len(ins) == 1 and ins[0].shape[1] and ins[0].shape[2]:
        return _int_mean
    if name == "AveragePooling2D" and len(ins) == 1 and ins[0].shape[-1]:
        return _int_avg_pool
    if name == "Activation" and len(ins) == 1:
        act = getattr(layer.activation, "__name__", "")
        return _int_activation if act in LOGISTIC_ACTIVATIONS + SWISH_ACTIVATIONS else None
    if name == "Multiply" and len(ins) == 2:
        return _int_mul
    return None
