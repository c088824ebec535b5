"""The graphquant command, run as a subprocess."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import graphquant
from _saved_models import run as run_cli
from _saved_models import save_tiny


def run(*args, cwd=None):
    return run_cli(*args, cwd=cwd)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("cli") / "tiny")


def _no_traceback(p):
    assert "Traceback" not in p.stderr
    lines = [l for l in p.stderr.splitlines() if l.startswith("graphquant")]
    assert len(lines) == 1, p.stderr
    return lines[0]


def test_version_and_help():
    p = run("--version")
    assert p.returncode == 0 and graphquant.__version__ in p.stdout
    p = run("--help")
    assert p.returncode == 0 and all(c in p.stdout for c in ("convert", "batch", "inspect", "example"))
    p = run("convert", "--bits")
    assert p.returncode == 2 and "Traceback" not in p.stderr


def test_inspect_and_convert(tiny, tmp_path):
    p = run("inspect", str(tiny), "--bits", "8", "--json")
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout)
    assert len(plan["points"]) == 1 and plan["points"][0]["group"][-1] == "Relu"
    fname = plan["points"][0]["scope"][0]
    assert fname.startswith("__inference_serve_")  # the JSON names the real function
    # the table names the function by its base name, and says once which function that is
    p = run("-v", "inspect", str(tiny), "--bits", "8")
    assert p.returncode == 0, p.stderr
    row = p.stdout.splitlines()[2].split()
    assert row[:3] == ["0", "serve/Conv2D", "Conv2D"]
    assert f"scopes: serve = {fname}" in p.stdout and p.stdout.count("__inference_") == 1
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=np.random.RandomState(0).normal(size=(4, 6, 6, 1)).astype("float32"))
    p = run("convert", str(tiny), str(tmp_path / "q"), "--bits", "8", "--weights", "--calibration", str(cal),
            "--json", str(tmp_path / "r.json"))
    assert p.returncode == 0, p.stderr
    assert "1 convolutions, 1 graphquant nodes, 1 weights pre-rounded" in p.stdout
    assert "serve/Conv2D" in p.stdout and "__inference_" not in p.stdout  # the full function name only with -v
    assert json.loads((tmp_path / "r.json").read_text())["inserted"] == 1
    y = tf.saved_model.load(str(tmp_path / "q")).signatures["serving_default"](x=tf.ones([1, 6, 6, 1]))["y"]
    assert y.shape == (1, 6, 6, 2)
    # a second run refuses the non-empty destination; --overwrite replaces it
    p = run("convert", str(tiny), str(tmp_path / "q"), "--format", "e4m3")
    assert p.returncode == 1 and "not empty" in _no_traceback(p)
    p = run("convert", str(tiny), str(tmp_path / "q"), "--format", "e4m3", "--overwrite")
    assert p.returncode == 0, p.stderr


def test_bad_input_one_line(tiny, tmp_path):
    p = run("convert", str(tmp_path / "missing"), str(tmp_path / "o"), "--bits", "8")
    assert p.returncode == 1 and "missing" in _no_traceback(p)
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "saved_model.pb").write_bytes(b"not a protobuf at all \xff\xff")
    p = run("inspect", str(bad))
    assert p.returncode == 1 and "corrupt" in _no_traceback(p) and "saved_model.pb" in p.stderr
    p = run("convert", str(tiny), str(tmp_path / "o"), "--format", "e99m1")
    assert p.returncode == 1 and "e99m1" in _no_traceback(p)


def test_example_main_job(tmp_path):
    p = run("example", "--out", str(tmp_path / "ex"), "--size", "32")
    assert p.returncode == 0, p.stderr
    assert "52 groups, 52 activation" in p.stdout
    assert "outputs moved" in p.stdout and "SQNR" in p.stdout
    # ends with the per-layer error table (graphquant.compare): one row per inserted node
    table = p.stdout.split("per-layer error on 8 samples", 1)[1]
    assert "affine8[" in table and "lowest SQNR:" in p.stdout
    assert sum(1 for line in table.splitlines() if "affine8[" in line) == 52
    assert (tmp_path / "ex" / "q8" / "saved_model.pb").is_file()


def test_convert_keras_file(tmp_path):
    """convert takes a .keras file: loaded safely, quantized by quantize_model, saved as .keras."""
    import keras

    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inp)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    out = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inp, out)
    src = tmp_path / "model.keras"
    model.save(src)
    images = np.random.RandomState(0).rand(16, 8, 8, 3).astype("float32")
    np.savez(tmp_path / "calib.npz", x=images)
    dst = tmp_path / "out" / "model-q8.keras"
    p = run("convert", str(src), str(dst), "--bits", "8", "--weights", "--calibration", str(tmp_path / "calib.npz"))
    assert p.returncode == 0, p.stderr
    assert dst.is_file() and not list(dst.parent.glob(".*graphquant-tmp*"))
    q = keras.models.load_model(dst)  # no custom_objects: importing graphquant registered the layers
    quants = [l for l in q.layers if isinstance(l, graphquant.keras.Quantize)]
    assert len(quants) == 1
    lo, hi = quants[0].get_range()
    assert float(lo) < float(hi) and float(hi) > 0  # calibrated, not the initial (-6, 6)
    assert (float(lo), float(hi)) != (-6.0, 6.0)
    y = q.predict(images, verbose=0)
    assert y.shape == (16, 2) and np.isfinite(y).all()
    # the destination exists now: a second convert refuses, the file is untouched
    before = dst.read_bytes()
    p = run("convert", str(src), str(dst), "--bits", "8")
    assert p.returncode != 0 and "exists" in _no_traceback(p)
    assert dst.read_bytes() == before


def test_convert_h5_file(tmp_path):
    """convert takes a legacy .h5 file; the output is a .keras file beside the given name that loads as is."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, padding="same"), keras.layers.BatchNormalization(),
         keras.layers.ReLU(), keras.layers.DepthwiseConv2D(3, padding="same", activation="relu6"),
         keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)]
    )  # fmt: skip
    images = np.random.RandomState(0).rand(16, 8, 8, 3).astype("float32")
    model.compile("adam", "mse")  # a compiled model stores its optimizer in the .h5 too
    model.fit(images, np.random.RandomState(1).rand(16, 2).astype("float32"), epochs=1, verbose=0)
    src = tmp_path / "m.h5"
    model.save(src)
    ref = keras.models.load_model(src, compile=False).predict(images, verbose=0)
    p = run("convert", str(src), str(tmp_path / "out" / "m-e4m3.h5"), "--format", "e4m3", "--weights")
    assert p.returncode == 0, p.stderr
    dst = tmp_path / "out" / "m-e4m3.keras"
    assert str(dst) in p.stdout and sorted(f.name for f in dst.parent.iterdir()) == ["m-e4m3.keras"]
    q = keras.models.load_model(dst)  # no custom_objects: importing graphquant registered the layers
    quants = [l for l in q.layers if isinstance(l, graphquant.keras.Quantize)]
    assert len(quants) == 2 and all(str(l.format) == "e4m3" for l in quants)
    y = q.predict(images, verbose=0)
    assert y.shape == ref.shape == (16, 2)
    err = np.abs(y - ref).max()
    assert 0 < err < 0.25 * np.abs(ref).max()  # rounded, but close to the float model
    # a folder as destination: <folder>/<stem>.keras
    p = run("convert", str(src), str(tmp_path / "dir"), "--bits", "8")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "dir" / "m.keras").is_file()
    # an .h5 that is not a Keras model: one line, no traceback
    (tmp_path / "bad.h5").write_bytes(b"not hdf5")
    p = run("convert", str(tmp_path / "bad.h5"), str(tmp_path / "bad.keras"), "--bits", "8")
    assert p.returncode == 1 and "bad.h5" in _no_traceback(p)
    assert not (tmp_path / "bad.keras").exists()


