"""quantize_model's structure: where rounding goes, copies, model kinds, bad input."""

import keras
import numpy as np
import pytest

import graphquant.keras as gk
from graphquant.formats import Affine, FloatFormat
from graphquant.keras import Quantize, QuantizeWeights
from graphquant.patterns import CONV, Matcher, Pattern, Step, ACTIVATION
from graphquant.patterns import DEFAULT_REGISTRY

CONV_BASES = (
    keras.src.layers.convolutional.base_conv.BaseConv,
    keras.src.layers.convolutional.base_depthwise_conv.BaseDepthwiseConv,
    keras.src.layers.convolutional.base_separable_conv.BaseSeparableConv,
    keras.src.layers.convolutional.base_conv_transpose.BaseConvTranspose,
)


def _all_layers(model):
    for l in model.layers:
        yield l
        if isinstance(l, keras.Model):
            yield from _all_layers(l)


def _inner(l):
    return l.layer if isinstance(l, QuantizeWeights) else l


def _convs(model):
    return [l for l in _all_layers(model) if isinstance(_inner(l), CONV_BASES)]


def _quants(model):
    return [l for l in _all_layers(model) if isinstance(l, Quantize)]


def _producer(layer):
    return layer._inbound_nodes[0].input_tensors[0]._keras_history.operation


@pytest.fixture(scope="module")
def mobilenet():
    keras.utils.set_random_seed(0)
    return keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10)


@pytest.fixture(scope="module")
def mobilenet_q(mobilenet):
    return gk.quantize_model(mobilenet, bits=8)


def test_one_rounding_per_convolution_at_the_group_end(mobilenet, mobilenet_q):
    convs = _convs(mobilenet)
    quants = _quants(mobilenet_q)
    assert len(convs) == 52 and len(quants) == len(convs)
    by_name = {l.name: l for l in mobilenet.layers}
    ends = set()
    for q in quants:
        end = _producer(q)
        ends.add(end.name)
        # group end: an activation, or a BN whose consumer is not an activation, or a conv
        assert isinstance(end, (keras.layers.ReLU, keras.layers.BatchNormalization) + CONV_BASES)
        if isinstance(end, keras.layers.BatchNormalization):
            nxt = by_name[end.name]._outbound_nodes[0].operation
            assert not isinstance(nxt, keras.layers.ReLU)
    assert len(ends) == len(quants)
    # nothing else quantized: not the input, not the Dense classifier
    assert not isinstance(_producer(mobilenet_q.get_layer("predictions")), Quantize)
    assert all(not isinstance(l, Quantize) for l in mobilenet_q.layers[:2])
    dense_consumers = [l for l in quants if isinstance(_producer(l), keras.layers.Dense)]
    assert dense_consumers == []


def test_resnet50_groups_and_exact_copy():
    """ResNet50: conv -> BN -> relu groups end at the activation; a block's last conv and its shortcut conv end
    at their BN (an Add follows); with weights, every conv is weight-rounded; with a format that does not round
    the copy computes exactly what the source does."""
    keras.utils.set_random_seed(1)
    m = keras.applications.ResNet50(input_shape=(32, 32, 3), weights=None, classes=10)
    q = gk.quantize_model(m, bits=8, weights=True)
    quants, convs = _quants(q), _convs(m)
    assert len(convs) == 53 and len(quants) == 53
    assert sum(isinstance(l, QuantizeWeights) for l in q.layers) == 53
    ends = [_producer(l) for l in quants]
    after_bn = [e for e in ends if isinstance(e, keras.layers.BatchNormalization)]
    assert len(after_bn) == 16 + 4  # 16 blocks' last convs + 4 shortcut convs
    for l in quants:
        end = _producer(l)
        if isinstance(end, keras.layers.BatchNormalization):
            assert isinstance(l._outbound_nodes[0].operation, keras.layers.Add)
        else:
            assert isinstance(end, keras.layers.Activation) and end.activation is keras.activations.relu
    x = np.random.RandomState(0).rand(2, 32, 32, 3).astype("float32")
    exact = gk.quantize_model(m, format=FloatFormat(8, 23), weights=True)
    np.testing.assert_array_equal(exact(x, training=False), m(x, training=False))
    assert not np.array_equal(q(x, training=False), m(x, training=False))


