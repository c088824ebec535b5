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
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ._table import render_table

log = logging.getLogger(__name__)

__all__ = ["compare", "CompareReport", "PointError", "OutputError", "WeightError"]


# --------------------------------------------------------------------------- statistics
class _Stats:
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
        """Add the sums of one batch computed in TensorFlow by :func:`_error_sums`."""
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


def _error_sums(ref: Any, out: Any, inp: Any = None, rng: Any = None, axis: Optional[int] = None) -> Any:
    """The sums :meth:`_Stats.update` keeps, of one batch, in TensorFlow (float64): a vector of 12
    numbers, so only these leave the graph (never the tensors)."""
    import tensorflow as tf

    f64 = tf.float64
    ref, out = tf.cast(ref, f64), tf.cast(out, f64)
    zero = tf.constant(0.0, f64)
    d = out - ref
    fin = tf.math.is_finite(d)
    n = tf.cast(tf.size(ref), f64)
    sig = tf.reduce_sum(tf.where(tf.math.is_finite(ref), tf.square(ref), zero))
    err = tf.reduce_sum(tf.where(fin, tf.square(d), zero))
    bad = tf.cast(tf.logical_not(tf.reduce_all(fin)), f64)
    ad = tf.abs(d)
    ab = tf.reduce_sum(ad)
    mx = tf.reduce_max(ad) if d.shape.num_elements() != 0 else zero
    local_sig = local_err = clipped = bad_local = zero
    if inp is not None:
        inp = tf.cast(inp, f64)
        local_sig = tf.reduce_sum(tf.where(tf.math.is_finite(inp), tf.square(inp), zero))
        dl = out - inp
        fl = tf.math.is_finite(dl)
        local_err = tf.reduce_sum(tf.where(fl, tf.square(dl), zero))
        bad_local = tf.cast(tf.logical_not(tf.reduce_all(fl)), f64)
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


def _weight_error(layer: str, weight: str, fmt: str, w: Any, q: Any) -> WeightError:
    w = np.asarray(w, np.float64)
    q = np.asarray(q, np.float64)
    d = q - w
    fin = np.isfinite(d)
    err = float(np.sum(np.square(np.where(fin, d, 0.0)))) + (math.inf if not fin.all() else 0.0)
    sig = float(np.sum(np.square(w[np.isfinite(w)])))
    nonzero = w != 0
    n = int(nonzero.sum())
    zeroed = float(np.sum(nonzero & (q == 0))) / n if n else 0.0
    return WeightError(layer, weight, fmt, _Stats._db(sig, err), zeroed,
                       float(np.max(np.abs(np.where(fin, d, 0.0)))) if d.size else 0.0, int(w.size))


def _keras_weight_errors(quantized: Any) -> List[WeightError]:
    """One :class:`WeightError` per weight that a :class:`graphquant.keras.QuantizeWeights` layer rounds
    (as inference rounds it)."""
    from .keras.layers import QuantizeWeights
    from .rounding import use_xla

    out = []
    for layer in quantized._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, QuantizeWeights):
            with use_xla(False):  # once per weight: compiling a kernel per shape would cost more
                rounded = layer.rounded_weights()
            out += [_weight_error(layer.name, slot, str(fmt), w, q) for slot, w, q, fmt in rounded]
    return out


def _checkpoint_weight_errors(src: Path, dst: Path) -> List[WeightError]:
    """One :class:`WeightError` per float checkpoint variable that the conversion changed
    (the weights it rounded; those that round exactly onto their format are not told apart)."""
    import tensorflow as tf

    prefix = lambda p: str(p / "variables" / "variables")
    if not (src / "variables" / "variables.index").is_file() or not (dst / "variables" / "variables.index").is_file():
        return []
    from .graph.saved_model import _load_object_keys, read_saved_model

    names: Dict[str, str] = {}  # checkpoint key -> the variable's own name (e.g. "c1/kernel"), when recorded
    try:
        og = read_saved_model(src).meta_graphs[0].object_graph_def
        for i, key in _load_object_keys(src).items():
            if i < len(og.nodes) and og.nodes[i].WhichOneof("kind") == "variable" and og.nodes[i].variable.name:
                names[key] = og.nodes[i].variable.name
    except Exception:  # noqa: BLE001 - names are a convenience; the keys still say which variable
        log.debug("compare: no variable names in %s", src, exc_info=True)
    rf, rq = tf.train.load_checkpoint(prefix(src)), tf.train.load_checkpoint(prefix(dst))
    qtypes = rq.get_variable_to_dtype_map()
    out = []
    for key, dt in sorted(rf.get_variable_to_dtype_map().items()):
        if not dt.is_floating or key not in qtypes or key.startswith("_CHECKPOINTABLE_OBJECT_GRAPH"):
            continue
        w, q = rf.get_tensor(key), rq.get_tensor(key)
        if np.shape(w) != np.shape(q) or np.array_equal(w, q, equal_nan=True):
            continue
        out.append(_weight_error(names.get(key, key.split("/.ATTRIBUTES")[0]), key, "?", w, q))
    return out


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


