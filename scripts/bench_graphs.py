"""Benchmark the graph front end; prints ratios measured side by side in one run.

For each architecture (keras.applications, random weights) exported as a
SavedModel:

* conversion cost: ``convert_saved_model`` (load, rewrite, save) against a
  plain ``tf.saved_model.load`` + ``tf.saved_model.save`` of the same model
  (target: at most 2x);
* inference: the converted model's serving signature against the source's,
  calls interleaved, median of repeated timings (target: within 1.10x).

Usage: python scripts/bench_graphs.py [--size 224] [--repeats 20] [--batch 8] [--archs MobileNetV2 ResNet50]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402


def _median_time(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--archs", nargs="+", default=["MobileNetV2", "ResNet50"])
    args = ap.parse_args()

    import keras
    import tensorflow as tf

    from graphquant.graph import convert_saved_model

    rows = []
    root = tempfile.mkdtemp(prefix="gq-bench-")
    try:
        for arch in args.archs:
            keras.utils.set_random_seed(0)
            model = getattr(keras.applications, arch)(weights=None, input_shape=(args.size, args.size, 3))
            src = os.path.join(root, arch)
            model.export(src, verbose=False)
            del model
            x = np.random.RandomState(0).uniform(-1, 1, (args.batch, args.size, args.size, 3)).astype("float32")

            def plain():
                d = os.path.join(root, f"{arch}-plain")
                shutil.rmtree(d, ignore_errors=True)
                tf.saved_model.save(tf.saved_model.load(src), d)

            def convert(**kw):
                d = os.path.join(root, f"{arch}-q")
                return convert_saved_model(src, d, overwrite=True, **kw)

            # warm both paths once (TF op registration, tracing caches)
            plain()
            convert(bits=8, range=(-6.0, 6.0))
            t_plain, t_conv, t_conv_w = [], [], []
            for _ in range(3):  # interleaved
                t = time.perf_counter(); plain(); t_plain.append(time.perf_counter() - t)  # noqa: E702
                t = time.perf_counter(); convert(bits=8, range=(-6.0, 6.0)); t_conv.append(time.perf_counter() - t)  # noqa: E702
                t = time.perf_counter(); convert(bits=8, weights=True, calibration_data=x[:2]); t_conv_w.append(time.perf_counter() - t)  # noqa: E702
            tp, tc, tcw = statistics.median(t_plain), statistics.median(t_conv), statistics.median(t_conv_w)

            # inference: the calibrated 8-bit model with pre-rounded weights
            q_dir = os.path.join(root, f"{arch}-q")
            f0 = tf.saved_model.load(src).signatures["serving_default"]
            f1 = tf.saved_model.load(q_dir).signatures["serving_default"]
            name = next(iter(f0.structured_input_signature[1]))
            xt = tf.constant(x)
            for f in (f0, f1):
                for _ in range(3):
                    f(**{name: xt})
            i0, i1 = [], []
            for _ in range(args.repeats):
                i0.append(_median_time(lambda: f0(**{name: xt}), 1))
                i1.append(_median_time(lambda: f1(**{name: xt}), 1))
            m0, m1 = statistics.median(i0), statistics.median(i1)
            rows.append((arch, tp, tc, tcw, m0, m1))
            print(
                f"{arch} {args.size}x{args.size}: load+save {tp:.2f} s | convert (fixed range) {tc:.2f} s = {tc / tp:.2f}x"
                f" | convert (calibrated, weights) {tcw:.2f} s = {tcw / tp:.2f}x | inference batch {args.batch}:"
                f" source {m0 * 1e3:.1f} ms, converted {m1 * 1e3:.1f} ms = {m1 / m0:.2f}x",
                flush=True,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print()
    print("| model | convert / (load+save) | convert calibrated+weights / (load+save) | inference converted / source |")
    print("|---|---|---|---|")
    for arch, tp, tc, tcw, m0, m1 in rows:
        print(f"| {arch} {args.size}x{args.size} | {tc / tp:.2f}x | {tcw / tp:.2f}x | {m1 / m0:.2f}x |")


if __name__ == "__main__":
    main()
