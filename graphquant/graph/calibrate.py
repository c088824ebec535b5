"""Calibrate activation ranges of a graph by running it on data.

Observers are ``EagerPyFunc`` nodes spliced in at the plan's activation
points (the same places the rounding will go); they pass the tensor through
and record its statistics in this process. The observed graph is only ever run
here, never saved.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

from tensorflow.core.framework import graph_pb2, node_def_pb2

from ..plan import Plan
from ..ranges import make_tracker, ranges_from_trackers
from .planning import scope_name

log = logging.getLogger(__name__)

__all__ = ["PyFuncObservers", "RangeCollector", "insert_observers", "needs_calibration"]


def needs_calibration(plan: Plan) -> List[str]:
    """Paths of activation points whose format has no range (affine without range)."""
    return [p.path for p in plan.learned]


class PyFuncObservers:
    """Python callbacks that ``EagerPyFunc`` nodes spliced into a graph call.

    Subclasses define ``observer(key) -> f(x) -> x``; :meth:`token` registers
    one and returns the token the node's ``token`` attribute names;
    :meth:`release` unregisters them all.
    """

    def __init__(self) -> None:
        self._tokens: List[str] = []
        self._keep: List[Any] = []  # the py-func registry holds weak references

    def observer(self, key: str):  # pragma: no cover - abstract
        raise NotImplementedError

    def token(self, key: str) -> str:
        from tensorflow.python.ops import script_ops

        fn = self.observer(key)
        self._keep.append(fn)
        tok = script_ops._py_funcs.insert(fn)
        self._tokens.append(tok)
        return tok

    def release(self) -> None:
        from tensorflow.python.ops import script_ops

        for t in self._tokens:
            try:
                script_ops._py_funcs.remove(t)
            except Exception:  # pragma: no cover - best effort
                pass
        self._tokens.clear()
        self._keep.clear()


class RangeCollector(PyFuncObservers):
    """Collects per-point ranges with the same trackers as Keras calibration
    (:func:`graphquant.ranges.make_tracker`): ``"minmax"`` or ``"percentile"``;
    NaN and inf values are ignored and counted."""

    def __init__(self, method: str = "minmax", percentile: float = 99.99):
        super().__init__()
        if method not in ("minmax", "percentile"):
            raise ValueError(f"method must be 'minmax' or 'percentile', got {method!r}")
        make_tracker(method, None, percentile)  # validates percentile
        self.method = method
        self.percentile = float(percentile)
        self.trackers: Dict[str, Any] = {}

    def observer(self, path: str):
        tracker = self.trackers[path] = make_tracker(self.method, None, self.percentile)

        def observe(x):
            tracker.update(x.numpy())
            return x

        return observe

    def ranges(self, what: str = "calibration_data") -> Dict[str, Tuple[float, float]]:
        """``{path: (lo, hi)}``, widened to include 0 and to at least ``MIN_RANGE_WIDTH``.

        Raises:
            ValueError: naming ``what`` and the path of a point that saw no finite value.
        """
        return {k: (float(lo), float(hi)) for k, (lo, hi) in ranges_from_trackers(self.trackers, what).items()}


def insert_observers(graph_def: graph_pb2.GraphDef, plan: Plan, collector: RangeCollector,
                     redirects: Optional[Dict[str, str]] = None) -> int:
    """Splice an observer at every activation point needing a range; return how many.

    ``redirects``, when given, is updated with the top-level tensors now read
    through an observer (see :meth:`GraphEditor.redirect`).
    """
    from .rewrite import GraphEditor

    ed = GraphEditor(graph_def)
    todo = set(needs_calibration(plan))
    n = 0
    for p in plan.activations:
        if p.path not in todo:
            continue
        sc = ed.scope(scope_name(p))
        dtype = sc.out_dtype(p.after)
        token = collector.token(p.path)
        name = sc.unique(f"graphquant/observe{n}")
        nd = node_def_pb2.NodeDef(name=name, op="EagerPyFunc", input=[sc.ref(sc.by_name[p.after], 0)])
        nd.attr["token"].s = token.encode()
        nd.attr["is_async"].b = False
        nd.attr["Tin"].list.type.append(dtype)
        nd.attr["Tout"].list.type.append(dtype)
        new = sc.add(nd)
        sc.rewire(sc.aliases(p.after), sc.ref(new, 0), skip={name})
        n += 1
    if redirects is not None:
        redirects.update(ed.redirects)
    return n
