"""Benchmark graphquant.quantize_model against the float model and tfmot, side by side.

    python scripts/bench_models.py [--size 224] [--batch 8] [--archs MobileNetV2 ResNet50] [--no-tfmot]

For each architecture (``keras.applications``, random weights) it prints:

* the time of ``quantize_model(model, bits=8, weights=True)``: after a
  warm-up call, the median of ``--quantize-repeat`` calls alternating with
  tfmot's (the two worker processes take turns, so machine load hits both);
* inference time of the 8-bit model (weights and activations) / float model;
* one training step of the QAT model / one float training step;

and the same figures for tensorflow-model-optimization's ``quantize_model``,
measured in a subprocess with tf-keras on the same architecture (tfmot needs
legacy Keras; importing it switches ``tf.keras`` to tf-keras, so it never runs
in this process). Install it with ``pip install tf-keras tensorflow-model-optimization``.
Step timings are medians of repetitions interleaved float / quantized; ratios are what to compare across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


_COMMON = r'''
import json, statistics, sys, time
import numpy as np

def interleaved(fns, repeat):
    """Median time of each fn, repetitions interleaved (a, b, a, b, ...): machine load hits both alike."""
    ts = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter(); fn(); ts[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}

def serve(quantize, measure_steps):
    """Lock-step worker: the parent sends "quantize" (time one call, reply the
    seconds) or "steps" (reply the step timings as JSON), one command at a time,
    so two workers never run at once and alternate under the same machine load."""
    quantize()  # warm-up: imports and first-call costs
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quantize":
            t0 = time.perf_counter(); quantize(); print(time.perf_counter() - t0, flush=True)
        elif cmd == "steps":
            print(json.dumps(measure_steps()), flush=True)
        else:
            break

def step_fns(keras, tf, model, x, y):
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy")
    infer = tf.function(lambda t: model(t, training=False))
    def run_infer():
        infer(x).numpy()
    def run_train():
        model.train_on_batch(x, y)
    run_infer(); run_infer(); run_train(); run_train()
    return run_infer, run_train
'''

_GQ = _COMMON + r'''
import keras, tensorflow as tf
sys.path.insert(0, REPO)
import graphquant.keras as gk
arch, size, batch, repeat = ARGS
keras.utils.set_random_seed(0)
model = getattr(keras.applications, arch)(input_shape=(size, size, 3), weights=None)
x = np.random.RandomState(0).rand(batch, size, size, 3).astype("float32")
y = np.random.RandomState(1).randint(0, 1000, size=batch)
def steps():
    q = gk.quantize_model(model, bits=8, weights=True, calibration_data=x)
    fi, ft = step_fns(keras, tf, model, x, y)
    qi, qt = step_fns(keras, tf, q, x, y)
    res = interleaved({"infer_float": fi, "infer_q": qi}, repeat)
    res.update(interleaved({"train_float": ft, "train_q": qt}, repeat))
    return res
serve(lambda: gk.quantize_model(model, bits=8, weights=True), steps)
'''

_TFMOT = _COMMON + r'''
import os
os.environ["TF_USE_LEGACY_KERAS"] = "1"
import tensorflow as tf
try:
    import tf_keras as keras
    import tensorflow_model_optimization as tfmot
except Exception as e:  # not installed
    print("error", f"{type(e).__name__}: {e}", flush=True); sys.exit(0)
arch, size, batch, repeat = ARGS
tf.keras.utils.set_random_seed(0)
model = getattr(keras.applications, arch)(input_shape=(size, size, 3), weights=None)
x = np.random.RandomState(0).rand(batch, size, size, 3).astype("float32")
y = np.random.RandomState(1).randint(0, 1000, size=batch)
def steps():
    q = tfmot.quantization.keras.quantize_model(model)
    fi, ft = step_fns(keras, tf, model, x, y)
    qi, qt = step_fns(keras, tf, q, x, y)
    res = interleaved({"infer_float": fi, "infer_q": qi}, repeat)
    res.update(interleaved({"train_float": ft, "train_q": qt}, repeat))
    return res
serve(lambda: tfmot.quantization.keras.quantize_model(model), steps)
'''


class _Worker:
    """A benchmark subprocess driven line by line (see ``serve`` in the templates)."""

    def __init__(self, template: str, args: tuple, timeout: float):
        code = template.replace("REPO", repr(REPO)).replace("ARGS", repr(args))
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        self.timeout = timeout
        self.error: Optional[str] = None
        self.stderr = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty worker never blocks
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, env=env)
        line = self._line()
        if line is not None and line != "ready":
            self.error = line[len("error "):] if line.startswith("error ") else line

    def _line(self) -> Optional[str]:
        while True:
            ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
            if not ready:
                self.error = f"timed out after {self.timeout:.0f}s"
                self.proc.kill()
                return None
            line = self.proc.stdout.readline()
            if not line:  # the process died: its last stderr line says why
                self.stderr.seek(0)
                err = self.stderr.read().strip().splitlines()
                self.error = err[-1] if err else f"exit {self.proc.wait()}"
                return None
            line = line.strip()
            if line == "ready" or line.startswith(("error ", "{")) or _is_float(line):
                return line

    def ask(self, cmd: str) -> Optional[str]:
        if self.error:
            return None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._line()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("exit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except Exception:
                self.proc.kill()


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _measure(arch: str, a: argparse.Namespace) -> Tuple[dict, dict]:
    """graphquant and tfmot side by side: quantize_model timed alternately, then the steps."""
    args = (arch, a.size, a.batch, a.repeat)
    workers = {"gq": _Worker(_GQ, args, a.timeout)}
    if not a.no_tfmot:
        workers["tm"] = _Worker(_TFMOT, args, a.timeout)
    times: Dict[str, List[float]] = {k: [] for k in workers}
    for _ in range(a.quantize_repeat):
        for k, w in workers.items():  # gq, tfmot, gq, tfmot, ...: one runs while the other waits
            r = w.ask("quantize")
            if r is not None:
                times[k].append(float(r))
    results = {}
    for k, w in workers.items():
        r = w.ask("steps")
        res = json.loads(r) if r else {}
        if w.error or not times[k]:
            res = {"error": w.error or "no result"}
        else:
            res["quantize"] = statistics.median(times[k])
        w.close()
        results[k] = res
    return results["gq"], results.get("tm", {"error": "skipped"})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+", default=["MobileNetV2", "ResNet50"])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--quantize-repeat", type=int, default=5, help="alternating quantize_model calls per tool")
    p.add_argument("--no-tfmot", action="store_true", help="skip the tfmot subprocess")
    p.add_argument("--timeout", type=float, default=1800)
    a = p.parse_args(argv)
    rows = []
    for arch in a.archs:
        gq, tm = _measure(arch, a)
        rows.append((arch, gq, tm))

    def fig(r: dict, key: str) -> str:
        if "error" in r:
            return "n/a"
        if key == "quantize":
            return f"{r['quantize']:.2f} s"
        num, den = r[f"{key}_q"], r[f"{key}_float"]
        return f"{num / den:.2f}x ({num * 1e3:.0f} / {den * 1e3:.0f} ms)"

    print(f"\ninput {a.size}x{a.size}, batch {a.batch}, steps: median of {a.repeat}; quantize_model: median of "
          f"{a.quantize_repeat}, alternating with tfmot's; ratios = quantized / float\n")
    hdr = f"{'model':<12} {'':<10} {'quantize_model':>16} {'inference':>28} {'train step':>28}"
    print(hdr)
    print("-" * len(hdr))
    for arch, gq, tm in rows:
        for who, r in (("graphquant", gq), ("tfmot", tm)):
            print(f"{arch:<12} {who:<10} {fig(r, 'quantize'):>16} {fig(r, 'infer'):>28} {fig(r, 'train'):>28}")
        if "error" not in gq and "error" not in tm:
            print(f"{'':<12} {'speed-up':<10} {tm['quantize'] / gq['quantize']:>15.1f}x")
        for who, r in (("graphquant", gq), ("tfmot", tm)):
            if "error" in r and r["error"] != "skipped":
                print(f"  {who}: {r['error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
