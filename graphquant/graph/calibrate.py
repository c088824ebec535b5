"""Calibrate activation ranges of a graph by running it on data.

A thin caller of :mod:`graphquant.calibration`: at every activation point the
plan will round (the same places), a call to the point's observer function is
spliced into a copy of the GraphDef (inside the library function holding the
point when it is in one). The observer passes the tensor through and updates
the point's statistics with TensorFlow ops (reductions, a bincount) on
resource variables; nothing is copied to Python while the graph runs. Inside
an XLA-compiled function (Keras' grouped convolutions) the observer compiles
with it: the variables come in as resource arguments threaded from the callers.
The observed graph is only ever run here, never saved.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import numpy as np
from tensorflow.core.framework import graph_pb2, node_def_pb2

from .. import calibration as engine
from ..formats import channel_axis
from ..plan import Plan
from .planning import scope_name

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from ..formats import Format
    from .rewrite import GraphEditor

log = logging.getLogger(__name__)

__all__ = ["RangeCollector", "insert_observers", "needs_calibration"]


def needs_calibration(plan: Plan) -> List[str]:
    """Paths of activation points whose format has no range (affine without range)."""
    return [p.path for p in plan.learned]


class RangeCollector:
    """One :class:`graphquant.calibration.Observer` per point (per channel where the point's format
    has an ``axis``, else per tensor), and the ranges from them.

    Args:
        method: one of :data:`graphquant.calibration.METHODS`.
        percentile: for ``"percentile"``.
    """

    def __init__(self, method: str = "minmax", percentile: float = 99.99):
        engine.check_method(method, percentile)
        self.method = method
        self.percentile = float(percentile)
        self.observers: Dict[str, engine.Observer] = {}
        self.formats: Dict[str, Optional[Format]] = {}

    def observer(self, path: str, fmt: Optional[Format] = None,
                 shape: Optional[List[Optional[int]]] = None) -> engine.Observer:  # fmt: skip
        """The observer of the tensor at ``path`` (made at the first call; ``fmt``: the point's format,
        which bounds the range the method may choose; ``shape``: the tensor's static shape, which
        a per-channel format needs: its rank and the size of its ``axis``).

        Raises:
            ValueError: a per-channel format at a point whose rank or channel count the graph does
                not tell (naming the point).
        """
        if path not in self.observers:
            axis = channel_axis(fmt)
            channels = 1
            if axis is not None:
                if shape is None or not -len(shape) <= axis < len(shape) or shape[axis] is None:
                    raise ValueError(f"{path!r}: per-channel calibration (axis={axis}) needs the tensor's rank and "
                                     f"channel count, and the graph gives its shape as {shape}")  # fmt: skip
                channels = int(shape[axis])
            self.observers[path] = engine.Observer(path, axis, channels, histogram=self.method != "minmax", shared=True)
            self.formats[path] = fmt
        return self.observers[path]

    def initialise(self) -> None:
        """Create the observers' variables: before a graph they are spliced into runs (a loaded
        SavedModel's are created by :func:`~graphquant.calibration.rebind_loaded` instead)."""
        for o in self.observers.values():
            o.initialise()

    def ranges(self, what: str = "calibration_data") -> Dict[str, Tuple[Any, Any]]:
        """``{path: (lo, hi)}``, widened to include 0 and to at least ``MIN_RANGE_WIDTH``: floats per
        tensor, float32 arrays (one entry per channel) per channel.

        Raises:
            ValueError: naming ``what`` and the path of a point that saw no finite value.
        """
        out = engine.ranges_of(self.observers, self.method, self.formats, self.percentile, what)
        return {k: (float(lo), float(hi)) if self.observers[k].axis is None else
                (np.asarray(lo, np.float32), np.asarray(hi, np.float32)) for k, (lo, hi) in out.items()}  # fmt: skip

    def release(self) -> None:
        engine.release_all(list(self.observers.values()))


