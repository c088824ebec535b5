"""The ``quantize`` op: round a tensor onto a number format's grid.

Everything in graphquant that rounds calls :func:`quantize`. It handles the
dtype, picks the kernel (TensorFlow's FakeQuant kernel for affine nearest
rounding, graphquant's XLA-fused kernels otherwise), supplies the
straight-through gradient and, optionally, rounds the gradient too.
"""

from __future__ import annotations

import math
import numbers
import threading
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf

from . import rounding as _r
from .formats import ROUNDING_MODES, Affine, FixedPoint, FloatFormat, Format, Scaled, as_format, check_rounding, parse_format
from .types import FormatLike

__all__ = ["quantize", "ROUNDING_MODES", "set_seed", "representable_range", "fake_quant", "symmetric_fake_quant"]

SeedLike = Union[None, int, tf.random.Generator, tf.Tensor, np.ndarray, Sequence[int]]

_lock = threading.Lock()
_generators: dict = {}


def _generator(seed: Optional[int]) -> tf.random.Generator:
    with _lock:
        gen = _generators.get(seed)
        if gen is None:
            with tf.init_scope():
                if seed is None:
                    gen = tf.random.Generator.from_non_deterministic_state()
                else:
                    gen = tf.random.Generator.from_seed(seed)
            _generators[seed] = gen
        return gen


def set_seed(seed: Optional[int]) -> None:
    """Reset the generator used by ``quantize(..., seed=None)``.

    After ``set_seed(n)`` the sequence of random draws of stochastic rounding
    with ``seed=None`` is reproducible; ``set_seed(None)`` makes it
    non-deterministic again. Calls with an explicit ``seed=`` are unaffected.
    """
    with _lock:
        with tf.init_scope():
            if seed is None:
                _generators[None] = tf.random.Generator.from_non_deterministic_state()
            else:
                _generators[None] = tf.random.Generator.from_seed(int(seed))


_STATELESS_SALT = tf.constant([0x2545F491, 0x1B873593], tf.int32)


def _key(seed: SeedLike, salt: bool = False) -> tf.Tensor:
    """A fresh int32 key of shape [2] for the kernels' random bits."""
    if isinstance(seed, tf.random.Generator):
        return seed.uniform_full_int([2], dtype=tf.int32)
    if seed is None or isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return _generator(None if seed is None else int(seed)).uniform_full_int([2], dtype=tf.int32)
    if isinstance(seed, bool):
        raise TypeError("seed must be None, an int, a tf.random.Generator or an int tensor of shape [2], got a bool")
    t = tf.convert_to_tensor(seed)
    if not t.dtype.is_integer:
        raise TypeError(f"seed must be an integer tensor of shape [2], got dtype {t.dtype.name}")
    if t.shape.rank is not None and t.shape.as_list() != [2]:
        raise ValueError(f"a tensor seed must have shape [2], got {t.shape}")
    if t.dtype == tf.uint32:
        t = tf.bitcast(t, tf.int32)
    elif t.dtype != tf.int32:
        t = tf.cast(t, tf.int32)
    if salt:
        t = tf.bitwise.bitwise_xor(t, _STATELESS_SALT)
    return t


def _zero_key() -> tf.Tensor:
    return tf.zeros([2], tf.int32)


def representable_range(fmt: Format) -> Optional[Tuple[float, float]]:
    """The closed interval in which the gradient passes straight through.

    ``None`` for an :class:`Affine` format without a range and for a
    :class:`Scaled` format (its scale follows the tensor: the gradient passes
    everywhere).
    """
    if isinstance(fmt, Scaled):
        return None
    if isinstance(fmt, FixedPoint):
        return (fmt.min_value, fmt.max_value)
    if isinstance(fmt, FloatFormat):
        return (-fmt.max_value, fmt.max_value)
    if fmt.range is None:
        return None
    nmin, nmax, _, _ = _r.nudge(tf.constant(fmt.range[0]), tf.constant(fmt.range[1]), fmt.quant_min, fmt.quant_max)
    return (float(nmin), float(nmax))


