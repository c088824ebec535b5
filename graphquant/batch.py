"""Convert many SavedModels on reused worker processes or a Dask cluster, resumable.

:func:`convert_batch` finds every SavedModel under a source root (any depth),
converts each with :func:`graphquant.graph.convert_saved_model` and writes the
same relative layout under the destination. Models run on long-lived local
worker processes (TensorFlow starts once per worker; a model that crashes or
hangs kills only its worker, which is replaced; workers are recycled after a
number of models or past a memory bound) or, with a Dask client, as tasks of
the cluster. A finished output is published by an atomic rename, so an output
folder that exists is complete; a rerun skips it (``overwrite=True`` redoes it).

The per-model function :func:`convert_one` takes and returns plain data; the
planning, resume, manifest, lock and report rules live once, in
:func:`convert_batch`, above the executor that runs it.

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
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

from . import outputs

if TYPE_CHECKING:  # pragma: no cover - annotations only (dask is an optional dependency)
    import distributed

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


def _rss_mb(pid: Optional[int] = None) -> Optional[float]:
    """Resident memory of a process (this one by default) in MB: Linux ``/proc``, else psutil if installed, else None."""
    try:
        with open(f"/proc/{pid or 'self'}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    try:  # pragma: no cover - not Linux
        import psutil

        return round(psutil.Process(pid).memory_info().rss / 2**20, 1)
    except Exception:  # noqa: BLE001 - psutil missing or the process gone: unknown
        return None


def _serve(conn, parent: Optional[int] = None) -> None:
    """Body of one reused worker process of the local pool.

    Says ``("ready", pid)`` once TensorFlow and the converter are imported
    (quietly: :func:`graphquant._quiet.start_tensorflow`),
    then converts each ``(src, dst, options)`` it receives with
    :func:`convert_one` and answers with the record (plus ``worker``, its pid,
    and ``rss_mb``, its resident memory after the model), until it receives
    ``None``. It dies with the batch process (``parent``).
    """
    if parent is not None:
        _die_with_parent(parent)
    logging.basicConfig(level=logging.ERROR)
    from ._quiet import start_tensorflow

    start_tensorflow()  # quietly, and the start-up cost is paid before the first model

    try:
        conn.send(("ready", os.getpid()))
        while True:
            job = conn.recv()
            if job is None:
                return
            record = convert_one(*job)
            record.update(worker=os.getpid(), rss_mb=_rss_mb())
            conn.send(record)
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
    worker_startups: List[float] = field(default_factory=list)  # seconds each local worker took to start

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
            "workers_started": len(self.worker_startups),
            "worker_startup_seconds": round(sum(self.worker_startups) / len(self.worker_startups), 3)
            if self.worker_startups else None,
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


def _calibration_reference(data: Any, path: Optional[str], fingerprint: str, dst_root: Path,
                           write: bool) -> Tuple[Dict[str, Any], Optional[Path]]:
    """What workers get for the batch's calibration data (``options[CALIBRATION_FILE]``), and the temporary file
    written for arrays given in memory (``None`` for a given path, or when nothing runs: ``write`` False)."""
    tmp, keyed = None, False
    if path is None and write:
        tmp, keyed = _write_calibration(data, dst_root)
        path = str(tmp)
    return {"path": path, "keyed": keyed, "fingerprint": fingerprint}, tmp


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
    max_per_worker: Optional[int] = None,
    max_worker_memory: Optional[float] = None,
    timeout: Optional[float] = None,
    client: Optional["distributed.Client"] = None,
    **options: Any,
) -> BatchReport:
    """Convert every SavedModel under ``src_root`` into the same layout under ``dst_root``.

    Models run on ``jobs`` long-lived local worker processes (each converts
    many models; TensorFlow starts once per worker), or, with ``client``, as
    tasks of a Dask cluster. Either way each model is converted by
    :func:`convert_one`, and everything else (planning, resume, manifests,
    the lock, the report) happens here, once, in this process.

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
    * a model that crashes its worker (segfault, ``os._exit``) or hangs past
      ``timeout`` fails alone: its worker is killed and replaced, the others
      go on;
    * each local worker dies with the batch process; SIGTERM is handled like
      Ctrl-C: running workers stop, the report is written, and
      :class:`Terminated` (a ``KeyboardInterrupt``) is raised. With a Dask
      client, models not yet started are cancelled; a model already running
      on a worker finishes there (its output is complete; a rerun skips it).

    When ``src_root`` is itself a SavedModel its output is ``dst_root/NAME``
    (``NAME`` the source folder's name), never ``dst_root`` itself.

    Args:
        src_root: folder searched at any depth (never modified).
        dst_root: output root; nothing is written outside it.
        jobs: local worker processes (models converted at once).
        overwrite: reconvert models whose output already exists (outputs
            graphquant wrote only).
        report: path of the JSON report (default ``dst_root/graphquant-batch.json``);
            refused inside the source tree or a model folder, or onto an
            existing file that is not a graphquant report.
        progress: show a ``rich`` progress bar (current models, done and
            failed counts, models per minute).
        max_per_worker: replace a local worker after it converted this many
            models (default: never).
        max_worker_memory: replace a local worker after a model that left
            its resident memory above this many MB (default: never).
        timeout: seconds one model may take on a local worker; past it the
            worker is killed and replaced and the model fails (default: no limit).
        client: a ``dask.distributed.Client``: map the models over its cluster
            instead of local workers (sources and destinations must be on
            storage every worker sees). ``jobs``, ``max_per_worker``,
            ``max_worker_memory`` and ``timeout`` are local-pool settings and
            are refused with a client (Dask workers have their own:
            ``--memory-limit``, ``--lifetime``).
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
        Each converted or failed record names its ``worker`` (local: its pid;
        Dask: its address).

    Raises:
        ValueError / TypeError for bad arguments (missing source root, ``jobs < 1``,
        a bad report path); FileExistsError for outputs that may not be
        replaced and for a destination another batch is writing.
    """
    t0 = time.perf_counter()
    src_root, dst_root = Path(src_root), Path(dst_root)
    _check_arguments(src_root, dst_root, jobs, overwrite, max_per_worker, max_worker_memory, timeout, client)
    record, calibration, calibration_path = _read_options(options)
    pairs = _model_pairs(src_root, dst_root)
    report_path = outputs.check_report_path(
        report if report is not None else dst_root / "graphquant-batch.json", "report",
        sources=[src_root], models=[out for _, _, out in pairs],
    )
    result = BatchReport(str(src_root), str(dst_root))
    if not pairs:
        log.warning("no SavedModel found under %s", src_root)
    execute = _executor(client, jobs, max_per_worker, max_worker_memory, timeout)
    dst_root.mkdir(parents=True, exist_ok=True)
    with outputs.DestinationLock(dst_root), _sigterm_as_interrupt() as interrupts:
        for parent in {report_path.parent, dst_root, *(out.parent for _, _, out in pairs)}:  # left by killed runs
            outputs.remove_stale_tmp(parent)
        todo = _plan_outputs(pairs, record, overwrite, result)
        opts = dict(options, overwrite=True)
        tmp: Optional[Path] = None
        recorder = _Recorder(result, report_path, todo, progress, t0)
        try:
            if calibration is not None:
                del opts["calibration_data"]
                opts[CALIBRATION_FILE], tmp = _calibration_reference(
                    calibration, calibration_path, record["calibration_data"], dst_root, write=bool(todo))
                calibration = None  # the workers read the file; the parent does not keep the arrays
            execute(todo, opts, recorder, interrupts)
            for parent in {out.parent for _, _, out in pairs}:  # of workers lost mid-model (all others have ended)
                outputs.remove_stale_tmp(parent)
        finally:
            try:
                recorder.close()
            finally:
                if tmp is not None:
                    with contextlib.suppress(OSError):
                        tmp.unlink()
    return result


def _check_arguments(src_root: Path, dst_root: Path, jobs: int, overwrite: bool, max_per_worker: Optional[int],
                     max_worker_memory: Optional[float], timeout: Optional[float], client: Any) -> None:
    """Refuse bad arguments of :func:`convert_batch` (before anything is read or written)."""
    if not src_root.is_dir():
        raise ValueError(f"src_root: {src_root} is not a folder")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be a bool, got {overwrite!r}")
    if max_per_worker is not None and (isinstance(max_per_worker, bool) or not isinstance(max_per_worker, int)
                                       or max_per_worker < 1):
        raise ValueError(f"max_per_worker must be a positive integer or None, got {max_per_worker!r}")
    for name, value in (("max_worker_memory", max_worker_memory), ("timeout", timeout)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            raise ValueError(f"{name} must be a positive number or None, got {value!r}")
    if client is not None:
        given = local_pool_settings(jobs, max_per_worker, max_worker_memory, timeout)
        if given:
            raise ValueError(f"{given[0]} is a setting of the local worker pool; with a Dask client the cluster's "
                             "workers decide (dask worker --nworkers, --memory-limit, --lifetime)")
        if not callable(getattr(client, "map", None)) or not callable(getattr(client, "submit", None)):
            raise TypeError(f"client must be a dask.distributed.Client, got {type(client).__name__}")
    s, d = src_root.resolve(), dst_root.resolve()
    if d == s or s in d.parents:
        raise ValueError(f"dst_root {dst_root} is inside the source {src_root}; the source is never modified")
    if d in s.parents:
        raise ValueError(f"dst_root {dst_root} contains the source {src_root}")
    if dst_root.exists() and not dst_root.is_dir():
        raise ValueError(f"dst_root: {dst_root} exists and is not a folder")


def _read_options(options: Dict[str, Any]) -> Tuple[Dict[str, Any], Any, Optional[str]]:
    """Check the conversion options once, here, so a typo fails fast instead of once per model.

    Returns ``(record, calibration, calibration_path)``: the options as a manifest records them (calibration data
    by fingerprint), the calibration arrays (``None`` without ``calibration_data``) and the path they were read
    from (``None`` for arrays given in memory); see :func:`_calibration_arrays`.
    """
    from .graph.saved_model import options_record

    calibration, calibration_path = None, None
    if options.get("calibration_data") is not None:
        from .calibration import check_method

        check_method(options.get("calibration_method", "minmax"), options.get("calibration_percentile", 99.99),
                     percentile_name="calibration_percentile")
        calibration, calibration_path = _calibration_arrays(options["calibration_data"])
    return options_record(**dict(options, calibration_data=calibration)), calibration, calibration_path


def _model_pairs(src_root: Path, dst_root: Path) -> List[Tuple[str, Path, Path]]:
    """``(key, source, output)`` of every SavedModel under ``src_root``; ``key`` is its relative path.

    A root that is itself a SavedModel has its output at ``dst_root/NAME``, never ``dst_root`` itself.
    """
    pairs = []
    for rel in find_saved_models(src_root):
        key = src_root.resolve().name if rel == Path(".") else rel.as_posix()
        pairs.append((key, src_root / rel, dst_root / key))
    return pairs


def _executor(client: Any, jobs: int, max_per_worker: Optional[int], max_worker_memory: Optional[float],
              timeout: Optional[float]) -> Callable[..., None]:
    """What runs the models: the Dask ``client``'s cluster, or a pool of ``jobs`` local workers.

    It is called as ``execute(todo, opts, recorder, interrupts)``: the models to convert (``(key, src, dst,
    reason)``), the workers' options, the :class:`_Recorder` it tells each result and the :class:`_Interrupts`
    that hold signals back while workers start.
    """
    if client is not None:
        return functools.partial(_run_dask, client)

    def run_local(todo: List[Tuple[str, str, str, str]], opts: Dict[str, Any], recorder: _Recorder,
                  interrupts: _Interrupts) -> None:
        _LocalPool(jobs, max_per_worker, max_worker_memory, timeout, recorder, interrupts).run(todo, opts)

    return run_local


def local_pool_settings(jobs: int, max_per_worker: Optional[int], max_worker_memory: Optional[float],
                        timeout: Optional[float]) -> List[str]:
    """Names of the local-pool settings given (not at their defaults): a Dask client refuses them.

    Package-internal (not in ``__all__``): :func:`convert_batch` and the ``graphquant batch`` command (which names
    them as flags) refuse them by this one list.
    """
    values = {"jobs": jobs != 1, "max_per_worker": max_per_worker is not None,
              "max_worker_memory": max_worker_memory is not None, "timeout": timeout is not None}
    return [name for name, given in values.items() if given]


class _Recorder:
    """Everything a batch does with a finished model, whatever ran it: the record, the log, the bar, the report."""

    def __init__(self, result: BatchReport, report_path: Path, todo: List[Tuple[str, str, str, str]],
                 progress: bool, t0: float) -> None:
        self.result, self.report_path, self.t0 = result, report_path, t0
        self.reasons = {key: reason for key, _, _, reason in todo}
        self.done = self.failed = 0
        self.running: List[str] = []
        self.bar = None
        if progress and todo:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("[bold]converting"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[stats]}"), TimeElapsedColumn(),
                                TextColumn("{task.fields[current]}"), transient=False)
            self.bar.start()
            self.task = self.bar.add_task("converting", total=len(todo), stats="", current="")

    def started(self, key: str) -> None:
        self.running.append(key)
        self._draw()

    def unstarted(self, key: str) -> None:
        self.running.remove(key)

    def finished(self, key: str, rec: Dict[str, Any]) -> None:
        """Record one model's result and rewrite the report (progress survives an interrupted batch)."""
        if key in self.running:
            self.running.remove(key)
        if rec["status"] == "converted":
            rec["reason"] = self.reasons[key]
            self.done += 1
        else:
            self.failed += 1
            log.warning("%s: %s", key, rec["error"])
        self.result.models[key] = rec
        if self.bar is not None:
            self.bar.advance(self.task)
        self._draw()
        self.result.seconds = time.perf_counter() - self.t0
        self.result.write(self.report_path)

    def _draw(self) -> None:
        if self.bar is None:
            return
        minutes = (time.perf_counter() - self.t0) / 60
        rate = (self.done + self.failed) / minutes if minutes > 0 else 0.0
        current = ", ".join(self.running[:3]) + (f" +{len(self.running) - 3}" if len(self.running) > 3 else "")
        self.bar.update(self.task, stats=f"{self.done} done, {self.failed} failed, {rate:.0f} models/min",
                        current=current)

    def close(self) -> None:
        """Running models are recorded as interrupted; the report is written (sorted) once more."""
        try:
            for key in list(self.running):
                self.result.models[key] = {"status": "failed", "error": "interrupted", "seconds": 0.0}
            self.running.clear()
        finally:
            if self.bar is not None:
                self.bar.stop()
            self.result.models = dict(sorted(self.result.models.items()))
            self.result.seconds = time.perf_counter() - self.t0
            self.result.write(self.report_path)


@dataclass
class _Slot:
    """One local worker process and what it is doing."""

    proc: Any
    conn: Any
    born: float
    ready: bool = False
    job: Optional[Tuple[str, str, str]] = None  # (key, src, dst) reserved or running
    since: float = 0.0  # when the running model was sent
    count: int = 0


class _LocalPool:
    """``jobs`` long-lived spawn workers (see :func:`_serve`), replaced when they crash, hang, or reach a limit."""

    START_FAILURES = 3  # workers that die before they are ready, in a row, before the batch gives up

    def __init__(self, jobs: int, max_per_worker: Optional[int], max_memory: Optional[float],
                 timeout: Optional[float], recorder: _Recorder, interrupts: _Interrupts) -> None:
        self.jobs, self.max_per_worker, self.max_memory, self.timeout = jobs, max_per_worker, max_memory, timeout
        self.recorder, self.interrupts = recorder, interrupts
        self.target = _serve  # importing graphquant.batch in a new process does not import TensorFlow
        self.ctx = mp.get_context("spawn")
        self.slots: List[_Slot] = []
        self.leaving: List[Any] = []  # recycled workers told to stop
        self.start_failures = 0

    def _start(self, pending: List[Tuple[str, str, str, str]]) -> None:
        with self.interrupts.held():  # a worker is fully started (and tracked) or not started at all
            parent_end, child_end = self.ctx.Pipe(duplex=True)
            p = self.ctx.Process(target=self.target, args=(child_end, os.getpid()), daemon=True)
            p.start()
            child_end.close()
            key, src, dst, _ = pending.pop(0)  # reserved now: a model waiting for its worker counts as running
            self.slots.append(_Slot(p, parent_end, time.perf_counter(), job=(key, src, dst)))
        self.recorder.started(key)

    def _send(self, slot: _Slot, opts: Dict[str, Any]) -> None:
        key, src, dst = slot.job
        with self.interrupts.held():  # never a half-written job in the pipe
            slot.conn.send((src, dst, opts))
        slot.since = time.perf_counter()

    def _drop(self, slot: _Slot, kill: bool) -> None:
        self.slots.remove(slot)
        if kill:
            slot.proc.kill()
            slot.proc.join()
            slot.conn.close()
            if slot.job is not None:  # what the killed worker was writing
                outputs.remove_stale_tmp(Path(slot.job[2]).parent)
        else:
            with contextlib.suppress(OSError):
                slot.conn.send(None)
            slot.conn.close()
            self.leaving.append(slot.proc)

    def _fail(self, slot: _Slot, error: str) -> None:
        key = slot.job[0]
        self._drop(slot, kill=True)
        self.recorder.finished(key, {"status": "failed", "error": error, "worker": slot.proc.pid,
                                     "seconds": round(time.perf_counter() - slot.since, 3)})

    def run(self, todo: List[Tuple[str, str, str, str]], opts: Dict[str, Any]) -> None:
        from multiprocessing.connection import wait

        pending = list(todo)
        try:
            while pending or self.slots:
                while pending and len(self.slots) < self.jobs:
                    self._start(pending)
                wait([s.conn for s in self.slots] + [s.proc.sentinel for s in self.slots], timeout=0.2)
                now = time.perf_counter()
                for slot in list(self.slots):
                    self._step(slot, now, pending, opts)
                for p in [p for p in self.leaving if not p.is_alive()]:
                    p.join()
                    self.leaving.remove(p)
        finally:
            for slot in self.slots:  # running models: recorded as interrupted by the recorder
                slot.proc.kill()
            for slot in self.slots:
                slot.proc.join()
                slot.conn.close()
                if slot.job is not None:  # what the killed worker was writing
                    outputs.remove_stale_tmp(Path(slot.job[2]).parent)
            for p in self.leaving:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
                    p.join()

    def _step(self, slot: _Slot, now: float, pending: List[Tuple[str, str, str, str]], opts: Dict[str, Any]) -> None:
        """Look at one worker: started, finished a model, crashed or hung; give it the next model."""
        msg: Any = None
        try:
            if slot.conn.poll():
                msg = slot.conn.recv()
        except (EOFError, OSError):
            msg = None
        if not slot.ready:
            if msg is not None:  # ("ready", pid)
                slot.ready = True
                self.start_failures = 0
                self.recorder.result.worker_startups.append(round(now - slot.born, 3))
                self._send(slot, opts)
            elif not slot.proc.is_alive():  # died while starting: its model did not run, it goes back
                key, src, dst = slot.job
                self.recorder.unstarted(key)
                pending.insert(0, (key, src, dst, self.recorder.reasons[key]))
                slot.job = None
                self._drop(slot, kill=True)
                self.start_failures += 1
                if self.start_failures >= self.START_FAILURES:
                    code = slot.proc.exitcode
                    for key, _, _, _ in pending:
                        self.recorder.finished(key, {"status": "failed", "seconds": 0.0,
                                                     "error": f"worker process failed to start (exit code {code})"})
                    pending.clear()
            return
        if msg is not None:
            key = slot.job[0]
            slot.job = None
            slot.count += 1
            self.recorder.finished(key, msg)
            rss = msg.get("rss_mb")
            if (self.max_per_worker is not None and slot.count >= self.max_per_worker) or (
                    self.max_memory is not None and rss is not None and rss > self.max_memory):
                self._drop(slot, kill=False)  # recycled; a fresh one starts if models remain
            elif pending:
                key, src, dst, _ = pending.pop(0)
                slot.job = (key, src, dst)
                self.recorder.started(key)
                self._send(slot, opts)
            else:
                self._drop(slot, kill=False)
        elif not slot.proc.is_alive():
            code = slot.proc.exitcode
            how = f"killed by signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
            self._fail(slot, f"worker process crashed ({how})")
        elif self.timeout is not None and now - slot.since > self.timeout:
            self._fail(slot, f"timed out after {self.timeout:g} s (worker killed)")


def _dask_convert(src: str, dst: str, options: Dict[str, Any]) -> Dict[str, Any]:
    """:func:`convert_one` as a Dask task: the record names the worker that ran it."""
    record = convert_one(src, dst, options)
    try:
        from distributed import get_worker

        record["worker"] = get_worker().address
    except (ImportError, ValueError):  # pragma: no cover - run outside a worker
        record["worker"] = None
    return record


def _run_dask(client: Any, todo: List[Tuple[str, str, str, str]], opts: Dict[str, Any], recorder: _Recorder,
              interrupts: _Interrupts) -> None:
    """Map :func:`_dask_convert` over the cluster; a task lost with its worker is retried by Dask, then failed."""
    from distributed import as_completed

    if not todo:
        return
    tag = f"graphquant-{os.getpid()}-{time.time_ns()}"
    keys = {f"{tag}-{i}": key for i, (key, _, _, _) in enumerate(todo)}
    with interrupts.held():  # every model submitted, and recorded as running, or none
        futures = client.map(_dask_convert, [src for _, src, _, _ in todo], [dst for _, _, dst, _ in todo],
                             [opts] * len(todo), key=list(keys), pure=False)
        for key, _, _, _ in todo:
            recorder.started(key)
    released: set = set()
    try:
        for future in as_completed(futures):
            try:
                rec = future.result()
            except BaseException as e:  # noqa: BLE001 - a lost task (its workers died), never a model error
                if isinstance(e, KeyboardInterrupt):
                    raise
                msg = str(e).splitlines()[0] if str(e) else ""
                rec = {"status": "failed", "error": f"Dask task failed ({type(e).__name__}: {msg})", "seconds": 0.0}
            recorder.finished(keys[future.key], rec)
            # forget it at once: the scheduler recomputes a result it still holds for a client
            # when the worker keeping it dies, and that second run of the model would still be
            # writing its output after the batch returned
            future.release()
            released.add(future.key)
    finally:
        client.cancel([f for f in futures if f.key not in released and not f.done()])
