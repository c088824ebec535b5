"""Patterns: where rounding can go, as data shared by the Keras and graph front ends.

The contract
============

A front end reads a model into a neutral :class:`View`: an ordered collection
of :class:`Node` objects, each with

* ``name`` -- unique inside its view (a Keras layer call, a GraphDef node);
* ``kind`` -- the Keras layer class name (``"Conv2D"``) or the TF op type
  (``"Conv2D"``, ``"FusedBatchNormV3"``); ``domain`` says which
  (``"keras"`` or ``"graph"``), so the two spellings never get mixed up;
* ``classes`` -- every class name in the layer's MRO (so subclasses of
  ``Conv2D`` match); for graph ops simply ``(kind,)``;
* ``inputs`` / ``consumers`` -- names of producer / consumer nodes, in order
  (graph front ends strip ``^control`` inputs and ``:N`` output suffixes);
* ``attrs`` -- plain attributes (Keras: the layer config; graph: whatever the
  front end decodes, e.g. ``{"T": "DT_FLOAT"}``). The attribute
  ``"activation"`` is special: a node whose own activation is not linear
  (``Conv2D(..., activation="relu")``, ``_FusedConv2D`` with a ``Relu``) ends
  its fused group -- nothing after it is fused into it;
* ``obj`` -- the underlying object (a Keras layer, a ``NodeDef``), opaque to
  this module.

Nested containers (a Keras model inside a model, a function-library body
called by ``StatefulPartitionedCall``) are separate views in
``View.children[node_name]``; the planner recurses into them and records the
path in ``InsertionPoint.scope``.

A :class:`Matcher` recognises one *concept* (a convolution, a normalisation,
an activation, a bias) in both spellings: Keras layer classes (by class object
or class name, subclasses included) and TF op types. A graph spelling may be
a short op *sequence* (``("Mul", "AddV2")`` for a batch norm folded by the
exporter); the sequence is followed along sole-consumer edges and consumed as
one step.

A :class:`Pattern` is a sequence of :class:`Step` (a matcher, optionally
optional) plus where the rounding goes (after the last matched node, by
default), which step is the *target* (whose weights can be quantized, whose
name the user refers to), and optionally the config option that enables it
(``"dense"`` for the Dense pattern). A group only extends from one node to the
next along an edge where the earlier node has exactly one consumer, so a
value used elsewhere is never fused away.

A :class:`Registry` is an ordered list of patterns. :meth:`Registry.match`
walks the view in order; at each unclaimed node it tries every enabled
pattern and keeps the longest match (ties: the earlier pattern in the
registry). Matched nodes are claimed and not matched again.
:data:`DEFAULT_REGISTRY` holds ``conv -> [bias] -> [norm] -> [activation]``
and the optional ``dense -> [bias] -> [norm] -> [activation]``.
Users add patterns with :meth:`Registry.register` (``before=`` / ``after=`` to
place them) on a :meth:`Registry.copy` of the default.

:func:`weight_slots` tells which weights of a target node are quantizable and
along which axis their output channels lie, for both spellings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

__all__ = [
    "Node",
    "View",
    "Matcher",
    "Step",
    "Pattern",
    "Match",
    "Registry",
    "CONV",
    "DENSE",
    "NORM",
    "ACTIVATION",
    "BIAS",
    "DEFAULT_REGISTRY",
    "default_registry",
    "weight_slots",
    "is_depthwise_weight",
    "DEPTHWISE_OPS",
    "CONV_OPS",
]

KERAS = "keras"
GRAPH = "graph"


# --------------------------------------------------------------------------- view
@dataclass
class Node:
    """One node of a neutral view (a Keras layer call or a graph op)."""

    name: str
    kind: str
    domain: str = KERAS
    inputs: List[str] = field(default_factory=list)
    consumers: List[str] = field(default_factory=list)
    attrs: Dict[str, Any] = field(default_factory=dict)
    obj: Any = None
    classes: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.domain not in (KERAS, GRAPH):
            raise ValueError(f"domain must be 'keras' or 'graph', got {self.domain!r}")
        if not self.classes:
            self.classes = (self.kind,)

    @property
    def ends_group(self) -> bool:
        """True when the node applies its own non-linear activation."""
        act = self.attrs.get("activation")
        if act is None:
            return False
        if isinstance(act, Mapping):  # a serialized activation
            act = act.get("config", {}).get("name", act.get("class_name"))
        return str(act).lower() not in ("linear", "none", "")


class View:
    """An ordered set of :class:`Node` (topological order), plus nested views.

    ``consumers`` are filled in from ``inputs`` when the front end leaves them
    empty.
    """

    def __init__(self, nodes: Iterable[Node], children: Optional[Mapping[str, "View"]] = None, name: str = ""):
        self.name = name
        self.nodes: Dict[str, Node] = {}
        for n in nodes:
            if not isinstance(n, Node):
                raise TypeError(f"nodes must be Node objects, got {type(n).__name__}")
            if n.name in self.nodes:
                raise ValueError(f"duplicate node name {n.name!r} in view {name!r}")
            self.nodes[n.name] = n
        if not any(n.consumers for n in self.nodes.values()):
            for n in self.nodes.values():
                for i in n.inputs:
                    if i in self.nodes and n.name not in self.nodes[i].consumers:
                        self.nodes[i].consumers.append(n.name)
        self.children: Dict[str, View] = dict(children or {})

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes.values())

    def __len__(self) -> int:
        return len(self.nodes)

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def __contains__(self, name: object) -> bool:
        return name in self.nodes

    def consumers(self, node: Union[Node, str]) -> List[Node]:
        node = self.nodes[node] if isinstance(node, str) else node
        return [self.nodes[c] for c in node.consumers if c in self.nodes]

    def producers(self, node: Union[Node, str]) -> List[Node]:
        node = self.nodes[node] if isinstance(node, str) else node
        return [self.nodes[i] for i in node.inputs if i in self.nodes]

    def __repr__(self) -> str:
        return f"View({self.name!r}, {len(self)} nodes, {len(self.children)} nested)"


# --------------------------------------------------------------------------- matchers
ClassSpec = Union[str, type]


@dataclass(frozen=True)
class Matcher:
    """Recognises one concept in both spellings.

    Args:
        name: a short label (``"conv"``), shown in plans.
        layers: Keras layer classes, as class objects or class names; a node
            whose class is (a subclass of) one of them matches.
        ops: TF op types matched one node at a time.
        op_sequences: multi-op spellings, e.g. ``(("Mul", "AddV2"),)``: the
            first op matches the node, each next op its sole consumer.
        predicate: an extra test ``f(node) -> bool`` applied to the first node.
    """

    name: str
    layers: Tuple[ClassSpec, ...] = ()
    ops: Tuple[str, ...] = ()
    op_sequences: Tuple[Tuple[str, ...], ...] = ()
    predicate: Optional[Callable[[Node], bool]] = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("Matcher name must be a non-empty string")
        for attr in ("layers", "ops", "op_sequences"):
            v = getattr(self, attr)
            if isinstance(v, (str, type)):
                v = (v,)
            object.__setattr__(self, attr, tuple(tuple(s) if attr == "op_sequences" else s for s in v))
        for c in self.layers:
            if not isinstance(c, (str, type)):
                raise TypeError(f"Matcher layers must be classes or class names, got {c!r}")
        for s in self.op_sequences:
            if not s or not all(isinstance(o, str) for o in s):
                raise TypeError(f"op_sequences must be tuples of op type names, got {s!r}")

    def _layer_matches(self, node: Node) -> bool:
        for c in self.layers:
            if isinstance(c, str):
                if c in node.classes:
                    return True
            elif node.obj is not None and isinstance(node.obj, c):
                return True
        return False

    def match(self, view: View, node: Node, taken: Optional[set] = None) -> Optional[List[Node]]:
        """The nodes this matcher consumes starting at ``node``, or ``None``."""
        taken = taken or set()
        if node.name in taken:
            return None
        if self.predicate is not None and not self.predicate(node):
            return None
        if node.domain == KERAS:
            return [node] if self._layer_matches(node) else None
        if node.kind in self.ops:
            return [node]
        best: Optional[List[Node]] = None
        for seq in self.op_sequences:
            if node.kind != seq[0]:
                continue
            chain = [node]
            for op in seq[1:]:
                prev = chain[-1]
                cons = view.consumers(prev)
                if len(cons) != 1 or cons[0].kind != op or cons[0].name in taken:
                    chain = None
                    break
                chain.append(cons[0])
            if chain and (best is None or len(chain) > len(best)):
                best = chain
        return best

    def __repr__(self) -> str:
        names = [c if isinstance(c, str) else c.__name__ for c in self.layers]
        return f"Matcher({self.name!r}, layers={names}, ops={list(self.ops)})"


@dataclass(frozen=True)
class Step:
    """One step of a pattern: a matcher, possibly optional."""

    matcher: Matcher
    optional: bool = False


@dataclass(frozen=True)
class Match:
    """A pattern matched in a view: the group of nodes, its target, the insertion point."""

    pattern: "Pattern"
    nodes: Tuple[Node, ...]
    steps: Tuple[Tuple[str, Tuple[str, ...]], ...]  # (matcher name, node names) per matched step
    target: Node
    after: Node

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(n.name for n in self.nodes)


@dataclass(frozen=True)
class Pattern:
    """A short sequence of steps and where to insert rounding.

    Args:
        name: unique in a registry.
        steps: a sequence of :class:`Step` (or bare :class:`Matcher`, meaning
            a required step). The first step must be required.
        target: index of the step whose node is the pattern's target (its
            weights can be quantized; include/exclude/overrides refer to it).
        insert: ``"end"`` (after the last matched node) or an int step index
            (after that step's last node).
        option: if set, the pattern is used only when the config enables this
            option (e.g. ``"dense"``).
        weights: whether the target's weights are quantizable.
        weight_slots: the target's quantizable weights, as ``{slot: output-channel
            axis}`` or ``(slot, axis)`` pairs: Keras weight names (``"kernel"``, the
            ``name=`` given to ``add_weight``) or ``"input:<i>"`` for graph ops. A
            custom layer's kernel is quantized this way without editing the
            built-in table; ``None`` (default) uses :func:`weight_slots` of the
            target's kind.
    """

    name: str
    steps: Tuple[Step, ...]
    target: int = 0
    insert: Union[str, int] = "end"
    option: Optional[str] = None
    weights: bool = True
    weight_slots: Optional[Any] = None

    def __post_init__(self) -> None:
        steps = tuple(s if isinstance(s, Step) else Step(s) for s in self.steps)
        for s in steps:
            if not isinstance(s.matcher, Matcher):
                raise TypeError(f"pattern {self.name!r}: steps must be Step or Matcher, got {s!r}")
        if not steps:
            raise ValueError(f"pattern {self.name!r} has no steps")
        if steps[0].optional:
            raise ValueError(f"pattern {self.name!r}: the first step must not be optional")
        object.__setattr__(self, "steps", steps)
        if not (isinstance(self.target, int) and 0 <= self.target < len(steps)) or steps[self.target].optional:
            raise ValueError(f"pattern {self.name!r}: target must index a required step, got {self.target!r}")
        if self.insert != "end" and not (isinstance(self.insert, int) and 0 <= self.insert < len(steps)):
            raise ValueError(f"pattern {self.name!r}: insert must be 'end' or a step index, got {self.insert!r}")
        if self.weight_slots is not None:
            object.__setattr__(self, "weight_slots", _check_weight_slots(self.weight_slots, self.name))

    def slots_for(self, node: Node) -> Tuple[Tuple[str, int], ...]:
        """The quantizable weights ``(slot, output-channel axis)`` of target ``node``: the
        pattern's own ``weight_slots`` if given, else :func:`weight_slots` of its kind."""
        if self.weight_slots is not None:
            return self.weight_slots
        return weight_slots(node)

    def match(self, view: View, node: Node, taken: Optional[set] = None) -> Optional[Match]:
        """The longest match of this pattern starting at ``node``, or ``None``."""
        taken = taken or set()
        best: Optional[List[Tuple[int, List[Node]]]] = None

        def extend(i: int, prev: Optional[Node], acc: List[Tuple[int, List[Node]]]) -> None:
            nonlocal best
            if i == len(self.steps):
                if best is None or sum(len(g) for _, g in acc) > sum(len(g) for _, g in best):
                    best = list(acc)
                return
            step = self.steps[i]
            candidates: List[Node]
            if prev is None:
                candidates = [node]
            elif prev.ends_group or len(prev.consumers) != 1:
                candidates = []
            else:
                candidates = view.consumers(prev)
            for cand in candidates:
                got = step.matcher.match(view, cand, taken)
                if got and not any(g.name in taken for g in got):
                    extend(i + 1, got[-1], acc + [(i, got)])
            if step.optional:
                extend(i + 1, prev, acc)

        extend(0, None, [])
        if best is None:
            return None
        by_step = dict(best)
        if self.target not in by_step:
            return None
        nodes = tuple(n for _, g in best for n in g)
        if self.insert == "end":
            after = nodes[-1]
        else:
            # after the requested step, or the last matched step before it
            k = max(i for i in by_step if i <= self.insert)
            after = by_step[k][-1]
        return Match(
            pattern=self,
            nodes=nodes,
            steps=tuple((self.steps[i].matcher.name, tuple(n.name for n in g)) for i, g in best),
            target=by_step[self.target][0],
            after=after,
        )


