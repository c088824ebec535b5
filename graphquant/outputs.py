"""What graphquant writes, and the rules that keep it from losing anything.

Every output carries a *manifest* (``graphquant.json``): inside a converted
SavedModel folder, and as a member of a converted ``.keras`` archive. It
records the graphquant version, the source path and a fingerprint of its
contents, the options the output was made with, the conversion's counts and
(for folders) every file written with its size. It is how

* ``overwrite`` knows what it may replace: an output graphquant wrote (and
  whose files are all listed in its manifest) or an empty folder; anything
  else is refused with a message naming what is there;
* a batch rerun knows what is stale: an output whose source fingerprint or
  options differ from this run's is not "already done".

Writes are atomic: a temporary sibling named ``.NAME.graphquant-tmp-PID-*``
is renamed into place when complete; temporaries of processes that no longer
run are removed by the next conversion into the same folder. Reports (JSON)
are written the same way, with ordinary permissions, and never into a source
tree, a model folder or over a file that is not a graphquant report.

The batch lock (:class:`DestinationLock`) keeps two ``graphquant batch`` runs
from writing into one destination at once.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Union

from ._version import __version__

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from .types import DataLike

__all__ = [
    "MANIFEST",
    "TMP_MARK",
    "REPORT_KIND",
    "fingerprint_tree",
    "fingerprint_data",
    "canonical_options",
    "make_manifest",
    "write_manifest",
    "read_manifest",
    "read_keras_manifest",
    "add_keras_manifest",
    "check_replaceable",
    "check_keras_destination",
    "check_links",
    "check_report_path",
    "write_json_atomic",
    "make_tmp_dir",
    "remove_stale_tmp",
    "DestinationLock",
]

PathLike = Union[str, "os.PathLike[str]"]

MANIFEST = "graphquant.json"
TMP_MARK = ".graphquant-tmp-"
REPORT_KIND = "graphquant-report"
_LOCK = ".graphquant-batch.lock"


# --------------------------------------------------------------------------- fingerprints
def fingerprint_tree(root: PathLike) -> str:
    """SHA-256 of every file under ``root`` (relative path and contents, in sorted order), or of ``root`` if a file."""
    root = Path(root)
    h = hashlib.sha256()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for path in files:
        h.update((path.name if path == root else path.relative_to(root).as_posix()).encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return "sha256:" + h.hexdigest()


def fingerprint_data(data: Optional[DataLike]) -> Optional[str]:
    """SHA-256 of calibration data given as arrays (or a dict of arrays); ``None`` for streams.

    A ``tf.data.Dataset`` or a generator cannot be fingerprinted without
    consuming it: such data is recorded as ``"stream"``.
    """
    import numpy as np

    if data is None:
        return None
    if isinstance(data, Mapping):
        items = sorted(data.items())
    elif isinstance(data, np.ndarray):
        items = [("", data)]
    else:
        return "stream"
    h = hashlib.sha256()
    for k, v in items:
        if not isinstance(v, np.ndarray):
            return "stream"
        h.update(f"{k}|{v.dtype.str}|{v.shape}|".encode())
        h.update(np.ascontiguousarray(v).tobytes())
    return "sha256:" + h.hexdigest()


def canonical_options(options: Mapping[str, Any]) -> Dict[str, Any]:
    """``options`` as JSON data with sorted keys (what a manifest records and a rerun compares)."""
    return json.loads(json.dumps(options, sort_keys=True, default=str))


# --------------------------------------------------------------------------- manifests
def make_manifest(kind: str, source: PathLike, source_fingerprint: str, options: Mapping[str, Any],
                  result: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """A manifest record (``files`` is added by :func:`write_manifest` for folders)."""
    return {
        "graphquant": __version__,
        "kind": kind,
        "source": str(Path(source).resolve()),
        "source_fingerprint": source_fingerprint,
        "options": canonical_options(options),
        "result": dict(result or {}),
    }


def write_manifest(folder: PathLike, manifest: Mapping[str, Any]) -> None:
    """Write ``folder/graphquant.json``, listing every file under ``folder`` with its size."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): p.stat().st_size
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    data = dict(manifest, files=files)
    (folder / MANIFEST).write_text(json.dumps(data, indent=2, sort_keys=True))


