"""Scaled formats (per tensor / channel / block scales): OCP MX presets, NVFP4, ``e4m3@channel``.

The oracle is a NumPy reference written here from the rules (OCP MX v1.0: E8M0
scale ``2**(floor(log2(amax)) - emax_elem)`` clamped to ``[-127, 127]``, elements
cast with saturation; NVFP4: e4m3 block scale of ``amax / 6`` under a float32
per-tensor scale ``amax_tensor / (6 * 448)``), block by block with exact powers
of two; the element rounding comes from the grids of ``_oracles`` and the MX
presets are also checked against ``ml_dtypes`` casts.
"""

import math

import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf

import graphquant as gq
from graphquant.formats import FixedPoint, FloatFormat, Scaled, format_from_dict, parse_format
from graphquant.rounding import use_xla

from _oracles import ml_positive_grid, round_to_grid

F32_MIN_NORMAL = 2.0**-126

#: preset -> (element grid name or "int8", emax of the element)
MX = {
    "mxfp8_e4m3": ("e4m3", 8, ml_dtypes.float8_e4m3fn),
    "mxfp8_e5m2": ("e5m2", 15, ml_dtypes.float8_e5m2),
    "mxfp6_e3m2": ("e3m2", 4, ml_dtypes.float6_e3m2fn),
    "mxfp6_e2m3": ("e2m3", 2, ml_dtypes.float6_e2m3fn),
    "mxfp4": ("e2m1", 2, ml_dtypes.float4_e2m1fn),
    "mxint8": ("int8", 0, None),
}
DIRECTED = ("nearest", "nearest_away", "toward_zero", "down", "up")


# ----------------------------------------------------------------------------
# the reference
# ----------------------------------------------------------------------------
def round_element(z: np.ndarray, element: str, mode: str) -> np.ndarray:
    """Round float64 ``z`` onto a saturating element grid (float preset name or "int8")."""
    if element == "int8":  # two's complement int8 * 2**-6: -128/64 ... 127/64
        grid = np.arange(129) / 64.0  # 2 (= 128/64) only so that -2 is reachable
        q = round_to_grid(np.clip(z, -2.0, 2.0), grid, mode)
        return np.minimum(q, 127 / 64)
    grid = ml_positive_grid(element)
    return round_to_grid(np.clip(z, -grid[-1], grid[-1]), grid, mode)


def groups(shape, granularity, axis):
    """Index arrays (into the flattened tensor) of each group sharing a scale."""
    idx = np.arange(int(np.prod(shape))).reshape(shape)
    if granularity == "tensor":
        return [idx.ravel()]
    moved = np.moveaxis(idx, axis, -1).reshape(-1, shape[axis])
    if granularity == "channel":
        return [moved[:, c] for c in range(shape[axis])]
    n = shape[axis]
    return [row[b : b + granularity] for row in moved for b in range(0, n, granularity)]


def ftz(v: np.ndarray) -> np.ndarray:
    """TensorFlow on CPU flushes float32 subnormal results to zero."""
    return np.where(np.abs(v) < F32_MIN_NORMAL, np.copysign(0.0, v), v)


def ref_mx(x: np.ndarray, element: str, emax: int, mode: str, block=32, axis=-1) -> np.ndarray:
    """OCP MX: E8M0 scale per block, exact powers of two in float64."""
    x = np.asarray(x, np.float32)
    out = np.empty(x.size, np.float64)
    flat = x.ravel().astype(np.float64)
    for g in groups(x.shape, block, axis % x.ndim):
        blk = flat[g]
        amax = np.max(np.abs(blk))  # NaN if the block holds a NaN
        if not np.isfinite(amax):
            out[g] = np.nan
            continue
        e = -127 if amax < F32_MIN_NORMAL else math.frexp(amax)[1] - 1 - emax
        e = min(max(e, -127), 127)
        z = ftz(blk / 2.0**e)  # exact: a power of two
        out[g] = ftz(round_element(z, element, mode) * 2.0**e)
    return out.reshape(x.shape).astype(np.float32)


