"""Calibration data and the Keras front end of calibration.

* :func:`calibrate` sets the learned ranges of a quantized Keras model from data,
  through the one calibration engine (:mod:`graphquant.calibration`);
* :func:`calibration_batches` / :func:`iter_batches` / :func:`check_inputs`: the
  data checks every front end shares;
* :class:`MinMaxTracker` / :class:`PercentileTracker`: numpy-facing callers of the
  engine (``update(batch)``, ``result()``), for ranges outside a model.

Every range includes zero and is at least :data:`MIN_RANGE_WIDTH` wide.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, Mapping, Optional, Tuple

import numpy as np

from .calibration import MIN_RANGE_WIDTH  # the engine's rule, re-exported (its users import it from here)
from .types import DataLike

if TYPE_CHECKING:  # pragma: no cover - annotations only: importing Keras here would slow `import graphquant.ranges`
    import keras

__all__ = [
    "MinMaxTracker", "PercentileTracker", "calibrate", "iter_batches", "calibration_batches", "check_inputs",
    "MIN_RANGE_WIDTH", "load_data_file",
]  # fmt: skip

log = logging.getLogger(__name__)




class _EngineTracker:
    """A numpy-facing tracker over a :class:`graphquant.calibration.Observer` (the one engine):
    ``update`` runs the engine's TensorFlow update eagerly, ``result`` reads the range by
    the engine's method. The observer is made at the first update (per channel: the
    channel count is that update's)."""

    method = "minmax"

    def __init__(self, axis: Optional[int] = None):
        self.axis = axis
        self._observer: Any = None
        self.percentile = 99.99

    def update(self, x: Any) -> None:
        """Track one batch (non-finite values are ignored and counted in :attr:`nonfinite`)."""
        from . import calibration as engine

        x = np.asarray(x, dtype=np.float32)
        if x.size == 0:
            return
        if self._observer is None:
            channels = 1 if self.axis is None else x.shape[self.axis]
            self._observer = engine.Observer("the tracker", self.axis, channels, histogram=self.method != "minmax")
        self._observer.update(x)

    def _stats(self) -> Any:
        return None if self._observer is None else self._observer.stats()

    @property
    def seen(self) -> int:
        """Values seen (finite or not)."""
        s = self._stats()
        return 0 if s is None else s.seen

    @property
    def nonfinite(self) -> int:
        """NaN / inf values ignored."""
        s = self._stats()
        return 0 if s is None else s.nonfinite

    def result(self, point: str = "the tracker") -> Tuple[np.ndarray, np.ndarray]:
        """``(lo, hi)``: widened to include 0 and to at least :data:`MIN_RANGE_WIDTH`.

        Raises:
            ValueError: naming ``point``, when it saw no finite value (in some channel).
        """
        from . import calibration as engine

        s = self._stats()
        if s is None or s.seen == 0:
            raise ValueError(f"{point}: no data seen (the tracker was never updated)")
        s.point = point
        lo, hi = engine.range_of(s, self.method, percentile=self.percentile, what="")
        return lo, hi

    def __del__(self) -> None:
        if getattr(self, "_observer", None) is not None:
            try:
                self._observer.release()
            except Exception:  # pragma: no cover - interpreter shutdown
                pass


class MinMaxTracker(_EngineTracker):
    """Running min/max (the engine's ``"minmax"``)."""


class PercentileTracker(_EngineTracker):
    """The ``100 - p`` and ``p`` percentiles of all values seen (the engine's ``"percentile"``,
    read from its histogram: within one bin width of the exact percentile)."""

    method = "percentile"

    def __init__(self, percentile: float = 99.99, axis: Optional[int] = None):
        from . import calibration as engine

        engine.check_method("percentile", percentile)  # the one percentile rule
        super().__init__(axis)
        self.percentile = float(percentile)


