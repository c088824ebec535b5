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
