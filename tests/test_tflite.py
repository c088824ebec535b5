"""TFLite/LiteRT int8 deployment: export, agreement with the real interpreter, scales, CLI, the tflite_int8 target.

Every test converts a real model with tf.lite.TFLiteConverter and runs the real
LiteRT interpreter (ai-edge-litert); no mocks.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")

import keras  # noqa: E402

import graphquant as gq  # noqa: E402
from graphquant.tflite import multiply_by_quantized_multiplier, quantize_multiplier  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 1), name="input_layer")  # fixed names: Keras numbers unnamed layers per process
    x = keras.layers.Conv2D(8, 3, padding="same")(inp)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    y = keras.layers.Conv2D(8, 3, padding="same")(x)
    y = keras.layers.BatchNormalization()(y)
    y = keras.layers.ReLU(6.0)(y)
    x = keras.layers.Add()([x, y])
    x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(10, name="dense")(x)
    m = keras.Model(inp, out)
    # non-trivial BN statistics (as after training)
    rng = np.random.RandomState(seed)
    for layer in m.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 2, n), rng.uniform(-0.3, 0.3, n), rng.uniform(-0.2, 0.2, n),
                               rng.uniform(0.02, 0.2, n)])
    return m


@pytest.fixture(scope="module")
def data():
    return np.random.RandomState(1).rand(128, 8, 8, 1).astype("float32")


@pytest.fixture(scope="module")
def target_export(tmp_path_factory, data):
    q = gq.quantize_model(_model(), target="tflite_int8", calibration_data=data)
    path = tmp_path_factory.mktemp("t") / "m.tflite"
    report = gq.export_tflite(q, path, check_data=data)
    return q, path, report


def test_quantize_multiplier_matches_tflite_definition():
    for m in (0.5, 0.00123, 0.999999999, 1e-9, 0.75):
        q, shift = quantize_multiplier(m)
        assert 2**30 <= q < 2**31
        assert abs(q * 2.0 ** (shift - 31) - m) <= m * 2**-30
    # M = 2**30 * 2**(-1-31) = 0.25. The reference kernel rounds twice (SaturatingRoundingDoublingHighMul, then
    # RoundingDivideByPOT, both half away from zero): 5 * 0.25 = 1.25 becomes round(2.5) = 3, then round(1.5) = 2
    assert multiply_by_quantized_multiplier([3, -3, 5], 1 << 30, -1).tolist() == [1, -1, 2]
    assert multiply_by_quantized_multiplier([2, -2, 4], 1 << 30, -1).tolist() == [1, -1, 1]
    # std::round rounds a tie (q * 2**31 = k + 1/2) away from zero (Python's round: to even)
    assert quantize_multiplier((2**30 + 0.5) / 2**31) == (2**30 + 1, 0)
    assert quantize_multiplier(0.0) == (0, 0) and quantize_multiplier(2.0**-33) == (0, 0)


def test_quantize_multiplier_tf_equals_the_definition():
    """The TensorFlow form (read from the float64 bits) equals QuantizeMultiplier on random multipliers over 15
    decades, on ties, next to ties, at powers of two, 0 and below 2**-32."""
    import tensorflow as tf

    from graphquant.keras.integer_ops import quantize_multiplier_tf

    rng = np.random.RandomState(0)
    k = rng.randint(2**30, 2**31, 500)
    ties = (k + 0.5) / 2**31
    ms = np.concatenate([rng.uniform(0, 1, 2000), 10 ** rng.uniform(-12, 3, 2000), ties, np.nextafter(ties, 0),
                         np.nextafter(ties, 1), [0.5, 0.25, 1.0, 2.0, 1 - 2**-40, 2**-31, 2**-32, 2**-33, 0.0]])
    q, e = quantize_multiplier_tf(tf.constant(ms, tf.float64))
    want = np.array([quantize_multiplier(m) for m in ms])
    np.testing.assert_array_equal(np.stack([q.numpy(), e.numpy()], 1), want)
    assert (q.numpy()[4000:4500] == k + 1).all()  # every tie rounded up (k + 1 < 2**31 for these k)
    # the requantization's form from the bits: mantissa * 2**(shift - 31) and 2**shift, for every m > 0
    from graphquant.keras.integer_ops import _multiplier_value

    pos = ms > 2.0**-32
    kv, p = _multiplier_value(tf.constant(ms[pos], tf.float64))
    np.testing.assert_array_equal(kv.numpy(), want[pos, 0] * 2.0 ** (want[pos, 1] - 31.0))
    np.testing.assert_array_equal(p.numpy(), 2.0 ** want[pos, 1].astype(float))


def test_target_export_is_fully_integer_and_agrees(target_export, data):
    q, path, report = target_export
    assert path.is_file() and Path(str(path) + ".graphquant.json").is_file()
    assert report.fully_integer and not report.float_ops
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "MEAN", "FULLY_CONNECTED"} <= set(report.ops)
    assert report.graphquant_ranges == 11  # activations: input, 3 conv groups, add, mean, dense; 4 weights
    kernels = {a.kernels for a in report.agreement}
    assert kernels == {"reference", "default"}
    for a in report.agreement:
        assert a.max_diff_lsb <= 1.0, str(report)
        assert a.equal_pct > 90.0, str(report)
        assert a.top1_pct >= 99.0, str(report)
    text = str(report)
    assert "fully integer" in text and "max |diff| LSB" in text
    d = report.to_dict()
    json.dumps(d)
    assert d["agreement"][0]["n"] == len(data)


def test_target_beats_todays_quantization(tmp_path, data, target_export):
    """The same model quantized the old way (bits=8, weights=True) is further from its int8 export."""
    _, _, new = target_export
    old_q = gq.quantize_model(_model(), bits=8, weights=True, calibration_data=data)
    old = gq.export_tflite(old_q, tmp_path / "old.tflite", check_data=data)
    assert old.max_diff_lsb("reference") > new.max_diff_lsb("reference")
    old_eq = min(a.equal_pct for a in old.agreement)
    new_eq = min(a.equal_pct for a in new.agreement)
    assert new_eq > old_eq


def test_scales_use_graphquant_ranges_and_the_multiplier(target_export):
    q, path, _ = target_export
    scales = gq.tflite_scales(path)
    assert [o.op for o in scales.ops] == ["CONV_2D", "CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"]
    conv = scales.ops[0]
    lo, hi = q.get_layer("input_layer_quant").get_range()
    assert conv.input_scale == pytest.approx((hi - lo) / 255, rel=1e-5)  # graphquant's range, not re-calibrated
    assert len(conv.weight_scales) == 8 and set(conv.weight_zero_points) == {0}  # per-channel symmetric
    assert conv.bias_scales == pytest.approx([conv.input_scale * s for s in conv.weight_scales], rel=1e-5)
    for m, q0, sh in zip(conv.multipliers, conv.mantissas, conv.shifts):
        assert q0 * 2.0 ** (sh - 31) == pytest.approx(m, rel=1e-9)
    assert scales.ops[-1].weight_scales and len(scales.ops[-1].weight_scales) == 1  # Dense: per tensor
    # regression: the target's per-channel weight format had axis=-1, a depthwise kernel's multiplier axis (size
    # 1), so all its channels shared one scale (MobileNetV2 diverged by 40-60 output LSBs); axis -2 per channel
    dw = scales.ops[2]
    assert len(dw.weight_scales) == 8 and len(set(dw.weight_scales)) == 8, dw.weight_scales
    assert q.get_layer(dw_name(q)).weight_format.axis == -2
    assert "mantissa" in str(scales)
    json.dumps(scales.to_dict())


def dw_name(q):
    return next(l.name for l in q.layers if isinstance(getattr(l, "conv", None), keras.layers.DepthwiseConv2D))


def test_add_relu_is_one_rounding_point(tmp_path):
    """The converter fuses a ReLU after ADD into the ADD (one int8 tensor): one rounding point, not two."""
    keras.utils.set_random_seed(3)
    inp = keras.Input((6, 6, 4))
    a = keras.layers.Conv2D(4, 3, padding="same")(inp)
    b = keras.layers.Conv2D(4, 1)(inp)
    x = keras.layers.ReLU(name="r1")(keras.layers.Add(name="add")([a, b]))
    out = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x))
    m = keras.Model(inp, out)
    data = np.random.RandomState(3).randn(64, 6, 6, 4).astype("float32")
    q = gq.quantize_model(m, target="tflite_int8", calibration_data=data)
    names = [l.name for l in q.layers if isinstance(l, gq.keras.Quantize)]
    assert "add_quant" not in names and "r1_quant" in names, names
    path = tmp_path / "a.tflite"
    report = gq.export_tflite(q, path, check_data=data)
    assert report.fully_integer, str(report)
    from graphquant.tflite import load_interpreter

    it = load_interpreter(path)
    add = next(op for op in it._get_ops_details() if op["op_name"] == "ADD")
    scale, zp = it.get_tensor_details()[add["outputs"][0]]["quantization"]
    lo, hi = q.get_layer("r1_quant").get_range()
    assert lo == 0 and zp == -128 and scale == pytest.approx(hi / 255, rel=1e-6)  # ADD's output is r1_quant's


def test_compare_tflite_per_layer(target_export, data):
    q, path, _ = target_export
    rep = gq.compare_tflite(q, path, data)
    assert len(rep.rows) == 7 and not rep.unmatched
    assert rep.rows[0].layer == "input_layer_quant" and rep.rows[0].max_diff_lsb == 0
    # the integer arithmetic of the reference kernels (conv, depthwise, ADD, MEAN): every element equal
    # (was up to 2 LSB with a float simulation of the requantization)
    assert all(r.max_diff_lsb == 0 for r in rep.rows), str(rep)
    assert rep.rows[-1].layer == "dense_quant"  # FULLY_CONNECTED: single rounding (was 1 LSB off on ~0.4 %)


def test_whole_model_equals_the_reference_kernels(target_export, data):
    """Every output element of the simulation equals the reference kernels' (BUILTIN_REF) output."""
    _, _, report = target_export
    assert report.exact("reference"), str(report)
    ref = next(a for a in report.agreement if a.kernels == "reference")
    assert ref.max_diff_lsb == 0 and ref.equal_pct == 100.0 and ref.n == len(data)


