"""Bad calibration data and silently accepted options: the Keras and SavedModel paths side by side.

Each case raises one ValueError/TypeError naming the argument (and the point
or input), the same way on both paths; non-finite values are ignored and counted.
"""

import logging
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import graphquant as gq
import graphquant.graph as gg
from graphquant.keras.layers import Quantize
from graphquant.ranges import MinMaxTracker, PercentileTracker  # noqa: F401 (old code has both)

RNG = np.random.RandomState(0)
W = RNG.normal(size=(3, 3, 1, 2)).astype("float32")
X = RNG.normal(size=(8, 6, 6, 1)).astype("float32")


class Tiny(tf.Module):
    """conv > relu with input 'x' of shape (None, 6, 6, 1), the same weights as the Keras model."""

    def __init__(self):
        super().__init__()
        self.w = tf.Variable(W)

    @tf.function(input_signature=[tf.TensorSpec([None, 6, 6, 1], tf.float32, name="x")])
    def serve(self, x):
        return {"y": tf.nn.relu(tf.nn.conv2d(x, self.w, 1, "SAME", name="conv"))}


def _keras_model():
    x = keras.Input((6, 6, 1), name="x")
    conv = keras.layers.Conv2D(2, 3, padding="same", use_bias=False, name="conv")
    y = keras.layers.ReLU(name="relu")(conv(x))
    m = keras.Model(x, y, name="tiny")
    conv.set_weights([W])
    return m


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad") / "tiny"
    m = Tiny()
    tf.saved_model.save(m, str(d), signatures=m.serve)
    return d


@pytest.fixture(params=["keras", "saved_model"])
def front(request, saved, tmp_path):
    """``quantize(**kw) -> (predict, ranges)`` on one path; ``point`` names the calibrated point there."""
    if request.param == "keras":
        model = _keras_model()

        def quantize(**kw):
            q = gq.quantize_model(model, **kw)
            ranges = {l.name: l.get_range() for l in q.layers if isinstance(l, Quantize)}
            return (lambda x: np.asarray(q(x, training=False))), ranges

        quantize.point = "'relu_quant'"  # the Quantize layer after the group (named after its last layer)
    else:
        out = tmp_path / "out"

        def quantize(**kw):
            report = gg.convert_saved_model(saved, out, overwrite=True, **kw)
            fn = tf.saved_model.load(str(out)).signatures["serving_default"]
            return (lambda x: fn(x=tf.constant(x))["y"].numpy()), report.ranges

        quantize.point = "serve"  # the path of the point: <function>/Relu
    quantize.kind = request.param
    return quantize


# --------------------------------------------------------------------------- 11: non-finite and empty data
def test_all_nan_data_names_the_point(front):
    with pytest.raises(ValueError, match="calibration_data: .*no finite value") as e:
        front(bits=8, calibration_data=np.full_like(X, np.nan))
    assert front.point in str(e.value) and "NaN or inf" in str(e.value)


@pytest.mark.parametrize("data", [np.zeros((0, 6, 6, 1), "float32"), []], ids=["zero-rows", "no-batches"])
def test_empty_data_is_an_error(front, data):
    with pytest.raises(ValueError, match="calibration_data is empty"):
        front(bits=8, calibration_data=data)


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_inf_is_ignored_like_nan(front, method, caplog):
    """One inf learns the same range as a NaN in its place (both ignored), predictions stay finite."""
    with_inf, with_nan = X.copy(), X.copy()
    with_inf[0, 2, 2, 0], with_nan[0, 2, 2, 0] = np.inf, np.nan
    with caplog.at_level(logging.WARNING, logger="graphquant"):
        predict, r_inf = front(bits=8, calibration_data=with_inf, calibration_method=method)
    assert any("non-finite values ignored at" in r.getMessage() and front.point in r.getMessage() for r in caplog.records)
    _, r_nan = front(bits=8, calibration_data=with_nan, calibration_method=method)
    _, r_clean = front(bits=8, calibration_data=X[1:], calibration_method=method)
    (lo, hi), = r_inf.values()
    assert np.isfinite(lo) and np.isfinite(hi) and float(hi) > 0
    # relu turns some -inf into 0, which a NaN does not become: percentiles move a little
    np.testing.assert_allclose([lo, hi], next(iter(r_nan.values())), rtol=0 if method == "minmax" else 1e-3)
    if method == "minmax":  # only sample 0 sees the inf; the other samples still set the max
        assert float(hi) >= float(next(iter(r_clean.values()))[1])
    assert np.isfinite(predict(X)).all()