# --------------------------------------------------------------------------- Keras
def _graph_of(model: Any) -> Any:
    """The Functional graph behind a model (a built Sequential keeps one in ``_functional``)."""
    import keras

    if isinstance(model, keras.Sequential):
        fn = getattr(model, "_functional", None)
        if fn is None:
            raise ValueError(f"Sequential model {model.name!r} is not built; call it on data or give it an Input")
        return fn
    return model


def _calls(model: Any) -> Dict[Tuple[str, int], Any]:
    """``{(layer name, call index): keras Node}`` for the calls inside ``model``'s own graph."""
    g = _graph_of(model)
    out: Dict[Tuple[str, int], Any] = {}
    counts: Dict[int, int] = {}
    for depth in sorted(g._nodes_by_depth, reverse=True):
        for node in g._nodes_by_depth[depth]:
            op = node.operation
            if op is None or node.is_input:
                continue
            k = counts.get(id(op), 0)
            counts[id(op)] = k + 1
            out[(op.name, k)] = node
    return out


def _is_graph_model(m: Any) -> bool:
    import keras

    return isinstance(m, keras.Model) and (isinstance(m, keras.Sequential) or hasattr(m, "_nodes_by_depth"))


Site = Tuple[Tuple[Tuple[str, int], ...], str, int, str, int]  # (scope, layer, call, "input"/"output", tensor index)


def _quantize_sites(model: Any, scope: Tuple[Tuple[str, int], ...] = ()) -> List[Tuple[Any, Site, Site]]:
    """``(Quantize layer, its input site, its producer's output site)`` for every Quantize call (recursive)."""
    from .keras.layers import Quantize

    calls = _calls(model)
    key_of = {id(node): key for key, node in calls.items()}
    out: List[Tuple[Any, Site, Site]] = []
    for (name, k), node in calls.items():
        op = node.operation
        if isinstance(op, Quantize):
            hist = node.input_tensors[0]._keras_history
            src_node = hist.operation._inbound_nodes[hist.node_index]
            src_key = key_of.get(id(src_node))
            if src_key is None:  # fed directly by a model input
                src_site = None
            else:
                src_site = (scope, src_key[0], src_key[1], "output", hist.tensor_index)
            out.append((op, (scope, name, k, "io", 0), src_site))
        elif _is_graph_model(op):
            out.extend(_quantize_sites(op, scope + ((name, k),)))
    return out


def _tensors_at(model: Any, sites: Sequence[Site]) -> List[Any]:
    """The symbolic tensors at ``sites``, expressed in ``model``'s own graph (nested models probed)."""
    import keras

    calls = _calls(model)
    result: List[Any] = [None] * len(sites)
    nested: Dict[Tuple[str, int], List[Tuple[int, Site]]] = {}
    for i, (scope, name, k, io, idx) in enumerate(sites):
        if scope:
            nested.setdefault(scope[0], []).append((i, (scope[1:], name, k, io, idx)))
            continue
        node = calls.get((name, k))
        if node is None:
            raise ValueError(f"model {model.name!r} has no call {k} of a layer named {name!r}")
        result[i] = (node.input_tensors if io == "input" else node.output_tensors)[idx]
    for (cname, ck), items in nested.items():
        node = calls.get((cname, ck))
        if node is None or not _is_graph_model(node.operation):
            raise ValueError(f"model {model.name!r} has no nested model {cname!r} (call {ck})")
        child = node.operation
        inner = _tensors_at(child, [s for _, s in items])
        g = _graph_of(child)
        probe = keras.Model(g.input, inner)
        args = list(node.input_tensors)
        outs = probe(args[0] if len(args) == 1 else args)
        if not isinstance(outs, (list, tuple)):
            outs = [outs]
        for (i, _), t in zip(items, outs):
            result[i] = t
    return result


def _scope_label(scope: Tuple[Tuple[str, int], ...], name: str, k: int) -> str:
    parts = [n if c == 0 else f"{n}@{c}" for n, c in scope] + [name if k == 0 else f"{name}@{k}"]
    return "/".join(parts)


