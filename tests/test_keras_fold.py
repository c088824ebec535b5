"""Inference speed-ups keep the values: BN folding into weight-quantized convolutions, the weight fast path."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import graphquant.keras as gk
from graphquant.formats import Affine
from graphquant.keras import FoldingBatchNormalization, Quantize
from graphquant.ops import quantize


def _net(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="c1")(inp)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(6.0, name="r1")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.ReLU(name="r2")(x)
    x = keras.layers.SeparableConv2D(6, 3, padding="same", name="sep")(x)
    x = keras.layers.BatchNormalization(name="bn3", center=False)(x)
    x = keras.layers.Conv1D(5, 2, name="c1d")(keras.layers.Reshape((-1, 6))(x))
    x = keras.layers.BatchNormalization(name="bn4", scale=False)(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    m = keras.Model(inp, keras.layers.Dense(2, name="head")(x))
    rs = np.random.RandomState(seed)
    for l in m.layers:  # non-trivial statistics, so that folding changes the kernels
        if isinstance(l, keras.layers.BatchNormalization):
            n = l.moving_mean.shape[0]
            l.moving_mean.assign(rs.normal(0, 0.3, n))
            l.moving_variance.assign(rs.uniform(0.3, 3.0, n))
            if l.scale:
                l.gamma.assign(rs.uniform(0.5, 1.5, n))
            if l.center:
                l.beta.assign(rs.normal(0, 0.2, n))
    return m


X = np.random.RandomState(1).normal(size=(8, 12, 12, 3)).astype("float32")


def _taps(q):
    names = [l.name for l in q.layers if isinstance(l, Quantize)]
    return names, keras.Model(q.inputs[0], [q.get_layer(n).output for n in names] + [q.output])


def test_folded_inference_equals_unfused_within_reassociation_and_on_grid():
    net = _net()
    qf = gk.quantize_model(net, bits=8, weights=True, calibration_data=X)
    qu = gk.quantize_model(net, bits=8, weights=True, calibration_data=X, fold_batchnorm=False)
    bns = [l for l in qf.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert len(bns) == 4 and all(isinstance(l, FoldingBatchNormalization) and l.fold for l in bns)
    assert not any(l.fold for l in qu.layers if isinstance(l, FoldingBatchNormalization))
    names, tf_ = _taps(qf)
    _, tu = _taps(qu)
    assert len(names) == 4
    yf = tf.function(lambda t: tf_(t, training=False))(X)
    yu = tf.function(lambda t: tu(t, training=False))(X)
    for name, a, b in zip(names, yf, yu):
        a, b = np.asarray(a), np.asarray(b)
        lo, hi = qf.get_layer(name).get_range()
        step = (hi - lo) / 255.0
        # on the layer's grid: rounding again changes nothing
        np.testing.assert_array_equal(np.asarray(qf.get_layer(name)(a, training=False)), a)
        # equal, except where reassociation moved a value across a rounding boundary: one step, rarely
        diff = np.abs(a - b)
        assert diff.max() <= step * 1.001 + 1e-6, name
        assert (diff > 1e-6).mean() < 0.01, name
    np.testing.assert_allclose(np.asarray(yf[-1]), np.asarray(yu[-1]), atol=0.05)
    # eager inference does not fold: exactly the unfused values
    for a, b in zip(tf_(X, training=False), tu(X, training=False)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_folding_really_folds_in_graph_mode():
    net = _net()
    qf = gk.quantize_model(net, bits=8, weights=True, calibration_data=X)
    qu = gk.quantize_model(net, bits=8, weights=True, calibration_data=X, fold_batchnorm=False)
    bn_in = keras.Model(qf.inputs[0], qf.get_layer("bn1").output)
    bn_in_u = keras.Model(qu.inputs[0], qu.get_layer("bn1").output)
    a = tf.function(lambda t: bn_in(t, training=False))(X)
    b = tf.function(lambda t: bn_in_u(t, training=False))(X)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # the folded path computes the convolution on Q(W) * s: not bit-identical to conv-then-BN
    assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_training_and_frozen_bn_are_not_folded():
    net = _net()
    qf = gk.quantize_model(net, bits=8, weights=True, calibration_data=X)
    qu = gk.quantize_model(net, bits=8, weights=True, calibration_data=X, fold_batchnorm=False)
    f = tf.function(lambda m, t: m(t, training=True))
    np.testing.assert_array_equal(f(qf, X), f(qu, X))
    for q in (qf, qu):
        for l in q.layers:
            if isinstance(l, keras.layers.BatchNormalization):
                l.trainable = False  # BN in inference mode while the model trains: conv not in inference mode
    np.testing.assert_array_equal(f(qf, X), f(qu, X))


def test_folding_sees_weight_updates_and_saves(tmp_path):
    net = _net()
    qf = gk.quantize_model(net, bits=8, weights=True, calibration_data=X)
    qu = gk.quantize_model(net, bits=8, weights=True, calibration_data=X, fold_batchnorm=False)
    infer_f = tf.function(lambda t: qf(t, training=False))
    infer_u = tf.function(lambda t: qu(t, training=False))
    y0 = np.asarray(infer_f(X))
    for q in (qf, qu):
        w = q.get_weights()
        q.set_weights([v * 1.5 if v.ndim == 4 else v for v in w])
        q.get_layer("bn1").moving_variance.assign(q.get_layer("bn1").moving_variance * 2.0)
    y1 = np.asarray(infer_f(X))
    assert not np.allclose(y0, y1)
    np.testing.assert_allclose(y1, np.asarray(infer_u(X)), atol=0.05)
    path = str(tmp_path / "f.keras")
    qf.save(path)
    back = keras.models.load_model(path)
    assert isinstance(back.get_layer("bn1"), FoldingBatchNormalization) and back.get_layer("bn1").fold
    np.testing.assert_array_equal(back.predict(X, verbose=0), qf.predict(X, verbose=0))


@pytest.mark.parametrize("shape,axis", [((3, 3, 4, 8), -1), ((3, 3, 8, 1), -2), ((3, 3, 8, 2), -2), ((5, 6), None)])
@pytest.mark.parametrize("bits", [8, 4])
def test_weight_fast_path_is_bit_identical(shape, axis, bits):
    w = tf.constant(np.random.RandomState(bits).normal(size=shape).astype("float32"))
    fmt = Affine(bits, symmetric=True, axis=axis)
    got = gk.quantize_weight(w, fmt)
    rank = len(shape)
    red = None if axis is None else [i for i in range(rank) if i != axis % rank]
    m = tf.maximum(tf.reduce_max(tf.abs(w), axis=red), 1e-12)
    np.testing.assert_array_equal(got, quantize(w, fmt, "nearest", range=(-m, m)))
    grads = []
    for fn in (lambda: gk.quantize_weight(w, fmt), lambda: quantize(w, fmt, "nearest", range=(-m, m))):
        with tf.GradientTape() as tape:
            tape.watch(w)
            y = tf.reduce_sum(fn() * 3.0)
        grads.append(np.asarray(tape.gradient(y, w)))
    np.testing.assert_array_equal(grads[0], grads[1])  # straight through, as the general path
    assert (grads[0] == 3.0).mean() > 0.9
