"""graphquant batch (subprocess): nested layout, a corrupt model, resume, report; calibration; option parity
with convert; reused workers: crash, hang, recycling; Dask."""

import contextlib
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import graphquant as gq
from _saved_models import run as run_cli
from _saved_models import save_tiny, tree_hash
from graphquant import outputs
from graphquant.batch import convert_batch, find_saved_models
from graphquant.cli import CONVERT_ONLY, build_parser
from graphquant.graph.compare import q_nodes as _q_nodes
from graphquant.graph.saved_model import read_saved_model


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch") / "models"
    for i, rel in enumerate(["a", "deep/er/b"]):
        save_tiny(root / rel, seed=i)
    shutil.copytree(root / "a", root / "broken")
    (root / "broken" / "saved_model.pb").write_bytes(b"\x00garbage\xff" * 5)
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a model")
    return root


def run(*args):
    return run_cli(*args, timeout=600)


def test_find(tree):
    assert [p.as_posix() for p in find_saved_models(tree)] == ["a", "broken", "deep/er/b"]


def test_batch_corrupt_then_resume(tree, tmp_path):
    before = tree_hash(tree)
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
    assert tree_hash(tree) == before  # the source tree is never modified


def test_batch_usage_errors(tmp_path):
    p = run("batch", str(tmp_path / "nope"), str(tmp_path / "o"), "--bits", "8")
    assert p.returncode == 1 and "not a folder" in p.stderr and "Traceback" not in p.stderr
    p = run("batch", str(tmp_path), str(tmp_path / "o"), "--jobs", "x")
    assert p.returncode == 2


# --------------------------------------------------------------------------- calibration in batch
CAL = np.random.RandomState(5).normal(size=(16, 6, 6, 1)).astype("float32")


@pytest.fixture(scope="module")
def cal_tree(tmp_path_factory):
    """Two models that take (None, 6, 6, 1) and one that takes (None, 8, 8, 1); one calibration file for all."""
    base = tmp_path_factory.mktemp("cal")
    for i, rel in enumerate(["a", "b"]):
        save_tiny(base / "models" / rel, seed=i)
    save_tiny(base / "models" / "wide", seed=2, side=8)
    np.savez(base / "cal.npz", x=CAL)
    return base


def _serve(path, x):
    return tf.saved_model.load(str(path)).signatures["serving_default"](x=tf.constant(x))["y"].numpy()


def _ranges(path):
    return [p.range for p in _q_nodes(read_saved_model(path))]


def test_batch_calibration(cal_tree, tmp_path):
    """--calibration: one data set for every model that takes it (static ranges, as a single conversion with
    that data gives); a model it does not fit fails with one line naming both shapes; the others convert."""
    models, cal, out, report = cal_tree / "models", cal_tree / "cal.npz", tmp_path / "out", tmp_path / "r.json"
    p = run("batch", models, out, "--bits", "8", "--calibration", cal, "-j", "2", "--report", report, "--no-progress")
    assert p.returncode == 1, p.stderr
    r = json.loads(report.read_text())
    assert {k: v["status"] for k, v in r["models"].items()} == {"a": "converted", "b": "converted", "wide": "failed"}
    err = r["models"]["wide"]["error"]
    assert err == "ValueError: calibration_data: input 'x' expects shape (None, 8, 8, 1), got (16, 6, 6, 1)"
    assert f"failed: wide: {err}" in p.stderr.splitlines() and "Traceback" not in p.stderr
    # static ranges from the data, recorded in the manifest, equal to one convert_saved_model with the same data
    single = gq.convert_saved_model(models / "a", tmp_path / "single", bits=8, calibration_data=CAL)
    assert single.inserted == 1
    options = outputs.read_manifest(out / "a")["options"]
    assert options["calibration_data"] == outputs.fingerprint_data(CAL) and options["calibration_method"] == "minmax"
    assert options == outputs.read_manifest(tmp_path / "single")["options"]
    (rng,) = _ranges(out / "a")
    assert rng is not None and rng == tuple(_ranges(tmp_path / "single")[0])
    assert _ranges(out / "b")[0] != rng  # b's own activations were observed
    x = 3 * np.random.RandomState(9).normal(size=(2, 6, 6, 1)).astype("float32")  # wider than the data
    y = _serve(out / "a", x)
    np.testing.assert_array_equal(y, _serve(tmp_path / "single", x))
    gq.convert_saved_model(models / "a", tmp_path / "dynamic", bits=8)
    assert _ranges(tmp_path / "dynamic") == [None]
    assert np.abs(y - _serve(tmp_path / "dynamic", x)).max() > 0.1  # a dynamic range would follow x
    assert not list(out.glob(".*graphquant-tmp*"))
    # library, arrays: written once to a temporary file the workers read (removed after); a dict keeps its key
    r = gq.convert_batch(models / "a", tmp_path / "lib", bits=8, calibration_data={"x": CAL}, progress=False)
    assert r.models["a"]["status"] == "converted", r.models
    assert outputs.read_manifest(tmp_path / "lib" / "a")["options"]["calibration_data"] == outputs.fingerprint_data({"x": CAL})
    assert _ranges(tmp_path / "lib" / "a") == [rng]
    assert sorted(f.name for f in (tmp_path / "lib").iterdir()) == ["a", "graphquant-batch.json"]
    # other data: the outputs are not taken as done (refused without overwrite, like other options)
    np.save(tmp_path / "other.npy", CAL[:8])
    with pytest.raises(FileExistsError, match="other options"):
        gq.convert_batch(models, out, bits=8, calibration_data=tmp_path / "other.npy", progress=False, report=report)
    with pytest.raises(TypeError, match="calibration_data of a batch must be a .npz/.npy path"):
        gq.convert_batch(models, out, bits=8, calibration_data=iter([CAL]), progress=False, report=report)