def _layer_range(layer: Any) -> Tuple[Any, Optional[int]]:
    """The clipping range ``(lo, hi)`` of a Quantize layer (``None`` if unknown) and its channel axis."""
    from .formats import Affine
    from .ops import representable_range

    fmt = layer.format
    if isinstance(fmt, Affine) and fmt.range is None:
        lo, hi = layer.get_range()
        return (np.asarray(lo), np.asarray(hi)), fmt.axis
    return representable_range(fmt), None


def _compare_keras(model: Any, quantized: Any, data: Any, batch_size: int, steps: Optional[int],
                   verbose: Optional[bool] = None) -> CompareReport:  # fmt: skip
    import keras

    from .ranges import iter_batches

    for what, m in (("model", model), ("quantized", quantized)):
        if not _is_graph_model(m):
            raise TypeError(f"{what} must be a Functional or Sequential keras.Model, got {type(m).__name__}")
    t0 = time.perf_counter()
    sites = _quantize_sites(quantized)
    notes: List[str] = []
    if not sites:
        notes.append("the quantized model has no graphquant.keras.Quantize layer")
    q_sites: List[Site] = []
    f_sites: List[Site] = []
    kept = []
    for layer, qsite, fsite in sites:
        scope, name, k, _, _ = qsite
        q_sites += [(scope, name, k, "input", 0), (scope, name, k, "output", 0)]
        if fsite is None:
            notes.append(f"{layer.name}: rounds a model input; compared against that input")
        kept.append((layer, qsite, fsite))
    qg, fg = _graph_of(quantized), _graph_of(model)
    q_tensors = _tensors_at(quantized, q_sites)
    f_tensors: List[Any] = []
    f_index: List[Optional[int]] = []
    for layer, qsite, fsite in kept:
        if fsite is None:
            f_index.append(None)
            continue
        f_index.append(len(f_sites))
        f_sites.append(fsite)
    try:
        f_tensors = _tensors_at(model, f_sites)
    except ValueError as e:
        raise ValueError(f"model does not match quantized (is quantized a quantize_model copy of model?): {e}") from None
    q_outs = list(keras.tree.flatten(qg.outputs))
    f_outs = list(keras.tree.flatten(fg.outputs))
    if len(q_outs) != len(f_outs):
        raise ValueError(f"model has {len(f_outs)} outputs, quantized has {len(q_outs)}")
    q_probe = keras.Model(qg.input, q_tensors + q_outs)
    f_probe = keras.Model(fg.input, f_tensors + f_outs)
    stats = [_Stats() for _ in kept]
    ostats = [_Stats() for _ in q_outs]
    ranges = [_layer_range(layer) for layer, _, _ in kept]
    n_in = len(qg.inputs)
    samples = batches = 0
    import tensorflow as tf

    from .calibration import progress

    nf = len(f_tensors)

    def sums(batch: Any) -> List[Any]:
        qv = _as_list(q_probe(batch, training=False))
        fv = _as_list(f_probe(batch, training=False))
        out = []
        for j, (layer, qsite, fsite) in enumerate(kept):
            q_in, q_out = qv[2 * j], qv[2 * j + 1]
            ref = q_in if f_index[j] is None else fv[f_index[j]]
            rng, axis = ranges[j]
            out.append(_error_sums(ref, q_out, inp=q_in, rng=rng, axis=axis))
        for j in range(len(q_outs)):
            out.append(_error_sums(fv[nf + j], qv[len(q_tensors) + j]))
        return out

    step = tf.function(sums, reduce_retracing=True, autograph=False)  # Keras 3 layers need no autograph
    from .keras.layers import unfolded

    for batch in progress(iter_batches(data, n_in, batch_size, steps, what="data"), "comparing", verbose):
        with unfolded():  # what eager inference computes, as calibration observes it
            vecs = [v.numpy() for v in step(batch)]
        first = keras.tree.flatten(batch)[0]
        samples += int(np.shape(first)[0])
        batches += 1
        for j in range(len(kept)):
            stats[j].add(vecs[j], local=True, clip_known=ranges[j][0] is not None)
        for j in range(len(q_outs)):
            ostats[j].add(vecs[len(kept) + j])
    if batches == 0:
        raise ValueError("data is empty: no batch to compare on")
    points = [
        _point(_scope_label(fsite[0], fsite[1], fsite[2]) if fsite else layer.name, layer.name, str(layer.format), s,
               rounding=layer.inference_rounding)  # compare runs inference
        for (layer, _, fsite), s in zip(kept, stats)
    ]  # fmt: skip
    out_names = [_output_name(t, i) for i, t in enumerate(f_outs)]
    outputs = [_output(n, s) for n, s in zip(out_names, ostats)]
    return CompareReport(points, outputs, samples, batches, time.perf_counter() - t0, "keras", model.name,
                         quantized.name, notes, _keras_weight_errors(quantized))  # fmt: skip


