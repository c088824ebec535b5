"""Per-layer error report: where in the network does the quantization error come from?

:func:`compare` runs a float model and its quantized copy on the same batches
and measures, at every insertion point (every :class:`graphquant.keras.Quantize`
layer of a Keras model, every ``graphquant/q...`` node of a converted
SavedModel):

* ``sqnr_db``: signal-to-quantization-noise ratio of the rounded tensor
  against the float model's tensor at the same place, in dB
  (``10·log10(Σ ref² / Σ (q − ref)²)``); this is the error accumulated up
  to that point;
* ``local_sqnr_db``: the same for this rounding alone (its output against
  its own input), i.e. the noise this point adds;
* ``mean_abs`` / ``max_abs``: absolute error against the float tensor;
* ``clipped``: the fraction of the rounding's inputs outside the format's
  representable range, ``[smallest, largest]`` grid value, where rounding
  saturates and the straight-through gradient is zero (``None`` where the
  graph does not tell the range);

plus the error of every final output (and top-1 agreement for classifier-like
outputs), and of every rounded weight (:class:`WeightError`: its SQNR and the
fraction of its nonzero values rounded to zero, so a layer whose weights were
wiped out stands out). The report prints as a table, converts to a dict / JSON, and
``report.plot(path)`` draws SQNR per layer as a bar chart (matplotlib).

The report itself (data classes, table, chart) lives in :mod:`graphquant.report`;
the measurements in :mod:`graphquant.keras.compare` and :mod:`graphquant.graph.compare`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

from .report import CompareReport, OutputError, PointError, WeightError
from .types import DataLike, ModelLike

log = logging.getLogger(__name__)

__all__ = ["compare", "CompareReport", "PointError", "OutputError", "WeightError"]


def compare(
    model: ModelLike,
    quantized: ModelLike,
    data: DataLike,
    *,
    batch_size: int = 32,
    steps: Optional[int] = None,
    signature: str = "serving_default",
    verbose: Optional[bool] = None,
) -> CompareReport:
    """Run a float model and its quantized copy on the same batches; report the error per insertion point.

    Args:
        model: the float model: a Functional/Sequential ``keras.Model``, a
            ``.keras`` file, or a SavedModel folder.
        quantized: its quantized copy: from :func:`graphquant.quantize_model`
            (a model or a ``.keras`` file) or from
            :func:`graphquant.graph.convert_saved_model` (a SavedModel folder).
        data: model inputs: a numpy array (batched by ``batch_size``), a dict
            of arrays keyed by input name, a ``tf.data.Dataset`` or an iterable
            of batches (``(x, y)`` pairs use ``x``).
        batch_size: batch size for array data.
        steps: at most this many batches.
        signature: the SavedModel signature to run.
        verbose: show a progress bar (``None``: when stderr is a terminal and
            the comparison runs longer than a second).

    Returns:
        A :class:`CompareReport`; ``print(report)`` shows the table and
        ``report.plot("sqnr.png")`` the chart.

    Raises:
        TypeError: a model of the wrong kind, or both kinds mixed.
        ValueError: bad paths or data, models that do not match, no data.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise ValueError(f"steps must be a positive int or None, got {steps!r}")
    if data is None:
        raise ValueError("data: give the inputs to compare on (an array, a dict of arrays, a dataset or batches)")
    f, q = _resolve(model, "model"), _resolve(quantized, "quantized")
    if isinstance(f, Path) != isinstance(q, Path):
        raise TypeError("model and quantized must both be Keras models or both be SavedModels")
    if isinstance(f, Path):
        from .graph.compare import compare_saved_models

        report = compare_saved_models(f, q, data, signature, batch_size, steps, verbose)
    else:
        from .keras.compare import compare_keras

        report = compare_keras(f, q, data, batch_size, steps, verbose)
    log.info("compare: %d points, %d samples in %.2fs", len(report.points), report.samples, report.seconds)
    return report


def _resolve(m: Any, what: str) -> Any:
    """The Keras model (a ``.keras``/``.h5`` file loaded) or the SavedModel folder (a ``Path``) that ``m`` names;
    ``what`` names the argument in errors."""
    import keras

    if isinstance(m, keras.Model):
        return m
    if isinstance(m, (str, os.PathLike)):
        p = Path(m)
        if not p.exists():
            raise ValueError(f"{what}: {p}: no such file or directory")
        if p.is_dir():
            from .graph.saved_model import is_saved_model

            if not is_saved_model(p):
                raise ValueError(f"{what}: {p}: not a SavedModel (no saved_model.pb)")
            return p
        if p.suffix in (".keras", ".h5"):
            from .keras.loading import load_keras_file

            return load_keras_file(p, what)
        raise ValueError(f"{what}: {p}: expected a SavedModel folder or a .keras/.h5 file")
    raise TypeError(f"{what} must be a keras.Model, a .keras file or a SavedModel folder, got {type(m).__name__}")
