"""Evidence on real data: QAT on scikit-learn's 8x8 digits, and the Gupta et al. 2015 effect.

Run from the repository root:

    python scripts/digits.py            # full run: writes docs/results.md and docs/gupta.png
    python scripts/digits.py --quick    # reduced run for CI (a subset; writes nothing unless --out is given)

Two experiments, fixed split and seeds, CPU only:

1. **QAT.** A small float CNN (conv -> BN -> ReLU blocks) is trained on the
   bundled digits set (no download). Copies made with
   ``quantize_model(float_model, weights=True, calibration_data=...)`` are
   fine-tuned briefly for 8/6/4/2-bit affine, 8/6/4/2-bit fixed point, e4m3,
   e5m2, the scaled formats mxfp8_e4m3, mxfp6_e2m3, mxfp4 and nvfp4, and e2m1
   without a scale, each with nearest and stochastic rounding, and evaluated
   on the test set (inference rounding is nearest in every case).
2. **Gupta et al. (2015), "Deep Learning with Limited Numerical Precision".**
   An MLP is trained from scratch with plain SGD while every weight is stored
   in 16-bit fixed point with 12, 10, 8 or 6 fraction bits
   (``weight_storage=FixedPoint(16, ...)``), rounded after every update with
   nearest or stochastic rounding, next to the same MLP in float32. The
   learning rate is small enough that most per-step updates are below half a
   storage step at the low fraction widths: nearest rounding then discards
   them and training stalls, while stochastic rounding keeps them in
   expectation.

The script prints every table; with ``--out DIR`` (default ``docs`` for the
full run) it writes ``DIR/results.md`` and ``DIR/gupta.png``. Sections of an
existing ``results.md`` that the script does not write (e.g. "Deployment") are
kept, after its own.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

SEED = 0
BATCH = 32
FT_EPOCHS = 8  # QAT fine-tuning epochs of the full run (2 for --quick)
FT_LR = 5e-4  # initial fine-tuning learning rate, cosine-decayed to 0 over the fine-tuning
GUPTA_LR = 0.01
GUPTA_FRACTION_BITS = (12, 10, 8, 6)


# --------------------------------------------------------------------------- data
def load_data() -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The digits set (1797 8x8 images, values 0..16) scaled to [0, 1]; a fixed stratified 75/25 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype("float32")[..., None]
    y = d.target.astype("int64")
    return train_test_split(x, y, test_size=0.25, random_state=SEED, stratify=y)


# --------------------------------------------------------------------------- models
def build_cnn(seed: int = SEED):
    """conv->BN->ReLU x3 (16, 32, 32 channels), global average pooling, dense softmax logits."""
    import keras

    keras.utils.set_random_seed(seed)
    x = keras.Input((8, 8, 1), name="image")
    h = x
    for i, (ch, pool) in enumerate(((16, False), (32, True), (32, False)), 1):
        h = keras.layers.Conv2D(ch, 3, padding="same", use_bias=False, name=f"conv{i}")(h)
        h = keras.layers.BatchNormalization(name=f"bn{i}")(h)
        h = keras.layers.ReLU(name=f"relu{i}")(h)
        if pool:
            h = keras.layers.MaxPooling2D(2, name=f"pool{i}")(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    out = keras.layers.Dense(10, name="logits")(h)
    return keras.Model(x, out, name="digits_cnn")


def build_mlp(seed: int = SEED):
    """64 -> 128 -> 64 -> 10, ReLU."""
    import keras

    keras.utils.set_random_seed(seed)
    x = keras.Input((64,), name="pixels")
    h = keras.layers.Dense(128, activation="relu", name="fc1")(x)
    h = keras.layers.Dense(64, activation="relu", name="fc2")(h)
    out = keras.layers.Dense(10, name="logits")(h)
    return keras.Model(x, out, name="digits_mlp")


def _compile(model, optimizer) -> None:
    import keras

    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    logits = model.predict(x, batch_size=256, verbose=0)
    return float(np.mean(np.argmax(logits, -1) == y))


# --------------------------------------------------------------------------- experiment 1: QAT
def mse_range(v: np.ndarray, bits: int, signed: bool) -> Tuple[float, float]:
    """The range of a ``bits``-bit fixed-point grid (``[lo, hi]``, ``lo <= 0 <= hi``) with the least
    expected squared rounding error on ``v``: the calibration engine's ``"mse"`` method.

    The range covering ``max |v|`` wastes most of a few-bit grid on rare outliers (a post-ReLU
    maximum of 7.8 with a mean of 0.8 puts 4-bit steps at 0.5); the error-minimising one
    saturates those outliers instead and keeps the step small where the values are.
    """
    from graphquant import FixedPoint
    from graphquant.calibration import array_range

    lo, hi = array_range(np.asarray(v, np.float32), "mse", FixedPoint(bits, range=(-1.0, 1.0) if signed else (0.0, 1.0)))
    return float(lo), float(hi)


CONV_BLOCKS = (1, 2, 3)
#: scaled formats of the full run (OCP MX and NVFP4): activations in blocks along the channels, weights
#: along each kernel's input channels; then e2m1 without a scale, to show what the scale is for
SCALED_ROWS = ("mxfp8_e4m3", "mxfp6_e2m3", "mxfp4", "nvfp4")


def fixed_point_overrides(float_model, x_cal: np.ndarray, bits: int) -> Dict[str, Dict[str, Any]]:
    """Per-block fixed-point formats, activation and weight ranges from the engine's ``"mse"`` (:func:`mse_range`)."""
    import keras

    from graphquant import FixedPoint

    acts = keras.Model(float_model.input, [float_model.get_layer(f"relu{i}").output for i in CONV_BLOCKS])
    out = {}
    for i, a in zip(CONV_BLOCKS, acts.predict(x_cal, verbose=0)):
        a_range = mse_range(a, bits, signed=False)
        w_range = mse_range(float_model.get_layer(f"conv{i}").kernel.numpy(), bits, signed=True)
        # "bits" must be repeated: an override giving only "range" would make an 8-bit FixedPoint
        out[f"^conv{i}$"] = {"bits": bits, "range": a_range, "weight_format": FixedPoint(bits, range=w_range)}
    return out


