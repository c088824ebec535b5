"""Range tracking and calibration.

Trackers are plain numpy objects (usable by any front end): feed them
batches with :meth:`update`, read ``(lo, hi)`` with :meth:`result`.

* :class:`MinMaxTracker` -- running min and max.
* :class:`PercentileTracker` -- the mean over batches of the batch
  percentiles ``(100 - p, p)`` (robust to outliers; p=99.99 by default).
* :class:`EMATracker` -- exponential moving average of batch min/max (what a
  :class:`graphquant.keras.Quantize` layer does in-graph while training).

All trackers optionally work per channel (``axis=``) and always include zero
in the range (the affine grid represents zero exactly).

:func:`calibrate` sets the learned ranges of a quantized Keras model from data.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, Iterator, Optional, Tuple

import numpy as np

__all__ = ["MinMaxTracker", "PercentileTracker", "EMATracker", "make_tracker", "calibrate", "iter_batches"]

log = logging.getLogger(__name__)


def _reduce_axes(x: np.ndarray, axis: Optional[int]) -> Tuple[np.ndarray, Optional[int]]:
    if axis is None:
        return x.reshape(-1), None
    ax = axis % x.ndim
    return np.moveaxis(x, ax, -1).reshape(-1, x.shape[ax]), 0


class _Tracker:
    def __init__(self, axis: Optional[int] = None):
        self.axis = axis
        self.count = 0

    def result(self) -> Tuple[np.ndarray, np.ndarray]:
        if self.count == 0:
            raise ValueError("no data seen: the tracker was never updated")
        lo, hi = self._result()
        lo = np.minimum(lo, 0.0).astype(np.float32)
        hi = np.maximum(hi, 0.0).astype(np.float32)
        hi = np.where(hi - lo < 1e-8, lo + 1e-8, hi).astype(np.float32)
        return lo, hi


class MinMaxTracker(_Tracker):
    """Running min/max."""

    def __init__(self, axis: Optional[int] = None):
        super().__init__(axis)
        self.lo: Any = None
        self.hi: Any = None

    def update(self, x: Any) -> None:
        flat, red = _reduce_axes(np.asarray(x, dtype=np.float32), self.axis)
        flat = flat[np.isfinite(flat).all(axis=-1)] if red is not None else flat[np.isfinite(flat)]
        if flat.size == 0:
            return
        lo, hi = flat.min(axis=red), flat.max(axis=red)
        self.lo = lo if self.lo is None else np.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else np.maximum(self.hi, hi)
        self.count += 1

    def _result(self):
        return self.lo, self.hi


class PercentileTracker(_Tracker):
    """Mean over batches of the batch percentiles ``100 - p`` and ``p``."""

    def __init__(self, percentile: float = 99.99, axis: Optional[int] = None):
        if not isinstance(percentile, (int, float)) or not 50.0 < float(percentile) <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile!r}")
        super().__init__(axis)
        self.percentile = float(percentile)
        self.lo_sum: Any = 0.0
        self.hi_sum: Any = 0.0

    def update(self, x: Any) -> None:
        flat, red = _reduce_axes(np.asarray(x, dtype=np.float32), self.axis)
        if flat.size == 0:
            return
        lo, hi = np.nanpercentile(flat, [100.0 - self.percentile, self.percentile], axis=red)
        self.lo_sum = self.lo_sum + lo
        self.hi_sum = self.hi_sum + hi
        self.count += 1

    def _result(self):
        return self.lo_sum / self.count, self.hi_sum / self.count


class EMATracker(_Tracker):
    """Exponential moving average of batch min/max; the first batch sets it."""

    def __init__(self, momentum: float = 0.999, axis: Optional[int] = None):
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        super().__init__(axis)
        self.momentum = float(momentum)
        self.lo: Any = None
        self.hi: Any = None

    def update(self, x: Any) -> None:
        flat, red = _reduce_axes(np.asarray(x, dtype=np.float32), self.axis)
        if flat.size == 0:
            return
        lo, hi = flat.min(axis=red), flat.max(axis=red)
        m = self.momentum
        self.lo = lo if self.lo is None else m * self.lo + (1 - m) * lo
        self.hi = hi if self.hi is None else m * self.hi + (1 - m) * hi
        self.count += 1

    def _result(self):
        return self.lo, self.hi


def make_tracker(method: str, axis: Optional[int] = None, percentile: float = 99.99) -> _Tracker:
    """A tracker by name: ``"minmax"``, ``"percentile"`` or ``"ema"``."""
    if method == "minmax":
        return MinMaxTracker(axis)
    if method == "percentile":
        return PercentileTracker(percentile, axis)
    if method == "ema":
        return EMATracker(axis=axis)
    raise ValueError(f"method must be 'minmax', 'percentile' or 'ema', got {method!r}")


def iter_batches(
    data: Any, n_inputs: int = 1, batch_size: int = 32, steps: Optional[int] = None, what: str = "calibration data"
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


class _Calibrator:
    def __init__(self, method: str, percentile: float):
        self.method = method
        self.percentile = percentile
        self.trackers: Dict[int, Any] = {}

    def update(self, layer: Any, x: Any) -> None:
        t = self.trackers.get(id(layer))
        if t is None:
            t = self.trackers[id(layer)] = (layer, make_tracker(self.method, layer.format.axis, self.percentile))
        t[1].update(np.asarray(x))


def calibrate(
    model: Any,
    data: Any,
    method: str = "minmax",
    *,
    percentile: float = 99.99,
    batch_size: int = 32,
    steps: Optional[int] = None,
) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Set the learned ranges of every :class:`graphquant.keras.Quantize` layer from data.

    The model runs eagerly in inference mode with rounding switched off (so
    every layer sees float activations); each learned-range layer tracks its
    input, then its range is set and frozen.

    Args:
        model: a model returned by :func:`graphquant.quantize_model`.
        data: a numpy array (batched by ``batch_size``), a ``tf.data.Dataset``,
            or an iterable of batches (``(x, y)`` pairs: ``x`` is used).
        method: ``"minmax"`` or ``"percentile"``.
        percentile: for ``"percentile"``: the upper percentile (lower is ``100 - p``).
        steps: at most this many batches.

    Returns:
        ``{layer name: (lo, hi)}`` for the layers set.

    Raises:
        TypeError: ``model`` is not a Keras model or ``data`` is not usable.
        ValueError: bad ``method``/``percentile``, or no data.
    """
    import keras

    from .keras.layers import Quantize

    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras.Model, got {type(model).__name__}")
    make_tracker(method, None, percentile)  # validates
    layers = [l for l in _all_layers(model) if isinstance(l, Quantize) and l.learned]
    if not layers:
        log.warning("calibrate: model %r has no Quantize layer with a learned range", model.name)
        return {}
    cal = _Calibrator(method, percentile)
    for l in layers:
        l._calibrator = cal
    n = 0
    try:
        for batch in iter_batches(data, len(model.inputs or [None]), batch_size, steps):
            model(batch, training=False)
            n += 1
    finally:
        for l in layers:
            l._calibrator = None
    if n == 0:
        raise ValueError("calibration data is empty")
    out: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
    for l in layers:
        entry = cal.trackers.get(id(l))
        if entry is None:
            log.warning("calibrate: layer %s saw no data", l.name)
            continue
        lo, hi = entry[1].result()
        l.set_range(lo, hi)
        out[l.name] = (lo, hi)
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
