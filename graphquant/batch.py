"""Convert many SavedModels: one isolated worker process per model, resumable.

:func:`convert_batch` finds every SavedModel under a source root (any depth),
converts each with :func:`graphquant.graph.convert_saved_model` in a fresh
worker process (so memory does not grow and a crash or a corrupt model fails
only that model) and writes the same relative layout under the destination.
A finished output is published by an atomic rename, so an output folder that
exists is complete; a rerun skips it (``overwrite=True`` redoes it).

The per-model function :func:`convert_one` takes and returns plain data, so a
cluster engine can map it over models instead (see the README: Dask, Ray).

Calibration data reaches the workers by file, never inside each model's task:
``calibration_data`` given as a ``.npz``/``.npy`` path is read from that file;
arrays (or a dict of arrays) are written once to a temporary ``.npz`` in the
destination root, removed when the batch ends. ``convert_one`` gets the
reference ``options["calibration_file"] = {"path", "fingerprint", "keyed"}``
and each worker process loads the file once (cached) and checks the data's
fingerprint, so every model is calibrated with the data the batch started with.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing as mp
import os
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

from . import outputs

log = logging.getLogger(__name__)

__all__ = ["find_saved_models", "convert_one", "convert_batch", "BatchReport"]

PathLike = Union[str, "os.PathLike[str]"]


def find_saved_models(root: PathLike) -> List[Path]:
    """Relative paths of every SavedModel folder under ``root`` (sorted; ``.`` for root itself)."""
    root = Path(root)
    found: List[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and ".graphquant-tmp-" not in d)
        if "saved_model.pb" in filenames or "saved_model.pbtxt" in filenames:
            found.append(Path(dirpath).relative_to(root))
            dirnames[:] = []  # variables/ and assets/ belong to this model
    return found


#: key of :func:`convert_one`'s options: calibration data by reference to a file (see the module docstring)
CALIBRATION_FILE = "calibration_file"


@functools.lru_cache(maxsize=2)
def _calibration_of(path: str, fingerprint: str, keyed: bool) -> Any:
    """The calibration arrays a batch's file reference names: loaded once per process, checked against its fingerprint."""
    from .ranges import load_data_file

    data = load_data_file(path, "calibration_data", keyed=keyed)
    if outputs.fingerprint_data(data) != fingerprint:
        raise ValueError(f"calibration_data: {path} changed since the batch started; rerun the batch")
    return data


def convert_one(src: str, dst: str, options: Dict[str, Any]) -> Dict[str, Any]:
    """Convert one SavedModel; never raises. Returns a JSON-able record.

    ``options`` are :func:`graphquant.convert_saved_model` keywords, plus
    ``calibration_file`` (``{"path", "fingerprint", "keyed"}``): calibration
    data read from that file, once per process.
    """
    t0 = time.perf_counter()
    try:
        from .graph.saved_model import convert_saved_model

        options = dict(options)
        ref = options.pop(CALIBRATION_FILE, None)
        if ref is not None:
            options["calibration_data"] = _calibration_of(ref["path"], ref["fingerprint"], bool(ref.get("keyed")))
        report = convert_saved_model(src, dst, **options)
        return {
            "status": "converted",
            "error": None,
            "seconds": round(time.perf_counter() - t0, 3),
            "convolutions": report.convolutions,
            "inserted": report.inserted,
            "prerounded": report.prerounded,
            "warnings": report.warnings,
        }
    except BaseException as e:  # noqa: BLE001 - a worker reports every failure as data
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return {"status": "failed", "error": f"{type(e).__name__}: {msg}", "seconds": round(time.perf_counter() - t0, 3)}


def _die_with_parent(parent: int) -> None:
    """Make this worker end when the batch process that started it ends (even by kill -9)."""
    try:  # Linux: the kernel sends SIGKILL when the parent dies
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - elsewhere the watchdog below does it
        pass

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(0.2)

    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="graphquant-parent-watch").start()


def _worker(src: str, dst: str, options: Dict[str, Any], conn, parent: Optional[int] = None) -> None:
    if parent is not None:
        _die_with_parent(parent)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.ERROR)
    record = convert_one(src, dst, options)
    try:
        conn.send(record)
        conn.close()
    except (BrokenPipeError, EOFError, OSError):  # the batch is gone: nobody to tell
        os._exit(1)


class Terminated(KeyboardInterrupt):
    """The batch process received SIGTERM: handled like Ctrl-C (report written), exit code 143."""