def test_plan_agrees_with_the_model(mobilenet, mobilenet_q):
    plan = gk.inspect(mobilenet, bits=8)
    assert [p.after for p in plan.activations] == [_producer(q).name for q in _quants(mobilenet_q)]
    assert plan.activations[0].group == ("Conv1", "bn_Conv1", "Conv1_relu")
    assert "Conv1_relu" in str(plan) and "affine8" in str(plan)


def test_source_untouched_and_no_shared_layers(mobilenet, mobilenet_q):
    x = np.random.RandomState(0).rand(2, 32, 32, 3).astype("float32")
    before = [w.copy() for w in mobilenet.get_weights()]
    ids_src = {id(l) for l in _all_layers(mobilenet)}
    ids_q = {id(l) for l in _all_layers(mobilenet_q)} | {id(_inner(l)) for l in _all_layers(mobilenet_q)}
    assert not ids_src & ids_q
    src_vars = {id(v) for v in mobilenet.weights}
    assert not src_vars & {id(v) for v in mobilenet_q.weights}
    assert len(mobilenet.layers) == 156
    for a, b in zip(before, mobilenet.get_weights()):
        np.testing.assert_array_equal(a, b)
    # weights copied: every source conv kernel appears in the copy
    for c in _convs(mobilenet):
        np.testing.assert_array_equal(c.get_weights()[0], _inner(mobilenet_q.get_layer(c.name)).get_weights()[0])
    assert mobilenet(x).shape == mobilenet_q(x).shape


def test_every_conv_family_and_subclass():
    class MyConv(keras.layers.Conv2D):
        pass

    keras.utils.set_random_seed(1)
    i1 = keras.Input((16, 4))
    i2 = keras.Input((8, 8, 4))
    i3 = keras.Input((4, 4, 4, 2))
    a = keras.layers.Conv1D(4, 3, padding="same")(i1)
    a = keras.layers.DepthwiseConv1D(3, padding="same")(a)
    a = keras.layers.SeparableConv1D(4, 3, padding="same")(a)
    a = keras.layers.Conv1DTranspose(4, 3, padding="same")(a)
    b = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv2d")(i2)
    b = keras.layers.BatchNormalization()(b)  # not fused: the conv has its own activation
    b = keras.layers.DepthwiseConv2D(3, padding="same")(b)
    b = keras.layers.SeparableConv2D(4, 3, padding="same")(b)
    b = keras.layers.Conv2DTranspose(4, 3, padding="same")(b)
    b = MyConv(4, 1, name="my_conv")(b)
    b = keras.layers.PReLU(name="p_re_lu")(b)
    # explicit names: Keras numbers automatic names per process, so they depend on test order
    c = keras.layers.Conv3D(2, 3, padding="same", name="conv3d")(i3)
    c = keras.layers.ELU(name="elu")(c)
    c = keras.layers.Conv3DTranspose(2, 3, padding="same", name="conv3d_transpose")(c)
    c = keras.layers.Activation("tanh", name="activation")(c)
    m = keras.Model([i1, i2, i3], [a, b, c])
    plan = gk.inspect(m, bits=8, weights=True)
    kinds = {p.target_kind for p in plan.activations}
    assert kinds == {
        "Conv1D", "DepthwiseConv1D", "SeparableConv1D", "Conv1DTranspose", "Conv2D", "DepthwiseConv2D",
        "SeparableConv2D", "Conv2DTranspose", "MyConv", "Conv3D", "Conv3DTranspose",
    }  # fmt: skip
    ends = {p.target: p.after for p in plan.activations}
    assert ends["conv2d"] == "conv2d"  # own activation: BN not fused
    assert ends["my_conv"] == "p_re_lu"
    assert ends["conv3d"] == "elu" and ends["conv3d_transpose"] == "activation"
    q = gk.quantize_model(m, bits=8, weights=True)
    assert len(_quants(q)) == 11
    assert isinstance(_inner(q.get_layer("my_conv")), MyConv)
    xs = [np.random.RandomState(k).rand(2, *t.shape[1:]).astype("float32") for k, t in enumerate(m.inputs)]
    for y in q(xs):
        assert np.isfinite(np.asarray(y)).all()


