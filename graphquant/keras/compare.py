"""Compare a Keras model with its :func:`graphquant.quantize_model` copy, layer by layer.

Every :class:`graphquant.keras.Quantize` call of the copy is matched with the
float model's tensor at the same place (the output of the layer it follows,
nested models included); one probe model per side runs the batches and
:func:`graphquant.report.error_sums` accumulates the errors.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import keras
import numpy as np

from ..report import CompareReport, Stats, WeightError, error_sums, output_error, point_error, weight_error
from ..types import DataLike
from .view import is_graph_model, is_sequential, iter_calls, producer_node

__all__ = ["compare_keras", "keras_weight_errors"]


def keras_weight_errors(quantized: Any) -> List[WeightError]:
    """One :class:`WeightError` per weight that a :class:`graphquant.keras.QuantizeWeights` layer rounds
    (as inference rounds it)."""
    from ..rounding import use_xla
    from .layers import QuantizeWeights

    out = []
    for layer in quantized._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, QuantizeWeights):
            with use_xla(False):  # once per weight: compiling a kernel per shape would cost more
                rounded = layer.rounded_weights()
            out += [weight_error(layer.name, slot, str(fmt), w, q) for slot, w, q, fmt in rounded]
    return out


def _graph_of(model: Any) -> Any:
    """The Functional graph behind a model (a built Sequential keeps one in ``_functional``)."""
    if is_sequential(model):
        fn = getattr(model, "_functional", None)
        if fn is None:
            raise ValueError(f"Sequential model {model.name!r} is not built; call it on data or give it an Input")
        return fn
    return model


def _calls(model: Any) -> Dict[str, Any]:
    """``{call name: keras Node}`` for the layer calls inside ``model``'s own graph (names as in
    :func:`graphquant.keras.view.iter_calls`: ``layer``, ``layer@1`` for its second call...)."""
    return {name: node for name, _, node in iter_calls(_graph_of(model)) if not node.is_input}


Site = Tuple[Tuple[str, ...], str, str, int]  # (scope of call names, call name, "input"/"output", tensor index)


def _quantize_sites(model: Any, scope: Tuple[str, ...] = ()) -> List[Tuple[Any, Site, Optional[Site]]]:
    """``(Quantize layer, its own site, its producer's output site)`` for every Quantize call (recursive);
    the producer's site is ``None`` when a model input feeds the Quantize layer."""
    from .layers import Quantize

    calls = _calls(model)
    name_of = {id(node): name for name, node in calls.items()}
    out: List[Tuple[Any, Site, Optional[Site]]] = []
    for name, node in calls.items():
        op = node.operation
        if isinstance(op, Quantize):
            t = node.input_tensors[0]
            src_name = name_of.get(id(producer_node(t)))
            src_site = None if src_name is None else (scope, src_name, "output", t._keras_history.tensor_index)
            out.append((op, (scope, name, "io", 0), src_site))
        elif is_graph_model(op):
            out.extend(_quantize_sites(op, scope + (name,)))
    return out


def _tensors_at(model: Any, sites: Sequence[Site]) -> List[Any]:
    """The symbolic tensors at ``sites``, expressed in ``model``'s own graph (nested models probed)."""
    calls = _calls(model)
    result: List[Any] = [None] * len(sites)
    nested: Dict[str, List[Tuple[int, Site]]] = {}
    for i, (scope, name, io, idx) in enumerate(sites):
        if scope:
            nested.setdefault(scope[0], []).append((i, (scope[1:], name, io, idx)))
            continue
        node = calls.get(name)
        if node is None:
            raise ValueError(f"model {model.name!r} has no layer call named {name!r}")
        result[i] = (node.input_tensors if io == "input" else node.output_tensors)[idx]
    for cname, items in nested.items():
        node = calls.get(cname)
        if node is None or not is_graph_model(node.operation):
            raise ValueError(f"model {model.name!r} has no nested model call {cname!r}")
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


def _scope_label(site: Site) -> str:
    return "/".join(site[0] + (site[1],))


def _layer_range(layer: Any) -> Tuple[Any, Optional[int]]:
    """The clipping range ``(lo, hi)`` of a Quantize layer (``None`` if unknown) and its channel axis."""
    from ..formats import Affine
    from ..ops import representable_range

    fmt = layer.format
    if isinstance(fmt, Affine) and fmt.range is None:
        lo, hi = layer.get_range()
        return (np.asarray(lo), np.asarray(hi)), fmt.axis
    return representable_range(fmt), None


class _Probes:
    """Two probe models over the same inputs: the quantized model's tensors around each Quantize call
    (its input, then its output) and final outputs; the float model's tensors at the same places."""

    def __init__(self, model: Any, quantized: Any, kept: List[Tuple[Any, Site, Optional[Site]]]) -> None:
        q_sites: List[Site] = []
        for _, (scope, name, _, _), _ in kept:
            q_sites += [(scope, name, "input", 0), (scope, name, "output", 0)]
        f_sites = [fsite for _, _, fsite in kept if fsite is not None]
        self.f_index: List[Optional[int]] = []  # where a point's float tensor is in the float probe's outputs
        for _, _, fsite in kept:
            self.f_index.append(None if fsite is None else sum(i is not None for i in self.f_index))
        qg, fg = _graph_of(quantized), _graph_of(model)
        q_tensors = _tensors_at(quantized, q_sites)
        try:
            f_tensors = _tensors_at(model, f_sites)
        except ValueError as e:
            raise ValueError(
                f"model does not match quantized (is quantized a quantize_model copy of model?): {e}"
            ) from None
        q_outs = list(keras.tree.flatten(qg.outputs))
        self.f_outs = list(keras.tree.flatten(fg.outputs))
        if len(q_outs) != len(self.f_outs):
            raise ValueError(f"model has {len(self.f_outs)} outputs, quantized has {len(q_outs)}")
        self.q = keras.Model(qg.input, q_tensors + q_outs)
        self.f = keras.Model(fg.input, f_tensors + self.f_outs)
        self.n_points, self.n_outputs, self.n_inputs = len(kept), len(q_outs), len(qg.inputs)
        self.ranges = [_layer_range(layer) for layer, _, _ in kept]

    def sums(self, batch: Any) -> List[Any]:
        """Error sums of every point, then of every output, on one batch (traced once per shape)."""
        qv = _as_list(self.q(batch, training=False))
        fv = _as_list(self.f(batch, training=False))
        nf, nq = len(fv) - self.n_outputs, len(qv) - self.n_outputs
        out = []
        for j in range(self.n_points):
            q_in, q_out = qv[2 * j], qv[2 * j + 1]
            ref = q_in if self.f_index[j] is None else fv[self.f_index[j]]
            rng, axis = self.ranges[j]
            out.append(error_sums(ref, q_out, inp=q_in, rng=rng, axis=axis))
        for j in range(self.n_outputs):
            out.append(error_sums(fv[nf + j], qv[nq + j]))
        return out


def compare_keras(model: Any, quantized: Any, data: DataLike, batch_size: int, steps: Optional[int],
                  verbose: Optional[bool] = None) -> CompareReport:  # fmt: skip
    """:func:`graphquant.compare.compare` for two Keras models (Functional or Sequential)."""
    import tensorflow as tf

    from ..calibration import progress
    from ..ranges import iter_batches
    from .layers import unfolded

    for what, m in (("model", model), ("quantized", quantized)):
        if not is_graph_model(m):
            raise TypeError(f"{what} must be a Functional or Sequential keras.Model, got {type(m).__name__}")
    t0 = time.perf_counter()
    kept = _quantize_sites(quantized)
    notes: List[str] = []
    if not kept:
        notes.append("the quantized model has no graphquant.keras.Quantize layer")
    notes += [f"{layer.name}: rounds a model input; compared against that input" for layer, _, f in kept if f is None]
    probes = _Probes(model, quantized, kept)
    stats = [Stats() for _ in kept]
    ostats = [Stats() for _ in range(probes.n_outputs)]
    samples = batches = 0
    step = tf.function(probes.sums, reduce_retracing=True, autograph=False)  # Keras 3 layers need no autograph
    for batch in progress(iter_batches(data, probes.n_inputs, batch_size, steps, what="data"), "comparing", verbose):
        with unfolded():  # what eager inference computes, as calibration observes it
            vecs = [v.numpy() for v in step(batch)]
        samples += int(np.shape(keras.tree.flatten(batch)[0])[0])
        batches += 1
        for j, s in enumerate(stats):
            s.add(vecs[j], local=True, clip_known=probes.ranges[j][0] is not None)
        for j, s in enumerate(ostats):
            s.add(vecs[len(kept) + j])
    if batches == 0:
        raise ValueError("data is empty: no batch to compare on")
    points = [
        point_error(_scope_label(fsite) if fsite else layer.name, layer.name, str(layer.format), s,
                    rounding=layer.inference_rounding)  # compare runs inference
        for (layer, _, fsite), s in zip(kept, stats)
    ]  # fmt: skip
    outputs = [output_error(_output_name(t, i), s) for i, (t, s) in enumerate(zip(probes.f_outs, ostats))]
    return CompareReport(points, outputs, samples, batches, time.perf_counter() - t0, "keras", model.name,
                         quantized.name, notes, keras_weight_errors(quantized))  # fmt: skip


def _output_name(t: Any, i: int) -> str:
    hist = getattr(t, "_keras_history", None)
    return hist.operation.name if hist is not None else f"output_{i}"


def _as_list(v: Any) -> List[Any]:
    return list(keras.tree.flatten(v))

