"""What the inserted layers compute: formats, learned/calibrated ranges, weights, training semantics, masks."""

import keras
import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf

import graphquant as gq
import graphquant.keras as gk
from graphquant.formats import Affine, FixedPoint
from graphquant.keras import Quantize, QuantizeWeights
from graphquant.ranges import MinMaxTracker, PercentileTracker, calibrate


def _net(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", name="c1")(inp)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(name="r1")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = keras.layers.SeparableConv2D(6, 3, padding="same", name="sep")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(2, name="head")(x)
    return keras.Model(inp, out)


X = np.random.RandomState(0).normal(size=(16, 12, 12, 3)).astype("float32")


def _tap(model, name):
    return keras.Model(model.inputs[0], model.get_layer(name).output)


def test_fixed_range_means_fixed_point_and_values_on_grid():
    q = gk.quantize_model(_net(), bits=4, range=(0.0, 6.0))
    ql = q.get_layer("r1_quant")
    assert ql.format == FixedPoint(4, (0.0, 6.0)) and not ql.learned and not ql.weights
    v = np.asarray(_tap(q, "r1_quant")(X))
    np.testing.assert_array_equal(v, np.clip(np.floor(v / 0.375 + 0.5) * 0.375, 0, 6 - 0.375))
    assert len(np.unique(v)) > 4


def test_float_format_needs_no_range():
    q = gk.quantize_model(_net(), format="e4m3")
    v = np.asarray(_tap(q, "sep_quant")(X))
    np.testing.assert_array_equal(v, v.astype(ml_dtypes.float8_e4m3fn).astype(np.float32))
    v1 = np.asarray(_tap(q, "r1_quant")(X))
    ref = np.asarray(_tap(_net(), "r1")(X))
    assert not np.array_equal(v1, ref)  # rounding really happened, once: relative error <= 2**-4
    np.testing.assert_allclose(v1, ref, rtol=2**-4 + 1e-6, atol=2.0**-9)


def test_learned_range_ema_while_training_frozen_at_inference():
    q = gk.quantize_model(_net(), bits=8, range_momentum=0.9)
    ql = q.get_layer("c1_quant") if "c1_quant" in [l.name for l in q.layers] else q.get_layer("r1_quant")
    assert ql.learned and ql.format == Affine(8)
    np.testing.assert_allclose(ql.get_range(), (-6.0, 6.0))  # initial range, as tfmot
    q(X, training=False)
    np.testing.assert_allclose(ql.get_range(), (-6.0, 6.0))  # inference does not learn
    q(X[:8], training=True)
    tap = np.asarray(_tap(_net(), "r1")(X[:8], training=True))  # BN in training mode
    lo, hi = ql.get_range()
    assert lo == 0.0 and hi == pytest.approx(tap.max(), rel=1e-5)  # first batch sets it
    q(X[8:], training=True)
    tap2 = np.asarray(_tap(_net(), "r1")(X[8:], training=True))
    assert ql.get_range()[1] == pytest.approx(0.9 * tap.max() + 0.1 * tap2.max(), rel=1e-5)
    # inference output uses exactly the frozen range: equal to FakeQuant with those min/max
    v = np.asarray(_tap(q, "r1_quant")(X))
    ref = tf.quantization.fake_quant_with_min_max_args(np.asarray(_tap(q, "r1")(X)), 0.0, float(ql.get_range()[1]), num_bits=8)
    np.testing.assert_allclose(v, ref.numpy(), atol=1e-6)


def test_calibration_data_kinds_and_methods():
    net = _net()
    q1 = gk.quantize_model(net, bits=8, calibration_data=X)
    q2 = gk.quantize_model(net, bits=8, calibration_data=tf.data.Dataset.from_tensor_slices((X, X[:, 0, 0, :2])).batch(5))
    q3 = gk.quantize_model(net, bits=8, calibration_data=[X[:7], X[7:]])
    r = [q.get_layer("r1_quant").get_range() for q in (q1, q2, q3)]
    tap = np.asarray(_tap(net, "r1")(X))
    for lo, hi in r:
        assert lo == 0 and hi == pytest.approx(tap.max(), rel=1e-5)
    out = gq.calibrate(q1, X, method="percentile", percentile=99.0)  # later, on the returned model
    assert out["r1_quant"][1] < tap.max()  # percentile clips the tail
    np.testing.assert_allclose(q1.get_layer("r1_quant").get_range()[1], out["r1_quant"][1])
    out = gq.calibrate(q1, (b for b in (X[:7], X[7:])), method="minmax")  # and back, from a generator of batches
    assert out["r1_quant"][0] == 0 and out["r1_quant"][1] == pytest.approx(tap.max(), rel=1e-5)
    with pytest.raises(ValueError, match="method"):
        calibrate(q1, X, method="kl")
    with pytest.raises(TypeError, match="data must be an array"):  # names calibrate's argument
        calibrate(q1, 3)
    with pytest.raises(ValueError, match="empty"):
        calibrate(q1, [])


def test_trackers():
    t = MinMaxTracker(axis=-1)
    t.update(np.array([[1.0, -2.0], [3.0, 5.0]]))
    t.update(np.array([[-1.0, 0.5]]))
    lo, hi = t.result()
    np.testing.assert_array_equal(lo, [-1.0, -2.0])
    np.testing.assert_array_equal(hi, [3.0, 5.0])
    p = PercentileTracker(90.0)  # the engine's histogram percentile: within one bin (2**7 / 1024) of numpy's
    p.update(np.arange(101, dtype="float32"))
    assert abs(float(p.result()[1]) - np.percentile(np.arange(101), 90.0)) <= 2.0**7 / 1024
    with pytest.raises(ValueError, match="no data"):
        MinMaxTracker().result()


def test_weights_forward_uses_per_channel_rounded_kernels_and_ste():
    net = _net()
    q = gk.quantize_model(net, bits=8, weights=True, range=(-8.0, 8.0))
    for name, slots in [("c1", {"kernel": -1}), ("dw", {"kernel": -2}), ("sep", {"depthwise_kernel": -2, "pointwise_kernel": -1})]:
        wl = q.get_layer(name)
        assert isinstance(wl, QuantizeWeights)
        assert {s["slot"]: s["format"].axis for s in wl.slots} == slots
    wl = q.get_layer("c1")
    k = wl.layer.kernel.numpy()
    m = np.abs(k).max(axis=(0, 1, 2))
    step = m / 127.0
    kq = np.round(k / step) * step
    x = X[:2]
    ref = tf.nn.conv2d(x, kq, 1, "SAME") + wl.layer.bias.numpy()
    np.testing.assert_allclose(wl(x), ref, atol=1e-5)
    assert not np.allclose(wl(x), tf.nn.conv2d(x, k, 1, "SAME") + wl.layer.bias.numpy(), atol=1e-6)
    # the float kernel is the trainable variable and receives the straight-through gradient
    assert wl.layer.kernel in wl.trainable_weights or any(v is wl.layer.kernel for v in wl.trainable_weights)
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(wl(x, training=True))
    g = tape.gradient(y, wl.layer.kernel.value if False else wl.layer._kernel)
    gref = tf.GradientTape()
    kv = tf.Variable(kq)
    with gref:
        yr = tf.reduce_sum(tf.nn.conv2d(x, kv, 1, "SAME"))
    np.testing.assert_allclose(g, gref.gradient(yr, kv), rtol=1e-4, atol=1e-4)
    # bias stays float
    assert [s["slot"] for s in wl.slots] == ["kernel"]


def _per_channel_rounded(k, axis, bits=8):
    """Symmetric narrow-range rounding with one scale per slice along ``axis`` (numpy oracle)."""
    red = tuple(i for i in range(k.ndim) if i != axis % k.ndim)
    step = np.abs(k).max(axis=red, keepdims=True) / (2 ** (bits - 1) - 1)
    return (np.round(k / step) * step).astype("float32")


def test_depthwise_separable_and_dense_weights_round_per_output_channel():
    """The kernels the forward pass uses, checked by value against a numpy oracle on the right axes;
    biases are used as they are (float)."""
    keras.utils.set_random_seed(5)
    net = _net()
    for layer in net.layers:  # biases off the 8-bit grid, so rounding them would show
        if getattr(layer, "use_bias", False):
            layer.bias.assign(np.random.RandomState(1).normal(size=layer.bias.shape).astype("float32") * 0.37)
    q = gk.quantize_model(net, bits=8, weights=True, dense=True, range=(-8.0, 8.0))
    x = np.random.RandomState(2).normal(size=(2, 12, 12, 8)).astype("float32")
    dw = q.get_layer("dw").layer
    k = _per_channel_rounded(dw.kernel.numpy(), -2)  # (3, 3, in, 1): one scale per channel
    ref = tf.nn.depthwise_conv2d(x, k, [1, 1, 1, 1], "SAME") + dw.bias.numpy()
    np.testing.assert_allclose(q.get_layer("dw")(x), ref, atol=1e-5)
    sep = q.get_layer("sep").layer
    kd = _per_channel_rounded(sep.depthwise_kernel.numpy(), -2)
    kp = _per_channel_rounded(sep.pointwise_kernel.numpy(), -1)
    ref = tf.nn.separable_conv2d(x, kd, kp, [1, 1, 1, 1], "SAME") + sep.bias.numpy()
    np.testing.assert_allclose(q.get_layer("sep")(x), ref, atol=1e-5)
    head = q.get_layer("head").layer
    v = np.random.RandomState(3).normal(size=(4, 6)).astype("float32")
    ref = v @ _per_channel_rounded(head.kernel.numpy(), -1) + head.bias.numpy()
    np.testing.assert_allclose(q.get_layer("head")(v), ref, atol=1e-5)
    assert not np.allclose(q.get_layer("head")(v), v @ head.kernel.numpy() + head.bias.numpy(), atol=1e-6)


def test_depthwise_multiplier_rounds_per_output_channel():
    """depth_multiplier=2: output channel c*2+m comes from kernel[..., c, m] and gets its own weight scale."""
    keras.utils.set_random_seed(6)
    inp = keras.Input((8, 8, 3))
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", use_bias=False, name="dw")(inp)
    x = keras.layers.SeparableConv2D(4, 3, depth_multiplier=2, padding="same", use_bias=False, name="sep")(x)
    m = keras.Model(inp, x)
    dw, sep = m.get_layer("dw"), m.get_layer("sep")
    for var in (dw.kernel, sep.depthwise_kernel):  # multiplier 1 is 100x smaller than multiplier 0
        k = var.numpy()
        k[..., 1] *= 0.01
        var.assign(k)
    q = gk.quantize_model(m, bits=8, weights=True, activations=False)

    def rounded(k):  # per output channel = per (input channel, multiplier)
        return _per_channel_rounded(k.reshape(k.shape[:-2] + (-1, 1)), -2).reshape(k.shape)

    xs = np.random.RandomState(2).normal(size=(2, 8, 8, 3)).astype("float32")
    y = tf.nn.depthwise_conv2d(xs, rounded(dw.kernel.numpy()), [1, 1, 1, 1], "SAME")
    want = tf.nn.separable_conv2d(y, rounded(sep.depthwise_kernel.numpy()),
                                  _per_channel_rounded(sep.pointwise_kernel.numpy(), -1), [1, 1, 1, 1], "SAME")  # fmt: skip
    np.testing.assert_allclose(q(xs, training=False), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(q.predict(xs, verbose=0), want, rtol=1e-5, atol=1e-5)  # traced


def test_stochastic_weight_rounding_only_while_training():
    net = _net()
    q = gk.quantize_model(net, bits=4, weights=True, weight_rounding="stochastic", seed=3, activations=False)
    wl = q.get_layer("c1")
    x = X[:2]
    a, b = np.asarray(wl(x, training=False)), np.asarray(wl(x, training=False))
    np.testing.assert_array_equal(a, b)
    qn = gk.quantize_model(net, bits=4, weights=True, activations=False)
    np.testing.assert_array_equal(a, np.asarray(qn.get_layer("c1")(x, training=False)))  # nearest at inference
    t1, t2 = np.asarray(wl(x, training=True)), np.asarray(wl(x, training=True))
    assert not np.array_equal(t1, t2) and not np.array_equal(t1, a)


def test_overrides_by_class():
    q = gk.quantize_model(_net(), bits=8, weights=True,
                          overrides={keras.layers.DepthwiseConv2D: {"bits": 4, "weight_bits": 2, "rounding": "up"},
                                     "class:SeparableConv2D": {"format": "e4m3"}})  # fmt: skip
    by_layer = {l.name: l for l in q.layers}
    assert by_layer["r1_quant"].format == Affine(8) and by_layer["r1_quant"].rounding == "nearest"
    assert by_layer["dw_quant"].format == Affine(4) and by_layer["dw_quant"].rounding == "up"
    assert by_layer["dw"].slots[0]["format"].bits == 2 and by_layer["c1"].slots[0]["format"].bits == 8
    assert str(by_layer["sep_quant"].format) == "e4m3"


def test_stochastic_only_while_training():
    q = gk.quantize_model(_net(), format="e2m1", rounding="stochastic")
    ql = q.get_layer("r1_quant")
    assert ql.rounding == "stochastic" and ql.inference_rounding == "nearest"
    c = np.asarray(q(X, training=False))
    d = np.asarray(q(X, training=False))
    np.testing.assert_array_equal(c, d)
    qn = gk.quantize_model(_net(), format="e2m1")
    np.testing.assert_array_equal(c, np.asarray(qn(X, training=False)))
    a = np.asarray(q(X, training=True))
    b = np.asarray(q(X, training=True))  # same BN batch statistics, fresh rounding noise
    assert not np.array_equal(a, b)
    qs = gk.quantize_model(_net(), format="e2m1", rounding="stochastic", inference_rounding="stochastic")
    assert not np.array_equal(np.asarray(qs(X)), np.asarray(qs(X)))


def test_masks_pass_through():
    keras.utils.set_random_seed(3)
    inp = keras.Input((None,), dtype="int32")
    e = keras.layers.Embedding(10, 4, mask_zero=True)(inp)
    e = Quantize("bfloat16")(e)
    out = keras.layers.LSTM(3)(e)
    m = keras.Model(inp, out)
    padded = np.array([[3, 4, 5, 0, 0]])
    short = np.array([[3, 4, 5]])
    np.testing.assert_allclose(m(padded), m(short), atol=1e-6)
    assert m.layers[2].compute_mask(None, tf.constant([[True, False]])) is not None


def test_quantize_layer_arguments():
    with pytest.raises(ValueError, match="format"):
        Quantize("int-eight")
    with pytest.raises(ValueError, match="rounding"):
        Quantize("e4m3", rounding="odd")
    with pytest.raises(ValueError, match="momentum"):
        Quantize("affine8", momentum=1.5)
    cfg = Quantize("affine8:axis=-1", rounding="stochastic", seed=3, name="qq").get_config()
    back = Quantize.from_config(cfg)
    assert back.format == Affine(8, axis=-1) and back.inference_rounding == "nearest" and back.seed == 3


def test_seed_makes_stochastic_training_and_storage_repeatable():
    """quantize_model(seed=...) seeds every stochastic rounding: two runs give identical weights."""

    def run(seed):
        keras.utils.set_random_seed(0)
        inp = keras.Input((8, 8, 1))
        x = keras.layers.Conv2D(4, 3)(inp)
        x = keras.layers.Flatten()(x)
        m = keras.Model(inp, keras.layers.Dense(3)(x))
        q = gk.quantize_model(m, bits=8, weights=True, rounding="stochastic",
                              weight_storage="fixed16[-128,128]", storage_rounding="stochastic", seed=seed)
        q.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
        xs = np.random.RandomState(0).rand(32, 8, 8, 1).astype("float32")
        ys = np.random.RandomState(1).rand(32, 3).astype("float32")
        q.fit(xs, ys, epochs=2, verbose=0)
        return q.get_weights()

    a, b, c = run(5), run(5), run(6)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not all(np.array_equal(u, v) for u, v in zip(a, c))


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "tf.function"])
def test_xla_fast_paths_equal_tensorflow_kernels(traced):
    """The fused XLA weight and activation rounding (default) against TensorFlow's
    FakeQuant kernels (GRAPHQUANT_XLA=0): same outputs, gradients and learned ranges."""
    from graphquant import rounding

    before = rounding.xla_enabled()

    def run(xla):
        rounding.set_xla(xla)
        try:
            q = gk.quantize_model(_net(), bits=8, weights=True)
            call = tf.function(lambda t, tr: q(t, training=tr), autograph=False) if traced else (lambda t, tr: q(t, training=tr))
            with tf.GradientTape() as tape:
                y_train = call(X, True)
                loss = tf.reduce_sum(y_train * np.linspace(-1, 1, y_train.shape[-1]).astype("float32"))
            grads = tape.gradient(loss, q.trainable_variables)
            ranges = [l.get_range() for l in q.layers if isinstance(l, Quantize)]
            return y_train.numpy(), [g.numpy() for g in grads], ranges, np.asarray(call(X, False))
        finally:
            rounding.set_xla(before)

    a, b = run(True), run(False)
    np.testing.assert_array_equal(a[0], b[0])
    for ga, gb in zip(a[1], b[1]):
        np.testing.assert_array_equal(ga, gb)
    for ra, rb in zip(a[2], b[2]):
        np.testing.assert_array_equal(ra, rb)
    np.testing.assert_array_equal(a[3], b[3])
    assert len(a[2]) == 3 and not np.array_equal(a[2][0], (-6.0, 6.0))  # the ranges were learned