def _small_functional(name="f"):
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name=name + "_conv")(inp)
    x = keras.layers.ReLU(name=name + "_relu")(x)
    return keras.Model(inp, x, name=name)


def test_sequential_nested_and_shared():
    keras.utils.set_random_seed(2)
    inner_seq = keras.Sequential(
        [keras.Input((8, 8, 4)), keras.layers.Conv2D(4, 1, name="c1"), keras.layers.BatchNormalization(name="bn")],
        name="inner_seq",
    )
    mid_in = keras.Input((8, 8, 3))
    mid = keras.Model(mid_in, inner_seq(_small_functional("deep")(mid_in)), name="mid")
    inp_a = keras.Input((8, 8, 3), name="a")
    inp_b = keras.Input((8, 8, 3), name="b")
    shared = keras.layers.Conv2D(3, 3, padding="same", name="shared")
    xa, xb = shared(inp_a), shared(inp_b)
    ya = mid(xa)
    yb = mid(xb)  # nested model shared by two calls
    out = keras.layers.Add()([ya, yb])
    m = keras.Model({"a": inp_a, "b": inp_b}, {"sum": out, "left": ya})
    plan = gk.inspect(m, bits=8)
    assert [p.path for p in plan.activations] == ["shared", "shared@1", "mid/deep/deep_relu", "mid/inner_seq/bn"]
    q = gk.quantize_model(m, bits=8)
    assert isinstance(q.get_layer("mid").get_layer("inner_seq"), keras.Sequential)
    quants = _quants(q)
    assert len(quants) == 4
    # the shared conv stays shared (one layer, two calls), so does the nested model
    assert len([l for l in q.layers if l.name == "shared"]) == 1
    assert len(q.get_layer("shared")._inbound_nodes) == 2
    x = {"a": np.random.RandomState(0).rand(2, 8, 8, 3).astype("float32"),
         "b": np.random.RandomState(1).rand(2, 8, 8, 3).astype("float32")}  # fmt: skip
    y, yq = m(x), q(x)
    assert set(yq) == {"sum", "left"} and yq["sum"].shape == y["sum"].shape
    # top-level Sequential
    seq = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, padding="same"), keras.layers.ReLU(), inner_seq,
                            keras.layers.Flatten(), keras.layers.Dense(2)])  # fmt: skip
    qs = gk.quantize_model(seq, bits=8)
    assert isinstance(qs, keras.Sequential)
    assert [type(l).__name__ for l in qs.layers][:3] == ["Conv2D", "ReLU", "Quantize"]
    assert len(_quants(qs)) == 2
    # a format that does not round (float32 itself): the copy computes exactly what the source does,
    # so every layer is there, in order, with the source's weights
    exact = gk.quantize_model(seq, format=FloatFormat(8, 23))
    np.testing.assert_array_equal(exact(x["a"]), seq(x["a"]))
    assert not np.array_equal(qs(x["a"]), seq(x["a"]))  # while 8 bits do round


@keras.saving.register_keras_serializable(package="tests")
class Scale(keras.layers.Layer):
    def __init__(self, factor=2.0, **kw):
        super().__init__(**kw)
        self.factor = factor

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.w * self.factor

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


def test_unknown_custom_layer_is_cloned_with_weights():
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3)(inp)
    s = Scale(3.0)
    x = s(x)
    m = keras.Model(inp, x)
    s.w.assign(np.arange(4, dtype="float32"))
    q = gk.quantize_model(m, format="bfloat16")
    qs = q.get_layer(s.name)
    assert qs is not s and qs.factor == 3.0
    np.testing.assert_array_equal(qs.get_weights()[0], np.arange(4))
    assert isinstance(_producer(qs), Quantize)  # rounding after the conv, before the custom layer