def qat_configs(float_model, x_cal: np.ndarray, quick: bool) -> List[Tuple[str, Dict[str, Any]]]:
    """(label, quantize_model keywords) per row; fixed-point ranges per block from the data (engine "mse")."""
    rows: List[Tuple[str, Dict[str, Any]]] = []
    bit_list = (8, 4) if quick else (8, 6, 4, 2)
    modes = ("nearest", "stochastic")
    for bits in bit_list:
        for mode in modes if not quick else ("nearest",):
            rows.append((f"affine {bits}-bit", dict(bits=bits, rounding=mode)))
    for bits in (4,) if quick else bit_list:
        ov = fixed_point_overrides(float_model, x_cal, bits)
        for mode in ("stochastic",) if quick else modes:
            rows.append((f"fixed point {bits}-bit", dict(bits=bits, range=ov["^conv1$"]["range"], overrides=ov, rounding=mode)))
    if not quick:
        for fmt in ("e4m3", "e5m2") + SCALED_ROWS + ("e2m1",):
            for mode in modes:
                rows.append((fmt + (" (no scale)" if fmt == "e2m1" else ""), dict(format=fmt, rounding=mode)))
    for label, kw in rows:
        kw["weight_rounding"] = kw["rounding"]
    return rows


def _formats(q) -> Tuple[str, str]:
    """Activation and weight formats of the three blocks of a quantized copy, ``a / b / c`` (one name if all equal)."""

    def join(names: List[str]) -> str:
        return names[0] if len(set(names)) == 1 else " / ".join(names)

    acts = [_short(q.get_layer(f"relu{i}_quant").format) for i in CONV_BLOCKS]
    wts = [_short(q.get_layer(f"conv{i}").slots[0]["format"]) for i in CONV_BLOCKS]
    return join(acts), join(wts)