def _output_name(t: Any, i: int) -> str:
    hist = getattr(t, "_keras_history", None)
    return hist.operation.name if hist is not None else f"output_{i}"


def _as_list(v: Any) -> List[Any]:
    import keras

    return list(keras.tree.flatten(v))


def _point(layer: str, node: str, fmt: str, s: _Stats, rounding: Optional[str] = None) -> PointError:
    return PointError(
        layer=layer, node=node, format=fmt, sqnr_db=s.sqnr_db, local_sqnr_db=s.local_sqnr_db,
        mean_abs=s.abs / max(s.n, 1), max_abs=s.max, clipped=(s.clipped / max(s.n, 1)) if s.clip_known else None,
        size=s.n, rounding=rounding,
    )  # fmt: skip


def _output(name: str, s: _Stats) -> OutputError:
    return OutputError(name, s.sqnr_db, s.abs / max(s.n, 1), s.max, (s.agree / s.rows) if s.rows else None, s.n)


# --------------------------------------------------------------------------- SavedModel
_Q_PREFIX = "graphquant/q"


class _GraphObservers:
    """In-graph observers of a SavedModel comparison (no tensor leaves the graphs).

    In the float model, a stash after every point's source keeps the float tensor in a
    resource variable; in the quantized model a node taking the rounding's input and
    output adds :func:`_error_sums` against the stashed tensor into a variable. Between
    the two runs of a batch the stash is copied from the float model's variable to the
    quantized model's (``tf.saved_model.load`` gives each load its own variable names).
    """

    def __init__(self) -> None:
        self.prefix = f"graphquant_compare_{os.getpid()}_{next(_COMPARE_IDS)}"
        self.suffix = {"float": "", "quantized": ""}
        self._fns: Dict[Any, Any] = {}

    def name(self, i: int, key: str) -> str:
        return f"{self.prefix}/{i}/{key}"

    def _handle(self, side: str, i: int, key: str, dtype: Any, shape: Any = None) -> Any:
        import tensorflow as tf

        return tf.raw_ops.VarHandleOp(dtype=dtype, shape=shape if shape is not None else tf.TensorShape(None),
                                      shared_name=self.name(i, key) + self.suffix[side], container="")  # fmt: skip

    def stash_fn(self, dtype: Any) -> Any:
        import tensorflow as tf

        key = ("stash", dtype)
        if key not in self._fns:
            def stash(x, h_ref, h_cnt):
                tf.raw_ops.AssignVariableOp(resource=h_ref, value=x)
                cnt = tf.raw_ops.ReadVariableOp(resource=h_cnt, dtype=tf.int64)
                tf.raw_ops.AssignVariableOp(resource=h_cnt, value=cnt + 1)
                return tf.identity(x)

            self._fns[key] = tf.function(stash, autograph=False).get_concrete_function(
                tf.TensorSpec(None, dtype), tf.TensorSpec([], tf.resource), tf.TensorSpec([], tf.resource))
        return self._fns[key]

    def stats_fn(self, dtype: Any, has_ref: bool, rng: Any) -> Any:
        import tensorflow as tf

        key = ("stats", dtype, has_ref, None if rng is None else (float(rng[0]), float(rng[1])))
        if key not in self._fns:
            def stats(inp, out, *handles):
                if has_ref:
                    h_ref, h_sums, h_cnt = handles
                    ref = tf.raw_ops.ReadVariableOp(resource=h_ref, dtype=dtype)
                else:
                    h_sums, h_cnt = handles
                    ref = inp
                sums = tf.raw_ops.ReadVariableOp(resource=h_sums, dtype=tf.float64)
                tf.raw_ops.AssignVariableOp(resource=h_sums, value=sums + _error_sums(ref, out, inp=inp, rng=rng))
                cnt = tf.raw_ops.ReadVariableOp(resource=h_cnt, dtype=tf.int64)
                tf.raw_ops.AssignVariableOp(resource=h_cnt, value=cnt + 1)
                return tf.identity(out)

            specs = [tf.TensorSpec(None, dtype)] * 2 + [tf.TensorSpec([], tf.resource)] * (3 if has_ref else 2)
            self._fns[key] = tf.function(stats, autograph=False).get_concrete_function(*specs)
        return self._fns[key]

    def splice(self, ed: Any, sc: Any, cf: Any, inputs: List[str], handles: List[Tuple[str, Any, Any]],
               name: str) -> Any:  # fmt: skip
        """Add a call of ``cf`` on ``inputs`` plus the variables ``handles`` (name, dtype, shape), see
        :meth:`~graphquant.graph.rewrite.GraphEditor.resource_handle` (arguments inside XLA bodies)."""
        from tensorflow.core.framework import node_def_pb2, types_pb2

        fname = cf.function_def.signature.name
        lib = [f for f in cf.graph.as_graph_def().library.function if f.signature.name != fname]
        lib_name = ed.add_functions([cf.function_def] + lib, fname)
        base = sc.unique(name)
        refs = list(inputs)
        for k, (shared, dtype, shape) in enumerate(handles):
            refs.append(ed.resource_handle(sc.name, shared, dtype, shape, f"{base}/h{k}"))
        nd = node_def_pb2.NodeDef(name=base, op="StatefulPartitionedCall", input=refs)
        n_data = len(inputs)
        nd.attr["Tin"].list.type.extend([cf.inputs[i].dtype.as_datatype_enum for i in range(n_data)])
        nd.attr["Tin"].list.type.extend([types_pb2.DT_RESOURCE] * len(handles))
        nd.attr["Tout"].list.type.append(cf.outputs[0].dtype.as_datatype_enum)
        nd.attr["f"].func.name = lib_name
        nd.attr["config"].s = b""
        nd.attr["config_proto"].s = b""
        nd.attr["executor_type"].s = b""
        return sc.add(nd)

    def rebind(self, side: str, graph_defs: Sequence[Any]) -> None:
        """Learn the suffix ``tf.saved_model.load`` appended to this side's shared names."""
        start = self.prefix + "/"
        for gd in graph_defs:
            for f in gd.library.function:
                for nd in f.node_def:
                    if nd.op == "VarHandleOp":
                        name = nd.attr["shared_name"].s.decode()
                        if name.startswith(start):
                            i, key_rest = name[len(start):].split("/", 1)
                            for key in ("ref", "cnt", "sums", "qcnt"):
                                if key_rest.startswith(key) and key_rest[len(key):].startswith("_load"):
                                    self.suffix[side] = key_rest[len(key):]
                                    return


