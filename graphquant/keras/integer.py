"""Link a ``tflite_int8`` Keras model's layers to the int8 runtime's integer kernels.

:func:`link_integer` links every convolution / depthwise / Dense layer whose
input comes from a rounding point (through same-scale ops such as ZeroPadding)
and whose group ends in one (through a ReLU/ReLU6) to those two points, and
ADD, MEAN, AVERAGE_POOL_2D, CONCATENATION, LOGISTIC, MUL and the model input's
rounding point (which then quantizes as the runtime's QUANTIZE does) to theirs.
With ``training=False`` a linked layer computes what the runtime computes; the
arithmetic lives in :mod:`graphquant.keras.integer_ops` (which the layers call
without importing this module: the links are attributes set on the layers).
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Tuple

from ..formats import Affine
from .fold import FoldedConvBatchNorm
from .integer_ops import (DEFAULT_KERNELS, KERNELS, check_kernels, int_concat, int_quantize,
                          multiply_by_quantized_multiplier_tf, op_kernel, pass_carried, qparams, quantize_input_tf,
                          quantize_multiplier_tf, same_scale_call)
from .layers import ON_LOADED, Quantize, QuantizeWeights

__all__ = ["link_integer", "KERNELS", "qparams", "quantize_input_tf", "quantize_multiplier_tf",
           "multiply_by_quantized_multiplier_tf"]

#: Layers whose output keeps their input's scale and zero point (the converter passes the int8 values through).
SAME_SCALE_LAYERS = ("ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D", "MaxPooling1D", "MaxPooling2D",
                     "MaxPooling3D", "Reshape", "Flatten", "Dropout", "Cropping1D", "Cropping2D", "Cropping3D",
                     "Identity")  # fmt: skip
_LINKED_LAYERS = ("Conv1D", "Conv2D", "DepthwiseConv1D", "DepthwiseConv2D", "Dense")


def eligible_quantize(q: Any) -> bool:
    """Whether ``q`` is a Quantize layer the integer kernels can stand for (learned 8-bit affine)."""
    fmt = getattr(q, "format", None)
    return (isinstance(q, Quantize) and q.learned and isinstance(fmt, Affine) and fmt.bits == 8
            and not fmt.symmetric and not fmt.narrow_range and fmt.axis is None
            and q.inference_rounding == "nearest" and tuple(q.range.shape) == (3,))  # fmt: skip


def _fusable(layer: Any) -> bool:
    name = type(layer).__name__
    if name == "ReLU":
        return (float(layer.negative_slope or 0.0) == 0.0 and float(layer.threshold or 0.0) == 0.0
                and layer.max_value in (None, 6, 6.0))  # fmt: skip
    if name == "Activation":
        return getattr(layer.activation, "__name__", "") in ("relu", "relu6")
    return False


def _upstream_quantize(tensor: Any) -> Optional[Any]:
    for _ in range(16):
        op = tensor._keras_history.operation
        if eligible_quantize(op):
            return op
        if type(op).__name__ not in SAME_SCALE_LAYERS or len(op._inbound_nodes) != 1:
            return None
        tensor = op._inbound_nodes[0].input_tensors[0]
    return None


def _downstream_chain(layer: Any) -> Tuple[Optional[Any], list]:
    """The rounding point that ends ``layer``'s group and the fused ReLU/ReLU6 layers on the way (``(None, [])``
    if the group does not end in one)."""
    side: list = []  # a rounding layer also called with pre_activation= (Quantize.fused_activation)
    chain: list = []
    for _ in range(4):
        ops = list({id(n.operation): n.operation for n in layer._outbound_nodes}.values())
        quants = [op for op in ops if eligible_quantize(op)]
        others = [op for op in ops if not eligible_quantize(op)]
        if not others and len(quants) == 1 and all(q is quants[0] for q in side):
            return quants[0], chain
        if len(others) != 1 or not _fusable(others[0]) or len(others[0]._inbound_nodes) != 1:
            return None, []
        side += quants
        layer = others[0]
        chain.append(layer)
    return None, []


def _downstream_quantize(layer: Any) -> Optional[Any]:
    return _downstream_chain(layer)[0]


def _activation_of(layer: Any) -> str:
    """``"relu"``, ``"relu6"`` or ``"linear"``: the fused activation a ReLU/Activation layer (or a weight layer's
    own ``activation``) applies."""
    if type(layer).__name__ == "ReLU":
        return "relu" if layer.max_value is None else "relu6"
    name = getattr(getattr(layer, "activation", None), "__name__", "linear")
    return name if name in ("relu", "relu6") else "linear"


def _chain_activation(layer: Any, chain: list) -> str:
    """The activation the runtime fuses into ``layer``'s op: its own and that of the ReLU/ReLU6 ``chain``."""
    acts = {_activation_of(layer)} | {_activation_of(f) for f in chain}
    return "relu6" if "relu6" in acts else "relu" if "relu" in acts else "linear"


