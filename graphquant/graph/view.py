"""Read a TensorFlow ``GraphDef`` (and its function library) into a neutral view.

The view is what the pattern registry and the planner look at: a flat list of
nodes, each with a ``kind`` (the TF op type), a ``name``, the names of the nodes
feeding it (``inputs``), the nodes it feeds (``consumers``) and ``attributes``.
Graphs saved by TensorFlow 2 keep almost all computation inside function-library
bodies (``StatefulPartitionedCall`` / ``PartitionedCall`` callees), so every
function body is read as its own *scope*; node names are qualified as
``"<function>/<node>"`` (top-level nodes keep their plain name).

Nothing here edits a graph; :mod:`graphquant.graph.rewrite` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

from tensorflow.core.framework import function_pb2, graph_pb2, node_def_pb2, types_pb2

from ..patterns import CONV_OPS

__all__ = ["GraphNode", "GraphView", "read_graph_def", "CONV_OPS", "output_arg_names"]


#: Op types that call a function from the library via an ``f`` attribute.
CALL_OPS = frozenset({"PartitionedCall", "StatefulPartitionedCall"})

#: The input index holding the filter of each convolution op.
FILTER_INPUT = {
    "Conv2D": 1,
    "Conv3D": 1,
    "DepthwiseConv2dNative": 1,
    "Conv2DBackpropInput": 1,
    "Conv3DBackpropInputV2": 1,
    "Conv3DBackpropInput": 1,
    "Conv": 1,
    "_FusedConv2D": 1,
    "_FusedConv3D": 1,
    "_FusedDepthwiseConv2dNative": 1,
    "FusedPadConv2D": 2,
    "FusedResizeAndPadConv2D": 3,
}

#: The data input of each convolution op (the activations).
DATA_INPUT = {k: (2 if k in ("Conv2DBackpropInput", "Conv3DBackpropInputV2", "Conv3DBackpropInput") else 0) for k in FILTER_INPUT}

_OUTPUT_NAME_CACHE: Dict[str, Tuple[str, ...]] = {}


def output_arg_names(op_type: str, library: Optional[Dict[str, function_pb2.FunctionDef]] = None) -> Tuple[str, ...]:
    """Names of an op's output arguments (used to spell ``node:arg:index`` refs)."""
    if library is not None and op_type in library:
        return tuple(a.name for a in library[op_type].signature.output_arg)
    if op_type not in _OUTPUT_NAME_CACHE:
        from tensorflow.python.framework import op_def_registry

        op_def = op_def_registry.get(op_type)
        if op_def is None:
            raise ValueError(f"unknown TensorFlow op type {op_type!r}")
        _OUTPUT_NAME_CACHE[op_type] = tuple(a.name for a in op_def.output_arg)
    return _OUTPUT_NAME_CACHE[op_type]


def _attr_value(v) -> Any:
    which = v.WhichOneof("value")
    if which == "type":
        return types_pb2.DataType.Name(v.type).replace("DT_", "").lower()
    if which == "list":
        lst = v.list
        if lst.type:
            return [types_pb2.DataType.Name(t).replace("DT_", "").lower() for t in lst.type]
        if lst.i:
            return list(lst.i)
        if lst.s:
            return [s.decode("utf-8", "replace") for s in lst.s]
        if lst.f:
            return list(lst.f)
        return []
    if which == "s":
        return v.s.decode("utf-8", "replace")
    if which == "func":
        return v.func.name
    if which == "shape":
        if v.shape.unknown_rank:
            return None
        return [d.size for d in v.shape.dim]
    if which in ("i", "f", "b"):
        return getattr(v, which)
    return which  # tensor / placeholder: not needed by matchers


def parse_input(ref: str, in_function: bool) -> Tuple[str, str, bool]:
    """Split an input reference into ``(node, port, is_control)``.

    Top-level graphs spell ``node`` / ``node:1``; function bodies spell
    ``node:out_arg:0``, or just ``arg`` for a function argument.
    """
    if ref.startswith("^"):
        return ref[1:], "", True
    if in_function:
        head, _, port = ref.partition(":")
        return head, port, False
    head, _, port = ref.rpartition(":")
    if not head or not port.isdigit():
        return ref, "0", False
    return head, port, False


@dataclass
class GraphNode:
    """One node of the neutral view.

    Attributes:
        kind: the TF op type (``"Conv2D"``, ``"_Arg"`` for a function argument).
        name: qualified name, ``"<scope>/<local>"`` or the plain local name at top level.
        scope: ``""`` for the top-level graph, else the function's name.
        local: the node's name inside its scope.
        inputs: qualified names of the nodes feeding the data inputs, in order.
        consumers: qualified names of the nodes consuming any output (data only).
        attributes: op attributes as plain Python values, plus ``"parameter"``:
            True when the value does not depend on the graph's data inputs
            (constants, variable reads and arithmetic on them).
        input_refs: the raw input strings (same order as ``inputs``).
    """

    kind: str
    name: str
    scope: str
    local: str
    inputs: List[str] = field(default_factory=list)
    consumers: List[str] = field(default_factory=list)
    attributes: Dict[str, Any] = field(default_factory=dict)
    input_refs: List[str] = field(default_factory=list)

    @property
    def op(self) -> str:
        return self.kind

    @property
    def is_parameter(self) -> bool:
        return bool(self.attributes.get("parameter", False))

    @property
    def dtype(self) -> Optional[str]:
        return self.attributes.get("T", self.attributes.get("dtype"))


