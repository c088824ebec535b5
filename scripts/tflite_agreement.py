"""Deployment fidelity: does the simulation predict the int8 LiteRT model? (issue 13)

Run from the repository root:

    python scripts/tflite_agreement.py            # digits CNN, a ResNet-style net, MobileNetV2 and EfficientNetB0
    python scripts/tflite_agreement.py --quick    # digits CNN only
    python scripts/tflite_agreement.py --models mobilenetv2   # one model (the same weights as in a full run)

For each model: "before" is today's ``quantize_model(bits=8, weights=True)``,
"after" is ``quantize_model(target="tflite_int8")``; both calibrated with
minmax on the same data and exported with ``graphquant.export_tflite``. The
table gives, per kernel set of the LiteRT interpreter (reference kernels,
default kernels = XNNPACK delegate) and the simulation's integer kernels
(``reference`` / ``xnnpack``, the matching ones, and for the target also the
reference arithmetic against the default kernels), the largest output
difference in output LSBs, the % of output elements equal and the top-1
agreement; then accuracy rows (digits)
and the speed of the simulated target against float (inference and a QAT step).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402


MODELS = ("digits", "resnet", "mobilenetv2", "efficientnetb0")


def calibrate(model, data, **kw):
    """Today's calibration (minmax), behind one function so the calibration engine of issue 12 can replace it."""
    import graphquant as gq

    return gq.quantize_model(model, calibration_data=data, calibration_method="minmax", **kw)


def reestimate_bn(model, data, batch=64):
    """BatchNorm moving statistics set to the statistics of ``data`` (random-weight nets get healthy activations)."""
    import keras

    bns = [l for l in model._flatten_layers(include_self=False, recursive=True)
           if isinstance(l, keras.layers.BatchNormalization)]  # fmt: skip
    for bn in bns:  # one layer at a time, in order, so each sees normalised inputs
        mom = bn.momentum
        bn.momentum = 0.0
        model(data[:batch], training=True)
        bn.momentum = mom
        # only this layer's statistics are kept: later layers are redone in the next iterations
    return model


def resnet_like(size, seed=0):
    import keras

    keras.utils.set_random_seed(seed)
    x = inp = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    for ch, stride in ((16, 1), (32, 2), (64, 2)):
        sc = x
        if stride != 1 or sc.shape[-1] != ch:
            sc = keras.layers.Conv2D(ch, 1, strides=stride, use_bias=False)(sc)
            sc = keras.layers.BatchNormalization()(sc)
        h = keras.layers.Conv2D(ch, 3, strides=stride, padding="same", use_bias=False)(x)
        h = keras.layers.BatchNormalization()(h)
        h = keras.layers.ReLU()(h)
        h = keras.layers.Conv2D(ch, 3, padding="same", use_bias=False)(h)
        h = keras.layers.BatchNormalization()(h)
        x = keras.layers.ReLU()(keras.layers.Add()([h, sc]))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(10)(x), name="resnet_like")


def row(name, variant, agreement):
    out = []
    for a in agreement:
        top1 = "-" if a.top1_pct is None else f"{a.top1_pct:.2f}"
        out.append(f"| {name} | {variant} | {a.kernels} | {a.simulated or '-'} | {a.max_diff_lsb:g} | "
                   f"{a.equal_pct:.3f} | {top1} |")  # fmt: skip
    return out