def read_manifest(folder: PathLike) -> Optional[Dict[str, Any]]:
    """The manifest of a folder graphquant wrote, or ``None`` (no manifest, or not ours)."""
    p = Path(folder) / MANIFEST
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "graphquant" in data and "files" in data else None


def output_intact(folder: PathLike, manifest: Mapping[str, Any]) -> bool:
    """True when ``folder`` holds exactly the files its manifest lists, with their sizes."""
    folder = Path(folder)
    listed = manifest.get("files") or {}
    present = {p.relative_to(folder).as_posix(): p.stat().st_size
               for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST}
    return bool(listed) and present == listed


def add_keras_manifest(archive: PathLike, manifest: Mapping[str, Any]) -> None:
    """Add ``graphquant.json`` to a ``.keras`` zip archive (Keras ignores the extra member)."""
    with zipfile.ZipFile(archive, "a") as z:
        z.writestr(MANIFEST, json.dumps(dict(manifest), indent=2, sort_keys=True))


def read_keras_manifest(archive: PathLike) -> Optional[Dict[str, Any]]:
    """The manifest inside a ``.keras`` archive graphquant wrote, or ``None``."""
    try:
        with zipfile.ZipFile(archive) as z:
            data = json.loads(z.read(MANIFEST))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    return data if isinstance(data, dict) and "graphquant" in data else None


# --------------------------------------------------------------------------- destinations
def _describe(paths: Iterable[Path], folder: Path, most: int = 4) -> str:
    names = sorted(p.relative_to(folder).as_posix() + ("/" if p.is_dir() else "") for p in paths)
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def check_replaceable(dst: PathLike, overwrite: bool) -> Optional[Dict[str, Any]]:
    """Refuse a destination folder that may not be replaced; return its manifest if it has one.

    A missing or empty folder is always fine. A folder graphquant wrote (its
    manifest lists every file in it) may be replaced with ``overwrite``.
    Anything else (a file, a folder with other content, a graphquant output
    to which files were added) is never replaced.

    Raises:
        FileExistsError: naming what is there.
    """
    dst = Path(dst)
    if not dst.exists() and not dst.is_symlink():
        return None
    if dst.is_symlink() or not dst.is_dir():
        raise FileExistsError(f"destination {dst} exists and is not a folder graphquant wrote; refusing to replace it")
    children = list(dst.iterdir())
    if not children:
        return None
    manifest = read_manifest(dst)
    if manifest is None:
        raise FileExistsError(
            f"destination {dst} holds files graphquant did not write ({_describe(children, dst)}); "
            "refusing to replace them: choose another destination"
        )
    listed = set(manifest.get("files") or {}) | {MANIFEST}
    extra = [p for p in dst.rglob("*") if p.is_file() and p.relative_to(dst).as_posix() not in listed]
    extra += [p for p in dst.rglob("*") if p.is_symlink()]
    if extra:
        raise FileExistsError(
            f"destination {dst} is a graphquant output with files added since ({_describe(set(extra), dst)}); "
            "refusing to replace them"
        )
    if not overwrite:
        raise FileExistsError(f"destination {dst} is not empty: it holds a graphquant output (pass overwrite=True / --overwrite to replace it)")
    return manifest


