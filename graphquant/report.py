"""The comparison report: per-point, per-output and per-weight errors, as a table, data and a chart.

The data classes (:class:`CompareReport`, :class:`PointError`, :class:`OutputError`,
:class:`WeightError`) and the streaming statistics both front ends feed
(:class:`Stats`, :func:`error_sums`). The measurements themselves are taken by
:mod:`graphquant.keras.compare` (Keras models) and :mod:`graphquant.graph.compare`
(SavedModels); :func:`graphquant.compare.compare` picks one.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ._table import render_table

__all__ = ["CompareReport", "PointError", "OutputError", "WeightError"]


# --------------------------------------------------------------------------- statistics
class Stats:
    """Streaming error statistics of ``out`` against ``ref`` (plus the rounding's own input)."""

    def __init__(self) -> None:
        self.n = 0
        self.sig = 0.0  # Σ ref²
        self.err = 0.0  # Σ (out − ref)²
        self.abs = 0.0  # Σ |out − ref|
        self.max = 0.0
        self.local_sig = 0.0  # Σ inp²
        self.local_err = 0.0  # Σ (out − inp)²
        self.clipped = 0
        self.clip_known = True
        self.agree = 0
        self.rows = 0

    def update(self, ref: np.ndarray, out: np.ndarray, inp: Optional[np.ndarray] = None, rng: Any = None,
               axis: Optional[int] = None) -> None:
        ref = np.asarray(ref, np.float64)
        out = np.asarray(out, np.float64)
        if ref.shape != out.shape:
            raise ValueError(f"shape mismatch between the float and the quantized tensor: {ref.shape} vs {out.shape}")
        d = out - ref
        fin = np.isfinite(d)
        self.n += ref.size
        self.sig += float(np.sum(np.square(ref[np.isfinite(ref)])))
        self.err += float(np.sum(np.square(np.where(fin, d, 0.0)))) + (math.inf if not fin.all() else 0.0)
        ad = np.abs(d)
        self.abs += float(np.sum(ad))
        if ad.size:
            self.max = max(self.max, float(np.max(ad)))
        if inp is not None:
            inp = np.asarray(inp, np.float64)
            self.local_sig += float(np.sum(np.square(inp[np.isfinite(inp)])))
            dl = out - inp
            self.local_err += float(np.sum(np.square(np.where(np.isfinite(dl), dl, 0.0))))
            if not np.isfinite(dl).all():
                self.local_err = math.inf
            if rng is None:
                self.clip_known = False
            else:
                lo, hi = (np.asarray(r, np.float64) for r in rng)
                if axis is not None and lo.ndim == 1 and lo.size > 1:
                    shape = [1] * inp.ndim
                    shape[axis % inp.ndim] = lo.size
                    lo, hi = lo.reshape(shape), hi.reshape(shape)
                self.clipped += int(np.sum((inp < lo) | (inp > hi)))
        if ref.ndim == 2 and ref.shape[-1] > 1:
            self.agree += int(np.sum(np.argmax(ref, -1) == np.argmax(out, -1)))
            self.rows += ref.shape[0]

    def add(self, v: Any, local: bool = False, clip_known: bool = True) -> None:
        """Add the sums of one batch computed in TensorFlow by :func:`error_sums`."""
        (n, sig, err, ab, mx, local_sig, local_err, clipped, agree, rows, bad, bad_local) = (float(t) for t in v)
        self.n += int(n)
        self.sig += sig
        self.err += err + (math.inf if bad else 0.0)
        self.abs += ab
        if n:
            self.max = max(self.max, mx)
        if local:
            self.local_sig += local_sig
            self.local_err = math.inf if bad_local else self.local_err + local_err
            if clip_known:
                self.clipped += int(clipped)
            else:
                self.clip_known = False
        self.agree += int(agree)
        self.rows += int(rows)

    @staticmethod
    def _db(sig: float, err: float) -> float:
        if err == 0.0:
            return math.inf
        if not math.isfinite(err):
            return -math.inf
        return 10.0 * math.log10(max(sig, 1e-300) / err)

    @property
    def sqnr_db(self) -> float:
        return self._db(self.sig, self.err)

    @property
    def local_sqnr_db(self) -> float:
        return self._db(self.local_sig, self.local_err)


def error_sums(ref: Any, out: Any, inp: Any = None, rng: Any = None, axis: Optional[int] = None) -> Any:
    """The sums :meth:`Stats.update` keeps, of one batch, in TensorFlow (float64): a vector of 12
    numbers, so only these leave the graph (never the tensors).

    Each sum of squares is a plain ``reduce_sum(square(x))``, without a mask: a non-finite
    value makes the error sums non-finite, and they are then reported as ``bad`` (the error is
    infinite, as :meth:`Stats.update` makes it). Every reported number is the one the masked sums
    would give: the error is finite only where every ``out - ref`` is, hence every ``ref`` (``inf -
    inf`` and ``x - nan`` are not finite), so the signal sum is then the same; likewise for ``inp``."""
    import tensorflow as tf

    f64 = tf.float64
    ref, out = tf.cast(ref, f64), tf.cast(out, f64)
    zero = tf.constant(0.0, f64)

    def sum_sq(x: Any) -> Any:  # (not EuclideanNorm: XLA has no kernel for it, and observers run in XLA functions)
        return tf.reduce_sum(tf.square(x))

    def finite_or_bad(total: Any) -> Tuple[Any, Any]:
        ok = tf.math.is_finite(total)
        return tf.where(ok, total, zero), tf.cast(tf.logical_not(ok), f64)

    n = tf.cast(tf.size(ref), f64)
    d = out - ref
    sig = sum_sq(ref)
    err, bad = finite_or_bad(sum_sq(d))
    ad = tf.abs(d)
    ab = tf.reduce_sum(ad)
    mx = tf.reduce_max(ad) if d.shape.num_elements() != 0 else zero
    local_sig = local_err = clipped = bad_local = zero
    if inp is not None:
        inp = tf.cast(inp, f64)
        local_sig = sum_sq(inp)
        local_err, bad_local = finite_or_bad(sum_sq(out - inp))
        if rng is not None:
            lo, hi = (np.asarray(r, np.float64) for r in rng)
            if axis is not None and lo.ndim == 1 and lo.size > 1:
                rank = inp.shape.rank
                shape = [1] * rank
                shape[axis % rank] = lo.size
                lo, hi = lo.reshape(shape), hi.reshape(shape)
            clipped = tf.reduce_sum(tf.cast((inp < lo) | (inp > hi), f64))
    agree = rows = zero
    if ref.shape.rank == 2 and ref.shape[-1] is not None and ref.shape[-1] > 1:
        agree = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(ref, -1), tf.argmax(out, -1)), f64))
        rows = tf.cast(tf.shape(ref)[0], f64)
    return tf.stack([n, sig, err, ab, mx, local_sig, local_err, clipped, agree, rows, bad, bad_local])