_COMPARE_IDS = itertools.count()


@dataclass
class _GraphPoint:
    key: str  # "<scope>|<q node>"
    scope: str
    qnode: str
    src: str  # the node whose output the rounding takes
    src_ref: str  # the exact input reference
    format: str
    range: Optional[Tuple[float, float]]
    rounding: Optional[str] = None


def _q_nodes(sm: Any) -> List[_GraphPoint]:
    """Every ``graphquant/q...`` activation node of a converted SavedModel."""
    from .graph.rewrite import ROUNDING_ATTR
    from .graph.view import parse_input

    points: List[_GraphPoint] = []
    for mg in sm.meta_graphs:
        scopes: List[Tuple[str, Any, bool]] = [("", mg.graph_def.node, False)]
        for f in mg.graph_def.library.function:
            scopes.append((f.signature.name, f.node_def, True))
        for scope, nodes, in_fn in scopes:
            by_name = {n.name: n for n in nodes}
            for nd in nodes:
                if not nd.name.startswith(_Q_PREFIX) or "/arg" in nd.name[len(_Q_PREFIX):]:
                    continue
                data = [r for r in nd.input if not r.startswith("^")]
                if not data:
                    continue
                src = parse_input(data[0], in_fn)[0]
                fmt, rng = _graph_format(nd, data, by_name, in_fn)
                rounding = nd.attr[ROUNDING_ATTR].s.decode() if ROUNDING_ATTR in nd.attr else None
                points.append(_GraphPoint(f"{scope}|{nd.name}", scope, nd.name, src, data[0], fmt, rng, rounding))
    return points


