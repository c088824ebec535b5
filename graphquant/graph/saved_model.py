"""SavedModel conversion: read the protobuf, plan, edit, write atomically.

The conversion edits ``saved_model.pb`` directly: the function-library bodies
get rounding nodes; the object graph, the signatures and the variables are
carried over unchanged, so every signature keeps its name, input and output
structure and dtypes. Nothing is traced from the model, which keeps the
conversion close to the cost of copying the files.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Set, Tuple, Union

from google.protobuf.message import DecodeError

from .. import outputs
from ..patterns import DEPTHWISE_OPS, Registry
from ..types import DataLike, FormatLike
from ..plan import InsertionPoint, Plan, QuantizeConfig, no_match_message, zeroed_weights_warning
from ..ranges import calibration_batches, check_inputs, inputs_str
from .. import calibration as engine
from ..calibration import progress
from ..weights import round_weight_array
from .calibrate import RangeCollector, insert_observers, needs_calibration
from .function import config_from_kwargs
from .apply import apply_plan
from .liveness import called_functions, check_live, tensor_node
from .planning import plan_graph_def
from .rewrite import follow_redirects, rounding_nodes

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from tensorflow.core.protobuf.saved_model_pb2 import SavedModel

log = logging.getLogger(__name__)

__all__ = [
    "convert_saved_model",
    "inspect_saved_model",
    "ConversionReport",
    "SavedModelError",
    "is_saved_model",
    "read_saved_model",
]

PathLike = Union[str, "os.PathLike[str]"]


class SavedModelError(ValueError):
    """A path is not a readable SavedModel (the message names the file)."""


@dataclass
class ConversionReport:
    """What a conversion did.

    Attributes:
        source, destination: the paths.
        convolutions: convolution groups found (plan targets).
        inserted: rounding nodes inserted into the graph.
        prerounded: weight tensors rounded once (constants or checkpoint values).
        seconds: wall time of the conversion.
        signatures: the signature names kept.
        plan: the applied :class:`~graphquant.plan.Plan`.
        ranges: calibrated activation ranges per insertion point.
        warnings: human-readable warnings (e.g. no convolution found; a weight
            tensor of which more than half of the nonzero values round to zero,
            named, with a scaled format suggested).
        meta_graphs: one entry per meta graph (TF1 SavedModels may hold
            several, e.g. tags ``serve`` and ``train``): its ``tags``, the
            ``convolutions`` found and the nodes ``inserted`` in it. Each meta
            graph is its own graph, rounded once; ``convolutions`` and
            ``inserted`` above are the sums.
        requantized: graphquant rounding nodes the source already had
            (non-zero only with ``allow_requantize=True``).
        unreachable_convolutions: convolution groups in library functions no
            signature runs (tf-keras saves a trace function per layer, so its
            SavedModels hold each convolution several times; a ``tf.Module``'s
            extra ``tf.function``). They are rounded too but not counted in
            ``convolutions``, which counts what the signatures run.
    """

    source: str
    destination: Optional[str]
    convolutions: int
    inserted: int
    prerounded: int
    seconds: float
    signatures: List[str]
    plan: Plan
    ranges: Dict[str, Tuple[float, float]] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)
    meta_graphs: List[Dict[str, Any]] = field(default_factory=list)
    requantized: int = 0
    unreachable_convolutions: int = 0

    def to_dict(self) -> Dict[str, Any]:
        return {
            "source": self.source,
            "destination": self.destination,
            "convolutions": self.convolutions,
            "inserted": self.inserted,
            "prerounded": self.prerounded,
            "seconds": round(self.seconds, 4),
            "signatures": list(self.signatures),
            "warnings": list(self.warnings),
            "meta_graphs": [dict(m) for m in self.meta_graphs],
            "requantized": self.requantized,
            "unreachable_convolutions": self.unreachable_convolutions,
            "plan": self.plan.to_dict(),
        }

    def __str__(self) -> str:
        where = ""
        if len(self.meta_graphs) > 1:
            where = f" in {len(self.meta_graphs)} meta graphs (" + "; ".join(
                f"{','.join(m['tags']) or '#' + str(i)}: {m['convolutions']} convolutions, {m['inserted']} nodes"
                for i, m in enumerate(self.meta_graphs)
            ) + ")"
        off = (f" (+{self.unreachable_convolutions} in functions no signature runs, rounded too)"
               if self.unreachable_convolutions else "")
        again = f", on top of {self.requantized} existing rounding nodes (requantized)" if self.requantized else ""
        return (
            f"{self.source} -> {self.destination}: {self.convolutions} convolutions{off}, "
            f"{self.inserted} graphquant nodes{where}{again}, {self.prerounded} weights pre-rounded, {self.seconds:.2f} s"
        )


def is_saved_model(path: PathLike) -> bool:
    """True when ``path`` is a folder holding ``saved_model.pb`` (or ``.pbtxt``)."""
    p = Path(path)
    return p.is_dir() and ((p / "saved_model.pb").is_file() or (p / "saved_model.pbtxt").is_file())


def read_saved_model(path: PathLike) -> SavedModel:
    """Parse ``path/saved_model.pb``; raise :class:`SavedModelError` naming the problem."""
    from tensorflow.core.protobuf import saved_model_pb2

    p = Path(path)
    if not p.exists():
        raise SavedModelError(f"{p}: no such file or directory")
    if not p.is_dir():
        raise SavedModelError(f"{p}: not a SavedModel folder")
    pb, pbtxt = p / "saved_model.pb", p / "saved_model.pbtxt"
    sm = saved_model_pb2.SavedModel()
    if pb.is_file():
        try:
            sm.ParseFromString(pb.read_bytes())
        except (DecodeError, RuntimeError, ValueError) as e:
            raise SavedModelError(f"{pb}: corrupt SavedModel protobuf ({type(e).__name__}: {e})") from None
    elif pbtxt.is_file():
        from google.protobuf import text_format

        try:
            text_format.Parse(pbtxt.read_text(), sm)
        except Exception as e:
            raise SavedModelError(f"{pbtxt}: corrupt SavedModel text protobuf ({e})") from None
    else:
        raise SavedModelError(f"{p}: not a SavedModel (no saved_model.pb)")
    if not sm.meta_graphs:
        raise SavedModelError(f"{pb}: corrupt SavedModel (no meta graph)")
    return sm


def _signature_names(sm) -> List[str]:
    names: List[str] = []
    for mg in sm.meta_graphs:
        for k in mg.signature_def:
            if not k.startswith("__") and k not in names:
                names.append(k)
    return names


def _tags(mg, i: int) -> str:
    return ",".join(mg.meta_info_def.tags) or f"#{i}"


def _signature_outputs(mg) -> List[str]:
    """Top-level tensor names of every signature output of a meta graph."""
    out: List[str] = []
    for sig in mg.signature_def.values():
        for info in sig.outputs.values():
            enc = info.WhichOneof("encoding")
            if enc == "name":
                out.append(info.name)
            elif enc == "coo_sparse":
                c = info.coo_sparse
                out.extend([c.values_tensor_name, c.indices_tensor_name, c.dense_shape_tensor_name])
            elif enc == "composite_tensor":
                out.extend(t.name for t in info.composite_tensor.components if t.WhichOneof("encoding") == "name")
    return out


def _redirect_signatures(mg, redirects: Dict[str, str]) -> int:
    """Point signature outputs at the tensors now carrying their rounded value; return how many moved.

    In a TF1 SavedModel a signature names a top-level tensor (``"relu:0"``);
    when a rounding is spliced after that very tensor, rewiring its consumers
    leaves the signature on the unrounded value. Keys and dtypes are unchanged.
    """
    n = 0
    for sig in mg.signature_def.values():
        for info in sig.outputs.values():
            if info.WhichOneof("encoding") == "name":
                new = follow_redirects(redirects, info.name)
                if new != info.name:
                    info.name = new
                    n += 1
    return n


def _sinks(graph_def) -> List[str]:
    """Top-level nodes nothing in the graph reads (data or control): what a session fetches by name."""
    used = set()
    for nd in graph_def.node:
        for ref in nd.input:
            used.add(tensor_node(ref.lstrip("^")))
    return [nd.name for nd in graph_def.node if nd.name not in used]


def _signature_functions(mg) -> Set[str]:
    """Library functions a signature runs: called (transitively) from the top-level nodes its outputs
    depend on. Functions only the object graph holds (tf-keras saves a trace function per layer; a
    ``tf.function`` of a ``tf.Module`` that is no signature) are not in it."""
    library = {f.signature.name: f for f in mg.graph_def.library.function}
    top = {n.name: n for n in mg.graph_def.node}
    seen_nodes: Set[str] = set()
    stack = [n for n in (tensor_node(t) for t in _signature_outputs(mg)) if n in top]
    called: Set[str] = set()
    while stack:
        name = stack.pop()
        if name in seen_nodes:
            continue
        seen_nodes.add(name)
        nd = top[name]
        called.update(called_functions(nd, library))
        for ref in nd.input:
            src = ref.lstrip("^").split(":", 1)[0]
            if src in top:
                stack.append(src)
    todo = list(called)
    while todo:
        for nd in library[todo.pop()].node_def:
            for f in called_functions(nd, library):
                if f not in called:
                    called.add(f)
                    todo.append(f)
    return called


def _count_unreachable(plan: Plan, mg) -> int:
    """Convolution groups of ``plan`` in functions no signature runs (noted in the plan)."""
    if not mg.signature_def:
        return 0
    called = _signature_functions(mg)
    off = [t for t in plan.targets if "/" in t and t.split("/", 1)[0] not in called]
    if off:
        fns = {t.split("/", 1)[0] for t in off}
        plan.notes.append(f"{len(off)} of the {len(plan.targets)} convolution groups are in {len(fns)} functions no "
                          "signature runs (e.g. tf-keras' per-layer traces): rounded too, but not counted as the "
                          "model's convolutions")  # fmt: skip
    return len(off)


def _plan_meta_graphs(sm, cfg: QuantizeConfig, registry: Optional[Registry], source: Path) -> List[Plan]:
    """One plan per meta graph (each is its own graph and is rounded on its own)."""
    plans = []
    for i, mg in enumerate(sm.meta_graphs):
        try:
            plan, _ = plan_graph_def(mg.graph_def, cfg, registry)
        except ValueError as e:
            raise SavedModelError(f"{source}: {e}") from None
        # a top-level group ending at a tensor nothing reads and no signature names: a rounding
        # there could only be fetched under a new name, so it is skipped (and said so)
        outputs = {tensor_node(t) for t in _signature_outputs(mg)}
        sinks = set(_sinks(mg.graph_def)) - outputs
        keep = []
        for p in plan.points:
            if p.what == "activations" and not p.scope and p.after in sinks:
                plan.skipped.append((p.path, p.target_kind, f"meta graph {_tags(mg, i)}: {p.after} is an output no signature "
                                     "names (fetched by name only), so a rounding after it would never be read"))
            else:
                keep.append(p)
        plan.points[:] = keep
        plan.unreachable = _count_unreachable(plan, mg)
        plans.append(plan)
    return plans


def _combine(plans: List[Plan], sm) -> Plan:
    """The plans of several meta graphs as one (for the table and the report), each point once per graph."""
    if len(plans) == 1:
        return plans[0]
    notes, start = [], 0
    for i, (mg, p) in enumerate(zip(sm.meta_graphs, plans)):
        rows = f"points {start}-{start + len(p.points) - 1}" if p.points else "no points"
        notes.append(f"meta graph {_tags(mg, i)}: {rows} ({len(p.targets)} convolutions)")
        start += len(p.points)
    return replace(
        plans[0],
        points=[pt for p in plans for pt in p.points],
        skipped=[s for p in plans for s in p.skipped],
        notes=list(dict.fromkeys(n for p in plans for n in p.notes)) + notes,
    )


def _plan_saved_model(sm, cfg: QuantizeConfig, registry: Optional[Registry], source: Path) -> Plan:
    return _combine(_plan_meta_graphs(sm, cfg, registry, source), sm)


def inspect_saved_model(
    path: PathLike,
    bits: Optional[int] = None,
    *,
    format: Optional[FormatLike] = None,
    rounding: str = "nearest",
    range: Optional[Tuple[float, float]] = None,
    weights: Optional[bool] = None,
    config: Optional[QuantizeConfig] = None,
    registry: Optional[Registry] = None,
    **options: Any,
) -> Plan:
    """The insertion plan for a SavedModel, without writing anything.

    ``print(plan)`` shows the table; ``plan.to_dict()`` the data. Arguments as
    in :func:`convert_saved_model` (neither ``bits`` nor ``format``: ``bits=8``;
    ``config``: a prepared :class:`~graphquant.plan.QuantizeConfig` instead of
    the keyword options).
    """
    cfg = config_from_kwargs(bits, format, rounding, range, weights, config, **options)
    sm = read_saved_model(path)
    return _plan_saved_model(sm, cfg, registry, Path(path))


def _requantize_check(what: str, allow: bool, warnings: List[str]) -> None:
    """Refuse an already quantized source unless ``allow``; else warn (log + ``warnings``)."""
    if not isinstance(allow, bool):
        raise TypeError(f"allow_requantize must be a bool, got {allow!r}")
    if not allow:
        raise ValueError(f"{what}; pass allow_requantize=True (CLI: --force) to stack a second rounding")
    msg = f"{what}: stacking a second rounding (allow_requantize=True)"
    log.warning(msg)
    warnings.append(msg)


# --------------------------------------------------------------------------- writing
def _copy_tree_except(src: Path, dst: Path, skip: Tuple[str, ...]) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for child in src.iterdir():
        if child.name in skip:
            continue
        if child.is_dir():
            shutil.copytree(child, dst / child.name)
        else:
            shutil.copy2(child, dst / child.name)


def _check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    s, d = src.resolve(), dst.resolve()
    if d == s or s in d.parents:
        raise ValueError(f"destination {dst} is inside the source {src}; the source is never modified")
    if d in s.parents:
        raise ValueError(f"destination {dst} contains the source {src}; choose another destination")
    outputs.check_replaceable(dst, overwrite)


def _check_source(src: Path) -> None:
    """Refuse, before any work, a source with links out of its folder or an unreadable checkpoint."""
    import tensorflow as tf

    try:
        outputs.check_links(src)
    except ValueError as e:
        raise SavedModelError(str(e)) from None
    index = src / "variables" / "variables.index"
    if index.is_file():
        try:  # every tensor is read once: a truncated data file fails here, naming the folder
            reader = tf.train.load_checkpoint(str(src / "variables" / "variables"))
            for key in reader.get_variable_to_dtype_map():
                reader.get_tensor(key)
        except Exception as e:  # noqa: BLE001 - any reader error means the variables do not load
            raise SavedModelError(f"{src / 'variables'}: the variables do not load ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _publish(work: Path, dst: Path, tmp_root: Path) -> None:
    """Move the finished ``work`` folder to ``dst`` atomically (old output moved aside first)."""
    if dst.exists():
        if dst.is_dir() and not any(dst.iterdir()):
            dst.rmdir()
        else:
            os.rename(dst, tmp_root / "previous")
    os.rename(work, dst)


def _verify_output(work: Path, src: Path, sm) -> None:
    """Load the written SavedModel back (each meta graph by its tags): signatures resolve, variables restore.

    Raises :class:`SavedModelError`; it names the source when the source itself does not load.
    """
    import tensorflow as tf

    def load_all(path: Path) -> None:
        several = len(sm.meta_graphs) > 1
        for mg in sm.meta_graphs:
            tags = list(mg.meta_info_def.tags) if several else None
            loaded = tf.saved_model.load(str(path), tags=tags)
            missing = [k for k in mg.signature_def if not k.startswith("__") and k not in loaded.signatures]
            if missing:
                raise ValueError(f"signatures {missing} do not resolve")
            del loaded

    try:
        load_all(work)
    except Exception as e:  # noqa: BLE001 - first find out whose fault it is
        try:
            load_all(src)
        except Exception as e_src:  # noqa: BLE001
            raise SavedModelError(f"{src}: the SavedModel does not load ({_first_line(e_src)})") from None
        raise SavedModelError(f"{src}: the converted model does not load back ({_first_line(e)}); nothing written") from None


def options_record(
    bits: Optional[int] = None,
    *,
    format: Optional[FormatLike] = None,
    rounding: str = "nearest",
    range: Optional[Tuple[float, float]] = None,
    weights: Optional[bool] = None,
    calibration_data: Optional[DataLike] = None,
    calibration_signature: str = "serving_default",
    calibration_method: str = "minmax",
    calibration_percentile: float = 99.99,
    config: Optional[QuantizeConfig] = None,
    registry: Optional[Registry] = None,
    seed: Optional[int] = None,
    allow_requantize: bool = False,
    **options: Any,
) -> Dict[str, Any]:
    """What a conversion with these keywords records in its manifest (and a rerun compares)."""
    cfg = config_from_kwargs(bits, format, rounding, range, weights, config, **options)
    return _record(cfg, calibration_data, calibration_signature, calibration_method, calibration_percentile,
                   registry, seed)


def _record(cfg: QuantizeConfig, calibration_data: Any, calibration_signature: str, calibration_method: str,
            calibration_percentile: float, registry: Optional[Registry], seed: Optional[int]) -> Dict[str, Any]:
    """The manifest record of a conversion by ``cfg`` (see :func:`options_record`)."""
    return outputs.canonical_options({
        "config": cfg.to_dict(),
        "seed": seed,
        "calibration_data": outputs.fingerprint_data(calibration_data),
        "calibration_signature": calibration_signature if calibration_data is not None else None,
        "calibration_method": calibration_method if calibration_data is not None else None,
        **({"calibration_percentile": float(calibration_percentile)}
           if calibration_data is not None and calibration_method == "percentile" else {}),  # fmt: skip
        "registry": None if registry is None else repr(registry),
    })


def _write_failed(e: BaseException, dst: Path) -> BaseException:
    """A one-line error for a write that failed for want of space (or another OS reason)."""
    import tensorflow as tf

    if isinstance(e, tf.errors.ResourceExhaustedError) or getattr(e, "errno", None) in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return OSError(errno.ENOSPC, f"writing {dst}: no space left on the device ({_first_line(e)}); nothing written")
    if isinstance(e, tf.errors.OpError):
        return OSError(f"writing {dst} failed ({_first_line(e)}); nothing written")
    return e


# --------------------------------------------------------------------------- calibration
def _calibrate(sm, src: Path, plans: List[Plan], data: Any, signature: str, method: str, tmp_root: Path,
               verbose: Optional[bool] = None, percentile: float = 99.99) -> Dict[str, Tuple[float, float]]:  # fmt: skip
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2

    collector = RangeCollector(method, percentile)
    obs = saved_model_pb2.SavedModel()
    obs.CopyFrom(sm)
    for mg, plan in zip(obs.meta_graphs, plans):
        redirects: Dict[str, str] = {}
        insert_observers(mg.graph_def, plan, collector, redirects)
        _redirect_signatures(mg, redirects)
    cal = tmp_root / "calibration"
    cal.mkdir()
    (cal / "saved_model.pb").write_bytes(obs.SerializeToString())
    for sub in ("variables", "assets"):
        if (src / sub).exists():
            os.symlink((src / sub).resolve(), cal / sub)
    try:
        loaded = tf.saved_model.load(str(cal))
        if signature not in loaded.signatures:
            raise ValueError(
                f"calibration_signature: {src} has no signature {signature!r} (has {sorted(loaded.signatures)})"
            )
        fn = loaded.signatures[signature]
        engine.rebind_loaded(list(collector.observers.values()), [fn.graph.as_graph_def()])
        _, kw_specs = fn.structured_input_signature
        specs = {k: (None if v.shape.rank is None else tuple(v.shape.as_list()), v.dtype) for k, v in kw_specs.items()}

        def feed_of(batch: Any) -> Dict[str, Any]:
            if isinstance(batch, dict):
                return batch
            if len(kw_specs) != 1:
                got = str(tuple(int(d) for d in batch.shape)) if hasattr(batch, "shape") else type(batch).__name__
                raise ValueError(f"calibration_data: signature {signature!r} takes {inputs_str(specs)}, got one array "
                                 f"{got}; pass a dict of arrays")
            return {next(iter(kw_specs)): batch}

        batches = calibration_batches(data, check=lambda b: check_inputs(feed_of(b), specs))
        for batch in progress(batches, "calibrating", verbose):
            engine.call_unoptimized(fn, **{k: tf.convert_to_tensor(v, dtype=kw_specs[k].dtype)
                                           for k, v in feed_of(batch).items()})  # fmt: skip
        del loaded, fn
        return collector.ranges()
    finally:
        collector.release()
        shutil.rmtree(cal, ignore_errors=True)


# --------------------------------------------------------------------------- checkpoint weights
def _variable_checkpoint_keys(mg, scope: str, arg_name: str, keys_by_node: Dict[int, str]) -> List[str]:
    """Checkpoint keys of the variable(s) bound to a function's resource argument."""
    lib = {f.signature.name: f for f in mg.graph_def.library.function}
    og = mg.object_graph_def
    results: List[str] = []
    seen = set()

    def node_key(node_id: int) -> Optional[str]:
        return keys_by_node.get(node_id)

    def resolve(fname: str, arg_index: int, depth: int = 0) -> None:
        if depth > 12 or (fname, arg_index) in seen:
            return
        seen.add((fname, arg_index))
        fdef = lib[fname]
        n_args = len(fdef.signature.input_arg)
        cf = og.concrete_functions.get(fname)
        if cf is not None and len(cf.bound_inputs):
            n_bound = len(cf.bound_inputs)
            k = arg_index - (n_args - n_bound)
            if 0 <= k < n_bound:
                key = node_key(cf.bound_inputs[k])
                if key:
                    results.append(key)
                    return
        # otherwise: follow the callers
        for caller in lib.values():
            for nd in caller.node_def:
                callee = nd.attr["f"].func.name if nd.op in ("PartitionedCall", "StatefulPartitionedCall") else nd.op
                if callee != fname:
                    continue
                data = [r for r in nd.input if not r.startswith("^")]
                if arg_index >= len(data):
                    continue
                ref = data[arg_index]
                head = ref.split(":", 1)[0]
                names = [a.name for a in caller.signature.input_arg]
                if head in names and ":" not in ref:
                    resolve(caller.signature.name, names.index(head), depth + 1)

    fdef = lib[scope]
    names = [a.name for a in fdef.signature.input_arg]
    if arg_name in names:
        resolve(scope, names.index(arg_name))
    return results