def test_xnnpack_kernels_equal_the_default_interpreter(target_export, data):
    """kernels="xnnpack": every output element equals the default interpreter's (XNNPACK delegate: conv /
    depthwise / FULLY_CONNECTED requantized in float32 with ties to even, ADD with 20-bit multipliers, MEAN in
    float32); the reference kernels' arithmetic is off on some of them (this model: 65 of 1280)."""
    from graphquant.keras.integer import link_integer
    from graphquant.tflite import load_interpreter, run_interpreter

    q, path, report = target_export
    _, (y_default,) = run_interpreter(load_interpreter(path, "default"), [data])
    sims, own = {}, q._gq_kernels
    try:
        for k in ("reference", "xnnpack"):
            link_integer(q, k)  # predict() traces again with the new kernels
            sims[k] = q.predict(data, verbose=0)
    finally:
        link_integer(q, own)
    assert np.sum(sims["reference"] != y_default) > 0  # the two kernel sets differ on this model
    np.testing.assert_array_equal(sims["xnnpack"], y_default)
    assert report.exact("default"), str(report)  # the export's report simulates the matching kernels
    assert {(a.kernels, a.simulated) for a in report.agreement} == {("reference", "reference"),
                                                                     ("default", "xnnpack")}
    # how far the reference arithmetic is from the default kernels, as the agreement script reports it
    far = gq.tflite.agreement(q, path, data, kernels=("default",), simulated="reference")[0]
    assert far.simulated == "reference" and 0 < far.max_diff_lsb and far.equal_pct < 100


def test_compare_tflite_default_kernels_per_layer(target_export, data):
    """The per-layer report with the default kernels reads the XNNPACK delegate's intermediate tensors (every op
    output made a model output) and compares them with the xnnpack simulation: every element equal."""
    q, path, _ = target_export
    rep = gq.compare_tflite(q, path, data, kernels="default")
    assert rep.kernels == "default" and len(rep.rows) == 7 and not rep.unmatched, str(rep)
    assert all(r.max_diff_lsb == 0 for r in rep.rows), str(rep)
    assert getattr(q, "_gq_kernels") == "xnnpack"  # the model's own choice (the default) is left as it was


def test_default_simulation_predicts_the_default_interpreter(target_export, data):
    """By default the simulated model computes the kernels a default Interpreter runs (the XNNPACK delegate):
    its own outputs, without any relinking, are the interpreter's, element for element."""
    from graphquant.keras.integer_ops import DEFAULT_KERNELS
    from graphquant.tflite import load_interpreter, run_interpreter

    q, path, _ = target_export
    assert DEFAULT_KERNELS == "xnnpack" and q._gq_kernels == DEFAULT_KERNELS
    it = load_interpreter(path, "default")
    _, (want,) = run_interpreter(it, [data])
    scale = it.get_output_details()[0]["quantization"][0]
    got = q.predict(data, verbose=0)
    np.testing.assert_array_equal(np.round(got / scale), np.round(want / scale))
    ref = load_interpreter(path, "reference")  # the other kernel set is not what it predicts, here
    _, (other,) = run_interpreter(ref, [data])
    assert np.any(np.round(got / scale) != np.round(other / scale))


def test_kernels_argument(data):
    with pytest.raises(ValueError, match="kernels must be one of"):
        gq.quantize_model(_model(), target="tflite_int8", kernels="gpu")
    with pytest.raises(ValueError, match="kernels= needs a target"):
        gq.quantize_model(_model(), bits=8, kernels="xnnpack")
    with pytest.raises(ValueError, match="simulated must be one of"):
        gq.tflite.agreement(_model(), b"", data, simulated="default")
    q = gq.quantize_model(_model(), target="tflite_int8", kernels="xnnpack", calibration_data=data)
    from graphquant.keras.integer import link_integer

    with pytest.raises(ValueError, match="kernels must be one of"):
        link_integer(q, "default")
    assert link_integer(q) == link_integer(q, "xnnpack") > 0 and q._gq_kernels == "xnnpack"  # None keeps it


def test_fully_connected_rounds_once():
    """LiteRT's int8 FULLY_CONNECTED rounds acc * M once, ties toward +inf (ruy); conv.h rounds twice."""
    import tensorflow as tf

    from graphquant.keras.integer_ops import _requantize_output, multiply_by_quantized_multiplier_single_tf

    # M = 2**30 * 2**(-1 - 31) = 0.25: 5 * 0.25 = 1.25 -> 1 (double rounding: 2); -6 * 0.25 = -1.5 -> -1 (tie up)
    acc = tf.constant([5, -6, 6, -5], tf.int64)
    m, sh = tf.constant(1 << 30, tf.int64), tf.constant(-1, tf.int64)
    assert multiply_by_quantized_multiplier_single_tf(acc, m, sh).numpy().tolist() == [1, -1, 2, -1]
    inf = tf.constant(np.inf, tf.float32)

    def requantize(shift, a=acc, **kw):  # the simulated conv / FC requantization by 2**30 * 2**(shift - 31)
        mult = tf.constant([2.0 ** (int(shift) - 1)], tf.float64)
        return _requantize_output(tf.cast(a, tf.float32), 0.0, mult, -inf, inf, **kw).numpy().tolist()

    assert requantize(sh, single=True) == [1, -1, 2, -1]
    # beyond the float64 bounds (multiplier below 2**-12 or 2**-13): the int64 kernels
    big = np.array([5, -6, 6, -5, 7, -7, 300, -900]) * 2**13 + 2**12
    for shift, single in ((-13, False), (-14, True)):
        fn = multiply_by_quantized_multiplier_single_tf if single else multiply_by_quantized_multiplier
        want = np.asarray(fn(tf.constant(big) if single else big, m if single else 1 << 30,
                             tf.constant(shift, tf.int64) if single else shift))  # fmt: skip
        got = requantize(tf.constant(shift, tf.int64), big, single=single)
        assert got == want.tolist() and len(set(got)) > 4, (got, want)
    assert requantize(sh) == multiply_by_quantized_multiplier(
        [5, -6, 6, -5], 1 << 30, -1).tolist() == [2, -2, 2, -1]  # fmt: skip


