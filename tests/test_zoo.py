"""Issue 17: every convolution, wherever it lives.

Custom layers (and keras-hub backbones built from constructor arguments),
very deep graphs, grouped convolutions in exported graphs, and what a
SavedModel conversion counts.
"""

import importlib.util
import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import graphquant as gq
import graphquant.keras as gk
from graphquant.formats import FixedPoint
from graphquant.keras import Quantize, QuantizeWeights
from graphquant.keras.custom import QuantizedCustomLayer, QuantizedSublayer, _is_conv
from graphquant.ops import quantize

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def _flat(model):
    return list(model._flatten_layers(include_self=False, recursive=True))


def _n_quantize(model):
    return sum(1 for l in _flat(model) if isinstance(l, Quantize))


def _built_convs(model):
    """Every convolution layer of ``model`` that ran (nested anywhere, custom layers included), once."""
    seen = {}
    for l in _flat(model):
        if _is_conv(l) and not isinstance(l, QuantizeWeights) and l.built:
            seen[id(l)] = l
    return list(seen.values())


# --------------------------------------------------------------------------- custom layers
@keras.saving.register_keras_serializable(package="gq_test_zoo")
class SE(keras.layers.Layer):
    """Squeeze-excite made of two 1x1 convolutions (a custom layer nested in another)."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.reduce = keras.layers.Conv2D(max(1, filters // 2), 1, activation="relu")
        self.expand = keras.layers.Conv2D(filters, 1, activation="sigmoid")

    def call(self, x):
        s = keras.ops.mean(x, axis=(1, 2), keepdims=True)
        return x * self.expand(self.reduce(s))

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


@keras.saving.register_keras_serializable(package="gq_test_zoo")
class Block(keras.layers.Layer):
    """conv -> BN -> ReLU, then a nested SE, then a 1x1 conv -> BN (+ residual)."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.conv = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)
        self.bn = keras.layers.BatchNormalization()
        self.act = keras.layers.ReLU()
        self.se = SE(filters)
        self.project = keras.layers.Conv2D(filters, 1, use_bias=False)
        self.bn2 = keras.layers.BatchNormalization()

    def call(self, x, training=None):
        y = self.act(self.bn(self.conv(x), training=training))
        y = self.se(y)
        return x + self.bn2(self.project(y), training=training)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


