"""SavedModel conversion: read the protobuf, plan, edit, write atomically.

The conversion edits ``saved_model.pb`` directly: the function-library bodies
get rounding nodes; the object graph, the signatures and the variables are
carried over unchanged, so every signature keeps its name, input and output
structure and dtypes. Nothing is traced from the model, which keeps the
conversion close to the cost of copying the files.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from google.protobuf.message import DecodeError

from ..patterns import Registry
from ..plan import Plan, QuantizeConfig
from ..ranges import calibration_batches, check_inputs
from .calibrate import RangeCollector, insert_observers, needs_calibration
from .function import config_from_kwargs
from .planning import DEPTHWISE_OPS, apply_plan, plan_graph_def, round_weight_array

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
_TMP_MARK = ".graphquant-tmp-"


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
        warnings: human-readable warnings (e.g. no convolution found).
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
            "plan": self.plan.to_dict(),
        }

    def __str__(self) -> str:
        return (
            f"{self.source} -> {self.destination}: {self.convolutions} convolutions, "
            f"{self.inserted} graphquant nodes, {self.prerounded} weights pre-rounded, {self.seconds:.2f} s"
        )


def is_saved_model(path: PathLike) -> bool:
    """True when ``path`` is a folder holding ``saved_model.pb`` (or ``.pbtxt``)."""
    p = Path(path)
    return p.is_dir() and ((p / "saved_model.pb").is_file() or (p / "saved_model.pbtxt").is_file())


def read_saved_model(path: PathLike):
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


def _plan_saved_model(sm, cfg: QuantizeConfig, registry: Optional[Registry], source: Path) -> Plan:
    plans = []
    for mg in sm.meta_graphs:
        try:
            plan, _ = plan_graph_def(mg.graph_def, cfg, registry)
        except ValueError as e:
            raise SavedModelError(f"{source}: {e}") from None
        plans.append(plan)
    plan = plans[0]
    for extra in plans[1:]:  # TF2 SavedModels have one meta graph; TF1 may have several
        plan.points.extend(extra.points)
    return plan


def inspect_saved_model(
    path: PathLike,
    bits: Optional[int] = None,
    *,
    format: Any = None,
    rounding: str = "nearest",
    range: Optional[Tuple[float, float]] = None,
    weights: Optional[bool] = None,
    registry: Optional[Registry] = None,
    **config: Any,
) -> Plan:
    """The insertion plan for a SavedModel, without writing anything.

    ``print(plan)`` shows the table; ``plan.to_dict()`` the data. Arguments as
    in :func:`convert_saved_model` (neither ``bits`` nor ``format``: ``bits=8``).
    """
    if format is None and bits is None:
        bits = 8
    cfg = config_from_kwargs(bits, format, rounding, range, weights, **config)
    sm = read_saved_model(path)
    return _plan_saved_model(sm, cfg, registry, Path(path))


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
    if dst.exists():
        if not dst.is_dir():
            raise FileExistsError(f"destination {dst} exists and is not a folder")
        if any(dst.iterdir()) and not overwrite:
            raise FileExistsError(f"destination {dst} is not empty (pass overwrite=True / --overwrite to replace it)")


def _publish(work: Path, dst: Path, tmp_root: Path) -> None:
    """Move the finished ``work`` folder to ``dst`` atomically (old output moved aside first)."""
    if dst.exists():
        if dst.is_dir() and not any(dst.iterdir()):
            dst.rmdir()
        else:
            os.rename(dst, tmp_root / "previous")
    os.rename(work, dst)


# --------------------------------------------------------------------------- calibration
def _calibrate(sm, src: Path, plan: Plan, data: Any, signature: str, method: str, tmp_root: Path) -> Dict[str, Tuple[float, float]]:
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2

    collector = RangeCollector(method)
    obs = saved_model_pb2.SavedModel()
    obs.CopyFrom(sm)
    for mg in obs.meta_graphs:
        insert_observers(mg.graph_def, plan, collector)
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
        _, kw_specs = fn.structured_input_signature
        specs = {k: (None if v.shape.rank is None else tuple(v.shape.as_list()), v.dtype) for k, v in kw_specs.items()}

        def feed_of(batch: Any) -> Dict[str, Any]:
            if isinstance(batch, dict):
                return batch
            if len(kw_specs) != 1:
                raise ValueError(
                    f"calibration_data: signature {signature!r} takes {sorted(kw_specs)}; pass a dict of arrays"
                )
            return {next(iter(kw_specs)): batch}

        for batch in calibration_batches(data, check=lambda b: check_inputs(feed_of(b), specs)):
            fn(**{k: tf.convert_to_tensor(v, dtype=kw_specs[k].dtype) for k, v in feed_of(batch).items()})
        del loaded, fn
    finally:
        collector.release()
        shutil.rmtree(cal, ignore_errors=True)
    return collector.ranges()


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


def _load_object_keys(src: Path) -> Dict[int, str]:
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


def _round_checkpoint(src: Path, work: Path, todo: Dict[str, Any], seed: Optional[int]) -> int:
    """Rewrite ``work/variables`` with the listed variables rounded; return how many."""
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
            val = round_weight_array(val, point.format, point.rounding, seed,
                                     depthwise=point.target_kind in DEPTHWISE_OPS).astype(val.dtype)
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
    format: Any = None,
    rounding: str = "nearest",
    range: Optional[Tuple[float, float]] = None,
    weights: Optional[bool] = None,
    calibration_data: Any = None,
    calibration_signature: str = "serving_default",
    calibration_method: str = "minmax",
    overwrite: bool = False,
    registry: Optional[Registry] = None,
    seed: Optional[int] = None,
    **config: Any,
) -> ConversionReport:
    """Convert a SavedModel: rounding after every convolution group, written to ``dst``.

    >>> report = convert_saved_model("models/resnet", "out/resnet-q8", bits=8, calibration_data=batch)
    >>> report = convert_saved_model(src, dst, format="e4m3", weights=True)

    Args:
        src: the SavedModel folder (never modified).
        dst: the output folder; written atomically (a temporary folder beside
            it, renamed when complete). Must not exist or be empty unless
            ``overwrite=True``.
        bits, format, range, rounding, weights: as in ``quantize_model``.
            ``bits`` alone means affine ranges from ``calibration_data`` (or,
            without data, each batch's own min/max at run time). A SavedModel
            has no ``training`` flag: ``rounding`` is applied at every call.
        calibration_data: a numpy array (single-input signature), a dict of
            arrays keyed by the signature's input names, a ``tf.data.Dataset``
            or an iterable of such batches, fed to ``calibration_signature``.
        calibration_method: ``"minmax"`` or ``"percentile"``.
        weights: also round convolution weights. Variables are rounded once
            in the written checkpoint (no run-time cost); constants of a
            frozen graph are rounded in place.
        registry: the pattern registry (default: the shared default).
        seed: seed for stochastic rounding.
        **config: further :class:`~graphquant.plan.QuantizeConfig` keywords.

    Returns:
        A :class:`ConversionReport` (convolutions found, nodes inserted, seconds).

    Raises:
        SavedModelError (a ``ValueError``): ``src`` is missing, not a
            SavedModel, or corrupt.
        FileExistsError: ``dst`` is not empty and ``overwrite`` is False.
        ValueError / TypeError: an invalid option (the message names it), or
            an unsupported dtype at a convolution.
    """
    t0 = time.perf_counter()
    cfg = config_from_kwargs(bits, format, rounding, range, weights, **config)
    src_p, dst_p = Path(src), Path(dst)
    sm = read_saved_model(src_p)
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be a bool, got {overwrite!r}")
    _check_destination(src_p, dst_p, overwrite)
    plan = _plan_saved_model(sm, cfg, registry, src_p)
    plan.check_calibration(calibration_data, calibration_method)
    warnings: List[str] = []
    if not plan.targets:
        msg = f"{src_p}: no convolution found; the model is copied unchanged"
        log.warning(msg)
        warnings.append(msg)

    dst_p.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{dst_p.name}{_TMP_MARK}", dir=dst_p.parent))
    try:
        ranges: Dict[str, Tuple[float, float]] = {}
        need = needs_calibration(plan)
        if need and calibration_data is not None:
            ranges = _calibrate(sm, src_p, plan, calibration_data, calibration_signature, calibration_method, tmp_root)
        elif need:
            plan.notes.append("no calibration data: affine ranges are each batch's own min/max (dynamic)")
        has_ckpt = (src_p / "variables" / "variables.index").is_file()
        inserted, prerounded = 0, 0
        ckpt_todo: Dict[str, Any] = {}
        for mg in sm.meta_graphs:
            try:
                edits = apply_plan(mg.graph_def, plan, ranges=ranges, seed=seed, variable_weights="skip" if has_ckpt else "runtime")
            except ValueError as e:
                raise SavedModelError(f"{src_p}: {e}") from None
            inserted += len(edits["inserted"])
            prerounded += len(edits["prerounded"])
            if edits["variable_weights"]:
                keys_by_node = _load_object_keys(src_p)
                for scope, read_node, point in edits["variable_weights"]:
                    fdef = next(f for f in mg.graph_def.library.function if f.signature.name == scope)
                    rd = next(n for n in fdef.node_def if n.name == read_node)
                    arg = rd.input[0].split(":", 1)[0]
                    keys = _variable_checkpoint_keys(mg, scope, arg, keys_by_node)
                    if not keys:
                        raise SavedModelError(f"{src_p}: cannot find the variable behind {point.target} in the checkpoint")
                    for k in keys:
                        ckpt_todo[k] = point
        work = tmp_root / "out"
        _copy_tree_except(src_p, work, skip=("saved_model.pb", "saved_model.pbtxt", "fingerprint.pb", "variables"))
        if ckpt_todo:
            prerounded += _round_checkpoint(src_p, work, ckpt_todo, seed)
        elif (src_p / "variables").exists():
            shutil.copytree(src_p / "variables", work / "variables")
        (work / "saved_model.pb").write_bytes(sm.SerializeToString())
        _publish(work, dst_p, tmp_root)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    report = ConversionReport(
        source=str(src_p),
        destination=str(dst_p),
        convolutions=len(plan.targets),
        inserted=inserted,
        prerounded=prerounded,
        seconds=time.perf_counter() - t0,
        signatures=_signature_names(sm),
        plan=plan,
        ranges=ranges,
        warnings=warnings,
    )
    log.info("%s", report)
    return report