def test_keras_and_saved_model_learn_the_same_percentile_range(saved, tmp_path):
    """Both paths: the percentile of all values seen, from one histogram (before the engine, the Keras
    path took the mean of per-batch percentiles and the graph path their envelope); batches of
    different scales, where those disagreed."""
    batches = [X[:4], X[4:] * 3.0]
    q = gq.quantize_model(_keras_model(), bits=8, calibration_data=batches, calibration_method="percentile")
    r_k = {l.name: l.get_range() for l in q.layers if isinstance(l, Quantize)}
    report = gg.convert_saved_model(saved, tmp_path / "q", bits=8, calibration_data=batches, calibration_method="percentile")
    (lo_k, hi_k), = r_k.values()
    (lo_g, hi_g), = report.ranges.values()
    np.testing.assert_allclose([lo_k, hi_k], [lo_g, hi_g], rtol=2e-7, atol=0)


def test_calibrate_later_empty_and_nan():
    q = gq.quantize_model(_keras_model(), bits=8)
    with pytest.raises(ValueError, match="data is empty"):
        gq.calibrate(q, X[:0])
    with pytest.raises(ValueError, match="data: 'relu_quant': no finite value"):
        gq.calibrate(q, np.full_like(X, np.nan), method="percentile")


def test_quantize_function_empty_and_nan():
    m = Tiny()
    with pytest.raises(ValueError, match="calibration_data is empty"):
        gg.quantize_function(m.serve, bits=8, calibration_data=X[:0])
    with pytest.raises(ValueError, match="calibration_data: '.*Relu': no finite value"):
        gg.quantize_function(m.serve, bits=8, calibration_data=np.full_like(X, np.inf))


def test_trackers_ignore_and_count_non_finite():
    x = np.array([1.0, -2.0, np.inf, np.nan, 3.0], "float32")
    for t in (MinMaxTracker(), PercentileTracker(100.0)):
        t.update(x)
        assert t.nonfinite == 2 and t.seen == 5
        lo, hi = t.result()
        assert (float(lo), float(hi)) == (-2.0, 3.0)
    t = MinMaxTracker(axis=-1)  # per channel: channel 1 never finite
    t.update(np.array([[1.0, np.nan], [2.0, np.inf]], "float32"))
    with pytest.raises(ValueError, match=r"'c': no finite value in channel\(s\) \[1\]"):
        t.result("'c'")
    t = MinMaxTracker()
    t.update(np.zeros(4, "float32"))  # a zero range is widened to MIN_RANGE_WIDTH
    np.testing.assert_allclose(t.result(), (0.0, 1e-6))


# --------------------------------------------------------------------------- 12: shapes and dtypes
def test_wrong_shape_one_line(front):
    with pytest.raises(ValueError) as e:
        front(bits=8, calibration_data=np.zeros((4, 5, 5, 1), "float32"))
    assert str(e.value) == "calibration_data: input 'x' expects shape (None, 6, 6, 1), got (4, 5, 5, 1)"


def test_wrong_rank(front):
    with pytest.raises(ValueError, match=r"input 'x' expects shape \(None, 6, 6, 1\), got \(4, 36\)"):
        front(bits=8, calibration_data=np.zeros((4, 36), "float32"))


def test_wrong_dtype(front):
    with pytest.raises(ValueError, match="calibration_data: input 'x' expects dtype float32, got string"):
        front(bits=8, calibration_data=np.full((4, 6, 6, 1), "a"))


def test_unknown_input_name(front):
    # names the inputs the model takes with their shapes (a batch of many models reports this per model)
    with pytest.raises(ValueError, match=r"calibration_data: input 'x' is missing \(the model takes 'x' \(None, 6, 6, 1\); "
                                         r"got \['image'\]\)$"):
        front(bits=8, calibration_data={"image": X})