# --------------------------------------------------------------------------- registry
class Registry:
    """An ordered collection of patterns; longest match first, then registry order."""

    def __init__(self, patterns: Iterable[Pattern] = ()):
        self._patterns: List[Pattern] = []
        for p in patterns:
            self.register(p)

    @property
    def patterns(self) -> Tuple[Pattern, ...]:
        return tuple(self._patterns)

    def __iter__(self) -> Iterator[Pattern]:
        return iter(self._patterns)

    def __len__(self) -> int:
        return len(self._patterns)

    def __getitem__(self, name: str) -> Pattern:
        for p in self._patterns:
            if p.name == name:
                return p
        raise KeyError(name)

    def copy(self) -> "Registry":
        return Registry(self._patterns)

    def register(
        self,
        pattern: Pattern,
        *,
        before: Optional[str] = None,
        after: Optional[str] = None,
        replace: bool = False,
    ) -> Pattern:
        """Add ``pattern`` (at the end, or ``before=``/``after=`` a named pattern).

        Raises:
            TypeError: ``pattern`` is not a :class:`Pattern`.
            ValueError: the name is taken (and ``replace`` is False), or
                ``before``/``after`` name no pattern, or both are given.
        """
        if not isinstance(pattern, Pattern):
            raise TypeError(f"pattern must be a Pattern, got {type(pattern).__name__}")
        if before is not None and after is not None:
            raise ValueError("give before= or after=, not both")
        names = [p.name for p in self._patterns]
        if pattern.name in names:
            if not replace:
                raise ValueError(f"a pattern named {pattern.name!r} is already registered (use replace=True)")
            i = names.index(pattern.name)
            if before is None and after is None:
                self._patterns[i] = pattern
                return pattern
            del self._patterns[i]
            names.pop(i)
        if before is not None or after is not None:
            ref = before if before is not None else after
            if ref not in names:
                raise ValueError(f"{'before' if before is not None else 'after'}={ref!r} names no registered pattern")
            i = names.index(ref) + (0 if before is not None else 1)
            self._patterns.insert(i, pattern)
        else:
            self._patterns.append(pattern)
        return pattern

    def unregister(self, name: str) -> Pattern:
        for i, p in enumerate(self._patterns):
            if p.name == name:
                return self._patterns.pop(i)
        raise ValueError(f"no pattern named {name!r}")

    def match(
        self,
        view: View,
        options: Iterable[str] = (),
        accept: Optional[Callable[[Node], bool]] = None,
    ) -> List[Match]:
        """All matches in ``view`` (not its children), in view order.

        Args:
            options: enabled pattern options (a pattern with ``option`` set
                is used only when it is listed).
            accept: a filter on target nodes (the config's include/exclude).
        """
        options = set(options)
        active = [p for p in self._patterns if p.option is None or p.option in options]
        taken: set = set()
        out: List[Match] = []
        for node in view:
            if node.name in taken:
                continue
            best: Optional[Match] = None
            for p in active:
                m = p.match(view, node, taken)
                if m is None or (accept is not None and not accept(m.target)):
                    continue
                if best is None or len(m.nodes) > len(best.nodes):
                    best = m
            if best is not None:
                out.append(best)
                taken.update(best.names)
        return out

    def __repr__(self) -> str:
        return f"Registry({[p.name for p in self._patterns]})"


