"""Read a Keras 3 model into the neutral :class:`~graphquant.patterns.View`.

One node per layer *call* (a layer shared by two calls gives two nodes,
``name`` and ``name@1``). Nested Functional/Sequential models are one node
each, with their own view in ``View.children[layer_name]``; so are custom
layers (see :mod:`graphquant.keras.custom`), under the name of their call.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import keras

from ..patterns import KERAS, Node, View
from .custom import custom_view, is_custom_layer, layer_attrs

__all__ = ["keras_view", "check_model", "iter_calls", "producer_node"]


def _classes(obj: Any) -> Tuple[str, ...]:
    return tuple(c.__name__ for c in type(obj).__mro__ if c is not object)


def is_sequential(m: Any) -> bool:
    """Whether ``m`` is a ``keras.Sequential`` model."""
    return isinstance(m, keras.Sequential)


def is_functional(m: Any) -> bool:
    """Whether ``m`` is a functional Keras model (a graph of layers, not Sequential)."""
    return isinstance(m, keras.Model) and hasattr(m, "_nodes_by_depth") and not is_sequential(m)


def is_graph_model(m: Any) -> bool:
    """A Functional or Sequential model (not subclassed)."""
    return is_sequential(m) or is_functional(m)


def check_model(model: Any, what: str = "model") -> None:
    """Raise a clear error when ``model`` cannot be rewritten."""
    if not isinstance(model, keras.Model):
        if isinstance(model, keras.layers.Layer):
            raise TypeError(f"{what} must be a keras.Model, got the layer {type(model).__name__}; wrap it in a model")
        raise TypeError(f"{what} must be a Keras 3 keras.Model, got {type(model).__name__}")
    if not is_graph_model(model):
        raise TypeError(
            f"{what} {model.name!r} is a subclassed keras.Model ({type(model).__name__}); graphquant can only "
            "rewrite Functional and Sequential models. Build it as a Functional model (keras.Model(inputs, "
            "outputs)), or export it (model.export(path)) and use graphquant.convert_saved_model, or call "
            "graphquant.keras.Quantize / graphquant.quantize yourself inside its call()."
        )
    if is_sequential(model) and not model.built:
        raise ValueError(
            f"{what} {model.name!r} is a Sequential model that is not built; give it an Input "
            "(keras.Input(shape=...)) or call it on data once before quantizing"
        )


def iter_calls(model: keras.Model) -> List[Tuple[str, Any, Any]]:
    """``(view name, layer, keras Node)`` for each layer call, in topological order.

    For a Sequential model the Node is ``None`` and calls are in layer order.
    """
    out: List[Tuple[str, Any, Any]] = []
    counts: Dict[int, int] = {}
    if is_sequential(model):
        for layer in model.layers:
            out.append((layer.name, layer, None))
        return out
    nodes_by_depth = model._nodes_by_depth
    for depth in sorted(nodes_by_depth, reverse=True):
        for node in nodes_by_depth[depth]:
            op = node.operation
            if op is None:
                continue
            k = counts.get(id(op), 0)
            counts[id(op)] = k + 1
            out.append((op.name if k == 0 else f"{op.name}@{k}", op, node))
    return out


def producer_node(tensor: Any) -> Any:
    """The Keras Node (layer call) that produced the symbolic tensor ``tensor``; ``None`` for a tensor without
    Keras history."""
    hist = getattr(tensor, "_keras_history", None)
    return None if hist is None else hist.operation._inbound_nodes[hist.node_index]


def keras_view(model: keras.Model) -> View:
    """The neutral view of a Functional or Sequential Keras model (recursive)."""
    check_model(model)
    nodes: List[Node] = []
    children: Dict[str, View] = {}
    if is_sequential(model):
        prev = None
        inp = "input"
        nodes.append(Node(inp, "InputLayer", KERAS, classes=("InputLayer",)))
        prev = inp
        for name, layer, _ in iter_calls(model):
            nodes.append(
                Node(name, type(layer).__name__, KERAS, inputs=[prev], attrs=layer_attrs(layer), obj=layer,
                     classes=_classes(layer))
            )  # fmt: skip
            if isinstance(layer, keras.Model) and is_graph_model(layer) and layer.name not in children:
                children[layer.name] = keras_view(layer)
            elif is_custom_layer(layer) and layer._inbound_nodes:
                args = layer._inbound_nodes[0].arguments
                children[name] = custom_view(layer, args.args, args.kwargs)
            prev = name
        return View(nodes, children, name=model.name)

    name_of_node: Dict[int, str] = {}
    for name, op, node in iter_calls(model):
        name_of_node[id(node)] = name
    for name, op, node in iter_calls(model):
        inputs = []
        for t in node.input_tensors:
            src_name = name_of_node.get(id(producer_node(t)))
            if src_name is not None and src_name not in inputs:
                inputs.append(src_name)
        kind = "InputLayer" if node.is_input else type(op).__name__
        nodes.append(Node(name, kind, KERAS, inputs=inputs, attrs=layer_attrs(op), obj=op, classes=_classes(op)))
        if isinstance(op, keras.Model) and is_graph_model(op) and op.name not in children:
            children[op.name] = keras_view(op)
        elif is_custom_layer(op) and "@" not in name:  # a custom layer: rewritten once for all its calls
            children[name] = custom_view(op, node.arguments.args, node.arguments.kwargs)
    return View(nodes, children, name=model.name)