def _tf1_variable_keys(src: Path, mg, read_node: str) -> List[str]:
    """Checkpoint key of the top-level resource variable a TF1 ``ReadVariableOp`` reads (its name)."""
    import tensorflow as tf

    nodes = {n.name: n for n in mg.graph_def.node}
    handle = nodes.get(tensor_node(nodes[read_node].input[0]))
    if handle is None or handle.op != "VarHandleOp":
        return []
    key = handle.attr["shared_name"].s.decode() or handle.name
    saved = tf.train.load_checkpoint(str(src / "variables" / "variables")).get_variable_to_dtype_map()
    return [key] if key in saved else []


def load_object_keys(src: Path) -> Dict[int, str]:
    """Checkpoint key of each variable of ``src``'s object graph, by object-graph node id."""
    import tensorflow as tf
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    reader = tf.train.load_checkpoint(str(src / "variables" / "variables"))
    og = trackable_object_graph_pb2.TrackableObjectGraph()
    og.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    out = {}
    for i, node in enumerate(og.nodes):
        for a in node.attributes:
            if a.name == "VARIABLE_VALUE":
                out[i] = a.checkpoint_key
    return out


def _round_checkpoint(src: Path, work: Path, todo: Dict[str, Any], seed: Optional[int], warnings: List[str]) -> int:
    """Rewrite ``work/variables`` with the listed variables rounded; return how many. A variable
    of which more than half rounds to zero adds a message to ``warnings``."""
    import tensorflow as tf

    prefix = str(src / "variables" / "variables")
    reader = tf.train.load_checkpoint(prefix)
    dtypes = reader.get_variable_to_dtype_map()
    names, tensors = [], []
    done = 0
    for key in sorted(dtypes):
        val = reader.get_tensor(key)
        if key in todo:
            point = todo[key]
            q = round_weight_array(val, point.format, point.rounding, seed,
                                   depthwise=point.target_kind in DEPTHWISE_OPS).astype(val.dtype)
            msg = zeroed_weights_warning(f"{point.target} ({point.target_kind}.{point.slot or 'input:1'}, "
                                         f"variable {key})", val, q, point.format)
            if msg:
                warnings.append(msg)
            val = q
            done += 1
        names.append(key)
        tensors.append(tf.constant(val, dtype=dtypes[key]) if not isinstance(val, (bytes, str)) else tf.constant(val))
    out_dir = work / "variables"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir()
    tf.raw_ops.SaveV2(
        prefix=str(out_dir / "variables"),
        tensor_names=names,
        shape_and_slices=[""] * len(names),
        tensors=tensors,
    )
    return done