# --------------------------------------------------------------------------- defaults
_CONV_LAYERS = (
    "Conv1D", "Conv2D", "Conv3D",
    "DepthwiseConv1D", "DepthwiseConv2D",
    "SeparableConv1D", "SeparableConv2D",
    "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose",
    "BaseConv", "BaseDepthwiseConv", "BaseSeparableConv", "BaseConvTranspose",
)  # fmt: skip
#: TensorFlow op types that are "a convolution" (the graph side of :data:`CONV`); the graph front end
#: and the custom-layer tracer use this one list.
CONV_OPS = (
    "Conv", "Conv2D", "Conv3D", "DepthwiseConv2dNative",
    "Conv2DBackpropInput", "Conv3DBackpropInputV2",
    "_FusedConv2D", "_FusedDepthwiseConv2dNative", "_FusedConv3D",
)  # fmt: skip

#: A convolution: every Keras conv layer family (subclasses too) and TF conv ops.
CONV = Matcher("conv", layers=_CONV_LAYERS, ops=CONV_OPS)
#: A dense layer / matrix product (enabled by the ``"dense"`` option).
DENSE = Matcher("dense", layers=("Dense", "EinsumDense"), ops=("MatMul", "_FusedMatMul", "BatchMatMulV2"))
#: A bias addition (graph spelling only: Keras layers carry their own bias).
BIAS = Matcher("bias", ops=("BiasAdd",))
#: A normalisation folded into the previous op at inference.
NORM = Matcher(
    "norm",
    layers=("BatchNormalization",),
    ops=("FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3"),
    op_sequences=(("Mul", "AddV2"), ("Mul", "Add"), ("Mul", "Sub"), ("Mul", "BiasAdd")),
)


