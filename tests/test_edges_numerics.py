"""Numerics at the edges of gq.quantize: ranges float32 cannot hold, a half-precision
input whose dtype cannot hold the format's largest value, NaN gradients."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf

import graphquant as gq
from graphquant import Affine, FixedPoint
from graphquant import rounding as gq_rounding

F32 = np.float32
MODES = gq.ROUNDING_MODES


def run(x, fmt, rounding="nearest", **kw):
    return gq.quantize(tf.constant(x), fmt, rounding, **kw).numpy()


@pytest.fixture(params=[True, False], ids=["xla", "no_xla"])
def xla(request):
    old = gq_rounding.xla_enabled()
    gq_rounding.set_xla(request.param)
    yield request.param
    gq_rounding.set_xla(old)


# ===========================================================================
# ranges given to quantize: the formats' own rule
# ===========================================================================
BAD_QUANTIZE_RANGES = [(1, 1), (1, 0), (math.nan, 1), (0, math.inf), (-math.inf, 0)]


@pytest.mark.parametrize("rng", BAD_QUANTIZE_RANGES, ids=str)
@pytest.mark.parametrize("fmt", ["affine8", Affine(8, symmetric=True), Affine(4, narrow_range=True, axis=-1)], ids=str)
def test_quantize_range_checked_like_affine(fmt, rng):
    """Used to return all NaN or a constant silently (e.g. (1, 0) gave all 1)."""
    x = tf.constant([[-1.0, 0.0, 0.5, 2.0]])
    with pytest.raises(ValueError, match="range") as from_quantize:
        gq.quantize(x, fmt, range=rng)
    with pytest.raises(ValueError) as from_format:
        gq.parse_format(fmt).with_range(rng)
    assert str(from_quantize.value) == str(from_format.value)  # one rule, one message


def test_quantize_range_numpy_scalars_checked_and_tensors_still_work():
    x = tf.constant([-1.0, 0.25, 3.0])
    with pytest.raises(ValueError, match="lo < hi"):
        gq.quantize(x, "affine8", range=(np.float32(2.0), np.float32(-2.0)))
    want = gq.quantize(x, "affine8[-2,2]").numpy()
    np.testing.assert_array_equal(gq.quantize(x, "affine8", range=(np.float32(-2.0), np.float32(2.0))).numpy(), want)
    np.testing.assert_array_equal(gq.quantize(x, "affine8", range=(tf.constant(-2.0), tf.constant(2.0))).numpy(), want)


# ===========================================================================
# ranges whose grid float32 cannot hold
# ===========================================================================
@pytest.mark.parametrize(
    "make, why",
    [
        # step below float32's smallest normal: x=0 gave NaN with XLA, 0 without
        (lambda: FixedPoint(8, (0.0, 1e-36)), "too narrow"),
        (lambda: Affine(8, (0.0, 1e-36)), "too narrow"),
        (lambda: FixedPoint(8, (0.0, 255 * 2.0**-126)), "too narrow"),  # 256 steps: one just below 2**-126
        # ends that round to the same float32: the affine scale was 0, all NaN
        (lambda: Affine(8, (1.0, 1.0 + 1e-10)), "too narrow"),
        # 3e38 mapped to inf (x - lo overflowed)
        (lambda: FixedPoint(8, (-3e38, 3e38)), "too wide"),
        # every value NaN (the scale overflowed)
        (lambda: Affine(8, (-2e38, 2e38)), "too wide"),
        (lambda: Affine(8, (-1.0, 2e38), symmetric=True), "too wide"),
        # accepted, then NaN everywhere (float32 has no 1e308)
        (lambda: FixedPoint(8, (-1e308, 1e308)), "too wide"),
        (lambda: gq.parse_format("fixed8[0,1e300]"), "too wide"),
        (lambda: gq.quantize(tf.constant([0.0]), bits=8, range=(0.0, 1e-36)), "too narrow"),
        (lambda: gq.quantize(tf.constant([0.0]), "affine8", range=(-2e38, 2e38)), "too wide"),
        (lambda: gq.quantize(tf.constant([0.0]), FixedPoint(8, (0, 1)), range=(-3e38, 3e38)), "too wide"),
    ],
)
def test_ranges_float32_cannot_hold_are_rejected(make, why):
    with pytest.raises(ValueError, match=f"range .* {why} for float32"):
        make()


EDGE_FORMATS = [
    FixedPoint(8, (0.0, 2.0**-118)),  # step exactly 2**-126
    FixedPoint(3, (-3 * 2.0**-126, 5 * 2.0**-126)),  # step 2**-126, not a power-of-two range
    Affine(8, (0.0, 255 * 2.0**-126)),  # scale exactly 2**-126
    FixedPoint(8, (-(2.0**126), 2.0**126)),  # width 2**127
    FixedPoint(16, (-(2.0**127), 0.0)),
    Affine(8, (0.0, 2.0**127)),
    Affine(8, (-(2.0**126), 2.0**126)),
    Affine(20, (-(2.0**127) / 3, 2 * 2.0**127 / 3), narrow_range=True),
    Affine(8, (-1.0, 2.0**126), symmetric=True),
]


@pytest.mark.parametrize("fmt", EDGE_FORMATS, ids=str)
def test_ranges_at_the_bounds_stay_finite_and_xla_agrees(fmt):
    """The bounds are usable: finite results for every finite or infinite input,
    inside the range, NaN only for NaN, the same with XLA on and off."""
    lo, hi = fmt.range
    rng = np.random.default_rng(7)
    x = np.concatenate([
        [lo, hi, 0.0, -0.0, np.inf, -np.inf, 3.4e38, -3.4e38, 1.0, -1.0, 1e-30, (lo + hi) / 2],
        lo + (hi - lo) * rng.random(40),
    ]).astype(F32)
    low, high = gq.representable_range(fmt)
    # (above 16 bits affine values are nudged_min + k*scale rounded twice in float32: an ulp)
    low, high = np.nextafter(F32(low), F32(-np.inf)), np.nextafter(F32(high), F32(np.inf))
    for mode in MODES:
        got = {}
        for xla in (True, False):
            with gq.use_xla(xla):
                got[xla] = run(x, fmt, mode, seed=tf.constant([3, 4]))
            assert np.isfinite(got[xla]).all(), (mode, xla, x[~np.isfinite(got[xla])])
            assert (got[xla] >= low).all() and (got[xla] <= high).all(), (mode, xla)
        np.testing.assert_array_equal(got[True], got[False], err_msg=mode)
        assert np.isnan(run(np.array([np.nan], F32), fmt, mode, seed=1)).all()


def test_fixed_smallest_step_zero_is_zero(xla):
    """At the smallest step allowed (2**-126) 0 stays 0 and grid values stay, XLA on or off
    (below it, range (0, 1e-36), 0 was NaN under XLA: now rejected)."""
    fmt = FixedPoint(8, (0.0, 2.0**-118))
    for mode in MODES:
        got = run(np.array([0.0, 2.0**-126, 3 * 2.0**-126], F32), fmt, mode, seed=1)
        np.testing.assert_array_equal(got, np.array([0.0, 2.0**-126, 3 * 2.0**-126], F32), err_msg=mode)


# ===========================================================================
# a 16-bit input dtype that cannot hold the format's largest value
# ===========================================================================
def _is_value_of(v: np.ndarray, fmt_dtype) -> np.ndarray:
    v32 = np.asarray(v, F32)
    with np.errstate(over="ignore"):
        return v32.astype(fmt_dtype).astype(F32) == v32


# largest value of float16 that bfloat16 holds: 65504 (0x7BFF) is not a bfloat16
_TOP = 65280.0
_I = np.inf


@pytest.mark.parametrize(
    "spec, mode, want",
    [
        ("float16", "toward_zero", [_TOP, -_TOP]),
        ("float16", "down", [_TOP, -_I]),
        ("float16", "up", [_I, -_TOP]),
        ("float16:sat", "nearest", [_TOP, -_TOP]),
        ("float16:sat", "stochastic", [_TOP, -_TOP]),
    ],
)
def test_bfloat16_input_rounded_to_float16_stays_a_float16_value(spec, mode, want):
    """bfloat16 1e30 rounded to float16 toward zero gave 65536 (float16's 65504 cast to
    bfloat16): beyond float16's largest value. It is now the largest value of both."""
    x = np.array([1e30, -1e30], ml_dtypes.bfloat16)
    got = gq.quantize(tf.constant(x), spec, mode, seed=1)
    assert got.dtype == tf.bfloat16
    got = got.numpy().astype(F32)
    np.testing.assert_array_equal(got, np.array(want, F32))
    finite = np.isfinite(got)
    assert _is_value_of(got[finite], np.float16).all() and (np.abs(got[finite]) <= 65504).all()
    # same side of x as the float32 path (which gives +-65504 where this gives +-65280)
    ref = run(x.astype(F32), spec, mode, seed=1)
    np.testing.assert_array_equal(np.sign(got), np.sign(ref))
    assert (np.abs(got[finite]) <= np.abs(ref[finite])).all()


