"""Rounding kernels: TensorFlow ops that put tensors onto a format's grid.

These are the only places in graphquant that do rounding arithmetic; every
other module calls :func:`graphquant.quantize`. The kernels have no gradients
of their own (``ops.quantize`` supplies straight-through gradients).

Each kernel is written once in plain TensorFlow ops and, by default, run as a
``tf.function(jit_compile=True)`` so XLA fuses the elementwise chain (and the
random bits of stochastic rounding) into one pass over memory: that is what
makes it as fast as TensorFlow's own FakeQuant C++ kernel. Set the environment
variable ``GRAPHQUANT_XLA=0`` or call :func:`set_xla` to run the plain ops
instead (same results, slower; for runtimes without XLA).

Random bits for stochastic rounding come from a counter-based hash (murmur3's
32-bit finaliser) of the element index and a per-call 64-bit key, so they cost
a few integer ops per element, need no state inside the kernel and work the
same eagerly, in ``tf.function`` and under XLA.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, Iterator, Optional, Tuple

import numpy as np
import tensorflow as tf

from .formats import E8M0_MAX_EXPONENT, E8M0_MIN_EXPONENT, ROUNDING_MODES, Affine, FixedPoint, FloatFormat, Scaled, check_rounding

__all__ = ["ROUNDING_MODES", "set_xla", "use_xla", "xla_enabled", "random_bits"]

_XLA = os.environ.get("GRAPHQUANT_XLA", "1").strip().lower() not in ("0", "false", "no", "off")


def set_xla(enabled: bool) -> None:
    """Run the rounding kernels through XLA (default) or as plain TF ops."""
    global _XLA
    _XLA = bool(enabled)


def xla_enabled() -> bool:
    """Whether kernels traced from now on run through XLA."""
    return _XLA


@contextlib.contextmanager
def use_xla(enabled: bool) -> Iterator[None]:
    """Within the block, trace rounding with (``True``) or without XLA.

    The choice is made when a function is traced, so wrap the tracing: for
    example ``with graphquant.use_xla(False): model.export("served")`` writes a
    SavedModel of plain TensorFlow ops (TensorFlow's FakeQuant for affine
    formats), for runtimes without the XLA JIT such as TensorFlow Serving's
    default build. Results are the same; XLA is faster.
    """
    global _XLA
    before = _XLA
    _XLA = bool(enabled)
    try:
        yield
    finally:
        _XLA = before


# ----------------------------------------------------------------------------
# random bits
# ----------------------------------------------------------------------------
_U32 = tf.uint32


def _u32(v: int) -> tf.Tensor:
    return tf.constant(v & 0xFFFFFFFF, dtype=_U32)


def random_bits(shape_like: tf.Tensor, key: tf.Tensor) -> tf.Tensor:
    """32 random bits per element of ``shape_like``, a pure function of the
    element's flat index and ``key`` (int32/uint32 tensor of shape [2])."""
    n = tf.size(shape_like, out_type=tf.int32)
    idx = tf.cast(tf.reshape(tf.range(n), tf.shape(shape_like)), _U32)
    if key.dtype != _U32:
        key = tf.bitcast(tf.cast(key, tf.int32), _U32)
    h = idx * _u32(0x9E3779B9) + key[0]
    h = tf.bitwise.bitwise_xor(h, key[1])
    h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, _u32(16)))
    h = h * _u32(0x85EBCA6B)
    h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, _u32(13)))
    h = h * _u32(0xC2B2AE35)
    h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, _u32(16)))
    return h


def _uniform(shape_like: tf.Tensor, key: tf.Tensor, dtype) -> tf.Tensor:
    """Uniform in [0, 1) with 24 random bits (exact in float32)."""
    h = random_bits(shape_like, key)
    return tf.cast(tf.bitwise.right_shift(h, _u32(8)), dtype) * tf.constant(2.0**-24, dtype)


def no_contract(p: tf.Tensor) -> tf.Tensor:
    """Identity that stops XLA from fusing the product ``p`` into a following add
    (FMA contraction): the fixed-point grid ``lo + k*step`` rounds twice, as plain
    TF ops do, so XLA and non-XLA results are identical and on the same grid.
    (A bitcast round trip is folded away by XLA; nextafter(p, p) is not.)"""
    return tf.math.nextafter(p, p)