# --------------------------------------------------------------------------- report
@dataclass
class PointError:
    """The error at one insertion point.

    Attributes:
        layer: where the rounding sits (the Keras layer it follows, with the
            nested model path; or the graph node it rounds).
        node: the inserted layer / graph node.
        format: the number format (``"?"`` when the graph does not say).
        rounding: the rounding mode applied (a Keras layer's inference rounding; for
            graphs, what the node records, ``None`` for older conversions).
        sqnr_db: SQNR of the rounded tensor against the float model's tensor (dB).
        local_sqnr_db: SQNR of the rounding alone (its output against its input).
        mean_abs, max_abs: absolute error against the float model's tensor.
        clipped: fraction of the rounding's inputs outside the format's range
            (``None`` when unknown).
        size: number of values compared.
    """

    layer: str
    node: str
    format: str
    sqnr_db: float
    local_sqnr_db: float
    mean_abs: float
    max_abs: float
    clipped: Optional[float]
    size: int
    rounding: Optional[str] = None


@dataclass
class OutputError:
    """The error of one final output (``top1_agreement`` for ``[batch, classes]`` outputs)."""

    name: str
    sqnr_db: float
    mean_abs: float
    max_abs: float
    top1_agreement: Optional[float]
    size: int


@dataclass
class WeightError:
    """The rounding error of one weight tensor (the float model's against the quantized model's).

    Attributes:
        layer: the layer (Keras) or checkpoint variable (SavedModel) holding it.
        weight: the weight's slot (``"kernel"``, ``"depthwise_kernel"``; the
            checkpoint key for a SavedModel).
        format: its number format (``"?"`` for a SavedModel checkpoint).
        sqnr_db: SQNR of the rounded weight against the float one (dB).
        zeroed: fraction of its nonzero values that round to zero.
        max_abs: largest absolute change.
        size: number of values.
    """

    layer: str
    weight: str
    format: str
    sqnr_db: float
    zeroed: float
    max_abs: float
    size: int