def test_float64_requantization_equals_the_integer_kernels():
    """The float64 requantization (fast path) equals the int64 kernels on every result the int8 clamp keeps,
    ties included, for the shifts where it is used; beyond them the int64 path runs. Under a fused ReLU
    (``nonneg``) its single rounding equals the two on every result the clamp at 0 keeps."""
    import tensorflow as tf

    from graphquant.keras.integer_ops import _requantize_f64, multiply_by_quantized_multiplier_single_tf

    rng = np.random.RandomState(0)
    for shift in (2, 0, -1, -5, -9, -12, -13):
        mant = rng.randint(1 << 30, 1 << 31, size=8).astype(np.int64)
        mant[0] = 1 << 30  # ties happen with a power-of-two multiplier
        acc = rng.randint(-(1 << 24), 1 << 24, size=(4000, 8)).astype(np.int64)
        scale = 2.0 ** (31 - shift) / mant  # accumulators that land near the int8 range
        acc[:2000] = np.round(rng.uniform(-300, 300, size=(2000, 8)) * scale).astype(np.int64)
        acc[:100] = np.round(rng.randint(-300, 300, size=(100, 8)) * scale + scale / 2).astype(np.int64)
        acc[100:120] = np.arange(-10, 10)[:, None]  # around 0 (-1 with mantissa 2**30: x = -1/2, y = 0)
        sh = np.full(8, shift, np.int64)
        for single, nonneg in ((False, False), (True, False), (False, True)):
            if not single and shift < -12:
                continue
            want = (multiply_by_quantized_multiplier_single_tf(tf.constant(acc), tf.constant(mant), tf.constant(sh))
                    .numpy() if single else multiply_by_quantized_multiplier(acc, mant, sh))  # fmt: skip
            k, p = tf.constant(mant * 2.0 ** (sh - 31)), tf.constant(2.0**sh)
            got = _requantize_f64(tf.constant(acc, tf.float64), k, p, single,
                                  nonneg).numpy()  # fmt: skip
            lo = 0 if nonneg else -256  # nonneg (a fused ReLU): exact up to a clamp at 0
            keep = (want >= lo) & (want <= 256)
            assert keep.sum() > 1000
            np.testing.assert_array_equal(got[keep], want[keep], err_msg=f"shift {shift} single {single} {nonneg}")
            assert np.all(np.clip(got, lo, 256) == np.clip(want, lo, 256))
            if nonneg and shift < 0:  # (negative results are not the kernel's, only their clamp; right = 0: they are)
                assert np.any(got != want)


def test_folded_bn_weights_are_the_shipped_weights(target_export):
    """With the BN folded before rounding, every output channel of the exported conv has 127 (or -127) as its
    largest weight: the converter kept graphquant's grid instead of re-rounding BN-scaled weights."""
    from graphquant.tflite import load_interpreter

    _, path, _ = target_export
    it = load_interpreter(path)
    it.allocate_tensors()
    conv_w = [op["inputs"][1] for op in it._get_ops_details() if op["op_name"] == "CONV_2D"]
    for idx in conv_w:
        w = it.get_tensor(idx).reshape(8, -1)
        assert (np.abs(w).max(axis=1) == 127).all()


def test_four_bit_weights_report_the_grid(tmp_path, data):
    q = gq.quantize_model(_model(), target="tflite_int8", weight_bits=4, calibration_data=data)
    report = gq.export_tflite(q, tmp_path / "m4.tflite", check_data=data)
    assert any("4 bits" in n and "at most 15 distinct" in n for n in report.notes), report.notes
    scales = gq.tflite_scales(tmp_path / "m4.tflite")
    # every weight op on the 4-bit grid, FULLY_CONNECTED too (weight_bits=4 left Dense at 8 bits: 32 values)
    assert max(o.weight_levels for o in scales.ops) <= 15, str(scales)
    assert report.exact("reference") and report.exact("default"), str(report)


def _simulated_weight_scales(q):
    """The float32 weight scales the simulation's integer kernels use, per linked weight layer in model order:
    :func:`graphquant.keras.integer_ops.weight_scales` (the function the kernels' operands come from) of each
    layer's operands."""
    from graphquant.keras import integer_ops

    got = []
    for layer in q.layers:
        if getattr(layer, "_gq_integer", None) is not None and hasattr(layer, "_gq_operands"):
            w_float, _, _, fmt, depthwise = integer_ops.layer_operands(layer)
            s_w, _ = integer_ops.weight_scales(w_float, fmt, depthwise)
            got.append(np.atleast_1d(np.asarray(s_w, np.float64).astype(np.float32)))
    return got


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_weight_scales_are_the_stored_ones(tmp_path, data, target_export, bits):
    """The per-channel weight scales of the simulation equal the converter's stored float32 scales bit for bit.
    Regression (4 bits): the export traced the 4-bit step as ``max|w| / 7`` and the simulation used
    ``float32(max|w| / 7)``, but the converter canonicalizes a division by a constant into a multiplication by
    its float32 reciprocal (``m * float32(1/7)``): one or two ulps above on about half the channels, and 1 LSB
    off outputs of the digits CNN now and then."""
    if bits == 8:
        q, path, _ = target_export
    else:
        q = gq.quantize_model(_model(), target="tflite_int8", weight_bits=bits, calibration_data=data)
        path = tmp_path / f"m{bits}.tflite"
        gq.export_tflite(q, path, representative_data=data[:16])
    stored = [np.asarray(o.weight_scales, np.float32) for o in gq.tflite_scales(path).ops]
    sim = _simulated_weight_scales(q)
    assert [len(s) for s in sim] == [len(s) for s in stored] == [8, 8, 8, 1]
    for i, (a, b) in enumerate(zip(sim, stored)):
        np.testing.assert_array_equal(a.view(np.int32), b.view(np.int32), err_msg=f"weight op {i} ({bits} bits)")


def test_freeze_bn_after_switches_to_moving_statistics(data):
    q = gq.quantize_model(_model(), target="tflite_int8", calibration_data=data, freeze_bn_after=2)
    layer = next(l for l in q.layers if isinstance(l, gq.keras.FoldedConvBatchNorm))
    mean0 = layer.bn.moving_mean.numpy().copy()
    for _ in range(2):
        layer(data[:16], training=True)
    mean1 = layer.bn.moving_mean.numpy().copy()
    assert not np.allclose(mean0, mean1)  # batch statistics update the moving averages
    layer(data[16:32], training=True)
    np.testing.assert_array_equal(layer.bn.moving_mean.numpy(), mean1)  # frozen after 2 steps
    with pytest.raises(ValueError, match="freeze_bn_after"):
        gq.quantize_model(_model(), bits=8, freeze_bn_after=3)