def _graph_format(nd: Any, data: List[str], by_name: Dict[str, Any], in_fn: bool) -> Tuple[str, Optional[Tuple[float, float]]]:
    """The format and clipping range of an inserted node, as far as the graph tells."""
    import tensorflow as tf

    from .formats import Affine, parse_format
    from .graph.rewrite import FORMAT_ATTR
    from .graph.view import parse_input
    from .ops import representable_range

    if FORMAT_ATTR in nd.attr:  # every node inserted by graphquant >= this version records it
        text = nd.attr[FORMAT_ATTR].s.decode()
        try:
            fmt = parse_format(text)
            rng = representable_range(fmt)
        except (TypeError, ValueError):
            return text, None
        if isinstance(fmt, Affine) and fmt.range is not None:  # calibrated: 4 digits are enough to read
            lo, hi = fmt.range
            text = f"affine{fmt.bits}[{lo:.4g},{hi:.4g}]" + str(fmt).split("]", 1)[1]
        return text, (None if rng is None else (float(rng[0]), float(rng[1])))
    if nd.op == "FakeQuantWithMinMaxArgs":
        from .formats import Affine

        lo, hi = float(nd.attr["min"].f), float(nd.attr["max"].f)
        bits, narrow = int(nd.attr["num_bits"].i), bool(nd.attr["narrow_range"].b)
        fmt = Affine(bits, range=(lo, hi), narrow_range=narrow)
        rng = representable_range(fmt)
        label = f"affine{bits}[{lo:.4g},{hi:.4g}]" + (":narrow" if narrow else "")
        return label, (float(rng[0]), float(rng[1]))
    if len(data) == 3:  # kernel with a calibrated (lo, hi) passed as constants
        vals = []
        for ref in data[1:]:
            c = by_name.get(parse_input(ref, in_fn)[0])
            if c is None or c.op != "Const":
                break
            vals.append(float(tf.make_ndarray(c.attr["value"].tensor)))
        if len(vals) == 2:
            return "affine (calibrated)", (vals[0], vals[1])
    return "?", None


def _observed_copy(sm: Any, points: List[_GraphPoint], obs: _GraphObservers, quantized: bool,
                   has_ref: Optional[set] = None) -> Tuple[Any, List[str]]:  # fmt: skip
    """A copy of ``sm`` with in-graph observers: in the float model a stash after every point's
    source node, in the quantized model the error sums of every point's rounding."""
    import tensorflow as tf
    from tensorflow.core.framework import types_pb2
    from tensorflow.core.protobuf import saved_model_pb2

    from .graph.rewrite import GraphEditor

    out = saved_model_pb2.SavedModel()
    out.CopyFrom(sm)
    missing: List[str] = []
    i64, f64 = types_pb2.DT_INT64, types_pb2.DT_DOUBLE
    for mg in out.meta_graphs:
        ed = GraphEditor(mg.graph_def)
        for i, p in enumerate(points):
            try:
                sc = ed.scope(p.scope)
            except KeyError:
                missing.append(p.key)
                continue
            if quantized:
                q = sc.by_name[p.qnode]
                dtype = sc.out_dtype(p.src) if p.src in sc.by_name or p.src in sc.arg_types else q.attr["T"].type
                ref = has_ref is not None and p.key in has_ref
                cf = obs.stats_fn(tf.as_dtype(dtype), ref, p.range)
                handles = ([(obs.name(i, "ref"), dtype, None)] if ref else []) + [
                    (obs.name(i, "sums"), f64, [12]), (obs.name(i, "qcnt"), i64, [])]
                node = obs.splice(ed, sc, cf, [p.src_ref, sc.ref(q, 0)], handles, f"graphquant/observe_q{i}")
                sc.rewire(sc.aliases(p.qnode), sc.ref(node, 0), skip={node.name})
            else:
                if p.src not in sc.by_name and p.src not in sc.arg_types:
                    missing.append(p.key)
                    continue
                dtype = sc.out_dtype(p.src)
                cf = obs.stash_fn(tf.as_dtype(dtype))
                handles = [(obs.name(i, "ref"), dtype, None), (obs.name(i, "cnt"), i64, [])]
                node = obs.splice(ed, sc, cf, [p.src_ref], handles, f"graphquant/observe_ref{i}")
                sc.rewire(sc.aliases(p.src) if p.src in sc.by_name else (p.src_ref,), sc.ref(node, 0), skip={node.name})
    return out, missing


def _load_observed(obs: Any, src: Path, tmp: Path, name: str) -> Any:
    import tensorflow as tf

    d = tmp / name
    d.mkdir()
    (d / "saved_model.pb").write_bytes(obs.SerializeToString())
    for sub in ("variables", "assets"):
        if (src / sub).exists():
            os.symlink((src / sub).resolve(), d / sub)
    return tf.saved_model.load(str(d))


def _feeds(data: Any, specs: Dict[str, Any], batch_size: int, steps: Optional[int]) -> Iterator[Dict[str, Any]]:
    import tensorflow as tf

    from .ranges import iter_batches

    for batch in iter_batches(data, 1, batch_size, steps, what="data"):
        if isinstance(batch, dict):
            extra = set(batch) - set(specs)
            if set(specs) - set(batch):
                raise ValueError(f"data: the signature takes inputs {sorted(specs)}, got {sorted(batch)}")
            if extra:
                log.info("compare: ignoring inputs %s not in the signature", sorted(extra))
            feed = {k: batch[k] for k in specs}
        else:
            if len(specs) != 1:
                raise ValueError(f"data: the signature takes several inputs {sorted(specs)}; pass a dict of arrays")
            feed = {next(iter(specs)): batch}
        yield {k: tf.convert_to_tensor(v, dtype=specs[k].dtype) for k, v in feed.items()}