def test_include_exclude_overrides_and_custom_pattern(mobilenet):
    q = gk.quantize_model(mobilenet, bits=8, exclude=[keras.layers.DepthwiseConv2D, r"^block_1_"])
    assert len(_quants(q)) == 52 - 17 - 2  # 17 depthwise; block_1 expand and project
    q = gk.quantize_model(mobilenet, bits=8, include=r"_project$", overrides={"block_16_project": {"format": "e5m2"}})
    fmts = [l.format for l in _quants(q)]
    assert len(fmts) == 17 and str(fmts[-1]) == "e5m2" and fmts[0] == Affine(8)
    # a user pattern: conv followed by a custom layer, registered without touching library code
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3)(inp)
    x = Scale()(x)
    x = keras.layers.ReLU()(x)
    m = keras.Model(inp, x)
    reg = DEFAULT_REGISTRY.copy()
    reg.register(Pattern("conv_scale", (CONV, Matcher("scale", layers=(Scale,)), Step(ACTIVATION, optional=True))))
    q = gk.quantize_model(m, bits=8, registry=reg)
    (ql,) = _quants(q)
    assert isinstance(_producer(ql), keras.layers.ReLU)


def test_dense_as_extra_target():
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3)(inp)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(3, activation="relu", name="dense")(x)
    m = keras.Model(inp, x)
    assert len(_quants(gk.quantize_model(m, bits=8))) == 1
    q = gk.quantize_model(m, bits=8, dense=True, weights=True)
    assert len(_quants(q)) == 2 and isinstance(q.get_layer("dense"), QuantizeWeights)


def test_bad_input():
    with pytest.raises(TypeError, match="keras.Model"):
        gk.quantize_model("model.keras")
    with pytest.raises(TypeError, match="layer"):
        gk.quantize_model(keras.layers.Conv2D(2, 3))

    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.c = keras.layers.Conv2D(2, 3)

        def call(self, x):
            return self.c(x)

    with pytest.raises(TypeError, match="subclassed.*Functional"):
        gk.quantize_model(Sub())
    m = _small_functional()
    with pytest.raises(ValueError, match="weight_bits"):
        gk.quantize_model(m, weights=False, weight_bits=4)
    with pytest.raises(ValueError, match="range"):
        gk.quantize_model(m, format="e4m3", range=(0, 1))
    with pytest.raises(ValueError, match="rounding"):
        gk.quantize_model(m, rounding="sideways")
    with pytest.raises(TypeError, match="unexpected"):
        gk.quantize_model(m, bitz=8)
    with pytest.raises(ValueError, match="not built"):
        gk.quantize_model(keras.Sequential([keras.layers.Conv2D(2, 3)]))
    # options that would silently do nothing
    x = np.zeros((2, 8, 8, 3), "float32")
    for kw in (dict(bits=4, range=(0.0, 6.0)), dict(format="e4m3"), dict(activations=False, weights=True)):
        with pytest.raises(ValueError, match="calibration_data= has nothing to calibrate"):
            gk.quantize_model(m, calibration_data=x, **kw)
    with pytest.raises(ValueError, match="calibration_method='percentile' needs calibration_data"):
        gk.quantize_model(m, bits=8, calibration_method="percentile")
    with pytest.raises(ValueError, match="calibration_method"):
        gk.quantize_model(m, bits=8, calibration_data=x, calibration_method="mean")
    with pytest.raises(ValueError, match="storage_rounding='stochastic' needs weight_storage"):
        gk.quantize_model(m, storage_rounding="stochastic")
    with pytest.raises(ValueError, match="weight_rounding='stochastic' has no weights"):
        gk.quantize_model(m, weight_rounding="stochastic")
    # ...while a learned range anywhere is something to calibrate
    q = gk.quantize_model(m, format="e4m3", overrides={"conv": {"bits": 8}}, calibration_data=x)
    assert [l.learned for l in _quants(q)] == [True]
    dense_only = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.warns(UserWarning, match="no convolution"):
        q = gk.quantize_model(dense_only, bits=8)
    assert q is not dense_only and len(q.layers) == 1
    np.testing.assert_array_equal(q.layers[0].get_weights()[0], dense_only.layers[0].get_weights()[0])


@keras.saving.register_keras_serializable(package="tests")
class SubclassedBlock(keras.Model):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.c = keras.layers.Conv2D(2, 3, padding="same")

    def call(self, x):
        return self.c(x)


