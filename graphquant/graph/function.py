"""``quantize_function``: rewrite a ``tf.function`` / ``ConcreteFunction``."""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any, Dict, Optional, Tuple, Union

import tensorflow as tf

from ..patterns import Registry
from ..types import DataLike, FormatLike
from ..plan import Plan, QuantizeConfig, no_match_message, resolve_config
from ..ranges import calibration_batches, check_inputs
from ..calibration import progress
from .calibrate import RangeCollector, insert_observers, needs_calibration
from .liveness import check_live
from .apply import apply_plan
from .planning import plan_graph_def
from .rewrite import follow_redirects, rounding_nodes

log = logging.getLogger(__name__)

__all__ = ["quantize_function", "QuantizedFunction", "config_from_kwargs"]


def config_from_kwargs(
    bits: Optional[int] = None,
    format: Optional[FormatLike] = None,
    rounding: str = "nearest",
    range: Optional[Tuple[float, float]] = None,
    weights: Optional[bool] = None,
    config: Optional[QuantizeConfig] = None,
    **options: Any,
) -> QuantizeConfig:
    """The :class:`~graphquant.plan.QuantizeConfig` of a graph front-end call: ``config`` or the
    keywords, not both (:func:`graphquant.plan.resolve_config`); neither ``bits`` nor ``format``
    is 8-bit affine, as in ``quantize_model``."""
    given = dict(options, bits=bits, format=format, rounding=rounding, range=range, weights=weights)
    return resolve_config(config, given)


def _concrete(fn: Any) -> Any:
    if isinstance(fn, tf.types.experimental.ConcreteFunction):
        return fn
    if isinstance(fn, tf.types.experimental.PolymorphicFunction) or hasattr(fn, "get_concrete_function"):
        if getattr(fn, "input_signature", None) is None:
            raise TypeError(
                "fn: a tf.function without input_signature cannot be rewritten; pass "
                "tf.function(f, input_signature=[...]) or f.get_concrete_function(spec)"
            )
        return fn.get_concrete_function()
    raise TypeError(f"fn must be a tf.function with an input_signature or a ConcreteFunction, got {type(fn).__name__}")


def _import(graph_def, cf, redirects: Optional[Dict[str, str]] = None) -> Any:
    """Import an edited copy of ``cf``'s graph as a pruned function with the same captures.

    ``redirects`` maps output tensors that were rounded in place of themselves
    (an output that is the end of a group) to the rounded tensor.
    """
    captures = {internal.name: external for external, internal in cf.graph.captures}

    def body():
        g = tf.compat.v1.get_default_graph()
        imap = {k: g.capture(e) for k, e in captures.items()}
        tf.graph_util.import_graph_def(graph_def, input_map=imap, name="")

    wrapped = tf.compat.v1.wrap_function(body, [])
    n_user = len(cf.inputs) - len(cf.graph.captures)
    feeds = [wrapped.graph.get_tensor_by_name(t.name) for t in cf.inputs[:n_user]]
    fetches = [wrapped.graph.get_tensor_by_name(follow_redirects(redirects or {}, t.name)) for t in cf.outputs]
    return wrapped.prune(feeds, fetches)


def _library_copy(graph_def) -> Dict[str, Any]:
    """A copy of each library function of ``graph_def`` by name (what :func:`_rename_edited` compares with)."""
    out = {}
    for f in graph_def.library.function:
        out[f.signature.name] = type(f)()
        out[f.signature.name].CopyFrom(f)
    return out


def _rename_edited(graph_def, before: Dict[str, Any]) -> None:
    """Give the library functions whose body differs from ``before`` (name -> FunctionDef, the
    unedited library) new names, and update every reference to them.

    The process may already hold a function of the same name with the
    unedited body (e.g. rewriting a function that was itself rewritten), and
    TensorFlow refuses two definitions under one name.
    """
    import hashlib

    from .rewrite import rename_functions

    mapping = {}
    for f in graph_def.library.function:
        name = f.signature.name
        if name in before and f != before[name]:
            digest = hashlib.sha1(f.SerializeToString(deterministic=True)).hexdigest()[:10]
            mapping[name] = f"{name}_graphquant_{digest}"
    if not mapping:
        return
    for nd in graph_def.node:
        rename_functions(nd, mapping)
    for f in graph_def.library.function:
        if f.signature.name in mapping:
            f.signature.name = mapping[f.signature.name]
        for nd in f.node_def:
            rename_functions(nd, mapping)
    for g in graph_def.library.gradient:
        if g.function_name in mapping:
            g.function_name = mapping[g.function_name]