def _stash_dtype(fn: Any, shared_name: str) -> Any:
    """The dtype of the stash variable ``shared_name`` in a loaded function's library."""
    import tensorflow as tf

    for f in fn.graph.as_graph_def().library.function:
        for nd in f.node_def:
            if nd.op == "VarHandleOp" and nd.attr["shared_name"].s.decode() == shared_name:
                return tf.as_dtype(nd.attr["dtype"].type)
    return None


def _compare_saved_models(src: Path, dst: Path, data: Any, signature: str, batch_size: int,
                          steps: Optional[int], verbose: Optional[bool] = None) -> CompareReport:  # fmt: skip
    from .graph.saved_model import read_saved_model

    t0 = time.perf_counter()
    sm_f, sm_q = read_saved_model(src), read_saved_model(dst)
    points = _q_nodes(sm_q)
    notes: List[str] = []
    if not points:
        notes.append(f"{dst} has no graphquant activation node (graphquant/q...)")
    import tensorflow as tf

    from .calibration import progress

    obs = _GraphObservers()
    tmp = Path(tempfile.mkdtemp(prefix=".graphquant-compare-"))
    handles: List[Any] = []
    try:
        obs_f, missing = _observed_copy(sm_f, points, obs, quantized=False)
        with_ref = {p.key for p in points} - set(missing)
        obs_q, _ = _observed_copy(sm_q, points, obs, quantized=True, has_ref=with_ref)
        if missing:
            notes.append(f"{len(missing)} point(s) have no counterpart in {src}; compared against the rounding's input")
        f_loaded = _load_observed(obs_f, src, tmp, "float")
        q_loaded = _load_observed(obs_q, dst, tmp, "quantized")
        for what, loaded, path in (("model", f_loaded, src), ("quantized", q_loaded, dst)):
            if signature not in loaded.signatures:
                raise ValueError(f"signature: {path} has no signature {signature!r} (has {sorted(loaded.signatures)})")
        f_fn, q_fn = f_loaded.signatures[signature], q_loaded.signatures[signature]
        obs.rebind("float", [f_fn.graph.as_graph_def()])
        obs.rebind("quantized", [q_fn.graph.as_graph_def()])
        specs = f_fn.structured_input_signature[1]
        # the variables, by point index: float stash and count; quantized stash, sums and count
        dtypes = {}
        for i, p in enumerate(points):
            dtype = tf.float32
            if p.key in with_ref:
                dtype = _stash_dtype(f_fn, obs.name(i, "ref") + obs.suffix["float"]) or tf.float32
            dtypes[i] = dtype
            h = {
                "cnt": obs._handle("float", i, "cnt", tf.int64, []),
                "ref_f": obs._handle("float", i, "ref", dtype),
                "ref_q": obs._handle("quantized", i, "ref", dtype),
                "sums": obs._handle("quantized", i, "sums", tf.float64, [12]),
                "qcnt": obs._handle("quantized", i, "qcnt", tf.int64, []),
            }
            tf.raw_ops.AssignVariableOp(resource=h["cnt"], value=tf.constant(0, tf.int64))
            tf.raw_ops.AssignVariableOp(resource=h["qcnt"], value=tf.constant(0, tf.int64))
            tf.raw_ops.AssignVariableOp(resource=h["sums"], value=tf.zeros([12], tf.float64))
            tf.raw_ops.AssignVariableOp(resource=h["ref_q"], value=tf.zeros([], dtype))
            handles.append(h)
        ostats: Dict[str, _Stats] = {}
        samples = batches = 0
        counts_f = [0] * len(points)
        counts_q = [0] * len(points)
        bad = set()
        for feed in progress(_feeds(data, specs, batch_size, steps), "comparing", verbose):
            f_out = f_fn(**feed)
            runs_f: List[Optional[int]] = [None] * len(points)  # runs of each point in the float model
            for i, p in enumerate(points):
                if p.key in with_ref:
                    c = int(tf.raw_ops.ReadVariableOp(resource=handles[i]["cnt"], dtype=tf.int64))
                    if c > counts_f[i]:  # the float model ran the point: hand its tensor over (on the device)
                        ref = tf.raw_ops.ReadVariableOp(resource=handles[i]["ref_f"], dtype=dtypes[i])
                        tf.raw_ops.AssignVariableOp(resource=handles[i]["ref_q"], value=ref)
                    runs_f[i], counts_f[i] = c - counts_f[i], c
            try:
                q_out = q_fn(**feed)
            except tf.errors.InvalidArgumentError as e:
                raise ValueError("shape mismatch between the float and the quantized tensor at a rounding point "
                                 f"({str(e).splitlines()[0]})") from None  # fmt: skip
            for i, p in enumerate(points):
                c = int(tf.raw_ops.ReadVariableOp(resource=handles[i]["qcnt"], dtype=tf.int64))
                dq, counts_q[i] = c - counts_q[i], c
                dc = runs_f[i]
                if dc is not None and dq and dc != dq:
                    notes.append(f"{p.qnode}: ran a different number of times in the two models; skipped")
                    bad.add(p.key)
            samples += int(next(iter(feed.values())).shape[0])
            batches += 1
            for k in f_out:
                if k in q_out:
                    ostats.setdefault(k, _Stats()).add(_error_sums(f_out[k], q_out[k]).numpy())
        if batches == 0:
            raise ValueError("data is empty: no batch to compare on")
        stats = {}
        for i, p in enumerate(points):
            if p.key in bad or not counts_q[i]:
                continue
            st = _Stats()
            st.add(tf.raw_ops.ReadVariableOp(resource=handles[i]["sums"], dtype=tf.float64).numpy(), local=True,
                   clip_known=p.range is not None)  # fmt: skip
            stats[p.key] = st
        del f_loaded, q_loaded, f_fn, q_fn
    finally:
        for h in handles:
            for v in h.values():
                tf.raw_ops.DestroyResourceOp(resource=v, ignore_lookup_error=True)
        shutil.rmtree(tmp, ignore_errors=True)
    ran = [p for p in points if p.key in stats and stats[p.key].n > 0]
    if len(ran) < len(points):
        log.info("compare: %d of %d graphquant nodes did not run under signature %r", len(points) - len(ran),
                 len(points), signature)  # fmt: skip
    if any(p.format == "?" for p in ran):
        notes.append("'?': the graph does not record this node's format (converted by an older graphquant; "
                     "only FakeQuant nodes and calibrated ranges say)")
    labels = [p.src for p in ran]
    dup = {l for l in labels if labels.count(l) > 1}
    report_points = [
        _point(f"{_short_scope(p.scope)}/{p.src}" if p.src in dup and p.scope else p.src, p.qnode, p.format,
               stats[p.key], p.rounding)
        for p in ran
    ]  # fmt: skip
    outputs = [_output(k, s) for k, s in ostats.items()]
    return CompareReport(report_points, outputs, samples, batches, time.perf_counter() - t0, "saved_model",
                         str(src), str(dst), list(dict.fromkeys(notes)), _checkpoint_weight_errors(src, dst))  # fmt: skip


