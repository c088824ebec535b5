"""Speed-ups for copying a Keras model that change process-wide state, each only within a block.

:func:`graphquant.quantize_model` constructs thousands of layers. Two costs of
that are not the copy's own work, and are removed here for the duration of the
copy only:

* :data:`cached_signatures`: Keras' layer construction calls ``inspect.signature``
  / ``inspect.getfullargspec`` on the same functions again and again. Within the
  block, Keras' modules see a caching stand-in for ``inspect``
  (:class:`_SignatureCache`); when the last block ends, the modules get the real
  ``inspect`` back.
* :data:`gc_paused`: Python's cyclic garbage collector is off within the block and
  back to its previous state (enabled or not) after the last block ends.

Both are :class:`_SharedScope` blocks: nested or concurrent copies share one
change, made by the first block to start and undone by the last one to end.
:func:`recursion_room` raises Python's recursion limit for Keras' recursive
graph building, and puts it back after.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import inspect as _inspect
import sys
import threading
import types
from typing import Any, Dict, Iterator

__all__ = ["cached_signatures", "gc_paused", "recursion_room", "SIGNATURE_CACHE", "KERAS_INSPECTING_MODULES"]


class _SignatureCache(types.ModuleType):
    """Stands in for the ``inspect`` module inside Keras' layer construction.

    Keras computes ``inspect.signature(cls.__init__)`` and
    ``inspect.getfullargspec(cls.__init__)`` for every layer it constructs and
    ``inspect.signature(layer.call)`` for every layer: a tenth of the time of
    copying a model. Signatures of the same function are the same, so they are
    computed once per function (for bound methods, once per underlying function).
    Everything else is the real ``inspect``.
    """

    def __init__(self) -> None:
        super().__init__("inspect")
        self._signatures: Dict[Any, Any] = {}
        self._argspecs: Dict[Any, Any] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(_inspect, name)

    def signature(self, obj: Any, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:
            return _inspect.signature(obj, *args, **kwargs)
        # a bound method's signature is its function's without the first parameter
        key = (obj.__func__, True) if _inspect.ismethod(obj) else (obj, False)
        return self._memo(self._signatures, key, lambda: _inspect.signature(obj))

    def getfullargspec(self, func: Any) -> Any:
        return self._memo(self._argspecs, func, lambda: _inspect.getfullargspec(func))

    @staticmethod
    def _memo(table: Dict[Any, Any], key: Any, compute: Any) -> Any:
        try:
            return table[key]
        except (KeyError, TypeError):  # TypeError: an unhashable callable
            value = compute()
        try:
            table[key] = value
        except TypeError:
            pass
        return value


class _SharedScope:
    """A process-wide change that nested or concurrent blocks share: ``enter()`` runs
    when the first block starts, ``leave()`` when the last one ends (under a lock)."""

    def __init__(self, enter: Any, leave: Any) -> None:
        self._enter, self._leave = enter, leave
        self._lock = threading.Lock()
        self._users = 0

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                self._enter()
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    self._leave()


SIGNATURE_CACHE = _SignatureCache()
KERAS_INSPECTING_MODULES = ("keras.src.ops.operation", "keras.src.layers.layer")


def _install_signature_cache() -> None:
    for name in KERAS_INSPECTING_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if getattr(mod, "inspect", None) is _inspect:
            mod.inspect = SIGNATURE_CACHE


def _remove_signature_cache() -> None:
    for name in KERAS_INSPECTING_MODULES:
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "inspect", None) is SIGNATURE_CACHE:
            mod.inspect = _inspect


#: Within the block, Keras' layer construction reuses signatures (see
#: :class:`_SignatureCache`). A pure speed-up: the cached values equal what
#: ``inspect`` returns. Modules that do not exist or do not use ``inspect``
#: (other Keras versions) are left alone.
cached_signatures = _SharedScope(_install_signature_cache, _remove_signature_cache)

_gc_was_enabled = [False]


def _pause_gc() -> None:
    _gc_was_enabled[0] = gc.isenabled()
    gc.disable()


def _resume_gc() -> None:
    if _gc_was_enabled[0]:
        gc.enable()


#: Python's cyclic garbage collector off within the block (back to its previous
#: state after). Copying a model allocates tens of thousands of objects that all
#: survive (they are the copy), and every few thousand allocations the collector
#: walks them again, at times together with the whole TensorFlow/Keras heap (a
#: full collection: a tenth of a second or more, at random calls). Nothing is
#: lost: cycles that become garbage meanwhile are collected later.
gc_paused = _SharedScope(_pause_gc, _resume_gc)


@contextlib.contextmanager
def recursion_room(frames: int) -> Iterator[None]:
    """Python's recursion limit raised by ``frames`` within the block, restored after.

    Keras builds a Functional model (``Functional.__init__`` -> ``map_graph``
    -> ``_build_map_helper``) with one recursive call per layer on the longest
    path, so a copy with a rounding layer after each convolution group can pass
    Python's default limit where the source did not (EfficientNetV2L: 1,030
    layers plus 339 inserted). Python 3.11 keeps Python-to-Python calls off
    the C stack, so a higher limit costs nothing but the frames used.
    """
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(max(before, before + frames))
    try:
        yield
    finally:
        if sys.getrecursionlimit() == max(before, before + frames):  # not changed meanwhile by someone else
            sys.setrecursionlimit(before)
