"""graphquant batch (subprocess): nested layout, a corrupt model, resume, report."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from graphquant.batch import find_saved_models


class Tiny(tf.Module):
    def __init__(self, seed):
        super().__init__()
        self.w = tf.Variable(np.random.RandomState(seed).normal(size=(3, 3, 1, 2)).astype("float32"))

    @tf.function(input_signature=[tf.TensorSpec([None, 6, 6, 1], tf.float32, name="x")])
    def serve(self, x):
        return {"y": tf.nn.relu(tf.nn.conv2d(x, self.w, 1, "SAME"))}


def _hash(path):
    h = hashlib.sha1()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for f in sorted(files):
            h.update(str(Path(root, f).relative_to(path)).encode() + Path(root, f).read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch") / "models"
    for i, rel in enumerate(["a", "deep/er/b"]):
        m = Tiny(i)
        tf.saved_model.save(m, str(root / rel), signatures=m.serve)
    shutil.copytree(root / "a", root / "broken")
    (root / "broken" / "saved_model.pb").write_bytes(b"\x00garbage\xff" * 5)
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a model")
    return root


def run(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "graphquant", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_find(tree):
    assert [p.as_posix() for p in find_saved_models(tree)] == ["a", "broken", "deep/er/b"]


def test_batch_corrupt_then_resume(tree, tmp_path):
    before = _hash(tree)
    out = tmp_path / "out"
    report = tmp_path / "report.json"
    p = run("batch", str(tree), str(out), "--bits", "8", "--jobs", "2", "--report", str(report), "--no-progress")
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr
    r = json.loads(report.read_text())
    assert {k: v["status"] for k, v in r["models"].items()} == {"a": "converted", "broken": "failed", "deep/er/b": "converted"}
    assert "corrupt" in r["models"]["broken"]["error"]
    assert r["models"]["a"]["convolutions"] == 1 and r["models"]["a"]["inserted"] == 1
    assert (out / "deep/er/b/saved_model.pb").is_file()
    assert not (out / "broken").exists()  # a failed model leaves nothing that looks finished
    assert not [p for p in out.rglob("*") if "graphquant-tmp" in p.name]
    y = tf.saved_model.load(str(out / "a")).signatures["serving_default"](x=tf.ones([1, 6, 6, 1]))["y"]
    assert y.shape == (1, 6, 6, 2)
    mtime = (out / "a" / "saved_model.pb").stat().st_mtime_ns
    # rerun: finished models are skipped, the corrupt one fails again
    p = run("batch", str(tree), str(out), "--bits", "8", "--report", str(report), "--no-progress")
    assert p.returncode == 1
    r = json.loads(report.read_text())
    assert r["skipped"] == 2 and r["failed"] == 1 and r["converted"] == 0
    assert (out / "a" / "saved_model.pb").stat().st_mtime_ns == mtime
    assert _hash(tree) == before  # the source tree is never modified


def test_batch_usage_errors(tmp_path):
    p = run("batch", str(tmp_path / "nope"), str(tmp_path / "o"), "--bits", "8")
    assert p.returncode == 1 and "not a folder" in p.stderr and "Traceback" not in p.stderr
    p = run("batch", str(tmp_path), str(tmp_path / "o"), "--jobs", "x")
    assert p.returncode == 2
