"""Speed of the simulated ``tflite_int8`` target against the float model, side by side (issue 13).

Run from the repository root:

    python scripts/bench_tflite_sim.py                 # digits CNN and MobileNetV2, both kernel sets
    python scripts/bench_tflite_sim.py --models digits --reps 50
    python scripts/bench_tflite_sim.py --threads 1     # one thread each: the work alone

For each model and kernel set (``reference``, ``xnnpack``): inference (``tf.function``, ``training=False``)
and a QAT step (``tf.function``: forward with ``training=True``, gradients, Adam) of the float model and of
``quantize_model(model, target="tflite_int8", calibration_data=...)``. The float and simulated calls
alternate (float, simulated, float, ...) so that both see the same load on a shared machine; each time is the
best of ``--reps``; the ratio is simulated / float.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

MODELS = ("digits", "mobilenetv2")


def _inference_fn(m):
    import tensorflow as tf

    return tf.function(lambda t: m(t, training=False))


def _step_fn(m):
    import keras
    import tensorflow as tf

    opt = keras.optimizers.Adam(1e-5)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step(t, lab):
        with tf.GradientTape() as tape:
            lv = loss(lab, m(t, training=True))
        g = tape.gradient(lv, m.trainable_variables)
        opt.apply_gradients(zip(g, m.trainable_variables))
        return lv

    return step


def side_by_side(fns, reps):
    """Best time (s) of each of ``fns`` (callables returning a tensor), called in turn ``reps`` times."""
    for f in fns:  # trace, compile, warm up
        np.asarray(f())
        np.asarray(f())
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, f in enumerate(fns):
            t = time.perf_counter()
            np.asarray(f())
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def models(chosen, size):
    import keras

    out = []
    if "digits" in chosen:
        import digits

        x_tr, _, y_tr, _ = digits.load_data()
        cnn = digits.build_cnn()
        digits._compile(cnn, keras.optimizers.Adam(1e-2))
        cnn.fit(x_tr, y_tr, epochs=2, batch_size=32, verbose=0)
        out.append(("digits CNN, batch 256", cnn, x_tr[:256], y_tr[:256]))
    if "mobilenetv2" in chosen:
        from tflite_agreement import reestimate_bn

        rng = np.random.RandomState(0)
        imgs = rng.rand(64, size, size, 3).astype("float32") * 2 - 1
        keras.utils.set_random_seed(0)
        mb = keras.applications.MobileNetV2(input_shape=(size, size, 3), alpha=0.35, weights=None, classes=10,
                                            classifier_activation=None)  # fmt: skip
        reestimate_bn(mb, imgs)
        out.append((f"MobileNetV2 a=0.35 {size}x{size}, batch 32", mb, imgs[:32], rng.randint(0, 10, 32)))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    ap.add_argument("--kernels", default="reference,xnnpack")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0,
                    help="TensorFlow's intra- and inter-op threads (0: its default); 1 measures the work alone, "
                         "steadier on a shared machine")  # fmt: skip
    ns = ap.parse_args(argv)
    chosen = {m.strip() for m in ns.models.split(",") if m.strip()}
    if not chosen or chosen - set(MODELS):
        ap.error(f"--models: choose from {', '.join(MODELS)}")
    import tensorflow as tf

    if ns.threads:
        tf.config.threading.set_intra_op_parallelism_threads(ns.threads)
        tf.config.threading.set_inter_op_parallelism_threads(ns.threads)
    import graphquant as gq

    lines = ["| model | kernels | float inference (ms) | simulated (ms) | ratio | float QAT step (ms) | "
             "simulated (ms) | ratio |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, fm, x, y in models(chosen, ns.size):
        x, y = tf.constant(x), tf.constant(y)
        for kernels in [k.strip() for k in ns.kernels.split(",") if k.strip()]:
            q = gq.quantize_model(fm, target="tflite_int8", calibration_data=x.numpy(), kernels=kernels)
            fi, qi = _inference_fn(fm), _inference_fn(q)
            a, b = side_by_side([lambda: fi(x), lambda: qi(x)], ns.reps)
            fs, qs = _step_fn(fm), _step_fn(q)
            c, d = side_by_side([lambda: fs(x, y), lambda: qs(x, y)], ns.reps)
            lines.append(f"| {name} | {kernels} | {a * 1e3:.2f} | {b * 1e3:.2f} | {b / a:.2f}x | {c * 1e3:.2f} | "
                         f"{d * 1e3:.2f} | {d / c:.2f}x |")  # fmt: skip
            print(lines[-1], flush=True)
    threads = f", {ns.threads} TensorFlow thread(s)" if ns.threads else ""
    print(f"\nSimulated tflite_int8 against float, best of {ns.reps} alternating runs{threads}\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
