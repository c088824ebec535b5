"""Plan a GraphDef: read it, match the graph-refined registry, and show the plan.

:func:`plan_graph_def` joins :func:`~graphquant.graph.view.graph_view`,
:func:`~graphquant.graph.registry.graph_registry` and the shared planner
(:func:`graphquant.plan.make_plan`). The result is a :class:`GraphPlan`: the
same data as any plan, with a table that names function-library scopes by a
short name (:func:`short_scope_names`). Applying a plan to the graph is
:mod:`graphquant.graph.apply`'s job.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Dict, Iterable, List, Optional, Tuple

from tensorflow.core.framework import graph_pb2

from .._table import table_width
from ..patterns import Registry, View
from ..plan import InsertionPoint, Plan, QuantizeConfig, make_plan
from .registry import graph_registry
from .view import graph_view

__all__ = ["plan_graph_def", "GraphPlan", "short_scope_names", "scope_name", "SKIP_FUNCTIONS"]

#: Library functions that never hold model computation (checkpoint save/restore).
SKIP_FUNCTIONS = ("__inference__traced_save", "__inference__traced_restore")


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


def scope_name(point: InsertionPoint) -> str:
    """The GraphDef scope of a point: ``""`` (top level) or the function name."""
    return point.scope[-1] if point.scope else ""


def _widen_column(lines: List[str], column: int, cells: List[str]) -> List[str]:
    """``lines`` of a rendered table (header, rule, rows, then free text) with column ``column``
    as wide as its whole ``cells`` (the header's first), which replace the column's cut cells."""
    widths = [len(dashes) for dashes in lines[1].split("  ")]
    start = sum(widths[:column]) + 2 * column
    old_w, new_w = widths[column], max(len(c) for c in cells)
    n = len(cells)
    table = [lines[0]] + lines[2:1 + n]
    table = [t[:start] + c.ljust(new_w) + t[start + old_w:] for t, c in zip(table, cells)]
    rule = lines[1][:start] + "-" * new_w + lines[1][start + old_w:]
    return [table[0].rstrip(), rule] + [t.rstrip() for t in table[1:]] + lines[1 + n:]


class GraphPlan(Plan):
    """A :class:`~graphquant.plan.Plan` of a graph: the same data, and a table
    that names function-library scopes by their short base name
    (``__call__/conv/Conv2D`` instead of ``__inference___call___5210/conv/Conv2D``),
    followed by a line mapping each short name to its full function name.
    ``to_dict`` / ``points`` keep the full names, as written in the graph."""

    @classmethod
    def from_plan(cls, plan: Plan) -> "GraphPlan":
        """The graph plan holding ``plan``'s data."""
        return cls(**{f.name: getattr(plan, f.name) for f in fields(Plan)})

    def scope_names(self) -> Dict[str, str]:
        """Full function name -> the short name used in :meth:`table`."""
        return short_scope_names(s for p in self.points for s in p.scope)

    def table(self, *, legend: bool = True) -> str:
        """The plan as a fixed-width text table, scopes named by their short names.

        Inside :func:`graphquant._table.fit_width` (the ``graphquant`` command) the table
        fits that width like every table; otherwise the layer column is never cut.

        Args:
            legend: add the line ``scopes: <short> = <full function name>, ...``
                after the summary (the ``graphquant`` command shows it with ``--verbose``).
        """
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
        if n and table_width() is None:  # the base table caps every column at 60: give the layer column back
            lines = _widen_column(lines, 1, ["layer"] + ["/".join(p.scope + (p.target,)) for p in view.points])
        renamed = [f"{v} = {k}" for k, v in short.items() if k != v]
        if legend and renamed:
            lines.insert(2 + n + 1, "scopes: " + ", ".join(renamed))  # after the rows and the summary line
        return "\n".join(lines)


def plan_graph_def(
    graph_def: graph_pb2.GraphDef,
    config: QuantizeConfig,
    registry: Optional[Registry] = None,
) -> Tuple[GraphPlan, View]:
    """Read ``graph_def`` (without the checkpoint save/restore functions) and plan it with the
    graph-refined ``registry`` (default: the shared default registry).

    Returns:
        ``(plan, view)``: the :class:`GraphPlan` and the view it was made from.
    """
    skip = [f.signature.name for f in graph_def.library.function if f.signature.name.startswith(SKIP_FUNCTIONS)]
    view = graph_view(graph_def, skip_functions=skip)
    return GraphPlan.from_plan(make_plan(view, config, graph_registry(registry))), view
