"""graphquant batch: nested layout, a corrupt model, resume, report; reused workers: crash, hang, recycling."""

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from graphquant import outputs
from graphquant.batch import convert_batch, find_saved_models


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
    p = run("batch", str(tree), str(out), "--bits", "8", "--jobs", "2", "--report", str(report), "--no-progress",
            "--max-per-worker", "50", "--max-worker-memory", "1", "--timeout", "300")
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr
    r = json.loads(report.read_text())
    assert {k: v["status"] for k, v in r["models"].items()} == {"a": "converted", "broken": "failed", "deep/er/b": "converted"}
    assert "corrupt" in r["models"]["broken"]["error"]
    assert r["models"]["a"]["convolutions"] == 1 and r["models"]["a"]["inserted"] == 1
    # every worker is past 1 MB after its model: replaced after each one
    assert r["models"]["a"]["rss_mb"] > 1 and r["workers_started"] == len({v["worker"] for v in r["models"].values()}) == 3
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

def test_batch_worker_flags_usage_errors(tmp_path, capsys):
    from graphquant.cli import main

    with pytest.raises(SystemExit) as e:
        main(["batch", str(tmp_path), str(tmp_path / "o"), "--timeout", "0"])
    assert e.value.code == 2 and "--timeout: must be a positive number, got 0" in capsys.readouterr().err
    assert main(["batch", str(tmp_path), str(tmp_path / "o"), "--dask", "tcp://127.0.0.1:9", "-j", "2"]) == 1
    assert "--jobs is a setting of the local workers" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- reused workers
VARIABLES = "variables/variables.data-00000-of-00001"


@pytest.fixture(scope="module")
def trouble(tmp_path_factory):
    """Four good models, a corrupt one, and two whose variables file is a FIFO: reading it blocks until someone
    writes (as on a stalled network mount), so their conversion really hangs in TensorFlow's reader."""
    root = tmp_path_factory.mktemp("trouble") / "src"
    for i in range(4):
        m = Tiny(i)
        tf.saved_model.save(m, str(root / f"m{i}"), signatures=m.serve)
    shutil.copytree(root / "m0", root / "broken")
    (root / "broken" / "saved_model.pb").write_bytes(b"\x00garbage\xff" * 5)
    for name in ("stuck1", "stuck2"):
        shutil.copytree(root / "m0", root / name)
        (root / name / VARIABLES).unlink()
        os.mkfifo(root / name / VARIABLES)
    return root


def _descendants(pid):
    kids = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        for k in (task / "children").read_text().split():
            kids |= {int(k)} | _descendants(int(k))
    return kids


def kill_blocked_worker(killed, stop, then=None):
    """Wait until a process under this one is blocked opening a FIFO (it is converting such a model), kill -9 it
    (then call ``then()``)."""
    while not stop.is_set():
        for pid in _descendants(os.getpid()):
            with contextlib.suppress(OSError):
                if any((t / "wchan").read_text() == "wait_for_partner" for t in Path(f"/proc/{pid}/task").iterdir()):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    if then is not None:
                        then()
                    return
        time.sleep(0.05)


def _dead(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_workers_are_reused_and_a_crash_or_hang_fails_only_its_model(trouble, tmp_path):
    # both stuck models hang in their workers: the test kills the first worker it finds stuck, the other times out
    out = tmp_path / "out"
    killed, stop = [], threading.Event()
    killer = threading.Thread(target=kill_blocked_worker, args=(killed, stop))
    killer.start()
    try:
        r = convert_batch(trouble, out, bits=8, jobs=2, timeout=10, progress=False)
    finally:
        stop.set()
        killer.join()
    assert {k: v["status"] for k, v in r.models.items()} == {
        "broken": "failed", "stuck1": "failed", "stuck2": "failed",
        "m0": "converted", "m1": "converted", "m2": "converted", "m3": "converted"}
    assert "corrupt" in r.models["broken"]["error"]
    crashed, hung = sorted((r.models["stuck1"], r.models["stuck2"]), key=lambda rec: "timed out" in rec["error"])
    assert crashed["error"] == "worker process crashed (killed by signal SIGKILL)" and killed == [crashed["worker"]]
    assert hung["error"] == "timed out after 10 s (worker killed)" and hung["seconds"] >= 10
    pids = [rec["worker"] for rec in r.models.values()]
    assert len(set(pids)) < len(pids) and os.getpid() not in pids  # workers convert several models
    assert r.to_dict()["workers_started"] == len(set(pids)) <= 4  # the two killed workers were replaced
    assert all(_dead(pid) for pid in set(pids))
    assert not [p for p in out.rglob("*") if outputs.TMP_MARK in p.name]  # the killed workers' temporaries
    for i in range(4):
        y = tf.saved_model.load(str(out / f"m{i}")).signatures["serving_default"](x=tf.ones([1, 6, 6, 1]))["y"]
        assert y.shape == (1, 6, 6, 2)


def test_workers_are_recycled_after_k_models(trouble, tmp_path):
    # (past a memory bound: test_batch_corrupt_then_resume)
    src = tmp_path / "src"
    for name in ("m0", "m1", "m2"):
        shutil.copytree(trouble / name, src / name)
    r = convert_batch(src, tmp_path / "k", bits=8, max_per_worker=2, progress=False)
    assert r.count("converted") == 3 and r.to_dict()["workers_started"] == 2
    assert r.models["m0"]["worker"] == r.models["m1"]["worker"] != r.models["m2"]["worker"]
    with pytest.raises(ValueError, match="max_per_worker must be a positive integer"):
        convert_batch(src, tmp_path / "bad", bits=8, max_per_worker=0)
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        convert_batch(src, tmp_path / "bad", bits=8, timeout=-1)


# --------------------------------------------------------------------------- Dask
@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=":0") as cluster, \
            Client(cluster) as c:
        yield c