class _Interrupts:
    """SIGTERM raises :class:`Terminated`; both it and Ctrl-C can be held back over a short critical section.

    Starting a worker writes its start-up data down a pipe: an interrupt in the middle of that write leaves the
    child reading a truncated pickle (it prints an ``EOFError`` traceback and dies). Within :meth:`held`, a signal
    is remembered and raised when the block ends, so every worker is either fully started or not started at all.
    """

    def __init__(self) -> None:
        self.holding = False
        self.pending: Optional[BaseException] = None

    def _raise(self, exc: BaseException) -> None:
        if self.holding:
            self.pending = self.pending or exc
        else:
            raise exc

    def on_term(self, signum: int, frame: Any) -> None:
        self._raise(Terminated())

    def on_int(self, signum: int, frame: Any) -> None:
        self._raise(KeyboardInterrupt())

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.pending is not None:
            exc, self.pending = self.pending, None
            raise exc


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[_Interrupts]:
    """Within the block, SIGTERM raises :class:`Terminated` (main thread only; handlers restored after)."""
    interrupts = _Interrupts()
    if threading.current_thread() is not threading.main_thread():
        yield interrupts
        return
    previous = signal.signal(signal.SIGTERM, interrupts.on_term)
    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int is signal.default_int_handler:  # only Python's own Ctrl-C handler is replaced
        signal.signal(signal.SIGINT, interrupts.on_int)
    try:
        yield interrupts
    finally:
        signal.signal(signal.SIGTERM, previous)
        if previous_int is signal.default_int_handler:
            signal.signal(signal.SIGINT, previous_int)


@dataclass
class BatchReport:
    """Per-model results of a batch: ``models`` maps the relative path to its record."""

    source: str
    destination: str
    models: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(1 for r in self.models.values() if r["status"] == status)

    @property
    def ok(self) -> bool:
        return self.count("failed") == 0

    def to_dict(self) -> Dict[str, Any]:
        return {
            "source": self.source,
            "destination": self.destination,
            "converted": self.count("converted"),
            "skipped": self.count("skipped"),
            "failed": self.count("failed"),
            "seconds": round(self.seconds, 3),
            "models": self.models,
        }

    def write(self, path: PathLike) -> None:
        """Write the JSON report atomically (nothing is left behind if that fails)."""
        outputs.write_json_atomic(path, self.to_dict())


def _plan_outputs(
    pairs: List[Tuple[str, Path, Path]], record: Dict[str, Any], overwrite: bool, result: "BatchReport"
) -> List[Tuple[str, str, str, str]]:
    """Decide, before any work, what each (key, source, output) needs; return (key, src, dst, reason) to convert.

    Finished outputs whose manifest matches this run (options, source
    fingerprint, files) are recorded as skipped with their counts. Raises
    ``FileExistsError`` naming the outputs that may not be replaced (not
    written by graphquant, files added, or made with other options and no
    ``overwrite``), so nothing starts when one would be refused.
    """
    todo: List[Tuple[str, str, str, str]] = []
    refused: List[str] = []
    other_options: List[str] = []
    for key, src, out in pairs:
        try:
            manifest = outputs.check_replaceable(out, overwrite=True)
        except FileExistsError as e:
            refused.append(str(e))
            continue
        if manifest is None:
            todo.append((key, str(src), str(out), "new"))
        elif overwrite:
            todo.append((key, str(src), str(out), "overwrite"))
        elif manifest.get("options") != record:
            other_options.append(key)
        elif manifest.get("source_fingerprint") != outputs.fingerprint_tree(src):
            todo.append((key, str(src), str(out), "source changed"))
        elif not outputs.output_intact(out, manifest):
            todo.append((key, str(src), str(out), "output incomplete"))
        else:
            rec = {"status": "skipped", "error": None, "seconds": 0.0}
            rec.update({k: v for k, v in (manifest.get("result") or {}).items() if k in _COUNTS})
            result.models[key] = rec
    if refused:
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        raise FileExistsError(refused[0] + more)
    if other_options:
        names = ", ".join(other_options[:5]) + (f" and {len(other_options) - 5} more" if len(other_options) > 5 else "")
        raise FileExistsError(
            f"{len(other_options)} output(s) were made with other options ({names}); "
            "pass --overwrite / overwrite=True to reconvert them, or choose another destination"
        )
    return todo


_COUNTS = ("convolutions", "inserted", "prerounded")


