"""Benchmark graphquant.quantize_model against the float model and tfmot, side by side.

    python scripts/bench_models.py [--size 224] [--batch 8] [--archs MobileNetV2 ResNet50] [--no-tfmot]

For each architecture (``keras.applications``, random weights) it prints:

* the time of ``quantize_model(model, bits=8, weights=True)`` (median of 3
  after a warm-up call, for both tools);
* inference time of the 8-bit model (weights and activations) / float model;
* one training step of the QAT model / one float training step;

and the same figures for tensorflow-model-optimization's ``quantize_model``,
measured in a subprocess with tf-keras on the same architecture (tfmot needs
legacy Keras; importing it switches ``tf.keras`` to tf-keras, so it never runs
in this process). Install it with ``pip install tf-keras tensorflow-model-optimization``.
Timings are medians of repetitions interleaved float / quantized; ratios are what to compare across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def _median_time(fn, repeat: int) -> float:
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


_COMMON = r'''
import json, statistics, sys, time
import numpy as np

def median_time(fn, repeat):
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts)

def interleaved(fns, repeat):
    """Median time of each fn, repetitions interleaved (a, b, a, b, ...): machine load hits both alike."""
    ts = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter(); fn(); ts[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}

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
gk.quantize_model(model, bits=8, weights=True)  # warm-up (imports, first-call costs)
t_quant = median_time(lambda: gk.quantize_model(model, bits=8, weights=True), 3)
q = gk.quantize_model(model, bits=8, weights=True, calibration_data=x)
fi, ft = step_fns(keras, tf, model, x, y)
qi, qt = step_fns(keras, tf, q, x, y)
res = interleaved({"infer_float": fi, "infer_q": qi}, repeat)
res.update(interleaved({"train_float": ft, "train_q": qt}, repeat))
res["quantize"] = t_quant
print(json.dumps(res))
'''

_TFMOT = _COMMON + r'''
import os
os.environ["TF_USE_LEGACY_KERAS"] = "1"
import tensorflow as tf
try:
    import tf_keras as keras
    import tensorflow_model_optimization as tfmot
except Exception as e:  # not installed
    print(json.dumps({"error": f"{type(e).__name__}: {e}"})); sys.exit(0)
arch, size, batch, repeat = ARGS
tf.keras.utils.set_random_seed(0)
model = getattr(keras.applications, arch)(input_shape=(size, size, 3), weights=None)
x = np.random.RandomState(0).rand(batch, size, size, 3).astype("float32")
y = np.random.RandomState(1).randint(0, 1000, size=batch)
q = tfmot.quantization.keras.quantize_model(model)  # warm-up, as for graphquant
t_quant = median_time(lambda: tfmot.quantization.keras.quantize_model(model), 3)
fi, ft = step_fns(keras, tf, model, x, y)
qi, qt = step_fns(keras, tf, q, x, y)
res = interleaved({"infer_float": fi, "infer_q": qi}, repeat)
res.update(interleaved({"train_float": ft, "train_q": qt}, repeat))
res["quantize"] = t_quant
print(json.dumps(res))
'''


def _run(template: str, args: tuple, timeout: float) -> dict:
    code = template.replace("REPO", repr(REPO)).replace("ARGS", repr(args))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+", default=["MobileNetV2", "ResNet50"])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--no-tfmot", action="store_true", help="skip the tfmot subprocess")
    p.add_argument("--timeout", type=float, default=1800)
    a = p.parse_args(argv)
    rows = []
    for arch in a.archs:
        args = (arch, a.size, a.batch, a.repeat)
        gq = _run(_GQ, args, a.timeout)  # each side in its own process: no shared state, same conditions
        tm = {"error": "skipped"} if a.no_tfmot else _run(_TFMOT, args, a.timeout)
        rows.append((arch, gq, tm))

    def fig(r: dict, key: str) -> str:
        if "error" in r:
            return "n/a"
        if key == "quantize":
            return f"{r['quantize']:.2f} s"
        num, den = r[f"{key}_q"], r[f"{key}_float"]
        return f"{num / den:.2f}x ({num * 1e3:.0f} / {den * 1e3:.0f} ms)"

    print(f"\ninput {a.size}x{a.size}, batch {a.batch}, median of {a.repeat}; ratios = quantized / float\n")
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