@keras.saving.register_keras_serializable(package="gq_test_zoo")
class Awkward(keras.layers.Layer):
    """Convolutions graphquant cannot swap: one conv called twice, a keras.ops.conv on its own kernel."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.twice = keras.layers.Conv2D(filters, 3, padding="same")
        self.fine = keras.layers.Conv2D(filters, 1)

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(1, 1, self.filters, self.filters), name="kernel")

    def call(self, x):
        y = self.twice(self.twice(x))
        y = keras.ops.conv(y, self.kernel)
        return self.fine(y)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


@keras.saving.register_keras_serializable(package="gq_test_zoo")
class RawTF(keras.layers.Layer):
    """A convolution through tf.nn on a weight of its own (no sublayer at all)."""

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(3, 3, int(input_shape[-1]), 8), name="kernel")

    def call(self, x):
        return tf.nn.conv2d(x, self.kernel, 1, "SAME")


def _block_model(n_blocks=2, side=16, filters=8):
    keras.utils.set_random_seed(0)
    x = keras.Input((side, side, 3))
    y = keras.layers.Conv2D(filters, 3, padding="same", name="stem")(x)
    for i in range(n_blocks):
        y = Block(filters, name=f"block_{i}")(y)
    y = keras.layers.GlobalAveragePooling2D()(y)
    return keras.Model(x, keras.layers.Dense(4)(y), name="blocks")


def _data(side=16, n=4, seed=1):
    return np.random.RandomState(seed).rand(n, side, side, 3).astype("float32")


def test_custom_layers_every_convolution_is_planned_with_its_path():
    m = _block_model()
    plan = gk.inspect(m)
    assert sorted(plan.targets) == sorted([
        "stem",
        "block_0/conv", "block_0/se/reduce", "block_0/se/expand", "block_0/project",
        "block_1/conv", "block_1/se/reduce", "block_1/se/expand", "block_1/project",
    ])  # fmt: skip
    groups = {"/".join(p.scope + (p.target,)): p.group for p in plan.activations}
    assert groups["block_0/conv"] == ("conv", "bn", "act")  # BN and activation partners, in call order
    assert groups["block_0/project"] == ("project", "bn2")
    assert not plan.left_float
    table = str(plan)
    assert "block_1/se/expand" in table and "9 groups" in table


def test_custom_layers_rounded_values_and_weights():
    m = _block_model()
    q = gk.quantize_model(m, bits=8, weights=True, calibration_data=_data())
    assert _n_quantize(q) == 9
    assert sum(1 for l in _flat(q) if isinstance(l, QuantizeWeights)) == 9
    wrapped = q.get_layer("block_0")
    assert isinstance(wrapped, QuantizedCustomLayer) and isinstance(wrapped.layer, Block)
    inner = wrapped.layer
    assert isinstance(inner.act, QuantizedSublayer) and isinstance(inner.conv, QuantizedSublayer)
    assert isinstance(inner.conv.layer, QuantizeWeights) and inner.conv.quantize is None
    assert isinstance(inner.se.expand, QuantizedSublayer)  # nested custom layer: swapped in place
    # the source is untouched and the copy holds its weights
    assert isinstance(m.get_layer("block_0").conv, keras.layers.Conv2D)
    np.testing.assert_array_equal(inner.conv.layer.layer.kernel.numpy(), m.get_layer("block_0").conv.kernel.numpy())
    np.testing.assert_array_equal(inner.bn.moving_variance.numpy(),
                                  m.get_layer("block_0").bn.moving_variance.numpy())  # fmt: skip
    # the output of the ReLU inside block_0 is on the calibrated grid
    lo, hi = inner.act.quantize.get_range()
    assert hi > lo
    probe = keras.Model(q.inputs, q.get_layer("block_0").output)
    assert np.all(np.isfinite(probe.predict(_data(), verbose=0)))


def test_custom_layer_output_rounding_matches_the_op():
    """A fixed-range format: the custom block's conv->BN->ReLU output is exactly quantize(float output)."""
    keras.utils.set_random_seed(0)

    @keras.saving.register_keras_serializable(package="gq_test_zoo")
    class CBR(keras.layers.Layer):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.conv = keras.layers.Conv2D(4, 3, padding="same")
            self.act = keras.layers.ReLU()

        def call(self, x):
            return self.act(self.conv(x))

    x = keras.Input((8, 8, 3))
    m = keras.Model(x, CBR(name="cbr")(x))
    q = gk.quantize_model(m, bits=8, range=(0.0, 2.0))
    plan = q._graphquant_plan
    assert plan.targets == ["cbr/conv"] and isinstance(plan.activations[0].format, FixedPoint)
    data = _data(8) * 4 - 2
    want = quantize(tf.constant(m.predict(data, verbose=0)), plan.activations[0].format, "nearest").numpy()
    got = q.predict(data, verbose=0)
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(got)) > 3  # really rounded, not all clipped


def test_custom_layer_include_exclude_overrides_by_path():
    m = _block_model()
    plan = gk.inspect(m, exclude=["block_1/se/"], overrides={"block_0/conv": {"bits": 4}})
    assert "block_1/se/reduce" not in plan.targets and "block_1/conv" in plan.targets
    fmt = {"/".join(p.scope + (p.target,)): p.format for p in plan.activations}
    assert fmt["block_0/conv"].bits == 4 and fmt["block_1/conv"].bits == 8
    assert any(s[0] == "block_1/se/reduce" for s in plan.skipped)
    only = gk.inspect(m, include=["block_0/project"])
    assert only.targets == ["block_0/project"]
    q = gk.quantize_model(m, include=["block_0/project"])
    assert _n_quantize(q) == 1
    assert isinstance(q.get_layer("block_0"), QuantizedCustomLayer)
    assert not isinstance(q.get_layer("block_1"), QuantizedCustomLayer)  # nothing planned: a plain copy
    with pytest.raises(ValueError, match="block_9/conv"):
        gk.inspect(m, overrides={"block_9/conv": {"bits": 4}})


