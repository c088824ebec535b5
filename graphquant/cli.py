"""The ``graphquant`` command: parse arguments, call the library, print results.

Exit codes: 0 success, 1 failure (bad input, a model failed), 2 usage error.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import warnings
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from ._table import fit_width, terminal_width
from ._version import __version__


ROUNDING = ("nearest", "nearest_away", "toward_zero", "down", "up", "stochastic")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


class _DeprecatedAlias(argparse.Action):
    """An old spelling of an option: stores into the new option's ``dest`` and says which to use."""

    def __init__(self, option_strings: Sequence[str], dest: str, new: str = "", **kwargs: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Optional[str] = None) -> None:
        print(f"warning: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _alias(p: argparse.ArgumentParser, old: str, new: str, dest: str, **kwargs: Any) -> None:
    """``old`` still works as ``new`` (hidden from --help, a warning when used)."""
    p.add_argument(old, dest=dest, action=_DeprecatedAlias, new=new, **kwargs)


def _signature_arg(p: argparse.ArgumentParser, data_flag: str) -> None:
    """``--signature``: in every command, the SavedModel signature that runs the command's input data."""
    p.add_argument("--signature", default="serving_default", metavar="NAME",
                   help=f"SavedModel signature that runs the data of {data_flag} (default serving_default; "
                        "a Keras model is called as it is)")  # fmt: skip


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _quant_args(p: argparse.ArgumentParser, default_bits: Optional[int] = None) -> None:
    p.add_argument("--bits", type=int, default=default_bits, help="bits (alone: affine, ranges calibrated or dynamic)")
    p.add_argument("--format", help="number format, e.g. e4m3, bfloat16, fixed8[0,6], affine8")
    p.add_argument("--rounding", choices=ROUNDING, default="nearest")
    p.add_argument("--weights", action="store_true", help="round convolution weights too (pre-rounded once)")
    p.add_argument("--weight-bits", type=int, help="bits of the weight format (per-channel symmetric affine)")
    p.add_argument("--weight-format", metavar="FORMAT",
                   help="number format of the weights, e.g. e4m3, mxfp4, affine4 (implies --weights)")
    p.add_argument("--weight-rounding", choices=ROUNDING, default="nearest", help="rounding mode of the weights")
    p.add_argument("--dense", action="store_true", help="treat Dense layers (MatMul) as targets too")
    p.add_argument("--range", nargs=2, type=float, metavar=("LO", "HI"), help="fixed range: fixed point over [LO, HI]")
    p.add_argument("--include", action="append", help="only groups whose target matches this regex (repeatable)")
    p.add_argument("--exclude", action="append", help="skip groups whose target matches this regex (repeatable)")
    p.add_argument("--seed", type=int, help="seed for stochastic rounding")


#: options of ``convert`` that ``batch`` does not take (and why); every other ``convert`` option is a conversion
#: option defined once, in :func:`_conversion_args`, for both (tests/test_batch.py checks it from the parsers)
CONVERT_ONLY = {"--json": "batch writes its own report (--report)"}


def _conversion_args(p: argparse.ArgumentParser) -> None:
    """The options ``convert`` and ``batch`` share, with one meaning; :func:`_conversion_kwargs` translates them."""
    _quant_args(p)
    p.add_argument("--calibration", metavar="DATA.npz", help="inputs for calibrating affine ranges (.npz or .npy; batch: the same for every model)")
    _signature_arg(p, "--calibration")
    p.add_argument("--calibration-method", default="minmax", choices=["minmax", "percentile", "mse", "entropy"],
                   help="how ranges are read from the calibration statistics (default minmax)")
    p.add_argument("--percentile", type=float, default=99.99, metavar="P",
                   help="p of --calibration-method percentile, in (50, 100] (default 99.99)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true", help="replace earlier graphquant outputs (never anything else)")
    p.add_argument("--force", action="store_true", help="convert already quantized models (stacks a second rounding)")


def build_parser() -> argparse.ArgumentParser:
    """The ``graphquant`` argument parser: one sub-command per job (each added by its ``_add_*`` function)."""
    parser = _Parser(
        prog="graphquant",
        description="Simulate reduced numeric precision inside TensorFlow/Keras models.",
    )
    parser.add_argument("--version", action="version", version=f"graphquant {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more; plan tables also name each SavedModel scope's full function name")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in (_add_convert, _add_batch, _add_inspect, _add_compare, _add_export_tflite, _add_compare_tflite,
                _add_example):
        add(sub)
    return parser


def _add_convert(sub: Any) -> None:
    p = sub.add_parser("convert", help="convert a SavedModel (or a .keras/.h5 file)")
    p.add_argument("src", help="SavedModel folder, or a .keras / .h5 file")
    p.add_argument("dst", help="output folder (or .keras file for Keras input)")
    _conversion_args(p)
    p.add_argument("--json", metavar="REPORT.json", help="also write the report as JSON")


def _add_batch(sub: Any) -> None:
    p = sub.add_parser("batch", help="convert every SavedModel under a folder")
    p.add_argument("src", help="source root (searched at any depth)")
    p.add_argument("dst", help="destination root (same relative layout)")
    _conversion_args(p)  # --calibration DATA.npz: one data set for every model
    p.add_argument("-j", "--jobs", type=_positive_int, default=1, help="worker processes (each converts many models)")
    p.add_argument("--max-per-worker", type=_positive_int, metavar="K", help="replace a worker after K models")
    p.add_argument("--max-worker-memory", type=_positive_float, metavar="MB",
                   help="replace a worker after a model that left its resident memory above MB")
    p.add_argument("--timeout", type=_positive_float, metavar="S",
                   help="fail a model that takes more than S seconds (its worker is killed and replaced)")
    p.add_argument("--dask", metavar="ADDRESS", help="run the models on a Dask cluster (scheduler address, "
                   "e.g. tcp://host:8786; needs pip install graphquant[dask])")
    p.add_argument("--report", metavar="REPORT.json", help="JSON report (default DST/graphquant-batch.json)")
    p.add_argument("--no-progress", dest="quiet", action="store_true", help="no progress bar (as --quiet)")


def _add_inspect(sub: Any) -> None:
    p = sub.add_parser("inspect", help="print the insertion points of a model; nothing is written")
    p.add_argument("src", help="SavedModel folder, or a .keras / .h5 file")
    _quant_args(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def _add_compare(sub: Any) -> None:
    p = sub.add_parser("compare", help="per-layer error of a quantized model against its float source")
    p.add_argument("src", help="the float model: SavedModel folder or .keras file")
    p.add_argument("quantized", help="the quantized model: SavedModel folder or .keras file")
    p.add_argument("--data", required=True, metavar="INPUTS.npz", help="inputs (.npz or .npy; several arrays = named inputs)")
    p.add_argument("--plot", metavar="REPORT.png", help="draw SQNR per layer (needs matplotlib)")
    p.add_argument("--json", metavar="REPORT.json", help="also write the report as JSON")
    _signature_arg(p, "--data")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _add_export_tflite(sub: Any) -> None:
    p = sub.add_parser("export-tflite", help="write a fully integer .tflite file from a graphquant-quantized model")
    p.add_argument("src", help="the quantized model: .keras file or a SavedModel folder graphquant converted")
    p.add_argument("dst", help="the .tflite file to write")
    p.add_argument("--data", metavar="INPUTS.npz", help="inputs: run the interpreter and report agreement")
    p.add_argument("--calibration", metavar="INPUTS.npz",
                   help="calibration data for the tensors graphquant does not round (the converter's representative data)")
    _alias(p, "--check-data", "--data", "data", metavar="INPUTS.npz")
    _alias(p, "--representative-data", "--calibration", "calibration", metavar="INPUTS.npz")
    p.add_argument("--input-type", default="int8", choices=("int8", "uint8", "float32"))
    p.add_argument("--output-type", default="int8", choices=("int8", "uint8", "float32"))
    p.add_argument("--overwrite", action="store_true", help="replace a .tflite file graphquant wrote")
    p.add_argument("--json", metavar="REPORT.json", help="also write the report as JSON")


def _add_compare_tflite(sub: Any) -> None:
    p = sub.add_parser("compare-tflite", help="per-layer: the interpreter's int8 tensors vs the simulation's")
    p.add_argument("quantized", help="the quantized model (.keras file)")
    p.add_argument("tflite", help="the .tflite file")
    p.add_argument("--data", required=True, metavar="INPUTS.npz", help="inputs (.npz or .npy)")
    p.add_argument("--kernels", default="reference", choices=("reference", "default"))
    p.add_argument("--json", metavar="REPORT.json", help="also write the report as JSON")


def _add_example(sub: Any) -> None:
    p = sub.add_parser("example", help="build, export and convert a built-in example model")
    p.add_argument("--out", default="out/example", help="folder for the example's files (default out/example)")
    p.add_argument("--arch", default="MobileNetV2", choices=("MobileNetV2", "ResNet50"), help="keras.applications architecture")
    p.add_argument("--size", type=int, default=96, help="input size (pixels)")
    p.add_argument("--bits", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)


def _config(ns: argparse.Namespace) -> Dict[str, Any]:
    kw: Dict[str, Any] = {"rounding": ns.rounding}
    if ns.format:
        kw["format"] = ns.format
    if ns.bits is not None:
        kw["bits"] = ns.bits
    if ns.range is not None:
        kw["range"] = tuple(ns.range)
    if ns.weights or ns.weight_bits is not None:
        kw["weights"] = True
    if ns.weight_bits is not None:
        kw["weight_bits"] = ns.weight_bits
    if ns.weight_format:
        kw["weights"] = True
        kw["weight_format"] = ns.weight_format
    if ns.weight_rounding != "nearest":
        kw["weight_rounding"] = ns.weight_rounding
    if ns.dense:
        kw["dense"] = True
    if ns.include:
        kw["include"] = ns.include
    if ns.exclude:
        kw["exclude"] = ns.exclude
    if "bits" not in kw and "format" not in kw:
        kw["bits"] = 8
    return kw


def _conversion_kwargs(ns: argparse.Namespace) -> Dict[str, Any]:
    """The library keywords of :func:`_conversion_args` (both ``convert`` and ``batch``).

    ``calibration_data`` is the path given: ``convert`` reads it, ``batch``
    passes it on to its workers. ``--overwrite`` and ``--quiet`` are not here:
    each command passes them to its own function.
    """
    kw = _config(ns)
    if ns.seed is not None:
        kw["seed"] = ns.seed
    kw["allow_requantize"] = ns.force
    if ns.calibration:
        kw["calibration_data"] = ns.calibration
        kw["calibration_signature"] = ns.signature
        kw["calibration_method"] = ns.calibration_method
        kw["calibration_percentile"] = ns.percentile
    return kw


def _load_calibration(path: str, option: str = "--calibration") -> Any:
    from .ranges import load_data_file

    return load_data_file(path, option)


def _is_keras_file(src: Path) -> bool:
    return src.suffix in (".keras", ".h5") and not src.is_dir()


def _fit_tables(cmd: Any) -> Any:
    """A command whose tables fit the terminal (when stdout is one; long names are cut in the middle)."""

    @functools.wraps(cmd)
    def run(ns: argparse.Namespace) -> int:
        with fit_width(terminal_width()):
            return cmd(ns)

    return run


def _plan_table(plan: Any, verbose: bool) -> str:
    """The plan's table; for a graph plan, the line naming each scope's full function name
    (``__inference___call___5312``) only with ``--verbose``."""
    from .graph.planning import GraphPlan

    return plan.table(legend=verbose) if isinstance(plan, GraphPlan) else plan.table()


def _write_report(path: Optional[Path], data: Dict[str, Any]) -> None:
    if path is not None:
        from .outputs import write_json_atomic

        write_json_atomic(path, data)


@_fit_tables
def _cmd_convert(ns: argparse.Namespace) -> int:
    kw = _conversion_kwargs(ns)
    src = Path(ns.src)
    if _is_keras_file(src):
        return _convert_keras(src, Path(ns.dst), kw, ns)
    from .graph.saved_model import convert_saved_model
    from .outputs import check_report_path

    json_path = check_report_path(ns.json, "--json", sources=[src], models=[ns.dst]) if ns.json else None
    if "calibration_data" in kw:
        kw["calibration_data"] = _load_calibration(kw["calibration_data"])
    report = convert_saved_model(src, ns.dst, overwrite=ns.overwrite, verbose=False if ns.quiet else None, **kw)
    print(_plan_table(report.plan, ns.verbose))
    print(report)
    for w in report.warnings:
        if w in _LOGGED:
            continue  # already on stderr as a WARNING line
        print(f"warning: {w}", file=sys.stderr)
    _write_report(json_path, report.to_dict())
    return 0


def _load_keras(src: Path) -> Any:
    from .keras.loading import load_keras_file

    return load_keras_file(src)


def _convert_keras(src: Path, dst: Path, kw: Dict[str, Any], ns: argparse.Namespace) -> int:
    from . import outputs
    from .keras import inspect, quantize_model

    if not src.is_file():
        raise ValueError(f"{src}: no such file")
    if dst.suffix != ".keras":
        dst = dst.with_suffix(".keras") if dst.suffix else dst / (src.stem + ".keras")
    outputs.check_keras_destination(src, dst, ns.overwrite)
    json_path = outputs.check_report_path(ns.json, "--json", sources=[src], models=[dst]) if ns.json else None
    t0 = time.perf_counter()
    model = _load_keras(src)
    path = kw.pop("calibration_data", None)
    kw.pop("calibration_signature", None)  # a Keras model is called as is
    method, percentile = kw.pop("calibration_method", None), kw.pop("calibration_percentile", None)
    calibration = _load_calibration(path) if path else None
    plan = inspect(model, **{k: v for k, v in kw.items() if k not in ("seed", "allow_requantize")})
    if calibration is not None:
        kw["calibration_method"] = method
        if method == "percentile":
            kw["calibration_percentile"] = percentile
    q = quantize_model(model, calibration_data=calibration, verbose=False if ns.quiet else None, **kw)
    record = dict(kw, calibration_data=outputs.fingerprint_data(calibration))
    result = {"convolutions": len(plan.targets), "inserted": len(plan.points)}
    manifest = outputs.make_manifest("keras", src, outputs.fingerprint_tree(src), record, result)
    dst.parent.mkdir(parents=True, exist_ok=True)
    outputs.remove_stale_tmp(dst.parent)
    tmp = dst.with_name(f".{dst.name}{outputs.TMP_MARK}{os.getpid()}.keras")
    try:
        q.save(tmp)
        outputs.add_keras_manifest(tmp, manifest)
        _load_keras(tmp)  # only an output that loads back is reported converted
        os.replace(tmp, dst)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    seconds = time.perf_counter() - t0
    print(plan.table())
    print(f"{src} -> {dst}: {result['convolutions']} convolutions, {result['inserted']} graphquant layers, {seconds:.2f} s")
    _write_report(json_path, {"source": str(src), "destination": str(dst), **result, "seconds": round(seconds, 4),
                              "warnings": [], "plan": plan.to_dict()})
    return 0


@_fit_tables
def _cmd_inspect(ns: argparse.Namespace) -> int:
    kw = _config(ns)
    src = Path(ns.src)
    if _is_keras_file(src):
        from .keras import inspect

        plan = inspect(_load_keras(src), **kw)
    else:
        from .graph.saved_model import inspect_saved_model

        plan = inspect_saved_model(ns.src, **kw)
    if ns.json:
        print(plan.to_json(indent=2))
    else:
        print(_plan_table(plan, ns.verbose))
        if not plan.targets:
            from .plan import no_match_message

            print(f"warning: {no_match_message(ns.src, 'nothing would be rounded')}", file=sys.stderr)
    return 0


@_fit_tables
def _cmd_batch(ns: argparse.Namespace) -> int:
    from .batch import convert_batch, local_pool_settings

    kw = _conversion_kwargs(ns)
    if "calibration_data" in kw:  # checked as every command reads its data files, naming the flag
        _load_calibration(kw["calibration_data"])  # (the batch reads it again, to fingerprint it for its workers)
    client = None
    if ns.dask:  # refused before connecting
        given = local_pool_settings(ns.jobs, ns.max_per_worker, ns.max_worker_memory, ns.timeout)
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise ValueError(f"{flag} is a setting of the local workers; with --dask the cluster's workers decide")
        try:
            from distributed import Client
        except ImportError:
            raise ValueError("--dask needs dask.distributed: pip install graphquant[dask]") from None
        client = Client(ns.dask)
    try:
        report = convert_batch(
            ns.src, ns.dst, jobs=ns.jobs, overwrite=ns.overwrite, report=ns.report, progress=not ns.quiet,
            max_per_worker=ns.max_per_worker, max_worker_memory=ns.max_worker_memory, timeout=ns.timeout,
            client=client, **kw
        )
    finally:
        if client is not None:
            client.close()
    d = report.to_dict()
    print(f"{d['converted']} converted, {d['skipped']} skipped (already done), {d['failed']} failed in {d['seconds']:.1f} s")
    for key, rec in report.models.items():
        if rec["status"] == "failed":
            print(f"failed: {key}: {rec['error']}", file=sys.stderr)
    return 0 if report.ok else 1


@_fit_tables
def _cmd_compare(ns: argparse.Namespace) -> int:
    from .compare import compare
    from .outputs import check_report_path

    if ns.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {ns.batch_size}")
    json_path = check_report_path(ns.json, "--json", sources=[ns.src, ns.quantized]) if ns.json else None
    data = _load_calibration(ns.data, "--data")
    if ns.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--plot needs matplotlib: pip install matplotlib") from None
    report = compare(ns.src, ns.quantized, data, batch_size=ns.batch_size, signature=ns.signature,
                     verbose=False if ns.quiet else None)
    print(report.table())
    _write_report(json_path, json.loads(report.to_json()))
    if ns.plot:
        report.plot(ns.plot)
    return 0


@_fit_tables
def _cmd_export_tflite(ns: argparse.Namespace) -> int:
    from .outputs import check_report_path

    try:
        from .tflite import export_tflite
    except ImportError as e:  # pragma: no cover - tensorflow itself missing
        raise ValueError(str(e)) from None
    json_path = check_report_path(ns.json, "--json", sources=[ns.src]) if ns.json else None
    check = _load_calibration(ns.data, "--data") if ns.data else None
    rep = _load_calibration(ns.calibration, "--calibration") if ns.calibration else None
    try:
        report = export_tflite(ns.src, ns.dst, check, inference_input_type=ns.input_type,
                               inference_output_type=ns.output_type, representative_data=rep,
                               overwrite=ns.overwrite)  # fmt: skip
    except ImportError as e:
        raise ValueError(str(e)) from None
    print(report.table())
    _write_report(json_path, report.to_dict())
    return 0


@_fit_tables
def _cmd_compare_tflite(ns: argparse.Namespace) -> int:
    from .outputs import check_report_path
    from .tflite import compare_tflite

    json_path = check_report_path(ns.json, "--json", sources=[ns.quantized]) if ns.json else None
    if not Path(ns.tflite).is_file():
        raise ValueError(f"{ns.tflite}: no such file")
    data = _load_calibration(ns.data, "--data")
    try:
        report = compare_tflite(ns.quantized, ns.tflite, data, kernels=ns.kernels)
    except ImportError as e:
        raise ValueError(str(e)) from None
    print(report.table())
    _write_report(json_path, report.to_dict())
    return 0


@_fit_tables
def _cmd_example(ns: argparse.Namespace) -> int:
    from .graph.example import run_example

    run_example(out=ns.out, arch=ns.arch, size=ns.size, bits=ns.bits, seed=ns.seed, verbose=ns.verbose)
    return 0


#: messages logged as warnings during this command (each warning reaches stderr once)
_LOGGED: set = set()


class _RememberWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            _LOGGED.add(record.getMessage())
        return True


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``graphquant`` console script and of ``python -m graphquant``.

    TensorFlow's start-up lines are held back (shown with ``-v``); see :mod:`graphquant._quiet`.
    """
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return 2
    from ._quiet import start_tensorflow

    start_tensorflow(show=ns.verbose)  # after parsing: --help, --version and usage errors never import TensorFlow
    logging.basicConfig(level=logging.INFO if ns.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    for noisy in ("tensorflow", "absl", "h5py"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    handlers = {
        "convert": _cmd_convert, "batch": _cmd_batch, "inspect": _cmd_inspect, "compare": _cmd_compare,
        "example": _cmd_example, "export-tflite": _cmd_export_tflite, "compare-tflite": _cmd_compare_tflite,
    }  # fmt: skip
    remember = _RememberWarnings()
    for handler in logging.getLogger().handlers:
        handler.addFilter(remember)
    _LOGGED.clear()
    try:
        with warnings.catch_warnings():
            # the library both warns (for Python callers) and logs each warning; the command shows the log line
            warnings.filterwarnings("ignore", category=UserWarning, module=r"graphquant(\.|$)")
            return handlers[ns.command](ns)
    except (ValueError, TypeError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"graphquant {ns.command}: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        from .batch import Terminated

        print("graphquant: terminated" if isinstance(e, Terminated) else "graphquant: interrupted", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        for handler in logging.getLogger().handlers:
            handler.removeFilter(remember)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
