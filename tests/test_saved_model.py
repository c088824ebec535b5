"""convert_saved_model / inspect_saved_model on real exported SavedModels."""

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

import graphquant.graph as gg
from graphquant.patterns import CONV_OPS


class ConvModule(tf.Module):
    """Hand-written: conv2d > bias > relu, depthwise, transposed conv; two signatures."""

    def __init__(self):
        super().__init__()
        rng = np.random.RandomState(0)
        self.w1 = tf.Variable(rng.normal(size=(3, 3, 3, 8)).astype("float32"), name="w1")
        self.b1 = tf.Variable(rng.normal(size=(8,)).astype("float32"), name="b1")
        self.dw = tf.Variable(rng.normal(size=(3, 3, 8, 1)).astype("float32"), name="dw")
        self.wt = tf.Variable(rng.normal(size=(2, 2, 4, 8)).astype("float32"), name="wt")

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32, name="image")])
    def serve(self, image):
        y = tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(image, self.w1, 1, "SAME"), self.b1))
        d = tf.nn.relu6(tf.nn.depthwise_conv2d(y, self.dw, [1, 1, 1, 1], "SAME"))
        n = tf.shape(d)[0]
        t = tf.nn.conv2d_transpose(d, self.wt, [n, 16, 16, 4], 2, "SAME")
        return {"features": d, "up": t}

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32, name="x")])
    def first(self, x):
        return {"out": tf.nn.conv2d(x, self.w1, 1, "SAME")}


class NoConv(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
    def serve(self, x):
        return {"y": x * 2.0}


X = np.random.RandomState(1).normal(size=(2, 8, 8, 3)).astype("float32")


def _tree_hash(path):
    h = hashlib.sha1()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for f in sorted(files):
            p = Path(root) / f
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def module_sm(tmp_path_factory):
    d = tmp_path_factory.mktemp("src") / "module"
    m = ConvModule()
    tf.saved_model.save(m, str(d), signatures={"serving_default": m.serve, "first": m.first})
    return d


@pytest.fixture(scope="module")
def keras_sm(tmp_path_factory):
    import keras

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.35, classes=5,
                                           classifier_activation=None)
    d = tmp_path_factory.mktemp("src") / "mnv2"
    model.export(str(d), verbose=False)
    n_conv = sum(type(l).__name__ in ("Conv2D", "DepthwiseConv2D") for l in model.layers)
    return d, n_conv


def _graphquant_nodes(path):
    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString((Path(path) / "saved_model.pb").read_bytes())
    gd = sm.meta_graphs[0].graph_def
    model_fns = [f for f in gd.library.function if not f.signature.name.startswith("graphquant_")]
    nodes = [n for f in model_fns for n in f.node_def] + list(gd.node)
    return [n for n in nodes if n.name.startswith("graphquant/")], [n for n in nodes if n.op in CONV_OPS]