def check_keras_destination(src: PathLike, dst: PathLike, overwrite: bool) -> None:
    """Refuse a ``.keras`` destination that is the source or a file graphquant did not write."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and (dst.resolve() == src.resolve() or os.path.samefile(src, dst)):
        raise ValueError(f"destination {dst} is the source {src}; the source is never modified")
    if not dst.exists() and not dst.is_symlink():
        return
    if dst.is_symlink() or not dst.is_file() or read_keras_manifest(dst) is None:
        raise FileExistsError(f"destination {dst} exists and was not written by graphquant; refusing to replace it")
    if not overwrite:
        raise FileExistsError(f"destination {dst} exists (a graphquant output; pass --overwrite to replace it)")


def check_links(folder: PathLike) -> None:
    """Refuse a model folder with a symbolic link that leaves it (or a link loop).

    Raises:
        ValueError: naming the link and where it points (one short line).
    """
    folder = Path(folder)
    top = folder.resolve()
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            if not p.is_symlink():
                continue
            try:
                target = p.resolve(strict=True)
            except RuntimeError:
                raise ValueError(f"{p}: symbolic link loop") from None
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise ValueError(f"{p}: symbolic link loop") from None
                raise ValueError(f"{p}: broken symbolic link (to {os.readlink(p)})") from None
            if target != top and top not in target.parents:
                raise ValueError(f"{p}: a symbolic link out of the model folder (to {target}); refusing to read it")


# --------------------------------------------------------------------------- reports
def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_report_path(path: PathLike, option: str, *, sources: Iterable[PathLike] = (),
                      models: Iterable[PathLike] = ()) -> Path:
    """Refuse a report path before any work starts; return it.

    Refused: a path inside a source tree (``sources``) or inside a model
    folder (``models``: sources and outputs), an existing folder, and an
    existing file that is not a graphquant report.

    Raises:
        ValueError: naming ``option`` and the reason.
    """
    p = Path(path)
    r = p.resolve()
    for s in sources:
        if _inside(r, Path(s).resolve()):
            raise ValueError(f"{option}: {p} is inside the source {s}; the source is never modified")
    for m in models:
        if _inside(r, Path(m).resolve()):
            raise ValueError(f"{option}: {p} is inside the model folder {m}; choose a path outside it")
    if p.is_dir():
        raise ValueError(f"{option}: {p} is a folder; give a file path")
    if p.exists() or p.is_symlink():
        if p.is_symlink() or not p.is_file() or not _is_report(p):
            raise ValueError(f"{option}: {p} exists and is not a graphquant report; refusing to overwrite it")
    if p.parent.exists() and not p.parent.is_dir():
        raise ValueError(f"{option}: {p.parent} is not a folder")
    return p


def _is_report(p: Path) -> bool:
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("kind") == REPORT_KIND


def write_json_atomic(path: PathLike, data: Mapping[str, Any]) -> None:
    """Write ``data`` as a graphquant report at ``path``: temp file + rename, mode 0666 & ~umask.

    On failure (e.g. a full disk) nothing is left behind and the old report,
    if any, is unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(dict(data, kind=REPORT_KIND), f, indent=2)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------- temporaries
def make_tmp_dir(dst: PathLike) -> Path:
    """A fresh temporary folder beside ``dst``, named for this process (see :func:`remove_stale_tmp`)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dst.name}{TMP_MARK}{os.getpid()}-", dir=dst.parent))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_tmp(folder: PathLike) -> List[Path]:
    """Remove graphquant temporaries in ``folder`` whose process no longer runs; return them."""
    folder = Path(folder)
    removed: List[Path] = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if not p.name.startswith(".") or TMP_MARK not in p.name:
            continue
        pid_part = p.name.split(TMP_MARK, 1)[1].split("-", 1)[0]
        if not pid_part.isdigit() or _alive(int(pid_part)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        removed.append(p)
    return removed


# --------------------------------------------------------------------------- the batch lock
class DestinationLock:
    """An exclusive lock file ``DST/.graphquant-batch.lock`` for one batch run.

    Taken with ``O_CREAT | O_EXCL``; it holds the owner's host name and pid.
    A lock of a process that no longer runs on this host is stale and taken
    over; a live one is refused at once.
    """

    def __init__(self, root: PathLike):
        self.path = Path(root) / _LOCK
        self.held = False

    def acquire(self) -> None:
        """Take the lock or raise ``FileExistsError`` naming the run that holds it."""
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if self._stale(owner, me["host"]):
                    with contextlib.suppress(OSError):
                        self.path.unlink()  # stale: its process is gone
                    continue
                who = f"pid {owner.get('pid')} on {owner.get('host')}" if owner else "another process"
                raise FileExistsError(
                    f"another graphquant batch ({who}) is writing to {self.path.parent}; "
                    f"wait for it to finish (or remove {self.path} if that run is gone)"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise FileExistsError(f"cannot take the lock {self.path}")

    def _stale(self, owner: Optional[Dict[str, Any]], host: str) -> bool:
        if owner is None:  # unreadable: its writer died between creating and writing it, or is writing now
            try:
                return time.time() - self.path.stat().st_mtime > 60
            except OSError:
                return True
        pid = owner.get("pid")
        return owner.get("host") == host and isinstance(pid, int) and not _alive(pid)

    def _owner(self) -> Optional[Dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(OSError):
                self.path.unlink()
            self.held = False

    def __enter__(self) -> "DestinationLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
