"""Speed of graphquant.quantize against TensorFlow's FakeQuant kernel.

Runs every candidate side by side in one process on the same tensor
(16M float32 elements by default), interleaving the measurements round by
round in a shuffled order so machine noise hits all of them alike, and prints each one's median
time and its ratio to ``tf.quantization.fake_quant_with_min_max_vars``.

    python scripts/bench_ops.py [--elements N] [--rounds R] [--json out.json]

Rows: graphquant's formats (affine, fixed point, floats, and the scaled MX /
NVFP4 formats in blocks along the last axis), a naive stochastic rounding, and
the floor: an XLA ``x * c``, one read and one write of the tensor.

Only the ratios mean anything: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

import graphquant as gq  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--elements", type=int, default=16 * 1024 * 1024)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--json", help="write the results here as JSON")
    args = p.parse_args(argv)

    x = tf.random.stateless_uniform([args.elements], seed=[1, 2], minval=-1.5, maxval=1.5)
    fixed = gq.FixedPoint(8, range=(-1.0, 1.0))
    affine = gq.Affine(8, range=(-1.0, 1.0))
    gen = tf.random.Generator.from_seed(0)
    c = tf.constant(1.5)
    times_c = tf.function(lambda t, k: t * k, jit_compile=True)

    def naive_stochastic():
        # the textbook way: uniform noise, then floor, as separate TF ops
        step = 2.0 / 256
        k = tf.floor((x + 1.0) / step + gen.uniform(tf.shape(x)))
        return -1.0 + tf.clip_by_value(k, 0.0, 255.0) * step

    candidates = {
        "tf.fake_quant (reference)": lambda: tf.quantization.fake_quant_with_min_max_vars(x, -1.0, 1.0, num_bits=8),
        "affine8 nearest": lambda: gq.quantize(x, affine),
        "fixed8 nearest": lambda: gq.quantize(x, fixed),
        "fixed8 stochastic": lambda: gq.quantize(x, fixed, "stochastic", seed=gen),
        "e4m3 nearest": lambda: gq.quantize(x, "e4m3"),
        "e4m3 stochastic": lambda: gq.quantize(x, "e4m3", "stochastic", seed=gen),
        "bfloat16 nearest": lambda: gq.quantize(x, "bfloat16"),
        "naive uniform+floor stochastic": naive_stochastic,
        "floor: XLA x * c (one memory pass)": lambda: times_c(x, c),
    }
    for name in ("mxfp8_e4m3", "mxfp4", "nvfp4"):  # scaled formats: blocks of 32 (16) along the last axis
        candidates[f"{name} nearest"] = lambda n=name: gq.quantize(x, n)
        candidates[f"{name} stochastic"] = lambda n=name: gq.quantize(x, n, "stochastic", seed=gen)
    times = {k: [] for k in candidates}
    for f in candidates.values():  # warm up: trace and XLA-compile
        f().numpy()
        f().numpy()
    order = list(candidates.items())
    shuffle = random.Random(0).shuffle
    for _ in range(args.rounds):
        shuffle(order)  # no candidate always runs right after another one
        for name, f in order:
            t0 = time.perf_counter()
            f().numpy()
            times[name].append(time.perf_counter() - t0)
    ref = statistics.median(times["tf.fake_quant (reference)"])
    print(f"{args.elements:,} float32 elements, median of {args.rounds} interleaved rounds, "
          f"TensorFlow {tf.__version__}, graphquant {gq.__version__}")
    print(f"{'candidate':36s} {'ms':>9s} {'ratio':>7s}")
    result = {}
    for name, ts in times.items():
        m = statistics.median(ts)
        result[name] = {"ms": m * 1e3, "ratio": m / ref}
        print(f"{name:36s} {m * 1e3:9.2f} {m / ref:7.2f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
