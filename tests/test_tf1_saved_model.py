"""TF1 SavedModels (``tf.compat.v1.saved_model.Builder``): signatures name top-level tensors.

Regression tests for issue 11 item 8: a group ending at a signature output was
rounded in a dead branch (outputs bit-identical to the float model), and a
SavedModel with two meta graphs got every plan point applied to every graph
(report: 4 inserted for 2 graphs of 1 convolution). Plus the invariant checked
after every rewrite: an inserted node reaching no output is an error.
"""

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import graph_pb2
from tensorflow.core.protobuf import saved_model_pb2

from graphquant.graph import convert_saved_model, quantize_function
from graphquant.graph.liveness import check_live, dead_insertions
from graphquant.graph.rewrite import FORMAT_ATTR, rounding_nodes

KERNEL = np.random.RandomState(0).randn(3, 3, 2, 3).astype("float32")
X = np.random.RandomState(1).randn(2, 6, 6, 2).astype("float32")


def build_tf1(path, train="signature"):
    """conv2d (variable kernel) -> relu, the relu being the signature output ``y``.

    ``train``: ``None`` one meta graph (``serve``); ``"signature"`` a second
    meta graph ``train`` with the same signature; ``"bare"`` a second one
    without any signature.
    """
    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 6, 6, 2], name="x")
        k = tf.compat.v1.get_variable("kernel", initializer=tf.constant(KERNEL))
        y = tf.nn.relu(tf.nn.conv2d(x, k, 1, "SAME"), name="relu")
        with tf.compat.v1.Session(graph=g) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            b = tf.compat.v1.saved_model.Builder(str(path))
            sig = tf.compat.v1.saved_model.predict_signature_def({"x": x}, {"y": y})
            b.add_meta_graph_and_variables(sess, ["serve"], signature_def_map={"serving_default": sig})
            if train == "signature":
                b.add_meta_graph(["train"], signature_def_map={"serving_default": sig})
            elif train == "bare":
                b.add_meta_graph(["train"])
            b.save()
    return path


def run_tf1(path, tags, feed=X):
    """Load with the TF1 loader and run signature ``serving_default`` in a session."""
    g = tf.Graph()
    with tf.compat.v1.Session(graph=g) as sess:
        mg = tf.compat.v1.saved_model.loader.load(sess, tags, str(path))
        sig = mg.signature_def["serving_default"]
        return sess.run(sig.outputs["y"].name, {sig.inputs["x"].name: feed})


def float_oracle():
    return np.maximum(tf.nn.conv2d(X, KERNEL, 1, "SAME").numpy(), 0)


def fixed4_0_4(y):
    """fixed4[0,4]: 16 steps of 0.25 from 0, saturating."""
    return np.clip(np.round(y / 0.25), 0, 15) * 0.25


def graph_rounding_counts(path):
    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString((path / "saved_model.pb").read_bytes())
    return {",".join(mg.meta_info_def.tags): len(rounding_nodes(mg.graph_def)) for mg in sm.meta_graphs}, sm


def test_signature_output_is_rounded(tmp_path):
    src = build_tf1(tmp_path / "m", train=None)
    ref = run_tf1(src, ["serve"])
    np.testing.assert_allclose(ref, float_oracle(), rtol=1e-5, atol=1e-5)
    rep = convert_saved_model(src, tmp_path / "q", bits=4, range=(0, 4))
    assert (rep.convolutions, rep.inserted) == (1, 1)
    out = run_tf1(tmp_path / "q", ["serve"])
    assert np.abs(out - ref).max() > 0.05  # was bit-identical: a dead branch
    np.testing.assert_allclose(out, fixed4_0_4(ref), atol=1e-6)
    # the signature keeps its key and names, and now reads the rounding node
    _, sm = graph_rounding_counts(tmp_path / "q")
    sig = sm.meta_graphs[0].signature_def["serving_default"]
    assert list(sig.outputs) == ["y"] and list(sig.inputs) == ["x"]
    nodes = {n.name: n for n in sm.meta_graphs[0].graph_def.node}
    assert FORMAT_ATTR in nodes[sig.outputs["y"].name.split(":")[0]].attr
    # the TF2 loader sees the same
    loaded = tf.saved_model.load(str(tmp_path / "q"), tags=["serve"])
    y2 = loaded.signatures["serving_default"](x=tf.constant(X))["y"].numpy()
    np.testing.assert_allclose(y2, out, atol=1e-6)


def test_variable_kernel_weights_rounded_in_checkpoint(tmp_path):
    src = build_tf1(tmp_path / "m", train=None)
    rep = convert_saved_model(src, tmp_path / "q", format="bfloat16", weights=True)
    assert rep.prerounded == 1 and rep.inserted == 1
    kernel = tf.train.load_checkpoint(str(tmp_path / "q" / "variables" / "variables")).get_tensor("kernel")
    want = KERNEL.astype(tf.bfloat16.as_numpy_dtype).astype("float32")
    np.testing.assert_array_equal(kernel, want)
    y = np.maximum(tf.nn.conv2d(X, want, 1, "SAME").numpy(), 0)
    out = run_tf1(tmp_path / "q", ["serve"])
    np.testing.assert_allclose(out, y.astype(tf.bfloat16.as_numpy_dtype).astype("float32"), rtol=1e-2, atol=1e-6)
    assert np.all(out == out.astype(tf.bfloat16.as_numpy_dtype).astype("float32"))