def _resolve_format(format, bits, range) -> Tuple[Format, Optional[tuple]]:
    """Return the format and, for Affine, the range to use (tensors allowed)."""
    if format is None:
        if bits is not None and range is not None and not _has_tensor(range):
            return as_format(bits=bits, range=range), None
        fmt = as_format(bits=bits)  # raises when neither is given
        if isinstance(fmt, Affine) and range is not None:
            return fmt, _affine_pair(fmt, range)
        return fmt, None
    fmt = as_format(format, bits=bits)
    if range is None:
        return fmt, None
    if isinstance(fmt, (FloatFormat, Scaled)):
        raise ValueError(f"range= does not apply to the format {str(fmt)!r}")
    if isinstance(fmt, FixedPoint):
        if _has_tensor(range):
            raise ValueError("range= for a FixedPoint format must be two Python numbers")
        return FixedPoint(fmt.bits, range), None
    return fmt, _affine_pair(fmt, range)


def _has_tensor(range) -> bool:
    try:
        return any(isinstance(v, (tf.Tensor, tf.Variable)) or np.ndim(v) > 0 for v in range)
    except TypeError:
        return False


def _affine_pair(fmt: Affine, range) -> tuple:
    """An Affine ``range=``: tensors pass as they are; Python numbers are checked by the
    format's own rule (``Affine.with_range``: finite, ``lo < hi``, a grid float32 holds)."""
    pair = _as_pair(range)
    if not all(isinstance(v, numbers.Real) for v in pair):  # tensors, variables: checked by nothing
        return pair
    return fmt.with_range(pair).range


def _as_pair(range) -> tuple:
    try:
        lo, hi = range
    except (TypeError, ValueError):
        raise ValueError(f"range must be a pair (lo, hi), got {range!r}") from None
    return lo, hi


def quantize(
    x: Any,
    format: Optional[FormatLike] = None,
    rounding: str = "nearest",
    *,
    bits: Optional[int] = None,
    range: Optional[Tuple[Any, Any]] = None,
    seed: SeedLike = None,
    gradient_format: Optional[FormatLike] = None,
    gradient_rounding: str = "nearest",
    name: Optional[str] = None,
) -> tf.Tensor:
    """Round ``x`` onto the grid of a number format; the result stays a float tensor.

    >>> float(quantize(tf.constant([0.1234]), bits=8, range=(0.0, 1.0))[0])
    0.125

    Args:
        x: a float tensor (float16, bfloat16, float32 or float64) or anything
            ``tf.convert_to_tensor`` turns into one.
        format: a :class:`~graphquant.FixedPoint`, :class:`~graphquant.Affine`,
            :class:`~graphquant.FloatFormat` or :class:`~graphquant.Scaled`, a
            preset or format string (``"e4m3"``, ``"bfloat16"``, ``"fixed8[0,1]"``,
            ``"mxfp4"``, ``"nvfp4"``, ``"e4m3@channel"``) or a format dict. A
            :class:`~graphquant.Scaled` format computes its scales in float32 and
            returns ``x``'s dtype; its gradient passes unchanged everywhere.
        rounding: ``"nearest"`` (ties to even), ``"nearest_away"``,
            ``"toward_zero"``, ``"down"``, ``"up"`` or ``"stochastic"``.
            For :class:`Affine`, ``"nearest"`` is TensorFlow FakeQuant's
            rounding (ties upward), so results equal TensorFlow's bit for bit.
        bits: shorthand without ``format``: with ``range``, fixed point over
            that range; alone, 8-bit affine (then ``range`` is required here).
        range: ``(lo, hi)``. For fixed point, Python numbers. For affine, the
            range to use instead of the format's own; may be tensors or
            variables (scalars, or vectors along ``format.axis``), which then
            also receive FakeQuant's range gradients. Python numbers must make
            a range the format itself accepts (finite, ``lo < hi``, a grid
            float32 holds: see :class:`~graphquant.FixedPoint`); tensor values
            are not checked.
        seed: randomness of stochastic rounding. ``None``: a global generator
            (see :func:`set_seed`); an ``int``: a generator of its own, so the
            sequence of draws is reproducible; a ``tf.random.Generator``; or an
            int tensor of shape ``[2]`` (stateless: same seed, same result).
            Every call with a generator draws fresh randomness. A function
            that will be saved (``tf.saved_model.save``) must use a tracked
            generator (an attribute of the saved object, or a Keras
            ``SeedGenerator`` in a layer) or a tensor seed: the global and
            per-int generators are not tracked by any saved object.
        gradient_format: if given, the incoming gradient is rounded onto this
            format (with ``gradient_rounding``) before the straight-through
            estimator passes it on.
        gradient_rounding: rounding mode for ``gradient_format``.
        name: name scope for the ops.

    Returns:
        A tensor of the same shape and dtype as ``x``, every finite value on
        the format's grid. NaN stays NaN. Infinities saturate for fixed point
        and affine formats and follow the format for floats. For a float16 or
        bfloat16 ``x`` and a float format whose largest finite value that
        dtype cannot hold (float16's 65504 in bfloat16), a result beyond it
        is the largest value of both (65280) instead of what a cast to the
        dtype makes of it (65536).

    Gradient: straight through (unchanged) where ``x`` lies inside the
    representable range, zero outside, as TensorFlow's FakeQuant.

    Raises:
        TypeError: ``x`` is not a floating-point tensor.
        ValueError: an argument is invalid (the message names it).
    """
    fmt, affine_range = _resolve_format(format, bits, range)
    rounding = check_rounding(rounding, "rounding")
    grad_fmt = _gradient_format(gradient_format, gradient_rounding)
    if isinstance(fmt, Affine) and affine_range is None:
        if fmt.range is None:
            raise ValueError(
                f"range: the affine format {str(fmt)!r} has no range; pass range=(lo, hi) "
                "or use a format with a range"
            )
        affine_range = fmt.range

    with tf.name_scope(name or "graphquant_quantize"):
        x = tf.convert_to_tensor(x)
        if not x.dtype.is_floating:
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype.name}")
        in_dtype = x.dtype
        if in_dtype in (tf.float16, tf.bfloat16):
            x = tf.cast(x, tf.float32)
        key = _key(seed) if rounding == "stochastic" else _zero_key()
        if isinstance(fmt, Affine):
            y = _quantize_affine(x, fmt, affine_range, rounding, key, grad_fmt, gradient_rounding, seed)
        elif isinstance(fmt, Scaled):
            if x.dtype != tf.float32:
                x = tf.cast(x, tf.float32)
            y = _quantize_scaled(x, fmt, rounding, key, grad_fmt, gradient_rounding, seed)
        else:
            y = _quantize_elementwise(x, fmt, rounding, key, grad_fmt, gradient_rounding, seed)
        if y.dtype != in_dtype:
            y = _to_input_dtype(y, in_dtype, fmt)
        return y