def test_target_model_round_trips_and_trains(tmp_path, data):
    from graphquant.keras.integer import link_integer
    from graphquant.keras.integer_ops import kernels_of

    q = gq.quantize_model(_model(), target="tflite_int8", calibration_data=data, kernels="xnnpack")
    q.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    q.fit(data, np.arange(len(data)) % 10, epochs=1, batch_size=32, verbose=0)
    p = tmp_path / "q.keras"
    q.save(p)
    back = keras.models.load_model(p)
    # the file records the kernel set on the input's rounding layer: loading links the integer kernels again
    linked = [layer.name for layer in back.layers if getattr(layer, "_gq_integer", None) is not None]
    assert len(linked) == 6  # 3 conv groups, ADD, MEAN, Dense
    assert linked == [layer.name for layer in q.layers if getattr(layer, "_gq_integer", None) is not None]
    assert {kernels_of(layer) for layer in back.layers if layer.name in linked} == {"xnnpack"}
    np.testing.assert_array_equal(back.predict(data[:8], verbose=0), q.predict(data[:8], verbose=0))
    assert link_integer(back) == link_integer(q) == 7  # and the input's QUANTIZE; idempotent
    assert kernels_of(back) == "xnnpack"
    link_integer(back, "reference")  # switching the set is recorded too
    back.save(tmp_path / "r.keras")
    again = keras.models.load_model(tmp_path / "r.keras")
    assert {kernels_of(layer) for layer in again.layers if layer.name in linked} == {"reference"}
    with pytest.raises(ValueError, match="integer_kernels must be one of"):
        gq.keras.Quantize(integer_kernels="fast")


def test_export_refuses_foreign_files_and_errors(tmp_path, data, target_export):
    q, _, _ = target_export
    foreign = tmp_path / "x.tflite"
    foreign.write_bytes(b"not mine")
    with pytest.raises(ValueError, match="exists"):
        gq.export_tflite(q, foreign, check_data=data[:8])
    with pytest.raises(ValueError, match="not written by graphquant"):
        gq.export_tflite(q, foreign, check_data=data[:8], overwrite=True)
    assert foreign.read_bytes() == b"not mine"
    ok = tmp_path / "ok.tflite"
    gq.export_tflite(q, ok, check_data=data[:8])
    gq.export_tflite(q, ok, check_data=data[:8], overwrite=True)  # graphquant wrote it: replaced
    assert not [p for p in tmp_path.iterdir() if "graphquant-tmp" in p.name]
    with pytest.raises(ValueError, match="inference_input_type"):
        gq.export_tflite(q, tmp_path / "y.tflite", check_data=data[:8], inference_input_type="int4")
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="no graphquant"):
        gq.export_tflite(plain, tmp_path / "z.tflite", check_data=np.zeros((2, 4), "float32"))


def test_float_io_export(tmp_path, data, target_export):
    q, _, _ = target_export
    r = gq.export_tflite(q, tmp_path / "f.tflite", check_data=data[:32], inference_input_type="float32",
                         inference_output_type="float32")
    assert r.input_type == "float32" and r.fully_integer
    assert r.ops.get("QUANTIZE") and r.ops.get("DEQUANTIZE")
    assert all(a.max_diff_lsb <= 1 for a in r.agreement)


