"""Apply a graph's :class:`~graphquant.plan.Plan`: turn its insertion points into GraphDef edits.

Activation points become rounding nodes after the point's node; weight points
pre-round a constant filter once (frozen graphs), insert rounding after a
variable read, or hand the read back to the caller, who rounds the checkpoint
instead. The edits themselves are :class:`~graphquant.graph.rewrite.GraphEditor`'s.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from tensorflow.core.framework import graph_pb2

from ..patterns import DEPTHWISE_OPS
from ..plan import InsertionPoint, Plan, zeroed_weights_warning
from ..weights import round_weight_array
from .planning import scope_name
from .rewrite import GraphEditor, Insertion
from .view import parse_input

__all__ = ["apply_plan"]


def _weight_source(editor: GraphEditor, scope: str, target: str, slot: str) -> Tuple[str, int, str]:
    """(producer node, input index, producer op) of a target's weight slot; a ``Const`` reached
    through ``Identity`` ops counts as the producer (a frozen graph's filter)."""
    sc = editor.scope(scope)
    nd = sc.by_name[target]
    idx = int(slot.split(":", 1)[1])
    data_inputs = [r for r in nd.input if not r.startswith("^")]
    src = parse_input(data_inputs[idx], sc.in_function)[0]
    probe = src
    for _ in range(8):
        p = sc.by_name.get(probe)
        if p is None or p.op != "Identity":
            break
        probe = parse_input(p.input[0], sc.in_function)[0]
    p = sc.by_name.get(probe)
    if p is not None and p.op == "Const":
        return probe, idx, "Const"
    return src, idx, (sc.by_name[src].op if src in sc.by_name else "_Arg")


def _label(point: InsertionPoint) -> str:
    """The short label an inserted node carries: the target's local name."""
    return point.target.rsplit("/", 1)[-1]


def _record(out: Dict[str, Any], scope: str, editor: GraphEditor, ins: Insertion) -> None:
    out["inserted"].append(editor.insert(ins))
    out["inserted_at"].append((scope, ins.inserted))


def _apply_weight_point(editor: GraphEditor, p: InsertionPoint, out: Dict[str, Any], seed: Optional[int],
                        variable_weights: str) -> None:
    """Round the weights of one weight point: a constant once, now; a variable read at run time,
    or (``variable_weights="skip"``) not here but listed in ``out["variable_weights"]``."""
    scope = scope_name(p)
    slot = p.slot or "input:1"
    depthwise = p.target_kind in DEPTHWISE_OPS
    src, idx, op = _weight_source(editor, scope, p.target, slot)
    if op == "Const":
        def pre(v: Any) -> Any:
            q = round_weight_array(v, p.format, p.rounding, seed, depthwise=depthwise)
            msg = zeroed_weights_warning(f"{p.target} ({p.target_kind}.{slot})", v, q, p.format)
            if msg:
                out["warnings"].append(msg)
            return q

        editor.replace_const(scope, src, pre)
        out["prerounded"].append(src)
    elif variable_weights == "skip" and op == "ReadVariableOp":
        out["variable_weights"].append((scope, src, p))
    else:
        _record(out, scope, editor, Insertion(scope, src, p.format, p.rounding, target="weights", consumer=p.target,
                                              input_index=idx, label=_label(p), depthwise=depthwise))


def apply_plan(
    graph_def: graph_pb2.GraphDef,
    plan: Plan,
    *,
    ranges: Optional[Dict[str, Tuple[float, float]]] = None,
    seed: Optional[int] = None,
    variable_weights: str = "runtime",
) -> Dict[str, Any]:
    """Edit ``graph_def`` in place so it does what ``plan`` says.

    Args:
        ranges: calibrated ``(lo, hi)`` per activation point path, for affine
            formats without a range; missing means a dynamic (per batch) range.
        variable_weights: ``"runtime"`` inserts weight rounding after variable
            reads; ``"skip"`` leaves them for the caller (who rounds the
            checkpoint instead). Constant weights are always pre-rounded once.

    Returns:
        ``{"inserted": [node names], "inserted_at": [(scope, node name)],
        "prerounded": [const names], "variable_weights": [(scope, read node, point)],
        "warnings": [weights pre-rounded here of which more than half became zero],
        "editor": the GraphEditor}``. Top-level tensors named from outside the
        graph (signature outputs, fetches) must be mapped with
        ``out["editor"].redirect(name)``: rewiring only reaches consumers inside it.
    """
    ranges = ranges or {}
    ed = GraphEditor(graph_def, seed=seed)
    out: Dict[str, Any] = {"inserted": [], "inserted_at": [], "prerounded": [], "variable_weights": [], "editor": ed,
                           "warnings": []}
    for p in plan.points:
        if p.what == "weights":
            _apply_weight_point(ed, p, out, seed, variable_weights)
        else:
            scope = scope_name(p)
            _record(out, scope, ed, Insertion(scope, p.after, p.format, p.rounding, range=ranges.get(p.path),
                                              label=_label(p)))
    return out