#: An element-wise activation.
ACTIVATION = Matcher(
    "activation",
    layers=("ReLU", "Activation", "LeakyReLU", "PReLU", "ELU"),
    ops=("Relu", "Relu6", "LeakyRelu", "Elu", "Selu", "Sigmoid", "Tanh", "Softplus", "Softsign", "Gelu"),
    op_sequences=(("Sigmoid", "Mul"),),  # swish as exported
)

CONV_GROUP = Pattern(
    "conv", (Step(CONV), Step(BIAS, optional=True), Step(NORM, optional=True), Step(ACTIVATION, optional=True))
)
DENSE_GROUP = Pattern(
    "dense",
    (Step(DENSE), Step(BIAS, optional=True), Step(NORM, optional=True), Step(ACTIVATION, optional=True)),
    option="dense",
)


def default_registry() -> Registry:
    """A fresh copy of the default registry (``conv`` group, optional ``dense`` group)."""
    return Registry([CONV_GROUP, DENSE_GROUP])


#: The default registry. Copy it (``DEFAULT_REGISTRY.copy()``) before adding patterns.
DEFAULT_REGISTRY = default_registry()


# --------------------------------------------------------------------------- weights
# (slot, output-channel axis) per kind. Keras slots are attribute names; graph
# slots are "input:<index>".
_KERAS_WEIGHTS = [
    ("BaseSeparableConv", (("depthwise_kernel", -2), ("pointwise_kernel", -1))),
    ("BaseDepthwiseConv", (("kernel", -2),)),  # Keras 3 stores depthwise_kernel as .kernel
    ("BaseConvTranspose", (("kernel", -2),)),
    ("BaseConv", (("kernel", -1),)),
    ("Dense", (("kernel", -1),)),
    ("EinsumDense", (("kernel", -1),)),
]
_GRAPH_WEIGHTS = {
    "Conv": (("input:1", -1),),
    "Conv2D": (("input:1", -1),),
    "Conv3D": (("input:1", -1),),
    "_FusedConv2D": (("input:1", -1),),
    "_FusedConv3D": (("input:1", -1),),
    "DepthwiseConv2dNative": (("input:1", -2),),
    "_FusedDepthwiseConv2dNative": (("input:1", -2),),
    "Conv2DBackpropInput": (("input:1", -2),),
    "Conv3DBackpropInputV2": (("input:1", -2),),
    "MatMul": (("input:1", -1),),
    "_FusedMatMul": (("input:1", -1),),
}