def ref_float_scale(x, element, emax_value, mode, granularity, axis=-1, scale="float32", two_level=False):
    """Float scales, in float32 as the definition says: ``s = amax / emax_value`` (float32
    scale, at least 2**-126) or that clamped to e4m3's normal range and cast to e4m3;
    with ``two_level`` a per-tensor ``t = amax_tensor / (emax_value * 448)`` first."""
    f32 = np.float32
    x = np.asarray(x, f32)
    out = np.empty(x.size, f32)
    flat = x.ravel()
    fin = flat[np.isfinite(flat)]
    amax_t = f32(np.max(np.abs(fin))) if fin.size else f32(0)
    t = max(f32(amax_t / f32(emax_value * 448.0)), f32(F32_MIN_NORMAL)) if two_level else None
    for g in groups(x.shape, granularity, axis % x.ndim):
        blk = flat[g]
        amax = np.max(np.abs(blk))
        if not np.isfinite(amax):
            out[g] = np.nan
            continue
        raw = f32(amax / f32(emax_value))
        if two_level:
            raw = f32(raw / t)
        if scale == "float32":
            s = max(raw, f32(F32_MIN_NORMAL))
        else:  # e4m3
            s = f32(np.float32(np.clip(raw, 2.0**-6, 448.0)).astype(ml_dtypes.float8_e4m3fn))
        if two_level:
            s = f32(s * t)
        z = ftz((blk / s).astype(f32))
        out[g] = ftz((round_element(z.astype(np.float64), element, mode).astype(f32) * s).astype(f32))
    return out.reshape(x.shape)


def q(x, fmt, mode="nearest", **kw):
    return gq.quantize(tf.constant(x, tf.float32), fmt, mode, **kw).numpy()


def assert_same(got, want):
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    np.testing.assert_array_equal(got[ok], want[ok])


