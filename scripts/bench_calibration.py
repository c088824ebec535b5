"""Calibration cost against the model's own inference, side by side in one run.

For each model (Keras applications, random weights, random inputs with a fixed
seed) and each method, prints the time of

* Keras: ``graphquant.calibrate`` on a ``quantize_model(bits=8)`` copy over N
  batches, against a fresh ``tf.function`` of the float model over the same
  batches (both include their first-call tracing);
* SavedModel: the time ``convert_saved_model(bits=8, calibration_data=...)``
  spends calibrating (``graphquant.graph.saved_model._calibrate``, timed from
  here: inserting the observers, writing and loading the observed copy, running
  it over the batches, reading the ranges), against loading the float SavedModel
  and running its signature over the same batches; ``--subtract`` instead takes
  that conversion minus the same conversion without calibration data (noisier:
  the difference of two multi-second runs);
* ``compare`` (Keras models) against the two models' inference;

and the ratios: each the best of ``--repeat`` alternating runs of the reference and the
measured side. Ratios are only meaningful within one run (same machine load).

``--fresh N`` instead runs each side alone in a new process, N pairs in a row, and prints
every pair's ratio and their median: a user's first calibration is the first in its
process, where fresh memory and first-use costs fall on both sides (noisier: two processes).

    python scripts/bench_calibration.py --models mobilenetv2 --size 128 --batches 4
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

MODELS = {"mobilenetv2": "MobileNetV2", "resnet50": "ResNet50"}


def _build(name: str, size: int):
    import keras

    cls = getattr(keras.applications, MODELS[name])
    keras.utils.set_random_seed(0)
    return cls(weights=None, input_shape=(size, size, 3), classes=1000)


REPEAT = 1


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _pair(reference, measured) -> tuple:
    """Best of REPEAT alternating runs of each (the shared machine's bursts hit one run, rarely all);
    ``measured`` may return its own time (a float), else its call is timed."""
    a, b = [], []
    for _ in range(REPEAT):
        a.append(_time(reference))
        t0 = time.perf_counter()
        got = measured()
        b.append(got if isinstance(got, float) else time.perf_counter() - t0)
    return min(a), min(b)


class _timing:
    """Time the calls of ``module.name`` until :meth:`undo`."""

    def __init__(self, module, name):
        self.module, self.name, self.seconds = module, name, 0.0
        self.orig = getattr(module, name)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return self.orig(*a, **k)
            finally:
                self.seconds += time.perf_counter() - t0

        setattr(module, name, timed)

    def undo(self):
        setattr(self.module, self.name, self.orig)


_HEADER = f"{'model':<12} {'path':<11} {'method':<11} {'inference s':>11} {'calib s':>9} {'ratio':>6}"


def _row(name, path, method, t_inf, t_cal) -> None:
    print(f"{name:<12} {path:<11} {method:<11} {t_inf:>11.2f} {t_cal:>9.2f} {t_cal / t_inf:>6.2f}", flush=True)


def _keras_inference(model, batches) -> None:
    """The reference of the Keras path: a fresh ``tf.function`` of the float model over the batches."""
    import tensorflow as tf

    f = tf.function(lambda b: model(b, training=False), reduce_retracing=True)
    for b in batches:
        f(b).numpy()


def _savedmodel_inference(saved, batches) -> None:
    """The reference of the SavedModel path: load the float SavedModel, run its signature over the batches."""
    import tensorflow as tf

    fn = tf.saved_model.load(str(saved)).signatures["serving_default"]
    (key,) = fn.structured_input_signature[1]
    for b in batches:
        [v.numpy() for v in fn(**{key: tf.constant(b)}).values()]


def _convert_calibrated(saved, out, batches, method) -> tuple:
    """``(conversion seconds, seconds in graphquant.graph.saved_model._calibrate)`` of converting ``saved``
    with ``batches`` as calibration data."""
    import graphquant.graph as gg
    import graphquant.graph.saved_model as gsm

    spent = _timing(gsm, "_calibrate")
    try:
        t = _time(lambda: gg.convert_saved_model(saved, out, bits=8, overwrite=True, calibration_data=batches,
                                                 calibration_method=method))  # fmt: skip
    finally:
        spent.undo()
    return t, spent.seconds


def _steady(model, batches, methods, name) -> None:
    """Per-batch time of the traced calibration step against the traced inference step."""
    import tensorflow as tf

    import graphquant as gq
    from graphquant import calibration as engine
    from graphquant.keras.layers import Quantize
    from graphquant.ranges import _all_layers, _Feed

    def per_batch(f, unoptimized=False):
        cf = f.get_concrete_function(batches[0])  # traced here, not timed
        if unoptimized:  # as the calibration runs it (graphquant.calibration.call_unoptimized: Grappler off)
            def call(b):
                return engine.call_unoptimized(cf, b)[0]
        else:
            call = cf
        call(batches[0]).numpy()

        def run():
            for b in batches:
                call(b).numpy()

        return min(_time(run) for _ in range(REPEAT)) / len(batches)

    t_inf = per_batch(tf.function(lambda b: model(b, training=False)))
    q = gq.quantize_model(model, bits=8)
    layers = [l for l in _all_layers(q) if isinstance(l, Quantize) and l.learned]
    for method in methods:
        observers = [engine.Observer(l.name, histogram=method != "minmax") for l in layers]
        for l, o in zip(layers, observers):
            l.observe_with(_Feed(o))
        t_cal = per_batch(tf.function(lambda b: q(b, training=False)), unoptimized=True)
        for l in layers:
            l.observe_with(None)
        engine.release_all(observers)
        print(f"{name:<12} {'keras/batch':<11} {method:<11} {t_inf:>11.3f} {t_cal:>9.3f} {t_cal / t_inf:>6.2f}",
              flush=True)  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mobilenetv2", help="comma-separated: " + ", ".join(MODELS))
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--methods", default="minmax,percentile,mse,entropy")
    ap.add_argument("--repeat", type=int, default=3,
                    help="alternate each reference and measured run this many times, keep the best of each")
    ap.add_argument("--skip-graph", action="store_true", help="only the Keras path")
    ap.add_argument("--skip-compare", action="store_true")
    ap.add_argument("--subtract", action="store_true",
                    help="SavedModel: conversion with calibration minus without, not the calibration step itself")
    ap.add_argument("--steady", action="store_true",
                    help="also the Keras path's steady state: per-batch time once traced (tracing excluded)")
    ap.add_argument("--fresh", type=int, default=0, metavar="N",
                    help="instead: each side alone in a fresh process, N pairs per model and method")
    ap.add_argument("--side", help=argparse.SUPPRESS)  # internal (--fresh): one side, in this process
    ap.add_argument("--saved", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.fresh:
        return _fresh(args)
    global REPEAT
    REPEAT = max(1, args.repeat)
    logging.getLogger("graphquant").setLevel(logging.ERROR)

    import tensorflow as tf

    import graphquant as gq
    import graphquant.graph as gg

    rng = np.random.RandomState(0)
    data = rng.uniform(-1, 1, size=(args.batches * args.batch_size, args.size, args.size, 3)).astype("float32")
    batches = [data[i : i + args.batch_size] for i in range(0, len(data), args.batch_size)]
    methods = [m for m in args.methods.split(",") if m]
    if args.side:
        print(f"{_one_side(args, batches, methods[0]):.4f}")
        return 0
    print(f"# {args.batches} batches of {args.batch_size}, {args.size}x{args.size}; ratio = calibration / inference")
    print(_HEADER)
    for name in args.models.split(","):
        model = _build(name, args.size)
        tmp = Path(tempfile.mkdtemp(prefix="bench-cal-"))
        try:
            for method in methods:
                q = gq.quantize_model(model, bits=8)
                t_inf, t_cal = _pair(lambda: _keras_inference(model, batches),
                                     lambda: gq.calibrate(q, batches, method=method, verbose=False))  # fmt: skip
                _row(name, "keras", method, t_inf, t_cal)
            if args.steady:
                _steady(model, batches, methods, name)
            if not args.skip_graph:
                saved = tmp / "float"
                model.export(str(saved), verbose=False)
                t_plain = 0.0
                if args.subtract:
                    t_plain = min(_time(lambda: gg.convert_saved_model(saved, tmp / "q0", bits=8, overwrite=True))
                                  for _ in range(REPEAT))  # fmt: skip
                for method in methods:
                    def convert(method=method):
                        t, spent = _convert_calibrated(saved, tmp / "q1", batches, method)
                        return t if args.subtract else spent

                    t_inf, t_conv = _pair(lambda: _savedmodel_inference(saved, batches), convert)
                    _row(name, "savedmodel", method, t_inf, t_conv - t_plain)
            if not args.skip_compare:
                q = gq.quantize_model(model, bits=8, calibration_data=batches[:1])

                def both():
                    for m in (model, q):
                        f = tf.function(lambda b, m=m: m(b, training=False), reduce_retracing=True)
                        for b in batches:
                            f(b).numpy()

                t_inf, t_cmp = _pair(both, lambda: gq.compare(model, q, batches))
                _row(name, "compare", "-", t_inf, t_cmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _one_side(args, batches, method) -> float:
    """``--side``: the seconds of one side, the first such work in this process (model building and
    export excluded, as in the in-process runs)."""
    import graphquant as gq

    if args.side == "sm-ref":
        return _time(lambda: _savedmodel_inference(args.saved, batches))
    if args.side == "sm-cal":
        return _convert_calibrated(args.saved, args.saved + "-q", batches, method)[1]
    model = _build(args.models, args.size)
    q = gq.quantize_model(model, bits=8)
    if args.side == "keras-cal":
        return _time(lambda: gq.calibrate(q, batches, method=method, verbose=False))
    return _time(lambda: _keras_inference(model, batches))


def _fresh(args) -> int:
    """``--fresh N``: every side in a process of its own, N pairs in a row per model, path and method."""
    import subprocess

    methods = [m for m in args.methods.split(",") if m]
    common = ["--size", str(args.size), "--batches", str(args.batches), "--batch-size", str(args.batch_size)]
    paths = [("keras", "keras-ref", "keras-cal")] + ([] if args.skip_graph else [("savedmodel", "sm-ref", "sm-cal")])
    print(f"# each side alone in a fresh process, {args.fresh} pairs; {args.batches} batches of {args.batch_size}, "
          f"{args.size}x{args.size}; ratio = calibration / inference")  # fmt: skip
    print(_HEADER)
    for name in args.models.split(","):
        tmp = Path(tempfile.mkdtemp(prefix="bench-cal-"))
        try:
            saved = tmp / "float"
            if not args.skip_graph:
                logging.getLogger("graphquant").setLevel(logging.ERROR)
                _build(name, args.size).export(str(saved), verbose=False)

            def side(which, method):
                out = subprocess.run([sys.executable, __file__, "--side", which, "--saved", str(saved), "--models", name,
                                      "--methods", method, *common], capture_output=True, text=True, check=True)  # fmt: skip
                return float(out.stdout.split()[-1])

            for method in methods:
                for path, ref, cal in paths:
                    ratios = []
                    for _ in range(args.fresh):
                        t_inf, t_cal = side(ref, method), side(cal, method)
                        ratios.append(t_cal / t_inf)
                        _row(name, path, method, t_inf, t_cal)
                    print(f"{name:<12} {path:<11} {method:<11} {'median':>11} {'':>9} {float(np.median(ratios)):>6.2f}",
                          flush=True)  # fmt: skip
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