# --------------------------------------------------------------------------- convert
def convert_saved_model(
    src: PathLike,
    dst: PathLike,
    bits: Optional[int] = None,
    *,
    format: Optional[FormatLike] = None,
    rounding: str = "nearest",
    range: Optional[Tuple[float, float]] = None,
    weights: Optional[bool] = None,
    calibration_data: Optional[DataLike] = None,
    calibration_signature: str = "serving_default",
    calibration_method: str = "minmax",
    calibration_percentile: float = 99.99,
    overwrite: bool = False,
    verbose: Optional[bool] = None,
    config: Optional[QuantizeConfig] = None,
    registry: Optional[Registry] = None,
    seed: Optional[int] = None,
    allow_requantize: bool = False,
    **options: Any,
) -> ConversionReport:
    """Convert a SavedModel: rounding after every convolution group, written to ``dst``.

    >>> report = convert_saved_model("models/resnet", "out/resnet-q8", bits=8, calibration_data=batch)
    >>> report = convert_saved_model(src, dst, format="e4m3", weights=True)

    Args:
        src: the SavedModel folder (never modified).
        dst: the output folder; written atomically (a temporary folder beside
            it, renamed when complete, after the output was loaded back and
            its signatures resolved). It must not exist or be empty; with
            ``overwrite=True`` it may also be an earlier graphquant output
            (recognised by its manifest, ``graphquant.json``, which lists
            every file it wrote). Nothing else is ever replaced. The output
            gets its own manifest: graphquant's version, the source and a
            fingerprint of its files, the options and the counts.
        bits, format, range, rounding, weights: as in ``quantize_model``.
            ``bits`` alone means affine ranges from ``calibration_data`` (or,
            without data, each batch's own min/max at run time); neither
            ``bits`` nor ``format``: ``bits=8``, as in ``quantize_model``. A
            SavedModel has no ``training`` flag: ``rounding`` is applied at
            every call.
        calibration_data: a numpy array (single-input signature), a dict of
            arrays keyed by the signature's input names, a ``tf.data.Dataset``
            or an iterable of such batches, fed to ``calibration_signature``.
        calibration_method: ``"minmax"``, ``"percentile"``, ``"mse"`` or
            ``"entropy"`` (see :mod:`graphquant.calibration`).
        calibration_percentile: ``p`` of ``"percentile"``, in (50, 100] (default 99.99).
        verbose: a progress bar while calibrating (``None``: when stderr is a
            terminal and calibration runs longer than a second).
        weights: also round convolution weights. Variables are rounded once
            in the written checkpoint (no run-time cost); constants of a
            frozen graph are rounded in place.
        config: a prepared :class:`~graphquant.plan.QuantizeConfig` (instead of
            the keyword options; giving both is a ``ValueError``).
        registry: the pattern registry (default: the shared default).
        seed: seed for stochastic rounding.
        allow_requantize: convert a SavedModel that already holds graphquant
            rounding nodes (its output was converted before), stacking a
            second rounding on the first; logged, and noted in the report's
            ``warnings``, ``requantized`` and plan notes. Without it such a
            source is an error (CLI: ``--force``).
        **options: further :class:`~graphquant.plan.QuantizeConfig` keywords
            (``include``, ``exclude``, ``overrides``, ``weight_bits``, ...).

    Returns:
        A :class:`ConversionReport` (convolutions found, nodes inserted, seconds).
        When no convolution matches, a ``UserWarning`` (also logged and in the
        report's ``warnings``) says so and the model is copied unchanged.

    Raises:
        SavedModelError (a ``ValueError``): ``src`` is missing, not a
            SavedModel, or corrupt; or an inserted rounding would reach no
            signature output (a dead insertion is never reported as success).
        ValueError: ``src`` is already quantized and ``allow_requantize`` is False.
        FileExistsError: ``dst`` holds something graphquant did not write, or
            an earlier output and ``overwrite`` is False.
        OSError: the output could not be written (e.g. no space left);
            nothing is left behind.
        ValueError / TypeError: an invalid option (the message names it; a
            ``config`` that is not a ``QuantizeConfig`` is a ``TypeError``), or
            an unsupported dtype at a convolution.
    """
    t0 = time.perf_counter()
    cfg = config_from_kwargs(bits, format, rounding, range, weights, config, **options)
    src_p, dst_p = Path(src), Path(dst)
    sm = read_saved_model(src_p)
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be a bool, got {overwrite!r}")
    _check_destination(src_p, dst_p, overwrite)
    _check_source(src_p)
    record = _record(cfg, calibration_data, calibration_signature, calibration_method, calibration_percentile,
                     registry, seed)
    fingerprint = outputs.fingerprint_tree(src_p)
    warned: List[str] = []
    plans, plan, existing = _plan_conversion(sm, src_p, cfg, registry, allow_requantize, warned)
    plan.check_calibration(calibration_data, calibration_method, calibration_percentile)
    dst_p.parent.mkdir(parents=True, exist_ok=True)
    outputs.remove_stale_tmp(dst_p.parent)  # left by a conversion that was killed
    tmp_root = outputs.make_tmp_dir(dst_p)
    try:
        ranges: Dict[str, Tuple[float, float]] = {}
        need = needs_calibration(plan)
        if need and calibration_data is not None:
            ranges = _calibrate(sm, src_p, plans, calibration_data, calibration_signature, calibration_method, tmp_root,
                                verbose, calibration_percentile)  # fmt: skip
        elif need:
            plan.notes.append("no calibration data: affine ranges are each batch's own min/max (dynamic)")
        edits = _edit_meta_graphs(sm, plans, src_p, ranges, seed, warned)
        work = tmp_root / "out"
        _write_output(sm, src_p, dst_p, work, edits, seed, warned,
                      outputs.make_manifest("saved_model", src_p, fingerprint, record))
        _verify_output(work, src_p, sm)
        _publish(work, dst_p, tmp_root)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    report = ConversionReport(
        source=str(src_p),
        destination=str(dst_p),
        convolutions=edits.result["convolutions"],
        inserted=edits.inserted,
        prerounded=edits.prerounded,
        seconds=time.perf_counter() - t0,
        signatures=_signature_names(sm),
        plan=plan,
        ranges=ranges,
        warnings=warned,
        meta_graphs=edits.meta_graphs,
        requantized=existing,
        unreachable_convolutions=sum(m["unreachable_convolutions"] for m in edits.meta_graphs),
    )
    log.info("%s", report)
    return report