def weight_error(layer: str, weight: str, fmt: str, w: Any, q: Any) -> WeightError:
    w = np.asarray(w, np.float64)
    q = np.asarray(q, np.float64)
    d = q - w
    fin = np.isfinite(d)
    err = float(np.sum(np.square(np.where(fin, d, 0.0)))) + (math.inf if not fin.all() else 0.0)
    sig = float(np.sum(np.square(w[np.isfinite(w)])))
    nonzero = w != 0
    n = int(nonzero.sum())
    zeroed = float(np.sum(nonzero & (q == 0))) / n if n else 0.0
    return WeightError(layer, weight, fmt, Stats._db(sig, err), zeroed,
                       float(np.max(np.abs(np.where(fin, d, 0.0)))) if d.size else 0.0, int(w.size))



def _num(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else ("-inf" if v < 0 else "nan")
    return v


@dataclass
class CompareReport:
    """Result of :func:`compare`: one :class:`PointError` per insertion point, one
    :class:`OutputError` per model output, one :class:`WeightError` per rounded weight
    (Keras: each :class:`~graphquant.keras.QuantizeWeights` slot; SavedModel: each
    checkpoint variable the conversion changed).

    ``str(report)`` is a table; :meth:`to_dict` / :meth:`to_json` give the data;
    :meth:`plot` draws SQNR per layer; :meth:`worst` lists the lowest-SQNR points.
    """

    points: List[PointError]
    outputs: List[OutputError]
    samples: int
    batches: int
    seconds: float
    kind: str = "keras"
    float_model: str = ""
    quantized_model: str = ""
    notes: List[str] = field(default_factory=list)
    weights: List[WeightError] = field(default_factory=list)

    def worst(self, n: int = 3) -> List[PointError]:
        """The ``n`` points with the lowest SQNR against the float model."""
        return sorted(self.points, key=lambda p: p.sqnr_db)[:n]

    def to_dict(self) -> Dict[str, Any]:
        """Plain data (infinite SQNR as the string ``"inf"``, so it is valid JSON)."""
        return {
            "kind": self.kind,
            "float_model": self.float_model,
            "quantized_model": self.quantized_model,
            "samples": self.samples,
            "batches": self.batches,
            "seconds": round(self.seconds, 4),
            "points": [{k: _num(v) for k, v in asdict(p).items()} for p in self.points],
            "outputs": [{k: _num(v) for k, v in asdict(o).items()} for o in self.outputs],
            "weights": [{k: _num(v) for k, v in asdict(w).items()} for w in self.weights],
            "notes": list(self.notes),
        }

    def to_json(self, **kw: Any) -> str:
        """:meth:`to_dict` as a JSON string (``kw`` goes to ``json.dumps``)."""
        return json.dumps(self.to_dict(), **kw)

    def table(self) -> str:
        """The report as a text table."""

        def db(v: float) -> str:
            return "inf" if v == math.inf else ("-inf" if v == -math.inf else f"{v:.1f}")

        def clip(v: Optional[float]) -> str:
            return "-" if v is None else f"{100.0 * v:.2f}%"

        head = ("#", "layer", "format", "SQNR dB", "own dB", "mean |err|", "max |err|", "clipped")
        rows = [
            (str(i), p.layer, p.format + (f" ({p.rounding})" if p.rounding not in (None, "nearest") else ""), db(p.sqnr_db), db(p.local_sqnr_db), f"{p.mean_abs:.3g}", f"{p.max_abs:.3g}",
             clip(p.clipped))
            for i, p in enumerate(self.points, 1)
        ]  # fmt: skip
        out_head = ("output", "SQNR dB", "mean |err|", "max |err|", "top-1 agreement")
        out_rows = [
            (o.name, db(o.sqnr_db), f"{o.mean_abs:.3g}", f"{o.max_abs:.3g}",
             "-" if o.top1_agreement is None else f"{100.0 * o.top1_agreement:.1f}%")
            for o in self.outputs
        ]  # fmt: skip

        def render(header: Sequence[str], body: List[Sequence[str]], right_from: int) -> List[str]:
            right = {i for i in range(len(header)) if i >= right_from or i == 0 and header[0] == "#"}
            return render_table(header, body, right=right)

        lines = [f"per-layer error on {self.samples} samples ({self.kind}; SQNR against the float model, "
                 f"'own' = this rounding alone)"]  # fmt: skip
        lines += render(head, rows, 3) if rows else ["(no insertion points)"]
        lines.append("")
        lines += render(out_head, out_rows, 1)
        if self.weights:
            w_head = ("weight", "format", "SQNR dB", "zeroed", "max |err|")
            w_rows = [
                (f"{w.layer}.{w.weight}" if w.format != "?" else w.layer, w.format, db(w.sqnr_db),
                 f"{100.0 * w.zeroed:.1f}%" + (" <- wiped out" if w.zeroed > 0.5 else ""), f"{w.max_abs:.3g}")
                for w in self.weights
            ]  # fmt: skip
            lines.append("")
            lines += render(w_head, w_rows, 2)
        for n in self.notes:
            lines.append(f"note: {n}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # IPython
        p.text(self.table())

    def plot(self, path: Union[str, "os.PathLike[str]"], *, title: Optional[str] = None) -> Path:
        """Draw SQNR per insertion point as a bar chart and save it to ``path`` (PNG, SVG, PDF...).

        Bars are the SQNR against the float model (the lowest ones, where the
        error is largest, in a darker colour); dots mark each rounding's own
        SQNR. Needs matplotlib (``pip install matplotlib``); uses the Agg backend.
        """
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise ImportError(
                "CompareReport.plot needs matplotlib: pip install matplotlib (the 'examples' extra includes it)"
            ) from None
        if not self.points:
            raise ValueError("the report has no insertion points to plot")
        path = Path(path)
        labels = [p.layer if len(p.layer) <= 40 else "…" + p.layer[-39:] for p in self.points]
        finite = [p.sqnr_db for p in self.points if math.isfinite(p.sqnr_db)]
        cap = (max(finite) + 10.0) if finite else 100.0
        vals = [min(p.sqnr_db, cap) if p.sqnr_db != -math.inf else 0.0 for p in self.points]
        own = [min(p.local_sqnr_db, cap) if math.isfinite(p.local_sqnr_db) else (cap if p.local_sqnr_db > 0 else 0.0)
               for p in self.points]  # fmt: skip
        worst = {id(p) for p in self.worst(max(1, len(self.points) // 10))}
        colors = ["#c0392b" if id(p) in worst else "#2e86c1" for p in self.points]
        n = len(self.points)
        fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * n + 2.0), 4.5))
        xs = np.arange(n)
        ax.bar(xs, vals, color=colors, label="SQNR vs float model")
        ax.plot(xs, own, "k.", label="this rounding alone")
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, rotation=90, fontsize=7 if n > 20 else 8)
        ax.set_ylabel("SQNR (dB)")
        ax.set_title(title or f"per-layer SQNR ({self.samples} samples)")
        ax.legend(loc="best", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def point_error(layer: str, node: str, fmt: str, s: Stats, rounding: Optional[str] = None) -> PointError:
    return PointError(
        layer=layer, node=node, format=fmt, sqnr_db=s.sqnr_db, local_sqnr_db=s.local_sqnr_db,
        mean_abs=s.abs / max(s.n, 1), max_abs=s.max, clipped=(s.clipped / max(s.n, 1)) if s.clip_known else None,
        size=s.n, rounding=rounding,
    )  # fmt: skip


def output_error(name: str, s: Stats) -> OutputError:
    return OutputError(name, s.sqnr_db, s.abs / max(s.n, 1), s.max, (s.agree / s.rows) if s.rows else None, s.n)
