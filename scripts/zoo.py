"""Every keras.applications architecture and a few keras-hub backbones through graphquant.

Per net (random weights, small inputs): the convolution layers it has, how many
``quantize_model`` rounds and how many its plan names as left in float,
``quantize_model`` time against ``keras.models.clone_model``, and the
``convert_saved_model`` of its ``model.export()`` (convolution groups found,
without calibration and with 2 calibration images). Errors are caught and
printed in the row. One row per net is printed (and flushed) as soon as it is
done, so a partial run is still a table.

    python scripts/zoo.py                      # everything (long: tens of minutes)
    python scripts/zoo.py --only MobileNetV2 ResNet50 --no-export
    python scripts/zoo.py --hub-only

keras-hub backbones need ``pip install keras-hub`` (the ``test`` extra).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

#: the input side per architecture (their minimum where they have one)
SIDE = {"InceptionV3": 75, "InceptionResNetV2": 75, "Xception": 71}
DEFAULT_SIDE = 64


def applications() -> list:
    import keras

    names = sorted(n for n in dir(keras.applications) if n[0].isupper() and callable(getattr(keras.applications, n)))
    return [(n, (lambda n=n, s=SIDE.get(n, DEFAULT_SIDE): getattr(keras.applications, n)(
        weights=None, input_shape=(s, s, 3)))) for n in names]  # fmt: skip


def hub() -> list:
    try:
        from _hub_models import BACKBONES
    except ImportError:  # pragma: no cover
        return []
    return [(f"keras_hub.{n}", (lambda fn=fn: fn(32))) for n, fn in BACKBONES.items()]


def _convs(model) -> int:
    from graphquant.keras.custom import _is_conv

    return sum(1 for l in model._flatten_layers(include_self=False, recursive=True) if _is_conv(l) and l.built)


def _short(e: BaseException) -> str:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    lines = [l for l in lines if not l.startswith(("Graph execution error", "Detected at node", "File "))] or lines
    key = [l for l in lines if "OpKernel" in l or "RecursionError" in l] or lines
    return f"{type(e).__name__}: {key[0][:110]}" if key else type(e).__name__


def run_one(name, build, export: bool, calibrate: bool) -> dict:
    import keras

    import graphquant as gq

    row = {"net": name, "errors": []}
    try:
        model = build()
    except Exception as e:  # noqa: BLE001
        row["errors"].append("build: " + _short(e))
        return row
    row["layers"] = len(model.layers)
    row["convs"] = _convs(model)
    side = model.inputs[0].shape[1]
    x = np.random.RandomState(0).rand(2, side, side, 3).astype("float32")
    try:
        t = time.perf_counter()
        keras.models.clone_model(model)
        row["clone_s"] = time.perf_counter() - t
    except Exception as e:  # noqa: BLE001
        row["errors"].append("clone_model: " + _short(e))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = time.perf_counter()
            q = gq.quantize_model(model)
            row["quantize_s"] = time.perf_counter() - t
        plan = q._graphquant_plan
        row["rounded"] = len(plan.targets)
        row["float"] = len(plan.left_float)
        y = q.predict(x, verbose=0)
        if not np.all(np.isfinite(y)):
            row["errors"].append("quantized model: non-finite output")
        del q
    except Exception as e:  # noqa: BLE001
        row["errors"].append("quantize_model: " + _short(e))
    if export:
        tmp = tempfile.mkdtemp(prefix="gq-zoo-")
        try:
            src = os.path.join(tmp, "src")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.export(src, verbose=False)
            rep = gq.convert_saved_model(src, os.path.join(tmp, "q"), bits=8)
            row["sm_convs"] = rep.convolutions
            if calibrate:
                try:
                    gq.convert_saved_model(src, os.path.join(tmp, "qc"), bits=8, calibration_data=x)
                    row["sm_calib"] = "ok"
                except Exception as e:  # noqa: BLE001
                    row["sm_calib"] = "fails"
                    row["errors"].append("calibrated conversion: " + _short(e))
        except Exception as e:  # noqa: BLE001
            row["errors"].append("convert_saved_model: " + _short(e))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    del model
    keras.backend.clear_session()
    gc.collect()
    return row


COLUMNS = ("net", "convs", "rounded", "float", "quantize_s", "clone_s", "ratio", "sm_convs", "sm_calib", "errors")


def fmt_row(row: dict) -> str:
    r = dict(row)
    if "quantize_s" in r and "clone_s" in r:
        r["ratio"] = f"{r['quantize_s'] / r['clone_s']:.2f}x"
    for k in ("quantize_s", "clone_s"):
        if k in r:
            r[k] = f"{r[k]:.2f}"
    r["errors"] = "; ".join(r.get("errors", [])) or "-"
    return "| " + " | ".join(str(r.get(c, "-")) for c in COLUMNS) + " |"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="run only these nets (names as printed)")
    ap.add_argument("--skip", nargs="*", default=[], help="skip these nets")
    ap.add_argument("--hub-only", action="store_true", help="only the keras-hub backbones")
    ap.add_argument("--no-export", action="store_true", help="skip export + convert_saved_model")
    ap.add_argument("--no-calibration", action="store_true", help="skip the calibrated conversion")
    args = ap.parse_args(argv)
    nets = hub() if args.hub_only else hub() + applications()
    if args.only:
        nets = [(n, b) for n, b in nets if n in args.only or n.split(".")[-1] in args.only]
    nets = [(n, b) for n, b in nets if n not in args.skip]
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    sys.stdout.flush()
    ratios = []
    for name, build in nets:
        row = run_one(name, build, export=not args.no_export, calibrate=not args.no_calibration)
        if "quantize_s" in row and "clone_s" in row:
            ratios.append(row["quantize_s"] / row["clone_s"])
        print(fmt_row(row))
        sys.stdout.flush()
    if ratios:
        print(f"\n{len(nets)} nets; quantize_model / clone_model time: median {np.median(ratios):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
