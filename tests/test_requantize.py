"""Quantizing an already quantized model (issue 11 item 10): refused unless asked, then said so."""

import os
import shutil
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from graphquant.graph import convert_saved_model, quantize_function
from graphquant.keras import Quantize, quantize_model

X = np.random.RandomState(1).normal(size=(2, 6, 6, 1)).astype("float32")
W = np.random.RandomState(0).normal(size=(3, 3, 1, 2)).astype("float32")


def grid(y, step, levels):
    """fixed-point onto ``levels`` steps of ``step`` from 0 (range (0, step * levels))."""
    return np.clip(np.round(y / step), 0, levels - 1) * step


def float_y():
    return np.maximum(tf.nn.conv2d(X, W, 1, "SAME").numpy(), 0)


class Tiny(tf.Module):
    def __init__(self):
        super().__init__()
        self.w = tf.Variable(W)

    @tf.function(input_signature=[tf.TensorSpec([None, 6, 6, 1], tf.float32, name="x")])
    def serve(self, x):
        return {"y": tf.nn.relu(tf.nn.conv2d(x, self.w, 1, "SAME"))}


@pytest.fixture(scope="module")
def quantized_sm(tmp_path_factory):
    d = tmp_path_factory.mktemp("rq")
    m = Tiny()
    tf.saved_model.save(m, str(d / "float"), signatures=m.serve)
    rep = convert_saved_model(d / "float", d / "q4", bits=4, range=(0, 4))
    assert rep.inserted == 1 and rep.requantized == 0
    return d


def serve(path):
    return tf.saved_model.load(str(path)).signatures["serving_default"](x=tf.constant(X))["y"].numpy()


def test_saved_model_requantize_refused_then_allowed(quantized_sm, tmp_path):
    with pytest.raises(ValueError, match=r"already quantized \(1 graphquant rounding nodes\).*allow_requantize=True"):
        convert_saved_model(quantized_sm / "q4", tmp_path / "again", bits=4, range=(0, 4))
    assert not (tmp_path / "again").exists()
    # with allow_requantize: 3 bits over (0, 4) first, then the existing 4-bit rounding
    rep = convert_saved_model(quantized_sm / "q4", tmp_path / "again", bits=3, range=(0, 4), allow_requantize=True)
    assert rep.requantized == 1 and rep.inserted == 1
    assert any("already quantized" in w for w in rep.warnings)
    assert any(n.startswith("requantized") for n in rep.plan.notes)
    assert rep.to_dict()["requantized"] == 1 and "requantized" in str(rep)
    out = serve(tmp_path / "again")
    np.testing.assert_allclose(out, grid(grid(float_y(), 0.5, 8), 0.25, 16), atol=1e-6)
    assert np.abs(out - serve(quantized_sm / "q4")).max() > 0.1


def test_function_requantize_refused_then_allowed():
    f = tf.function(lambda x: tf.nn.relu(tf.nn.conv2d(x, W, 1, "SAME")),
                    input_signature=[tf.TensorSpec([None, 6, 6, 1])], autograph=False)
    qf = quantize_function(f, bits=4, range=(0, 4))
    with pytest.raises(ValueError, match=r"already quantized \(1 graphquant rounding nodes\).*allow_requantize=True"):
        quantize_function(qf.function, bits=3, range=(0, 4))
    qq = quantize_function(qf.function, bits=3, range=(0, 4), allow_requantize=True)
    assert any(n.startswith("requantized") for n in qq.plan.notes)
    np.testing.assert_allclose(qq(X).numpy(), grid(grid(float_y(), 0.5, 8), 0.25, 16), atol=1e-6)


def test_keras_requantize_refused_then_allowed():
    keras.utils.set_random_seed(0)
    i = keras.Input((6, 6, 1))
    conv = keras.layers.Conv2D(2, 3, padding="same", use_bias=False, activation="relu")
    m = keras.Model(i, conv(i))
    conv.set_weights([W])
    q = quantize_model(m, bits=4, range=(0, 4))
    with pytest.raises(ValueError, match=r"already quantized \(1 graphquant rounding layers\).*allow_requantize=True"):
        quantize_model(q, bits=3, range=(0, 4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qq = quantize_model(q, bits=3, range=(0, 4), allow_requantize=True)
    assert any("already quantized" in str(w.message) for w in caught)
    assert sum(isinstance(l, Quantize) for l in qq.layers) == 2
    assert any(n.startswith("requantized") for n in qq._graphquant_plan.notes)
    out = np.asarray(qq(X, training=False))
    np.testing.assert_allclose(out, grid(grid(float_y(), 0.5, 8), 0.25, 16), atol=1e-6)


def run(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "graphquant", *args], capture_output=True, text=True, env=env, timeout=300)


def test_cli_convert_and_batch_need_force(quantized_sm, tmp_path):
    p = run("convert", str(quantized_sm / "q4"), str(tmp_path / "c"), "--bits", "3", "--range", "0", "4")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    lines = [l for l in p.stderr.splitlines() if l.startswith("graphquant")]
    assert len(lines) == 1 and lines[0].startswith("graphquant convert: error:") and "--force" in lines[0], p.stderr
    p = run("convert", str(quantized_sm / "q4"), str(tmp_path / "c"), "--bits", "3", "--range", "0", "4", "--force")
    assert p.returncode == 0, p.stderr
    assert "already quantized" in p.stderr and "requantized" in p.stdout
    np.testing.assert_allclose(serve(tmp_path / "c"), grid(grid(float_y(), 0.5, 8), 0.25, 16), atol=1e-6)
    # batch: the quantized model fails without --force, converts with it
    shutil.copytree(quantized_sm / "q4", tmp_path / "root" / "q4")
    p = run("batch", str(tmp_path / "root"), str(tmp_path / "b"), "--bits", "3", "--range", "0", "4", "--no-progress")
    assert p.returncode == 1 and "--force" in p.stderr, p.stderr
    p = run("batch", str(tmp_path / "root"), str(tmp_path / "b2"), "--bits", "3", "--range", "0", "4", "--no-progress",
            "--force")
    assert p.returncode == 0 and "1 converted" in p.stdout, p.stderr