# ----------------------------------------------------------------------------
# rounding a real-valued "integer coordinate" k onto the integers
# ----------------------------------------------------------------------------
def _round_coord(k: tf.Tensor, mode: str, positive: tf.Tensor, key: Optional[tf.Tensor],
                 half_up: bool = False) -> tf.Tensor:
    """Round ``k`` to an integer-valued float according to ``mode``.

    ``positive`` says, per element, whether the *value* being rounded is >= 0
    (k increases with the value), which decides toward-zero and ties-away.
    ``half_up`` uses ``floor(k + 0.5)`` for nearest (TensorFlow FakeQuant).
    """
    if mode == "nearest":
        return tf.floor(k + 0.5) if half_up else tf.round(k)
    if mode == "nearest_away":
        # not floor(k + 0.5): k + 0.5 rounds up to an integer for k = 0.5 - ulp/2.
        # Work on |k| so that |k| - floor(|k|) is exact; ties go away from zero in value
        # (larger k when the value is positive).
        ak = tf.abs(k)
        fa = tf.floor(ak)
        frac = ak - fa
        half = tf.constant(0.5, k.dtype)
        tie_up = tf.equal(positive, k >= 0)  # a tie moves |k| up
        r = tf.where(tf.logical_or(frac > half, tf.logical_and(tf.equal(frac, half), tie_up)), fa + 1, fa)
        return tf.where(k < 0, -r, tf.where(tf.equal(k, 0), k, r))  # keeps -0.0
    if mode == "down":
        return tf.floor(k)
    if mode == "up":
        return tf.math.ceil(k)
    if mode == "toward_zero":
        return tf.where(positive, tf.floor(k), tf.math.ceil(k))
    if mode == "stochastic":
        fl = tf.floor(k)
        u = _uniform(k, key, k.dtype)
        return tf.where(u < (k - fl), tf.math.ceil(k), fl)  # ceil, not fl + 1: keeps -0.0
    check_rounding(mode)
    raise AssertionError(f"rounding mode {mode!r} has no coordinate rounding")  # pragma: no cover


# ----------------------------------------------------------------------------
# fixed point
# ----------------------------------------------------------------------------
def _is_pow2(v: float) -> bool:
    m, _ = np.frexp(v)
    return m == 0.5


def _fixed_kernel(fmt: FixedPoint, mode: str) -> Callable:
    lo, _ = fmt.range
    step = fmt.step
    top = float(fmt.levels - 1)
    pow2 = _is_pow2(step)

    def kernel(x, key):
        dt = x.dtype
        lo_t = tf.constant(lo, dt)
        step_t = tf.constant(step, dt)
        shifted = x - lo_t
        k = shifted * tf.constant(1.0 / step, dt) if pow2 else shifted / step_t
        # With a power-of-two step every product k*step is exact, so a fused
        # multiply-add gives the same result and no barrier is needed (it costs ~10%).
        barrier = (lambda t: t) if pow2 else no_contract
        k = _round_coord(barrier(k), mode, x >= 0, key)
        # abs: no -0.0 for k (XLA folds lo + k*step to k*step when lo == 0)
        k = tf.abs(tf.clip_by_value(k, tf.constant(0.0, dt), tf.constant(top, dt)))
        q = lo_t + barrier(k * step_t)
        if mode in ("down", "up", "toward_zero"):
            # (x - lo) / step is rounded, so k can be one step off: move it back to
            # the right side of x on the grid as computed (q <= x for down, ...)
            # (and to the nearest such grid value).
            one = tf.constant(1.0, dt)
            q_next = lo_t + barrier((k + one) * step_t)
            q_prev = lo_t + barrier((k - one) * step_t)
            fix_down = tf.where(q > x, -one, tf.where(q_next <= x, one, tf.zeros_like(k)))
            fix_up = tf.where(q < x, one, tf.where(q_prev >= x, -one, tf.zeros_like(k)))
            fix = {"down": fix_down, "up": fix_up}.get(mode)
            if fix is None:
                fix = tf.where(x >= 0, fix_down, fix_up)
            k = tf.abs(tf.clip_by_value(k + fix, tf.constant(0.0, dt), tf.constant(top, dt)))
            q = lo_t + barrier(k * step_t)
        # NaN needs no select: min/max propagate NaN (TF's kernels and XLA alike),
        # so a NaN input gives a NaN k and a NaN q (tested)
        return q

    return kernel