def test_two_meta_graphs_each_rounded_once(tmp_path):
    src = build_tf1(tmp_path / "m", train="signature")
    rep = convert_saved_model(src, tmp_path / "q", bits=4, range=(0, 4))
    assert rep.inserted == 2  # was 4: every graph got both graphs' points
    assert [(m["tags"], m["convolutions"], m["inserted"]) for m in rep.meta_graphs] == [
        (["serve"], 1, 1), (["train"], 1, 1)]
    assert rep.convolutions == 2
    assert rep.to_dict()["meta_graphs"][1]["inserted"] == 1
    assert "2 meta graphs" in str(rep)
    counts, _ = graph_rounding_counts(tmp_path / "q")
    assert counts == {"serve": 1, "train": 1}
    ref = float_oracle()
    for tags in (["serve"], ["train"]):
        np.testing.assert_allclose(run_tf1(tmp_path / "q", tags), fixed4_0_4(ref), atol=1e-6)


def test_meta_graph_without_signature_skips_unreadable_output(tmp_path):
    src = build_tf1(tmp_path / "m", train="bare")
    rep = convert_saved_model(src, tmp_path / "q", bits=4, range=(0, 4))
    assert [(m["tags"], m["inserted"]) for m in rep.meta_graphs] == [(["serve"], 1), (["train"], 0)]
    assert any("no signature" in why for _, _, why in rep.plan.skipped)
    counts, _ = graph_rounding_counts(tmp_path / "q")
    assert counts == {"serve": 1, "train": 0}
    np.testing.assert_allclose(run_tf1(tmp_path / "q", ["serve"]), fixed4_0_4(float_oracle()), atol=1e-6)


def test_function_returning_the_group_end_is_rounded():
    k = tf.constant(KERNEL)
    f = tf.function(lambda x: tf.nn.relu(tf.nn.conv2d(x, k, 1, "SAME")),
                    input_signature=[tf.TensorSpec([None, 6, 6, 2])], autograph=False)
    qf = quantize_function(f, bits=4, range=(0, 4))
    np.testing.assert_allclose(qf(X).numpy(), fixed4_0_4(float_oracle()), atol=1e-6)


# ---------------------------------------------------------------- the invariant
def _graph(text_nodes):
    gd = graph_pb2.GraphDef()
    for name, op, inputs in text_nodes:
        nd = gd.node.add(name=name, op=op)
        nd.input.extend(inputs)
    return gd


def test_dead_insertion_is_rejected():
    gd = _graph([("x", "Placeholder", []), ("relu", "Relu", ["x"]),
                 ("graphquant/q1", "FakeQuantWithMinMaxArgs", ["relu"]), ("out", "Identity", ["relu"])])
    assert dead_insertions(gd, [("", "graphquant/q1")], outputs=["out:0"]) == [("", "graphquant/q1")]
    with pytest.raises(ValueError, match=r"model\.pb: 1 inserted rounding node.*'graphquant/q1'"):
        check_live(gd, [("", "graphquant/q1")], model="model.pb", outputs=["out:0"])
    # once the output reads it, it is live
    gd.node[3].input[0] = "graphquant/q1"
    check_live(gd, [("", "graphquant/q1")], model="model.pb", outputs=["out:0"])
    # a signature output naming the rounding itself is live too
    assert dead_insertions(gd, [("", "graphquant/q1")], outputs=["graphquant/q1:0"]) == []


def test_liveness_through_called_functions():
    gd = _graph([("x", "Placeholder", []), ("call", "StatefulPartitionedCall", ["x"])])
    gd.node[1].attr["f"].func.name = "body"
    for fname in ("body", "orphan"):
        f = gd.library.function.add()
        f.signature.name = fname
        f.signature.input_arg.add(name="a")
        f.signature.output_arg.add(name="out")
        f.node_def.add(name="relu", op="Relu", input=["a"])
        f.node_def.add(name="q", op="FakeQuantWithMinMaxArgs", input=["relu:activations:0"])
        f.ret["out"] = "relu:activations:0"  # nothing reads q
    ins = [("body", "q"), ("orphan", "q")]
    assert dead_insertions(gd, ins, outputs=["call:0"]) == ins
    for f in gd.library.function:
        f.ret["out"] = "q:outputs:0"
    # body is called from the output's path; orphan only when exposed (object graph functions)
    assert dead_insertions(gd, ins, outputs=["call:0"]) == [("orphan", "q")]
    assert dead_insertions(gd, ins, outputs=["call:0"], functions=["orphan"]) == []
