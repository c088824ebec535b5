"""Convert many SavedModels: one isolated worker process per model, resumable.

:func:`convert_batch` finds every SavedModel under a source root (any depth),
converts each with :func:`graphquant.graph.convert_saved_model` in a fresh
worker process (so memory does not grow and a crash or a corrupt model fails
only that model) and writes the same relative layout under the destination.
A finished output is published by an atomic rename, so an output folder that
exists is complete; a rerun skips it (``overwrite=True`` redoes it).

The per-model function :func:`convert_one` takes and returns plain data, so a
cluster engine can map it over models instead (see the README: Dask, Ray).
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

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


def convert_one(src: str, dst: str, options: Dict[str, Any]) -> Dict[str, Any]:
    """Convert one SavedModel; never raises. Returns a JSON-able record."""
    t0 = time.perf_counter()
    try:
        from .graph.saved_model import convert_saved_model

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


def _worker(src: str, dst: str, options: Dict[str, Any], conn) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.ERROR)
    conn.send(convert_one(src, dst, options))
    conn.close()


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
        """Write the JSON report atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        os.replace(tmp, path)


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

    Args:
        src_root: folder searched at any depth (never modified).
        dst_root: output root; nothing is written outside it.
        jobs: worker processes running at once (each model gets a fresh one).
        overwrite: redo models whose output already exists (otherwise skipped).
        report: path of the JSON report (default ``dst_root/graphquant-batch.json``).
        progress: show a ``rich`` progress bar.
        **options: keywords for :func:`graphquant.convert_saved_model`
            (``bits``, ``format``, ``rounding``, ``range``, ``weights``, ...).

    Returns:
        A :class:`BatchReport`; ``report.ok`` is False when a model failed.

    Raises:
        ValueError / TypeError for bad arguments (missing source root, ``jobs < 1``).
    """
    t0 = time.perf_counter()
    src_root, dst_root = Path(src_root), Path(dst_root)
    if not src_root.is_dir():
        raise ValueError(f"src_root: {src_root} is not a folder")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    s, d = src_root.resolve(), dst_root.resolve()
    if d == s or s in d.parents:
        raise ValueError(f"dst_root {dst_root} is inside the source {src_root}; the source is never modified")
    if d in s.parents:
        raise ValueError(f"dst_root {dst_root} contains the source {src_root}")
    # validate options once, here, so a typo fails fast instead of once per model
    from .graph.function import config_from_kwargs

    cfg_keys = {k: v for k, v in options.items() if k not in ("calibration_data", "calibration_signature", "calibration_method", "seed", "registry",
                                                               "allow_requantize")}
    config_from_kwargs(**cfg_keys)
    report_path = Path(report) if report is not None else dst_root / "graphquant-batch.json"
    models = find_saved_models(src_root)
    result = BatchReport(str(src_root), str(dst_root))
    if not models:
        log.warning("no SavedModel found under %s", src_root)
    dst_root.mkdir(parents=True, exist_ok=True)
    todo = []
    for rel in models:
        out = dst_root / rel
        key = rel.as_posix()
        if not overwrite and (out / "saved_model.pb").is_file():
            result.models[key] = {"status": "skipped", "error": None, "seconds": 0.0}
            continue
        todo.append((key, str(src_root / rel), str(out)))
    opts = dict(options, overwrite=overwrite)

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
    try:
        while pending or running:
            while pending and len(running) < jobs:
                key, src, dst = pending.pop(0)
                recv, send = ctx.Pipe(duplex=False)
                p = ctx.Process(target=target, args=(src, dst, opts, send), daemon=True)
                p.start()
                send.close()
                running[key] = (p, recv, time.perf_counter())
            for key in list(running):
                p, recv, started = running[key]
                rec = None
                if recv.poll():
                    try:
                        rec = recv.recv()
                    except EOFError:
                        rec = None
                    p.join()
                elif not p.is_alive():
                    p.join()
                    if recv.poll():
                        try:
                            rec = recv.recv()
                        except EOFError:
                            rec = None
                    if rec is None:
                        rec = {
                            "status": "failed",
                            "error": f"worker process crashed (exit code {p.exitcode})",
                            "seconds": round(time.perf_counter() - started, 3),
                        }
                else:
                    continue
                if rec is None:
                    rec = {"status": "failed", "error": f"worker process crashed (exit code {p.exitcode})",
                           "seconds": round(time.perf_counter() - started, 3)}
                recv.close()
                del running[key]
                result.models[key] = rec
                if rec["status"] == "failed":
                    log.warning("%s: %s", key, rec["error"])
                if bar is not None:
                    bar.advance(task)
                result.seconds = time.perf_counter() - t0
                result.write(report_path)  # progress survives an interrupted batch
            time.sleep(0.05)
    finally:
        for key, (p, recv, _) in running.items():
            p.terminate()
            p.join()
            result.models[key] = {"status": "failed", "error": "interrupted", "seconds": 0.0}
        if bar is not None:
            bar.stop()
        result.models = dict(sorted(result.models.items()))
        result.seconds = time.perf_counter() - t0
        result.write(report_path)
    return result