def test_subclassed_model_inside_a_functional_one_is_named_not_silently_skipped(caplog):
    keras.utils.set_random_seed(5)
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(3, 3, padding="same", name="outer")(inp)
    m = keras.Model(inp, SubclassedBlock(name="sub")(x))
    plan = gk.inspect(m, bits=8)
    assert [p.target for p in plan.activations] == ["outer"]
    assert any(n.startswith("sub is a subclassed model (SubclassedBlock)") for n in plan.notes)
    with caplog.at_level("WARNING", logger="graphquant"):
        q = gk.quantize_model(m, bits=8)
    assert "nothing inside it is quantized" in caplog.text
    assert [type(l).__name__ for l in q.layers] == ["InputLayer", "Conv2D", "Quantize", "SubclassedBlock"]
    sub = q.layers[-1]  # a copy (its name is whatever its own get_config gives back), with the weights
    assert sub is not m.get_layer("sub")
    np.testing.assert_array_equal(sub.c.kernel.numpy(), m.get_layer("sub").c.kernel.numpy())


def test_signature_cache_is_scoped_and_exact():
    """quantize_model reuses Keras' per-layer signature computations only while it runs."""
    import inspect
    import sys as _sys

    from graphquant.keras import _speedups as rw

    conv = keras.layers.Conv2D(4, 3)
    with rw.cached_signatures():
        for name in rw.KERAS_INSPECTING_MODULES:
            assert _sys.modules[name].inspect is rw.SIGNATURE_CACHE
        cache = rw.SIGNATURE_CACHE
        for fn in (keras.layers.Conv2D.__init__, conv.call, keras.layers.Dense.__init__, conv.call):
            assert cache.signature(fn) == inspect.signature(fn)
        assert cache.getfullargspec(keras.layers.Conv2D.__init__) == inspect.getfullargspec(keras.layers.Conv2D.__init__)
        assert cache.Parameter is inspect.Parameter  # everything else is the real module
    for name in rw.KERAS_INSPECTING_MODULES:
        assert _sys.modules[name].inspect is inspect


def test_garbage_collector_paused_only_while_copying():
    """quantize_model turns Python's cyclic GC off while it copies, and restores the
    previous state (enabled or not), nested or not."""
    import gc

    from graphquant.keras import _speedups as rw
    from graphquant.keras.clone import Rewriter

    assert gc.isenabled()
    seen = []
    real = Rewriter.rewrite

    def spy(self, *a, **k):
        seen.append(gc.isenabled())
        return real(self, *a, **k)

    Rewriter.rewrite = spy
    try:
        gk.quantize_model(_small_functional(), bits=8)
        with rw.gc_paused():
            with rw.gc_paused():
                assert not gc.isenabled()
            assert not gc.isenabled()
        assert gc.isenabled()
        gc.disable()
        try:
            with rw.gc_paused():
                pass
            assert not gc.isenabled()  # was off before: stays off
        finally:
            gc.enable()
    finally:
        Rewriter.rewrite = real
    assert seen == [False]
    assert gc.isenabled()


def _op_nodes(model):
    """(class name, number of calls) of every plain keras.ops operation in a Functional graph."""
    return [(type(n.operation).__name__, len(n.operation._inbound_nodes)) for d in model._nodes_by_depth.values()
            for n in d if n.operation is not None and not isinstance(n.operation, keras.layers.Layer)]


def test_plain_keras_ops_in_the_graph_mobilenetv3():
    """MobileNetV3 builds hard-swish from raw ops (``x + 3``, ``* (1/6)``): the copy gets its own copies of them."""
    keras.utils.set_random_seed(3)
    m = keras.applications.MobileNetV3Small(input_shape=(64, 64, 3), weights=None)
    ops_before = _op_nodes(m)
    assert ops_before and {k for _, k in ops_before} == {1}  # the architecture really has plain operations
    q = gk.quantize_model(m, bits=8, weights=True)
    assert len(_quants(q)) == len(_convs(m)) == len(_convs(q))
    assert _op_nodes(m) == ops_before  # the source's operations gained no call
    assert sorted(_op_nodes(q)) == sorted(ops_before)
    src_ops = {id(n.operation) for d in m._nodes_by_depth.values() for n in d}
    assert not src_ops & {id(n.operation) for d in q._nodes_by_depth.values() for n in d}
    x = np.random.RandomState(0).rand(2, 64, 64, 3).astype("float32")
    exact = gk.quantize_model(m, format=FloatFormat(8, 23))  # no rounding: the copy is the same function
    np.testing.assert_array_equal(exact(x, training=False), m(x, training=False))


