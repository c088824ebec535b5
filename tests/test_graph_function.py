"""quantize_function on hand-written tf.functions (real TF, no mocks)."""

import numpy as np
import pytest
import tensorflow as tf

import graphquant.graph as gg
from graphquant.formats import FixedPoint


def _make():
    rng = np.random.RandomState(0)
    w1 = tf.Variable(rng.normal(size=(3, 3, 2, 4)).astype("float32"))
    b1 = tf.Variable(rng.normal(size=(4,)).astype("float32"))
    w2 = tf.constant(rng.normal(size=(1, 1, 4, 3)).astype("float32"))

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 2], tf.float32)])
    def f(x):
        y = tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(x, w1, 1, "SAME"), b1))
        z = tf.nn.conv2d(y, w2, 1, "SAME")
        return {"y": y, "z": z, "sum": tf.reduce_sum(z)}

    return f, w1


X = np.random.RandomState(1).normal(size=(2, 8, 8, 2)).astype("float32")


def test_fixed_point_grid_and_structure():
    f, _ = _make()
    qf = gg.quantize_function(f, bits=8, range=(0.0, 4.0))
    assert len(qf.plan.activations) == 2
    assert [p.group for p in qf.plan.activations][0][-1] == "Relu"  # fused group conv > bias > relu
    assert all("graphquant" in n for n in qf.inserted) and len(qf.inserted) == 2
    out = qf(X)
    assert set(out) == {"y", "z", "sum"}
    step = FixedPoint(8, (0.0, 4.0)).step
    y = out["y"].numpy()
    assert np.allclose(y / step, np.round(y / step), atol=1e-4)
    assert y.max() <= 4.0 - step + 1e-6
    ref = f(X)
    assert not np.allclose(out["z"].numpy(), ref["z"].numpy())


def test_variables_keep_working_and_calibration():
    f, w1 = _make()
    qf = gg.quantize_function(f, bits=8, calibration_data=X)
    assert qf.ranges and all(lo <= 0.0 <= hi for lo, hi in qf.ranges.values())
    a = qf(X)["y"].numpy()
    ref = f(X)["y"].numpy()
    assert np.abs(a - ref).max() < (ref.max() / 255) * 0.51 + 1e-6
    w1.assign(w1 * 0.5)
    b = qf(X)["y"].numpy()
    assert not np.allclose(a, b)


def test_weights_and_float_format():
    f, _ = _make()
    qf = gg.quantize_function(f, format="e4m3", weights=True)
    kinds = [p.what for p in qf.plan.points]
    assert kinds.count("weights") == 2
    # the variable filter is rounded at run time (one node), the constant one pre-rounded (no node)
    assert sum("/w" in n for n in qf.inserted) == 1
    z = qf(X)["z"].numpy()
    assert np.all(np.isfinite(z))


def test_bad_inputs():
    @tf.function
    def g(x):
        return x

    with pytest.raises(TypeError, match="input_signature"):
        gg.quantize_function(g, bits=8)
    with pytest.raises(TypeError, match="fn"):
        gg.quantize_function(lambda x: x, bits=8)
    f, _ = _make()
    with pytest.raises(ValueError, match="rounding"):
        gg.quantize_function(f, bits=8, rounding="sideways")
    with pytest.raises(ValueError, match="calibration_data= has nothing to calibrate"):
        gg.quantize_function(f, bits=8, range=(0.0, 6.0), calibration_data=[X])
    with pytest.raises(ValueError, match="calibration_method='percentile' needs calibration_data"):
        gg.quantize_function(f, bits=8, calibration_method="percentile")


def _per_output_channel_rounded(k, bits=8):
    """Oracle for a depthwise filter (kh, kw, in, multiplier): symmetric narrow-range rounding with one scale
    per output channel (in, multiplier)."""
    step = np.abs(k).max(axis=(0, 1), keepdims=True) / (2 ** (bits - 1) - 1)
    return (np.round(k / step) * step).astype("float32")