def test_workers_read_calibration_once_and_check_it(cal_tree, tmp_path):
    """convert_one's file reference: loaded once per process (cached), and data that changed since the batch
    started fails the model instead of calibrating it with other data than its manifest would record."""
    from graphquant import batch

    cal = tmp_path / "cal.npz"
    shutil.copy(cal_tree / "cal.npz", cal)
    ref = {"path": str(cal), "fingerprint": outputs.fingerprint_data(CAL), "keyed": False}
    batch._calibration_of.cache_clear()
    for _ in range(2):
        np.testing.assert_array_equal(batch._calibration_of(ref["path"], ref["fingerprint"], False), CAL)
    assert batch._calibration_of.cache_info().misses == 1 and batch._calibration_of.cache_info().hits == 1
    np.savez(cal, x=CAL[:4])
    batch._calibration_of.cache_clear()
    rec = batch.convert_one(str(cal_tree / "models" / "a"), str(tmp_path / "o"),
                            {"bits": 8, batch.CALIBRATION_FILE: ref})  # fmt: skip
    assert rec["status"] == "failed" and "changed since the batch started" in rec["error"], rec
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- one option set for convert and batch
def _options(command):
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    return {s: a for a in sub._actions for s in a.option_strings if s not in ("-h", "--help")}


def test_batch_takes_every_convert_option():
    """Every convert option but the listed convert-only ones is a batch option with the same definition."""
    convert, batch = _options("convert"), _options("batch")
    assert set(CONVERT_ONLY) <= set(convert) and not set(CONVERT_ONLY) & set(batch)
    missing = sorted(set(convert) - set(batch) - set(CONVERT_ONLY))
    assert not missing, f"convert options batch does not take: {missing}"
    for name in set(convert) - set(CONVERT_ONLY):
        a, b = convert[name], batch[name]
        assert (type(a), a.dest, a.type, a.choices, a.default, a.nargs, a.const) == \
            (type(b), b.dest, b.type, b.choices, b.default, b.nargs, b.const), name
    for name in ("--calibration", "--calibration-method", "--percentile", "--weights", "--format", "--rounding",
                 "--bits", "--range", "--seed"):
        assert name in batch


#: the one option set run through convert and batch below; options it leaves out, and why
PARITY_ARGS = ["--bits", "6", "--rounding", "toward_zero", "--weights", "--weight-bits", "4", "--weight-rounding",
               "toward_zero", "--calibration", None,
               "--calibration-method", "percentile", "--percentile", "99.5", "--signature", "serving_default",
               "--include", "Conv", "--exclude", "nothing", "--seed", "3", "--force", "--overwrite", "--quiet"]
PARITY_LEFT_OUT = {"--format": "--bits gives the format", "--range": "a fixed range has nothing to calibrate",
                   "-q": "--quiet is given", "--weight-format": "--weight-bits gives the weight format",
                   "--dense": "one target kind is enough to compare the two commands (test_cli checks --dense)"}


def test_convert_and_batch_same_options_same_output(cal_tree, tmp_path):
    convert = _options("convert")
    shared = {s for s in convert if s not in CONVERT_ONLY}
    assert shared == {a for a in PARITY_ARGS if a and a.startswith("-")} | set(PARITY_LEFT_OUT)
    args = [str(cal_tree / "cal.npz") if a is None else a for a in PARITY_ARGS]
    src = cal_tree / "models" / "a"
    p = run("convert", src, tmp_path / "c", *args)
    assert p.returncode == 0, p.stderr
    p = run("batch", src, tmp_path / "b", *args)  # a model as the source root: its output is b/a
    assert p.returncode == 0, p.stderr
    mc, mb = outputs.read_manifest(tmp_path / "c"), outputs.read_manifest(tmp_path / "b" / "a")
    assert mc["options"] == mb["options"]
    assert mb["options"]["calibration_method"] == "percentile" and mb["options"]["calibration_percentile"] == 99.5
    assert mb["options"]["seed"] == 3 and mb["result"]["prerounded"] == 1
    assert _ranges(tmp_path / "c") == _ranges(tmp_path / "b" / "a") != [None]
    x = 3 * np.random.RandomState(9).normal(size=(2, 6, 6, 1)).astype("float32")
    np.testing.assert_array_equal(_serve(tmp_path / "c", x), _serve(tmp_path / "b" / "a", x))

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
        save_tiny(root / f"m{i}", seed=i)
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