class TwoInputs(tf.Module):
    def __init__(self):
        super().__init__()
        self.w = tf.Variable(W)

    @tf.function(input_signature=[tf.TensorSpec([None, 6, 6, 1], tf.float32, name="a"),
                                  tf.TensorSpec([None, 1], tf.float32, name="b")])
    def serve(self, a, b):
        return {"y": tf.nn.relu(tf.nn.conv2d(a, self.w, 1, "SAME")) + b[:, :, None, None]}


def test_one_array_for_two_inputs_names_their_shapes(tmp_path):
    m = TwoInputs()
    tf.saved_model.save(m, str(tmp_path / "two"), signatures=m.serve)
    with pytest.raises(ValueError) as e:
        gg.convert_saved_model(tmp_path / "two", tmp_path / "out", bits=8, calibration_data=X)
    assert str(e.value) == ("calibration_data: signature 'serving_default' takes 'a' (None, 6, 6, 1), 'b' (None, 1), "
                            "got one array (8, 6, 6, 1); pass a dict of arrays")


def test_quantize_function_wrong_shape():
    m = Tiny()
    with pytest.raises(ValueError) as e:
        gg.quantize_function(m.serve, bits=8, calibration_data=np.zeros((4, 5, 5, 1), "float32"))
    assert str(e.value) == "calibration_data: input 'x' expects shape (None, 6, 6, 1), got (4, 5, 5, 1)"


def test_cli_wrong_shape_one_line(saved, tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((4, 5, 5, 1), "float32"))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    p = subprocess.run([sys.executable, "-m", "graphquant", "convert", str(saved), str(tmp_path / "out"), "--bits", "8",
                        "--calibration", str(bad)], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 1
    assert "Traceback" not in p.stderr
    lines = [l for l in p.stderr.splitlines() if l.startswith("graphquant")]  # TensorFlow's C++ log lines aside
    assert lines == ["graphquant convert: error: calibration_data: input 'x' expects shape (None, 6, 6, 1), got (4, 5, 5, 1)"]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# --------------------------------------------------------------------------- 14: options accepted silently
def test_unknown_override_key_names_closest(front):
    with pytest.raises(ValueError, match=r"overrides: 'no_such_layer' matches no layer or node"):
        front(bits=8, overrides={"no_such_layer": {"bits": 4}})
    with pytest.raises(ValueError, match=r"overrides: 'convv' matches no layer or node.*closest: 'conv'"):
        front(bits=8, overrides={"convv": {"bits": 4}})
    with pytest.raises(ValueError, match=r"overrides: 'class:Conv2DD' .*closest: 'Conv2D'"):
        front(bits=8, overrides={"class:Conv2DD": None})
    # keys that match still work: regex on the name, class selector
    predict, _ = front(bits=8, overrides={"con.": {"bits": 4, "range": (0.0, 4.0)}})
    assert np.isfinite(predict(X)).all()
    front(bits=8, overrides={"class:Conv2D": {"rounding": "down"}})


def test_bits_with_format_is_an_error(front):
    with pytest.raises(ValueError, match=r"bits=8 contradicts format='e4m3"):
        front(bits=8, format="e4m3")
    with pytest.raises(ValueError, match=r"overrides\['conv'\]: bits=4 contradicts format="):
        front(format="e4m3", overrides={"conv": {"bits": 4, "format": "e5m2"}})


def test_dense_must_be_bool(front):
    with pytest.raises(TypeError, match="dense must be a bool, got 'yes'"):
        front(bits=8, dense="yes")


def test_fold_batchnorm_must_be_bool():
    with pytest.raises(TypeError, match="fold_batchnorm must be a bool, got 'yes'"):
        gq.quantize_model(_keras_model(), bits=8, fold_batchnorm="yes")


def test_inspect_saved_model_bits_default_and_format(saved):
    assert str(gg.inspect_saved_model(saved).points[0].format) == str(gg.inspect_saved_model(saved, bits=8).points[0].format)
    assert "e4m3" in str(gg.inspect_saved_model(saved, format="e4m3").points[0].format)
    with pytest.raises(ValueError, match="bits=8 contradicts format"):
        gg.inspect_saved_model(saved, bits=8, format="e4m3")
