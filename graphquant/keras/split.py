"""Split a layer's own non-fusable activation into an ``Activation`` layer, as the TFLite converter emits it.

``Conv2D(..., activation="sigmoid")`` (EfficientNet's squeeze-and-excitation)
converts to ``CONV_2D`` with an int8 output tensor, then ``LOGISTIC``: the
runtime rounds *between* the convolution and its activation. The converter
fuses only RELU/RELU6 (and RELU_N1_TO_1) into a conv/FC; any other activation
is an op of its own after a requantized tensor. :func:`split_activations`
rebuilds a Functional model with every such layer replaced by the same layer
with a linear activation followed by ``Activation(<its activation>)`` named
``<layer>_activation``, so a target's registry can place a rounding point
between them. Same computation, same weights (copied); the source model is
left untouched.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Tuple

import keras

from .view import is_functional, iter_calls

__all__ = ["split_activations", "FUSED_INLINE"]

log = logging.getLogger(__name__)

#: Inline activations the converter fuses into CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED.
FUSED_INLINE = ("linear", "relu", "relu6")
_SPLIT_LAYERS = ("Conv1D", "Conv2D", "Conv3D", "DepthwiseConv1D", "DepthwiseConv2D", "SeparableConv1D",
                 "SeparableConv2D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose", "Dense")  # fmt: skip


def to_split(layer: Any) -> bool:
    """Whether :func:`split_activations` moves ``layer``'s inline activation into a layer of its own."""
    if type(layer).__name__ not in _SPLIT_LAYERS:
        return False
    act = getattr(layer, "activation", None)
    return act is not None and getattr(act, "__name__", "linear") not in FUSED_INLINE


def split_activations(model: Any) -> Tuple[Any, List[str]]:
    """``(model, names)``: ``model`` rebuilt with the inline activation of each conv/Dense layer whose activation
    the converter does not fuse as its own ``Activation`` layer (see the module docstring), and the names of those
    layers; ``(model, [])`` unchanged when there are none, or when ``model`` is not Functional (a Sequential
    model keeps them: a plan note says so)."""
    if not is_functional(model):
        return model, []
    calls = iter_calls(model)
    todo = [op for _, op, node in calls if not node.is_input and to_split(op)]
    if not todo:
        return model, []
    tensors: Dict[int, Any] = {}
    new_inputs = []
    for x in model.inputs:
        layer = x._keras_history.operation
        y = keras.Input(batch_shape=tuple(x.shape), dtype=x.dtype, name=layer.name)
        tensors[id(x)] = y
        new_inputs.append(y)
    made: Dict[int, Any] = {}
    pairs = []
    for name, op, node in calls:
        if node.is_input:
            continue
        args, kwargs = node.arguments.fill_in(tensors)
        if id(op) not in made:
            if not isinstance(op, keras.layers.Layer):  # a plain keras.ops operation: stateless
                made[id(op)] = op.__class__.from_config(op.get_config())
            elif to_split(op):
                cfg = op.get_config()
                act = cfg["activation"]
                cfg["activation"] = "linear"
                lin = op.__class__.from_config(cfg)
                made[id(op)] = (lin, keras.layers.Activation(act, name=f"{op.name}_activation"))
                pairs.append((op, lin))
            else:
                made[id(op)] = op.__class__.from_config(op.get_config())
                pairs.append((op, made[id(op)]))
        new = made[id(op)]
        out = new[1](new[0](*args, **kwargs)) if isinstance(new, tuple) else new(*args, **kwargs)
        for x, y in zip(node.outputs, keras.tree.flatten(out)):
            tensors[id(x)] = y
    outs = [tensors[id(x)] for x in keras.tree.flatten(model._outputs_struct)]
    new_model = keras.Model(keras.tree.pack_sequence_as(model._inputs_struct, new_inputs),
                            keras.tree.pack_sequence_as(model._outputs_struct, outs), name=model.name)  # fmt: skip
    for old, new in pairs:
        if old.weights:
            new.set_weights(old.get_weights())
    names = [op.name for op in todo]
    log.info("split_activations: %d layers' activations split out (%s)", len(names), ", ".join(names[:5]))
    return new_model, names