def _pass_through(out_q: Any, chain: list) -> None:
    """Let the group's ReLU/ReLU6 layers and its rounding point pass a linked layer's output through at inference
    (:func:`~graphquant.keras.integer_ops.pass_carried`): the integer kernel already clamped and rounded it."""
    # (a function, not the layer: saving walks a layer's attributes, and a layer attribute would be saved twice)
    for layer in chain + [out_q]:
        object.__setattr__(layer, "_gq_pass", (lambda q=out_q: q))
        if layer in chain or getattr(out_q, "_gq_orig_call", None) is None:  # (int_quantize checks it itself)
            _override_call(layer, pass_carried)


def link_integer(model: Any, kernels: Optional[str] = None) -> int:
    """Link the weight layers of a ``tflite_int8`` model to the rounding points around them (see the module
    docstring); returns how many were linked. Idempotent. The kernel set is recorded on the model input's
    rounding layer (:class:`~graphquant.keras.Quantize` ``integer_kernels``), which a ``.keras`` file saves:
    ``keras.models.load_model`` links the loaded model again with it.

    Args:
        model: a Keras model quantized with ``target="tflite_int8"``.
        kernels: the kernel set whose arithmetic inference computes: ``"reference"`` (LiteRT's reference
            kernels) or ``"xnnpack"`` (the default interpreter's XNNPACK delegate); ``None`` keeps the
            model's current choice (the one its file recorded for a loaded model; at first
            :data:`graphquant.keras.integer_ops.DEFAULT_KERNELS`, ``"xnnpack"``).
    """
    before = getattr(model, "_gq_kernels", None)
    if kernels is None:
        recorded = [layer.integer_kernels for layer in model.layers
                    if isinstance(layer, Quantize) and layer.integer_kernels is not None]  # fmt: skip
        kernels = before or (recorded[0] if recorded else DEFAULT_KERNELS)
    kernels = check_kernels(kernels)
    object.__setattr__(model, "_gq_kernels", kernels)
    if before is not None and before != kernels:  # fit/evaluate/predict traced the other kernels: trace again
        for attr in ("predict_function", "test_function", "train_function"):
            if getattr(model, attr, None) is not None:
                setattr(model, attr, None)
    return _link_layers(model.layers, kernels)


def _link_layers(layers: Any, kernels: str) -> int:
    n = 0
    weight_layers: list = []
    for layer in layers:
        object.__setattr__(layer, "_gq_kernels", kernels)
        if type(layer).__name__ in SAME_SCALE_LAYERS:
            _override_call(layer, same_scale_call)
            continue
        if isinstance(layer, FoldedConvBatchNorm):
            inner = layer.conv
        elif isinstance(layer, QuantizeWeights) and [s["slot"] for s in layer.slots] == ["kernel"]:
            inner = layer.layer
        else:
            linked = _link_op(layer)
            if linked and isinstance(layer, Quantize):  # the model input's rounding point: records the set
                layer.integer_kernels = kernels
            n += linked
            continue
        act = getattr(inner, "activation", None)
        if (type(inner).__name__ not in _LINKED_LAYERS or getattr(act, "__name__", "linear") not in ("linear", "relu")
                or getattr(inner, "data_format", "channels_last") != "channels_last"
                or len(layer._inbound_nodes) != 1):  # fmt: skip
            continue
        in_q = _upstream_quantize(layer._inbound_nodes[0].input_tensors[0])
        out_q, chain = _downstream_chain(layer)
        if in_q is None or out_q is None:
            continue
        object.__setattr__(layer, "_gq_integer", (lambda a=in_q, b=out_q: (a, b)))
        object.__setattr__(layer, "_gq_activation", _chain_activation(inner, chain))
        _pass_through(out_q, chain)
        weight_layers.append(layer)
        n += 1
    for layer in weight_layers:  # prepared together in a traced call (integer_ops._prepared)
        object.__setattr__(layer, "_gq_batch", (lambda ls=tuple(weight_layers): ls))
    points = tuple(layer for layer in layers if eligible_quantize(layer))
    for q in points:  # their scales computed together in a traced call (integer_ops.qparams)
        object.__setattr__(q, "_gq_points", (lambda ps=points: ps))
    return n