def _gradient_format(gradient_format: Optional[FormatLike], gradient_rounding: str) -> Optional[Format]:
    """The parsed ``gradient_format=`` of :func:`quantize` (``None`` for none): a fixed grid, with
    ``gradient_rounding`` checked."""
    if gradient_format is None:
        return None
    grad_fmt = parse_format(gradient_format)
    check_rounding(gradient_rounding, "gradient_rounding")
    if isinstance(grad_fmt, Affine) and grad_fmt.range is None:
        raise ValueError("gradient_format must have a fixed range (an Affine format without range cannot round gradients)")
    return grad_fmt


#: 16-bit input dtypes: (stored mantissa bits, smallest normal, largest finite value)
_HALF_DTYPES = {
    tf.float16: (10, 2.0**-14, 65504.0),
    tf.bfloat16: (7, 2.0**-126, float(tf.bfloat16.max)),
}


def _largest_common(fmt: FloatFormat, dtype) -> Optional[float]:
    """The largest finite value both on ``fmt``'s grid and representable in ``dtype``
    (a 16-bit float dtype); ``None`` if that is ``fmt.max_value`` itself or there is
    no such normal number."""
    m_dt, min_normal, max_dt = _HALF_DTYPES[dtype]
    v = min(fmt.max_value, max_dt)
    if v < min_normal:
        return None
    e = math.frexp(v)[1] - 1  # v = 1.f * 2**e
    ulp = 2.0 ** (e - min(fmt.mantissa_bits, m_dt))
    common = math.floor(v / ulp) * ulp
    return None if common == fmt.max_value else common