def test_bfloat16_input_float16_exact_values_untouched():
    """Values of both grids come back as they are; NaN and inf as the format says."""
    x = np.array([65280, -65280, 1.0, 2.0**-24, 0.0, np.nan, np.inf, -np.inf], ml_dtypes.bfloat16)
    for mode in MODES:
        got = gq.quantize(tf.constant(x), "float16", mode, seed=1).numpy().astype(F32)
        np.testing.assert_array_equal(got, x.astype(F32), err_msg=mode)


def test_float16_input_format_without_inf_never_gives_inf():
    """e5m3:fn (max 114688, no inf) on float16 input: 65504 rounds to 65536 and inf saturates
    to 114688, neither of which float16 holds; the cast made them inf, which the format
    does not have. They are the largest value of both now (61440); the gradient still
    passes where x is inside the format's range."""
    fmt = gq.parse_format("e5m3:fn")
    x = tf.constant([65504.0, -65504.0, np.inf, 3.0], tf.float16)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = gq.quantize(x, fmt)
    np.testing.assert_array_equal(y.numpy().astype(F32), np.array([61440, -61440, 61440, 3], F32))
    np.testing.assert_array_equal(tape.gradient(y, x).numpy().astype(F32), np.array([1, 1, 0, 1], F32))


# ===========================================================================
# gradients at NaN inputs: 0 on every path
# ===========================================================================
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("bits", [8, 20])
@pytest.mark.parametrize("mode", MODES)
def test_affine_nan_input_gets_zero_gradient(mode, bits, per_channel):
    """Affine's own kernel (directed, stochastic, nearest_away, > 16 bits) passed a
    gradient of 1 at NaN inputs; TensorFlow's FakeQuant and every other path pass 0."""
    fmt = Affine(bits, (-1.0, 1.0), axis=-1 if per_channel else None)
    x = tf.constant([[np.nan, 0.3, -0.7, 5.0], [0.1, np.nan, -np.nan, -5.0]], tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = gq.quantize(x, fmt, mode, seed=tf.constant([5, 6]))
    g = tape.gradient(y, x, output_gradients=tf.fill(x.shape, 3.0)).numpy()
    np.testing.assert_array_equal(g, np.array([[0, 3, 3, 0], [3, 0, 0, 0]], F32))
    # TensorFlow's own gradient op, the reference for affine formats
    fq = tf.quantization.fake_quant_with_min_max_vars_gradient(tf.fill(x.shape, 3.0), x, -1.0, 1.0, num_bits=8)[0]
    np.testing.assert_array_equal(g, fq.numpy())


def test_affine_nan_input_range_gradients_unchanged():
    """A NaN input counts neither below nor above the range (as TensorFlow's gradient op)."""
    lo, hi = tf.Variable(-1.0), tf.Variable(1.0)
    x = tf.constant([np.nan, -3.0, 4.0, 0.5, 6.0])
    with tf.GradientTape() as tape:
        y = gq.quantize(x, "affine8", "down", range=(lo, hi))
    dlo, dhi = tape.gradient(y, [lo, hi])
    assert float(dlo) == 1.0 and float(dhi) == 2.0