def timed(fn, reps=20):
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def speed(float_model, q, x, y):
    import keras
    import tensorflow as tf

    res = {}
    for name, m in (("float", float_model), ("tflite_int8 sim", q)):
        f = tf.function(lambda t, m=m: m(t, training=False))
        res[(name, "inference")] = timed(lambda: f(x))
        opt = keras.optimizers.Adam(1e-4)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

        @tf.function
        def step(t, lab, m=m, opt=opt):
            with tf.GradientTape() as tape:
                lv = loss(lab, m(t, training=True))
            g = tape.gradient(lv, m.trainable_variables)
            opt.apply_gradients(zip(g, m.trainable_variables))
            return lv

        res[(name, "QAT step")] = timed(lambda: step(x, y))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="digits CNN only")
    ap.add_argument("--models", default=",".join(MODELS),
                    help=f"comma-separated subset of {','.join(MODELS)} (default: all)")
    ap.add_argument("--size", type=int, default=64)
    ns = ap.parse_args(argv)
    chosen = {"digits"} if ns.quick else {m.strip() for m in ns.models.split(",") if m.strip()}
    unknown = chosen - set(MODELS)
    if unknown or not chosen:
        ap.error(f"--models: unknown {sorted(unknown)}; choose from {', '.join(MODELS)}")
    import keras

    import digits
    import graphquant as gq
    from graphquant.tflite import agreement

    tmp = Path(tempfile.mkdtemp(prefix="gq-tflite-"))
    lines = ["| model | quantization | interpreter kernels | simulated kernels | max \\|diff\\| (output LSB) | "
             "% equal | top-1 agree % |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    acc_rows = []
    models = []
    if "digits" in chosen:
        x_tr, x_te, y_tr, y_te = digits.load_data()
        keras.utils.set_random_seed(0)
        cnn = digits.build_cnn()
        digits._compile(cnn, keras.optimizers.Adam(1e-2))
        cnn.fit(x_tr, y_tr, epochs=15, batch_size=32, verbose=0)
        models.append(("digits CNN", cnn, x_tr[:256], x_te, y_te))
    if chosen - {"digits"}:
        rng = np.random.RandomState(0)
        imgs = rng.rand(320, ns.size, ns.size, 3).astype("float32") * 2 - 1
        rn = resnet_like(ns.size)  # built even when not run: MobileNetV2's random weights follow it
        if "resnet" in chosen:
            models.append(("ResNet-style", reestimate_bn(rn, imgs), imgs[:256], imgs[256:], None))
        if "mobilenetv2" in chosen:
            mb = keras.applications.MobileNetV2(input_shape=(ns.size, ns.size, 3), alpha=0.35, weights=None,
                                                classes=10, classifier_activation=None)  # fmt: skip
            models.append(("MobileNetV2 a=0.35", reestimate_bn(mb, imgs), imgs[:256], imgs[256:], None))
        if "efficientnetb0" in chosen:  # built last: the other models' random weights stay those of a full run
            keras.utils.set_random_seed(0)
            ef = keras.applications.EfficientNetB0(input_shape=(ns.size, ns.size, 3), weights=None, classes=10,
                                                   classifier_activation=None)  # fmt: skip
            pix = imgs * 127.5 + 127.5  # EfficientNet rescales [0, 255] pixels itself (Rescaling, Normalization)
            models.append(("EfficientNetB0", reestimate_bn(ef, pix), pix[:256], pix[256:], None))
    for name, fm, cal, test, labels in models:
        variants = [("before: bits=8, weights=True", dict(bits=8, weights=True)),
                    ("after: target=tflite_int8", dict(target="tflite_int8"))]  # fmt: skip
        if labels is not None:
            variants.append(("after, 4-bit weights", dict(target="tflite_int8", weight_bits=4)))
        for vname, kw in variants:
            t = time.perf_counter()
            q = calibrate(fm, cal, **kw)
            path = tmp / f"{abs(hash((name, vname)))}.tflite"
            rep = gq.export_tflite(q, path, check_data=test, representative_data=cal)
            lines += row(name, vname, rep.agreement)
            if "target" in kw:  # the reference kernels' arithmetic against the default kernels: how far they are
                lines += row(name, vname, agreement(q, path, test, kernels=("default",), simulated="reference"))
            print(f"{name} / {vname}: {time.perf_counter() - t:.1f}s, fully integer: {rep.fully_integer}", flush=True)
            if labels is not None:
                from graphquant.tflite import load_interpreter, run_interpreter

                it = load_interpreter(path, "default")  # the kernels q simulates by default (XNNPACK)
                _, (yt,) = run_interpreter(it, [test])
                sim = q.predict(test, verbose=0)
                acc_rows.append(f"| {vname} | {np.mean(sim.argmax(1) == labels) * 100:.2f} | "
                                f"{np.mean(yt.argmax(1) == labels) * 100:.2f} |")  # fmt: skip
        if labels is not None:
            acc_rows.insert(0, f"| float | {np.mean(fm.predict(test, verbose=0).argmax(1) == labels) * 100:.2f} | - |")
    print("\nAgreement of the simulation with the LiteRT interpreter\n")
    print("\n".join(lines))
    if "digits" not in chosen:
        return
    print("\nDigits test accuracy (%)\n\n| model | simulated | TFLite int8 (default kernels) |\n|---|---|---|")
    print("\n".join(acc_rows))
    q = calibrate(cnn, x_tr[:256], target="tflite_int8")
    sp = speed(cnn, q, x_tr[:256], y_tr[:256])
    print("\nSpeed, batch 256 digits (ms)\n\n| | float | tflite_int8 simulated | ratio |\n|---|---|---|---|")
    for what in ("inference", "QAT step"):
        a, b = sp[("float", what)] * 1e3, sp[("tflite_int8 sim", what)] * 1e3
        print(f"| {what} | {a:.2f} | {b:.2f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
