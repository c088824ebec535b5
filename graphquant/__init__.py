"""graphquant: simulate reduced numeric precision inside TensorFlow/Keras models.

The user API, importable from here (see the README for a tour):

* numerics: :func:`quantize`, the formats :class:`FixedPoint`, :class:`Affine`,
  :class:`FloatFormat`, :class:`Scaled` (MX, NVFP4) and their base :class:`Format`,
  :data:`PRESETS`, :data:`SCALED_PRESETS`, :func:`parse_format`, :func:`register_format`
  (a format of yours by string name), :func:`format_from_dict`, :data:`ROUNDING_MODES`, :func:`representable_range`,
  :func:`set_seed`, :func:`use_xla`;
* Keras models: :func:`quantize_model` (options: :class:`QuantizeConfig`),
  :func:`inspect`, :func:`calibrate`, :func:`apply_weight_storage`;
* evidence: :func:`compare` (per-layer error report);
* graphs: :func:`quantize_function`, :func:`convert_saved_model`,
  :func:`inspect_saved_model`, :func:`convert_batch`, :class:`SavedModelError`;
* deployment: :func:`export_tflite`, :func:`compare_tflite`, :func:`tflite_scales`;
* custom patterns: :class:`Registry`, :class:`Pattern`, :class:`Step`,
  :class:`Matcher`, :data:`DEFAULT_REGISTRY` and the step kinds :data:`CONV`,
  :data:`DENSE`, :data:`NORM`, :data:`BIAS`, :data:`ACTIVATION`.

Everything else lives in its submodule: the layers graphquant inserts in
:mod:`graphquant.keras` (``Quantize``, ``QuantizeWeights``, ``StorageRounding``),
plans in :mod:`graphquant.plan` (``Plan``, ``InsertionPoint``, ``make_plan``),
the neutral graph of the matcher in :mod:`graphquant.patterns` (``View``,
``Node``, ``Match``, ``weight_slots``) and reports next to what makes them
(``graphquant.compare.CompareReport``, ``graphquant.graph.ConversionReport``,
``graphquant.tflite.TFLiteReport``, ``graphquant.tflite.TFLiteScales``); the
aliases of the public options' types in :mod:`graphquant.types`.

Importing the package is cheap: each name is imported on first use (PEP 562),
so ``import graphquant`` and the ``graphquant`` command's ``--help`` do not
import TensorFlow. Importing graphquant still registers its Keras layers for
serialization, so a quantized ``.keras`` file loads without ``custom_objects``:
at once if Keras is already imported, otherwise right after Keras is imported
(:class:`_RegisterLayersAfterKeras`; TensorFlow imports Keras during its own import).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys
from types import ModuleType
from typing import Any, Dict, List

from ._version import __version__

#: each public name -> the submodule (relative to this package) that defines it
_EXPORTS: Dict[str, str] = {
    # numerics
    "Affine": "formats",
    "FixedPoint": "formats",
    "FloatFormat": "formats",
    "Format": "formats",
    "PRESETS": "formats",
    "SCALED_PRESETS": "formats",
    "Scaled": "formats",
    "format_from_dict": "formats",
    "parse_format": "formats",
    "register_format": "formats",
    "ROUNDING_MODES": "ops",
    "quantize": "ops",
    "representable_range": "ops",
    "set_seed": "ops",
    "use_xla": "rounding",
    # custom patterns
    "ACTIVATION": "patterns",
    "BIAS": "patterns",
    "CONV": "patterns",
    "DEFAULT_REGISTRY": "patterns",
    "DENSE": "patterns",
    "NORM": "patterns",
    "Matcher": "patterns",
    "Pattern": "patterns",
    "Registry": "patterns",
    "Step": "patterns",
    # Keras
    "QuantizeConfig": "plan",
    "calibrate": "ranges",
    "apply_weight_storage": "keras",
    "inspect": "keras",
    "quantize_model": "keras",
    # evidence
    "compare": "compare",
    # deployment
    "compare_tflite": "tflite",
    "export_tflite": "tflite",
    "tflite_scales": "tflite",
    # graphs
    "SavedModelError": "graph",
    "convert_batch": "batch",
    "convert_saved_model": "graph",
    "inspect_saved_model": "graph",
    "quantize_function": "graph",
}

#: names this package exported before the API was narrowed -> where they live now (for the error message)
_MOVED: Dict[str, str] = {
    "CompareReport": "compare",
    "ConversionReport": "graph",
    "InsertionPoint": "plan",
    "Match": "patterns",
    "Node": "patterns",
    "Plan": "plan",
    "Quantize": "keras",
    "QuantizeWeights": "keras",
    "StorageRounding": "keras",
    "TFLiteReport": "tflite",
    "TFLiteScales": "tflite",
    "View": "patterns",
    "default_registry": "patterns",
    "make_plan": "plan",
    "weight_slots": "patterns",
}

#: importable from here for code written against earlier versions, but not part of the top-level API
_COMPATIBLE: Dict[str, str] = {
    "as_format": "formats",  # the format=/bits=/range= resolution the front ends share
}

__all__ = ["__version__", *sorted(_EXPORTS)]

#: submodules reachable as attributes of the package without importing them first
_SUBMODULES = ("batch", "calibration", "cli", "compare", "formats", "graph", "keras", "ops", "outputs", "patterns",
               "plan", "ranges", "report", "rounding", "targets", "tflite", "types", "weights")


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` (or is ``name``) on first use (PEP 562); cache the value here."""
    module = _EXPORTS.get(name) or _COMPATIBLE.get(name)
    if module is None and name in _SUBMODULES:  # graphquant.keras etc. after a bare ``import graphquant``
        return importlib.import_module(f".{name}", __name__)
    if module is None:
        if name in _MOVED:
            raise AttributeError(f"graphquant.{name} is not part of the top-level API: use graphquant.{_MOVED[name]}.{name}")
        raise AttributeError(f"module 'graphquant' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))


class _Package(ModuleType):
    """This package's module type: importing a submodule does not replace the exported name it shares
    (``graphquant.compare`` stays the function when ``graphquant.compare``, the module, is imported)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, ModuleType):
            return  # the import system binding the submodule to its parent: the module stays in sys.modules
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


class _RegisterLayersAfterKeras(importlib.abc.MetaPathFinder):
    """Import ``graphquant.keras`` (which registers graphquant's layers with Keras) once Keras is imported.

    A finder at the front of ``sys.meta_path`` that wraps the loaders of
    ``keras``, ``tensorflow`` and graphquant's own submodules (real specs come
    from the other finders; the modules keep their own loader as
    ``__loader__``). TensorFlow imports Keras halfway through its own start-up,
    when graphquant's layers cannot be defined yet, and a graphquant submodule
    imported first (``import graphquant.ops``) is itself half executed while it
    imports TensorFlow; so the layers are imported once Keras has executed and
    none of the watched modules is in the middle of its import; then the finder
    removes itself. A failure to import ``graphquant.keras`` is logged, never raised
    into the user's ``import keras``.
    """

    def __init__(self) -> None:
        self.loading: Dict[str, bool] = {}

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        watched = fullname in ("keras", "tensorflow") or fullname.startswith(__name__ + ".")
        if not watched or fullname in sys.modules:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _ThenRegister(spec.loader, self, fullname)
        return spec

    def executed(self, fullname: str) -> None:
        if "keras" in sys.modules and not any(self.loading.values()):
            _remove_hook()
            try:
                importlib.import_module(".keras", __name__)
            except Exception as e:  # noqa: BLE001 - keras itself imported fine: say why the layers are not registered
                logging.getLogger(__name__).warning("graphquant's Keras layers are not registered (%s: %s)",
                                                    type(e).__name__, e)


class _ThenRegister(importlib.abc.Loader):
    """The loader of ``keras``/``tensorflow`` while the module executes; tells the finder when it is done."""

    def __init__(self, loader: Any, finder: _RegisterLayersAfterKeras, fullname: str) -> None:
        self.loader, self.finder, self.fullname = loader, finder, fullname

    def __getattr__(self, name: str) -> Any:  # get_code, get_source, ... (runpy for ``python -m graphquant``)
        return getattr(self.loader, name)

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        module.__loader__ = module.__spec__.loader = self.loader
        self.finder.loading[self.fullname] = True
        try:
            self.loader.exec_module(module)
        finally:
            self.finder.loading[self.fullname] = False
        self.finder.executed(self.fullname)


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterLayersAfterKeras)]


def _register_keras_layers() -> None:
    if "keras" in sys.modules:
        importlib.import_module(".keras", __name__)
    elif not any(isinstance(f, _RegisterLayersAfterKeras) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterLayersAfterKeras())


_register_keras_layers()