class QuantizedFunction:
    """A rewritten function: call it like the original.

    Attributes:
        plan: the :class:`~graphquant.plan.Plan` that was applied.
        concrete_function: the pruned function over flat tensors.
        inserted: names of the inserted ``graphquant`` nodes.
    """

    def __init__(self, source, pruned, plan: Plan, inserted, ranges, seconds: float):
        self._source = source
        self.concrete_function = pruned
        self.plan = plan
        self.inserted = list(inserted)
        self.ranges = dict(ranges)
        self.seconds = seconds
        self.structured_input_signature = source.structured_input_signature
        self.structured_outputs = source.structured_outputs
        sig = tuple(self.structured_input_signature[0]) if not self.structured_input_signature[1] else None
        self.function = tf.function(self._call_structured, input_signature=sig, autograph=False)

    def _call_structured(self, *args, **kwargs):
        flat = tf.nest.flatten((args, kwargs), expand_composites=True)
        out = self.concrete_function(*flat)
        return tf.nest.pack_sequence_as(self.structured_outputs, out, expand_composites=True)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        sig_args, sig_kwargs = self.structured_input_signature
        if len(args) != len(sig_args):
            raise TypeError(f"expected {len(sig_args)} positional arguments, got {len(args)}")
        args = tf.nest.map_structure(
            lambda v, s: tf.convert_to_tensor(v, dtype=s.dtype) if isinstance(s, tf.TensorSpec) else v, tuple(args), tuple(sig_args)
        )
        return self.function(*args, **kwargs)

    def __repr__(self) -> str:
        return f"QuantizedFunction({len(self.inserted)} graphquant nodes)"


def _flat_inputs(cf, batch) -> Tuple[list, list]:
    """The batch as the flat argument list of ``cf``, and the names of those arguments."""
    sig_args, sig_kwargs = cf.structured_input_signature
    if isinstance(batch, dict) and sig_kwargs:
        flat = tf.nest.flatten(((), batch))
    elif isinstance(batch, (tuple, list)) and len(sig_args) > 1:
        flat = tf.nest.flatten((tuple(batch), {}))
    else:
        flat = [batch]
    n_user = len(cf.inputs) - len(cf.graph.captures)
    names = [t.name.split(":", 1)[0] for t in cf.inputs[:n_user]]
    return flat, names


def _check_flat(cf, batch) -> None:
    """Check a calibration batch against ``cf``'s input signature (shapes, dtypes) before it runs."""
    flat, names = _flat_inputs(cf, batch)
    specs = tf.nest.flatten(cf.structured_input_signature)
    if not all(isinstance(s, tf.TensorSpec) for s in specs):
        return  # composite or Python arguments: left to the function
    if len(flat) != len(specs):
        raise ValueError(f"calibration_data: the function takes {len(specs)} inputs {names}, got {len(flat)}")
    expected = {
        n: (None if s.shape.rank is None else tuple(s.shape.as_list()), s.dtype) for n, s in zip(names, specs)
    }
    check_inputs(dict(zip(names, flat)), expected)


def _run_flat(fn, cf, batch) -> None:
    flat, _ = _flat_inputs(cf, batch)
    specs = tf.nest.flatten(cf.structured_input_signature)
    flat = [tf.convert_to_tensor(v, dtype=s.dtype) for v, s in zip(flat, specs)]
    fn(*flat)