def test_dask_same_report_resume_and_manifests_as_local(tree, client, tmp_path):
    out, report = tmp_path / "out", tmp_path / "r.json"
    r = convert_batch(tree, out, bits=8, client=client, report=report, progress=False)
    assert {k: v["status"] for k, v in r.models.items()} == {"a": "converted", "broken": "failed", "deep/er/b": "converted"}
    assert "corrupt" in r.models["broken"]["error"]
    assert r.models["a"]["convolutions"] == 1 and r.models["a"]["inserted"] == 1 and r.models["a"]["reason"] == "new"
    assert {r.models[k]["worker"] for k in ("a", "deep/er/b")} <= set(client.scheduler_info()["workers"])
    assert json.loads(report.read_text())["converted"] == 2
    assert json.loads((out / "a" / "graphquant.json").read_text())["result"]["inserted"] == 1
    # resume from the command line on the same cluster: the same rules
    p = run("batch", str(tree), str(out), "--bits", "8", "--report", str(report), "--no-progress",
            "--dask", client.scheduler.address)
    assert p.returncode == 1 and "failed: broken: SavedModelError" in p.stderr and "Traceback" not in p.stderr
    r = json.loads(report.read_text())
    assert (r["skipped"], r["failed"], r["converted"]) == (2, 1, 0)
    with pytest.raises(ValueError, match="timeout is a setting of the local worker pool"):
        convert_batch(tree, out, bits=8, client=client, timeout=5)


def test_dask_worker_killed_mid_model_is_retried_or_reported_failed(trouble, client, tmp_path):
    src = tmp_path / "src"
    for name in ("m0", "m1"):
        shutil.copytree(trouble / name, src / name)
    fifo = src / "stuck" / VARIABLES

    def stick():
        shutil.copytree(trouble / "m0", src / "stuck", dirs_exist_ok=True)
        fifo.unlink()
        os.mkfifo(fifo)

    def unstick():  # a retry finds an ordinary model
        fifo.unlink()
        shutil.copy(trouble / "m0" / VARIABLES, fifo)

    scheduler = client.cluster.scheduler
    for allowed_failures, status in ((0, "failed"), (scheduler.allowed_failures, "converted")):
        stick()
        killed, stop = [], threading.Event()
        killer = threading.Thread(target=kill_blocked_worker, args=(killed, stop, unstick))
        killer.start()
        default, scheduler.allowed_failures = scheduler.allowed_failures, allowed_failures
        try:
            r = convert_batch(src, tmp_path / f"out{allowed_failures}", bits=8, client=client, progress=False)
        finally:
            scheduler.allowed_failures = default
            stop.set()
            killer.join()
        assert len(killed) == 1  # a Dask worker process died while converting "stuck"
        assert sorted(r.models) == ["m0", "m1", "stuck"] and r.models["stuck"]["status"] == status
        if status == "failed":  # no retry allowed: reported failed with the reason (so are models queued on it)
            for rec in r.models.values():
                assert rec["status"] == "converted" or rec["error"].startswith("Dask task failed (KilledWorker"), rec
        else:
            assert r.count("converted") == 3
        assert not [p for p in (tmp_path / f"out{allowed_failures}").rglob("*") if outputs.TMP_MARK in p.name]