def iter_batches(
    data: DataLike, n_inputs: int = 1, batch_size: int = 32, steps: Optional[int] = None,
    what: str = "calibration data"
) -> Iterator[Any]:
    """Model inputs from a numpy array / tensor / dict of arrays (batched),
    a ``tf.data.Dataset`` or any iterable of batches (``(x, y)`` pairs keep ``x``).

    Used by every front end (Keras calibration, graph calibration, compare),
    so data means the same everywhere; ``what`` names the argument in errors.
    """
    import tensorflow as tf

    def x_of(el: Any) -> Any:
        if isinstance(el, (tuple, list)) and not (n_inputs > 1 and len(el) == n_inputs and not isinstance(el[0], (tuple, list, dict))):
            if len(el) in (1, 2, 3):
                return el[0]
        return el

    expected = f"{what} must be an array, a dict of arrays, a tf.data.Dataset or an iterable of batches"
    if isinstance(data, (str, bytes)) or data is None:
        raise TypeError(f"{expected}, got {type(data).__name__}")
    count = 0
    if isinstance(data, (np.ndarray, tf.Tensor, dict)):
        if isinstance(data, dict):
            if not data:
                raise ValueError(f"{what} is an empty dict")
            data = {k: v if hasattr(v, "shape") else np.asarray(v) for k, v in data.items()}
            n = min(int(v.shape[0]) for v in data.values())
            chunks = ({k: v[i : i + batch_size] for k, v in data.items()} for i in range(0, n, batch_size))
        else:
            n = int(data.shape[0])
            chunks = (data[i : i + batch_size] for i in range(0, n, batch_size))
        for c in chunks:
            if steps is not None and count >= steps:
                return
            count += 1
            yield c
        return
    try:
        it = iter(data)
    except TypeError:
        raise TypeError(f"{expected}, got {type(data).__name__}") from None
    for el in it:
        if steps is not None and count >= steps:
            return
        count += 1
        yield x_of(el)


def load_data_file(path: Any, what: str = "calibration_data", keyed: bool = False) -> Any:
    """The arrays of a ``.npz`` / ``.npy`` file, as every command reads its data files.

    A ``.npy`` file (or a ``.npz`` with one array, unless ``keyed``) gives that
    array; a ``.npz`` with several arrays gives ``{name: array}`` (named inputs).

    Raises:
        ValueError: one line naming ``what`` and the file: missing, or not a
            readable ``.npz``/``.npy`` (pickled objects are refused).
    """
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what}: {p}: no such file")
    try:
        data = np.load(p, allow_pickle=False)
        if isinstance(data, np.ndarray):
            return data
        with data:
            arrays = {k: data[k] for k in data.files}
    except Exception as e:
        raise ValueError(f"{what}: {p}: not a readable .npz/.npy file ({e})") from None
    if len(arrays) == 1 and not keyed:
        return next(iter(arrays.values()))
    return arrays


def _is_empty(batch: Any) -> bool:
    import tensorflow as tf

    leaves = tf.nest.flatten(batch)
    return not leaves or any(int(np.prod(getattr(v, "shape", np.shape(v)))) == 0 for v in leaves)


def calibration_batches(
    data: DataLike,
    n_inputs: int = 1,
    batch_size: int = 32,
    steps: Optional[int] = None,
    what: str = "calibration_data",
    check: Optional[Callable[[Any], None]] = None,
) -> Iterator[Any]:
    """:func:`iter_batches` for calibration (every front end): zero-size batches
    are skipped, ``check(batch)`` (e.g. :func:`check_inputs`) runs before each
    batch is fed, and data without a non-empty batch is an error.

    Raises:
        ValueError: ``"<what> is empty"`` (after the last batch).
    """
    n = 0
    for batch in iter_batches(data, n_inputs, batch_size, steps, what=what):
        if _is_empty(batch):
            continue
        if check is not None:
            check(batch)
        n += 1
        yield batch
    if n == 0:
        raise ValueError(f"{what} is empty (no batch with data)")