def _to_input_dtype(y: tf.Tensor, dtype, fmt: Format) -> tf.Tensor:
    """Cast the float32 result ``y`` back to the 16-bit input ``dtype``.

    The cast rounds to nearest, which can carry a float format's largest finite
    value out of the format: float16's 65504 is not a bfloat16 and becomes 65536.
    A finite result beyond ``fmt.max_value`` (or an infinity, in a format without
    infinities) becomes the largest value of both grids with its sign instead
    (float16 into bfloat16: 65280), so the result is always a value of the format.
    An infinity in a format with infinities stays as the cast makes it.
    """
    out = tf.cast(y, dtype)
    if not isinstance(fmt, FloatFormat) or (fmt.has_inf and _HALF_DTYPES[dtype][2] <= fmt.max_value):
        return out  # (the dtype's finite values are all within the format's range)
    common = _largest_common(fmt, dtype)
    if common is None:
        return out

    @tf.custom_gradient
    def fix(out):  # the gradient passes unchanged (it is the straight-through one already)
        out32 = tf.cast(out, tf.float32)
        beyond = tf.abs(out32) > tf.constant(fmt.max_value, tf.float32)  # NaN: False
        if fmt.has_inf:
            beyond = tf.logical_and(beyond, tf.math.is_finite(out32))
        top = tf.cast(tf.where(out32 < 0, tf.constant(-common, tf.float32), tf.constant(common, tf.float32)), dtype)
        return tf.where(beyond, top, out), lambda dy: dy

    return fix(out)


def _round_gradient(dy: tf.Tensor, grad_fmt, grad_rounding: str, seed: SeedLike) -> tf.Tensor:
    if grad_fmt is None:
        return dy
    return tf.stop_gradient(quantize(dy, grad_fmt, grad_rounding, seed=_gradient_seed(seed, grad_rounding)))


def _gradient_seed(seed: SeedLike, grad_rounding: str):
    if grad_rounding != "stochastic":
        return None
    if seed is None or isinstance(seed, (int, np.integer, tf.random.Generator)):
        return seed
    return _key(seed, salt=True)


def _kernel(fmt, mode):
    return _r.kernel_for(fmt, mode, _r.xla_enabled())


def _may_record() -> bool:
    """False only when executing eagerly with no gradient tape watching."""
    if not tf.executing_eagerly():
        return True  # a traced function may be differentiated later
    try:
        from tensorflow.python.eager import record  # internal; absent -> assume recording

        return bool(record.could_possibly_record())
    except Exception:  # pragma: no cover - depends on the TF version
        return True


def _quantize_elementwise(x, fmt, rounding, key, grad_fmt, grad_rounding, seed):
    kernel = _kernel(fmt, rounding)
    if not _may_record():
        return kernel(x, key)  # no tape: the straight-through gradient is never asked for
    lo, hi = representable_range(fmt)

    @tf.custom_gradient
    def op(x):
        y = kernel(x, key)

        def grad(dy):
            dy = _round_gradient(dy, grad_fmt, grad_rounding, seed)
            inside = tf.logical_and(x >= tf.constant(lo, x.dtype), x <= tf.constant(hi, x.dtype))
            return tf.where(inside, dy, tf.zeros_like(dy))

        return y, grad

    return op(x)


def _scaled_layout(x: tf.Tensor, fmt: Scaled):
    """``(t, undo)``: ``x`` laid out as the rank-3 tensor :func:`rounding._scaled_kernel`
    expects, and the function that turns a result of that layout back into ``x``'s shape."""
    rank = x.shape.rank
    shape = tf.shape(x)
    if fmt.granularity == "tensor":
        return tf.reshape(x, [1, 1, -1]), lambda y: tf.reshape(y, shape)
    if rank == 0 or (rank is None and fmt.axis != -1):
        raise ValueError(f"axis: the format {str(fmt)!r} needs an input of known rank >= 1 "
                         f"(of any rank for axis=-1), got shape {x.shape}")
    if rank is None:  # axis -1 (activations in a graph traced for any shape): already last
        xt, inv = x, None
    else:
        if not -rank <= fmt.axis < rank:
            raise ValueError(f"axis={fmt.axis} of the format {str(fmt)!r} is out of bounds for an input of rank {rank}")
        xt, inv = _move_last(x, fmt.axis % rank)
    tshape = tf.shape(xt)
    n = xt.shape[-1] if xt.shape[-1] is not None else tshape[-1]
    flat = tf.reshape(xt, [-1, n])

    def back(y2):
        y = tf.reshape(y2, tshape)
        return y if inv is None else tf.transpose(y, inv)

    if fmt.granularity == "channel":
        return flat[:, :, None], lambda y: back(y[:, :, 0])
    k = fmt.block_size
    if isinstance(n, int):
        pad = -n % k
        blocks = (n + pad) // k
    else:
        pad = tf.math.floormod(-n, k)
        blocks = (n + pad) // k
    padded = tf.pad(flat, [[0, 0], [0, pad]]) if not (isinstance(pad, int) and pad == 0) else flat
    t = tf.reshape(padded, [-1, blocks, k])
    return t, lambda y: back(tf.reshape(y, [-1, blocks * k])[:, :n])


