"""graphquant.compare: per-layer error reports on real Keras models and SavedModels."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import graphquant as gq
from graphquant.compare import CompareReport, compare
from graphquant.graph import convert_saved_model
from graphquant.keras import Quantize, quantize_model
from graphquant.ranges import _all_layers

RNG = np.random.RandomState(0)
DATA = RNG.uniform(0.0, 1.0, (48, 8, 8, 1)).astype("float32")


def _sqnr(ref, out):
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    return 10.0 * math.log10(np.sum(ref**2) / np.sum((out - ref) ** 2))


def small_cnn(nested: bool = True) -> keras.Model:
    keras.utils.set_random_seed(0)
    x = keras.Input((8, 8, 1), name="image")
    h = keras.layers.Conv2D(6, 3, padding="same", name="c1")(x)
    h = keras.layers.BatchNormalization(name="bn1")(h)
    h = keras.layers.ReLU(name="r1")(h)
    if nested:
        block = keras.Sequential(
            [keras.Input((8, 8, 6)), keras.layers.Conv2D(6, 3, padding="same", name="c2"), keras.layers.ReLU(name="r2")],
            name="block",
        )
        h = block(h)
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c3")(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    out = keras.layers.Dense(10, name="logits")(h)
    model = keras.Model(x, out, name="small_cnn")
    for layer in model.layers:  # data-like batch-norm statistics instead of the identity
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(np.full(6, 0.05, "float32"))
            layer.moving_variance.assign(np.full(6, 0.5, "float32"))
    return model


@pytest.fixture(scope="module")
def cnn():
    return small_cnn()


# --------------------------------------------------------------------------- Keras
def test_keras_points_match_quantize_layers_and_oracle(cnn):
    fmt = gq.FixedPoint(4, range=(0.0, 0.5))
    q = quantize_model(cnn, bits=4, range=(0.0, 0.5))
    rep = compare(cnn, q, DATA, batch_size=20)
    assert isinstance(rep, CompareReport)
    assert rep.samples == 48 and rep.batches == 3
    quant_layers = [l for l in _all_layers(q) if isinstance(l, Quantize)]
    assert len(rep.points) == len(quant_layers) == 3
    assert [p.layer for p in rep.points] == ["r1", "block/r2", "c3"]
    assert all(p.format == "fixed4[0,0.5]" for p in rep.points)

    # the first rounding sees exactly the float tensor: an independent oracle
    ref = keras.Model(cnn.input, cnn.get_layer("r1").output).predict(DATA, verbose=0)
    expect = gq.quantize(tf.constant(ref), fmt).numpy()
    first = rep.points[0]
    assert first.sqnr_db == pytest.approx(_sqnr(ref, expect), abs=1e-6)
    assert first.local_sqnr_db == pytest.approx(first.sqnr_db, abs=1e-9)
    assert first.max_abs == pytest.approx(float(np.max(np.abs(expect - ref))), rel=1e-5)
    assert first.mean_abs == pytest.approx(float(np.mean(np.abs(expect - ref))), rel=1e-5)
    assert fmt.max_value == 0.5 - 0.5 / 16  # the grid's largest value: beyond it, values saturate
    assert first.clipped == pytest.approx(float(np.mean(ref > fmt.max_value)))
    assert 0.0 < first.clipped < 1.0
    # later points accumulate earlier errors: their error against the float model exceeds their own
    assert rep.points[1].sqnr_db < rep.points[1].local_sqnr_db

    out = rep.outputs[0]
    f = cnn.predict(DATA, verbose=0)
    g = q.predict(DATA, verbose=0)
    assert out.name == "logits"
    assert out.sqnr_db == pytest.approx(_sqnr(f, g), abs=1e-4)
    assert out.top1_agreement == pytest.approx(float(np.mean(f.argmax(-1) == g.argmax(-1))))


def test_keras_more_bits_less_error(cnn):
    reps = {}
    for bits in (4, 8):
        q = quantize_model(cnn, bits=bits, weights=True, calibration_data=DATA[:16])
        reps[bits] = compare(cnn, q, DATA)
    for p4, p8 in zip(reps[4].points, reps[8].points):
        assert p8.sqnr_db > p4.sqnr_db + 10.0  # ~6 dB per bit
        assert p8.format == "affine8" and p4.format == "affine4"
    assert reps[8].outputs[0].sqnr_db > reps[4].outputs[0].sqnr_db
    # calibrated on the first 16 samples: inputs beyond that range get clipped, a little
    assert all(p.clipped is not None and p.clipped < 0.05 for p in reps[8].points)


def test_keras_float_format_and_report_outputs(cnn, tmp_path):
    q = quantize_model(cnn, format="e4m3")
    rep = compare(cnn, q, DATA, steps=1, batch_size=16)
    assert rep.samples == 16
    assert [p.format for p in rep.points] == ["e4m3"] * 3
    assert [p.rounding for p in rep.points] == ["nearest"] * 3
    rep_sr = compare(cnn, quantize_model(cnn, format="e4m3", rounding="stochastic", inference_rounding="up"),
                     DATA, steps=1, batch_size=16)
    assert [p.rounding for p in rep_sr.points] == ["up"] * 3  # inference rounding is what compare runs
    # e4m3 has 3 mantissa bits: relative rounding error <= 2**-4, so SQNR of one rounding is > 24 dB
    for p in rep.points:
        assert 24.0 < p.local_sqnr_db < 45.0
        assert p.clipped == 0.0
    text = str(rep)
    assert "block/r2" in text and "SQNR dB" in text and "logits" in text
    d = json.loads(rep.to_json())
    assert len(d["points"]) == 3 and d["kind"] == "keras"
    assert d["points"][0]["layer"] == "r1"
    assert rep.worst(1)[0].sqnr_db == min(p.sqnr_db for p in rep.points)
    png = rep.plot(tmp_path / "sqnr.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_keras_application_model():
    keras.utils.set_random_seed(1)
    model = keras.applications.MobileNetV2(
        weights=None, input_shape=(32, 32, 3), alpha=0.35, classes=10, classifier_activation=None
    )
    rng = np.random.RandomState(1)
    for layer in model.layers:  # random weights leave batch norm at identity: give it data-like statistics
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0.0, 0.1, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, n).astype("float32"))
    x = np.random.RandomState(1).uniform(-1, 1, (8, 32, 32, 3)).astype("float32")
    q = quantize_model(model, bits=8, weights=True, calibration_data=x)
    rep = compare(model, q, x)
    n_quant = sum(isinstance(l, Quantize) for l in q.layers)
    assert len(rep.points) == n_quant > 30
    assert {p.layer for p in rep.points} <= {l.name for l in model.layers}
    assert all(math.isfinite(p.sqnr_db) and p.sqnr_db > 15.0 for p in rep.points)
    # compared on the calibration data itself: the first rounding sees what calibration saw; later ones
    # see slightly different (rounded upstream) values, so a few may fall just outside
    assert rep.points[0].clipped == 0.0
    assert all(p.clipped < 0.05 for p in rep.points)
    assert rep.outputs[0].top1_agreement is not None


def test_keras_sequential_model():
    keras.utils.set_random_seed(2)
    model = keras.Sequential(
        [keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, activation="relu", name="a"),
         keras.layers.Conv2D(4, 3, name="b"), keras.layers.Flatten(), keras.layers.Dense(3, name="out")]
    )  # fmt: skip
    q = quantize_model(model, format="e5m2")
    rep = compare(model, q, DATA[:8])
    assert [p.layer for p in rep.points] == ["a", "b"]
    assert [p.node for p in rep.points] == ["a_quant", "b_quant"]
    # e5m2: 2 mantissa bits, relative error <= 2**-3 per value
    assert all(18.0 < p.local_sqnr_db < 40.0 for p in rep.points)
    assert rep.outputs[0].name == "out"


def test_keras_file_paths(cnn, tmp_path):
    q = quantize_model(cnn, bits=8, calibration_data=DATA)
    cnn.save(tmp_path / "f.keras")
    q.save(tmp_path / "q.keras")
    a = compare(cnn, q, DATA)
    b = compare(tmp_path / "f.keras", str(tmp_path / "q.keras"), DATA)
    assert [p.layer for p in a.points] == [p.layer for p in b.points]
    assert [p.sqnr_db for p in a.points] == pytest.approx([p.sqnr_db for p in b.points], abs=1e-6)


def test_bad_input(cnn, tmp_path):
    q = quantize_model(cnn, bits=8)
    with pytest.raises(ValueError, match="batch_size"):
        compare(cnn, q, DATA, batch_size=0)
    with pytest.raises(ValueError, match="data"):
        compare(cnn, q, None)
    with pytest.raises(ValueError, match="empty"):
        compare(cnn, q, [])
    with pytest.raises(ValueError, match="quantized: .*no such file"):
        compare(cnn, tmp_path / "missing.keras", DATA)
    with pytest.raises(TypeError, match="quantized must be"):
        compare(cnn, 3, DATA)
    (tmp_path / "sm").mkdir()
    with pytest.raises(ValueError, match="not a SavedModel"):
        compare(tmp_path / "sm", tmp_path / "sm", DATA)
    other = small_cnn(nested=False)
    with pytest.raises(ValueError, match="does not match"):
        compare(other, q, DATA)


# --------------------------------------------------------------------------- SavedModel
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    model = small_cnn(nested=False)
    model.export(str(root / "float"), verbose=False)
    report = convert_saved_model(root / "float", root / "q8", bits=8, calibration_data=DATA[:24])
    convert_saved_model(root / "float", root / "e4m3", format="e4m3")
    return root, model, report


def test_saved_model_points_and_clipping(saved):
    root, model, conv = saved
    rep = compare(root / "float", root / "q8", DATA[:24], batch_size=12)
    assert rep.kind == "saved_model" and rep.samples == 24
    assert len(rep.points) == len(conv.plan.activations) == 2
    assert all(p.node.startswith("graphquant/q") for p in rep.points)
    assert all(p.format.startswith("affine8[") for p in rep.points)
    # calibrated (min/max) on exactly these inputs: nothing is clipped
    assert all(p.clipped == 0.0 for p in rep.points)
    assert rep.points[0].sqnr_db == pytest.approx(rep.points[0].local_sqnr_db, abs=1e-9)
    assert all(35.0 < p.sqnr_db < 70.0 for p in rep.points)
    # larger inputs than calibrated: some values fall outside the range
    wide = compare(root / "float", root / "q8", DATA[:24] * 3.0)
    assert all(p.clipped > 0.0 for p in wide.points)


def test_saved_model_agrees_with_keras_path(saved):
    root, model, _ = saved
    q = quantize_model(model, bits=8, calibration_data=DATA[:24])
    k = compare(model, q, DATA)
    s = compare(root / "float", root / "q8", DATA)
    assert len(k.points) == len(s.points)
    for a, b in zip(k.points, s.points):
        assert a.sqnr_db == pytest.approx(b.sqnr_db, abs=1.5)
    assert k.outputs[0].sqnr_db == pytest.approx(s.outputs[0].sqnr_db, abs=1.5)


def test_saved_model_float_format(saved):
    root, _, _ = saved
    rep = compare(str(root / "float"), str(root / "e4m3"), DATA, steps=2, batch_size=8)
    assert rep.samples == 16 and len(rep.points) == 2
    assert all(24.0 < p.local_sqnr_db < 45.0 for p in rep.points)
    with pytest.raises(ValueError, match="signature"):
        compare(root / "float", root / "e4m3", DATA, signature="nope")
    with pytest.raises(TypeError, match="both"):
        compare(small_cnn(nested=False), root / "e4m3", DATA)


def test_saved_model_recorded_format_and_rounding(saved, tmp_path):
    """Every inserted node records its format and rounding; compare shows them (no '?', ranges known)."""
    root, _, _ = saved
    convert_saved_model(root / "float", tmp_path / "fx4", bits=4, range=(0.0, 6.0), rounding="stochastic", seed=0)
    fixed = compare(root / "float", tmp_path / "fx4", DATA[:16])
    e4m3 = compare(root / "float", root / "e4m3", DATA[:16])
    assert [p.format for p in fixed.points] == ["fixed4[0,6]"] * 2
    assert [p.rounding for p in fixed.points] == ["stochastic"] * 2
    assert [p.format for p in e4m3.points] == ["e4m3"] * 2 and [p.rounding for p in e4m3.points] == ["nearest"] * 2
    for rep in (fixed, e4m3):
        assert all(p.clipped is not None for p in rep.points)  # the format's range is known
        assert not any("'?'" in n for n in rep.notes)
    # relu outputs in [0, 6): nothing clipped by the fixed range on these inputs; 4 bits cost far more than e4m3
    assert all(p.clipped == 0.0 for p in fixed.points)
    assert all(f.local_sqnr_db < e.local_sqnr_db for f, e in zip(fixed.points, e4m3.points))
    table = fixed.table()
    assert table.count("fixed4[0,6] (stochastic)") == 2 and "?" not in table
    assert e4m3.table().count("e4m3") == 2 and "(nearest)" not in e4m3.table()
    assert json.loads(fixed.to_json())["points"][0]["rounding"] == "stochastic"


def test_cli_compare_subprocess(saved, tmp_path):
    root, _, _ = saved
    np.savez(tmp_path / "inputs.npz", x=DATA[:16])
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, "-m", "graphquant", "compare", str(root / "float"), str(root / "q8"), "--data",
           str(tmp_path / "inputs.npz"), "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "SQNR dB" in p.stdout and "affine8[" in p.stdout
    d = json.loads((tmp_path / "r.json").read_text())
    assert len(d["points"]) == 2 and d["samples"] == 16
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_compare_errors(saved, tmp_path, capsys):
    from graphquant.cli import main

    root, _, _ = saved
    assert main(["compare", str(root / "float"), str(root / "q8"), "--data", str(tmp_path / "none.npz")]) == 1
    err = capsys.readouterr().err
    assert "--data" in err and "no such file" in err and len(err.strip().splitlines()) == 1
    np.save(tmp_path / "x.npy", DATA[:4])
    assert main(["compare", str(root / "float"), str(tmp_path / "missing"), "--data", str(tmp_path / "x.npy")]) == 1
    assert "quantized" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["compare", str(root / "float")])
    assert e.value.code == 2


def _e2m1(w):
    import ml_dtypes

    return np.asarray(w, np.float32).astype(ml_dtypes.float4_e2m1fn).astype(np.float64)


def test_weight_rounding_error_per_layer_keras_and_saved_model(cnn, saved, tmp_path):
    """compare reports each rounded weight: SQNR and the fraction rounded to zero (oracle: ml_dtypes'
    e2m1 cast). Unscaled e2m1 wipes out kernels of size ~0.3 (it has nothing between 0 and 0.5);
    mxfp4 keeps them."""
    with pytest.warns(UserWarning, match="round to zero"):
        q = quantize_model(cnn, format="e2m1", weights=True)
    rep = compare(cnn, q, DATA[:8])
    assert [(w.layer, w.weight, w.format) for w in rep.weights] == [
        ("c1", "kernel", "e2m1"), ("c2", "kernel", "e2m1"), ("c3", "kernel", "e2m1")]
    k = {l.name: l.kernel.numpy() for l in _all_layers(cnn) if l.name in ("c1", "c2", "c3")}
    for w in rep.weights:
        ref, out = k[w.layer].astype(np.float64), _e2m1(k[w.layer])
        assert w.sqnr_db == pytest.approx(_sqnr(ref, out), abs=1e-9)
        assert w.zeroed == pytest.approx(np.mean(out[ref != 0] == 0)) and w.zeroed > 0.5
        assert w.size == ref.size
    table = str(rep)
    assert "zeroed" in table and table.count("wiped out") == 3
    assert json.loads(rep.to_json())["weights"][0]["layer"] == "c1"
    from graphquant.keras.compare import keras_weight_errors as _keras_weight_errors  # what compare reports, without running data

    mx = _keras_weight_errors(quantize_model(cnn, format="mxfp4", weights=True))
    assert len(mx) == 3 and all(w.zeroed < 0.2 and w.sqnr_db > 10.0 for w in mx)
    # a converted SavedModel: the checkpoint variables the conversion changed
    root, model, _ = saved
    convert_saved_model(root / "float", tmp_path / "w", format="e2m1", weights=True)
    srep = compare(root / "float", tmp_path / "w", DATA[:8])
    kernels = sorted(l.name for l in model.layers if isinstance(l, keras.layers.Conv2D))
    assert len(srep.weights) == len(kernels) == 2
    by_zeroed = sorted(w.zeroed for w in srep.weights)
    want = sorted(np.mean(_e2m1(l.kernel.numpy())[l.kernel.numpy() != 0] == 0)
                  for l in model.layers if isinstance(l, keras.layers.Conv2D))
    assert by_zeroed == pytest.approx(want)
    assert "wiped out" in str(srep)
    assert sorted(w.layer for w in srep.weights) == [f"{k}/kernel" for k in kernels]  # the variables' own names


# --------------------------------------------------------------------------- non-finite values
def test_error_sums_against_the_numpy_sums():
    """The in-graph sums give every number :meth:`Stats.update`'s numpy ones give, finite or not."""
    from graphquant.report import Stats, error_sums

    rng = np.random.RandomState(5)
    ref = rng.normal(size=(4, 6, 6, 3)).astype("float32")
    inp = (ref + rng.normal(scale=0.1, size=ref.shape)).astype("float32")
    out = np.clip(np.round(inp * 8) / 8, -1.5, 1.5).astype("float32")
    bad_ref, bad_inp, bad_out = ref.copy(), inp.copy(), out.copy()
    bad_ref[1, 2, 3, 0], bad_inp[2, 0, 0, 1], bad_out[3, 1, 1, 2] = np.inf, np.nan, -np.inf
    for r, i, o in ((ref, inp, out), (bad_ref, inp, out), (ref, bad_inp, out), (ref, inp, bad_out)):
        oracle, got = Stats(), Stats()
        oracle.update(r, o, i, rng=(-1.5, 1.5))
        got.add(error_sums(tf.constant(r), tf.constant(o), inp=tf.constant(i), rng=(-1.5, 1.5)).numpy(), local=True)
        fields = ["n", "err", "abs", "max", "local_err", "clipped", "sqnr_db", "local_sqnr_db"]
        fields += ["sig"] if math.isfinite(oracle.err) else []  # (unused once the error is infinite)
        fields += ["local_sig"] if math.isfinite(oracle.local_err) else []
        for field in fields:
            assert getattr(got, field) == pytest.approx(getattr(oracle, field), rel=1e-12, nan_ok=True), field
        assert math.isfinite(got.err) == (r is ref and o is out)
        assert math.isfinite(got.local_err) == (i is inp and o is out)