# ----------------------------------------------------------------------------
# affine (TensorFlow FakeQuant arithmetic, other rounding modes)
# ----------------------------------------------------------------------------
def nudge(lo: tf.Tensor, hi: tf.Tensor, quant_min: int, quant_max: int):
    """TensorFlow FakeQuant's range nudging, in float32 like its kernel.

    Returns ``(nudged_min, nudged_max, scale, inv_scale)``.
    """
    lo = tf.cast(lo, tf.float32)
    hi = tf.cast(hi, tf.float32)
    qmin = tf.constant(float(quant_min), tf.float32)
    qmax = tf.constant(float(quant_max), tf.float32)
    return _nudge(lo, hi, qmin, qmax)


def _std_round(z: tf.Tensor) -> tf.Tensor:
    """C++ ``std::round`` (half away from zero) for ``z >= 0``; not ``floor(z + 0.5)``,
    which rounds 0.5 - 2**-25 up because ``z + 0.5`` rounds to 1."""
    r = tf.floor(z)
    return r + tf.where(z - r >= 0.5, tf.ones_like(r), tf.zeros_like(r))


def _nudge(lo, hi, qmin, qmax):
    """TF's ``Nudge`` in float32 (``fake_quant_ops_functor.h``).

    Pass ``qmin``/``qmax`` as runtime tensors where bit-exactness matters:
    TensorFlow's graph optimizer rewrites a division by a constant into a
    multiplication by its reciprocal, which moves ``scale`` by an ulp.
    """
    # nextafter(t, t) is an identity XLA cannot see through: without it XLA's
    # simplifier rewrites lo / ((hi - lo) / n) as lo * n / (hi - lo), which
    # moves a zero point sitting on .5 to the other integer
    scale = no_contract((hi - lo) / (qmax - qmin))
    inv_scale = no_contract((qmax - qmin) / (hi - lo))
    zp_from_min = no_contract(qmin - lo / scale)
    zp = tf.where(zp_from_min < qmin, qmin, tf.where(zp_from_min > qmax, qmax, _std_round(zp_from_min)))
    nudged_min = (qmin - zp) * scale
    nudged_max = (qmax - zp) * scale
    return nudged_min, nudged_max, scale, inv_scale


def _affine_kernel(fmt: Affine, mode: str) -> Callable:
    """Integer levels ``k`` (as floats, NaN where x is NaN) of x on FakeQuant's nudged grid.

    Computed in float64, where ``(x - nudged_min) / scale`` is accurate to far
    below a level, so the rounding mode decides, not float32 error. The caller
    turns levels into values (:func:`graphquant.ops` lets TensorFlow's own
    FakeQuant kernel do it, so the values are exactly TensorFlow's grid).
    """
    qrange = float(fmt.quant_max - fmt.quant_min)

    def kernel(x, key, nmin, nmax, scale):
        dt = tf.float64
        x64 = tf.cast(x, dt)
        nmin, nmax, scale = (tf.cast(t, dt) for t in (nmin, nmax, scale))
        clamped = tf.maximum(tf.minimum(x64, nmax), nmin)
        k = (clamped - nmin) / scale
        if mode in ("down", "up", "toward_zero"):
            # Grid values are float32 roundings of nmin + k*scale, up to 2**-8 of a
            # level away from exact: treat x that close to a level as on it. The
            # caller then moves the result by one level if TensorFlow's float32
            # value of it lies on the wrong side of x.
            kr = tf.round(k)
            k = tf.where(tf.abs(k - kr) < 2.0**-6, kr, k)
        k = _round_coord(k, mode, x64 >= 0, key, half_up=True)
        k = tf.clip_by_value(k, tf.constant(0.0, dt), tf.constant(qrange, dt))
        return tf.where(tf.math.is_nan(x64), x64, k)

    return kernel


# ----------------------------------------------------------------------------
# floating point
# ----------------------------------------------------------------------------
_FLOAT_LAYOUT = {
    # dtype: (int dtype, mantissa width, exponent bias, min exponent)
    tf.float32: (tf.int32, 23, 127, -126),
    tf.float64: (tf.int64, 52, 1023, -1022),
}


def _float_bits(v: float, dt) -> int:
    np_dt = np.float32 if dt == tf.float32 else np.float64
    int_dt = np.int32 if dt == tf.float32 else np.int64
    return int(np.array(v, np_dt).view(int_dt))