def _cli(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "graphquant", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_cli_export_and_compare(tmp_path, data, target_export):
    q, _, _ = target_export
    src = tmp_path / "q.keras"
    q.save(src)
    npz = tmp_path / "x.npz"
    np.savez(npz, x=data[:32])
    out = tmp_path / "m.tflite"
    p = _cli("export-tflite", str(src), str(out), "--check-data", str(npz), "--json", str(tmp_path / "r.json"))
    assert p.returncode == 0, p.stderr
    assert "fully integer" in p.stdout and out.is_file()
    assert json.loads((tmp_path / "r.json").read_text())["fully_integer"] is True
    p = _cli("export-tflite", str(src), str(out), "--check-data", str(npz))
    last = p.stderr.strip().splitlines()[-1]  # (TensorFlow's C++ logging may precede it)
    assert p.returncode == 1 and last.startswith("graphquant export-tflite: error:") and "exists" in last
    assert "Traceback" not in p.stderr
    p = _cli("compare-tflite", str(src), str(out), "--data", str(npz))
    assert p.returncode == 0, p.stderr
    assert "input_layer_quant" in p.stdout
    p = _cli("compare-tflite", str(src), str(tmp_path / "missing.tflite"), "--data", str(npz))
    assert p.returncode == 1 and "no such file" in p.stderr


def test_input_quantization_is_the_runtimes(tmp_path):
    """The model input is rounded as LiteRT's QUANTIZE rounds it (round(x / s) half away from zero, + zp), not
    with FakeQuant's arithmetic (nudged minimum, floor(.. + 1/2)): MobileNet's preprocessing x / 127.5 - 1 with
    the range [-1, 1] puts every pixel on (or within float32 error of) a tie, where the two can disagree by one
    LSB, and deep nets amplify it."""
    keras.utils.set_random_seed(5)
    inp = keras.Input((8, 8, 3), name="input_layer")
    x = keras.layers.Conv2D(6, 3, padding="same", name="conv")(inp)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    out = keras.layers.Dense(4, name="dense")(keras.layers.GlobalAveragePooling2D(name="gap")(x))
    m = keras.Model(inp, out)
    pixels = np.random.RandomState(5).randint(0, 256, size=(64, 8, 8, 3))
    data = (pixels / 127.5 - 1.0).astype("float32")
    q = gq.quantize_model(m, target="tflite_int8", calibration_data=data)
    path = tmp_path / "in.tflite"
    report = gq.export_tflite(q, path, check_data=data)
    rep = gq.compare_tflite(q, path, data)
    first = rep.rows[0]
    assert first.layer == "input_layer_quant", str(rep)
    assert first.max_diff_lsb == 0, str(rep)  # was 1 LSB (FakeQuant's ties go up)
    assert all(r.max_diff_lsb == 0 for r in rep.rows), str(rep)
    assert report.exact("reference"), str(report)
    # the rule itself, on ties: std::round(-2.5) = -3, FakeQuant's floor(-2.5 + 0.5) = -2
    from graphquant.keras.integer import quantize_input_tf

    got = quantize_input_tf(np.float32([-2.5, 2.5, -0.5, 0.49999997, 300.0]), 1.0, 3).numpy()
    assert got.tolist() == [-3.0, 3.0, -1.0, 0.0, 124.0]


def test_average_pool_is_the_runtimes(tmp_path):
    """AVERAGE_POOL_2D keeps its input's scale (integer window mean, rounding half away from zero, SAME padding
    counting only the elements inside), then the converter's int8 -> int8 QUANTIZE to the pool's own range
    (was: a FakeQuant of the float mean at the pool's range, 1+ LSB off)."""
    keras.utils.set_random_seed(7)
    inp = keras.Input((9, 9, 3), name="input_layer")
    x = keras.layers.Conv2D(6, 3, padding="same", name="c1")(inp)
    x = keras.layers.AveragePooling2D(2, name="ap_valid")(x)
    x = keras.layers.AveragePooling2D(3, strides=1, padding="same", name="ap_same")(x)
    x = keras.layers.Conv2D(5, 3, padding="same", name="c2")(x)
    out = keras.layers.Dense(3, name="dense")(keras.layers.GlobalAveragePooling2D(name="gap")(x))
    m = keras.Model(inp, out)
    data = np.random.RandomState(7).randn(64, 9, 9, 3).astype("float32")
    q = gq.quantize_model(m, target="tflite_int8", calibration_data=data)
    names = [l.name for l in q.layers]
    assert "ap_valid_quant" in names and "ap_same_quant" in names, names
    path = tmp_path / "ap.tflite"
    report = gq.export_tflite(q, path, check_data=data)
    assert report.ops.get("AVERAGE_POOL_2D") == 2 and report.fully_integer, str(report)
    for kernels in ("reference", "default"):  # default: the QUANTIZEs are XNNPACK's (8-bit multiplier)
        rep = gq.compare_tflite(q, path, data, kernels=kernels)
        assert all(r.max_diff_lsb == 0 for r in rep.rows), str(rep)
        assert report.exact(kernels), str(report)


@pytest.mark.parametrize("shared_input", [False, True])
def test_concatenate_shares_one_scale(tmp_path, shared_input):
    """CONCATENATION has one scale: an input whose rounding point feeds only the Concatenate is requantized by its
    producer straight to the Concatenate's scale (its own range is dropped); an input used elsewhere too keeps
    its scale and reaches the Concatenate through an int8 -> int8 QUANTIZE. Was: each input rounded at its own
    range, then again at the Concatenate's (0.7 LSB there, 2-4 LSB at the output)."""
    keras.utils.set_random_seed(7)
    inp = keras.Input((8, 8, 3), name="input_layer")
    a = keras.layers.ReLU(name="ra")(keras.layers.Conv2D(4, 3, padding="same", name="ca")(inp))
    b = keras.layers.Conv2D(4, 1, name="cb")(inp)
    x = keras.layers.Conv2D(6, 3, padding="same", name="cc")(keras.layers.Concatenate(name="cat")([a, b]))
    if shared_input:  # `a` also feeds cd: it keeps its own scale, requantized into cat
        x = keras.layers.Concatenate(name="cat2")([x, keras.layers.Conv2D(6, 1, name="cd")(a)])
    out = keras.layers.Dense(3, name="dense")(keras.layers.GlobalAveragePooling2D(name="gap")(x))
    m = keras.Model(inp, out)
    data = np.random.RandomState(7).randn(64, 8, 8, 3).astype("float32")
    q = gq.quantize_model(m, target="tflite_int8", calibration_data=data)
    path = tmp_path / "cat.tflite"
    report = gq.export_tflite(q, path, check_data=data)
    assert report.fully_integer, str(report)
    assert ("QUANTIZE" in report.ops) == shared_input, report.ops  # the converter's requantization of `a`
    for kernels in ("reference", "default"):  # default: XNNPACK's QUANTIZE (8-bit multiplier)
        rep = gq.compare_tflite(q, path, data, kernels=kernels)
        assert all(r.max_diff_lsb == 0 for r in rep.rows), str(rep)
        assert report.exact(kernels), str(report)


def test_nested_concatenate_and_max_pool(tmp_path):
    """A Concatenate's own output point keeps its range when it feeds another Concatenate (the converter
    requantizes it into the outer scale: no chain of shared scales), and so does a point that reaches a
    Concatenate through a MaxPooling; the conv outputs that feed only a Concatenate take its scale."""
    keras.utils.set_random_seed(8)
    inp = keras.Input((8, 8, 3), name="input_layer")
    a = keras.layers.Conv2D(4, 3, padding="same", name="ca")(inp)
    b = keras.layers.ReLU(name="rb")(keras.layers.Conv2D(4, 1, name="cb")(inp))
    wide = keras.initializers.RandomNormal(stddev=2.0)  # cat2's range is wider than cat1's
    c = keras.layers.Conv2D(4, 3, padding="same", name="cc", kernel_initializer=wide)(inp)
    x = keras.layers.Concatenate(name="cat2")([keras.layers.Concatenate(name="cat1")([a, b]), c])
    p = keras.layers.MaxPooling2D(2, name="mp")(keras.layers.Conv2D(4, 1, name="ce")(inp))
    x = keras.layers.Concatenate(name="cat3")([keras.layers.MaxPooling2D(2, name="mp2")(x), p])
    x = keras.layers.Conv2D(6, 3, padding="same", name="cd")(x)
    out = keras.layers.Dense(3, name="dense")(keras.layers.GlobalAveragePooling2D(name="gap")(x))
    m = keras.Model(inp, out)
    data = np.random.RandomState(8).randn(64, 8, 8, 3).astype("float32")
    q = gq.quantize_model(m, target="tflite_int8", calibration_data=data)
    path = tmp_path / "cat3.tflite"
    report = gq.export_tflite(q, path, check_data=data)
    assert report.ops.get("CONCATENATION") == 3 and report.ops.get("QUANTIZE") == 3, report.ops
    rep = gq.compare_tflite(q, path, data)
    rows = {r.layer: r for r in rep.rows}
    lo1, hi1 = q.get_layer("cat1_quant").get_range()
    lo2, hi2 = q.get_layer("cat2_quant").get_range()
    assert hi2 - lo2 > 1.5 * (hi1 - lo1)  # cat2's scale differs from cat1's
    assert rows["ca_quant"].scale == rows["cat1_quant"].scale == pytest.approx((hi1 - lo1) / 255, rel=1e-6)
    assert rows["cc_quant"].scale == rows["cat2_quant"].scale == pytest.approx((hi2 - lo2) / 255, rel=1e-6)
    assert all(r.max_diff_lsb == 0 for r in rep.rows), str(rep)
    assert report.exact("reference"), str(report)
    rep = gq.compare_tflite(q, path, data, kernels="default")  # XNNPACK's QUANTIZEs (8-bit multiplier)
    assert all(r.max_diff_lsb == 0 for r in rep.rows), str(rep)
    assert report.exact("default"), str(report)


def _se_block(kind, seed=11):
    """A tiny model around one EfficientNet op: ``swish`` (conv -> BN -> Activation("swish")), ``inline_silu``
    (Conv2D(activation="silu")), ``sigmoid`` (Conv2D(activation="sigmoid")) or ``se_multiply`` (a
    squeeze-and-excitation Multiply of [N, H, W, C] by [N, 1, 1, C], with Reshape and Dropout)."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 3), name="input_layer")
    x = keras.layers.Conv2D(8, 3, padding="same", name="c1")(inp)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    if kind == "swish":
        x = keras.layers.Activation("swish", name="act")(x)
    elif kind == "inline_silu":
        x = keras.layers.Conv2D(8, 1, activation="silu", name="c2")(x)
    elif kind == "sigmoid":
        x = keras.layers.Conv2D(8, 1, activation="sigmoid", name="c2")(x)
    else:
        x = keras.layers.ReLU(name="r1")(x)
        s = keras.layers.Reshape((1, 1, 8), name="rs")(keras.layers.GlobalAveragePooling2D(name="gap1")(x))
        s = keras.layers.ReLU(name="r2")(keras.layers.Conv2D(8, 1, name="se")(s))  # a ReLU: no LOGISTIC here
        x = keras.layers.Dropout(0.2, name="drop")(keras.layers.Multiply(name="mul")([x, s]))
    x = keras.layers.Conv2D(6, 3, padding="same", name="c3")(x)
    out = keras.layers.Dense(3, name="dense")(keras.layers.GlobalAveragePooling2D(name="gap")(x))
    m = keras.Model(inp, out)
    bn = m.get_layer("bn1")
    rng = np.random.RandomState(seed)
    bn.set_weights([rng.uniform(0.5, 2, 8), rng.uniform(-1, 1, 8), rng.uniform(-0.2, 0.2, 8),
                    rng.uniform(0.02, 0.2, 8)])  # fmt: skip
    return m


@pytest.mark.parametrize("kind,op,points", [
    ("swish", "LOGISTIC", ["bn1_quant", "act_quant"]),
    ("inline_silu", "LOGISTIC", ["c2_quant", "c2_activation_quant"]),
    ("sigmoid", "LOGISTIC", ["c2_quant", "c2_activation_quant"]),
    ("se_multiply", "MUL", ["mul_quant"]),
])  # fmt: skip
def test_efficientnet_ops_equal_both_kernel_sets(tmp_path, kind, op, points):
    """EfficientNet's ops at the runtime's rounding points, in its integer arithmetic: swish converts to LOGISTIC
    (output scale 1/256, zero point -128; LiteRT fills a float32 lookup table) then MUL, so the conv before it
    rounds its own output (was: the converter calibrated that tensor itself, and the swish ran in float); a conv's
    own sigmoid/silu is split into a layer after a rounding point, as the converter emits it; Multiply (broadcast,
    squeeze-and-excitation) is the reference MUL. Every tensor and output element equals the reference kernels'
    (was 1-3 LSB). With kernels="xnnpack" every tensor and output element equals the default interpreter's
    (XNNPACK delegate: LOGISTIC's table from a double exp rounded to even, MUL requantized in float32, the
    int8 -> int8 QUANTIZE with an 8-bit multiplier), where the reference arithmetic is off by 1-2 LSB."""
    m = _se_block(kind)
    data = np.random.RandomState(12).randn(64, 8, 8, 3).astype("float32")
    q = gq.quantize_model(m, target="tflite_int8", calibration_data=data)
    names = [l.name for l in q.layers if isinstance(l, gq.keras.Quantize)]
    assert set(points) <= set(names), names
    path = tmp_path / f"{kind}.tflite"
    report = gq.export_tflite(q, path, check_data=data)
    assert report.fully_integer and report.ops.get(op), str(report)
    for kernels in ("reference", "default"):
        rep = gq.compare_tflite(q, path, data, kernels=kernels)
        rows = {r.layer: r for r in rep.rows}
        assert set(points) <= set(rows), str(rep)
        assert all(r.max_diff_lsb == 0 for r in rep.rows), str(rep)
        assert report.exact(kernels), str(report)
    if kind != "sigmoid":  # the reference arithmetic is off the delegate's outputs (sigmoid: equal on this data)
        far = gq.tflite.agreement(q, path, data, kernels=("default",), simulated="reference")[0]
        assert far.max_diff_lsb > 0, str(far)


def _logistic_quantize_model(in_range, out_range, n=256):
    """A ``.tflite`` with one int8 LOGISTIC (input FakeQuant range ``in_range``), then, when ``out_range`` is not
    LOGISTIC's own ``(0, 255/256)``, the converter's int8 -> int8 QUANTIZE to it."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([1, n], tf.float32)])
    def fn(x):
        x = tf.quantization.fake_quant_with_min_max_args(x, *in_range, num_bits=8)
        return tf.quantization.fake_quant_with_min_max_args(tf.sigmoid(x), *out_range, num_bits=8)

    conv = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.inference_input_type = conv.inference_output_type = tf.int8
    return conv.convert()


def _run_int8(content, kernels, q_in):
    from graphquant.tflite import load_interpreter

    it = load_interpreter(content, kernels)
    it.allocate_tensors()
    d_in, d_out = it.get_input_details()[0], it.get_output_details()[0]
    it.set_tensor(d_in["index"], q_in[None].astype(np.int8))
    it.invoke()
    ops = {o["op_name"] for o in it._get_ops_details()}
    return it.get_tensor(d_out["index"])[0].astype(np.int64), d_in["quantization"], d_out["quantization"], ops


@pytest.mark.parametrize("scale,zp", [(0.0190216806, 19), (0.27810356, 34), (0.0652828664, -2),
                                      (0.0445631072, 36)])  # fmt: skip
def test_xnnpack_logistic_table(scale, zp):
    """The default interpreter's int8 LOGISTIC (XNNPACK delegate) on all 256 inputs equals
    ``_xnnpack_logistic``: at these input scales its table differs from the reference kernels' by 1-2 entries
    (ties and float32 expf against a double exp), and the reference kernels' output equals ``logistic_int8_tf``
    there."""
    from graphquant.keras.integer_ops import _xnnpack_logistic, logistic_int8_tf

    content = _logistic_quantize_model(((-128 - zp) * scale, (127 - zp) * scale), (0.0, 255.0 / 256.0))
    q = np.arange(-128, 128)
    got = {}
    for kernels in ("reference", "default"):
        got[kernels], (s_in, z_in), (s_out, z_out), ops = _run_int8(content, kernels, q)
        assert (s_out, z_out) == (1.0 / 256.0, -128) and "LOGISTIC" in ops
    assert "DELEGATE" in ops  # the default interpreter: LOGISTIC taken by XNNPACK
    v = q - z_in
    xnn = _xnnpack_logistic(v, np.float64(s_in)).numpy() - 128
    ref = logistic_int8_tf(v, np.float64(s_in)).numpy() - 128
    np.testing.assert_array_equal(xnn, got["default"])
    np.testing.assert_array_equal(ref, got["reference"])
    assert np.sum(xnn != ref) > 0  # the two tables differ at this scale


@pytest.mark.parametrize("out_range", [(-0.1, 1.3), (-0.25, 0.9), (0.0, 1.0), (-0.3 / 1.1, 255.0 / 1.1),
                                       (-0.5, 300.0)])  # fmt: skip
def test_xnnpack_quantize_after_logistic(out_range):
    """The int8 -> int8 QUANTIZE the converter puts after LOGISTIC when the sigmoid's range is not (0, 255/256):
    the default interpreter (XNNPACK's qs8 convert, an 8-bit multiplier) equals ``_xnnpack_requantize_int8``
    on every LOGISTIC output value; the reference kernels' arithmetic (``_requantize_int8``) differs. Below a
    scale ratio of 2**-8 (the last range) the delegate leaves QUANTIZE to LiteRT: the reference arithmetic."""
    from graphquant.keras.integer_ops import _requantize_int8, _xnnpack_logistic, _xnnpack_requantize_int8

    q = np.tile(np.arange(-128, 128), 4)
    content = _logistic_quantize_model((-12.0, 12.0), out_range, n=q.size)
    y, (s_in, z_in), (s_out, z_out), ops = _run_int8(content, "default", q)
    assert {"LOGISTIC", "QUANTIZE", "DELEGATE"} <= ops
    sig = _xnnpack_logistic(q - z_in, np.float64(s_in))  # q + 128 at scale 1/256
    s_sig = np.float64(1.0 / 256.0)
    xnn = _xnnpack_requantize_int8(sig, s_sig, np.float64(s_out), np.float64(z_out)).numpy() + z_out
    np.testing.assert_array_equal(xnn, y)
    ref = _requantize_int8(sig, s_sig, np.float64(s_out), np.float64(z_out)).numpy() + z_out
    if np.float32(s_sig) / np.float32(s_out) >= 2.0**-8:
        assert np.sum(ref != y) > 0
    else:
        np.testing.assert_array_equal(ref, y)



@pytest.mark.parametrize("ranges", [((-3.2235487, 3.5450425), (-3.9251642, 3.297055), (-4.768876, 6.683175)),
                                    ((-2.0316, 3.6212), (-3.8728, 1.842), (-6.7504, 5.1734))])  # fmt: skip
def test_mul_kernels_on_every_input_pair(ranges):
    """An int8 MUL on all 65,536 input pairs: the reference kernels equal ``_mul_int8`` (its multiplier
    ``s1 * s2 / s_out`` computed in float32, as ``mul.cc`` does; with the first ranges a multiplier computed in
    double is off on a few pairs), the default interpreter (XNNPACK) equals ``_xnnpack_mul``, and the two kernel
    sets differ on hundreds of pairs."""
    import tensorflow as tf

    from graphquant.keras.integer_ops import _mul_int8, _xnnpack_mul
    from graphquant.tflite import load_interpreter

    ra, rb, ro = ranges

    @tf.function(input_signature=[tf.TensorSpec([1, 65536], tf.float32)] * 2)
    def fn(x, y):
        x = tf.quantization.fake_quant_with_min_max_args(x, *ra)
        y = tf.quantization.fake_quant_with_min_max_args(y, *rb)
        return tf.quantization.fake_quant_with_min_max_args(x * y, *ro)

    conv = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.inference_input_type = conv.inference_output_type = tf.int8
    content = conv.convert()
    a, b = np.repeat(np.arange(-128, 128), 256), np.tile(np.arange(-128, 128), 256)
    out = {}
    for kernels in ("reference", "default"):
        it = load_interpreter(content, kernels)
        it.allocate_tensors()
        d_a, d_b = sorted(it.get_input_details(), key=lambda d: d["name"])
        d_o = it.get_output_details()[0]
        it.set_tensor(d_a["index"], a[None].astype(np.int8))
        it.set_tensor(d_b["index"], b[None].astype(np.int8))
        it.invoke()
        out[kernels] = it.get_tensor(d_o["index"])[0].astype(np.int64)
        assert [o["op_name"] for o in it._get_ops_details()][0] == "MUL"
    (sa, za), (sb, zb), (so, zo) = d_a["quantization"], d_b["quantization"], d_o["quantization"]
    va, vb = a - za, b - zb
    args = (np.float64(sa), np.float64(sb), np.float64(so), np.float64(zo))
    for fn_, kernels in ((_mul_int8, "reference"), (_xnnpack_mul, "default")):
        sim = np.round(fn_(va, vb, *args).numpy().astype(np.float64) / np.float32(so)) + zo
        np.testing.assert_array_equal(sim, out[kernels])
    assert np.sum(out["reference"] != out["default"]) > 100
    if ranges[0] == (-3.2235487, 3.5450425):
        m, sh = quantize_multiplier(float(np.float64(np.float32(sa)) * np.float32(sb) / np.float32(so)))
        f64 = np.clip(multiply_by_quantized_multiplier(va * vb, m, sh) + zo, -128, 127)
        assert 0 < np.sum(f64 != out["reference"]) < 20

def test_split_activations_is_the_same_model():
    """split_activations rebuilds a conv with its own sigmoid as conv (linear) -> Activation("sigmoid"): the same
    outputs and weights; the source model is untouched; ReLU (fused by the converter) is not split."""
    from graphquant.keras.split import split_activations

    keras.utils.set_random_seed(4)
    inp = keras.Input((6, 6, 3), name="input_layer")
    x = keras.layers.Conv2D(4, 3, activation="relu", name="c1")(inp)
    x = keras.layers.Conv2D(4, 1, activation="sigmoid", name="c2")(x)
    m = keras.Model(inp, keras.layers.Dense(2, activation="silu", name="d")(x))
    x0 = np.random.RandomState(4).randn(4, 6, 6, 3).astype("float32")
    s, names = split_activations(m)
    assert names == ["c2", "d"]
    assert [l.name for l in s.layers] == ["input_layer", "c1", "c2", "c2_activation", "d", "d_activation"]
    assert s.get_layer("c2").activation.__name__ == "linear" and s.get_layer("c1").activation.__name__ == "relu"
    np.testing.assert_allclose(s.predict(x0, verbose=0), m.predict(x0, verbose=0), rtol=1e-6, atol=1e-6)
    assert m.get_layer("c2").activation.__name__ == "sigmoid" and len(m.get_layer("c2")._inbound_nodes) == 1
    assert split_activations(s) == (s, [])
    q = gq.quantize_model(m, target="tflite_int8", calibration_data=x0)
    assert any("(c2, d)" in n and "_activation" in n for n in q._graphquant_plan.notes), q._graphquant_plan.notes
    assert {"c2_quant", "c2_activation_quant", "d_quant", "d_activation_quant"} <= {l.name for l in q.layers}


def test_input_rescaling_is_a_rounding_point(tmp_path):
    """EfficientNet's input preprocessing (Rescaling(1/255), then ZeroPadding before the stem conv) converts to a
    MUL by a constant with an int8 output: graphquant rounds there (was: the converter calibrated that tensor
    itself), and the model equals the reference kernels."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((9, 9, 3), name="input_layer")
    x = keras.layers.Rescaling(1 / 255.0, name="resc")(inp)
    x = keras.layers.ZeroPadding2D(((0, 1), (0, 1)), name="pad")(x)
    x = keras.layers.Conv2D(8, 3, strides=2, use_bias=False, name="c1")(x)
    x = keras.layers.Activation("swish", name="sw")(keras.layers.BatchNormalization(name="bn1")(x))
    out = keras.layers.Dense(3, name="dense")(keras.layers.GlobalAveragePooling2D(name="gap")(x))
    m = keras.Model(inp, out)
    data = (np.random.RandomState(0).rand(64, 9, 9, 3) * 255).astype("float32")
    q = gq.quantize_model(m, target="tflite_int8", calibration_data=data)
    path = tmp_path / "resc.tflite"
    report = gq.export_tflite(q, path, check_data=data)
    assert report.fully_integer and report.ops.get("MUL") == 2, str(report)  # the Rescaling's and the swish's
    rows = {r.layer: r for r in gq.compare_tflite(q, path, data).rows}
    assert "resc_quant" in rows and all(r.max_diff_lsb == 0 for r in rows.values()), rows
    assert report.exact("reference"), str(report)


def test_uncovered_op_gets_a_plan_note():
    """A layer the target does not cover (here Maximum) gets no rounding point and a plan note naming it; the
    ops of EfficientNetB0, MobileNetV2 and ResNet50 are all covered (checked on EfficientNetB0, whose
    squeeze-and-excitation convs have their own sigmoid/silu)."""
    from graphquant.keras.split import split_activations
    from graphquant.targets import TFLITE_INT8, uncovered_layers

    keras.utils.set_random_seed(2)
    inp = keras.Input((6, 6, 3), name="input_layer")
    a = keras.layers.Conv2D(4, 3, name="ca")(inp)
    b = keras.layers.Conv2D(4, 3, name="cb")(inp)
    x = keras.layers.Maximum(name="mx")([a, b])
    m = keras.Model(inp, keras.layers.Dense(2, name="dense")(keras.layers.GlobalAveragePooling2D(name="gap")(x)))
    data = np.random.RandomState(2).randn(16, 6, 6, 3).astype("float32")
    q = gq.quantize_model(m, target="tflite_int8", calibration_data=data)
    assert "mx_quant" not in {l.name for l in q.layers}
    notes = [n for n in q._graphquant_plan.notes if "does not cover Maximum (mx)" in n]
    assert len(notes) == 1 and "not fully integer" in notes[0], q._graphquant_plan.notes
    assert uncovered_layers(TFLITE_INT8, m) == {"Maximum": ["mx"]}
    eff = keras.applications.EfficientNetB0(weights=None, input_shape=(32, 32, 3), classes=10)
    assert uncovered_layers(TFLITE_INT8, split_activations(eff)[0]) == {}
    assert "Multiply" in {type(l).__name__ for l in eff.layers}


def test_swish_trains_on_the_logistic_grid():
    """While training, a linked swish/sigmoid rounds its sigmoid to LOGISTIC's output grid (1/256) with a
    straight-through gradient (the float swish had no rounding there); the gradient is the float one."""
    import tensorflow as tf

    m = _se_block("swish")
    data = np.random.RandomState(12).randn(16, 8, 8, 3).astype("float32")
    q = gq.quantize_model(m, target="tflite_int8", calibration_data=data)
    act = q.get_layer("act")
    x = tf.constant(np.random.RandomState(3).randn(4, 8, 8, 8).astype("float32") * 3)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = act(x, training=True)
    sig = 1 / (1 + np.exp(-x.numpy().astype(np.float64)))
    rounded = np.minimum(np.floor(sig * 256 + 0.5), 255) / 256  # LOGISTIC's largest output is 255/256
    want = x.numpy() * rounded
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-6, atol=1e-6)
    assert np.abs(y.numpy() - keras.activations.silu(x).numpy()).max() > 1e-3  # not the float swish
    g = tape.gradient(y, x).numpy()
    s = tf.sigmoid(x).numpy().astype(np.float64)
    # d/dx x * (sigmoid + stop_gradient(rounded - sigmoid)) = rounded + x * sigmoid'
    np.testing.assert_allclose(g, rounded + x.numpy() * s * (1 - s), rtol=1e-5, atol=1e-5)


def test_relu6_clamps_on_the_integers_where_the_range_reaches_past_6(tmp_path, data):
    """The converter fuses a ReLU6 into its conv: the runtime clamps at ``zp + round(6 / s)``. An output range
    wider than [0, 6] (as QAT may learn) and pre-activations beyond 6 make that clamp bite; the simulation's
    integer kernel applies it on the integers (its ReLU6 and rounding layers pass the result through), and agrees
    with the interpreter on every element, with both kernel sets."""
    q = gq.quantize_model(_model(), target="tflite_int8", calibration_data=data)
    relu6 = next(layer for layer in q.layers if type(layer).__name__ == "ReLU" and layer.max_value == 6.0)
    point = relu6._outbound_nodes[0].operation
    conv = relu6._inbound_nodes[0].input_tensors[0]._keras_history.operation
    conv.conv.kernel.assign(conv.conv.kernel * 20.0)  # pre-activations well past 6
    point.set_range(0.0, 8.0)
    out = keras.Model(q.input, point.output)(data, training=False).numpy()
    top = np.round(6.0 / (8.0 / 255)) * (8.0 / 255)  # the grid point nearest 6 (191 steps)
    assert np.isclose(out.max(), top, rtol=1e-6, atol=0)
    assert np.isclose(out, top, rtol=1e-6, atol=0).mean() > 0.05  # the clamp bites
    report = gq.export_tflite(q, tmp_path / "m.tflite", check_data=data)  # (each kernel set against its own)
    assert report.exact("reference") and report.exact("default"), str(report)


def test_small_multipliers_take_the_int64_kernels_and_stay_exact(tmp_path):
    """Long sums of same-signed products (3x3x64 taps, positive inputs and mostly positive weights) make the
    output range wide against ``s_in * s_w``: multipliers below 2**-13 (shift -13 or less), where the float64
    form of the requantization is not exact. The reference simulation switches those layers to the int64
    kernels (a ``tf.cond`` between two XLA launches). With a fused ReLU and without, every tensor and output
    element equals the interpreter's, with both kernel sets."""
    keras.utils.set_random_seed(5)
    inp = keras.Input((8, 8, 64), name="input_layer")
    x = keras.layers.ReLU(name="relu")(keras.layers.Conv2D(64, 3, padding="same", name="wide_relu")(inp))
    x = keras.layers.Conv2D(8, 3, padding="same", name="wide_linear")(x)
    out = keras.layers.Dense(3, name="dense")(keras.layers.GlobalAveragePooling2D(name="gap")(x))
    m = keras.Model(inp, out)
    for name, shift in (("wide_relu", 0.0), ("wide_linear", 0.3)):
        kernel, bias = m.get_layer(name).get_weights()
        m.get_layer(name).set_weights([np.abs(kernel) - shift * np.abs(kernel).max(), bias])
    data = np.random.RandomState(5).rand(64, 8, 8, 64).astype("float32")
    q = gq.quantize_model(m, target="tflite_int8", calibration_data=data)
    path = tmp_path / "wide.tflite"
    report = gq.export_tflite(q, path, check_data=data)
    convs = [o for o in gq.tflite_scales(path).ops if o.op == "CONV_2D"]
    assert len(convs) == 2 and all(max(o.shifts) <= -13 for o in convs), str(gq.tflite_scales(path))
    assert report.exact("reference") and report.exact("default"), str(report)
    rep = gq.compare_tflite(q, path, data)
    rows = {r.layer: r for r in rep.rows}
    assert {"relu_quant", "wide_linear_quant"} <= set(rows), str(rep)
    assert all(r.max_diff_lsb == 0 for r in rep.rows), str(rep)
    for name in ("relu_quant", "wide_linear_quant"):  # layers whose outputs spread over the int8 range
        sim = keras.Model(q.input, q.get_layer(name).output)(data, training=False).numpy()
        assert len(np.unique(sim)) > 50, name


def _same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("kernels,bits", [("reference", 8), ("xnnpack", 4)])
def test_xla_preparation_equals_tensorflow_ops(kernels, bits):
    """The integer operands of every linked layer (int8 weights, int32 bias, multipliers, clamps, the scales of
    every rounding point), computed for the whole model in one XLA launch, equal TensorFlow's kernels' values
    bit for bit on keras.applications MobileNetV2 (53 conv / depthwise / Dense layers, BN folded, ReLU6,
    per-channel and per-tensor weight scales). XLA's rsqrt differs from TensorFlow's (on 15 % of float32 inputs;
    this test fails with the fold's rsqrt inside the XLA function) and XLA rewrites a division by a constant into
    a product by its reciprocal (9 % of random float64 quotients an ulp off); the preparation keeps both out of
    XLA's reach."""
    import tensorflow as tf

    from graphquant.keras import integer_ops as io

    keras.utils.set_random_seed(3)
    m = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10,
                                       classifier_activation=None)  # fmt: skip
    rng = np.random.RandomState(3)
    for layer in m.layers:  # non-trivial BN statistics (as after training)
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 2, n), rng.uniform(-0.3, 0.3, n), rng.uniform(-0.2, 0.2, n),
                               rng.uniform(0.02, 0.2, n)])
    x = rng.uniform(-1, 1, (16, 32, 32, 3)).astype("float32")
    q = gq.quantize_model(m, target="tflite_int8", calibration_data=x, kernels=kernels, weight_bits=bits)
    layers = [l for l in q.layers if getattr(l, "_gq_integer", None) is not None and hasattr(l, "_gq_operands")]
    assert len(layers) == 53
    groups = {}
    for layer in layers:
        groups.setdefault(layer._gq_operands()[3], []).append(layer)
    assert len(groups) == 3  # conv, depthwise (per channel on axis -2) and Dense (per tensor) weight formats
    for fmt, group in groups.items():
        ops = [layer._gq_operands() for layer in group]
        fused = io._prepare_batch(group, ops, xla=True)
        plain = io._prepare_batch(group, ops, xla=False)
        for layer, a, b in zip(group, fused, plain):
            fa, fb = tf.nest.flatten(a), tf.nest.flatten(b)
            assert len(fa) == len(fb)
            for i, (u, v) in enumerate(zip(fa, fb)):
                assert _same_bits(u, v), f"{layer.name}: operand {i} ({fmt}, {kernels})"
    points = [l for l in q.layers if hasattr(l, "_gq_points")]
    ranges = [tf.convert_to_tensor(p.range.value)[:2] for p in points]
    levels = tf.constant(255.0, tf.float64)
    for u, v in zip(io._qparams_fn(ranges, levels), io._qparams_of(ranges, levels)):
        assert _same_bits(u, v)
    # and the model's inference (one launch per kind, every operand from it) equals the eager kernels' output
    y_traced = tf.function(lambda t: q(t, training=False))(x)
    np.testing.assert_array_equal(np.asarray(y_traced), np.asarray(q(x, training=False)))