def test_module_signatures_kept_and_served(module_sm, tmp_path):
    before = _tree_hash(module_sm)
    dst = tmp_path / "q"
    rep = gg.convert_saved_model(module_sm, dst, bits=8, range=(-8.0, 8.0))
    assert _tree_hash(module_sm) == before  # the source is never modified
    assert rep.convolutions == 4 and rep.inserted == 4  # conv2d (x2: one per signature), depthwise, transpose
    assert sorted(rep.signatures) == ["first", "serving_default"]
    src, q = tf.saved_model.load(str(module_sm)), tf.saved_model.load(str(dst))
    assert sorted(q.signatures) == sorted(src.signatures)
    for name in src.signatures:
        a, b = src.signatures[name], q.signatures[name]
        assert a.structured_input_signature == b.structured_input_signature
        assert {k: (v.dtype, v.shape.as_list()) for k, v in a.structured_outputs.items()} == {
            k: (v.dtype, v.shape.as_list()) for k, v in b.structured_outputs.items()
        }
    out = q.signatures["serving_default"](image=tf.constant(X))
    ref = src.signatures["serving_default"](image=tf.constant(X))
    step = 16.0 / 256
    feats = out["features"].numpy()
    assert np.allclose(feats / step, np.round(feats / step), atol=1e-4)
    assert np.abs(feats - ref["features"].numpy()).max() > 0  # upstream clipping at 8 propagates
    # the object API of the module still works too
    assert q.serve(tf.constant(X))["up"].shape == (2, 16, 16, 4)
    # inspect agrees with what was written
    plan = gg.inspect_saved_model(module_sm, bits=8, range=(-8.0, 8.0))
    inserted, _ = _graphquant_nodes(dst)
    assert len(plan.activations) == len(inserted) == 4
    kinds = sorted(p.target_kind for p in plan.activations)
    assert kinds == ["Conv2D", "Conv2D", "Conv2DBackpropInput", "DepthwiseConv2dNative"]
    groups = {p.target_kind: p.group for p in plan.activations}
    assert groups["DepthwiseConv2dNative"][-1].endswith("Relu6")


def test_weights_prerounded_in_checkpoint(module_sm, tmp_path):
    dst = tmp_path / "w"
    rep = gg.convert_saved_model(module_sm, dst, format="e4m3", weights=True)
    assert rep.prerounded == 3  # w1, dw, wt: each once, shared by both signatures
    inserted, _ = _graphquant_nodes(dst)
    assert len(inserted) == rep.inserted == 4  # no run-time weight rounding nodes
    q = tf.saved_model.load(str(dst))
    import ml_dtypes

    for v in (q.w1, q.dw, q.wt):
        a = v.numpy()
        assert np.array_equal(a, a.astype(ml_dtypes.float8_e4m3fn).astype(np.float32))
    src = tf.saved_model.load(str(module_sm))
    assert not np.array_equal(src.w1.numpy(), q.w1.numpy())
    np.testing.assert_array_equal(src.b1.numpy(), q.b1.numpy())  # bias stays float


def test_keras_export_calibrated(keras_sm, tmp_path):
    src, n_conv = keras_sm
    x = np.random.RandomState(2).uniform(-1, 1, (4, 32, 32, 3)).astype("float32")
    rep = gg.convert_saved_model(src, tmp_path / "q8", bits=8, calibration_data=x, weights=True)
    assert rep.convolutions == n_conv == 52 and rep.inserted == n_conv
    assert len(rep.ranges) == n_conv
    f0 = tf.saved_model.load(str(src)).signatures["serving_default"]
    f1 = tf.saved_model.load(str(tmp_path / "q8")).signatures["serving_default"]
    name = next(iter(f0.structured_input_signature[1]))
    y0 = next(iter(f0(**{name: x}).values())).numpy()
    y1 = next(iter(f1(**{name: x}).values())).numpy()
    assert not np.array_equal(y0, y1)
    assert np.abs(y1 - y0).max() < 0.2 * np.abs(y0).max() + 1e-3


