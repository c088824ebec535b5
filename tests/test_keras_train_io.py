"""QAT, low-precision weight storage, tf.distribute, and serialization of quantized models."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import graphquant.keras as gk
from graphquant.formats import FixedPoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, timeout=300):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), TF_CPP_MIN_LOG_LEVEL="2")
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    keras.utils.set_random_seed(0)
    m = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=4)
    x = np.random.RandomState(0).rand(32, 32, 32, 3).astype("float32")
    y = np.random.RandomState(1).randint(0, 4, size=32)
    q = gk.quantize_model(m, bits=8, weights=True, calibration_data=x[:16])
    q.compile(keras.optimizers.SGD(0.01), "sparse_categorical_crossentropy", jit_compile=False)
    k0 = q.get_layer("Conv1").layer.kernel.numpy().copy()
    r0 = q.get_layer("Conv1_relu_quant").get_range()
    hist = q.fit(x, y, batch_size=16, epochs=1, verbose=0)
    return dict(src=m, q=q, x=x, k0=k0, r0=r0, hist=hist, tmp=tmp_path_factory.mktemp("io"))


def test_qat_updates_float_weights_and_ranges(trained):
    q = trained["q"]
    assert np.isfinite(trained["hist"].history["loss"]).all()
    k1 = q.get_layer("Conv1").layer.kernel.numpy()
    assert not np.array_equal(k1, trained["k0"])
    # the trainable kernel is float (not on the 8-bit grid): straight-through updates accumulate
    step = np.abs(k1).max(axis=(0, 1, 2)) / 127
    assert np.abs(k1 / step - np.round(k1 / step)).max() > 0.01
    r1 = q.get_layer("Conv1_relu_quant").get_range()
    assert not np.allclose(r1[1], trained["r0"][1])  # EMA moved the calibrated range
    # the source model did not train
    assert not np.array_equal(trained["src"].get_layer("Conv1").kernel.numpy(), k1)


def test_keras_file_roundtrip_in_a_fresh_process(trained):
    q, x = trained["q"], trained["x"]
    path = str(trained["tmp"] / "q.keras")
    q.save(path)
    np.save(str(trained["tmp"] / "x.npy"), x[:4])
    want = q.predict(x[:4], verbose=0)
    got = _run(f"""
        import json, numpy as np, keras
        import graphquant.keras  # registration only: no custom_objects
        m = keras.models.load_model({path!r})
        y = m.predict(np.load({str(trained['tmp'] / 'x.npy')!r}), verbose=0)
        n = sum(type(l).__name__ == "Quantize" for l in m.layers)
        print(json.dumps({{"y": y.tolist(), "n": n}}))
    """)
    np.testing.assert_array_equal(np.array(got["y"], dtype="float32"), want)
    assert got["n"] == 52


def test_export_serves_same_outputs(trained):
    q, x = trained["q"], trained["x"]
    path = str(trained["tmp"] / "served")
    q.export(path, verbose=False)
    served = tf.saved_model.load(path)
    np.testing.assert_allclose(served.serve(tf.constant(x[:4])).numpy(), q.predict(x[:4], verbose=0), atol=1e-6)


def _xla_functions(saved_model_dir):
    """Names of functions in a SavedModel that must be compiled by XLA."""
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    with open(os.path.join(saved_model_dir, "saved_model.pb"), "rb") as f:
        sm.ParseFromString(f.read())
    names = []
    for mg in sm.meta_graphs:
        for fn in mg.graph_def.library.function:
            attr = fn.attr.get("_XlaMustCompile")
            if attr is not None and attr.b:
                names.append(fn.signature.name)
    return names


def test_export_without_xla_is_plain_tensorflow(trained):
    """use_xla(False) while exporting: no XLA-compiled functions (TF Serving's default
    build has no XLA JIT), TensorFlow's FakeQuant ops, the same outputs."""
    import graphquant as gq

    q, x = trained["q"], trained["x"]
    with_xla, without = str(trained["tmp"] / "served_xla"), str(trained["tmp"] / "served_plain")
    q.export(with_xla, verbose=False)
    with gq.use_xla(False):
        q.export(without, verbose=False)
    assert gq.rounding.xla_enabled()  # restored after the block
    assert _xla_functions(with_xla)  # the default rounds weights with fused XLA kernels
    assert _xla_functions(without) == []
    graph = open(os.path.join(without, "saved_model.pb"), "rb").read()
    assert b"FakeQuantWithMinMaxVarsPerChannel" in graph and b"FakeQuantWithMinMaxVars" in graph
    la, lb = tf.saved_model.load(with_xla), tf.saved_model.load(without)  # keep them: they own the variables
    np.testing.assert_array_equal(la.serve(tf.constant(x[:4])).numpy(), lb.serve(tf.constant(x[:4])).numpy())