def test_custom_layer_keras_round_trip_and_export(tmp_path):
    m = _block_model()
    q = gk.quantize_model(m, bits=8, weights=True, calibration_data=_data())
    x = _data(seed=2)
    y = q.predict(x, verbose=0)
    q.save(tmp_path / "q.keras")
    r = keras.models.load_model(tmp_path / "q.keras")
    assert isinstance(r.get_layer("block_1").layer.se.reduce, QuantizedSublayer)
    np.testing.assert_array_equal(r.predict(x, verbose=0), y)
    q.export(str(tmp_path / "sm"), verbose=False)
    loaded = tf.saved_model.load(str(tmp_path / "sm"))  # kept: its variables live as long as it does
    served = loaded.serve(x).numpy()
    np.testing.assert_allclose(served, y, rtol=1e-5, atol=1e-6)


def test_custom_layer_training_updates_ranges():
    m = _block_model(n_blocks=1)
    q = gk.quantize_model(m, bits=8)
    q.compile("sgd", "mse")
    before = q.get_layer("block_0").layer.act.quantize.range.numpy().copy()
    q.fit(_data(), np.zeros((4, 4), "float32"), epochs=1, verbose=0)
    after = q.get_layer("block_0").layer.act.quantize.range.numpy()
    assert after[2] == 1.0 and not np.array_equal(before, after)


def test_convolutions_that_cannot_be_swapped_are_named_and_warned():
    keras.utils.set_random_seed(0)
    x = keras.Input((8, 8, 4))
    y = Awkward(4, name="awk")(x)
    y = RawTF(name="raw")(y)
    m = keras.Model(x, y)
    plan = gk.inspect(m)
    left = {p: r for p, _, r in plan.left_float}
    assert "awk/twice" in left and "called 2 times" in left["awk/twice"]
    assert any(p.startswith("awk/conv") and "keras.ops" in r for p, r in left.items())
    assert any(p.startswith("raw/") and "symbolic" in r for p, r in left.items())
    assert plan.targets == ["awk/fine"]
    assert "left in float: awk/twice (Conv2D)" in str(plan)
    assert plan.to_dict()["left_float"]
    with pytest.warns(UserWarning, match=f"{len(plan.left_float)} convolutions inside custom layers are left in float"):
        q = gk.quantize_model(m)
    assert _n_quantize(q) == 1
    np.testing.assert_allclose(q.get_layer("awk").layer.twice.kernel.numpy(), m.get_layer("awk").twice.kernel.numpy())


def test_custom_layer_inside_sequential_and_nested_model():
    keras.utils.set_random_seed(0)
    seq = keras.Sequential([keras.Input((8, 8, 8)), Block(8, name="blk")])
    assert sorted(gk.inspect(seq).targets) == ["blk/conv", "blk/project", "blk/se/expand", "blk/se/reduce"]
    x = keras.Input((8, 8, 8))
    outer = keras.Model(x, seq(x))
    q = gk.quantize_model(outer, bits=8)
    assert _n_quantize(q) == 4
    d = np.random.RandomState(0).rand(2, 8, 8, 8).astype("float32")
    assert np.all(np.isfinite(q.predict(d, verbose=0)))


# --------------------------------------------------------------------------- keras-hub
HUB = ["MobileNetBackbone", "ResNetBackbone", "CSPNetBackbone", "EfficientNetBackbone", "ViTBackbone"]


