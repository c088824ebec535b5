"""The clone: a copy of a Functional or Sequential Keras model with a plan's rounding inserted.

:class:`Rewriter` builds new layer objects from each layer's ``get_config``
(recursively for nested models and custom layers), inserts a
:class:`~graphquant.keras.Quantize` layer after each planned activation point,
wraps targets whose weights are planned in
:class:`~graphquant.keras.QuantizeWeights`, and then copies the source's
weights in (:meth:`Rewriter.copy_weights`). The source model is never modified.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

import keras

from ..plan import InsertionPoint, Plan
from .custom import clone_custom, clone_layer, is_custom_layer
from .layers import FoldingBatchNormalization, Quantize, QuantizeWeights
from .view import is_sequential, is_graph_model, iter_calls

__all__ = ["Rewriter", "clone_layer", "count_layers"]

log = logging.getLogger(__name__)


def count_layers(model: Any) -> int:
    """Layers of ``model``, nested models' layers included."""
    return sum(1 + (count_layers(layer) if hasattr(layer, "layers") else 0) for layer in getattr(model, "layers", ()))


def _input_like(x: Any) -> Any:
    layer = x._keras_history.operation
    return keras.Input(
        batch_shape=tuple(x.shape), dtype=x.dtype, sparse=getattr(x, "sparse", False), name=layer.name
    )


def _fusable_activation(layer: Any, node: Any) -> Optional[str]:
    """``"relu"``/``"relu6"`` if the call ``node`` of ``layer`` computes exactly
    ``tf.nn.relu``/``tf.nn.relu6`` of its one input (which a following
    :class:`Quantize` can then fuse while training), else ``None``.

    Exact classes only (a subclass may override ``call``); ``ReLU`` with a
    slope, a threshold or a cap other than 6 computes something else.
    """
    args, kwargs = node.arguments.args, node.arguments.kwargs
    if len(args) != 1 or kwargs or len(node.outputs) != 1:
        return None
    if type(layer) is keras.layers.ReLU:
        if float(layer.negative_slope) != 0.0 or float(layer.threshold) != 0.0:
            return None
        if layer.max_value is None:
            return "relu"
        return "relu6" if float(layer.max_value) == 6.0 else None
    if type(layer) is keras.layers.Activation:
        fn = layer.activation
        if fn is keras.activations.relu:
            return "relu"
        if fn is keras.activations.relu6:
            return "relu6"
    return None


def _has_points_under(plan: Plan, scope: Tuple[str, ...]) -> bool:
    """Whether ``scope`` names a custom layer call with planned points (in it or in custom layers it holds)."""
    n = len(scope)
    return any(p.scope[:n] == scope for p in plan.points)