def _pow2(e: int, dt) -> tf.Tensor:
    return tf.constant(np.ldexp(1.0, e), dt)


def _scale_pow2(x: tf.Tensor, e: int) -> tf.Tensor:
    """x * 2**e, exactly, even when 2**e itself is not representable."""
    dt = x.dtype
    lim = 120 if dt == tf.float32 else 1000
    while e > lim:
        x = x * _pow2(lim, dt)
        e -= lim
    while e < -lim:
        x = x * _pow2(-lim, dt)
        e += lim
    return x * _pow2(e, dt)


def _round_bits(a: tf.Tensor, x: tf.Tensor, key: Optional[tf.Tensor], d: int, mode: str, positive: tf.Tensor,
                negative: tf.Tensor) -> tf.Tensor:
    """The normal range: the magnitude bit pattern ``a`` of ``x`` with its ``d`` low bits dropped by rounding
    ``mode`` (a carry into the exponent is right: the next binade)."""
    int_dt = a.dtype
    if d == 0:
        return a
    one = tf.constant(1, int_dt)
    step_b = tf.constant(1 << d, int_dt)
    mask = tf.constant((1 << d) - 1, int_dt)
    r = tf.bitwise.bitwise_and(a, mask)
    t = a - r
    nonzero = tf.cast(r != 0, int_dt) * step_b
    if mode == "nearest":
        half = tf.constant(1 << (d - 1), int_dt)
        lsb = tf.bitwise.bitwise_and(tf.bitwise.right_shift(a, tf.constant(d, int_dt)), one)
        return tf.bitwise.bitwise_and(a + (half - one) + lsb, tf.bitwise.invert(mask))
    if mode == "nearest_away":
        half = tf.constant(1 << (d - 1), int_dt)
        return tf.bitwise.bitwise_and(a + half, tf.bitwise.invert(mask))
    if mode == "toward_zero":
        return t
    if mode == "up":
        return tf.where(positive, t + nonzero, t)
    if mode == "down":
        return tf.where(negative, t + nonzero, t)
    if mode == "stochastic":
        rnd = random_bits(x, key)
        if int_dt == tf.int64:
            # 32 random bits are plenty: compare the top d bits only when d > 32
            rnd = tf.cast(rnd, tf.int64)
            shift = max(d - 32, 0)
            up = tf.bitwise.right_shift(r, tf.constant(shift, int_dt)) > tf.bitwise.bitwise_and(
                rnd, tf.constant((1 << min(d, 32)) - 1, int_dt))
        else:
            rnd = tf.bitwise.bitwise_and(tf.bitcast(rnd, tf.int32), mask)
            up = rnd < r
        return t + tf.cast(up, int_dt) * step_b
    check_rounding(mode)
    raise AssertionError(f"rounding mode {mode!r} has no bit rounding")  # pragma: no cover


