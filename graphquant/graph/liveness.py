"""The invariant checked after every graph rewrite: no inserted node is dead.

An inserted rounding node only does something when its value reaches an
output the user can call: a signature output (a tensor of the top-level
graph), or a return value of a library function that is itself reachable (a
function an output's path calls, or a function the SavedModel's object graph
exposes). A rounding spliced after a tensor nothing reads any more (for
example a TF1 signature output whose signature still names the unrounded
tensor) is a silent no-op; :func:`check_live` turns it into an error.

Reachability follows data inputs backwards from the roots, function-level
through calls: a reachable node that calls a function (``PartitionedCall`` /
``StatefulPartitionedCall`` ``f``, any function-valued attribute such as a
``While`` body, or an op named after a library function) makes every return
value (and control return) of that function a root.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Set, Tuple

from tensorflow.core.framework import graph_pb2

__all__ = ["dead_insertions", "check_live", "tensor_node"]


def tensor_node(ref: str, in_function: bool = False) -> Optional[str]:
    """The node name of a data reference (``"relu:0"``, ``"relu"``, ``"conv:output:0"``); None for ``^ctrl``."""
    if ref.startswith("^"):
        return None
    if in_function:
        return ref.split(":", 1)[0]
    head, _, port = ref.rpartition(":")
    return head if head and port.isdigit() else ref


def called_functions(nd: Any, library: Mapping[str, object]) -> List[str]:
    """Names of the ``library`` functions node ``nd`` calls: as its op, or in a function attribute
    (``f`` of a ``PartitionedCall``, the branches of ``If``/``While``, ...)."""
    out = []
    if nd.op in library:
        out.append(nd.op)
    for v in nd.attr.values():
        which = v.WhichOneof("value")
        if which == "func" and v.func.name in library:
            out.append(v.func.name)
        elif which == "list":
            out.extend(f.name for f in v.list.func if f.name in library)
    return out


def dead_insertions(
    graph_def: graph_pb2.GraphDef,
    inserted: Iterable[Tuple[str, str]],
    outputs: Iterable[str] = (),
    functions: Iterable[str] = (),
    control_outputs: Iterable[str] = (),
) -> List[Tuple[str, str]]:
    """The ``(scope, node)`` pairs of ``inserted`` from which no root is reachable.

    Args:
        graph_def: the rewritten graph (its library included).
        inserted: ``(scope, node)`` of each inserted node; scope ``""`` is the
            top-level graph, else a library function's name.
        outputs: top-level tensor names the user reads (signature outputs).
        functions: library functions callable from outside (e.g. a
            SavedModel's object-graph concrete functions): their returns are roots.
        control_outputs: top-level node names run for their effects.
    """
    library = {f.signature.name: f for f in graph_def.library.function}
    top = {n.name: n for n in graph_def.node}
    bodies: Dict[str, Dict[str, object]] = {}
    live: Set[Tuple[str, str]] = set()
    live_functions: Set[str] = set()
    stack: List[Tuple[str, str]] = []

    def push(scope: str, name: Optional[str]) -> None:
        if name is None or (scope, name) in live:
            return
        live.add((scope, name))
        stack.append((scope, name))

    def enter(fname: str) -> None:
        if fname in live_functions or fname not in library:
            return
        live_functions.add(fname)
        fdef = library[fname]
        for ref in list(fdef.ret.values()):
            push(fname, tensor_node(ref, True))
        for node in fdef.control_ret.values():
            push(fname, node)

    for ref in outputs:
        push("", tensor_node(ref))
    for name in control_outputs:
        push("", name.lstrip("^"))
    for fname in functions:
        enter(fname)
    while stack:
        scope, name = stack.pop()
        if scope:
            if scope not in bodies:
                bodies[scope] = {n.name: n for n in library[scope].node_def}
            nd = bodies[scope].get(name)
        else:
            nd = top.get(name)
        if nd is None:  # a function argument or a name outside the graph
            continue
        for ref in nd.input:
            push(scope, tensor_node(ref, bool(scope)))
        for fname in called_functions(nd, library):
            enter(fname)
    return [(s, n) for s, n in inserted if (s, n) not in live]


def check_live(
    graph_def: graph_pb2.GraphDef,
    inserted: Iterable[Tuple[str, str]],
    *,
    model: str,
    outputs: Iterable[str] = (),
    functions: Iterable[str] = (),
    control_outputs: Iterable[str] = (),
) -> None:
    """Raise ``ValueError`` naming ``model`` and the node when an inserted node reaches no output.

    Arguments as in :func:`dead_insertions`; ``model`` names the model (or
    function) in the message.
    """
    dead = dead_insertions(graph_def, inserted, outputs, functions, control_outputs)
    if dead:
        where = ", ".join(f"{n!r}" + (f" in function {s!r}" if s else "") for s, n in dead)
        raise ValueError(
            f"{model}: {len(dead)} inserted rounding node(s) reach no output, so the rounding would have "
            f"no effect: {where}; exclude that group (exclude=) or report this as a bug"
        )