def _storage_run(rounding, epochs=8):
    keras.utils.set_random_seed(0)
    rs = np.random.RandomState(0)
    x = rs.uniform(-1, 1, size=(256, 8, 1)).astype("float32")
    w_true = rs.uniform(0.3, 0.6, size=(8, 1)).astype("float32")
    y = (x[:, :, 0] @ w_true).astype("float32")
    m = keras.Sequential([keras.Input((8, 1)), keras.layers.Conv1D(1, 8, kernel_initializer="zeros"), keras.layers.Flatten()])
    fmt = FixedPoint(16, (-128.0, 128.0))  # 16-bit fixed point, 8 fraction bits
    q = gk.quantize_model(m, format="float16", weight_storage=fmt, storage_rounding=rounding)
    q.compile(keras.optimizers.SGD(0.004), "mse")
    loss0 = float(q.evaluate(x, y, verbose=0))
    # every batch is the whole data set: no gradient noise, so each update is below half a step
    reps = 50
    h = q.fit(np.tile(x, (reps, 1, 1)), np.tile(y, (reps, 1)), batch_size=256, epochs=epochs, shuffle=False, verbose=0)
    k = q.layers[0].kernel.numpy()
    return loss0, h.history["loss"][-1], k, fmt.step


def test_weight_storage_stochastic_trains_nearest_stalls():
    l0, ln, kn, step = _storage_run("nearest")
    s0, ls, ks, _ = _storage_run("stochastic")
    np.testing.assert_array_equal(kn / step, np.round(kn / step))  # weights live on the storage grid
    np.testing.assert_array_equal(ks / step, np.round(ks / step))
    assert ln == pytest.approx(l0, rel=1e-3)  # every update is below half a step: nearest loses them all
    assert ls < 0.3 * s0  # stochastic rounding keeps them in expectation


def test_weight_storage_survives_a_keras_file(tmp_path):
    """The storage rounding is each layer's constraint argument too, so a reloaded model keeps rounding its
    weights onto the storage grid after every update."""
    keras.utils.set_random_seed(9)
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inp)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", activation="relu")(x)
    x = keras.layers.SeparableConv2D(4, 3, padding="same")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    m = keras.Model(inp, keras.layers.Dense(2)(x))
    fmt = FixedPoint(16, (-128.0, 128.0))
    q = gk.quantize_model(m, bits=8, weights=True, weight_storage=fmt, storage_rounding="stochastic", seed=1)
    q.save(tmp_path / "s.keras")
    r = keras.models.load_model(tmp_path / "s.keras")
    assert len(r.trainable_variables) == len(q.trainable_variables) == 11  # conv 2, BN 2, depthwise 2, separable 3, dense 2
    assert all(type(v.constraint).__name__ == "StorageRounding" for v in r.trainable_variables)
    assert {v.constraint.rounding for v in r.trainable_variables} == {"stochastic"}
    xs = np.random.RandomState(0).rand(8, 8, 8, 3).astype("float32")
    np.testing.assert_array_equal(r.predict(xs, verbose=0), q.predict(xs, verbose=0))
    r.compile(keras.optimizers.SGD(0.1), "mse")
    before = [v.numpy().copy() for v in r.trainable_variables]
    r.fit(xs, np.ones((8, 2), "float32"), epochs=2, verbose=0)
    for v, b in zip(r.trainable_variables, before):
        w = v.numpy()
        np.testing.assert_array_equal(w / fmt.step, np.round(w / fmt.step))  # still on the storage grid
    assert any(not np.array_equal(v.numpy(), b) for v, b in zip(r.trainable_variables, before))  # and trained


def test_mirrored_strategy_qat_keeps_ranges_consistent():
    got = _run("""
        import json, numpy as np, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import keras, graphquant.keras as gk
        keras.utils.set_random_seed(0)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            inp = keras.Input((8, 8, 3))
            x = keras.layers.Conv2D(4, 3, padding="same")(inp)
            x = keras.layers.BatchNormalization()(x)
            x = keras.layers.ReLU()(x)
            x = keras.layers.GlobalAveragePooling2D()(x)
            m = keras.Model(inp, keras.layers.Dense(2)(x))
            q = gk.quantize_model(m, bits=8, weights=True)
            q.compile(keras.optimizers.SGD(0.01), "mse")
        rs = np.random.RandomState(0)
        xs = rs.rand(64, 8, 8, 3).astype("float32"); ys = rs.rand(64, 2).astype("float32")
        # each global batch of 16 is split in two contiguous halves, one per replica: scaling the
        # second half of every batch gives the two replicas different local ranges
        xs.reshape(4, 16, 8, 8, 3)[:, 8:] *= 3.0
        h = q.fit(xs, ys, batch_size=16, epochs=2, verbose=0, shuffle=False)
        ql = [l for l in q.layers if type(l).__name__ == "Quantize"][0]
        per_replica = [np.asarray(v).tolist() for v in ql.range.value.values]  # [min, max, initialised] each
        print(json.dumps({"replicas": strategy.num_replicas_in_sync, "ranges": per_replica,
                          "loss": h.history["loss"]}))
    """)
    assert got["replicas"] == 2
    (lo0, hi0, init0), (lo1, hi1, init1) = got["ranges"]
    assert lo0 == lo1 and hi0 == hi1 and init0 == init1 == 1.0
    assert hi0 != 6.0  # learned, not the initial range
    assert all(np.isfinite(got["loss"]))