def _relu_net(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((10, 10, 3))
    a = keras.layers.Conv2D(6, 3, padding="same", name="ca")(inp)
    a = keras.layers.BatchNormalization(name="bna")(a)
    a = keras.layers.ReLU(6.0, name="r6")(a)  # MobileNet's ReLU6
    b = keras.layers.Conv2D(6, 3, padding="same", name="cb")(inp)
    b = keras.layers.Activation("relu", name="arelu")(b)  # ResNet's
    c = keras.layers.Conv2D(6, 3, padding="same", name="cc")(inp)
    c = keras.layers.ReLU(name="r0")(c)
    d = keras.layers.Conv2D(6, 3, padding="same", name="cd")(inp)
    d = keras.layers.Activation("relu6", name="arelu6")(d)
    e = keras.layers.Conv2D(6, 3, padding="same", name="ce")(inp)
    e = keras.layers.ReLU(negative_slope=0.1, name="leaky")(e)  # not a plain relu
    f = keras.layers.Conv2D(6, 3, padding="same", name="cf")(inp)
    f = keras.layers.ReLU(max_value=4.0, name="r4")(f)  # clip at 4: a different op
    g = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="cg")(inp)  # inside the conv
    x = keras.layers.Concatenate()([a, b, c, d, e, f, g])
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(3, name="head")(x))