def _one_conv() -> keras.Model:
    keras.utils.set_random_seed(1)
    x = keras.Input((8, 8, 1), name="image")  # no activation: a fused ReLU would map NaN to 0 on oneDNN
    return keras.Model(x, keras.layers.Conv2D(4, 3, padding="same", name="c")(x), name="one_conv")


def test_compare_with_non_finite_values_on_both_paths(tmp_path):
    """A NaN in one batch: the report is the numpy sums' on the Keras path, and the same on the
    SavedModel path; the batch without it alone gives a finite error."""
    from graphquant.report import Stats

    m = _one_conv()
    data = DATA.copy()
    data[25, 3, 3, 0] = np.nan  # in the second batch of 20
    q = quantize_model(m, bits=8, calibration_data=DATA)
    rep = compare(m, q, data, batch_size=20)
    ql = [l for l in _all_layers(q) if isinstance(l, Quantize)][0]
    inp, out = keras.Model(q.input, [ql.input, ql.output]).predict(data, batch_size=20, verbose=0)
    ref = m.predict(data, batch_size=20, verbose=0)
    assert np.isnan(ref).sum() == 9 * 4 and np.isfinite(inp[:20]).all()  # 3x3 pixels, 4 channels
    lo, hi = ql.get_range()
    oracle = Stats()
    for i in range(0, len(data), 20):
        oracle.update(ref[i : i + 20], out[i : i + 20], inp[i : i + 20], rng=(np.asarray(lo), np.asarray(hi)))
    p = rep.points[0]
    assert p.sqnr_db == oracle.sqnr_db == -math.inf and p.local_sqnr_db == oracle.local_sqnr_db == -math.inf
    assert p.clipped == pytest.approx(oracle.clipped / oracle.n, abs=1e-12) and p.size == oracle.n
    finite = compare(m, q, data[:20], batch_size=20)  # the same model on the finite batch alone
    assert math.isfinite(finite.points[0].sqnr_db)
    m.export(str(tmp_path / "f"), verbose=False)
    convert_saved_model(tmp_path / "f", tmp_path / "q", bits=8, calibration_data=DATA)
    s = compare(tmp_path / "f", tmp_path / "q", data, batch_size=20)
    assert s.points[0].sqnr_db == -math.inf and s.points[0].size == oracle.n