@pytest.mark.parametrize("name", HUB)
def test_keras_hub_backbone_every_convolution_rounded_or_named(name, tmp_path):
    pytest.importorskip("keras_hub")
    from _hub_models import BACKBONES

    keras.utils.set_random_seed(0)
    m = BACKBONES[name](32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = gk.quantize_model(m, bits=8, weights=True)
    plan = q._graphquant_plan
    convs = _built_convs(m)
    assert len(plan.targets) + len(plan.left_float) == len(convs), (plan.targets, plan.left_float)
    assert len(plan.targets) == len(convs)  # every one of these is rounded
    assert _n_quantize(q) == len(plan.activations)
    x = np.random.RandomState(0).rand(2, 32, 32, 3).astype("float32")
    y = q.predict(x, verbose=0)
    assert np.all(np.isfinite(y))
    if name in ("MobileNetBackbone", "ViTBackbone"):  # custom layers: the file must rebuild the swaps
        q.save(tmp_path / "q.keras")
        r = keras.models.load_model(tmp_path / "q.keras")
        assert _n_quantize(r) == _n_quantize(q)
        np.testing.assert_array_equal(r.predict(x, verbose=0), y)


def test_keras_hub_mobilenet_custom_blocks_counted():
    """The issue's case: 1 Quantize layer for a backbone whose convolutions live in custom blocks."""
    pytest.importorskip("keras_hub")
    from _hub_models import mobilenet

    plan = gk.inspect(mobilenet(32))
    inside = [t for t in plan.targets if "/" in t]
    assert len(inside) == 21 and "block_2_1/squeeze_excite/conv_reduce" in inside


# --------------------------------------------------------------------------- very deep graphs
def _deep_chain(pairs=400):
    keras.utils.set_random_seed(0)
    x = keras.Input((4, 4, 2))
    y = x
    for i in range(pairs):
        y = keras.layers.Conv2D(2, 1, name=f"conv{i}")(y)
        y = keras.layers.BatchNormalization(name=f"bn{i}")(y)
    return keras.Model(x, y, name="deep")


@pytest.fixture(scope="module")
def deep_q():
    m = _deep_chain(400)
    limit = sys.getrecursionlimit()
    q = gk.quantize_model(m, bits=8, range=(-8.0, 8.0))
    return q, limit


def test_deep_chain_quantizes_predicts_and_round_trips(deep_q, tmp_path):
    q, limit = deep_q
    assert sys.getrecursionlimit() == limit  # the raised limit was scoped
    assert _n_quantize(q) == 400 and len(q.layers) == 1201
    x = np.random.RandomState(0).rand(2, 4, 4, 2).astype("float32")
    y = q(x, training=False).numpy()  # eager: no trace of 1,201 layers
    assert np.all(np.isfinite(y))
    fmt = q._graphquant_plan.activations[-1].format
    np.testing.assert_array_equal(quantize(tf.constant(y), fmt, "nearest").numpy(), y)  # on the fixed grid
    q.save(tmp_path / "deep.keras")
    r = gk.load_model(tmp_path / "deep.keras")  # keras.models.load_model recurses past the default limit here
    assert sys.getrecursionlimit() == limit
    np.testing.assert_array_equal(r(x, training=False).numpy(), y)
    yp = r.predict(x, verbose=0)  # traced: 1,201 layers
    np.testing.assert_array_equal(quantize(tf.constant(yp), fmt, "nearest").numpy(), yp)
    np.testing.assert_allclose(yp, y, atol=16 / 255 + 1e-6)  # at most one step of the 8-bit grid over (-8, 8)


@pytest.mark.slow
def test_efficientnetv2l_quantizes():
    keras.utils.set_random_seed(0)
    m = keras.applications.EfficientNetV2L(weights=None, input_shape=(64, 64, 3))
    q = gk.quantize_model(m, bits=8)
    assert _n_quantize(q) == len(_built_convs(m))
    x = np.random.RandomState(0).rand(1, 64, 64, 3).astype("float32")
    assert np.all(np.isfinite(q.predict(x, verbose=0)))


# --------------------------------------------------------------------------- grouped convolutions, XLA
def _xla_functions(path):
    from graphquant.graph.saved_model import read_saved_model

    sm = read_saved_model(path)
    lib = sm.meta_graphs[0].graph_def.library.function
    return [f for f in lib if f.attr["_XlaMustCompile"].b], lib


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    keras.utils.set_random_seed(0)
    x = keras.Input((8, 8, 16))
    m = keras.Model(x, keras.layers.Conv2D(16, 3, groups=8, activation="relu", name="grouped")(x))
    path = str(tmp_path_factory.mktemp("grouped") / "src")
    m.export(path, verbose=False)
    data = np.random.RandomState(0).rand(4, 8, 8, 16).astype("float32")
    return m, path, data


def _serve(path, data):
    loaded = tf.saved_model.load(path)
    out = loaded.signatures["serving_default"](tf.constant(data))
    return list(out.values())[0].numpy()


@pytest.mark.parametrize(
    "kw",
    [dict(bits=8), dict(bits=8, range=(0.0, 4.0)), dict(format="e4m3"), dict(bits=8, weights=True),
     dict(bits=8, rounding="stochastic", seed=3)],
    ids=["dynamic", "fixed", "e4m3", "weights", "stochastic"],
)  # fmt: skip
def test_grouped_conv_export_rounds_inside_xla(grouped, kw, tmp_path):
    m, src, data = grouped
    xla, _ = _xla_functions(src)
    assert any(any(n.op == "Conv2D" for n in f.node_def) for f in xla)  # the case: the conv is XLA-compiled
    rep = gq.convert_saved_model(src, str(tmp_path / "q"), **kw)
    assert rep.convolutions == 1 and rep.inserted >= 1
    xla_q, _ = _xla_functions(str(tmp_path / "q"))
    assert any(any(n.name.startswith("graphquant") for n in f.node_def) for f in xla_q)  # rounding inside it
    y = _serve(str(tmp_path / "q"), data)
    ref = m.predict(data, verbose=0)
    assert np.all(np.isfinite(y)) and not np.array_equal(y, ref)
    assert np.abs(y - ref).max() < 0.1 * np.abs(ref).max()
    if "range" in kw:  # on the fixed grid
        fmt = rep.plan.activations[0].format
        np.testing.assert_array_equal(quantize(tf.constant(y), fmt, "nearest").numpy(), y)
    if kw.get("format") is None and "range" not in kw:
        assert len(np.unique(y)) <= 256


def test_grouped_conv_export_calibration(grouped, tmp_path):
    _, src, data = grouped
    gq.convert_saved_model(src, str(tmp_path / "q"), bits=8, calibration_data=data)
    assert np.all(np.isfinite(_serve(str(tmp_path / "q"), data)))


def test_grouped_conv_export_compare(grouped, tmp_path):
    """compare's in-graph observers run inside the XLA-compiled function too."""
    _, src, data = grouped
    rep = gq.convert_saved_model(src, str(tmp_path / "q"), bits=8, calibration_data=data)
    r = gq.compare(src, str(tmp_path / "q"), data)
    (lo, hi), = rep.ranges.values()
    assert len(r.points) == 1 and r.points[0].size == data.shape[0] * 6 * 6 * 16  # the conv output, 'valid'
    assert 0 < r.points[0].max_abs <= (hi - lo) / 255  # at most a step (the nudged grid) from the float value
    assert 30 < r.points[0].sqnr_db < np.inf


@pytest.fixture(scope="module")
def convnext(tmp_path_factory):
    keras.utils.set_random_seed(0)
    m = keras.applications.ConvNeXtTiny(weights=None, input_shape=(32, 32, 3))
    path = str(tmp_path_factory.mktemp("convnext") / "src")
    m.export(path, verbose=False)
    return path, np.random.RandomState(0).rand(2, 32, 32, 3).astype("float32")


@pytest.mark.slow
def test_convnext_export_converts_and_runs(convnext, tmp_path):
    src, data = convnext
    rep = gq.convert_saved_model(src, str(tmp_path / "q"), bits=8)
    assert rep.convolutions == 22  # 18 depthwise (in XLA functions) + 4 stem/downsampling
    assert np.all(np.isfinite(_serve(str(tmp_path / "q"), data)))


@pytest.mark.slow
def test_convnext_export_calibration(convnext, tmp_path):
    src, data = convnext
    rep = gq.convert_saved_model(src, str(tmp_path / "q"), bits=8, calibration_data=data)
    assert len(rep.ranges) == 22  # every point calibrated, the 18 inside XLA functions too
    assert all(lo < 0 < hi for lo, hi in rep.ranges.values())
    assert np.all(np.isfinite(_serve(str(tmp_path / "q"), data)))


@pytest.mark.slow
def test_convnext_keras_calibration():
    keras.utils.set_random_seed(0)
    m = keras.applications.ConvNeXtTiny(weights=None, input_shape=(32, 32, 3))
    data = np.random.RandomState(0).rand(2, 32, 32, 3).astype("float32")
    q = gk.quantize_model(m, bits=8, calibration_data=data)
    ranges = [l.get_range() for l in _flat(q) if isinstance(l, Quantize)]
    assert len(ranges) == len(_built_convs(m)) and np.all(np.isfinite(ranges))  # every convolution calibrated
    assert np.all(np.isfinite(q.predict(data, verbose=0)))


_REGNET_SCRIPT = r"""
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import tf_keras
tf_keras.utils.set_random_seed(0)
for name in sys.argv[2:]:
    m = getattr(tf_keras.applications, name)(weights=None, input_shape=(32, 32, 3))
    m.save(os.path.join(sys.argv[1], name), save_format="tf")
    convs = sum(1 for l in m.layers if isinstance(l, tf_keras.layers.Conv2D))
    print(name, convs)
"""


@pytest.fixture(scope="module")
def regnets(tmp_path_factory):
    """tf-keras RegNets saved as SavedModels, built in a subprocess (tf_keras never imported here)."""
    if importlib.util.find_spec("tf_keras") is None:  # not imported here: only the subprocess uses it
        pytest.skip("tf-keras is not installed")
    root = tmp_path_factory.mktemp("regnet")
    out = subprocess.run([sys.executable, "-c", _REGNET_SCRIPT, str(root), "RegNetX002", "RegNetY002"],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    convs = {n: int(c) for n, c in (l.split() for l in out.stdout.strip().splitlines())}
    return root, convs


@pytest.mark.slow
@pytest.mark.parametrize("name", ["RegNetX002", "RegNetY002"])
def test_tf_keras_regnet_counts_calibrates_and_runs(regnets, name, tmp_path):
    root, convs = regnets
    data = np.random.RandomState(0).rand(2, 32, 32, 3).astype("float32")
    rep = gq.convert_saved_model(str(root / name), str(tmp_path / "q"), bits=8, calibration_data=data)
    # what the signature runs: one group per Conv2D layer; tf-keras' per-layer traces are reported apart
    assert rep.convolutions == convs[name]
    assert rep.unreachable_convolutions > 0 and f"+{rep.unreachable_convolutions} in functions" in str(rep)
    assert rep.to_dict()["unreachable_convolutions"] == rep.unreachable_convolutions
    assert len(rep.ranges) == rep.convolutions  # what the signature runs is calibrated, in XLA functions too
    assert np.all(np.isfinite(_serve(str(tmp_path / "q"), data)))


# --------------------------------------------------------------------------- what a conversion counts
class _TwoFunctions(tf.Module):
    def __init__(self):
        super().__init__()
        rng = np.random.RandomState(0)
        self.k1 = tf.Variable(rng.randn(3, 3, 2, 4).astype("float32"))
        self.k2 = tf.Variable(rng.randn(1, 1, 2, 4).astype("float32"))

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 2], tf.float32)])
    def serve(self, x):
        return tf.nn.relu(tf.nn.conv2d(x, self.k1, 1, "SAME"))

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 2], tf.float32)])
    def extra(self, x):  # traced and saved, but no signature runs it
        return tf.nn.conv2d(x, self.k2, 1, "SAME")


