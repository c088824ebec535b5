"""Read a TensorFlow ``GraphDef`` (and its function library) into the neutral :class:`~graphquant.patterns.View`.

The view is what the pattern registry and the planner look at (the same
:class:`~graphquant.patterns.View` the Keras front end builds in
:mod:`graphquant.keras.view`). Graphs saved by TensorFlow 2 keep almost all
computation inside function-library bodies (``StatefulPartitionedCall`` /
``PartitionedCall`` callees), so every function body is read as its own
*scope*: a child view ``View.children[<function name>]`` of the top-level
graph's view. Node names are the names inside their scope; a function's
arguments are not nodes (an input naming one points outside the view) and a
function's return values are the consumer ``"<return>"``.

Each node's ``attrs`` are its op attributes as plain Python values, plus

* ``"parameter"``: True when the value does not depend on the graph's data
  inputs (constants, variable reads and arithmetic on them);
* ``"parameter_inputs"``: that flag for each data input, in order;
* ``"activation"``: for a ``_Fused*`` op, the activation it fused (``"relu"``).

Nothing here edits a graph; :mod:`graphquant.graph.rewrite` does.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Tuple

from tensorflow.core.framework import function_pb2, graph_pb2, node_def_pb2, types_pb2

from ..patterns import GRAPH, Node, View

__all__ = ["graph_view", "parse_input", "output_arg_names", "CALL_OPS"]


#: Op types that call a function from the library via an ``f`` attribute.
CALL_OPS = frozenset({"PartitionedCall", "StatefulPartitionedCall"})

#: The consumer name of a function's return values.
RETURN = "<return>"

_OUTPUT_NAME_CACHE: Dict[str, Tuple[str, ...]] = {}

_DATA_SOURCE_OPS = frozenset({"Placeholder", "PlaceholderWithDefault", "_Arg", "IteratorGetNext", "RandomUniform", "RandomStandardNormal"})


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


def _dtype_name(dtype: int) -> str:
    return types_pb2.DataType.Name(dtype).replace("DT_", "").lower()


def _attr_value(v: Any) -> Any:
    """An ``AttrValue`` as a plain Python value (dtypes as ``"float"``, shapes as lists)."""
    which = v.WhichOneof("value")
    if which == "type":
        return _dtype_name(v.type)
    if which == "list":
        lst = v.list
        if lst.type:
            return [_dtype_name(t) for t in lst.type]
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


def _fused_activation(attrs: Dict[str, Any]) -> Optional[str]:
    """The activation a ``_Fused*`` op applies (``"relu"``), from its ``fused_ops``; ``None`` if none."""
    for op in attrs.get("fused_ops") or []:
        if op not in ("BiasAdd", "FusedBatchNorm", "Add"):
            return str(op).lower()
    return None


def _parameter_flags(nodes: Dict[str, Node], args: Dict[str, str]) -> Dict[str, bool]:
    """Whether each node of a scope (and each function argument) is a *parameter*: its value does
    not depend on the data inputs. Variable handles (resource arguments and placeholders),
    constants and variable reads are; data sources are not; any other op is when all its data
    inputs are (a loop in the graph counts as data)."""
    memo: Dict[str, bool] = {}

    def is_param(name: str, depth: int = 0) -> bool:
        if name in memo:
            return memo[name]
        if name in args:
            res = args[name] == "resource"
        elif name not in nodes:
            return False
        else:
            node = nodes[name]
            if node.kind == "_Arg":
                res = node.attrs.get("T") == "resource"
            elif node.kind in ("Placeholder", "PlaceholderWithDefault"):
                res = node.attrs.get("dtype") == "resource"
            elif node.kind in _DATA_SOURCE_OPS:
                res = False
            elif node.kind in ("Const", "VarHandleOp", "ReadVariableOp"):
                res = True
            elif depth > 200:
                res = False
            else:
                memo[name] = False  # cycle guard (loops)
                res = bool(node.inputs) and all(is_param(i, depth + 1) for i in node.inputs)
        memo[name] = res
        return res

    return {name: is_param(name) for name in [*args, *nodes]}


def _scope_view(name: str, node_defs: Iterable[node_def_pb2.NodeDef], fdef: Optional[function_pb2.FunctionDef]) -> View:
    """The view of one scope: the top-level graph (``fdef`` None) or one function body."""
    in_fn = fdef is not None
    args = {a.name: _dtype_name(a.type) for a in fdef.signature.input_arg} if in_fn else {}
    nodes: Dict[str, Node] = {}
    for nd in node_defs:
        inputs = [parse_input(ref, in_fn)[0] for ref in nd.input if not ref.startswith("^")]
        attrs = {k: _attr_value(v) for k, v in nd.attr.items()}
        nodes[nd.name] = Node(nd.name, nd.op, GRAPH, inputs=inputs, attrs=attrs)
    for node in nodes.values():
        for i in node.inputs:
            if i in nodes and node.name not in nodes[i].consumers:
                nodes[i].consumers.append(node.name)
    for ref in fdef.ret.values() if in_fn else ():
        src = parse_input(ref, True)[0]
        if src in nodes:
            nodes[src].consumers.append(RETURN)
    flags = _parameter_flags(nodes, args)
    for node in nodes.values():
        node.attrs["parameter"] = flags[node.name]
        node.attrs["parameter_inputs"] = [flags.get(i, False) for i in node.inputs]
        if node.kind.startswith("_Fused"):
            act = _fused_activation(node.attrs)
            if act:
                node.attrs["activation"] = act
    # a function's arguments are not nodes (nor are top-level _Arg ops, as in graphs after grappler)
    return View([n for n in nodes.values() if n.kind != "_Arg"], name=name or "graph")


def graph_view(graph_def: graph_pb2.GraphDef, *, skip_functions: Iterable[str] = ()) -> View:
    """The neutral view of ``graph_def``: its top-level graph, with one child view per library
    function (``View.children[<function name>]``) except those named in ``skip_functions``.

    Raises:
        TypeError: ``graph_def`` is not a ``GraphDef``.
    """
    if not isinstance(graph_def, graph_pb2.GraphDef):
        raise TypeError(f"graph_def must be a tf.compat.v1.GraphDef, got {type(graph_def).__name__}")
    skip = set(skip_functions)
    children = {f.signature.name: _scope_view(f.signature.name, f.node_def, f)
                for f in graph_def.library.function if f.signature.name not in skip}
    root = _scope_view("", graph_def.node, None)
    root.children.update(children)
    return root
