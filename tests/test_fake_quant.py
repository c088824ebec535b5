"""graphquant.ops.fake_quant / symmetric_fake_quant (the Keras layers' fast paths)
against TensorFlow's own FakeQuant kernels, bit for bit: values and gradients,
per tensor and per channel on every axis, XLA on and off."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from graphquant import Affine
from graphquant import ops as gq_ops
from graphquant import rounding as gq_rounding


@pytest.fixture(params=[True, False], ids=["xla", "plain"])
def xla(request):
    before = gq_rounding.xla_enabled()
    gq_rounding.set_xla(request.param)
    yield request.param
    gq_rounding.set_xla(before)


def tf_fake_quant(x, lo, hi, fmt, axis):
    """TensorFlow's kernel (channels moved last for the per-channel op)."""
    kw = dict(num_bits=fmt.bits, narrow_range=fmt.narrow_range)
    if axis is None:
        return tf.quantization.fake_quant_with_min_max_vars(x, lo, hi, **kw)
    rank = x.shape.rank
    perm = [i for i in range(rank) if i != axis] + [axis]
    y = tf.quantization.fake_quant_with_min_max_vars_per_channel(tf.transpose(x, perm), lo, hi, **kw)
    return tf.transpose(y, np.argsort(perm))


def value_and_grad(fn, x, dy):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fn(x)
        loss = tf.reduce_sum(y * dy)
    return y.numpy(), tape.gradient(loss, x).numpy()