def _calibration_arrays(data: Any) -> Tuple[Any, Optional[str]]:
    """``(arrays, path)`` of a batch's ``calibration_data``: a ``.npz``/``.npy`` path (read here once, to check and
    fingerprint it), an array or a dict of arrays (path ``None``: written to a temporary file for the workers)."""
    import numpy as np

    from .ranges import load_data_file

    if isinstance(data, (str, os.PathLike)):
        return load_data_file(data, "calibration_data"), str(Path(data).resolve())
    if isinstance(data, np.ndarray) or (
        isinstance(data, dict) and data and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in data.items())
    ):
        return data, None
    raise TypeError(
        "calibration_data of a batch must be a .npz/.npy path, a numpy array or a dict of numpy arrays "
        f"(data every worker process reads), got {type(data).__name__}"
    )


def _write_calibration(data: Any, dst_root: Path) -> Tuple[Path, bool]:
    """Write calibration arrays once, for the workers: a temporary ``.npz`` in ``dst_root``; returns (path, keyed)."""
    import numpy as np

    fd, tmp = tempfile.mkstemp(prefix=f".calibration{outputs.TMP_MARK}{os.getpid()}-", suffix=".npz", dir=dst_root)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **(data if isinstance(data, dict) else {"x": data}))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return Path(tmp), isinstance(data, dict)


def convert_batch(
    src_root: PathLike,
    dst_root: PathLike,
    *,
    jobs: int = 1,
    overwrite: bool = False,
    report: Optional[PathLike] = None,
    progress: bool = True,
    **options: Any,
) -> BatchReport:
    """Convert every SavedModel under ``src_root`` into the same layout under ``dst_root``.

    Safety rules (checked before any model is converted):

    * the source tree is never written; nothing is written outside
      ``dst_root`` (and the report path);
    * an existing output is replaced only if graphquant wrote it (its
      manifest lists every file in it); a folder with anything else is
      refused with a message naming what is there;
    * a rerun skips an output only when its manifest says it was made from
      the same source files with the same options; an output of a changed
      source (or with missing files) is reconverted; one made with other
      options is reconverted with ``overwrite=True`` and refused without;
    * one batch at a time per destination: a lock file
      ``dst_root/.graphquant-batch.lock`` (a stale lock of a dead process is
      taken over); temporaries of killed runs are removed;
    * each worker dies with the batch process; SIGTERM is handled like
      Ctrl-C: running workers stop, the report is written, and
      :class:`Terminated` (a ``KeyboardInterrupt``) is raised.

    When ``src_root`` is itself a SavedModel its output is ``dst_root/NAME``
    (``NAME`` the source folder's name), never ``dst_root`` itself.

    Args:
        src_root: folder searched at any depth (never modified).
        dst_root: output root; nothing is written outside it.
        jobs: worker processes running at once (each model gets a fresh one).
        overwrite: reconvert models whose output already exists (outputs
            graphquant wrote only).
        report: path of the JSON report (default ``dst_root/graphquant-batch.json``);
            refused inside the source tree or a model folder, or onto an
            existing file that is not a graphquant report.
        progress: show a ``rich`` progress bar.
        **options: keywords for :func:`graphquant.convert_saved_model`
            (``bits``, ``format``, ``rounding``, ``range``, ``weights``,
            ``calibration_method``, ...). ``calibration_data`` is one data set
            for every model: a ``.npz``/``.npy`` path (as ``graphquant convert
            --calibration`` reads it), a numpy array or a dict of arrays
            (written once to a temporary ``.npz`` in ``dst_root`` that the
            workers read; removed at the end). A model whose
            ``calibration_signature`` does not accept it fails, with the shape
            it expects in its error. Manifests record the data's fingerprint,
            so a rerun with other data does not skip the outputs.

    Returns:
        A :class:`BatchReport`; ``report.ok`` is False when a model failed.

    Raises:
        ValueError / TypeError for bad arguments (missing source root, ``jobs < 1``,
        a bad report path); FileExistsError for outputs that may not be
        replaced and for a destination another batch is writing.
    """
    t0 = time.perf_counter()
    src_root, dst_root = Path(src_root), Path(dst_root)
    if not src_root.is_dir():
        raise ValueError(f"src_root: {src_root} is not a folder")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be a bool, got {overwrite!r}")
    s, d = src_root.resolve(), dst_root.resolve()
    if d == s or s in d.parents:
        raise ValueError(f"dst_root {dst_root} is inside the source {src_root}; the source is never modified")
    if d in s.parents:
        raise ValueError(f"dst_root {dst_root} contains the source {src_root}")
    if dst_root.exists() and not dst_root.is_dir():
        raise ValueError(f"dst_root: {dst_root} exists and is not a folder")
    # validate options once, here, so a typo fails fast instead of once per model
    from .graph.saved_model import options_record

    calibration, calibration_path = None, None
    if options.get("calibration_data") is not None:
        from .calibration import check_method

        check_method(options.get("calibration_method", "minmax"), options.get("calibration_percentile", 99.99),
                     percentile_name="calibration_percentile")
        calibration, calibration_path = _calibration_arrays(options["calibration_data"])
    record = options_record(**dict(options, calibration_data=calibration))
    # a root that is itself a SavedModel has its output at dst_root/NAME, never dst_root itself
    pairs = []
    for rel in find_saved_models(src_root):
        key = src_root.resolve().name if rel == Path(".") else rel.as_posix()
        pairs.append((key, src_root / rel, dst_root / key))
    report_path = outputs.check_report_path(
        report if report is not None else dst_root / "graphquant-batch.json", "report",
        sources=[src_root], models=[out for _, _, out in pairs],
    )
    result = BatchReport(str(src_root), str(dst_root))
    if not pairs:
        log.warning("no SavedModel found under %s", src_root)
    dst_root.mkdir(parents=True, exist_ok=True)
    with outputs.DestinationLock(dst_root), _sigterm_as_interrupt() as interrupts:
        for parent in {report_path.parent, dst_root, *(out.parent for _, _, out in pairs)}:  # left by killed runs
            outputs.remove_stale_tmp(parent)
        todo = _plan_outputs(pairs, record, overwrite, result)
        opts = dict(options, overwrite=True)
        tmp: Optional[Path] = None
        try:
            if calibration is not None:
                del opts["calibration_data"]
                keyed = False
                if calibration_path is None and todo:
                    tmp, keyed = _write_calibration(calibration, dst_root)
                    calibration_path = str(tmp)
                opts[CALIBRATION_FILE] = {"path": calibration_path, "keyed": keyed,
                                          "fingerprint": record["calibration_data"]}
                calibration = None  # the workers read the file; the parent does not keep the arrays
            _run(todo, opts, jobs, progress, result, report_path, t0, interrupts)
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    tmp.unlink()
    return result


