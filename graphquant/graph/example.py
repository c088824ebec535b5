"""The built-in example behind ``graphquant example`` (the README's main job)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Dict

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["run_example", "output_error"]


def output_error(ref: np.ndarray, out: np.ndarray) -> Dict[str, float]:
    """How far ``out`` moved from ``ref``: max/mean absolute error and SQNR in dB."""
    ref = np.asarray(ref, np.float64)
    out = np.asarray(out, np.float64)
    err = out - ref
    p_sig = float(np.mean(ref**2))
    p_err = float(np.mean(err**2))
    sqnr = float("inf") if p_err == 0 else 10.0 * np.log10(max(p_sig, 1e-30) / p_err)
    return {"max_abs": float(np.max(np.abs(err))), "mean_abs": float(np.mean(np.abs(err))), "sqnr_db": sqnr}


def _replaceable(path: Path) -> bool:
    from .saved_model import is_saved_model

    return not path.exists() or (path.is_dir() and (not any(path.iterdir()) or is_saved_model(path)))


def run_example(out: str = "out/example", arch: str = "MobileNetV2", size: int = 96, bits: int = 8, seed: int = 0,
                echo: Callable[[str], Any] = print, verbose: bool = False) -> Dict[str, object]:
    """Build ``keras.applications.<arch>`` with random weights, export, convert, compare.

    Writes ``<out>/float`` (the exported SavedModel) and ``<out>/q<bits>``
    (the converted one); prints the insertion table (with ``verbose``, also the
    line naming each scope's TensorFlow function), the output error and the
    per-layer error table of :func:`graphquant.compare.compare`.
    """
    import keras

    from .saved_model import convert_saved_model

    out_p = Path(out)
    float_dir, q_dir = out_p / "float", out_p / f"q{bits}"
    for d in (float_dir, q_dir):
        if not _replaceable(d):
            raise FileExistsError(f"{d} exists and is not a SavedModel; choose another --out")
    keras.utils.set_random_seed(seed)
    t0 = time.perf_counter()
    rng = np.random.RandomState(seed)
    model = _build_model(arch, size, rng)
    _export(model, out_p, float_dir)
    echo(f"exported {arch} ({size}x{size}, random weights) to {float_dir} in {time.perf_counter() - t0:.1f} s")

    images = rng.uniform(0.0, 255.0, (16, size, size, 3)).astype("float32")
    images = keras.applications.imagenet_utils.preprocess_input(images, mode="tf")
    calib, test = images[:8], images[8:]
    report = convert_saved_model(float_dir, q_dir, bits=bits, calibration_data=calib, overwrite=True)
    echo(report.plan.table(legend=verbose))
    echo(str(report))

    y0, y1 = _serve(float_dir, test), _serve(q_dir, test)
    err = output_error(y0, y1)
    agree = float(np.mean(np.argmax(y0, -1) == np.argmax(y1, -1)))
    echo(
        f"outputs moved: max |diff| {err['max_abs']:.4g}, mean |diff| {err['mean_abs']:.4g}, "
        f"SQNR {err['sqnr_db']:.1f} dB, top-1 agreement {agree:.0%} on {len(test)} random images"
    )
    from ..compare import compare

    per_layer = compare(float_dir, q_dir, test)
    echo(per_layer.table())
    worst = per_layer.worst(1)
    if worst:
        echo(f"lowest SQNR: {worst[0].layer} ({worst[0].sqnr_db:.1f} dB)")
    return {"report": report, "error": err, "top1_agreement": agree, "float": str(float_dir), "quantized": str(q_dir),
            "compare": per_layer}


def _build_model(arch: str, size: int, rng: np.random.RandomState) -> Any:
    """``keras.applications.<arch>`` (10 classes, logits) with random weights, its BatchNormalization layers given
    data-like statistics from ``rng`` (random weights leave them at identity)."""
    import keras

    builder = getattr(keras.applications, arch)
    kw = dict(alpha=0.35) if arch == "MobileNetV2" else {}
    model = builder(weights=None, input_shape=(size, size, 3), classes=10, classifier_activation=None, **kw)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0.0, 0.1, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, n).astype("float32"))
    return model


def _export(model: Any, out_p: Path, float_dir: Path) -> None:
    """Export ``model`` as the SavedModel ``float_dir`` (written beside it, then renamed over the old one)."""
    import shutil

    tmp = out_p / ".float.graphquant-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    out_p.mkdir(parents=True, exist_ok=True)
    model.export(str(tmp), verbose=False)
    if float_dir.exists():
        shutil.rmtree(float_dir)
    tmp.rename(float_dir)


def _serve(path: Path, x: np.ndarray) -> np.ndarray:
    """The first output of the SavedModel ``path``'s ``serving_default`` signature on ``x`` (its one input)."""
    import tensorflow as tf

    fn = tf.saved_model.load(str(path)).signatures["serving_default"]
    name = next(iter(fn.structured_input_signature[1]))
    return next(iter(fn(**{name: tf.constant(x)}).values())).numpy()
