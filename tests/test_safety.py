"""Issue 11: conversions never lose data, never report a false success, refuse bad input clearly.

Real SavedModels and .keras files in temporary folders; the command line as real subprocesses.
"""

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import graphquant as gq
from _saved_models import run, save_tiny, tree_hash
from graphquant import outputs


def one_line(p):
    """The CLI failed with exactly one short error line and no traceback."""
    assert p.returncode != 0, p.stdout
    assert "Traceback" not in p.stderr, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.startswith("graphquant")]
    assert len(lines) == 1, p.stderr
    assert len(lines[0]) < 400, lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety") / "models"
    for i, rel in enumerate(["m1", "deep/m2"]):
        save_tiny(root / rel, seed=i)
    return root


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory):
    import keras

    inp = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(2, 3, padding="same", name="conv")(inp)
    x = keras.layers.ReLU()(x)
    out = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x))
    path = tmp_path_factory.mktemp("keras") / "m.keras"
    keras.Model(inp, out).save(path)
    return path


# --------------------------------------------------------------------------- 1, 13: .keras sources
def test_keras_same_file_is_refused_and_keras_convert_matches_saved_model(keras_file, tmp_path):
    src = tmp_path / "m.keras"
    shutil.copy(keras_file, src)
    before = src.read_bytes()
    link = tmp_path / "link.keras"
    link.symlink_to(src)
    for dst, extra in ((src, ()), (link, ("--overwrite",))):
        p = run("convert", src, dst, "--bits", "8", *extra)
        assert "is the source" in one_line(p) and p.returncode == 1
    assert src.read_bytes() == before  # the float original survives

    # 13: --seed and --json are honoured, counts are printed, inspect accepts .keras
    q, report = tmp_path / "q.keras", tmp_path / "r.json"
    p = run("convert", src, q, "--bits", "8", "--weights", "--rounding", "stochastic", "--seed", "3", "--json", report)
    assert p.returncode == 0, p.stderr
    assert "1 convolutions, 2 graphquant layers" in p.stdout and "conv" in p.stdout
    r = json.loads(report.read_text())
    assert r["convolutions"] == 1 and r["destination"] == str(q) and r["plan"]["points"]
    manifest = outputs.read_keras_manifest(q)
    assert manifest["options"]["seed"] == 3 and manifest["source_fingerprint"] == outputs.fingerprint_tree(src)
    assert outputs.fingerprint_tree(src) != outputs.fingerprint_tree(q)  # a file's contents, not a constant
    import keras

    loaded = keras.models.load_model(q)
    seeds = [layer.get_config().get("seed") for layer in loaded.layers if type(layer).__name__ == "Quantize"]
    assert seeds and all(s is not None for s in seeds)  # --seed reached the layers
    p = run("inspect", src, "--bits", "8", "--json")
    assert p.returncode == 0, p.stderr
    assert [pt["target"] for pt in json.loads(p.stdout)["points"]] == ["conv"]

    # a .keras destination graphquant did not write is never replaced; its own output only with --overwrite
    other = tmp_path / "other.keras"
    shutil.copy(keras_file, other)
    p = run("convert", src, other, "--bits", "8", "--overwrite")
    assert "not written by graphquant" in one_line(p)
    assert other.read_bytes() == keras_file.read_bytes()
    p = run("convert", src, q, "--bits", "4")
    assert "--overwrite" in one_line(p)
    p = run("convert", src, q, "--bits", "4", "--overwrite")
    assert p.returncode == 0, p.stderr
    assert not [x for x in tmp_path.iterdir() if "graphquant-tmp" in x.name]


# --------------------------------------------------------------------------- 2: --overwrite
def test_overwrite_replaces_only_what_graphquant_wrote(models, tmp_path):
    userdir = tmp_path / "userdir"
    (userdir / "photos").mkdir(parents=True)
    (userdir / "thesis.txt").write_text("four years of work")
    (userdir / "photos" / "a.jpg").write_bytes(b"\xff\xd8")
    before = tree_hash(userdir)
    p = run("convert", models / "m1", userdir, "--bits", "8", "--overwrite")
    msg = one_line(p)
    assert "thesis.txt" in msg and "photos/" in msg and "did not write" in msg
    assert tree_hash(userdir) == before

    # batch of a source root that is itself a SavedModel: the output is out/NAME, next to the user's files
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    p = run("batch", models / "m1", out, "--bits", "8", "--overwrite", "--no-progress")
    assert p.returncode == 0, p.stderr
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "m1" / "saved_model.pb").is_file() and (out / "m1" / outputs.MANIFEST).is_file()

    # a graphquant output to which a user added a file is not replaced either
    q = tmp_path / "q"
    gq.convert_saved_model(models / "m1", q, bits=8)
    (q / "assets").mkdir(exist_ok=True)
    (q / "assets" / "mine.txt").write_text("added later")
    with pytest.raises(FileExistsError, match="added since"):
        gq.convert_saved_model(models / "m1", q, bits=8, overwrite=True)
    assert (q / "assets" / "mine.txt").read_text() == "added later"