def _short(fmt) -> str:
    """A format's name with its range ends to 4 significant digits (for the tables)."""
    return re.sub(r"-?\d+\.\d{5,}", lambda m: f"{float(m.group()):.4g}", str(fmt))


def run_qat(quick: bool, echo=print) -> Dict[str, Any]:
    import keras

    from graphquant.keras import inspect, quantize_model

    x_tr, x_te, y_tr, y_te = load_data()
    epochs = 12 if quick else 30
    ft_epochs = 2 if quick else FT_EPOCHS
    t0 = time.perf_counter()
    model = build_cnn()
    _compile(model, keras.optimizers.Adam(3e-3))
    keras.utils.set_random_seed(SEED + 1)
    model.fit(x_tr, y_tr, batch_size=BATCH, epochs=epochs, verbose=0)
    float_acc = accuracy(model, x_te, y_te)
    float_s = time.perf_counter() - t0
    echo(f"float CNN: test accuracy {100 * float_acc:.2f}% ({epochs} epochs, {float_s:.1f} s)")
    x_cal = x_tr[:256]
    rows = [{"config": "float32", "rounding": "-", "format": "float32", "weight_format": "float32",
             "accuracy": float_acc, "before_ft": float_acc, "seconds": float_s}]  # fmt: skip
    ft_steps = ft_epochs * int(np.ceil(len(x_tr) / BATCH))
    for label, kw in qat_configs(model, x_cal, quick):
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            learned = inspect(model, weights=True, **kw).learned  # fixed-point rows have nothing to calibrate
            q = quantize_model(model, weights=True, calibration_data=x_cal if learned else None, seed=SEED, **kw)
        before = accuracy(q, x_te, y_te)
        # the same schedule for every row: Adam, learning rate decayed from FT_LR to 0 (cosine)
        _compile(q, keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(FT_LR, ft_steps)))
        keras.utils.set_random_seed(SEED + 2)
        q.fit(x_tr, y_tr, batch_size=BATCH, epochs=ft_epochs, verbose=0)
        acc = accuracy(q, x_te, y_te)
        act_fmt, w_fmt = _formats(q)
        rows.append({"config": label, "rounding": kw["rounding"], "format": act_fmt, "weight_format": w_fmt,
                     "accuracy": acc, "before_ft": before, "seconds": time.perf_counter() - t})  # fmt: skip
        echo(f"  {label:22s} {kw['rounding']:10s} {100 * before:6.2f}% -> {100 * acc:6.2f}%  ({time.perf_counter() - t:.1f} s)")
    return {"rows": rows, "float": float_acc, "epochs": epochs, "ft_epochs": ft_epochs, "model": model,
            "x_cal": x_cal, "x_test": x_te}  # fmt: skip


def qat_verdict(res: Dict[str, Any]) -> str:
    """Which rows meet the targets (8-bit within 1 point of float, 4-bit within 3 points)."""
    f = res["float"]
    out = []
    for bits, tol in (("8-bit", 0.01), ("4-bit", 0.03)):
        rows = [r for r in res["rows"] if r["config"].endswith(bits)]
        miss = [f"{r['config']} {r['rounding']} ({100 * (r['accuracy'] - f):+.2f})" for r in rows if r["accuracy"] < f - tol - 1e-9]
        verdict = "all within target" if not miss else "outside target: " + ", ".join(miss)
        out.append(f"{bits} (target: within {100 * tol:.0f} point{'s' if tol > 0.01 else ''} of float): {len(rows)} rows, {verdict}.")
    return "\n".join(out)