def _quantize_scaled(x, fmt: Scaled, rounding, key, grad_fmt, grad_rounding, seed):
    """A :class:`Scaled` format: the shared scales and the element rounding in one
    kernel (one XLA cluster); the gradient passes unchanged."""
    kernel = _kernel(fmt, rounding)

    def run(x):
        t, undo = _scaled_layout(x, fmt)
        return undo(kernel(t, key, _r.scaled_constants(fmt)))

    if not _may_record():
        return run(x)

    @tf.custom_gradient
    def op(x):
        def grad(dy):
            return _round_gradient(dy, grad_fmt, grad_rounding, seed)

        return run(x), grad

    return op(x)


def _channel_axis(fmt: Affine, rank: Optional[int]) -> Optional[int]:
    if fmt.axis is None:
        return None
    if rank is None:
        raise ValueError("axis: per-channel quantization needs an input of known rank")
    axis = fmt.axis
    if not -rank <= axis < rank:
        raise ValueError(f"axis={fmt.axis} is out of bounds for an input of rank {rank}")
    return axis % rank


def _quantize_affine(x, fmt: Affine, rng, rounding, key, grad_fmt, grad_rounding, seed):
    compute_dtype = tf.float32
    orig_dtype = x.dtype
    if orig_dtype != compute_dtype and rounding == "nearest" and fmt.bits <= 16:
        x = tf.cast(x, compute_dtype)
    lo = tf.cast(tf.convert_to_tensor(rng[0]), tf.float32)
    hi = tf.cast(tf.convert_to_tensor(rng[1]), tf.float32)
    if fmt.symmetric:
        m = tf.maximum(tf.abs(lo), tf.abs(hi))
        lo, hi = -m, m
    rank = x.shape.rank
    axis = _channel_axis(fmt, rank)
    if axis is not None:
        channels = x.shape[axis]
        for t, what in ((lo, "range lo"), (hi, "range hi")):
            if t.shape.rank not in (0, 1) or (t.shape.rank == 1 and channels is not None
                                               and t.shape[0] not in (None, channels)):
                raise ValueError(f"range: {what} must be a scalar or have {channels} entries along axis {fmt.axis}, got shape {t.shape}")
        if channels is None:
            channels = tf.shape(x)[axis]
        lo = tf.broadcast_to(lo, [channels])
        hi = tf.broadcast_to(hi, [channels])
    else:
        for t, what in ((lo, "range lo"), (hi, "range hi")):
            if t.shape.rank not in (None, 0):
                raise ValueError(f"range: {what} must be a scalar for a per-tensor format (set axis= for per-channel), got shape {t.shape}")

    use_tf_kernel = rounding == "nearest" and fmt.bits <= 16
    if use_tf_kernel:
        y = _fake_quant_tf(x, lo, hi, fmt, axis, grad_fmt, grad_rounding, seed)
    else:
        y = _fake_quant_own(x, lo, hi, fmt, axis, rounding, key, grad_fmt, grad_rounding, seed)
    if y.dtype != orig_dtype:
        y = tf.cast(y, orig_dtype)
    return y


def _move_last(t: tf.Tensor, axis: int) -> Tuple[tf.Tensor, Optional[list]]:
    rank = t.shape.rank
    if axis == rank - 1:
        return t, None
    perm = [i for i in range(rank) if i != axis] + [axis]
    inv = list(np.argsort(perm))
    return tf.transpose(t, perm), inv


