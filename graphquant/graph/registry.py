"""The shared pattern registry, refined for graphs.

The graph front end reuses :mod:`graphquant.patterns` and
:mod:`graphquant.plan` unchanged. Graphs need two refinements of the default
matchers, added here without editing the shared registry:

* a *bias* is also spelled ``Add`` / ``AddV2`` when one operand is a
  parameter (a constant or a variable read, possibly reshaped);
* the exporter-folded batch norm ``Mul -> AddV2`` only counts when the
  multiplier is a parameter (so ``x * gate`` is not a norm).

:func:`graph_registry` applies them to any registry (the user's own too). They
read the ``"parameter_inputs"`` attribute that :mod:`graphquant.graph.view`
gives every node.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

from ..patterns import DEFAULT_REGISTRY, GRAPH, Matcher, Node, Registry, Step

__all__ = ["graph_registry"]

_BIAS_OPS = ("BiasAdd", "BiasAddV1", "Add", "AddV2")


def _one_data_input(node: Node) -> bool:
    """A graph bias: ``BiasAdd``, or a binary op with exactly one operand that is not a parameter."""
    if node.domain != GRAPH:
        return True
    flags = node.attrs.get("parameter_inputs")
    if not flags:
        return True
    if node.kind in ("BiasAdd", "BiasAddV1"):
        return True
    return len(flags) == 2 and sum(1 for f in flags if not f) == 1


def _norm_ok(node: Node) -> bool:
    """A graph ``Mul`` starts a folded batch norm only when its other operand is a parameter."""
    if node.domain != GRAPH or node.kind != "Mul":
        return True
    return _one_data_input(node)


def _chain(a: Optional[Callable[[Node], bool]], b: Callable[[Node], bool]) -> Callable[[Node], bool]:
    """The predicate ``a and b`` (just ``b`` when there is no ``a``)."""
    if a is None:
        return b
    return lambda n: a(n) and b(n)


def _refine(m: Matcher) -> Matcher:
    """``m`` with the graph refinement of its concept (bias, norm); other matchers unchanged."""
    if m.name == "bias":
        ops = tuple(dict.fromkeys(tuple(m.ops) + _BIAS_OPS))
        return replace(m, ops=ops, predicate=_chain(m.predicate, _one_data_input))
    if m.name == "norm":
        return replace(m, predicate=_chain(m.predicate, _norm_ok))
    return m


def graph_registry(registry: Optional[Registry] = None) -> Registry:
    """A copy of ``registry`` (default: the shared default) with graph-aware bias/norm matchers.

    Raises:
        TypeError: ``registry`` is not a :class:`~graphquant.patterns.Registry`.
    """
    registry = DEFAULT_REGISTRY if registry is None else registry
    if not isinstance(registry, Registry):
        raise TypeError(f"registry must be a graphquant.patterns.Registry, got {type(registry).__name__}")
    out = Registry()
    for p in registry:
        steps = tuple(Step(_refine(s.matcher), s.optional) for s in p.steps)
        out.register(replace(p, steps=steps))
    return out