def _short_scope(scope: str) -> str:
    s = scope
    if s.startswith("__inference_"):
        s = s[len("__inference_"):]
    head, _, tail = s.rpartition("_")
    return head if tail.isdigit() and head else s


# --------------------------------------------------------------------------- public
def _load_keras(path: Path, what: str) -> Any:
    import keras

    from . import keras as _gqk  # noqa: F401  (registers the graphquant layers)

    try:
        return keras.models.load_model(path, safe_mode=True, compile=False)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{what}: {path}: cannot load the Keras model ({msg})") from None


def compare(
    model: Any,
    quantized: Any,
    data: Any,
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
    import keras

    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise ValueError(f"steps must be a positive int or None, got {steps!r}")
    if data is None:
        raise ValueError("data: give the inputs to compare on (an array, a dict of arrays, a dataset or batches)")

    def resolve(m: Any, what: str) -> Any:
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
                return _load_keras(p, what)
            raise ValueError(f"{what}: {p}: expected a SavedModel folder or a .keras/.h5 file")
        raise TypeError(f"{what} must be a keras.Model, a .keras file or a SavedModel folder, got {type(m).__name__}")

    f, q = resolve(model, "model"), resolve(quantized, "quantized")
    if isinstance(f, Path) != isinstance(q, Path):
        raise TypeError("model and quantized must both be Keras models or both be SavedModels")
    if isinstance(f, Path):
        report = _compare_saved_models(f, q, data, signature, batch_size, steps, verbose)
    else:
        report = _compare_keras(f, q, data, batch_size, steps, verbose)
    log.info("compare: %d points, %d samples in %.2fs", len(report.points), report.samples, report.seconds)
    return report