def _tf_fake_quant_fns(fmt: Affine, axis: Optional[int]):
    """TensorFlow's FakeQuant forward and gradient ops for ``fmt``, channels last."""
    kw = dict(num_bits=fmt.bits, narrow_range=fmt.narrow_range)
    if axis is None:
        fwd = lambda t, a, b: tf.quantization.fake_quant_with_min_max_vars(t, a, b, **kw)
        bwd = lambda g, t, a, b: tf.quantization.fake_quant_with_min_max_vars_gradient(g, t, a, b, **kw)
    else:
        fwd = lambda t, a, b: tf.quantization.fake_quant_with_min_max_vars_per_channel(t, a, b, **kw)
        bwd = lambda g, t, a, b: tf.quantization.fake_quant_with_min_max_vars_per_channel_gradient(g, t, a, b, **kw)
    return fwd, bwd


def _fake_quant_tf(x, lo, hi, fmt, axis, grad_fmt, grad_rounding, seed):
    """TensorFlow's own FakeQuant kernels (bit-exact by construction)."""
    fwd, bwd = _tf_fake_quant_fns(fmt, axis)
    xt, inv = (x, None) if axis is None else _move_last(x, axis)
    if grad_fmt is None:
        y = fwd(xt, lo, hi)
    else:
        @tf.custom_gradient
        def op(t, a, b):
            def grad(dy):
                dy = _round_gradient(dy, grad_fmt, grad_rounding, seed)
                return bwd(dy, t, a, b)
            return fwd(t, a, b), grad

        y = op(xt, lo, hi)
    return y if inv is None else tf.transpose(y, inv)


def _fake_quant_own(x, lo, hi, fmt, axis, rounding, key, grad_fmt, grad_rounding, seed):
    """Other rounding modes on FakeQuant's nudged grid.

    graphquant's kernel picks the integer level (in float64, so the rounding
    mode decides, not float32 error); TensorFlow's FakeQuant kernel then turns
    the level into its value (a point within a hair of level k rounds to k),
    so every result is exactly a value TensorFlow's own kernel produces.
    Directed modes are checked against the value produced and moved by one
    level where float32 representation put it on the wrong side of ``x``.
    Above 16 bits, where TensorFlow has no kernel, values are
    ``k * scale + nudged_min`` rounded twice in float32.
    """
    kernel = _kernel(fmt, rounding)
    rank = x.shape.rank
    tf_values = fmt.bits <= 16

    def bcast(t):
        if axis is None:
            return t
        shape = [1] * rank
        shape[axis] = -1
        return tf.reshape(t, shape)

    reduce_axes = None if axis is None else [i for i in range(rank) if i != axis]

    @tf.custom_gradient
    def op(x, lo, hi):
        nmin, nmax, scale, _ = (bcast(t) for t in _r.nudge(lo, hi, fmt.quant_min, fmt.quant_max))
        k = tf.cast(kernel(x, key, nmin, nmax, scale), tf.float32)
        xf = tf.cast(x, tf.float32)
        top = float(fmt.quant_max - fmt.quant_min)

        if tf_values:
            fwd, _ = _tf_fake_quant_fns(fmt, axis)

            def values(levels):
                approx = nmin + levels * scale
                t, inv = (approx, None) if axis is None else _move_last(approx, axis)
                v = fwd(t, lo, hi)
                return v if inv is None else tf.transpose(v, inv)
        else:
            def values(levels):
                return nmin + _r.no_contract(levels * scale)

        y = values(k)
        if rounding in ("down", "up", "toward_zero"):
            want_le = (rounding == "down") | ((rounding == "toward_zero") & (xf >= 0))
            want_ge = (rounding == "up") | ((rounding == "toward_zero") & (xf < 0))
            fix = tf.where(want_le & (y > xf), -1.0, tf.where(want_ge & (y < xf), 1.0, 0.0))
            k2 = tf.clip_by_value(k + fix, 0.0, top)
            y = tf.where(tf.not_equal(k2, k), values(k2), y)
        y = tf.where(tf.math.is_nan(xf), xf, y)
        y = tf.cast(y, x.dtype)

        def grad(dy):
            dy = _round_gradient(dy, grad_fmt, grad_rounding, seed)
            nmin_x, nmax_x = tf.cast(nmin, x.dtype), tf.cast(nmax, x.dtype)
            below = x < nmin_x
            above = x > nmax_x
            zero = tf.zeros_like(dy)
            # inside, not "not outside": a NaN x gets 0, as TensorFlow's FakeQuant gradient
            dx = tf.where(tf.logical_and(x >= nmin_x, x <= nmax_x), dy, zero)
            dlo = tf.cast(tf.reduce_sum(tf.where(below, dy, zero), axis=reduce_axes), lo.dtype)
            dhi = tf.cast(tf.reduce_sum(tf.where(above, dy, zero), axis=reduce_axes), hi.dtype)
            return dx, dlo, dhi

        return y, grad

    return op(x, lo, hi)