def test_mask_through_quantize_model():
    """A mask made by a plain ``not_equal`` operation flows through the inserted rounding to the LSTM."""
    keras.utils.set_random_seed(4)
    inp = keras.Input((None,), dtype="int32")
    e = keras.layers.Embedding(10, 4, mask_zero=True)(inp)
    c = keras.layers.Dense(4, activation="relu", name="proj")(e)
    m = keras.Model(inp, keras.layers.LSTM(3)(c))
    q = gk.quantize_model(m, bits=8, dense=True)
    assert [l.name for l in _quants(q)] == ["proj_quant"]
    padded, short = np.array([[3, 4, 5, 0, 0]]), np.array([[3, 4, 5]])
    np.testing.assert_allclose(q(padded), q(short), atol=1e-6)  # padding is masked out
    unmasked = keras.Model(inp, keras.layers.LSTM(3)(keras.layers.Dense(4)(keras.layers.Embedding(10, 4)(inp))))
    assert not np.allclose(unmasked(padded), unmasked(short), atol=1e-6)  # ...which it would not be otherwise


@keras.saving.register_keras_serializable(package="tests")
class Proj(keras.layers.Layer):
    """A custom layer whose kernel the built-in weight table does not know."""

    def __init__(self, units=3, **kw):
        super().__init__(**kw)
        self.units = units

    def build(self, shape):
        self.kernel = self.add_weight(name="kernel", shape=(shape[-1], self.units), initializer="glorot_uniform")

    def call(self, x):
        return x @ self.kernel

    def compute_output_shape(self, shape):
        return tuple(shape[:-1]) + (self.units,)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def test_pattern_declares_weight_slots_of_a_custom_layer():
    inp = keras.Input((5,))
    m = keras.Model(inp, Proj(name="proj")(inp))
    x = np.random.RandomState(0).normal(size=(4, 5)).astype("float32")
    proj = Matcher("proj", layers=(Proj,))
    opts = dict(weights=True, weight_bits=4, activations=False)
    plain = DEFAULT_REGISTRY.copy()
    plain.register(Pattern("proj", (proj,)))
    plan = gk.inspect(m, registry=plain, **opts)
    assert not [p for p in plan.points if p.what == "weights"] and "no known weights" in " ".join(plan.notes)
    reg = DEFAULT_REGISTRY.copy()
    reg.register(Pattern("proj", (proj,), weight_slots={"kernel": -1}))
    assert reg["proj"].weight_slots == (("kernel", -1),)
    (wp,) = [p for p in gk.inspect(m, registry=reg, **opts).points if p.what == "weights"]
    assert (wp.target, wp.slot) == ("proj", "kernel")
    fmt = wp.format
    assert isinstance(fmt, Affine) and fmt.bits == 4 and fmt.axis == -1  # per output channel: the declared axis
    q = gk.quantize_model(m, registry=reg, **opts)
    assert isinstance(q.get_layer("proj"), QuantizeWeights)
    kq = gk.quantize_weight(m.get_layer("proj").kernel, fmt)
    assert len(np.unique(np.asarray(kq)[:, 0])) <= 16  # on a 4-bit grid per output channel
    np.testing.assert_allclose(q.predict(x, verbose=0), x @ np.asarray(kq), rtol=1e-5, atol=1e-6)
    assert not np.allclose(q.predict(x, verbose=0), m.predict(x, verbose=0), atol=1e-3)
    with pytest.raises(TypeError, match="weight_slots"):
        Pattern("bad", (proj,), weight_slots="kernel")
    with pytest.raises(TypeError, match="axis of 'kernel'"):
        Pattern("bad", (proj,), weight_slots={"kernel": "last"})