def test_console_script_error_is_one_line_on_stderr(tmp_path):
    """The installed `graphquant` command holds back TensorFlow's start-up messages."""
    import shutil

    exe = shutil.which("graphquant", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    assert exe, "the graphquant console script is not installed"
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    p = subprocess.run([exe, "convert", str(tmp_path / "missing"), str(tmp_path / "out"), "--bits", "8"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [f"graphquant convert: error: {tmp_path / 'missing'}: no such file or directory"]
    assert not (tmp_path / "out").exists()


def test_console_script_batch_workers_start_quietly(tiny, tmp_path):
    """Each batch worker is a fresh process: its TensorFlow start-up lines are held back too,
    so a batch's stderr is not a wall of them (one set per model otherwise)."""
    import shutil

    exe = shutil.which("graphquant", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    assert exe, "the graphquant console script is not installed"
    for name in ("a", "b"):
        shutil.copytree(tiny, tmp_path / "src" / name)
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    p = subprocess.run([exe, "batch", str(tmp_path / "src"), str(tmp_path / "out"), "--format", "mxfp4", "--weights",
                        "-j", "2", "--no-progress"], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1].startswith("2 converted, 0 skipped (already done), 0 failed")
    assert p.stderr == ""
    assert (tmp_path / "out" / "a" / "saved_model.pb").is_file() and (tmp_path / "out" / "b" / "saved_model.pb").is_file()
    # a scaled format through batch: weights blocked along the input channels (MX), activations rounded
    w = tf.saved_model.load(str(tiny)).w.numpy()
    got = tf.saved_model.load(str(tmp_path / "out" / "b"))
    want = graphquant.quantize(w, graphquant.Scaled("e2m1", 32, -2, "e8m0")).numpy()
    np.testing.assert_array_equal(got.w.numpy(), want)
    assert not np.array_equal(want, w)
    y = got.signatures["serving_default"](x=tf.ones([1, 6, 6, 1]))["y"].numpy()
    np.testing.assert_array_equal(y, graphquant.quantize(y, "mxfp4").numpy())  # on the mxfp4 grid already


def test_convert_calibration_method_and_quiet(tiny, tmp_path):
    """--calibration-method picks the engine's method, --quiet is accepted."""
    from graphquant.graph.compare import q_nodes as _q_nodes
    from graphquant.graph.saved_model import read_saved_model

    cal = tmp_path / "cal.npz"
    x = np.random.RandomState(1).normal(size=(512, 6, 6, 1)).astype("float32")
    x[0, 0, 0, 0] = 40.0  # one outlier: percentile clips it, minmax keeps it
    np.savez(cal, x=x)
    ranges = {}
    for method, extra in (("minmax", []), ("percentile", []), ("p90", ["--percentile", "90"])):
        p = run("convert", str(tiny), str(tmp_path / method), "--bits", "8", "--calibration", str(cal),
                "--calibration-method", "percentile" if method == "p90" else method, "--quiet", *extra)
        assert p.returncode == 0, p.stderr
        assert "\x1b[" not in p.stderr  # no progress bar drawn
        (point,) = _q_nodes(read_saved_model(tmp_path / method))
        ranges[method] = point.range
    assert ranges["percentile"][1] < 0.5 * ranges["minmax"][1]
    assert ranges["p90"][1] < ranges["percentile"][1]  # --percentile reaches the engine
    manifest = json.loads((tmp_path / "p90" / "graphquant.json").read_text())
    assert manifest["options"]["calibration_percentile"] == 90.0
    p = run("convert", str(tiny), str(tmp_path / "bad_p"), "--bits", "8", "--calibration", str(cal),
            "--calibration-method", "percentile", "--percentile", "101")
    assert p.returncode != 0 and "calibration_percentile must be in (50, 100], got 101.0" in _no_traceback(p)
    p = run("convert", str(tiny), str(tmp_path / "bad"), "--bits", "8", "--calibration", str(cal),
            "--calibration-method", "kl")
    assert p.returncode == 2 and "invalid choice: 'kl'" in _no_traceback(p)


def test_convert_scaled_format_on_the_command_line(tiny, tmp_path):
    """convert --format e4m3@channel --weights: the written weights are on the scaled grid (per output
    channel, float32 scale amax/448). In process (cli.main) to stay cheap; batch --format mxfp4 is
    checked by test_console_script_batch_workers_start_quietly."""
    import ml_dtypes

    from graphquant.cli import main

    w = tf.saved_model.load(str(tiny)).w.numpy()
    assert main(["convert", str(tiny), str(tmp_path / "ch"), "--format", "e4m3@channel", "--weights"]) == 0
    s = (np.abs(w).reshape(-1, 2).max(0) / np.float32(448)).astype(np.float32)  # per output channel
    want = ((w / s).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * s).astype(np.float32)
    got = tf.saved_model.load(str(tmp_path / "ch"))
    np.testing.assert_array_equal(got.w.numpy(), want)
    y = got.signatures["serving_default"](x=tf.ones([1, 6, 6, 1]))["y"].numpy()
    assert y.shape == (1, 6, 6, 2) and np.isfinite(y).all()



# --------------------------------------------------------------------------- one flag, one meaning (in process)
@pytest.fixture(scope="module")
def conv_dense_file(tmp_path_factory):
    """A .keras file: conv -> relu -> pool -> Dense, with a long layer name."""
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="block_one_expand_conv_with_a_very_long_name_indeed")(inp)
    x = keras.layers.ReLU(name="relu")(x)
    out = keras.layers.Dense(2, name="head")(keras.layers.GlobalAveragePooling2D(name="pool")(x))
    path = tmp_path_factory.mktemp("cli_keras") / "m.keras"
    keras.Model(inp, out).save(path)
    return path


def test_convert_takes_weight_format_rounding_and_dense(conv_dense_file, capsys):
    """--weight-format / --weight-rounding / --dense: the library's weight_format= / weight_rounding= / dense=,
    for convert, batch and inspect alike (one definition)."""
    from graphquant.cli import _conversion_kwargs, build_parser, main

    parser = build_parser()
    for cmd in ("convert", "batch"):
        ns = parser.parse_args([cmd, "a", "b", "--weight-format", "e4m3", "--weight-rounding", "toward_zero", "--dense"])
        kw = _conversion_kwargs(ns)
        assert (kw["weights"], kw["weight_format"], kw["weight_rounding"], kw["dense"]) == (True, "e4m3", "toward_zero", True)
        kw = _conversion_kwargs(parser.parse_args([cmd, "a", "b"]))
        assert not {"weight_format", "weight_rounding", "dense", "weights"} & set(kw)  # defaults: the library's
    assert main(["inspect", str(conv_dense_file), "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(["inspect", str(conv_dense_file), "--json", "--dense", "--weight-format", "e4m3",
                 "--weight-rounding", "toward_zero"]) == 0
    plan = json.loads(capsys.readouterr().out)
    targets = lambda pl: {p["target"] for p in pl["points"]}
    assert "head" not in targets(plain) and "head" in targets(plan)
    weights = [p for p in plan["points"] if p["what"] == "weights"]
    assert len(weights) == 2 and all(p["format_str"] == "e4m3" and p["rounding"] == "toward_zero" for p in weights)


def test_data_and_calibration_mean_the_same_everywhere(capsys):
    """--data is data to evaluate on, --calibration data to calibrate with, --signature the SavedModel
    signature that runs the command's data: one definition each; the old export-tflite spellings still work."""
    from graphquant.cli import build_parser

    parser = build_parser()
    subs = parser._subparsers._group_actions[0].choices
    helps = {}
    for cmd in ("convert", "batch", "compare"):
        (sig,) = [a for a in subs[cmd]._actions if "--signature" in a.option_strings]
        helps[cmd] = sig.help
        assert sig.default == "serving_default" and sig.help.startswith("SavedModel signature that runs the data of")
    assert "--calibration" in helps["convert"] and "--calibration" in helps["batch"] and "--data" in helps["compare"]
    for cmd, flag in (("compare", "--data"), ("compare-tflite", "--data"), ("export-tflite", "--data"),
                      ("convert", "--calibration"), ("batch", "--calibration"), ("export-tflite", "--calibration")):
        assert any(flag in a.option_strings for a in subs[cmd]._actions), (cmd, flag)
    ns = parser.parse_args(["export-tflite", "q.keras", "m.tflite", "--data", "x.npz", "--calibration", "c.npz"])
    assert (ns.data, ns.calibration) == ("x.npz", "c.npz")
    capsys.readouterr()
    ns = parser.parse_args(["export-tflite", "q.keras", "m.tflite", "--check-data", "x.npz",
                            "--representative-data", "c.npz"])
    assert (ns.data, ns.calibration) == ("x.npz", "c.npz")
    err = capsys.readouterr().err
    assert "--check-data is deprecated; use --data" in err
    assert "--representative-data is deprecated; use --calibration" in err
    assert "--check-data" not in subs["export-tflite"].format_help()  # hidden from --help


def test_tables_fit_the_terminal(conv_dense_file, capsys, monkeypatch):
    """In a terminal of 80 columns every table line fits, long names cut in the middle; piped (no terminal)
    the table keeps its natural width."""
    from graphquant._table import cut_middle, render_table
    from graphquant.cli import main

    assert cut_middle("block_one_expand_conv", 9) == "bloc…conv" and cut_middle("short", 9) == "short"
    lines = render_table(("layer", "n"), [("a" * 50, "1")], width=20, right={1})
    assert lines[2] == "aaaaaaaa…aaaaaaaa  1" and all(len(l) <= 20 for l in lines)
    monkeypatch.delenv("COLUMNS", raising=False)
    assert main(["inspect", str(conv_dense_file), "--bits", "8"]) == 0
    wide = capsys.readouterr().out.splitlines()
    assert "block_one_expand_conv_with_a_very_long_name_indeed" in wide[2] and max(len(l) for l in wide[:3]) > 80
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["inspect", str(conv_dense_file), "--bits", "8"]) == 0
    narrow = capsys.readouterr().out.splitlines()
    assert all(len(l) <= 80 for l in narrow[:3]), narrow
    layer = narrow[2].split()[1]  # both ends of the name kept
    assert layer.startswith("block") and layer.endswith("ndeed") and "…" in layer and len(layer) < 30


@pytest.fixture(scope="module")
def long_name_sm(tmp_path_factory):
    """A SavedModel whose convolution has a long node name, inside the function ``__inference_serve_<n>``."""

    class LongName(tf.Module):
        def __init__(self):
            self.w = tf.Variable(np.random.RandomState(0).normal(size=(3, 3, 1, 2)).astype("float32"))

        @tf.function(input_signature=[tf.TensorSpec([1, 6, 6, 1], tf.float32, name="x")])
        def serve(self, x):
            y = tf.nn.conv2d(x, self.w, 1, "SAME", name="block_one_expand_conv_with_a_very_long_name_indeed")
            return {"y": tf.nn.relu(y)}

    path = tmp_path_factory.mktemp("cli_long") / "sm"
    m = LongName()
    tf.saved_model.save(m, str(path), signatures={"serving_default": m.serve})
    return path


def test_saved_model_table_fits_the_terminal_and_names_functions_only_when_verbose(long_name_sm, capsys, monkeypatch):
    """graphquant inspect on a SavedModel: in a terminal of 80 columns the table fits (the long layer path cut
    in the middle); piped, the layer column is whole. The function scope is shown by its short name; its full
    name (``__inference_serve_<n>``) appears only with --verbose, on the one line mapping the short name to it."""
    from graphquant.cli import main

    monkeypatch.setenv("COLUMNS", "80")
    assert main(["inspect", str(long_name_sm), "--bits", "8", "--weights"]) == 0
    narrow = capsys.readouterr().out.splitlines()
    assert all(len(l) <= 80 for l in narrow[:4]), narrow
    layer = narrow[2].split()[1]
    assert layer.startswith("serve") and layer.endswith("deed") and "…" in layer  # both ends kept
    assert "__inference_" not in "\n".join(narrow)
    monkeypatch.delenv("COLUMNS")
    assert main(["--verbose", "inspect", str(long_name_sm), "--bits", "8", "--weights"]) == 0
    wide = capsys.readouterr().out.splitlines()
    assert wide[2].split()[1] == "serve/block_one_expand_conv_with_a_very_long_name_indeed"
    (legend,) = [l for l in wide if "__inference_" in l]
    assert legend.startswith("scopes: serve = __inference_serve_")


def test_batch_calibration_file_errors_name_the_flag(tmp_path, capsys):
    """graphquant batch --calibration: a missing or unreadable file is named by its flag, as in convert (not by
    the library's calibration_data); nothing is written."""
    from graphquant.cli import main

    (tmp_path / "models").mkdir()
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    for name, problem in (("missing.npz", "no such file"), ("bad.npz", "not a readable .npz/.npy file")):
        path = tmp_path / name
        assert main(["batch", str(tmp_path / "models"), str(tmp_path / "out"), "--calibration", str(path)]) == 1
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"graphquant batch: error: --calibration: {path}: {problem}"), line
    assert not (tmp_path / "out").exists()