def _run(todo: List[Tuple[str, str, str, str]], opts: Dict[str, Any], jobs: int, progress: bool,
         result: "BatchReport", report_path: Path, t0: float, interrupts: _Interrupts) -> None:
    """Convert ``todo`` in worker processes, ``jobs`` at a time; the report is rewritten after each model."""
    bar = None
    if progress and todo:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=False)
        bar.start()
        task = bar.add_task("converting", total=len(todo))
    try:  # the launcher module next to the package: quiet TensorFlow start-up in each worker
        from graphquant_cli import batch_worker as target
    except ImportError:  # pragma: no cover - the package without its launcher
        target = _worker
    ctx = mp.get_context("spawn")
    running: Dict[str, Any] = {}
    pending = list(todo)
    reasons = {key: reason for key, _, _, reason in todo}
    try:
        while pending or running:
            while pending and len(running) < jobs:
                key, src, dst, _ = pending.pop(0)
                with interrupts.held():  # a worker is fully started (and tracked) or not started at all
                    recv, send = ctx.Pipe(duplex=False)
                    p = ctx.Process(target=target, args=(src, dst, opts, send, os.getpid()), daemon=True)
                    p.start()
                    send.close()
                    running[key] = (p, recv, time.perf_counter())
            for key in list(running):
                p, recv, started = running[key]
                if not recv.poll() and p.is_alive():
                    continue
                rec = None
                if recv.poll():
                    try:
                        rec = recv.recv()
                    except (EOFError, OSError):
                        rec = None
                p.join()
                if rec is None:
                    rec = {"status": "failed", "error": f"worker process crashed (exit code {p.exitcode})",
                           "seconds": round(time.perf_counter() - started, 3)}
                recv.close()
                del running[key]
                if rec["status"] == "converted":
                    rec["reason"] = reasons[key]
                result.models[key] = rec
                if rec["status"] == "failed":
                    log.warning("%s: %s", key, rec["error"])
                if bar is not None:
                    bar.advance(task)
                result.seconds = time.perf_counter() - t0
                result.write(report_path)  # progress survives an interrupted batch
            time.sleep(0.05)
    finally:
        try:
            for key, (p, recv, _) in running.items():
                p.terminate()
                p.join()
                result.models[key] = {"status": "failed", "error": "interrupted", "seconds": 0.0}
        finally:
            if bar is not None:
                bar.stop()
            result.models = dict(sorted(result.models.items()))
            result.seconds = time.perf_counter() - t0
            result.write(report_path)