def test_destination_rules(module_sm, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("user data")
    for overwrite in (False, True):  # what graphquant did not write is never replaced (issue 11)
        with pytest.raises(FileExistsError, match="did not write \\(keep.txt\\)"):
            gg.convert_saved_model(module_sm, dst, bits=8, overwrite=overwrite)
    assert (dst / "keep.txt").read_text() == "user data"
    (dst / "keep.txt").unlink()
    gg.convert_saved_model(module_sm, dst, bits=8)  # an empty folder is fine
    with pytest.raises(FileExistsError, match="not empty"):
        gg.convert_saved_model(module_sm, dst, bits=8)
    gg.convert_saved_model(module_sm, dst, bits=4, overwrite=True)  # our own output may be replaced
    assert (dst / "saved_model.pb").is_file() and (dst / "graphquant.json").is_file()
    assert not [p for p in tmp_path.iterdir() if "graphquant-tmp" in p.name]
    with pytest.raises(ValueError, match="inside the source"):
        gg.convert_saved_model(module_sm, module_sm / "sub", bits=8)


def test_bad_inputs(module_sm, tmp_path):
    with pytest.raises(gg.SavedModelError, match="no such"):
        gg.convert_saved_model(tmp_path / "missing", tmp_path / "o1", bits=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(gg.SavedModelError, match="not a SavedModel"):
        gg.convert_saved_model(tmp_path / "empty", tmp_path / "o2", bits=8)
    bad = tmp_path / "corrupt"
    shutil.copytree(module_sm, bad)
    (bad / "saved_model.pb").write_bytes(b"\x08\x01garbage" * 10)
    with pytest.raises(gg.SavedModelError, match="corrupt"):
        gg.convert_saved_model(bad, tmp_path / "o3", bits=8)
    assert not (tmp_path / "o3").exists()
    with pytest.raises(ValueError, match="format"):
        gg.convert_saved_model(module_sm, tmp_path / "o4", format="e9m9")
    with pytest.raises(ValueError, match="calibration_data= has nothing to calibrate"):
        gg.convert_saved_model(module_sm, tmp_path / "o5", format="e4m3", calibration_data=np.zeros((1, 8, 8, 3), "float32"))
    assert not (tmp_path / "o5").exists()


def test_no_convolution_warns_and_copies(tmp_path, caplog):
    m = NoConv()
    tf.saved_model.save(m, str(tmp_path / "noconv"), signatures=m.serve)
    with caplog.at_level("WARNING"):
        rep = gg.convert_saved_model(tmp_path / "noconv", tmp_path / "o", bits=8)
    assert rep.convolutions == 0 and rep.inserted == 0 and rep.warnings
    assert "no convolution" in caplog.text
    y = tf.saved_model.load(str(tmp_path / "o")).signatures["serving_default"](x=tf.ones([1, 4]))["y"]
    np.testing.assert_array_equal(y.numpy(), np.full((1, 4), 2.0))


def test_no_convolution_is_a_user_warning_in_the_report(tmp_path):
    from graphquant.plan import no_match_message

    m = NoConv()
    tf.saved_model.save(m, str(tmp_path / "noconv"), signatures=m.serve)
    with pytest.warns(UserWarning, match="no convolution matched the quantization patterns") as rec:
        rep = gg.convert_saved_model(tmp_path / "noconv", tmp_path / "o", bits=8)
    msg = no_match_message(str(tmp_path / "noconv"), "the model is copied unchanged")
    assert [(str(w.message), w.filename) for w in rec if "no convolution" in str(w.message)] == [(msg, __file__)]
    assert rep.warnings == [msg]


def test_default_bits_and_config_like_quantize_model(module_sm, tmp_path):
    """Issue 16: no bits/format is bits=8 (as in quantize_model); config= takes a QuantizeConfig."""
    from graphquant.outputs import read_manifest
    from graphquant.plan import QuantizeConfig

    r8 = gg.convert_saved_model(module_sm, tmp_path / "b8", bits=8)
    r0 = gg.convert_saved_model(module_sm, tmp_path / "none")
    assert r0.plan.to_dict() == r8.plan.to_dict() and r0.inserted == r8.inserted == 4
    assert read_manifest(tmp_path / "none")["options"] == read_manifest(tmp_path / "b8")["options"]
    a = tf.saved_model.load(str(tmp_path / "b8")).signatures["serving_default"](image=tf.constant(X))
    b = tf.saved_model.load(str(tmp_path / "none")).signatures["serving_default"](image=tf.constant(X))
    for k in a:
        np.testing.assert_array_equal(a[k].numpy(), b[k].numpy())
    assert gg.inspect_saved_model(module_sm).to_dict() == gg.inspect_saved_model(module_sm, bits=8).to_dict()
    cfg = QuantizeConfig.create(format="e4m3", weights=True)
    plan = gg.inspect_saved_model(module_sm, config=cfg)
    assert plan.config is cfg and {str(p.format) for p in plan.activations} == {"e4m3"}
    rc = gg.convert_saved_model(module_sm, tmp_path / "cfg", config=cfg)
    assert rc.plan.to_dict() == plan.to_dict() and rc.prerounded > 0
    for fn in (gg.inspect_saved_model, lambda p, **kw: gg.convert_saved_model(p, tmp_path / "bad", **kw)):
        with pytest.raises(TypeError, match="config must be a graphquant.QuantizeConfig, got str"):
            fn(module_sm, config="e4m3")
        with pytest.raises(ValueError, match="config= or keyword options, not both"):
            fn(module_sm, config=cfg, bits=8)
    assert not (tmp_path / "bad").exists()


def test_unsupported_dtype(tmp_path):
    class IntConv(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 4, 4, 1], tf.int32)])
        def serve(self, x):
            y = tf.raw_ops.Conv2D(input=x, filter=tf.ones([1, 1, 1, 1], tf.int32), strides=[1, 1, 1, 1], padding="SAME")
            return {"y": y}

    m = IntConv()
    tf.saved_model.save(m, str(tmp_path / "ic"), signatures=m.serve)
    with pytest.raises(gg.SavedModelError, match="int32"):
        gg.convert_saved_model(tmp_path / "ic", tmp_path / "o", bits=8, range=(0.0, 1.0))