def _plan_conversion(sm, src: Path, cfg: QuantizeConfig, registry: Optional[Registry], allow_requantize: bool,
                     warned: List[str]) -> Tuple[List[Plan], Plan, int]:  # fmt: skip
    """The plan of each meta graph, their combination, and how many graphquant rounding nodes the source
    already has (refused unless ``allow_requantize``). No convolution matched is a ``UserWarning`` at
    ``convert_saved_model``'s caller, logged and added to ``warned``, like every warning of a conversion."""
    existing = sum(len(rounding_nodes(mg.graph_def)) for mg in sm.meta_graphs)
    if existing:
        _requantize_check(f"{src}: already quantized ({existing} graphquant rounding nodes)", allow_requantize, warned)
    plans = _plan_meta_graphs(sm, cfg, registry, src)
    plan = _combine(plans, sm)
    if existing:
        plan.notes.append(f"requantized: the source already had {existing} graphquant rounding nodes; a second rounding is stacked")
    if not plan.targets:
        msg = no_match_message(str(src), "the model is copied unchanged")
        warnings.warn(msg, UserWarning, stacklevel=3)
        log.warning("%s", msg)
        warned.append(msg)
    return plans, plan, existing


@dataclass
class _Edits:
    """What :func:`_edit_meta_graphs` did to the graphs (and :func:`_write_output` to the checkpoint)."""

    meta_graphs: List[Dict[str, Any]] = field(default_factory=list)  # ConversionReport.meta_graphs
    inserted: int = 0
    prerounded: int = 0  # weight tensors rounded once: constants in place, then checkpoint variables
    checkpoint: Dict[str, InsertionPoint] = field(default_factory=dict)  # checkpoint key -> its weight point

    @property
    def result(self) -> Dict[str, int]:
        """The counts the manifest records."""
        return {"convolutions": sum(m["convolutions"] for m in self.meta_graphs), "inserted": self.inserted,
                "prerounded": self.prerounded}