def qualify(scope: str, local: str) -> str:
    return local if not scope else f"{scope}/{local}"


_DATA_SOURCE_OPS = frozenset({"Placeholder", "PlaceholderWithDefault", "_Arg", "IteratorGetNext", "RandomUniform", "RandomStandardNormal"})


class GraphView:
    """A neutral, read-only view of a GraphDef and its function library.

    Iterate over it for every node; ``view[name]`` looks a node up by
    qualified name. ``functions`` maps a function name to the names of the
    function-call nodes calling it.
    """

    def __init__(self, graph_def: graph_pb2.GraphDef, *, skip_functions: Iterable[str] = ()) -> None:
        self.graph_def = graph_def
        self.library: Dict[str, function_pb2.FunctionDef] = {f.signature.name: f for f in graph_def.library.function}
        self.nodes: Dict[str, GraphNode] = {}
        self.scopes: Dict[str, List[str]] = {}
        self.callers: Dict[str, List[str]] = {}
        skip = set(skip_functions)
        self._read_scope("", graph_def.node, None)
        for fname, fdef in self.library.items():
            if fname in skip:
                continue
            self._read_scope(fname, fdef.node_def, fdef)

    # -- reading ------------------------------------------------------------
    def _read_scope(self, scope: str, node_defs: Iterable[node_def_pb2.NodeDef], fdef) -> None:
        in_fn = fdef is not None
        names: List[str] = []
        local_nodes: Dict[str, GraphNode] = {}
        if in_fn:
            for arg in fdef.signature.input_arg:
                dtype = types_pb2.DataType.Name(arg.type).replace("DT_", "").lower()
                n = GraphNode("_Arg", qualify(scope, arg.name), scope, arg.name, attributes={"T": dtype})
                local_nodes[arg.name] = n
        for nd in node_defs:
            attrs = {k: _attr_value(v) for k, v in nd.attr.items()}
            n = GraphNode(nd.op, qualify(scope, nd.name), scope, nd.name, attributes=attrs)
            local_nodes[nd.name] = n
        for nd in node_defs:
            n = local_nodes[nd.name]
            for ref in nd.input:
                src, _, ctrl = parse_input(ref, in_fn)
                if ctrl:
                    continue
                p = local_nodes.get(src)
                n.inputs.append(p.name if p else qualify(scope, src))
                n.input_refs.append(ref)
                if p is not None and n.name not in p.consumers:
                    p.consumers.append(n.name)
            if nd.op in CALL_OPS and "f" in nd.attr:
                self.callers.setdefault(nd.attr["f"].func.name, []).append(n.name)
            elif nd.op in self.library:
                self.callers.setdefault(nd.op, []).append(n.name)
        if in_fn:
            for out_name, ref in fdef.ret.items():
                src, _, _ = parse_input(ref, True)
                p = local_nodes.get(src)
                if p is not None:
                    p.consumers.append(qualify(scope, "<return>"))
        # parameter flag: topological propagation with memoised DFS
        memo: Dict[str, bool] = {}

        def is_param(local: str, depth: int = 0) -> bool:
            if local in memo:
                return memo[local]
            node = local_nodes.get(local)
            if node is None:
                return False
            if node.kind == "_Arg":
                res = node.attributes.get("T") == "resource"
            elif node.kind in ("Placeholder", "PlaceholderWithDefault"):
                res = node.attributes.get("dtype") == "resource"
            elif node.kind in _DATA_SOURCE_OPS:
                res = False
            elif node.kind in ("Const", "VarHandleOp", "ReadVariableOp"):
                res = True if node.kind != "ReadVariableOp" else True
            elif depth > 200:
                res = False
            else:
                memo[local] = False  # cycle guard (loops)
                res = bool(node.input_refs) and all(
                    is_param(parse_input(r, in_fn)[0], depth + 1) for r in node.input_refs
                )
            memo[local] = res
            return res

        for local, node in local_nodes.items():
            node.attributes["parameter"] = is_param(local)
            self.nodes[node.name] = node
            names.append(node.name)
        self.scopes[scope] = names

    # -- access -------------------------------------------------------------
    def __iter__(self) -> Iterator[GraphNode]:
        return iter(self.nodes.values())

    def __len__(self) -> int:
        return len(self.nodes)

    def __getitem__(self, name: str) -> GraphNode:
        return self.nodes[name]

    def __contains__(self, name: str) -> bool:
        return name in self.nodes

    def get(self, name: str) -> Optional[GraphNode]:
        return self.nodes.get(name)

    def node(self, name: str) -> GraphNode:
        return self.nodes[name]

    def consumers(self, name: str) -> List[GraphNode]:
        return [self.nodes[c] for c in self.nodes[name].consumers if c in self.nodes]

    def producers(self, name: str) -> List[GraphNode]:
        return [self.nodes[c] for c in self.nodes[name].inputs if c in self.nodes]

    def convolutions(self) -> List[GraphNode]:
        return [n for n in self if n.kind in CONV_OPS]


def read_graph_def(graph_def: graph_pb2.GraphDef, **kwargs: Any) -> GraphView:
    """Read ``graph_def`` (top level and every library function) into a :class:`GraphView`."""
    if not isinstance(graph_def, graph_pb2.GraphDef):
        raise TypeError(f"graph_def must be a tf.compat.v1.GraphDef, got {type(graph_def).__name__}")
    return GraphView(graph_def, **kwargs)