def _inserted_with_attrs(path):
    """(node, recorded format, recorded rounding) of every inserted rounding node in a written SavedModel."""
    inserted, _ = _graphquant_nodes(path)
    rows = []
    for n in inserted:
        if n.op == "Const":  # the constant (lo, hi) arguments of a calibrated kernel
            continue
        rows.append((n, n.attr["_graphquant_format"].s.decode(), n.attr["_graphquant_rounding"].s.decode()))
    return rows


def _call_every_signature(loaded):
    outs = {}
    for name, fn in loaded.signatures.items():
        feed = {k: tf.constant(X if spec.shape[1:] == X.shape[1:] else np.zeros([2] + spec.shape.as_list()[1:], "float32"))
                for k, spec in fn.structured_input_signature[1].items()}  # fmt: skip
        outs[name] = {k: v.numpy() for k, v in fn(**feed).items()}
    return outs


@pytest.mark.parametrize(
    "kw, fmt, rounding, ops",
    [
        ({"format": "e4m3"}, "e4m3", "nearest", {"PartitionedCall"}),
        ({"bits": 4, "range": (0.0, 6.0), "rounding": "stochastic", "seed": 0}, "fixed4[0,6]", "stochastic",
         {"StatefulPartitionedCall"}),
        # calibrated through serving_default; the "first" signature's conv keeps a dynamic range (a kernel call)
        ({"bits": 8, "calibration_data": X}, "affine8", "nearest", {"FakeQuantWithMinMaxArgs", "PartitionedCall"}),
    ],
)
def test_inserted_nodes_record_format_and_rounding(module_sm, tmp_path, kw, fmt, rounding, ops):
    from graphquant.formats import parse_format

    dst = tmp_path / "q"
    rep = gg.convert_saved_model(module_sm, dst, **kw)
    rows = _inserted_with_attrs(dst)
    assert len(rows) == rep.inserted == 4
    assert {n.op for n, _, _ in rows} == ops
    for n, f, r in rows:
        assert f.startswith(fmt) and r == rounding, (n.name, f, r)
        parse_format(f)  # the recorded text reads back as a format
    if fmt == "affine8":  # a calibrated FakeQuant records the range it applies; the dynamic kernel none
        assert sum(n.op == "FakeQuantWithMinMaxArgs" for n, _, _ in rows) == 3
        for n, f, _ in rows:
            if n.op == "FakeQuantWithMinMaxArgs":
                lo, hi = parse_format(f).range
                assert (lo, hi) == pytest.approx((n.attr["min"].f, n.attr["max"].f))
            else:
                assert f == "affine8"
    # TensorFlow accepts the extra attributes: load, serve every signature, inspect the result
    q = tf.saved_model.load(str(dst))
    outs = _call_every_signature(q)
    assert sorted(outs) == ["first", "serving_default"]
    assert gg.inspect_saved_model(dst, **{k: v for k, v in kw.items() if k in ("bits", "format", "range")}).targets
    feats = outs["serving_default"]["features"]
    if fmt == "fixed4[0,6]":
        step = 6.0 / 16
        assert np.allclose(feats / step, np.round(feats / step), atol=1e-4)
        assert feats.min() >= 0.0 and feats.max() <= 6.0 - step + 1e-6
        again = q.signatures["serving_default"](image=tf.constant(X))["features"].numpy()
        assert not np.array_equal(feats, again)  # stochastic: each call draws again
    elif fmt == "e4m3":
        import ml_dtypes

        assert np.array_equal(feats, feats.astype(ml_dtypes.float8_e4m3fn).astype(np.float32))