def _edit_meta_graphs(sm, plans: List[Plan], src: Path, ranges: Dict[str, Tuple[float, float]], seed: Optional[int],
                      warned: List[str]) -> _Edits:  # fmt: skip
    """Apply each meta graph's plan to it in place (each once; a dead insertion is a
    :class:`SavedModelError`); weights held in variables are collected for the checkpoint."""
    has_ckpt = (src / "variables" / "variables.index").is_file()
    out = _Edits()
    for i, (mg, mplan) in enumerate(zip(sm.meta_graphs, plans)):
        sinks = _sinks(mg.graph_def)
        try:
            edits = apply_plan(mg.graph_def, mplan, ranges=ranges, seed=seed, variable_weights="skip" if has_ckpt else "runtime")
            _redirect_signatures(mg, edits["editor"].redirects)
            check_live(mg.graph_def, edits["inserted_at"], model=f"meta graph {_tags(mg, i)}",
                       outputs=_signature_outputs(mg) + sinks, functions=list(mg.object_graph_def.concrete_functions))
        except ValueError as e:
            raise SavedModelError(f"{src}: {e}") from None
        off = getattr(mplan, "unreachable", 0)
        out.meta_graphs.append({"tags": list(mg.meta_info_def.tags), "convolutions": len(mplan.targets) - off,
                                "inserted": len(edits["inserted"]), "unreachable_convolutions": off})
        out.inserted += len(edits["inserted"])
        out.prerounded += len(edits["prerounded"])
        for msg in edits["warnings"]:
            log.warning("%s", msg)
            warned.append(msg)
        if edits["variable_weights"]:
            out.checkpoint.update(_checkpoint_weights(src, mg, edits["variable_weights"]))
    return out


