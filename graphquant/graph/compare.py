"""Compare a SavedModel with its :func:`graphquant.convert_saved_model` copy, node by node.

Both SavedModels are copied with observer ops spliced in at every
``graphquant/q...`` node of the converted one (the float copy stashes the
tensor the node rounds, the quantized copy accumulates
:func:`graphquant.report.error_sums` against it), then run on the same feeds.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..report import CompareReport, Stats, WeightError, error_sums, output_error, point_error, weight_error
from ..types import DataLike

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from tensorflow.core.protobuf.saved_model_pb2 import SavedModel

log = logging.getLogger(__name__)

__all__ = ["compare_saved_models", "checkpoint_weight_errors", "q_nodes"]


def checkpoint_weight_errors(src: Path, dst: Path) -> List[WeightError]:
    """One :class:`WeightError` per float checkpoint variable that the conversion changed
    (the weights it rounded; those that round exactly onto their format are not told apart)."""
    import tensorflow as tf

    prefix = lambda p: str(p / "variables" / "variables")
    if not (src / "variables" / "variables.index").is_file() or not (dst / "variables" / "variables.index").is_file():
        return []
    from .saved_model import load_object_keys, read_saved_model

    names: Dict[str, str] = {}  # checkpoint key -> the variable's own name (e.g. "c1/kernel"), when recorded
    try:
        og = read_saved_model(src).meta_graphs[0].object_graph_def
        for i, key in load_object_keys(src).items():
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
        out.append(weight_error(names.get(key, key.split("/.ATTRIBUTES")[0]), key, "?", w, q))
    return out


# --------------------------------------------------------------------------- SavedModel
_Q_PREFIX = "graphquant/q"


class _GraphObservers:
    """In-graph observers of a SavedModel comparison (no tensor leaves the graphs).

    In the float model, a stash after every point's source keeps the float tensor in a
    resource variable; in the quantized model a node taking the rounding's input and
    output adds :func:`error_sums` against the stashed tensor into a variable. Between
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
                tf.raw_ops.AssignVariableOp(resource=h_sums, value=sums + error_sums(ref, out, inp=inp, rng=rng))
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

        from .. import calibration

        fname, fdefs = calibration.function_defs(cf)
        lib_name = ed.add_functions(fdefs, fname)
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


def q_nodes(sm: SavedModel) -> List[_GraphPoint]:
    """Every ``graphquant/q...`` activation node of a converted SavedModel."""
    from .rewrite import ROUNDING_ATTR
    from .view import parse_input

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

    from ..formats import Affine, parse_format
    from .rewrite import FORMAT_ATTR
    from .view import parse_input
    from ..ops import representable_range

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
        from ..formats import Affine

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

    from .rewrite import GraphEditor

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

    from ..ranges import iter_batches

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


def compare_saved_models(src: Path, dst: Path, data: DataLike, signature: str, batch_size: int,
                          steps: Optional[int], verbose: Optional[bool] = None) -> CompareReport:  # fmt: skip
    """The per-point error report of SavedModel ``dst`` (converted from ``src``) on ``data`` fed to
    ``signature`` of both (the back end of :func:`graphquant.compare` for SavedModels)."""
    import tensorflow as tf

    from ..calibration import progress
    from .saved_model import read_saved_model

    t0 = time.perf_counter()
    sm_f, sm_q = read_saved_model(src), read_saved_model(dst)
    points = q_nodes(sm_q)
    notes: List[str] = []
    if not points:
        notes.append(f"{dst} has no graphquant activation node (graphquant/q...)")
    obs = _GraphObservers()
    tmp = Path(tempfile.mkdtemp(prefix=".graphquant-compare-"))
    handles: List[Dict[str, Any]] = []
    try:
        loaded, with_ref = _load_observed_pair(sm_f, sm_q, src, dst, points, obs, tmp, notes)
        f_fn, q_fn = _signature_pair(loaded, (src, dst), signature, obs)
        dtypes = _observer_variables(obs, points, with_ref, f_fn, handles)
        run = _PointRuns(points, with_ref, handles, dtypes, notes)
        ostats: Dict[str, Stats] = {}
        samples = batches = 0
        for feed in progress(_feeds(data, f_fn.structured_input_signature[1], batch_size, steps), "comparing", verbose):
            f_out = f_fn(**feed)
            run.after_float()
            try:
                q_out = q_fn(**feed)
            except tf.errors.InvalidArgumentError as e:
                raise ValueError("shape mismatch between the float and the quantized tensor at a rounding point "
                                 f"({str(e).splitlines()[0]})") from None  # fmt: skip
            run.after_quantized()
            samples += int(next(iter(feed.values())).shape[0])
            batches += 1
            for k in f_out:
                if k in q_out:
                    ostats.setdefault(k, Stats()).add(error_sums(f_out[k], q_out[k]).numpy())
        if batches == 0:
            raise ValueError("data is empty: no batch to compare on")
        stats = run.stats()
        del loaded, f_fn, q_fn
    finally:
        for h in handles:
            for v in h.values():
                tf.raw_ops.DestroyResourceOp(resource=v, ignore_lookup_error=True)
        shutil.rmtree(tmp, ignore_errors=True)
    report_points = _report_points(points, stats, signature, notes)
    outputs = [output_error(k, s) for k, s in ostats.items()]
    return CompareReport(report_points, outputs, samples, batches, time.perf_counter() - t0, "saved_model",
                         str(src), str(dst), list(dict.fromkeys(notes)), checkpoint_weight_errors(src, dst))  # fmt: skip