def test_short_scope_names_unique():
    names = ["__inference___call___5210", "__inference_serve_12", "__inference_block_3", "__inference_block_7",
             "block_3", "plain"]
    short = gg.planning.short_scope_names(names + ["", names[0]])
    assert short["__inference___call___5210"] == "__call__" and short["__inference_serve_12"] == "serve"
    assert short["plain"] == "plain"
    assert len(set(short.values())) == len(short) == len(names)  # distinct functions never share a name
    assert short["__inference_block_3"] != short["block_3"]


def test_graph_view_is_the_neutral_view(module_sm):
    """graph_view reads a GraphDef straight into patterns.View: the top level with one child view per library
    function (those asked to be skipped left out), nodes named inside their function, a function's arguments
    not nodes, its return values the consumer "<return>", variable reads flagged as parameters."""
    from graphquant.graph.view import graph_view
    from graphquant.patterns import GRAPH, View

    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString((Path(module_sm) / "saved_model.pb").read_bytes())
    gd = sm.meta_graphs[0].graph_def
    functions = [f.signature.name for f in gd.library.function]
    skip = [f for f in functions if f.startswith("__inference__traced_save")]
    view = graph_view(gd, skip_functions=skip)
    assert isinstance(view, View) and view.name == "graph" and len(skip) == 1
    assert set(view.children) == set(functions) - set(skip)
    (fname,) = [f for f in functions if f.startswith("__inference_serve_")]
    serve = view.children[fname]
    assert serve.name == fname and all(n.domain == GRAPH for n in serve)
    conv = serve["Conv2D"]
    assert conv.inputs == ["image", "Conv2D/ReadVariableOp"] and "image" not in serve
    assert conv.attrs["parameter_inputs"] == [False, True] and not conv.attrs["parameter"]
    assert serve["Conv2D/ReadVariableOp"].attrs["parameter"] and serve["Conv2D/ReadVariableOp"].consumers == ["Conv2D"]
    assert serve["Identity"].consumers == ["<return>"]
    assert [n.name for n in serve.producers("BiasAdd")] == ["Conv2D", "BiasAdd/ReadVariableOp"]
    with pytest.raises(TypeError, match="graph_def"):
        graph_view(fname)