# --------------------------------------------------------------------------- 3, 14: report paths
def test_report_paths_are_checked_before_any_work(models, tmp_path):
    before = tree_hash(models)
    out = tmp_path / "out"
    user_file = tmp_path / "keep.txt"
    user_file.write_text("not a report")
    (tmp_path / "folder").mkdir()
    cases = [
        (models / "m1" / "saved_model.pb", "inside the source"),
        (out / "m1" / "r.json", "inside the model folder"),
        (user_file, "not a graphquant report"),
        (tmp_path / "folder", "is a folder"),
    ]
    for i, (report, why) in enumerate(cases):
        if i == 0:  # the command line: one line, non-zero exit
            p = run("batch", models, out, "--bits", "8", "--report", report, "--no-progress")
            assert why in one_line(p) and p.returncode != 0, report
        else:  # the same check in the library (one subprocess is enough to show the CLI's form)
            with pytest.raises(ValueError, match=why):
                gq.convert_batch(models, out, bits=8, report=report, progress=False)
        assert not (out / "m1").exists() and not (out / "deep").exists()  # refused before any work
    assert tree_hash(models) == before
    assert user_file.read_text() == "not a report"
    # convert --json and compare --json follow the same rules
    p = run("convert", models / "m1", tmp_path / "c", "--bits", "8", "--json", models / "m1" / "r.json")
    assert "inside the source" in one_line(p) and not (tmp_path / "c").exists()
    p = run("convert", models / "m1", tmp_path / "c", "--bits", "8", "--json", user_file)
    assert "not a graphquant report" in one_line(p) and not (tmp_path / "c").exists()

    # a good report: written atomically with ordinary permissions, and rewritten by the next run
    report = tmp_path / "reports" / "r.json"
    old = os.umask(0o022)
    try:
        p = run("batch", models, out, "--bits", "8", "--report", report, "--no-progress")
    finally:
        os.umask(old)
    assert p.returncode == 0, p.stderr
    assert report.stat().st_mode & 0o777 == 0o644
    assert json.loads(report.read_text())["converted"] == 2
    assert not [x for x in report.parent.iterdir() if x.name != "r.json"]
    p = run("batch", models, out, "--bits", "8", "--report", report, "--no-progress")
    assert p.returncode == 0 and json.loads(report.read_text())["skipped"] == 2


# --------------------------------------------------------------------------- 4: reruns
def test_rerun_with_other_options_or_a_changed_source(tmp_path):
    src = tmp_path / "b3"
    for i in range(2):
        save_tiny(src / f"m{i}", seed=i)
    out, report = tmp_path / "out", tmp_path / "r.json"
    r = gq.convert_batch(src, out, bits=8, report=report, progress=False)
    assert r.count("converted") == 2
    # other options: refused at once without overwrite (nothing converted), reconverted with it
    with pytest.raises(FileExistsError, match="2 output.*other options.*m0, m1"):
        gq.convert_batch(src, out, format="e4m3", weights=True, report=report, progress=False)
    assert outputs.read_manifest(out / "m0")["options"]["config"]["format"]["kind"] == "affine"
    p = run("batch", src, out, "--format", "e4m3", "--weights", "--report", report, "--no-progress")
    assert "other options" in one_line(p)
    r = gq.convert_batch(src, out, format="e4m3", weights=True, overwrite=True, report=report, progress=False)
    assert r.count("converted") == 2
    assert outputs.read_manifest(out / "m0")["options"]["config"]["format"]["kind"] == "float"
    # same options: skipped, and the report keeps their counts
    r = gq.convert_batch(src, out, format="e4m3", weights=True, report=report, progress=False)
    assert r.count("skipped") == 2
    rec = json.loads(report.read_text())["models"]["m0"]
    assert rec["status"] == "skipped" and rec["convolutions"] == 1 and rec["inserted"] == 1 and rec["prerounded"] == 1
    # a changed source is reconverted; so is an output with a file missing
    shutil.rmtree(src / "m1")
    save_tiny(src / "m1", seed=7)
    (out / "m0" / "variables" / "variables.index").unlink()
    r = gq.convert_batch(src, out, format="e4m3", weights=True, report=report, progress=False)
    assert {k: (v["status"], v.get("reason")) for k, v in r.models.items()} == {
        "m0": ("converted", "output incomplete"), "m1": ("converted", "source changed")}
    y = tf.saved_model.load(str(out / "m0")).signatures["serving_default"](x=tf.ones([1, 6, 6, 1]))["y"]
    assert y.shape == (1, 6, 6, 2)