class Rewriter:
    def next_seed(self) -> Optional[int]:
        if self.seed is None:
            return None
        self._seed_count += 1
        return self.seed + self._seed_count

    def __init__(self, plan: Plan, fold_batchnorm: bool = True, seed: Optional[int] = None,
                 fold_before_rounding: bool = False, freeze_bn_after: Optional[int] = None):
        self.plan = plan
        self.fold_batchnorm = fold_batchnorm
        self.fold_before_rounding = fold_before_rounding  # a target's conv -> BN folded before weight rounding
        self.freeze_bn_after = freeze_bn_after
        self.seed = seed
        self._seed_count = 0
        self.models: Dict[int, keras.Model] = {}  # id(source model) -> rewritten
        self.pairs: List[Tuple[Any, Any]] = []  # (source layer, new layer) for weight copy
        self.inserted = 0
        self._seeded: Dict[int, Dict[int, Any]] = {}  # id(new layer) -> {id(new var): source var}

    def _seed_from_source(self, old: Any, new: Any) -> None:
        """Create ``new``'s own weights directly with ``old``'s values instead of random ones.

        Saves the initializers' work and the later ``set_weights`` copy. Each
        ``add_weight`` call of ``new`` whose name, shape and dtype match one of
        ``old``'s own variables starts from that variable's value; anything else
        is created as usual. :meth:`copy_weights` keeps the result only if every
        weight of ``new`` was seeded from the weight ``set_weights`` would have
        copied into it, and otherwise falls back to ``set_weights``.
        """
        if type(new).add_weight is not keras.layers.Layer.add_weight or "add_weight" in vars(new):
            return
        by_name: Dict[str, Any] = {}
        for v in list(old.trainable_weights) + list(old.non_trainable_weights):
            if v.name in by_name:
                return  # ambiguous names: keep the plain path
            by_name[v.name] = v
        if not by_name:
            return
        seeded = self._seeded.setdefault(id(new), {})
        base = keras.layers.Layer.add_weight

        def add_weight(*args: Any, **kwargs: Any) -> Any:
            src = by_name.get(kwargs.get("name")) if len(args) <= 1 else None
            if src is not None:
                shape = args[0] if args else kwargs.get("shape")
                dtype = kwargs.get("dtype")
                want = new.variable_dtype if dtype is None else keras.backend.standardize_dtype(dtype)
                if shape is None or tuple(shape) != tuple(src.shape) or want != src.dtype:
                    src = None
            if src is None:
                return base(new, *args, **kwargs)
            value = src.value

            def initializer(shape: Any, dtype: Any = None) -> Any:
                return value  # tf.Variable(initial_value=<variable>) copies its current value

            kwargs["initializer"] = initializer
            var = base(new, *args, **kwargs)
            seeded[id(var)] = src
            return var

        object.__setattr__(new, "add_weight", add_weight)

    def _names(self, model: keras.Model) -> set:
        return {l.name for l in model.layers}

    def _quantize_layer(self, p: InsertionPoint, used: set, fused_activation: Optional[str] = None) -> Quantize:
        base = p.after.replace("@", "_call") + "_quant"
        name, k = base, 1
        while name in used:
            k += 1
            name = f"{base}{k}"
        used.add(name)
        self.inserted += 1
        return Quantize(
            format=p.format,
            rounding=p.rounding,
            inference_rounding=p.inference_rounding,
            momentum=self.plan.config.range_momentum,
            seed=self.next_seed(),
            fused_activation=fused_activation,
            name=name,
        )

    def _new_layer(
        self, layer: Any, weight_points: List[InsertionPoint], scope: Tuple[str, ...], call: Optional[str] = None
    ) -> Any:
        if call is not None and is_custom_layer(layer) and _has_points_under(self.plan, scope + (call,)):
            return clone_custom(self, layer, scope + (call,))  # a custom layer with planned sublayers
        if isinstance(layer, keras.Model) and is_graph_model(layer):
            key = id(layer)
            if key not in self.models:
                self.models[key] = self.rewrite(layer, scope + (layer.name,))
            return self.models[key]
        if not isinstance(layer, keras.layers.Layer):
            # a plain operation in a Functional graph (``x + 3``, ``keras.ops.relu(x)``, the
            # ``not_equal`` of a mask): stateless; a fresh copy, so the source's op gains no node
            return clone_layer(layer)
        if self.fold_batchnorm and type(layer) is keras.layers.BatchNormalization:
            # same computation; at inference in a tf.function it folds into a preceding
            # weight-quantized convolution (see FoldingBatchNormalization)
            new = FoldingBatchNormalization.from_config(layer.get_config())
        else:
            new = clone_layer(layer)
        self.pairs.append((layer, new))
        self._seed_from_source(layer, new)
        if weight_points:
            return QuantizeWeights(
                new,
                [{"slot": p.slot, "format": p.format, "rounding": p.rounding,
                  "inference_rounding": p.inference_rounding} for p in weight_points],
                seed=self.next_seed(),
                name=layer.name,
            )  # fmt: skip
        return new

    def rewrite(self, model: keras.Model, scope: Tuple[str, ...] = ()) -> keras.Model:
        points = self.plan.in_scope(scope)
        act_after = {p.after: p for p in points if p.what == "activations"}
        weights_of: Dict[str, List[InsertionPoint]] = {}
        for p in points:
            if p.what == "weights":
                weights_of.setdefault(p.target, []).append(p)
        used = self._names(model)
        if is_sequential(model):
            return self._rewrite_sequential(model, scope, act_after, weights_of, used)
        return self._rewrite_functional(model, scope, act_after, weights_of, used)

    def _rewrite_sequential(self, model, scope, act_after, weights_of, used) -> keras.Model:
        new = keras.Sequential(name=model.name)
        x = model.inputs[0] if model.inputs else None
        if x is not None:
            new.add(keras.Input(batch_shape=tuple(x.shape), dtype=x.dtype))
        for name, layer, _ in iter_calls(model):
            new.add(self._new_layer(layer, weights_of.get(name, []), scope, name))
            if name in act_after:
                new.add(self._quantize_layer(act_after[name], used))
        return new

    def _rewrite_functional(self, model, scope, act_after, weights_of, used) -> keras.Model:
        tensors: Dict[int, Any] = {}
        new_inputs = []
        for x in model.inputs:
            y = _input_like(x)
            tensors[id(x)] = y
            new_inputs.append(y)
        layer_map: Dict[int, Any] = {}
        for x, y in zip(model.inputs, list(new_inputs)):  # a target that rounds the model input
            name = x._keras_history.operation.name
            if name in act_after:
                tensors[id(x)] = self._quantize_layer(act_after[name], used)(y)
        folds = self._folds(model, scope) if self.fold_before_rounding else {}
        folded_bn = {bn_name: conv_name for conv_name, (bn_name, _) in folds.items()}
        for name, op, node in iter_calls(model):
            if node.is_input:
                continue
            if name in folded_bn:  # folded into its convolution: the identity here
                out = tensors[id(node.input_tensors[0])]
                if name in act_after:
                    out = self._quantize_layer(act_after[name], used)(out)
                tensors[id(node.outputs[0])] = out
                continue
            if name in folds and id(op) not in layer_map:
                bn = folds[name][1]
                conv_new, bn_new = clone_layer(op), clone_layer(bn)
                self.pairs += [(op, conv_new), (bn, bn_new)]
                fmt = next(p.format for p in weights_of.get(name, []) if p.slot == "kernel")
                from .fold import FoldedConvBatchNorm

                layer_map[id(op)] = FoldedConvBatchNorm(conv_new, bn_new, fmt, self.freeze_bn_after, name=op.name)
            if any(id(t) not in tensors for t in node.input_tensors):
                raise ValueError(f"cannot rebuild {model.name!r}: layer call {name!r} has inputs not reachable from the model inputs")
            args, kwargs = node.arguments.fill_in(tensors)
            if id(op) not in layer_map:
                layer_map[id(op)] = self._new_layer(op, weights_of.get(name, []), scope, name)
            elif name in weights_of and not isinstance(layer_map[id(op)], QuantizeWeights) and name not in folds:
                log.warning("shared layer %s: weights are quantized only if its first call is a target", name)
            outputs = layer_map[id(op)](*args, **kwargs)
            if name in act_after:
                flat = keras.tree.flatten(outputs)
                if len(flat) != 1:
                    raise ValueError(f"cannot insert rounding after {name!r}: it has {len(flat)} outputs")
                fused = _fusable_activation(op, node)
                if fused is not None:  # see Quantize(fused_activation=...)
                    q = self._quantize_layer(act_after[name], used, fused)
                    outputs = q(flat[0], pre_activation=args[0])
                else:
                    outputs = self._quantize_layer(act_after[name], used)(flat[0])
                out_list = [outputs]
            else:
                out_list = keras.tree.flatten(outputs)
            for x, y in zip(node.outputs, out_list):
                tensors[id(x)] = y
        outs = []
        for x in keras.tree.flatten(model._outputs_struct):
            outs.append(tensors[id(x)])
        outputs = keras.tree.pack_sequence_as(model._outputs_struct, outs)
        inputs = keras.tree.pack_sequence_as(model._inputs_struct, new_inputs)
        return keras.Model(inputs, outputs, name=model.name)

    def _folds(self, model: keras.Model, scope: Tuple[str, ...]) -> Dict[str, Tuple[str, Any]]:
        """``conv call name -> (BN call name, BN layer)`` for groups conv -> BN whose weights are planned."""
        from .fold import foldable

        layers = {name: op for name, op, node in iter_calls(model) if not node.is_input}
        calls = {}
        for name, op, node in iter_calls(model):
            calls.setdefault(id(op), []).append(name)
        out: Dict[str, Tuple[str, Any]] = {}
        for p in self.plan.in_scope(scope):
            if p.what != "weights" or p.slot != "kernel" or len(p.group) < 2:
                continue
            conv, bn = layers.get(p.group[0]), layers.get(p.group[1])
            if conv is None or bn is None or not foldable(conv, bn):
                continue
            if len(calls[id(conv)]) > 1 or len(calls[id(bn)]) > 1:
                continue  # shared layers are not folded
            out[p.group[0]] = (p.group[1], bn)
        return out

    def unhook(self) -> None:
        for _, new in self.pairs:
            if "add_weight" in vars(new):
                object.__delattr__(new, "add_weight")

    def copy_weights(self) -> None:
        self.unhook()
        for old, new in self.pairs:
            src_vars = old.weights
            if not src_vars:
                continue
            if not new.built:
                raise ValueError(f"layer {new.name!r} was not built while rebuilding the model")
            seeded = self._seeded.get(id(new), {})
            new_vars = new.weights
            if len(new_vars) == len(src_vars) and all(
                seeded.get(id(n)) is o for n, o in zip(new_vars, src_vars)
            ):
                continue  # every weight already holds the value set_weights would copy
            new.set_weights(old.get_weights())