def _round_below_normal(x: tf.Tensor, a: tf.Tensor, sign: tf.Tensor, q: tf.Tensor, rb: tf.Tensor,
                        key: Optional[tf.Tensor], fmt: FloatFormat, mode: str, sub_exp: int, positive: tf.Tensor,
                        negative: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
    """``(q, rb)`` with the values below the format's smallest normal rounded on its fixed step
    ``2**sub_exp`` instead (exact power-of-two scaling): the rounded value and its magnitude bits."""
    dt, int_dt = x.dtype, a.dtype
    _, W, _, dt_emin = _FLOAT_LAYOUT[dt]
    k = _scale_pow2(x, -sub_exp)
    # TF and XLA on CPU run with denormals-are-zero, so arithmetic on an
    # input below dt's smallest normal sees 0 (wrong for "up"/"down"/...).
    # Rebuild k from the bits: such an x is a * 2**(dt_emin - W) exactly.
    # If that scale is below dt's normals, |k| < 2**-103 and any value of
    # that sign in (0, 2**-103) rounds the same in every mode.
    den_exp = max(dt_emin - W - sub_exp, dt_emin)
    k_den = tf.cast(a, dt) * _pow2(den_exp, dt)
    k_den = tf.where(negative, -k_den, k_den)
    k = tf.where(a < tf.constant(1 << W, int_dt), k_den, k)
    k = _round_coord(k, mode, positive, key)
    qs = _scale_pow2(k, sub_exp)
    small = a < tf.constant(_float_bits(2.0**fmt.min_exponent, dt), int_dt)
    q = tf.where(small, qs, q)
    rb = tf.where(small, tf.bitwise.bitwise_xor(tf.bitcast(qs, int_dt), sign), rb)
    return q, rb


def _overflow(x: tf.Tensor, a: tf.Tensor, q: tf.Tensor, rb: tf.Tensor, fmt: FloatFormat, mode: str,
              positive: tf.Tensor, negative: tf.Tensor) -> tf.Tensor:
    """``q`` with the rounded values beyond the format's largest (magnitude bits ``rb``) and the non-finite
    inputs (magnitude bits ``a``) made what the format and ``mode`` make of them: the largest value
    (saturating formats; the directed modes that round toward it), infinity, or NaN."""
    dt, int_dt = x.dtype, a.dtype
    inf_b = tf.constant(_float_bits(np.inf, dt), int_dt)
    max_b = tf.constant(_float_bits(fmt.max_value, dt), int_dt)
    max_q = tf.where(negative, tf.constant(-fmt.max_value, dt), tf.constant(fmt.max_value, dt))
    inf_q = tf.where(negative, tf.constant(-np.inf, dt), tf.constant(np.inf, dt))
    nan_q = tf.constant(np.nan, dt)
    is_inf_in = tf.equal(a, inf_b)
    over = tf.logical_and(rb > max_b, tf.logical_not(is_inf_in))
    if mode == "toward_zero":
        to_max = over
    elif mode == "down":
        to_max = tf.logical_and(over, positive)
    elif mode == "up":
        to_max = tf.logical_and(over, negative)
    else:
        to_max = tf.zeros_like(over)
    if fmt.saturate:
        q = tf.where(tf.logical_or(over, tf.logical_and(is_inf_in, not fmt.has_inf)), max_q, q)
    else:
        spill = inf_q if fmt.has_inf else nan_q
        q = tf.where(to_max, max_q, tf.where(over, spill, q))
        if not fmt.has_inf:
            q = tf.where(is_inf_in, nan_q, q)
    return tf.where(tf.math.is_nan(x), x, q)


def _float_kernel(fmt: FloatFormat, mode: str) -> Callable:
    """``f(x, key)`` rounding a float32/float64 ``x`` onto ``fmt``: on the bit pattern in the normal range
    (:func:`_round_bits`), on a fixed step below it (:func:`_round_below_normal`, unless ``x``'s own
    subnormals are the format's), then overflow and non-finite values (:func:`_overflow`)."""
    M = fmt.mantissa_bits
    emin = fmt.min_exponent
    sub_exp = emin - M if fmt.subnormals else emin  # exponent of the grid step below 2**emin

    def kernel(x, key):
        dt = x.dtype
        int_dt, W, _, dt_emin = _FLOAT_LAYOUT[dt]
        sign_mask = tf.constant(-(2 ** (8 * int_dt.size - 1)), int_dt)  # only the sign bit
        bits = tf.bitcast(x, int_dt)
        sign = tf.bitwise.bitwise_and(bits, sign_mask)
        a = tf.bitwise.bitwise_xor(bits, sign)  # magnitude bits
        negative = tf.not_equal(sign, 0)
        positive = tf.logical_not(negative)
        rb = _round_bits(a, x, key, W - M, mode, positive, negative)
        q = tf.bitcast(tf.bitwise.bitwise_or(rb, sign), dt)
        if not (fmt.subnormals and emin == dt_emin):  # else the bit path covers the subnormals
            q, rb = _round_below_normal(x, a, sign, q, rb, key, fmt, mode, sub_exp, positive, negative)
        return _overflow(x, a, q, rb, fmt, mode, positive, negative)

    return kernel


# ----------------------------------------------------------------------------
# TensorFlow's FakeQuant, bit for bit, as XLA-fusable ops (the fast paths of
# the Keras layers: weight rounding and learned-range activation rounding)
# ----------------------------------------------------------------------------
def _fake_quant_values(x, lo, hi, qmin, qmax, per_channel: bool):
    """FakeQuantWithMinMaxVars[PerChannel]'s output, the same float32 operations in
    the same order as TensorFlow's CPU kernel (which is built without FMA): the
    per-tensor kernel divides by the scale, the per-channel one multiplies by the
    inverse scale. ``lo``/``hi`` broadcast against ``x``."""
    nudged = fake_quant_nudged(lo, hi, qmin, qmax)
    y = fake_quant_levels(x, nudged, per_channel) * nudged[2]
    return tf.where(nudged[5], tf.zeros_like(y), y)  # TF's kernel: min == max == 0 gives zeros


def fake_quant_levels(x, nudged: Tuple, per_channel: bool):
    """The integer FakeQuant rounds ``x`` to, minus its zero point (float32): its output is this times the
    nudged scale (where the range is not ``(0, 0)``); ``nudged`` from :func:`fake_quant_nudged`."""
    nmin, nmax, scale, inv, quant_zero, _ = nudged
    shifted = tf.maximum(tf.minimum(x, nmax), nmin) - nmin
    level = no_contract(shifted * inv) if per_channel else shifted / scale
    return tf.floor(level - quant_zero + 0.5)


def fake_quant_nudged(lo, hi, qmin, qmax) -> Tuple:
    """``(nudged_min, nudged_max, scale, inv_scale, quant_zero, min == max == 0)`` of the range ``(lo, hi)``:
    what :func:`_fake_quant_values` computes from the range before it touches ``x``."""
    nmin, nmax, scale, inv = _nudge(lo, hi, qmin, qmax)
    quant_zero = tf.floor(no_contract(-nmin * inv) + 0.5)
    return nmin, nmax, scale, inv, quant_zero, tf.logical_and(tf.equal(lo, 0.0), tf.equal(hi, 0.0))


def _fake_quant_inside(x, lo, hi, qmin, qmax):
    """Where FakeQuant passes the gradient: inside the nudged range, or min == max == 0."""
    nmin, nmax, _, _ = _nudge(lo, hi, qmin, qmax)
    inside = tf.logical_and(x >= nmin, x <= nmax)
    both_zero = tf.logical_and(tf.equal(lo, 0.0), tf.equal(hi, 0.0))
    return tf.logical_or(inside, both_zero)


def _fake_quant_mask(x, lo, hi, qmin, qmax):
    """:func:`_fake_quant_inside` as 1.0 / 0.0."""
    return tf.cast(_fake_quant_inside(x, lo, hi, qmin, qmax), x.dtype)


def _bcast_shape(rank: int, axis: Optional[int]):
    if axis is None:
        return None
    shape = [1] * rank
    shape[axis] = -1
    return shape


#: Activations :func:`fake_quant_fns` can apply before rounding: ``name -> (f(x),
#: the set where TensorFlow's gradient of f passes)``; the same ops and gradient
#: masks as ``tf.nn.relu`` (ReluGrad: ``x > 0``) and ``tf.nn.relu6`` (Relu6Grad:
#: ``0 < x < 6``), which Keras' ``ReLU()``, ``ReLU(6.0)``, ``Activation("relu")``
#: and ``Activation("relu6")`` run.
FUSED_ACTIVATIONS = {
    "relu": (tf.nn.relu, lambda x: x > 0.0),
    "relu6": (tf.nn.relu6, lambda x: tf.logical_and(x > 0.0, x < 6.0)),
}


@functools.lru_cache(maxsize=None)
def fake_quant_fns(axis: Optional[int], rank: int, xla: bool, activation: Optional[str] = None):
    """``(forward(x, lo, hi, q), grad(dy, x, lo, hi, q))``: FakeQuant's values and its
    straight-through gradient for ``x``, with ``q = [quant_min, quant_max]`` as a
    float32 tensor; ``lo``/``hi`` are scalars or vectors along ``axis``.

    With ``activation`` (a key of :data:`FUSED_ACTIVATIONS`), ``forward`` rounds
    ``activation(x)`` and ``grad`` is the activation's gradient times FakeQuant's
    mask: one pass over memory each way instead of two.
    """
    shape = _bcast_shape(rank, axis)
    act, act_passes = FUSED_ACTIVATIONS[activation] if activation is not None else (None, None)

    def prep(lo, hi, q):
        if shape is not None:
            lo, hi = tf.reshape(lo, shape), tf.reshape(hi, shape)
        return lo, hi, q[0], q[1]

    def forward(x, lo, hi, q):
        lo, hi, qmin, qmax = prep(lo, hi, q)
        if act is not None:
            x = act(x)
        return _fake_quant_values(x, lo, hi, qmin, qmax, axis is not None)

    def grad(dy, x, lo, hi, q):
        lo, hi, qmin, qmax = prep(lo, hi, q)
        if act is None:
            return dy * _fake_quant_mask(x, lo, hi, qmin, qmax)
        # as TensorFlow's two gradient ops in a row (signed zeros included)
        return tf.where(act_passes(x), dy * _fake_quant_mask(act(x), lo, hi, qmin, qmax), tf.zeros_like(dy))

    forward.__name__ = "graphquant_fake_quant" + ("_" + activation if activation else "")
    grad.__name__ = forward.__name__ + "_grad"
    if xla:
        wrap = functools.partial(tf.function, jit_compile=True, reduce_retracing=True, autograph=False)
        return wrap(forward), wrap(grad)
    return forward, grad


@functools.lru_cache(maxsize=None)
def symmetric_fake_quant_fn(axis: Optional[int], rank: int, xla: bool):
    """``f(w, q) -> (values, m)``: FakeQuant of ``w`` on ``(-m, m)`` with
    ``m = max(max|w|, 1e-12)`` per channel along ``axis`` (or over the whole
    tensor), in one function (one XLA cluster: two passes over ``w``)."""
    shape = _bcast_shape(rank, axis)
    red = None if axis is None else [i for i in range(rank) if i != axis]

    def fn(w, q):
        m = tf.maximum(tf.reduce_max(tf.abs(w), axis=red), 1e-12)
        mb = m if shape is None else tf.reshape(m, shape)
        return _fake_quant_values(w, -mb, mb, q[0], q[1], axis is not None), m

    fn.__name__ = "graphquant_symmetric_fake_quant"
    if xla:
        return tf.function(fn, jit_compile=True, reduce_retracing=True, autograph=False)
    return fn


@functools.lru_cache(maxsize=None)
def min_max_fn(axis: Optional[int], rank: int, xla: bool, need_min: bool = True):
    """``f(x) -> (min, max)`` over everything but ``axis`` (one pass under XLA);
    with ``need_min=False``, ``(None, max)`` (a max alone is about half the work)."""
    red = None if axis is None else [i for i in range(rank) if i != axis]

    def fn(x):
        return (tf.reduce_min(x, axis=red) if need_min else None), tf.reduce_max(x, axis=red)

    fn.__name__ = "graphquant_min_max" if need_min else "graphquant_max"
    if xla:
        return tf.function(fn, jit_compile=True, reduce_retracing=True, autograph=False)
    return fn


# ----------------------------------------------------------------------------
# scaled formats (per tensor / channel / block shared scales: MX, NVFP4)
# ----------------------------------------------------------------------------
_F32_MAG = 0x7FFFFFFF
_F32_INF_BITS = 0x7F800000
_F32_MIN_NORMAL = 2.0**-126


def scaled_constants(fmt: Scaled) -> tf.Tensor:
    """``[element max, element max * scale format max]`` (float32) for :func:`_scaled_kernel`."""
    sf = fmt.scale_format
    top = fmt.element_max * (sf.max_value if isinstance(sf, FloatFormat) else 1.0)
    return tf.constant([fmt.element_max, top], tf.float32)


def _pow2_split(e: tf.Tensor) -> tuple:
    """``(2**e1, 2**e2)`` as float32 with ``e1 + e2 = e``, ``e1 = floor(e / 2)``, for an
    int32 ``e`` in [-252, 254]: both factors are normal floats, so multiplying by one
    and then the other is exact wherever the result is normal (E8M0's ``2**-127`` is
    not a normal float32 and TensorFlow on CPU flushes subnormals)."""
    e1 = tf.math.floordiv(e, 2)
    e2 = e - e1
    f = lambda k: tf.bitcast(tf.bitwise.left_shift(k + 127, 23), tf.float32)
    return f(e1), f(e2)


def _element_kernel(element, mode: str) -> Callable:
    return _fixed_kernel(element, mode) if isinstance(element, FixedPoint) else _float_kernel(element, mode)


def _scaled_kernel(fmt: Scaled, mode: str) -> Callable:
    """``f(t, key)`` for a float32 ``t`` of rank 3 laid out by ``ops``: per tensor
    ``[1, 1, n]``, per channel ``[rows, channels, 1]``, per block ``[rows, blocks, k]``
    (a short last block padded with zeros, which change no block maximum). The
    scale is shared over axes (0, 1, 2), (0, 2) and (2,) respectively.

    ``c`` is :func:`scaled_constants` as a tensor argument: a division by a
    constant is rewritten into a multiplication by its reciprocal (by XLA and by
    TensorFlow's graph optimizer), which moves the scale by an ulp."""
    red = {"tensor": [0, 1, 2], "channel": [0, 2]}.get(fmt.granularity, [2])
    elem = _element_kernel(fmt.element, mode)
    sf = fmt.scale_format
    scale_round = _float_kernel(sf, "nearest") if isinstance(sf, FloatFormat) else None

    def kernel(t, key, c):
        mag = tf.bitwise.bitwise_and(tf.bitcast(t, tf.int32), tf.constant(_F32_MAG, tf.int32))
        # the largest magnitude as bits: integer order is float order for |x|, and
        # inf (0x7F800000) and NaN (above) are the largest, whatever max does with NaN
        amax_b = tf.reduce_max(mag, axis=red, keepdims=True)
        bad = amax_b >= tf.constant(_F32_INF_BITS, tf.int32)  # the group holds an inf or a NaN
        if sf == "e8m0":
            ebits = tf.bitwise.right_shift(amax_b, 23)  # biased exponent; 0: zero or subnormal
            e = tf.where(tf.equal(ebits, 0), tf.constant(E8M0_MIN_EXPONENT, tf.int32),
                         ebits - (127 + fmt.emax_elem))
            e = tf.clip_by_value(e, E8M0_MIN_EXPONENT, E8M0_MAX_EXPONENT)
            d1, d2 = _pow2_split(-e)
            m1, m2 = _pow2_split(e)
            q = elem(t * d1 * d2, key)
            y = q * m1 * m2
        else:
            amax = tf.bitcast(tf.where(bad, tf.zeros_like(amax_b), amax_b), tf.float32)
            raw = amax / c[0]
            if fmt.tensor_scale:
                # the largest finite magnitude: the largest group maximum, from the small amax_b tensor; only
                # when some group holds an inf or a NaN, a second pass over t for the finite values there
                good_max = tf.reduce_max(tf.where(bad, tf.zeros_like(amax_b), amax_b))

                def finite_max():  # from t itself: a captured mag would be materialized for the branch
                    m = tf.bitwise.bitwise_and(tf.bitcast(t, tf.int32), tf.constant(_F32_MAG, tf.int32))
                    return tf.reduce_max(tf.where(m >= tf.constant(_F32_INF_BITS, tf.int32), tf.zeros_like(m), m))

                amax_t = tf.bitcast(tf.cond(tf.reduce_any(bad), finite_max, lambda: good_max), tf.float32)
                ts = tf.maximum(amax_t / c[1],
                                tf.constant(_F32_MIN_NORMAL, tf.float32))
                raw = raw / ts
            if scale_round is None:
                s = tf.maximum(raw, tf.constant(_F32_MIN_NORMAL, tf.float32))
            else:
                s = tf.clip_by_value(raw, tf.constant(sf.min_normal, tf.float32), tf.constant(sf.max_value, tf.float32))
                s = scale_round(s, None)
            if fmt.tensor_scale:
                s = s * ts
            q = elem(t / s, key)
            y = q * s
        return tf.where(tf.broadcast_to(bad, tf.shape(t)), tf.constant(np.nan, tf.float32), y)

    return kernel


# ----------------------------------------------------------------------------
# kernel cache: one traced (and XLA-compiled) function per format, mode, path
# ----------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def kernel_for(fmt, mode: str, xla: bool) -> Callable:
    """The rounding kernel for ``fmt`` and ``mode``: ``f(x, key, *range_params)``."""
    check_rounding(mode)
    if isinstance(fmt, FixedPoint):
        fn = _fixed_kernel(fmt, mode)
    elif isinstance(fmt, Affine):
        fn = _affine_kernel(fmt, mode)
    elif isinstance(fmt, FloatFormat):
        fn = _float_kernel(fmt, mode)
    elif isinstance(fmt, Scaled):
        fn = _scaled_kernel(fmt, mode)
    else:  # pragma: no cover - guarded by ops.quantize
        raise TypeError(f"format must be a FixedPoint, Affine, FloatFormat or Scaled, got {type(fmt).__name__}")
    name = f"graphquant_round_{type(fmt).__name__.lower()}_{mode}"
    fn.__name__ = name
    if xla:
        return tf.function(fn, jit_compile=True, reduce_retracing=True, autograph=False)
    return fn