def _reachable(layer: Any) -> list:
    """The layers downstream of ``layer`` (itself included), each once, in breadth-first order."""
    seen, order, queue = set(), [], [layer]
    while queue:
        op = queue.pop(0)
        if id(op) in seen:
            continue
        seen.add(id(op))
        order.append(op)
        queue.extend(node.operation for node in op._outbound_nodes)
    return order


def _relink_loaded(q: Any) -> None:
    """:data:`graphquant.keras.layers.ON_LOADED`: a loaded ``tflite_int8`` model's input rounding layer ``q``
    links the layers downstream of it with the kernel set its config recorded (a model never holds its
    layers' links in its own config)."""
    _link_layers(_reachable(q), q.integer_kernels)


ON_LOADED.append(_relink_loaded)


def _override_call(layer: Any, impl: Any) -> None:
    orig = getattr(layer, "_gq_orig_call", None) or layer.call
    object.__setattr__(layer, "_gq_orig_call", orig)
    object.__setattr__(layer, "call", functools.partial(impl, layer, orig))


def _weight_layer_output(q: Any) -> bool:
    """Whether the rounding point ``q`` rounds the output of a conv/depthwise/Dense group (through its fused
    ReLU/ReLU6): an op whose output scale the converter can choose freely."""
    op = q._inbound_nodes[0].input_tensors[0]._keras_history.operation
    for _ in range(3):
        if not _fusable(op) or len(op._inbound_nodes) != 1:
            break
        op = op._inbound_nodes[0].input_tensors[0]._keras_history.operation
    inner = getattr(op, "conv", None) or getattr(op, "layer", None) or op
    return type(inner).__name__ in _LINKED_LAYERS + ("SeparableConv1D", "SeparableConv2D", "Conv2DTranspose")


def _link_concat(layer: Any, ins: Any) -> bool:
    ups = [_upstream_quantize(t) for t in ins]
    out_q = _downstream_quantize(layer)
    if out_q is None or any(u is None for u in ups):
        return False
    for t, u in zip(ins, ups):
        direct = t._keras_history.operation is u and len(u._outbound_nodes) == 1
        if direct and _weight_layer_output(u):  # the converter gives this point the Concatenate's scale
            object.__setattr__(u, "_gq_scale_of", (lambda q=out_q: q))
            _override_call(u, int_quantize)
    _override_call(out_q, int_quantize)
    object.__setattr__(layer, "_gq_integer", (lambda qs=tuple(ups) + (out_q,): qs))
    _override_call(layer, int_concat)
    return True


def _link_op(layer: Any) -> bool:
    """Link an op without weights (:func:`graphquant.keras.integer_ops.op_kernel`, or a Concatenate) to its
    rounding points, or the model input's rounding point to the runtime's QUANTIZE; overrides its ``call`` on this instance only (its
    config, and so its ``.keras`` file, are unchanged)."""
    name = type(layer).__name__
    if len(layer._inbound_nodes) != 1 or getattr(layer, "data_format", "channels_last") != "channels_last":
        return False
    ins = layer._inbound_nodes[0].input_tensors
    if eligible_quantize(layer):
        if len(ins) != 1 or type(ins[0]._keras_history.operation).__name__ != "InputLayer":
            return False
        _override_call(layer, int_quantize)
        return True
    if name == "Concatenate" and len(ins) >= 2:
        return _link_concat(layer, ins)
    impl = op_kernel(layer, ins)
    if impl is None:
        return False
    ups = [_upstream_quantize(t) for t in ins]
    out_q, chain = _downstream_chain(layer)
    if out_q is None or any(u is None for u in ups):
        return False
    qs = tuple(ups) + (out_q,)
    object.__setattr__(layer, "_gq_integer", (lambda qs=qs: qs))
    object.__setattr__(layer, "_gq_activation", _chain_activation(layer, chain))
    _override_call(layer, impl)
    _pass_through(out_q, chain)
    return True