def test_groups_ending_in_relu_fuse_it_while_training(tmp_path):
    """Quantize(fused_activation=...) after ReLU/ReLU6 layers: same values, gradients and
    learned ranges as rounding the activation's output, the activation layers stay in
    the model, and the .keras file keeps the wiring."""
    x = np.random.RandomState(1).normal(size=(8, 10, 10, 3)).astype("float32") * 3.0
    fused = gk.quantize_model(_relu_net(), bits=8, weights=True)
    want = {"r6_quant": "relu6", "arelu_quant": "relu", "r0_quant": "relu", "arelu6_quant": "relu6",
            "leaky_quant": None, "r4_quant": None, "cg_quant": None}
    got = {l.name: l.fused_activation for l in fused.layers if isinstance(l, Quantize)}
    assert got == want
    for name in ("r6", "arelu", "r0", "arelu6"):
        assert isinstance(fused.get_layer(name), (keras.layers.ReLU, keras.layers.Activation))
    plain = gk.quantize_model(_relu_net(), bits=8, weights=True)
    for l in plain.layers:
        if isinstance(l, Quantize):
            l.fused_activation = None  # the unfused path: round the activation's output

    def train_step(model):
        with tf.GradientTape() as tape:
            y = model(x, training=True)
            loss = tf.reduce_sum(y * np.array([1.0, -2.0, 0.5], "float32"))
        return y, tape.gradient(loss, model.trainable_variables)

    for run in (lambda m: train_step(m), tf.function(train_step, reduce_retracing=True)):
        (ya, ga), (yb, gb) = run(fused), run(plain)
        np.testing.assert_array_equal(ya, yb)
        assert len(ga) == len(gb) > 0
        for u, v in zip(ga, gb):
            np.testing.assert_array_equal(u, v)
        for la, lb in zip(fused.layers, plain.layers):
            if isinstance(la, Quantize):
                np.testing.assert_array_equal(la.get_range(), lb.get_range())
    assert not np.array_equal(fused.get_layer("r6_quant").get_range(), (-6.0, 6.0))
    np.testing.assert_array_equal(fused.predict(x, verbose=0), plain.predict(x, verbose=0))
    path = str(tmp_path / "fused.keras")
    fused.save(path)
    back = keras.models.load_model(path)
    assert back.get_layer("r6_quant").fused_activation == "relu6"
    np.testing.assert_array_equal(back.predict(x, verbose=0), fused.predict(x, verbose=0))
    np.testing.assert_array_equal(train_step(back)[0], train_step(fused)[0])


def test_fused_activation_argument_and_sequential_models():
    with pytest.raises(ValueError, match="fused_activation"):
        Quantize("affine8", fused_activation="gelu")
    seq = keras.Sequential([keras.Input((8, 8, 2)), keras.layers.Conv2D(3, 3), keras.layers.ReLU(name="r")])
    q = gk.quantize_model(seq, bits=8)
    assert isinstance(q, keras.Sequential)  # no second input in a Sequential: rounds the ReLU's output
    assert q.get_layer("r_quant").fused_activation is None
    y = np.asarray(q(np.ones((1, 8, 8, 2), "float32"), training=True))
    assert (y >= 0).all()