def qat_table(res: Dict[str, Any]) -> str:
    f = res["float"]
    lines = [
        "| configuration | rounding | activation format | weight format | accuracy before fine-tuning | test accuracy | vs float | time (s) |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        delta = "" if r["config"] == "float32" else f"{100 * (r['accuracy'] - f):+.2f}"
        lines.append(
            f"| {r['config']} | {r['rounding']} | `{r['format']}` | `{r['weight_format']}` | {100 * r['before_ft']:.2f}% | "
            f"{100 * r['accuracy']:.2f}% | {delta} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- experiment 2: Gupta et al.
def storage_format(fraction_bits: int):
    """16-bit fixed point with ``fraction_bits`` fraction bits: step 2**-fraction_bits, range +-2**(15 - fraction_bits)."""
    from graphquant import FixedPoint

    lim = 2.0 ** (15 - fraction_bits)
    return FixedPoint(16, range=(-lim, lim))


def _train_mlp(fraction_bits: Optional[int], rounding: str, epochs: int, x_tr, y_tr, x_te, y_te) -> Dict[str, Any]:
    import keras

    from graphquant.keras import quantize_model

    model = build_mlp()
    if fraction_bits is not None:
        with warnings.catch_warnings():  # an MLP has no convolution: only the storage rounding applies
            warnings.simplefilter("ignore")
            # seed= seeds every stochastic rounding of the copy, the initial storage rounding included
            model = quantize_model(model, weight_storage=storage_format(fraction_bits), storage_rounding=rounding,
                                   seed=SEED)  # fmt: skip
    _compile(model, keras.optimizers.SGD(GUPTA_LR))
    keras.utils.set_random_seed(SEED + 3)
    w0 = [v.numpy().copy() for v in model.trainable_variables]
    t = time.perf_counter()
    hist = model.fit(x_tr, y_tr, batch_size=32, epochs=epochs, verbose=0)
    seconds = time.perf_counter() - t
    moved = float(np.mean([np.mean(v.numpy() != w) for v, w in zip(model.trainable_variables, w0)]))
    return {"accuracy": accuracy(model, x_te, y_te), "seconds": seconds, "loss": float(hist.history["loss"][-1]),
            "moved": moved}  # fmt: skip


def typical_update(x_tr, y_tr) -> float:
    """Median nonzero |lr * gradient| of the float MLP's weights over its first 20 SGD steps (batch 32)."""
    import keras
    import tensorflow as tf

    model = build_mlp()
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    rng = np.random.RandomState(SEED)
    vals = []
    for _ in range(20):
        idx = rng.choice(len(x_tr), 32, replace=False)
        with tf.GradientTape() as tape:
            loss = loss_fn(y_tr[idx], model(x_tr[idx], training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        for g in grads:
            vals.append(np.abs(GUPTA_LR * g.numpy()).ravel())
        keras.optimizers.SGD(GUPTA_LR).apply(grads, model.trainable_variables)
    vals = np.concatenate(vals)
    return float(np.median(vals[vals > 0]))


def run_gupta(quick: bool, echo=print) -> Dict[str, Any]:
    x_tr, x_te, y_tr, y_te = load_data()
    x_tr, x_te = x_tr.reshape(len(x_tr), -1), x_te.reshape(len(x_te), -1)
    epochs = 8 if quick else 30
    widths = (8,) if quick else GUPTA_FRACTION_BITS
    upd = typical_update(x_tr, y_tr)
    echo(f"Gupta et al.: MLP, SGD lr={GUPTA_LR}, batch 32, {epochs} epochs; median per-step update {upd:.2e}")
    flt = _train_mlp(None, "nearest", epochs, x_tr, y_tr, x_te, y_te)
    echo(f"  float32                  {100 * flt['accuracy']:6.2f}%  ({flt['seconds']:.1f} s)")
    rows = []
    for fb in widths:
        row: Dict[str, Any] = {"fraction_bits": fb, "half_step": 2.0 ** -(fb + 1)}
        for mode in ("nearest", "stochastic"):
            r = _train_mlp(fb, mode, epochs, x_tr, y_tr, x_te, y_te)
            row[mode] = r
            echo(f"  16-bit, {fb:2d} fraction bits, {mode:10s} {100 * r['accuracy']:6.2f}%  "
                 f"(weights moved: {100 * r['moved']:.1f}%, {r['seconds']:.1f} s)")  # fmt: skip
        rows.append(row)
    return {"float": flt, "rows": rows, "epochs": epochs, "update": upd}


def gupta_table(res: Dict[str, Any]) -> str:
    f = res["float"]["accuracy"]
    lines = [
        "| storage | step | half step / median update | nearest | stochastic | float32 | weights changed (nearest / stochastic) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        fb = r["fraction_bits"]
        n, s = r["nearest"], r["stochastic"]
        lines.append(
            f"| 16-bit fixed, {fb} fraction bits | 2^-{fb} | {r['half_step'] / res['update']:.2g}x | "
            f"{100 * n['accuracy']:.2f}% | {100 * s['accuracy']:.2f}% | {100 * f:.2f}% | "
            f"{100 * n['moved']:.1f}% / {100 * s['moved']:.1f}% |"
        )
    return "\n".join(lines)


def gupta_plot(res: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fb = [r["fraction_bits"] for r in res["rows"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(fb, [100 * r["nearest"]["accuracy"] for r in res["rows"]], "o-", color="#c0392b", label="nearest rounding")
    ax.plot(fb, [100 * r["stochastic"]["accuracy"] for r in res["rows"]], "s-", color="#2e86c1", label="stochastic rounding")
    ax.axhline(100 * res["float"]["accuracy"], color="k", ls="--", lw=1, label="float32")
    ax.set_xlabel("fraction bits of the 16-bit fixed-point weight storage")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xticks(fb)
    ax.invert_xaxis()
    ax.set_ylim(0, 100)
    ax.set_title(f"Gupta et al. 2015 on digits: MLP, SGD lr={GUPTA_LR}, {res['epochs']} epochs")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def write_results(out: Path, qat: Dict[str, Any], gupta: Dict[str, Any], cmp_table: str, quick: bool, total: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    gupta_plot(gupta, out / "gupta.png")
    text = f"""# Results on real data (scikit-learn digits)

Written by `python scripts/digits.py{' --quick' if quick else ''}` (total {total:.0f} s on a shared 2-core CPU; the
times are only comparable within one run). Fixed split (stratified 75/25,
`random_state={SEED}`) and seeds; 1347 training and 450 test images of 8x8 pixels.

## Quantization-aware training

Float CNN: three conv -> BN -> ReLU blocks (16, 32, 32 channels, max-pool after
the second), global average pooling, dense logits; Adam, {qat['epochs']} epochs.
Each quantized copy is `quantize_model(float_model, weights=True, seed={SEED},
...)`, with `calibration_data=<256 training images>` where ranges are learned (activations rounded
after each block, convolution weights rounded in the forward pass), then
fine-tuned for {qat['ft_epochs']} epochs with Adam, learning rate {FT_LR:g} cosine-decayed to 0
(the same schedule for every row). Affine: ranges calibrated (min/max),
weights per-channel symmetric. Fixed point: per block, the activation and
weight ranges the calibration engine's `"mse"` method gives for that bit width
(`graphquant.calibration.array_range`: among scalings of the min/max range,
the one whose grid rounds the float model's values -- activations of the
calibration images, the kernel -- with the least expected squared error); at
few bits it saturates rare large values rather than cover them with a coarse
step. Rounding applies to activations and weights while training;
evaluation always rounds to nearest. Scaled formats (`format="mxfp4"` etc.,
nothing calibrated: the scales follow the values): activations in blocks of 32
(nvfp4: 16) along the channels, weights in blocks along each kernel's input
channels (the first convolution has one input channel, so each of its weights
gets its own power-of-two scale); `e2m1 (no scale)` is the same 4-bit element
grid without a scale, as `format="e2m1"` gives it. Everything is seeded; still, one test
image is 0.22 points and a row's accuracy moves by a few tenths of a point
from one fine-tuning epoch to the next, so read differences below half a
point as noise.

{qat_table(qat)}

{qat_verdict(qat)}

## Per-layer error of the 4-bit affine copy (before fine-tuning)

`gq.compare(float_model, quantize_model(float_model, bits=4, weights=True, calibration_data=...), test_images)`:

```
{cmp_table}
```

## Gupta et al. (2015): stochastic rounding of low-precision weight storage

MLP 64 -> 128 -> 64 -> 10 (ReLU) trained from scratch with plain SGD, lr
{GUPTA_LR}, batch 32, {gupta['epochs']} epochs. Every trainable weight is stored in
16-bit fixed point (`weight_storage=FixedPoint(16, range=(-2^(15-f), 2^(15-f)))`,
step 2^-f) and rounded after every update (`storage_rounding=`); activations and
arithmetic stay float32, so only the storage precision varies. The median
nonzero per-step update |lr * gradient| of the float model is {gupta['update']:.2e}; the
"half step / median update" column says how many times larger half a storage
step is. Updates below half a step are lost with nearest rounding, while
stochastic rounding applies them with the right probability.

{gupta_table(gupta)}

![accuracy against fraction bits](gupta.png)
"""
    path = out / "results.md"
    path.write_text(keep_foreign_sections(text, path.read_text() if path.is_file() else ""))


def _sections(text: str) -> List[Tuple[str, str]]:
    """``(heading, text)`` of each ``## `` section of a Markdown text (the part before the first: heading "")."""
    parts = re.split(r"(?m)^(?=## )", text)
    return [((p.splitlines()[0] if p.startswith("## ") else ""), p) for p in parts]


def keep_foreign_sections(new: str, old: str) -> str:
    """``new`` followed by the ``## `` sections of ``old`` whose heading ``new`` does not have (sections
    written by someone else, e.g. "Deployment"), in their order."""
    mine = {h for h, _ in _sections(new)}
    kept = [body.rstrip("\n") for h, body in _sections(old) if h and h not in mine]
    return "\n\n".join([new.rstrip("\n")] + kept) + "\n"


def compare_table(qat: Dict[str, Any]) -> str:
    from graphquant.compare import compare
    from graphquant.keras import quantize_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize_model(qat["model"], bits=4, weights=True, calibration_data=qat["x_cal"], seed=SEED)
    return compare(qat["model"], q, qat["x_test"], batch_size=150).table()


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="reduced run for CI (a subset of the rows, fewer epochs)")
    p.add_argument("--out", help="folder for results.md and gupta.png (default: docs for the full run, none for --quick)")
    ns = p.parse_args(argv)
    out = ns.out if ns.out is not None else (None if ns.quick else "docs")
    import keras
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    logging.getLogger("graphquant").setLevel(logging.ERROR)  # the MLP has no convolution: expected, not news
    t0 = time.perf_counter()
    print(f"graphquant digits experiments ({'quick' if ns.quick else 'full'}), keras {keras.__version__}, tf {tf.__version__}")
    qat = run_qat(ns.quick)
    print()
    print(qat_table(qat))
    print(qat_verdict(qat))
    print()
    cmp_table = compare_table(qat)
    print(cmp_table)
    print()
    gupta = run_gupta(ns.quick)
    print()
    print(gupta_table(gupta))
    total = time.perf_counter() - t0
    if out:
        write_results(Path(out), qat, gupta, cmp_table, ns.quick, total)
        print(f"\nwrote {Path(out) / 'results.md'} and {Path(out) / 'gupta.png'}")
    print(f"total {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