def quantize_function(
    fn: Union[tf.types.experimental.PolymorphicFunction, tf.types.experimental.ConcreteFunction],
    bits: Optional[int] = None,
    *,
    format: Optional[FormatLike] = None,
    rounding: str = "nearest",
    range: Optional[Tuple[float, float]] = None,
    weights: Optional[bool] = None,
    calibration_data: Optional[DataLike] = None,
    calibration_method: str = "minmax",
    calibration_percentile: float = 99.99,
    verbose: Optional[bool] = None,
    config: Optional[QuantizeConfig] = None,
    registry: Optional[Registry] = None,
    seed: Optional[int] = None,
    allow_requantize: bool = False,
    **options: Any,
) -> QuantizedFunction:
    """Rewrite a TensorFlow function so values are rounded after every convolution group.

    >>> qf = quantize_function(my_tf_function, bits=8)
    >>> y = qf(x)

    Args:
        fn: a ``tf.function`` with an ``input_signature``, or a ``ConcreteFunction``.
        bits, format, range, rounding, weights: as in ``quantize_model``:
            ``bits`` alone is affine with ranges from ``calibration_data``
            (without it, each batch's own min/max: a dynamic range);
            ``bits`` + ``range`` is fixed point; float formats need no range.
            Neither ``bits`` nor ``format``: ``bits=8``, as in ``quantize_model``.
        calibration_data: batches fed to ``fn`` to set the affine ranges.
        calibration_method: ``"minmax"``, ``"percentile"``, ``"mse"`` or
            ``"entropy"`` (see :mod:`graphquant.calibration`).
        calibration_percentile: ``p`` of ``"percentile"``, in (50, 100] (default 99.99).
        verbose: a progress bar while calibrating (``None``: when stderr is a
            terminal and calibration runs longer than a second).
        config: a prepared :class:`~graphquant.plan.QuantizeConfig` (instead of
            the keyword options; giving both is a ``ValueError``).
        registry: the pattern registry (default: the shared default).
        seed: op-level seed for stochastic rounding.
        allow_requantize: rewrite a function that already holds graphquant
            rounding nodes (e.g. a :class:`QuantizedFunction`'s), stacking a
            second rounding; logged, and noted in the plan. Without it such a
            function is a ``ValueError``.
        **options: further :class:`~graphquant.plan.QuantizeConfig` keywords
            (``include``, ``exclude``, ``overrides``, ``weight_bits``, ...).

    Returns:
        A :class:`QuantizedFunction`, callable with the original input
        signature and returning the original output structure. When no
        convolution matches, a ``UserWarning`` (and the log) says so and the
        function computes what ``fn`` computes.

    Limits: the graph is re-imported, so variables the function captures are
    shared with the original (assignments to them show in both; weights of
    variables are rounded at every call). Functions taking resource or
    composite (ragged, sparse) arguments, and outputs fed directly by a
    rounded group inside control flow (``tf.cond`` / ``tf.while_loop``
    bodies) are not rewritten. ``rounding="stochastic"`` is applied at every
    call (there is no ``training`` flag in a plain function).

    Raises:
        TypeError / ValueError naming the argument (``config`` not a
        ``QuantizeConfig`` is a ``TypeError``); ValueError when ``fn`` is
        already quantized (see ``allow_requantize``) or when an inserted
        rounding would reach no output of the function.
    """
    t0 = time.perf_counter()
    cfg = config_from_kwargs(bits, format, rounding, range, weights, config, **options)
    cf = _concrete(fn)
    gd = cf.graph.as_graph_def(add_shapes=True)  # static shapes: sample specs, per-channel formats
    fname = cf.name.decode() if isinstance(cf.name, bytes) else str(cf.name)
    existing = _existing_rounding(gd, fname, allow_requantize)
    plan, _ = plan_graph_def(gd, cfg, registry)
    if existing:
        plan.notes.append(f"requantized: the function already had {existing} graphquant rounding nodes; a second rounding is stacked")
    plan.check_calibration(calibration_data, calibration_method, calibration_percentile)
    if not plan.targets:
        msg = no_match_message(f"function {fname!r}", "the function is returned unchanged")
        warnings.warn(msg, UserWarning, stacklevel=2)
        log.warning("%s", msg)
    ranges: Dict[str, Tuple[float, float]] = {}
    need = needs_calibration(plan)
    if need and calibration_data is not None:
        ranges = _calibrate(cf, gd, plan, calibration_data, calibration_method, calibration_percentile, verbose)
    elif need:
        plan.notes.append("no calibration_data: affine ranges are each batch's own min/max (dynamic)")
    pruned, inserted = _apply(cf, gd, plan, ranges, seed, fname)
    return QuantizedFunction(cf, pruned, plan, inserted, ranges, time.perf_counter() - t0)


def _existing_rounding(gd: Any, fname: str, allow_requantize: bool) -> int:
    """How many graphquant rounding nodes the function's graph already has; raises unless ``allow_requantize``
    (then logged)."""
    if not isinstance(allow_requantize, bool):
        raise TypeError(f"allow_requantize must be a bool, got {allow_requantize!r}")
    existing = len(rounding_nodes(gd))
    what = f"quantize_function: {fname} is already quantized ({existing} graphquant rounding nodes)"
    if existing and not allow_requantize:
        raise ValueError(f"{what}; pass allow_requantize=True to stack a second rounding")
    if existing:
        log.warning("%s: stacking a second rounding (allow_requantize=True)", what)
    return existing


def _calibrate(cf: Any, gd: Any, plan: Plan, data: Any, method: str, percentile: float,
               verbose: Optional[bool]) -> Dict[str, Tuple[float, float]]:  # fmt: skip
    """The activation ranges of ``plan``'s learned points: ``data`` run through a copy of the
    function with observers spliced in (``gd`` is not changed)."""
    collector = RangeCollector(method, percentile)
    obs = tf.compat.v1.GraphDef()
    obs.CopyFrom(gd)
    obs_redirects: Dict[str, str] = {}
    insert_observers(obs, plan, collector, obs_redirects)
    # functions holding an observer, or passing its variables into an XLA body, are edited:
    # new names (the process holds the originals)
    _rename_edited(obs, {f.signature.name: f for f in gd.library.function})
    runner = _import(obs, cf, obs_redirects)
    try:
        collector.initialise()
        batches = calibration_batches(data, check=lambda b: _check_flat(cf, b))
        for batch in progress(batches, "calibrating", verbose):
            _run_flat(runner, cf, batch)
        return collector.ranges()
    finally:
        collector.release()


def _apply(cf: Any, gd: Any, plan: Plan, ranges: Dict[str, Tuple[float, float]], seed: Optional[int],
           fname: str) -> Tuple[Any, list]:  # fmt: skip
    """Edit ``gd`` by ``plan`` (refusing a rounding that reaches no output) and import it as a function
    with ``cf``'s captures; returns that function and the inserted node names."""
    before = _library_copy(gd)
    edits = apply_plan(gd, plan, ranges=ranges, seed=seed)
    redirects = edits["editor"].redirects
    check_live(gd, edits["inserted_at"], model=f"quantize_function({fname})",
               outputs=[follow_redirects(redirects, t.name) for t in cf.outputs],
               control_outputs=[op.name for op in cf.graph.control_outputs])
    _rename_edited(gd, before)
    return _import(gd, cf, redirects), edits["inserted"]