def bits_equal(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return np.array_equal(a.view(np.int32), b.view(np.int32))


def random_case(rng, shape, axis):
    x = (rng.standard_normal(shape) * 10.0 ** rng.uniform(-4, 2)).astype(np.float32)
    x.flat[rng.integers(x.size)] = 0.0
    n = 1 if axis is None else shape[axis]
    lo = (-np.abs(rng.standard_normal(n)) * 10.0 ** rng.uniform(-3, 1)).astype(np.float32)
    hi = (np.abs(rng.standard_normal(n)) * 10.0 ** rng.uniform(-3, 1)).astype(np.float32)
    lo[0], hi[-1] = 0.0, 0.0 if n > 1 else hi[-1]  # a range touching zero on each side
    if n > 2:
        lo[1], hi[1] = 0.0, 0.0  # TF's special case: min == max == 0 gives zeros
    if axis is None:
        return x, lo[0], hi[0]
    return x, lo, hi


CASES = [((3, 3, 16, 32), None), ((3, 3, 16, 32), 3), ((5, 7, 6, 9), 0), ((2, 3, 4, 5), 1),
         ((1, 1, 64, 128), 2), ((64,), 0), ((4, 5, 6), -1)]


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("narrow", [False, True], ids=["wide", "narrow"])
@pytest.mark.parametrize("bits", [2, 4, 7, 8, 16])
def test_fake_quant_equals_tensorflow(bits, narrow, symmetric, xla):
    rng = np.random.default_rng(bits * 4 + narrow * 2 + symmetric)
    for shape, axis in CASES:
        fmt = Affine(bits, axis=axis, narrow_range=narrow, symmetric=symmetric)
        ax = None if axis is None else axis % len(shape)
        x, lo, hi = random_case(rng, shape, ax)
        if symmetric:
            m = np.maximum(np.abs(lo), np.abs(hi))
            tlo, thi = -m, m
        else:
            tlo, thi = lo, hi
        xt = tf.constant(x)
        dy = tf.constant(rng.standard_normal(shape).astype(np.float32))
        want_y, want_g = value_and_grad(lambda t: tf_fake_quant(t, tlo, thi, fmt, ax), xt, dy)
        got_y, got_g = value_and_grad(lambda t: gq_ops.fake_quant(t, fmt, lo, hi), xt, dy)
        assert bits_equal(got_y, want_y), (shape, axis)
        assert np.array_equal(got_g, want_g), (shape, axis)  # (XLA may give +0 for -0)
        traced = tf.function(lambda t, a, b: gq_ops.fake_quant(t, fmt, a, b))
        assert bits_equal(traced(xt, tf.constant(lo), tf.constant(hi)).numpy(), want_y), (shape, axis)


@pytest.mark.parametrize("narrow", [False, True], ids=["wide", "narrow"])
@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_symmetric_fake_quant_equals_tensorflow(bits, narrow, xla):
    rng = np.random.default_rng(100 + bits * 2 + narrow)
    for shape, axis in CASES + [((3, 3, 512, 64), 3), ((3, 3, 32, 1), 2)]:
        fmt = Affine(bits, axis=axis, narrow_range=narrow, symmetric=True)
        ax = None if axis is None else axis % len(shape)
        x = (rng.standard_normal(shape) * 10.0 ** rng.uniform(-4, 2)).astype(np.float32)
        if ax is not None and shape[ax] > 1:
            x[(slice(None),) * ax + (0,)] = 0.0  # an all-zero channel: m = 1e-12
        red = None if ax is None else tuple(i for i in range(len(shape)) if i != ax)
        m = np.maximum(np.abs(x).max(axis=red), np.float32(1e-12)).astype(np.float32)
        xt = tf.constant(x)
        dy = tf.constant(rng.standard_normal(shape).astype(np.float32))
        want_y, want_g = value_and_grad(lambda t: tf_fake_quant(t, -m, m, fmt, ax), xt, dy)
        got_y, got_g = value_and_grad(lambda t: gq_ops.symmetric_fake_quant(t, fmt), xt, dy)
        assert bits_equal(got_y, want_y), (shape, axis)
        assert np.array_equal(got_g, want_g), (shape, axis)  # (XLA may give +0 for -0)
        traced = tf.function(lambda t: gq_ops.symmetric_fake_quant(t, fmt))
        assert bits_equal(traced(xt).numpy(), want_y), (shape, axis)


@pytest.mark.parametrize("activation", ["relu", "relu6"])
def test_fused_activation_equals_tensorflow_ops_in_a_row(activation, xla):
    """fake_quant(x, activation=...) against tf.nn.relu/relu6 then TF's FakeQuant, with
    TensorFlow's gradients of both (ReluGrad/Relu6Grad, FakeQuant's gradient),
    including inputs exactly on 0, on 6 and on the range's ends."""
    act = {"relu": tf.nn.relu, "relu6": tf.nn.relu6}[activation]
    rng = np.random.default_rng(7 if activation == "relu" else 8)
    for shape, axis in [((6, 6, 6, 8), None), ((6, 6, 6, 8), 3), ((6, 8, 5), 1)]:
        ax = None if axis is None else axis % len(shape)
        fmt = Affine(8, axis=axis)
        x = (rng.standard_normal(shape) * 4.0).astype(np.float32)
        n = 1 if ax is None else shape[ax]
        lo = np.zeros(n, np.float32)  # post-ReLU ranges contain zero
        hi = np.linspace(6.5, 2.0, n).astype(np.float32)  # 6 inside the range or not
        bshape = [1] * len(shape)
        if ax is not None:
            bshape[ax] = n
        # whole slabs on the edges: 0, -0, 6, just above 6, each channel's own hi
        for i, v in enumerate([0.0, -0.0, 6.0, np.nextafter(np.float32(6.0), np.float32(7.0))]):
            x[i] = v
        x[4] = np.broadcast_to(hi.reshape(bshape), shape)[4]
        if ax is None:
            lo, hi = lo[0], hi[0]
        xt = tf.constant(x)
        dy = tf.constant(rng.standard_normal(shape).astype(np.float32))
        want_y, want_g = value_and_grad(lambda t: tf_fake_quant(act(t), lo, hi, fmt, ax), xt, dy)
        got_y, got_g = value_and_grad(lambda t: gq_ops.fake_quant(t, fmt, lo, hi, activation=activation), xt, dy)
        assert bits_equal(got_y, want_y), (shape, axis)
        assert np.array_equal(got_g, want_g), (shape, axis)
        assert (got_g == 0).any() and (got_g != 0).any()
        with tf.GradientTape() as tape:
            tape.watch(xt)
            ty = tf.function(lambda t: gq_ops.fake_quant(t, fmt, lo, hi, activation=activation))(xt)
        assert bits_equal(ty.numpy(), want_y)
        assert np.array_equal(tape.gradient(ty, xt, output_gradients=dy).numpy(), want_g)
    with pytest.raises(ValueError, match="activation"):
        gq_ops.fake_quant(tf.constant([1.0]), Affine(8), 0.0, 1.0, activation="gelu")


def test_zero_point_on_a_half_and_just_below(xla):
    """Ranges whose zero point lands on k + 0.5 (std::round goes away from zero) or
    just below 0.5 (floor(z + 0.5) would round up): XLA's simplifier and a naive
    round both move such zero points; TensorFlow's kernel is the oracle."""
    x = tf.constant(np.linspace(-3, 3, 2001, dtype=np.float32))
    ranges = [(-2.4605777, 2.4605777, Affine(4)), (-1.0, 1.0, Affine(4)), (-0.5, 1.0, Affine(2)),
              (-np.float32(0.49999997) / 255, np.float32(1 - 0.49999997 / 255), Affine(8)),
              (-7.5, 7.5, Affine(4)), (-3.0, 5.0, Affine(8, narrow_range=True))]
    for lo, hi, fmt in ranges:
        lo, hi = np.float32(lo), np.float32(hi)
        want = tf.quantization.fake_quant_with_min_max_vars(x, lo, hi, num_bits=fmt.bits, narrow_range=fmt.narrow_range)
        got = gq_ops.fake_quant(x, fmt, lo, hi)
        assert bits_equal(got.numpy(), want.numpy()), (lo, hi, fmt)


def test_range_gets_no_gradient():
    x = tf.constant([-2.0, 0.3, 5.0])
    lo, hi = tf.Variable(-1.0), tf.Variable(1.0)
    with tf.GradientTape() as tape:
        y = gq_ops.fake_quant(x, Affine(8), lo, hi)
    assert tape.gradient(y, [lo, hi]) == [None, None]


def test_bad_arguments():
    with pytest.raises(TypeError, match="float32"):
        gq_ops.fake_quant(tf.constant([1.0], tf.float64), Affine(8), -1.0, 1.0)
    with pytest.raises(ValueError, match="Affine"):
        gq_ops.fake_quant(tf.constant([1.0]), Affine(24), -1.0, 1.0)
    with pytest.raises(ValueError, match="symmetric"):
        gq_ops.symmetric_fake_quant(tf.constant([1.0]), Affine(8))