# ----------------------------------------------------------------------------
# FakeQuant with a range that carries no gradient (the Keras layers' fast paths)
# ----------------------------------------------------------------------------
def _quant_bounds(fmt: Affine) -> tf.Tensor:
    # a tensor, not Python constants: see rounding._nudge
    return tf.constant([float(fmt.quant_min), float(fmt.quant_max)], tf.float32)


def _check_fast_affine(x: tf.Tensor, fmt: Affine) -> int:
    if not isinstance(fmt, Affine) or fmt.bits > 16:
        raise ValueError(f"format must be an Affine format of at most 16 bits, got {fmt}")
    if x.dtype != tf.float32:
        raise TypeError(f"x must be float32, got {x.dtype.name}")
    if x.shape.rank is None:
        raise ValueError("x must have a known rank")
    return x.shape.rank


def _straight_through(x: tf.Tensor, y_fn, mask_grad) -> tf.Tensor:
    if not _may_record():
        return y_fn(x)

    @tf.custom_gradient
    def op(x):
        def grad(dy):
            return mask_grad(dy, x)

        return y_fn(x), grad

    return op(x)


def fake_quant(x: Any, fmt: Affine, lo: Any, hi: Any, activation: Optional[str] = None) -> tf.Tensor:
    """``quantize(x, fmt, "nearest", range=(lo, hi))`` for float32 ``x`` with a range that
    receives no gradient.

    The values are TensorFlow's FakeQuant's bit for bit (per tensor, or per
    channel along ``fmt.axis`` with ``lo``/``hi`` vectors). With XLA on, it runs
    graphquant's XLA-fused replica of TensorFlow's kernel, and the gradient is the
    straight-through mask alone (TensorFlow's gradient op also reduces over the
    whole tensor for the range gradients); with XLA off, TensorFlow's own ops.

    ``activation="relu"`` or ``"relu6"`` rounds ``tf.nn.relu(x)`` /
    ``tf.nn.relu6(x)`` instead, with the same values and gradient as the two
    ops in a row, in one pass over memory each way under XLA.
    """
    x = tf.convert_to_tensor(x)
    rank = _check_fast_affine(x, fmt)
    axis = _channel_axis(fmt, rank)
    if activation is not None and activation not in _r.FUSED_ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_r.FUSED_ACTIVATIONS)} or None, got {activation!r}")
    lo = tf.stop_gradient(tf.cast(lo, tf.float32))
    hi = tf.stop_gradient(tf.cast(hi, tf.float32))
    if fmt.symmetric:
        m = tf.maximum(tf.abs(lo), tf.abs(hi))
        lo, hi = -m, m
    if not _r.xla_enabled():
        if activation is not None:
            x = _r.FUSED_ACTIVATIONS[activation][0](x)
        return _fake_quant_tf(x, lo, hi, fmt, axis, None, "nearest", None)
    fwd, grad = _r.fake_quant_fns(axis, rank, True, activation)
    q = _quant_bounds(fmt)
    return _straight_through(x, lambda t: fwd(t, lo, hi, q), lambda dy, t: grad(dy, t, lo, hi, q))


def symmetric_fake_quant(w: Any, fmt: Affine) -> tf.Tensor:
    """Round a weight onto a symmetric Affine grid on its own range ``(-m, m)``,
    ``m = max|w|`` (per channel along ``fmt.axis``, floored at 1e-12).

    Bit for bit ``quantize(w, fmt, "nearest", range=(-m, m))``; the range carries
    no gradient (straight-through to ``w``). With XLA on, the reduction and the
    rounding are one fused function, several times faster than TensorFlow's
    per-channel FakeQuant kernel on large kernels.
    """
    w = tf.convert_to_tensor(w)
    rank = _check_fast_affine(w, fmt)
    if not fmt.symmetric:
        raise ValueError(f"format must be symmetric, got {fmt}")
    axis = _channel_axis(fmt, rank)
    if not _r.xla_enabled():
        return _symmetric_fake_quant_tf(w, fmt, axis, rank)
    fn = _r.symmetric_fake_quant_fn(axis, rank, True)
    _, grad = _r.fake_quant_fns(axis, rank, True)
    q = _quant_bounds(fmt)
    if not _may_record():
        return fn(w, q)[0]

    @tf.custom_gradient
    def op(w):
        y, m = fn(w, q)

        def g(dy):
            return grad(dy, w, -m, m, q)

        return y, g

    return op(w)