def splice_observer(ed: GraphEditor, sc: Any, ref: str, dtype: int, observer: engine.Observer, name: str,
                    shape: Optional[List[Optional[int]]] = None) -> Any:  # fmt: skip
    """Add a call ``observer(ref, sample, *handles)`` to scope ``sc`` of editor ``ed`` (``sample``: the
    :func:`~graphquant.calibration.sample_spec` of ``ref``, a constant where its static ``shape``
    tells it, else computed by a spliced call; handles of the observer's variables, see
    :meth:`GraphEditor.resource_handle`: passed in as arguments where XLA compiles the scope);
    return the call node (output 0 is ``ref``'s value)."""
    from tensorflow.core.framework import types_pb2

    fname, fdefs = observer.function_def(dtype, xla=ed.compiled(sc.name), rank=None if shape is None else len(shape))
    lib_name = ed.add_functions(fdefs, fname)
    base = sc.unique(name)
    inputs = [ref, _splice_sample_spec(ed, sc, ref, dtype, shape if observer.samples else [], base)]
    for key, (vdtype, shape) in observer.variable_specs().items():
        inputs.append(ed.resource_handle(sc.name, observer.shared_name(key), vdtype.as_datatype_enum, shape,
                                         f"{base}/{key}"))  # fmt: skip
    nd = _call_node(base, "StatefulPartitionedCall", inputs,
                    [dtype, types_pb2.DT_INT32] + [types_pb2.DT_RESOURCE] * (len(inputs) - 2), dtype, lib_name)
    nd.attr[engine.NO_CALL_SHAPE_INFERENCE].b = True  # importing the graph does not infer shapes through the body
    return sc.add(nd)


def _call_node(name: str, op: str, inputs: List[str], tin: List[int], tout: int, fname: str) -> Any:
    """A NodeDef calling library function ``fname`` (one output of type ``tout``) with Grappler off."""
    nd = node_def_pb2.NodeDef(name=name, op=op, input=inputs)
    nd.attr["Tin"].list.type.extend(tin)
    nd.attr["Tout"].list.type.append(tout)
    nd.attr["f"].func.name = fname
    nd.attr["config"].s = b""
    nd.attr["config_proto"].s = engine.no_grappler_config()
    nd.attr["executor_type"].s = b""
    return nd


def _splice_sample_spec(ed: GraphEditor, sc: Any, ref: str, dtype: int, shape: Optional[List[Optional[int]]],
                        base: str) -> str:  # fmt: skip
    """The input ``sample`` of an observer call on ``ref``: a Const node where ``shape`` tells it (``[]``,
    a scalar's, where the observer does not sample), else a call of
    :func:`~graphquant.calibration.sample_spec_function_def`; returns its output."""
    import numpy as np
    import tensorflow as tf
    from tensorflow.core.framework import types_pb2

    static = None if shape is None else engine.static_sample_spec(shape)
    if static is not None:
        nd = node_def_pb2.NodeDef(name=sc.unique(f"{base}/sample"), op="Const")
        nd.attr["dtype"].type = types_pb2.DT_INT32
        nd.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(np.array(static, np.int32)))
        return sc.ref(sc.add(nd), 0)
    fname, fdefs = engine.sample_spec_function_def(tf.dtypes.as_dtype(dtype))
    nd = _call_node(sc.unique(f"{base}/sample"), "PartitionedCall", [ref], [dtype], types_pb2.DT_INT32,
                    ed.add_functions(fdefs, fname))  # fmt: skip
    return sc.ref(sc.add(nd), 0)


def insert_observers(graph_def: graph_pb2.GraphDef, plan: Plan, collector: RangeCollector,
                     redirects: Optional[Dict[str, str]] = None) -> int:
    """Splice an observer at every activation point needing a range; return how many.

    ``redirects``, when given, is updated with the top-level tensors now read
    through an observer (see :meth:`GraphEditor.redirect`).
    """
    from .rewrite import GraphEditor, static_shape

    ed = GraphEditor(graph_def)
    todo = set(needs_calibration(plan))
    n = 0
    for p in plan.activations:
        if p.path not in todo:
            continue
        sc = ed.scope(scope_name(p))
        dtype = sc.out_dtype(p.after)
        shape = static_shape(sc, p.after)
        new = splice_observer(ed, sc, sc.ref(sc.by_name[p.after], 0), dtype, collector.observer(p.path, p.format, shape),
                              f"graphquant/observe{n}", shape)  # fmt: skip
        if ed.runs_side_effects(sc.name):
            # a control output of the function: it runs before the function returns, and the
            # consumers of p.after do not wait for it (the model runs beside the update)
            sc.fdef.signature.control_output.append(new.name)
            sc.fdef.control_ret[new.name] = new.name
        else:  # where a control output might not run (see runs_side_effects): its consumers read the call
            sc.rewire(sc.aliases(p.after), sc.ref(new, 0),  # not the call's own inputs (its sample spec reads p.after too)
                      skip={new.name} | {k for k in sc.by_name if k.startswith(new.name + "/")})
        n += 1
    if redirects is not None:
        redirects.update(ed.redirects)
    return n