def test_depthwise_multiplier_rounds_per_output_channel():
    """DepthwiseConv2dNative with channel multiplier 2: a variable filter (rounded at run time) and a constant
    one (pre-rounded once) both get one weight scale per output channel."""
    rng = np.random.RandomState(7)
    kv = rng.normal(size=(3, 3, 2, 2)).astype("float32")
    kv[..., 1] *= 0.01  # multiplier 1 is 100x smaller: with a scale shared per input channel it would round to ~0
    kc = rng.normal(size=(3, 3, 4, 2)).astype("float32")
    kc[..., 0] *= 0.01
    wv = tf.Variable(kv)

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 2], tf.float32)])
    def f(x):
        y = tf.nn.depthwise_conv2d(x, wv, [1, 1, 1, 1], "SAME")
        return {"z": tf.nn.depthwise_conv2d(y, tf.constant(kc), [1, 1, 1, 1], "SAME")}

    qf = gg.quantize_function(f, bits=8, weights=True, activations=False)
    assert len(qf.plan.weights) == 2
    y = tf.nn.depthwise_conv2d(X, _per_output_channel_rounded(kv), [1, 1, 1, 1], "SAME")
    want = tf.nn.depthwise_conv2d(y, _per_output_channel_rounded(kc), [1, 1, 1, 1], "SAME").numpy()
    np.testing.assert_allclose(qf(X)["z"].numpy(), want, rtol=1e-5, atol=1e-6)


def test_depthwise_multiplier_in_a_saved_model_checkpoint(tmp_path):
    """convert_saved_model rounds variable filters in the checkpoint: per output channel there too."""
    rng = np.random.RandomState(8)
    k = rng.normal(size=(3, 3, 2, 2)).astype("float32")
    k[..., 0] *= 0.01

    class M(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(k)

        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 2], tf.float32, name="x")])
        def serve(self, x):
            return {"z": tf.nn.depthwise_conv2d(x, self.w, [1, 1, 1, 1], "SAME")}

    m = M()
    tf.saved_model.save(m, str(tmp_path / "src"), signatures=m.serve)
    rep = gg.convert_saved_model(tmp_path / "src", tmp_path / "dst", bits=8, weights=True, activations=False)
    assert rep.prerounded == 1
    got = tf.saved_model.load(str(tmp_path / "dst")).signatures["serving_default"](x=tf.constant(X))["z"].numpy()
    want = tf.nn.depthwise_conv2d(X, _per_output_channel_rounded(k), [1, 1, 1, 1], "SAME").numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_default_bits_and_config_like_quantize_model():
    """Issue 16: no bits/format is bits=8 (as in quantize_model); config= takes a QuantizeConfig."""
    from graphquant.plan import QuantizeConfig

    f, _ = _make()
    q8 = gg.quantize_function(f, bits=8)
    q0 = gg.quantize_function(f)
    qc = gg.quantize_function(f, config=QuantizeConfig.create(8))
    assert q0.plan.to_dict() == q8.plan.to_dict() == qc.plan.to_dict()
    ref = q8(X)
    for q in (q0, qc):
        out = q(X)
        for k in ref:
            np.testing.assert_array_equal(out[k].numpy(), ref[k].numpy())
    e4 = gg.quantize_function(f, config=QuantizeConfig.create(format="e4m3"))
    assert {str(p.format) for p in e4.plan.activations} == {"e4m3"}
    with pytest.raises(TypeError, match="config must be a graphquant.QuantizeConfig, got dict"):
        gg.quantize_function(f, config={"bits": 8})
    with pytest.raises(ValueError, match=r"config= or keyword options, not both \(got \['bits'\]\)"):
        gg.quantize_function(f, bits=4, config=QuantizeConfig.create(8))


def test_no_convolution_warns():
    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
    def double(x):
        return x * 2.0

    with pytest.warns(UserWarning, match="no convolution matched the quantization patterns") as rec:
        qd = gg.quantize_function(double, bits=8)
    assert [w.filename for w in rec if "no convolution" in str(w.message)] == [__file__]  # at the caller
    assert not qd.inserted
    np.testing.assert_array_equal(qd(np.ones((1, 4), "float32")).numpy(), np.full((1, 4), 2.0))