def _symmetric_fake_quant_tf(w: tf.Tensor, fmt: Affine, axis: Optional[int], rank: int) -> tf.Tensor:
    """:func:`symmetric_fake_quant` with TensorFlow's FakeQuant ops (XLA off). A
    per-channel axis followed only by size-1 dimensions (depthwise kernels) is
    moved last by a reshape instead of two transposes."""
    red = None if axis is None else [i for i in range(rank) if i != axis]
    m = tf.maximum(tf.reduce_max(tf.abs(tf.stop_gradient(w)), axis=red), 1e-12)
    shape = w.shape
    if axis is not None and axis != rank - 1 and shape.is_fully_defined() and all(d == 1 for d in shape[axis + 1 :]):
        fwd, _ = _tf_fake_quant_fns(fmt, axis)
        return tf.reshape(fwd(tf.reshape(w, shape[: axis + 1]), -m, m), shape)
    return _fake_quant_tf(w, -m, m, fmt, axis, None, "nearest", None)


def per_output_channel(w: Any, fmt: Format, round_fn: Any, depthwise: bool) -> Any:
    """``round_fn(w)``, with a depthwise kernel's output channels made one axis first.

    A depthwise kernel ``(..., in_channels, multiplier)`` has ``in_channels *
    multiplier`` output channels (output ``c * multiplier + m`` comes from
    ``kernel[..., c, m]``). A per-channel format on its channel axis (-2) would
    give the ``multiplier`` outputs of one input channel a single scale; this
    rounds the kernel seen as ``(..., in_channels * multiplier, 1)`` instead,
    one scale per output channel, and returns the original shape.

    A :class:`Scaled` format (per channel or per block) rounds a depthwise kernel
    seen as the matrix ``(taps, in_channels * multiplier)``: the spatial taps
    (row-major) are each output channel's reduction axis, so ``fmt`` is placed
    on that matrix as on a Dense kernel (blocks along ``-2``, channel scales
    along ``-1``; :func:`graphquant.plan.scaled_weight_format`).

    Otherwise (a multiplier of 1 with a per-channel Affine format, a format that
    is neither, or ``depthwise=False``) it is just ``round_fn(w)``.
    """
    shape = getattr(w, "shape", None)
    rank = None if shape is None else shape.rank if isinstance(shape, tf.TensorShape) else len(shape)
    if depthwise and rank is not None and rank >= 3 and isinstance(fmt, Scaled) and fmt.granularity != "tensor":
        if tf.TensorShape(shape[-2:]).is_fully_defined():
            matrix = tf.reshape(w, [-1, int(shape[-2]) * int(shape[-1])])
            return tf.reshape(round_fn(matrix), list(shape) if tf.TensorShape(shape).is_fully_defined() else tf.shape(w))
        dyn = tf.shape(w)
        return tf.reshape(round_fn(tf.reshape(w, [tf.reduce_prod(dyn[:-2]), -1])), dyn)
    if (
        not depthwise or rank is None or rank < 3 or shape[-1] == 1
        or not (isinstance(fmt, Affine) and fmt.axis is not None and fmt.axis % rank == rank - 2)
    ):  # fmt: skip
        return round_fn(w)
    if tf.TensorShape(shape[-2:]).is_fully_defined():
        merged = tf.reshape(w, list(shape[:-2]) + [int(shape[-2]) * int(shape[-1]), 1])
        return tf.reshape(round_fn(merged), list(shape))
    dyn = tf.shape(w)  # a filter read in a traced graph may have no static shape: same, at run time
    merged = tf.reshape(w, tf.concat([dyn[:-2], [-1, 1]], 0))
    return tf.reshape(round_fn(merged), dyn)