def _checkpoint_weights(src: Path, mg, variable_weights: List[Tuple[str, str, InsertionPoint]]) -> Dict[str, InsertionPoint]:
    """Checkpoint key -> weight point for the variables behind a meta graph's ``(scope, read node, point)``."""
    keys_by_node = load_object_keys(src) if mg.object_graph_def.nodes else {}
    todo: Dict[str, InsertionPoint] = {}
    for scope, read_node, point in variable_weights:
        if not scope:  # TF1: a top-level variable, saved under its own name
            keys = _tf1_variable_keys(src, mg, read_node)
        else:
            fdef = next(f for f in mg.graph_def.library.function if f.signature.name == scope)
            rd = next(n for n in fdef.node_def if n.name == read_node)
            arg = rd.input[0].split(":", 1)[0]
            keys = _variable_checkpoint_keys(mg, scope, arg, keys_by_node)
        if not keys:
            raise SavedModelError(f"{src}: cannot find the variable behind {point.target} in the checkpoint")
        for k in keys:
            todo[k] = point
    return todo


def _write_output(sm, src: Path, dst: Path, work: Path, edits: _Edits, seed: Optional[int], warned: List[str],
                  manifest: Dict[str, Any]) -> None:  # fmt: skip
    """Write the converted SavedModel into ``work``: the source's other files, the checkpoint (its
    planned weights rounded, added to ``edits.prerounded``), ``saved_model.pb`` and the manifest with
    the counts. A failed write is one line (:func:`_write_failed`)."""
    try:
        _copy_tree_except(src, work, skip=("saved_model.pb", "saved_model.pbtxt", "fingerprint.pb", "variables",
                                           outputs.MANIFEST))
        if edits.checkpoint:
            zeroed: List[str] = []
            edits.prerounded += _round_checkpoint(src, work, edits.checkpoint, seed, zeroed)
            for msg in zeroed:
                log.warning("%s", msg)
                warned.append(msg)
        elif (src / "variables").exists():
            shutil.copytree(src / "variables", work / "variables")
        (work / "saved_model.pb").write_bytes(sm.SerializeToString())
        outputs.write_manifest(work, dict(manifest, result=edits.result))
    except Exception as e:  # noqa: BLE001 - a full disk is one line, not a traceback
        raise _write_failed(e, dst) from None