# --------------------------------------------------------------------------- 5, 6: signals, stale files, the lock
def _children(pid):
    kids = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        kids.update(int(k) for k in text)
    return kids


def _cmdline(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


def _all_dead(pids, seconds=30):
    deadline = time.monotonic() + seconds
    while any(_alive(k) for k in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(_alive(k) for k in pids)


def _start_batch(src, out, report):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.Popen([sys.executable, "-m", "graphquant", "batch", str(src), str(out), "--bits", "8",
                             "--report", str(report), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # wait until a worker runs (not a helper process some import runs)
        kids = {k for k in _children(proc.pid) if b"spawn_main" in _cmdline(k)}
        if kids:
            return proc, kids
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("no worker started")


@pytest.fixture(scope="module")
def five(tmp_path_factory):
    src = tmp_path_factory.mktemp("five") / "src"
    for i in range(5):
        save_tiny(src / f"m{i}", seed=i)
    return src


def test_sigterm_is_handled_like_ctrl_c(five, tmp_path):
    out, report = tmp_path / "out", tmp_path / "r.json"
    proc, kids = _start_batch(five, out, report)
    deadline = time.monotonic() + 240
    # a model under way (its temporary output, or one published): a worker that has started but not yet
    # been handed a model (a full CI machine) would leave nothing to interrupt
    while time.monotonic() < deadline and proc.poll() is None and not (
        out.is_dir() and any(outputs.TMP_MARK in p.name or not p.name.startswith(".") for p in out.iterdir())
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "terminated" in err
    r = json.loads(report.read_text())
    assert r["converted"] + r["failed"] >= 1 and r["converted"] < 5
    assert any(v["error"] == "interrupted" for v in r["models"].values())
    assert _all_dead(kids)
    assert not (out / outputs._LOCK).exists()  # the lock was released


def test_a_signal_while_a_worker_starts_is_raised_after_the_start():
    # CI once sent SIGTERM in the middle of Process.start(): the half-written start-up pickle made the child print
    # an EOFError traceback. A signal within `held()` is raised when the block ends, never inside it.
    from graphquant.batch import Terminated, _sigterm_as_interrupt

    for sig, exc in ((signal.SIGTERM, Terminated), (signal.SIGINT, KeyboardInterrupt)):
        reached = []
        with _sigterm_as_interrupt() as interrupts:
            with pytest.raises(exc):
                with interrupts.held():
                    os.kill(os.getpid(), sig)
                    for _ in range(100):  # Python runs the handler between these bytecodes
                        time.sleep(0.001)
                    reached.append(True)
        assert reached == [True], sig
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_kill_9_workers_die_and_a_rerun_cleans_up(five, tmp_path):
    out, report = tmp_path / "out", tmp_path / "r.json"
    proc, kids = _start_batch(five, out, report)
    proc.kill()
    proc.communicate(timeout=60)
    assert _all_dead(kids)  # workers died with their parent
    time.sleep(1.0)
    published = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    time.sleep(2.0)
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} == published  # nothing published after
    # what a killed run leaves: its lock and a temporary folder of a dead process (made by hand, as kill -9 leaves it)
    assert (out / outputs._LOCK).exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = out / f".m0{outputs.TMP_MARK}{dead.pid}-abc"
    (stale / "out").mkdir(parents=True)
    p = run("batch", five, out, "--bits", "8", "--report", report, "--no-progress")
    assert p.returncode == 0, p.stderr
    assert not stale.exists() and not [x for x in out.iterdir() if outputs.TMP_MARK in x.name]
    assert json.loads(report.read_text())["converted"] + json.loads(report.read_text())["skipped"] == 5


def test_one_batch_per_destination(models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    lock = out / outputs._LOCK
    # a live process holds the lock (this test process): refused at once
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    p = run("batch", models, out, "--bits", "8", "--no-progress")
    assert f"pid {os.getpid()}" in one_line(p) and "is writing to" in one_line(p)
    assert not (out / "m1").exists()
    # the lock of a dead process is stale: taken over, and released at the end
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    r = gq.convert_batch(models, out, bits=8, progress=False)
    assert r.count("converted") == 2 and not lock.exists()
    # two real runs at once: the second is refused while the first holds the lock
    with outputs.DestinationLock(out):
        with pytest.raises(FileExistsError, match="is writing to"):
            gq.convert_batch(models, out, bits=8, progress=False)


# --------------------------------------------------------------------------- 7: links
def test_links_out_of_the_model_are_refused(models, tmp_path):
    secret = tmp_path / "outside" / "SECRET.txt"
    secret.parent.mkdir()
    secret.write_text("do not copy")
    m = tmp_path / "m"
    shutil.copytree(models / "m1", m)
    (m / "assets").mkdir(exist_ok=True)
    (m / "assets" / "leak.txt").symlink_to(secret)
    with pytest.raises(gq.SavedModelError, match="symbolic link out of the model folder"):
        gq.convert_saved_model(m, tmp_path / "o1", bits=8)
    (m / "assets" / "leak.txt").unlink()
    (m / "assets" / "dir").symlink_to(secret.parent, target_is_directory=True)
    p = run("convert", m, tmp_path / "o2", "--bits", "8")
    assert "symbolic link out of the model folder" in one_line(p)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    (m / "assets" / "dir").unlink()
    (m / "assets" / "loop").symlink_to(m / "assets" / "loop")
    p = run("convert", m, tmp_path / "o3", "--bits", "8")
    assert "symbolic link loop" in one_line(p)
    (m / "assets" / "loop").unlink()
    (m / "assets" / "inside.txt").write_text("ok")
    (m / "assets" / "alias.txt").symlink_to(m / "assets" / "inside.txt")  # a link inside the model is fine
    gq.convert_saved_model(m, tmp_path / "o4", bits=8)
    assert (tmp_path / "o4" / "assets" / "alias.txt").read_text() == "ok"


# --------------------------------------------------------------------------- 9: only what loads back is converted
def test_truncated_or_missing_variables_fail_with_one_line(models, tmp_path):
    m = tmp_path / "m"
    shutil.copytree(models / "m1", m)
    data = next((m / "variables").glob("variables.data-*"))
    data.write_bytes(data.read_bytes()[:40])
    for extra in ((), ("--weights",), ("--calibration", tmp_path / "cal.npy")):
        np.save(tmp_path / "cal.npy", np.ones((2, 6, 6, 1), "float32"))
        p = run("convert", m, tmp_path / "o", "--bits", "8", *extra)
        msg = one_line(p)
        assert "variables" in msg and str(m) in msg, msg
        assert not (tmp_path / "o").exists()
    shutil.rmtree(m / "variables")
    with pytest.raises(gq.SavedModelError, match="does not load"):
        gq.convert_saved_model(m, tmp_path / "o", bits=8)
    assert not (tmp_path / "o").exists() and not [x for x in tmp_path.iterdir() if outputs.TMP_MARK in x.name]


# --------------------------------------------------------------------------- 14: usage errors
def test_usage_errors_exit_2_and_bad_reports_fail_first(models, tmp_path):
    p = run("batch", models, tmp_path / "o", "--bits", "8", "-j", "0")
    assert p.returncode == 2 and "positive" in p.stderr and "Traceback" not in p.stderr


# --------------------------------------------------------------------------- 16: a full disk
def _limit_file_size(limit):
    def preexec():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return preexec


def test_full_disk_is_one_line_and_leaves_nothing(models, tmp_path):
    # every write past 4 KiB fails (EFBIG), as a write on a full disk fails (ENOSPC): saved_model.pb is ~13 KiB
    p = run("convert", models / "m1", tmp_path / "o", "--bits", "8", "--weights", preexec_fn=_limit_file_size(4096))
    msg = one_line(p)
    assert p.returncode == 1 and "nothing written" in msg, msg
    assert not any(tmp_path.iterdir())
    # a batch whose report cannot be written stops with one line and leaves no temporary report behind
    out = tmp_path / "out"
    p = run("batch", models, out, "--bits", "8", "--no-progress", preexec_fn=_limit_file_size(120))
    msg = one_line(p)
    assert p.returncode == 1 and "File too large" in msg, msg
    leftovers = [x.name for x in out.rglob("*") if "graphquant-batch.json" in x.name or outputs.TMP_MARK in x.name]
    assert leftovers == []
    assert not (out / outputs._LOCK).exists()