def test_saved_model_counts_what_signatures_run(tmp_path):
    mod = _TwoFunctions()
    mod.extra.get_concrete_function()
    tf.saved_model.save(mod, str(tmp_path / "src"), signatures={"serving_default": mod.serve.get_concrete_function()})
    rep = gq.convert_saved_model(str(tmp_path / "src"), str(tmp_path / "q"), bits=8)
    # the library also holds `extra` (and TF may keep a second trace of `serve` beside the signature's)
    off = rep.unreachable_convolutions
    assert rep.convolutions == 1 and off >= 1 and len(rep.plan.targets) == 1 + off
    assert rep.meta_graphs[0]["convolutions"] == 1
    assert any("no signature runs" in n for n in rep.plan.notes)
    assert f"1 convolutions (+{off} in functions no signature runs" in str(rep)
    plan = gq.inspect_saved_model(str(tmp_path / "src"), bits=8)
    assert any(f"{off} of the {1 + off} convolution groups" in n for n in plan.notes)


def test_export_with_leaky_relu_converts(tmp_path):
    """SavedModels strip attributes at their default value: LeakyRelu's T (float) is absent (keras-hub CSPNet)."""
    keras.utils.set_random_seed(0)
    x = keras.Input((8, 8, 3))
    m = keras.Model(x, keras.layers.LeakyReLU(0.1)(keras.layers.Conv2D(4, 3, name="c")(x)))
    m.export(str(tmp_path / "src"), verbose=False)
    rep = gq.convert_saved_model(str(tmp_path / "src"), str(tmp_path / "q"), bits=8, range=(-1.0, 3.0))
    assert rep.convolutions == 1
    data = np.random.RandomState(0).rand(2, 8, 8, 3).astype("float32")
    y = _serve(str(tmp_path / "q"), data)
    fmt = rep.plan.activations[0].format
    np.testing.assert_array_equal(quantize(tf.constant(y), fmt, "nearest").numpy(), y)
    np.testing.assert_allclose(y, m.predict(data, verbose=0), atol=4.0 / 255)