def test_inspect_table_short_scopes(keras_sm):
    src, n_conv = keras_sm
    plan = gg.inspect_saved_model(src, bits=8, weights=True)
    full = {s for p in plan.points for s in p.scope}
    assert len(full) == 1 and next(iter(full)).startswith("__inference_")  # the data keeps the real name
    short = plan.scope_names()[next(iter(full))]
    assert short == "__call__"
    table = str(plan)
    lines = table.splitlines()
    rows = lines[2 : 2 + len(plan.points)]
    assert len(rows) == len(plan.points) == 2 * n_conv
    for p, row in zip(plan.points, rows):
        cells = row.split()
        assert cells[1] == f"{short}/{p.target}"  # whole, not cut with an ellipsis
    assert sum("__inference_" in l for l in lines) == 1  # only the line naming the scope
    assert f"scopes: {short} = {next(iter(full))}" in lines
    assert lines[1].split("  ")[1] == "-" * max(len(f"{short}/{p.target}") for p in plan.points)
    assert plan.to_dict()["points"][0]["scope"] == sorted(full)


def test_mxfp4_weights_blocked_along_each_kernel_reduction(module_sm, tmp_path):
    """convert_saved_model with a scaled format: the checkpoint's weights are blocked along the
    axis quantize_model uses (conv (kh, kw, in, out): in; depthwise (kh, kw, in, 1): the 9 taps
    of each output channel; transposed (kh, kw, out, in): in), the activations along the
    channels; the output serves and equals the module's computation with those roundings."""
    import graphquant as gq
    from test_scaled_formats import ref_mx

    dst = tmp_path / "mx"
    rep = gg.convert_saved_model(module_sm, dst, format="mxfp4", weights=True)
    assert rep.prerounded == 3 and rep.inserted == 4
    src, q = tf.saved_model.load(str(module_sm)), tf.saved_model.load(str(dst))
    w1, dw, wt = (v.numpy() for v in (src.w1, src.dw, src.wt))
    want = {"w1": ref_mx(w1, "e2m1", 2, "nearest", axis=-2),
            "dw": ref_mx(dw.reshape(9, 8), "e2m1", 2, "nearest", axis=0).reshape(dw.shape),
            "wt": ref_mx(wt, "e2m1", 2, "nearest", axis=-1)}
    for name, ref in want.items():
        np.testing.assert_array_equal(getattr(q, name).numpy(), ref, err_msg=name)
    # inserted rounding is live: the served output is the module's computation rounded at each point
    a = lambda t: gq.quantize(t, "mxfp4")
    x = tf.constant(X)
    y = a(tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(x, want["w1"], 1, "SAME"), src.b1)))
    d = a(tf.nn.relu6(tf.nn.depthwise_conv2d(y, want["dw"], [1, 1, 1, 1], "SAME")))
    t = a(tf.nn.conv2d_transpose(d, want["wt"], [2, 16, 16, 4], 2, "SAME"))
    out = q.signatures["serving_default"](image=x)
    np.testing.assert_allclose(out["features"].numpy(), d.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out["up"].numpy(), t.numpy(), rtol=1e-6, atol=1e-6)
    assert not np.array_equal(out["features"].numpy(), src.signatures["serving_default"](image=x)["features"].numpy())


def test_weights_mostly_rounded_to_zero_are_warned_about(tmp_path, caplog):
    class Small(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(np.random.RandomState(3).normal(0, 0.1, (3, 3, 3, 8)).astype("float32"), name="w")

        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32)])
        def serve(self, x):
            return {"y": tf.nn.conv2d(x, self.w, 1, "SAME", name="small_conv")}

    m = Small()
    tf.saved_model.save(m, str(tmp_path / "s"), signatures=m.serve)
    rep = gg.convert_saved_model(tmp_path / "s", tmp_path / "e2m1", format="e2m1", weights=True)
    assert len(rep.warnings) == 1 and "round to zero on e2m1" in rep.warnings[0] and "'mxfp4'" in rep.warnings[0]
    assert "small_conv" in rep.warnings[0] and "small_conv" in caplog.text
    assert (tf.saved_model.load(str(tmp_path / "e2m1")).w.numpy() == 0).mean() > 0.5  # what was warned about
    assert gg.convert_saved_model(tmp_path / "s", tmp_path / "mx", format="mxfp4", weights=True).warnings == []