def data(shape=(3, 70), seed=0, spread=8):
    """Random values over 2*spread binades; 70 = two blocks of 32 and a short one of 6."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * np.exp2(rng.integers(-spread, spread, shape))
    return x.astype(np.float32)


def special_data():
    """Rows of 70 (blocks 0-31, 32-63, 64-69) with the cases the specification singles out."""
    x = data((6, 70), seed=1, spread=4)
    x[0, :32] = 0.0  # a block of zeros (signed zeros too)
    x[0, 5] = -0.0
    x[1, 40] = np.nan  # NaN: its block is NaN, the others are not
    x[2, 3] = np.inf  # inf: the same
    x[2, 66] = -np.inf
    # elements far below the block maximum: element subnormals and zeros
    x[3, :32] = np.float32(2.0**-9) * np.arange(32, dtype=np.float32)
    x[3, 0] = 448.0
    # E8M0 lower limit: amax 2**-126 (scale 2**-127 for every element type here)
    x[4, 32:64] = np.float32(2.0**-126) * (1 + np.arange(32, dtype=np.float32) / 32)
    # near float32's largest: the E8M0 exponent reaches 127 for mxint8
    x[5, 64:70] = np.float32([3.0e38, -1.7e38, 1.0e38, 2.0**127, -(2.0**126), 1.0])
    return x


# ----------------------------------------------------------------------------
# the formats as data
# ----------------------------------------------------------------------------
def test_presets_definitions_and_round_trips():
    p = gq.SCALED_PRESETS
    assert p["mxfp4"] == Scaled(gq.PRESETS["e2m1"], 32, -1, "e8m0")
    assert p["mxint8"].element == FixedPoint(8, (-2.0, 2.0))
    assert p["mxfp8_e5m2"].element.saturate is True
    assert p["nvfp4"] == Scaled("e2m1", "block16", scale_format="e4m3", tensor_scale=True)
    assert [p[n].emax_elem for n in MX] == [v[1] for v in MX.values()]
    for name, fmt in p.items():
        assert str(fmt) == name and parse_format(name) is fmt
        assert format_from_dict(fmt.to_dict()) == fmt
        assert hash(fmt) == hash(format_from_dict(fmt.to_dict()))
    assert parse_format("mxfp8") == p["mxfp8_e4m3"]
    for text in ("e4m3@channel", "e2m1@block32", "e4m3@tensor", "e2m1@block32:axis=0:scale=e8m0",
                 "e2m1@block16:scale=e4m3:nosub:tensor_scale", "fixed8[-2,2]@block32:scale=e8m0", "e5m2:sat@block8"):
        fmt = parse_format(text)
        assert isinstance(fmt, Scaled)
        assert parse_format(str(fmt)) == fmt and format_from_dict(fmt.to_dict()) == fmt
    assert parse_format("e4m3@channel") == Scaled(gq.PRESETS["e4m3"], "channel")
    assert parse_format("e2m1@block32:scale=e8m0") == p["mxfp4"]
    assert str(parse_format("E2M1 @ block32 : scale=e8m0")) == "mxfp4"
    with pytest.raises(Exception):
        p["mxfp4"].axis = 0  # immutable


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(element=gq.Affine(8, (-1, 1))), TypeError, "element"),
        (dict(element="e9m9"), ValueError, "element"),
        (dict(element="e2m1", granularity=0), ValueError, "granularity"),
        (dict(element="e2m1", granularity="rows"), ValueError, "granularity"),
        (dict(element="e2m1", granularity=2.5), TypeError, "granularity"),
        (dict(element="e2m1", axis="0"), TypeError, "axis"),
        (dict(element="e2m1", scale_format="e7m0x"), ValueError, "scale_format"),
        (dict(element="e2m1", scale_format=3), TypeError, "scale_format"),
        (dict(element="e2m1", scale_format="e8m0", tensor_scale=True), ValueError, "tensor_scale"),
        (dict(element="e2m1", tensor_scale=1), TypeError, "tensor_scale"),
        (dict(element=FixedPoint(4, (-2.0, 0.0))), ValueError, "largest value"),
    ],
)
def test_validation_names_the_argument(kwargs, error, words):
    with pytest.raises(error, match=words):
        Scaled(**kwargs)


def test_bad_strings_and_arguments():
    for text in ("e2m1@block0", "e2m1@rows", "e2m1@block32:scale=e9m9", "e2m1@block32:axis", "affine8@channel"):
        with pytest.raises(ValueError, match="not valid"):
            parse_format(text)
    with pytest.raises(ValueError, match="range"):
        gq.quantize(tf.ones([4]), "mxfp4", range=(0, 1))
    with pytest.raises(ValueError, match="axis=2"):
        gq.quantize(tf.ones([4, 4]), "e2m1@block4:axis=2")


# ----------------------------------------------------------------------------
# values
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in MX if n != "mxint8"])
def test_mx_presets_equal_ml_dtypes_casts(name):
    element, emax, dt = MX[name]
    x = special_data()
    got = q(x, name)
    assert_same(got, ref_mx(x, element, emax, "nearest"))
    # the same, from ml_dtypes: the E8M0 scale of each block, x / scale cast with saturation
    mx_max = float(ml_dtypes.finfo(dt).max)
    want = np.empty_like(x)
    for r in range(x.shape[0]):
        for b in range(0, 70, 32):
            blk = x[r, b : b + 32]
            amax = np.max(np.abs(blk))
            if not np.isfinite(amax):
                want[r, b : b + 32] = np.nan
                continue
            e = int(np.clip(np.floor(np.log2(max(amax, F32_MIN_NORMAL))) - emax, -127, 127))
            scale = np.float64(np.float32(2.0**e) if e > -127 else 2.0**-127)
            assert np.float32(scale).astype(ml_dtypes.float8_e8m0fnu).astype(np.float64) == scale or e == -127
            z = np.clip(blk.astype(np.float64) / scale, -mx_max, mx_max).astype(np.float32)
            want[r, b : b + 32] = ftz(z.astype(dt).astype(np.float64) * scale)
    assert_same(got, want)
    # the NaN/inf blocks are NaN, their neighbours are not
    assert np.isnan(got[1, 32:64]).all() and not np.isnan(got[1, :32]).any()
    assert np.isnan(got[2, :32]).all() and np.isnan(got[2, 64:]).all() and not np.isnan(got[2, 32:64]).any()
    assert (got[0, :32] == 0).all()


@pytest.mark.parametrize("mode", DIRECTED)
@pytest.mark.parametrize("name", ["mxfp4", "mxint8"])
def test_mx_every_rounding_mode(name, mode):
    element, emax, _ = MX[name]
    x = special_data()
    assert_same(q(x, name, mode), ref_mx(x, element, emax, mode))


def test_mx_limits_saturation_and_short_block():
    # saturation: a block maximum of 500 * 2**k lies above e4m3's 448 after the E8M0
    # scale 2**(8 + k - 8): it saturates to 448 * 2**k
    x = np.full([32], 2.0**-20, np.float32)
    x[0] = 500.0 * 2.0**-20
    x[1] = -500.0 * 2.0**-20
    y = q(x, "mxfp8_e4m3")
    assert y[0] == 448.0 * 2.0**-20 and y[1] == -448.0 * 2.0**-20 and y[2] == 2.0**-20
    # e5m2: 1.875 * 2**15 rounds to 2**16 (ties to even), beyond 57344: saturates
    x = np.array([1.875 * 2.0**15 * 2.0**-40] + [0.0] * 31, np.float32)
    assert q(x, "mxfp8_e5m2")[0] == 57344.0 * 2.0**-40
    # E8M0's top: mxint8's element emax is 0, so 3e38 needs the scale 2**127
    x = np.array([3.0e38, 1.5 * 2.0**127, 2.0**120], np.float32)
    k0 = np.round(np.float64(np.float32(3.0e38)) / 2.0**127 * 64)  # 112.8 -> 113
    np.testing.assert_array_equal(q(x, "mxint8"), np.float32([k0 / 64 * 2.0**127, 1.5 * 2.0**127, 0.0]))
    # E8M0's bottom: amax 2**-126 wants 2**-128 (mxfp4): clamped to 2**-127, so 2**-126 is 2
    x = np.float32(2.0**-126) * np.float32([1.0, 1.5, 1.25, 0.5])
    np.testing.assert_array_equal(q(x, "mxfp4"), np.float32(2.0**-126) * np.float32([1.0, 1.5, 1.0, 0.0]))
    # a short last block has its own scale: 33 elements, the 33rd alone
    x = np.concatenate([np.full(32, 100.0), [0.3]]).astype(np.float32)
    y = q(x, "mxfp4")
    assert y[32] == 0.25  # 0.3 / 2**-4 = 4.8 -> 4 (e2m1), times 2**-4
    assert y[0] == 96.0  # 100 / 2**4 = 6.25 -> 6 (saturates), times 2**4


@pytest.mark.parametrize("mode", ["nearest", "up"])
def test_nvfp4_two_level_reference(mode):
    x = special_data()
    x[0, 40:56] *= 1e-4  # blocks far below the tensor maximum: small e4m3 scales
    got = q(x, "nvfp4", mode)
    want = ref_float_scale(x, "e2m1", 6.0, mode, 16, scale="e4m3", two_level=True)
    assert_same(got, want)
    # with a tensor holding inf, the per-tensor scale comes from the finite values
    assert np.isfinite(got[3]).all()
    # ... including those of a block that also holds an inf (here the largest finite value)
    y = data((2, 32), seed=5, spread=2)
    y[1, 3], y[1, 5] = np.inf, 1.0e4
    assert_same(q(y, "nvfp4", mode), ref_float_scale(y, "e2m1", 6.0, mode, 16, scale="e4m3", two_level=True))


@pytest.mark.parametrize(
    "text, element, gran, axis, mode",
    [
        ("e4m3@channel", "e4m3", "channel", -1, "nearest"),
        ("e4m3@channel:axis=0", "e4m3", "channel", 0, "toward_zero"),
        ("e2m1@tensor", "e2m1", "tensor", -1, "nearest_away"),
        ("e2m1@block8:axis=0", "e2m1", 8, 0, "down"),
    ],
)
def test_float32_scales_reference(text, element, gran, axis, mode):
    x = data((20, 70), seed=2)
    x[:, 7] = 0.0  # an all-zero channel
    emax_value = float(ml_positive_grid(element)[-1])
    assert_same(q(x, text, mode), ref_float_scale(x, element, emax_value, mode, gran, axis))


def test_stochastic_neighbours_unbiased_seeded():
    rng = np.random.default_rng(3)
    n = 4096
    x = np.empty([n, 32], np.float32)
    x[:, 0] = 6.0 * 2.0**-3  # e2m1's top, so the E8M0 scale is 2**-3 in every block
    vals = np.float32(rng.uniform(-0.75, 0.75, 31))
    x[:, 1:] = vals
    y = q(x, "mxfp4", "stochastic", seed=tf.constant([11, 0]))  # stateless: same seed, same result
    assert np.array_equal(y, q(x, "mxfp4", "stochastic", seed=tf.constant([11, 0])))
    assert not np.array_equal(y, q(x, "mxfp4", "stochastic", seed=tf.constant([12, 0])))
    lo = ref_mx(x, "e2m1", 2, "down")
    hi = ref_mx(x, "e2m1", 2, "up")
    assert np.all((y == lo) | (y == hi))
    assert np.any(y != lo) and np.any(y != hi)
    # unbiased: the mean over 4096 draws is within 4 standard errors of each value
    p = (x - lo) / np.where(hi > lo, hi - lo, 1)
    se = (hi - lo)[0] * np.sqrt(p[0] * (1 - p[0]) / n) + 1e-12
    assert np.all(np.abs(y.mean(0) - x[0]) <= 4 * se)
    # nvfp4 too: on one of the two neighbours of the nearest-mode grid
    z = data((4, 64), seed=4)
    ys = q(z, "nvfp4", "stochastic", seed=5)
    lo = ref_float_scale(z, "e2m1", 6.0, "down", 16, scale="e4m3", two_level=True)
    hi = ref_float_scale(z, "e2m1", 6.0, "up", 16, scale="e4m3", two_level=True)
    assert np.all((ys == lo) | (ys == hi))


# ----------------------------------------------------------------------------
# the op: gradient, dtypes, XLA, graphs
# ----------------------------------------------------------------------------
def test_gradient_straight_through_and_dtypes():
    x = tf.constant(data((2, 40)))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = gq.quantize(x, "nvfp4")
        loss = tf.reduce_sum(y * 3.0)
    g = tape.gradient(loss, x).numpy()
    np.testing.assert_array_equal(g, np.full(g.shape, 3.0, np.float32))  # saturated maxima included
    assert y.dtype == tf.float32
    h = gq.quantize(tf.cast(x, tf.bfloat16), "mxfp8_e4m3")
    assert h.dtype == tf.bfloat16
    np.testing.assert_array_equal(
        h.numpy().astype(np.float32), q(tf.cast(tf.cast(x, tf.bfloat16), tf.float32).numpy(), "mxfp8_e4m3")
    )


def test_same_with_and_without_xla_and_in_a_function():
    x = special_data()
    for name in ("nvfp4", "e4m3@channel", "mxfp6_e2m3"):
        eager = q(x, name, "nearest")
        with use_xla(False):
            plain = q(x, name, "nearest")
        fn = tf.function(lambda t: gq.quantize(t, name, "nearest"))
        assert_same(plain, eager)
        assert_same(fn(tf.constant(x)).numpy(), eager)


def test_quantize_model_blocks_weights_along_the_reduction_axis():
    import keras

    cfg = gq.QuantizeConfig.create(format="mxfp4", weights=True)
    assert cfg.weight_format_for(-1) == Scaled("e2m1", 32, -2, "e8m0")  # Dense/Conv: the input channels
    assert cfg.weight_format_for(-2).axis == -1  # transposed convolutions
    assert gq.QuantizeConfig.create(format="e4m3@channel").weight_format_for(-2).axis == -2  # output channels
    inp = keras.Input((6, 6, 40))
    model = keras.Model(inp, keras.layers.Conv2D(6, 3, name="conv_mx")(inp))
    x = data((2, 6, 6, 40), seed=6, spread=2)
    qm = gq.quantize_model(model, format="mxfp4", weights=True)
    y, y0 = np.asarray(qm(x)), np.asarray(model(x))
    assert np.isfinite(y).all() and not np.array_equal(y, y0)
    assert np.abs(y - y0).max() < 0.5 * np.abs(y0).max()


def test_depthwise_and_transposed_kernels_blocked_along_their_reduction():
    """Depthwise kernels (kh, kw, in, mult): blocks over each output channel's spatial taps
    (the kernel seen as (taps, in * mult)); transposed kernels (kh, kw, out, in): blocks
    along the input channels (-1); per channel: one scale per output channel."""
    import keras

    cfg = gq.QuantizeConfig.create(format="mxfp4", weights=True)
    assert cfg.weight_format_for(-2, depthwise=True).axis == -2  # taps of the (taps, outputs) matrix
    assert gq.QuantizeConfig.create(format="e4m3@channel").weight_format_for(-2, depthwise=True).axis == -1
    # a Scaled weight_format is placed the same way, whatever its own axis
    wcfg = gq.QuantizeConfig.create(format="e4m3", weight_format="e2m1@block32:axis=0:scale=e8m0")
    assert wcfg.weight_format_for(-1) == Scaled("e2m1", 32, -2, "e8m0")

    inp = keras.Input((5, 5, 4))
    h = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw_mx")(inp)
    out = keras.layers.Conv2DTranspose(3, 2, strides=2, name="up_mx")(h)
    model = keras.Model(inp, out)
    rng = np.random.default_rng(8)
    for layer in model.layers[1:]:
        layer.set_weights([(rng.standard_normal(w.shape) * np.exp2(rng.integers(-3, 3, w.shape))).astype("float32")
                           for w in layer.get_weights()])
    plan = gq.inspect(model, format="mxfp4", weights=True, activations=False)
    fmts = {p.target: p.format for p in plan.points if p.what == "weights"}
    assert fmts == {"dw_mx": Scaled("e2m1", 32, -2, "e8m0"), "up_mx": Scaled("e2m1", 32, -1, "e8m0")}

    dw, up = model.get_layer("dw_mx").kernel.numpy(), model.get_layer("up_mx").kernel.numpy()
    dw_ref = ref_mx(dw.reshape(9, 8), "e2m1", 2, "nearest", axis=0).reshape(dw.shape)
    up_ref = ref_mx(up, "e2m1", 2, "nearest", axis=-1)
    # the reference is not what the other axes would give
    assert not np.array_equal(dw_ref, ref_mx(dw, "e2m1", 2, "nearest", axis=-1))
    assert not np.array_equal(up_ref, ref_mx(up, "e2m1", 2, "nearest", axis=-2))
    x = data((2, 5, 5, 4), seed=9, spread=2)
    qm = gq.quantize_model(model, format="mxfp4", weights=True, activations=False)
    ref = keras.models.clone_model(model)
    ref.set_weights(model.get_weights())
    ref.get_layer("dw_mx").kernel.assign(dw_ref)
    ref.get_layer("up_mx").kernel.assign(up_ref)
    np.testing.assert_allclose(np.asarray(qm(x)), np.asarray(ref(x)), rtol=1e-6, atol=1e-6)


def test_weights_mostly_rounded_to_zero_are_warned_about(caplog):
    """e2m1 without a scale wipes out weights of size ~0.1 (its smallest nonzero value is 0.5):
    quantize_model names the layer and suggests a scaled format; mxfp4 keeps them, no warning."""
    import warnings

    import keras

    inp = keras.Input((6, 6, 4))
    model = keras.Model(inp, keras.layers.Conv2D(8, 3, name="small_conv")(inp))
    k = model.get_layer("small_conv").kernel
    k.assign(np.random.default_rng(3).normal(0.0, 0.1, k.shape).astype("float32"))
    with pytest.warns(UserWarning, match=r"'small_conv' \(Conv2D.kernel\): 9\d% of its nonzero weights round to zero "
                                         r"on e2m1.*'mxfp4' or 'nvfp4'") as rec:
        qm = gq.quantize_model(model, format="e2m1", weights=True)
    assert sum("round to zero" in str(w.message) for w in rec) == 1
    assert any("small_conv" in n for n in qm._graphquant_plan.notes) and "round to zero" in caplog.text
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails
        gq.quantize_model(model, format="mxfp4", weights=True)


def test_nvfp4_model_saves_and_loads(tmp_path):
    """quantize_model(format="nvfp4", weights=True) -> .keras -> load_model: same formats, same outputs."""
    import keras

    from graphquant.keras import Quantize, QuantizeWeights

    inp = keras.Input((6, 6, 20))
    h = keras.layers.Conv2D(24, 3, padding="same", activation="relu", name="c_nv")(inp)
    out = keras.layers.DepthwiseConv2D(3, name="dw_nv")(h)
    qm = gq.quantize_model(keras.Model(inp, out), format="nvfp4", weights=True, seed=1)
    x = data((2, 6, 6, 20), seed=4, spread=2)
    y = np.asarray(qm(x))
    qm.save(tmp_path / "nv.keras")
    back = keras.models.load_model(tmp_path / "nv.keras")
    np.testing.assert_array_equal(np.asarray(back(x)), y)
    wfmts = {l.name: l.slots[0]["format"] for l in back.layers if isinstance(l, QuantizeWeights)}
    nv = gq.SCALED_PRESETS["nvfp4"]
    assert wfmts == {"c_nv": Scaled(nv.element, 16, -2, nv.scale_format, True),
                     "dw_nv": Scaled(nv.element, 16, -2, nv.scale_format, True)}
    assert {str(l.format) for l in back.layers if isinstance(l, Quantize)} == {"nvfp4"}
