"""Join a GraphDef with the shared registry and planner; turn the plan into edits.

The graph front end reuses :mod:`graphquant.patterns` and
:mod:`graphquant.plan` unchanged. Graphs need two refinements of the default
matchers, added here without editing the shared registry:

* a *bias* is also spelled ``Add`` / ``AddV2`` when one operand is a
  parameter (a constant or a variable read, possibly reshaped);
* the exporter-folded batch norm ``Mul -> AddV2`` only counts when the
  multiplier is a parameter (so ``x * gate`` is not a norm).

:func:`graph_registry` applies them to any registry (the user's own too).
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any, Dict, Iterable, List, Optional, Tuple

from tensorflow.core.framework import graph_pb2

from ..patterns import DEFAULT_REGISTRY, DEPTHWISE_OPS, GRAPH, Matcher, Node, Registry, Step, View
from ..plan import InsertionPoint, Plan, QuantizeConfig, make_plan, zeroed_weights_warning
from ..weights import round_weight_array
from .view import GraphView, read_graph_def

__all__ = ["graph_registry", "to_pattern_view", "plan_graph_def", "GraphPlan", "short_scope_names", "SKIP_FUNCTIONS"]

#: Library functions that never hold model computation (checkpoint save/restore).
SKIP_FUNCTIONS = ("__inference__traced_save", "__inference__traced_restore")

_BIAS_OPS = ("BiasAdd", "BiasAddV1", "Add", "AddV2")


def _one_data_input(node: Node) -> bool:
    if node.domain != GRAPH:
        return True
    flags = node.attrs.get("parameter_inputs")
    if not flags:
        return True
    if node.kind in ("BiasAdd", "BiasAddV1"):
        return True
    return len(flags) == 2 and sum(1 for f in flags if not f) == 1


def _norm_ok(node: Node) -> bool:
    if node.domain != GRAPH or node.kind != "Mul":
        return True
    return _one_data_input(node)


def _refine(m: Matcher) -> Matcher:
    if m.name == "bias":
        ops = tuple(dict.fromkeys(tuple(m.ops) + _BIAS_OPS))
        return replace(m, ops=ops, predicate=_chain(m.predicate, _one_data_input))
    if m.name == "norm":
        return replace(m, predicate=_chain(m.predicate, _norm_ok))
    return m


def _chain(a, b):
    if a is None:
        return b
    return lambda n: a(n) and b(n)


def graph_registry(registry: Optional[Registry] = None) -> Registry:
    """A copy of ``registry`` (default: the shared default) with graph-aware bias/norm matchers."""
    registry = DEFAULT_REGISTRY if registry is None else registry
    if not isinstance(registry, Registry):
        raise TypeError(f"registry must be a graphquant.patterns.Registry, got {type(registry).__name__}")
    out = Registry()
    for p in registry:
        steps = tuple(Step(_refine(s.matcher), s.optional) for s in p.steps)
        out.register(replace(p, steps=steps))
    return out


def _activation_of_fused(attrs: Dict[str, Any]) -> Optional[str]:
    fused = attrs.get("fused_ops") or []
    for op in fused:
        if op not in ("BiasAdd", "FusedBatchNorm", "Add"):
            return str(op).lower()
    return None


def to_pattern_view(gv: GraphView) -> View:
    """The shared neutral view: the top-level graph, one child view per library function."""

    def scope_view(scope: str) -> View:
        nodes: List[Node] = []
        prefix = len(scope) + 1 if scope else 0
        for qn in gv.scopes.get(scope, []):
            g = gv.nodes[qn]
            if g.kind == "_Arg":
                continue
            attrs = dict(g.attributes)
            attrs["parameter_inputs"] = [bool(gv.nodes[i].is_parameter) if i in gv.nodes else False for i in g.inputs]
            if g.kind.startswith("_Fused"):
                act = _activation_of_fused(attrs)
                if act:
                    attrs["activation"] = act
            nodes.append(
                Node(
                    name=g.local,
                    kind=g.kind,
                    domain=GRAPH,
                    inputs=[i[prefix:] if scope else i for i in g.inputs],
                    consumers=[c[prefix:] if scope else c for c in g.consumers],
                    attrs=attrs,
                )
            )
        return View(nodes, name=scope or "graph")

    children = {s: scope_view(s) for s in gv.scopes if s}
    root = scope_view("")
    root.children.update(children)
    return root


def _base_name(fname: str) -> str:
    """``__inference___call___5210`` -> ``__call__``; ``__inference_serve_12`` -> ``serve``."""
    s = fname[len("__inference_"):] if fname.startswith("__inference_") and len(fname) > len("__inference_") else fname
    head, _, tail = s.rpartition("_")
    return head if tail.isdigit() and head else s


def short_scope_names(names: Iterable[str]) -> Dict[str, str]:
    """Readable, still unique names for function-library scopes.

    Each name becomes its function's base name (``__inference_`` prefix and
    the trace counter dropped); names whose base name is shared by another
    function keep the counter (``__call___5210``), and the full name is the
    last resort, so distinct functions never share a short name.
    """
    names = list(dict.fromkeys(n for n in names if n))
    bases = {n: _base_name(n) for n in names}
    out: Dict[str, str] = {}
    for n in names:
        short = bases[n]
        if sum(1 for b in bases.values() if b == short) > 1:
            short = n[len("__inference_"):] if n.startswith("__inference_") else n
        out[n] = short
    used = list(out.values())
    for n, short in out.items():  # a stripped name equal to another function's short name
        if used.count(short) > 1:
            out[n] = n
    return out


class GraphPlan(Plan):
    """A :class:`~graphquant.plan.Plan` of a graph: the same data, and a table
    that names function-library scopes by their short base name
    (``__call__/conv/Conv2D`` instead of ``__inference___call___5210/conv/Conv2D``),
    followed by a line mapping each short name to its full function name.
    ``to_dict`` / ``points`` keep the full names, as written in the graph."""

    @classmethod
    def from_plan(cls, plan: Plan) -> "GraphPlan":
        return cls(**{f.name: getattr(plan, f.name) for f in fields(Plan)})

    def scope_names(self) -> Dict[str, str]:
        """Full function name -> the short name used in :meth:`table`."""
        return short_scope_names(s for p in self.points for s in p.scope)

    def table(self) -> str:
        short = self.scope_names()

        def rename(path: str) -> str:
            head, sep, tail = path.partition("/")
            return short[head] + sep + tail if head in short else path

        view = Plan(
            points=[replace(p, scope=tuple(short.get(s, s) for s in p.scope)) for p in self.points],
            config=self.config,
            skipped=[(rename(path), kind, why) for path, kind, why in self.skipped],
            notes=list(self.notes),
        )
        lines = view.table().split("\n")
        n = len(self.points)
        if n:
            # the layer column names the point: never cut it (the base table caps every column at 60)
            head = [lines[0]] + lines[2 : 2 + n]
            layers = ["layer"] + ["/".join(p.scope + (p.target,)) for p in view.points]
            old_w = len(lines[1].split("  ")[1])
            new_w = max(len(x) for x in layers)
            start = lines[1].index("  ") + 2
            head = [h[:start] + layer.ljust(new_w) + h[start + old_w :] for h, layer in zip(head, layers)]
            rule = lines[1][:start] + "-" * new_w + lines[1][start + old_w :]
            lines = [head[0].rstrip(), rule] + [h.rstrip() for h in head[1:]] + lines[2 + n :]
        renamed = [f"{v} = {k}" for k, v in short.items() if k != v]
        if renamed:
            lines.insert(2 + n + 1, "scopes: " + ", ".join(renamed))  # after the rows and the summary line
        return "\n".join(lines)


def plan_graph_def(
    graph_def: graph_pb2.GraphDef,
    config: QuantizeConfig,
    registry: Optional[Registry] = None,
) -> Tuple[Plan, GraphView]:
    """Read ``graph_def`` and plan it with the (graph-refined) registry."""
    skip = [f.signature.name for f in graph_def.library.function if f.signature.name.startswith(SKIP_FUNCTIONS)]
    gv = read_graph_def(graph_def, skip_functions=skip)
    plan = GraphPlan.from_plan(make_plan(to_pattern_view(gv), config, graph_registry(registry)))
    return plan, gv


def scope_name(point: InsertionPoint) -> str:
    """The GraphDef scope of a point: ``""`` (top level) or the function name."""
    return point.scope[-1] if point.scope else ""


def _weight_source(editor, scope: str, target: str, slot: str) -> Tuple[str, int, str]:
    """(producer node, input index, producer op) of a target's weight slot, through Identity ops."""
    from .view import parse_input

    sc = editor.scope(scope)
    nd = sc.by_name[target]
    idx = int(slot.split(":", 1)[1])
    data_inputs = [r for r in nd.input if not r.startswith("^")]
    src = parse_input(data_inputs[idx], sc.in_function)[0]
    # look through Identity chains to find a Const (frozen graph)
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
    from .rewrite import GraphEditor, Insertion

    ranges = ranges or {}
    ed = GraphEditor(graph_def, seed=seed)
    out: Dict[str, Any] = {"inserted": [], "inserted_at": [], "prerounded": [], "variable_weights": [], "editor": ed,
                           "warnings": []}
    for p in plan.points:
        scope = scope_name(p)
        if p.what == "weights":
            src, idx, op = _weight_source(ed, scope, p.target, p.slot or "input:1")
            if op == "Const":
                def pre(v, p=p):
                    q = round_weight_array(v, p.format, p.rounding, seed, depthwise=p.target_kind in DEPTHWISE_OPS)
                    msg = zeroed_weights_warning(f"{p.target} ({p.target_kind}.{p.slot or 'input:1'})", v, q, p.format)
                    if msg:
                        out["warnings"].append(msg)
                    return q

                ed.replace_const(scope, src, pre)
                out["prerounded"].append(src)
                continue
            if variable_weights == "skip" and op == "ReadVariableOp":
                out["variable_weights"].append((scope, src, p))
                continue
            ins = Insertion(scope, src, p.format, p.rounding, target="weights", consumer=p.target, input_index=idx,
                            label=p.target.rsplit("/", 1)[-1], depthwise=p.target_kind in DEPTHWISE_OPS)
            out["inserted"].append(ed.insert(ins))
            out["inserted_at"].append((scope, ins.inserted))
        else:
            rng = ranges.get(p.path)
            ins = Insertion(scope, p.after, p.format, p.rounding, range=rng, label=p.target.rsplit("/", 1)[-1])
            out["inserted"].append(ed.insert(ins))
            out["inserted_at"].append((scope, ins.inserted))
    return out