def _shape_str(shape: Any) -> str:
    return "(" + ", ".join("None" if d is None else str(int(d)) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def inputs_str(expected: Mapping[str, Tuple[Optional[Tuple[Optional[int], ...]], Any]]) -> str:
    """The inputs a model takes, for one-line errors: ``'a' (None, 6, 6, 1), 'b' (None, 3)`` (sorted by name:
    a SavedModel's signature does not keep its inputs' order)."""
    return ", ".join(f"{k!r} {'(any shape)' if s is None else _shape_str(s)}" for k, (s, _) in sorted(expected.items()))


def _castable(given: Any, expected: Any) -> bool:
    g, e = np.dtype(given), np.dtype(expected)
    if e.kind in "OSU":
        return g.kind in "OSU"
    if g.kind in "OSU":
        return False
    if "V" in (g.kind, e.kind):  # bfloat16 / float8 (ml_dtypes): numpy knows no cast rules
        return True
    return bool(np.can_cast(g, e, casting="same_kind"))


def check_inputs(
    given: Mapping[str, Any],
    expected: Mapping[str, Tuple[Optional[Tuple[Optional[int], ...]], Any]],
    what: str = "calibration_data",
) -> None:
    """Check one batch against the inputs a model expects, before it is run.

    Args:
        given: ``{input name: value}`` of the batch.
        expected: ``{input name: (shape or None if unknown, numpy/TensorFlow dtype)}``;
            ``None`` dimensions match any size.

    Raises:
        ValueError: one line, e.g. ``calibration_data: input 'x' expects shape
            (None, 6, 6, 1), got (4, 5, 5, 1)``; also for missing or unknown inputs
            and dtypes that cannot be cast (e.g. strings to float32).
    """
    import tensorflow as tf

    missing = [k for k in expected if k not in given]
    if missing:
        raise ValueError(f"{what}: input {missing[0]!r} is missing (the model takes {inputs_str(expected)}; got {list(given)})")
    unknown = [k for k in given if k not in expected]
    if unknown:
        raise ValueError(f"{what}: unknown input {unknown[0]!r} (the model takes {inputs_str(expected)})")
    for name, (shape, dtype) in expected.items():
        v = given[name]
        if not hasattr(v, "shape") or not hasattr(v, "dtype"):
            v = np.asarray(v)
        got = tuple(None if d is None else int(d) for d in v.shape)
        if shape is not None:
            shape = tuple(None if d is None else int(d) for d in shape)
            if len(got) != len(shape) or any(e is not None and e != g for e, g in zip(shape, got)):
                raise ValueError(f"{what}: input {name!r} expects shape {_shape_str(shape)}, got {_shape_str(got)}")
        try:
            gdt, edt = tf.as_dtype(v.dtype), tf.as_dtype(dtype)
        except TypeError:
            continue  # a dtype TensorFlow does not know: let the model say
        if not _castable(gdt.as_numpy_dtype, edt.as_numpy_dtype):
            raise ValueError(f"{what}: input {name!r} expects dtype {edt.name}, got {gdt.name}")


def _keras_inputs(model: Any) -> Tuple[Any, Dict[str, Tuple[Any, Any]]]:
    """``(structure, {name: (shape, dtype)})`` of a Keras model's inputs; structure is
    ``"dict"``, ``"list"`` or ``"single"``."""
    inputs = list(getattr(model, "inputs", None) or [])
    struct = getattr(model, "_inputs_struct", None)
    if isinstance(struct, Mapping):
        return "dict", {k: (tuple(t.shape), t.dtype) for k, t in struct.items()}
    specs: Dict[str, Tuple[Any, Any]] = {}
    for i, t in enumerate(inputs):
        hist = getattr(t, "_keras_history", None)
        name = getattr(getattr(hist, "operation", None), "name", None) or getattr(t, "name", None) or f"input{i}"
        specs[name] = (tuple(t.shape), t.dtype)
    return ("list" if len(specs) > 1 else "single"), specs


def _keras_check(model: Any, what: str) -> Optional[Callable[[Any], None]]:
    kind, specs = _keras_inputs(model)
    if not specs:
        return None
    names = list(specs)

    def check(batch: Any) -> None:
        if kind == "dict" or isinstance(batch, Mapping):
            if not isinstance(batch, Mapping):
                raise ValueError(f"{what}: the model takes a dict of inputs {names}, got {type(batch).__name__}")
            given = dict(batch)
        elif kind == "list":
            if not isinstance(batch, (tuple, list)) or len(batch) != len(names):
                got = f"{len(batch)} arrays" if isinstance(batch, (tuple, list)) else type(batch).__name__
                raise ValueError(f"{what}: the model takes {len(names)} inputs {names}, got {got}")
            given = dict(zip(names, batch))
        else:
            given = {names[0]: batch}
        check_inputs(given, specs, what)

    return check


def calibrate(
    model: "keras.Model",
    data: DataLike,
    method: str = "minmax",
    *,
    percentile: float = 99.99,
    batch_size: int = 32,
    steps: Optional[int] = None,
    verbose: Optional[bool] = None,
) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Set the learned ranges of every :class:`graphquant.keras.Quantize` layer from data.

    The model runs in inference mode inside one ``tf.function`` with rounding
    switched off (so every layer sees float activations); each learned-range
    layer feeds its input to a :class:`graphquant.calibration.Observer`
    (statistics computed in TensorFlow inside the traced model), then its range
    is set from the statistics by ``method`` and frozen. NaN and inf values are
    ignored (their number is logged per layer).

    Args:
        model: a model returned by :func:`graphquant.quantize_model`.
        data: a numpy array (batched by ``batch_size``), a ``tf.data.Dataset``,
            or an iterable of batches (``(x, y)`` pairs: ``x`` is used).
        method: ``"minmax"``, ``"percentile"``, ``"mse"`` or ``"entropy"``
            (see :mod:`graphquant.calibration`).
        percentile: for ``"percentile"``: the upper percentile (lower is ``100 - p``).
        steps: at most this many batches.
        verbose: show a progress bar (``None``: when stderr is a terminal and
            calibration runs longer than a second).

    Returns:
        ``{layer name: (lo, hi)}`` for the layers set.

    Raises:
        TypeError: ``model`` is not a Keras model or ``data`` is not usable.
        ValueError: bad ``method``/``percentile``; ``data`` is empty, does not
            fit the model's inputs (shape or dtype), or has no finite value at a
            layer (the message names it).
    """
    return calibrate_keras(model, data, method, percentile=percentile, batch_size=batch_size, steps=steps, what="data",
                            verbose=verbose)  # fmt: skip


class _Feed:
    """What a :class:`~graphquant.keras.Quantize` layer calls while calibrating (``update(layer, x)``)."""

    def __init__(self, observer: Any):
        self.observer = observer

    def update(self, layer: Any, x: Any) -> Any:
        return self.observer.update(x)


def calibrate_keras(
    model: "keras.Model", data: DataLike, method: str, *, percentile: float = 99.99, batch_size: int = 32,
    steps: Optional[int] = None, what: str = "calibration_data", verbose: Optional[bool] = None,
) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:  # fmt: skip
    """Calibrate ``model``'s learned-range Quantize layers on ``data`` (their inputs feed engine
    observers instead of rounding); ``{layer name: (lo, hi)}`` as ``method`` computes them."""
    import keras
    import tensorflow as tf

    from . import calibration as engine
    from .keras.layers import Quantize, unfolded

    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras.Model, got {type(model).__name__}")
    engine.check_method(method, percentile, what="method" if what == "data" else "calibration_method")
    layers = [l for l in _all_layers(model) if isinstance(l, Quantize) and l.learned]
    if not layers:
        log.warning("calibrate: model %r has no Quantize layer with a learned range", model.name)
        return {}
    observers = {}
    for l in layers:
        channels = 1 if l.format.axis is None else int(l.range.shape[1])
        observers[l.name] = engine.Observer(l.name, l.format.axis, channels, histogram=method != "minmax")
    for l in layers:
        l.observe_with(_Feed(observers[l.name]))
    n = 0
    try:
        # no autograph: Keras 3 layers need none, and converting graphquant's observer code
        # (outside autograph's Keras/TF allowlist) cost seconds per process
        step = tf.function(lambda b: model(b, training=False), reduce_retracing=True, autograph=False)
        batches = calibration_batches(data, len(model.inputs or [None]), batch_size, steps, what, _keras_check(model, what))
        with unfolded():  # observe what eager inference computes, with fold_batchnorm on or off
            for batch in engine.progress(batches, "calibrating", verbose):
                engine.call_unoptimized(step.get_concrete_function(batch), batch)
                n += 1
        out = engine.ranges_of(observers, method, {l.name: l.format for l in layers}, percentile, what)
    finally:
        for l in layers:
            l.observe_with(None)
        engine.release_all(list(observers.values()))
    for l in layers:
        if l.name in out:
            l.set_range(*out[l.name])
    log.info("calibrate: %d ranges set from %d batches (%s)", len(out), n, method)
    return out


def _all_layers(model: Any) -> Iterable[Any]:
    seen = set()
    stack = [model]
    while stack:
        m = stack.pop()
        for l in getattr(m, "layers", []):
            if id(l) in seen:
                continue
            seen.add(id(l))
            yield l
            if hasattr(l, "layers"):
                stack.append(l)