#: graph ops whose filter (``input:1``) is a depthwise kernel ``(..., in_channels, multiplier)``
DEPTHWISE_OPS = frozenset({"DepthwiseConv2dNative", "_FusedDepthwiseConv2dNative"})


def is_depthwise_weight(node: Node, slot: str) -> bool:
    """Whether weight ``slot`` of ``node`` is a depthwise kernel ``(..., in_channels, multiplier)``
    (Keras ``DepthwiseConv1D/2D.kernel``, ``SeparableConv1D/2D.depthwise_kernel``, a graph
    depthwise op's filter): its output channels are ``in_channels * multiplier`` and its
    dot products reduce over the spatial taps only."""
    if node.domain == GRAPH:
        return node.kind in DEPTHWISE_OPS and slot == "input:1"
    if "BaseSeparableConv" in node.classes:
        return slot == "depthwise_kernel"
    return "BaseDepthwiseConv" in node.classes and slot == "kernel"


def _check_weight_slots(value: Any, pattern: str) -> Tuple[Tuple[str, int], ...]:
    what = f"pattern {pattern!r}: weight_slots"
    items = list(value.items()) if isinstance(value, Mapping) else value
    if isinstance(items, str):
        raise TypeError(f"{what} must be a dict {{slot: axis}} or (slot, axis) pairs, got {value!r}")
    out = []
    try:
        pairs = list(items)
    except TypeError:
        raise TypeError(f"{what} must be a dict {{slot: axis}} or (slot, axis) pairs, got {value!r}") from None
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise TypeError(f"{what} must be a dict {{slot: axis}} or (slot, axis) pairs, got item {pair!r}")
        slot, axis = pair
        if not isinstance(slot, str) or not slot:
            raise TypeError(f"{what}: a slot must be a non-empty string, got {slot!r}")
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise TypeError(f"{what}: the axis of {slot!r} must be an int, got {axis!r}")
        out.append((slot, axis))
    if not out:
        raise ValueError(f"{what} is empty; pass weights=False for a target without quantized weights")
    return tuple(out)


def weight_slots(node: Node) -> Tuple[Tuple[str, int], ...]:
    """Quantizable weights of a target node and their output-channel axis.

    Keras nodes give attribute names (``"kernel"``, ``"depthwise_kernel"``,
    ``"pointwise_kernel"``); graph nodes give ``"input:<i>"``. Depthwise
    kernels ``(kh, kw, in, multiplier)`` and transposed-conv kernels
    ``(kh, kw, out, in)`` use axis -2; the rest -1. Unknown kinds: ``()``.
    """
    if node.domain == GRAPH:
        return _GRAPH_WEIGHTS.get(node.kind, ())
    for cls, slots in _KERAS_WEIGHTS:
        if cls in node.classes:
            return slots
    return ()