def _load_observed_pair(sm_f: Any, sm_q: Any, src: Path, dst: Path, points: List[_GraphPoint], obs: _GraphObservers,
                        tmp: Path, notes: List[str]) -> Tuple[Tuple[Any, Any], set]:  # fmt: skip
    """Both SavedModels with their observers spliced in, loaded (float, quantized); and the keys of the
    points whose source the float model has (the others compare against the rounding's own input)."""
    obs_f, missing = _observed_copy(sm_f, points, obs, quantized=False)
    with_ref = {p.key for p in points} - set(missing)
    obs_q, _ = _observed_copy(sm_q, points, obs, quantized=True, has_ref=with_ref)
    if missing:
        notes.append(f"{len(missing)} point(s) have no counterpart in {src}; compared against the rounding's input")
    return (_load_observed(obs_f, src, tmp, "float"), _load_observed(obs_q, dst, tmp, "quantized")), with_ref


def _signature_pair(loaded: Tuple[Any, Any], paths: Tuple[Path, Path], signature: str,
                    obs: _GraphObservers) -> Tuple[Any, Any]:  # fmt: skip
    """``signature`` of the loaded float and quantized models (a ``ValueError`` naming the model that lacks
    it); the observers learn each side's variable names."""
    for loaded_model, path in zip(loaded, paths):
        if signature not in loaded_model.signatures:
            raise ValueError(f"signature: {path} has no signature {signature!r} (has {sorted(loaded_model.signatures)})")
    f_fn, q_fn = loaded[0].signatures[signature], loaded[1].signatures[signature]
    obs.rebind("float", [f_fn.graph.as_graph_def()])
    obs.rebind("quantized", [q_fn.graph.as_graph_def()])
    return f_fn, q_fn


class _PointRuns:
    """How often each model ran each point so far, batch by batch: after a float run the float tensor
    of each point that ran is handed to the quantized model (on the device); a point the two models
    ran a different number of times in a batch is left out (noted)."""

    def __init__(self, points: List[_GraphPoint], with_ref: set, handles: List[Dict[str, Any]],
                 dtypes: Dict[int, Any], notes: List[str]) -> None:  # fmt: skip
        self.points, self.with_ref, self.handles, self.dtypes, self.notes = points, with_ref, handles, dtypes, notes
        self.counts_f = [0] * len(points)
        self.counts_q = [0] * len(points)
        self.runs_f: List[Optional[int]] = [None] * len(points)
        self.bad: set = set()

    def _count(self, i: int, key: str) -> int:
        import tensorflow as tf

        return int(tf.raw_ops.ReadVariableOp(resource=self.handles[i][key], dtype=tf.int64))

    def after_float(self) -> None:
        import tensorflow as tf

        self.runs_f = [None] * len(self.points)  # runs of each point in the float model in this batch
        for i, p in enumerate(self.points):
            if p.key in self.with_ref:
                c = self._count(i, "cnt")
                if c > self.counts_f[i]:  # the float model ran the point: hand its tensor over
                    ref = tf.raw_ops.ReadVariableOp(resource=self.handles[i]["ref_f"], dtype=self.dtypes[i])
                    tf.raw_ops.AssignVariableOp(resource=self.handles[i]["ref_q"], value=ref)
                self.runs_f[i], self.counts_f[i] = c - self.counts_f[i], c

    def after_quantized(self) -> None:
        for i, p in enumerate(self.points):
            c = self._count(i, "qcnt")
            dq, self.counts_q[i] = c - self.counts_q[i], c
            dc = self.runs_f[i]
            if dc is not None and dq and dc != dq:
                self.notes.append(f"{p.qnode}: ran a different number of times in the two models; skipped")
                self.bad.add(p.key)

    def stats(self) -> Dict[str, Stats]:
        """The accumulated error statistics of every point the quantized model ran (and not left out)."""
        import tensorflow as tf

        stats = {}
        for i, p in enumerate(self.points):
            if p.key in self.bad or not self.counts_q[i]:
                continue
            st = Stats()
            st.add(tf.raw_ops.ReadVariableOp(resource=self.handles[i]["sums"], dtype=tf.float64).numpy(), local=True,
                   clip_known=p.range is not None)  # fmt: skip
            stats[p.key] = st
        return stats


def _observer_variables(obs: _GraphObservers, points: List[_GraphPoint], with_ref: set, f_fn: Any,
                        handles: List[Dict[str, Any]]) -> Dict[int, Any]:  # fmt: skip
    """The observers' variables, zeroed, appended to ``handles`` by point index (float stash and count;
    quantized stash, sums and count; the caller destroys them); returns the dtype of each point's stash."""
    import tensorflow as tf

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
    return dtypes


def _report_points(points: List[_GraphPoint], stats: Dict[Any, Stats], signature: str,
                   notes: List[str]) -> List[Any]:  # fmt: skip
    """One :class:`~graphquant.report.PointError` per point that ran (a label shared by two points gets
    its function's short name in front); notes about what did not run or has no recorded format."""
    ran = [p for p in points if p.key in stats and stats[p.key].n > 0]
    if len(ran) < len(points):
        log.info("compare: %d of %d graphquant nodes did not run under signature %r", len(points) - len(ran),
                 len(points), signature)  # fmt: skip
    if any(p.format == "?" for p in ran):
        notes.append("'?': the graph does not record this node's format (converted by an older graphquant; "
                     "only FakeQuant nodes and calibrated ranges say)")
    from .planning import short_scope_names

    labels = [p.src for p in ran]
    dup = {l for l in labels if labels.count(l) > 1}
    short = short_scope_names(p.scope for p in ran if p.src in dup)
    return [
        point_error(f"{short[p.scope]}/{p.src}" if p.src in dup and p.scope else p.src, p.qnode, p.format,
                    stats[p.key], p.rounding)
        for p in ran
    ]  # fmt: skip
