"""The Keras front end: apply a :class:`~graphquant.plan.Plan` to a model.

``quantize_model`` clones a Functional or Sequential model layer by layer
(new layer objects from ``get_config``, the source's weights copied in),
inserting a :class:`~graphquant.keras.Quantize` layer after each planned
activation point and wrapping targets whose weights are planned in
:class:`~graphquant.keras.QuantizeWeights`. Nested models are rewritten
recursively (a shared nested model stays shared in the copy). The source
model is never modified.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import inspect as _inspect
import logging
import sys
import threading
import time
import types
import warnings
from typing import Any, Dict, Iterator, List, Optional, Tuple

import keras

from ..formats import Affine
from ..patterns import Registry, View
from ..plan import CONFIG_KEYS, InsertionPoint, Plan, QuantizeConfig, make_plan, may_zero_most_weights, zeroed_weights_warning
from .layers import FoldingBatchNormalization, Quantize, QuantizeWeights, StorageRounding
from .custom import clone_custom, from_config_tolerant, is_custom_layer
from .view import is_sequential, check_model, is_graph_model, iter_calls, keras_view

__all__ = ["quantize_model", "inspect", "plan_model"]

log = logging.getLogger(__name__)



def _config(config: Optional[QuantizeConfig], kwargs: Dict[str, Any]) -> QuantizeConfig:
    if config is not None:
        if not isinstance(config, QuantizeConfig):
            raise TypeError(f"config must be a graphquant.QuantizeConfig, got {type(config).__name__}")
        if kwargs:
            raise ValueError(f"give config= or keyword options, not both (got {sorted(kwargs)})")
        return config
    return QuantizeConfig.create(**kwargs)


def plan_model(
    model: keras.Model, config: Optional[QuantizeConfig] = None, registry: Optional[Registry] = None, **kwargs: Any
) -> Plan:
    """The :class:`Plan` for ``model`` (nothing is changed)."""
    check_model(model)
    return _make_keras_plan(model, _config(config, kwargs), registry)


def _make_keras_plan(model: keras.Model, cfg: QuantizeConfig, registry: Optional[Registry]) -> Plan:
    view = keras_view(model)
    plan = make_plan(view, cfg, registry)
    for path, sub in _subclassed_inside(view):
        msg = (f"{path} is a subclassed model ({type(sub).__name__}): it is copied as it is and nothing inside "
               "it is quantized (build it as a Functional model to have it rewritten)")
        plan.notes.append(msg)
        log.warning(msg)
    plan.left_float.extend(_left_float(view))
    return plan


def _left_float(view: View, prefix: str = "") -> List[Tuple[str, str, str]]:
    """``(path, kind, reason)`` of the convolutions custom layers hold but cannot round (nested views included)."""
    out = [(prefix + p, k, r) for p, k, r in getattr(view, "left_float", ())]
    for name, child in view.children.items():
        if not hasattr(child, "left_float"):  # a nested model: its custom layers' own lists
            out += _left_float(child, f"{prefix}{name}/")
        # a custom layer's list already holds its nested custom layers' convolutions
        else:
            out += [(f"{prefix}{name}/{p}", k, r) for p, k, r in child.left_float]
    return out


def _subclassed_inside(view: View, prefix: str = "") -> List[Tuple[str, keras.Model]]:
    """``(path, model)`` of every subclassed model called in a model's view (nested views included)."""
    out: List[Tuple[str, keras.Model]] = []
    seen: set = set()
    for node in view.nodes.values():
        obj = node.obj
        if isinstance(obj, keras.Model) and not is_graph_model(obj) and id(obj) not in seen:
            seen.add(id(obj))
            out.append((prefix + obj.name, obj))
    for name, child in view.children.items():
        out += _subclassed_inside(child, f"{prefix}{name}/")
    return out


def inspect(
    model: keras.Model,
    bits: Optional[int] = None,
    *,
    config: Optional[QuantizeConfig] = None,
    registry: Optional[Registry] = None,
    **kwargs: Any,
) -> Plan:
    """The plan ``quantize_model`` would apply, without changing anything.

    Takes the same options as :func:`quantize_model`. ``print(plan)`` shows a
    table (layer, group, insertion point, format); the plan is data
    (``plan.points``, ``plan.to_dict()``).
    """
    if bits is not None:
        kwargs["bits"] = bits
    bad = set(kwargs) - set(CONFIG_KEYS)
    if bad:
        raise TypeError(f"inspect() got unexpected keyword arguments {sorted(bad)}")
    return plan_model(model, config, registry, **kwargs)


# --------------------------------------------------------------------------- cloning
class _SignatureCache(types.ModuleType):
    """Stands in for the ``inspect`` module inside Keras' layer construction.

    Keras computes ``inspect.signature(cls.__init__)`` and
    ``inspect.getfullargspec(cls.__init__)`` for every layer it constructs and
    ``inspect.signature(layer.call)`` for every layer: a tenth of the time of
    copying a model. Signatures of the same function are the same, so they are
    computed once per function (for bound methods, once per underlying function).
    Everything else is the real ``inspect``.
    """

    def __init__(self) -> None:
        super().__init__("inspect")
        self._signatures: Dict[Any, Any] = {}
        self._argspecs: Dict[Any, Any] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(_inspect, name)

    def signature(self, obj: Any, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:
            return _inspect.signature(obj, *args, **kwargs)
        # a bound method's signature is its function's without the first parameter
        key = (obj.__func__, True) if _inspect.ismethod(obj) else (obj, False)
        return self._memo(self._signatures, key, lambda: _inspect.signature(obj))

    def getfullargspec(self, func: Any) -> Any:
        return self._memo(self._argspecs, func, lambda: _inspect.getfullargspec(func))

    @staticmethod
    def _memo(table: Dict[Any, Any], key: Any, compute: Any) -> Any:
        try:
            return table[key]
        except (KeyError, TypeError):  # TypeError: an unhashable callable
            value = compute()
        try:
            table[key] = value
        except TypeError:
            pass
        return value


class _SharedScope:
    """A process-wide change that nested or concurrent blocks share: ``enter()`` runs
    when the first block starts, ``leave()`` when the last one ends (under a lock)."""

    def __init__(self, enter: Any, leave: Any) -> None:
        self._enter, self._leave = enter, leave
        self._lock = threading.Lock()
        self._users = 0

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                self._enter()
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    self._leave()


_SIGNATURE_CACHE = _SignatureCache()
_KERAS_INSPECTING_MODULES = ("keras.src.ops.operation", "keras.src.layers.layer")


def _install_signature_cache() -> None:
    for name in _KERAS_INSPECTING_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if getattr(mod, "inspect", None) is _inspect:
            mod.inspect = _SIGNATURE_CACHE


def _remove_signature_cache() -> None:
    for name in _KERAS_INSPECTING_MODULES:
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "inspect", None) is _SIGNATURE_CACHE:
            mod.inspect = _inspect


#: Within the block, Keras' layer construction reuses signatures (see
#: :class:`_SignatureCache`). A pure speed-up: the cached values equal what
#: ``inspect`` returns. Modules that do not exist or do not use ``inspect``
#: (other Keras versions) are left alone.
_cached_signatures = _SharedScope(_install_signature_cache, _remove_signature_cache)

_gc_was_enabled = [False]


def _pause_gc() -> None:
    _gc_was_enabled[0] = gc.isenabled()
    gc.disable()


def _resume_gc() -> None:
    if _gc_was_enabled[0]:
        gc.enable()


#: Python's cyclic garbage collector off within the block (back to its previous
#: state after). Copying a model allocates tens of thousands of objects that all
#: survive (they are the copy), and every few thousand allocations the collector
#: walks them again, at times together with the whole TensorFlow/Keras heap (a
#: full collection: a tenth of a second or more, at random calls). Nothing is
#: lost: cycles that become garbage meanwhile are collected later.
_gc_paused = _SharedScope(_pause_gc, _resume_gc)


@contextlib.contextmanager
def recursion_room(frames: int) -> Iterator[None]:
    """Python's recursion limit raised by ``frames`` within the block, restored after.

    Keras builds a Functional model (``Functional.__init__`` -> ``map_graph``
    -> ``_build_map_helper``) with one recursive call per layer on the longest
    path, so a copy with a rounding layer after each convolution group can pass
    Python's default limit where the source did not (EfficientNetV2L: 1,030
    layers plus 339 inserted). Python 3.11 keeps Python-to-Python calls off
    the C stack, so a higher limit costs nothing but the frames used.
    """
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(max(before, before + frames))
    try:
        yield
    finally:
        if sys.getrecursionlimit() == max(before, before + frames):  # not changed meanwhile by someone else
            sys.setrecursionlimit(before)


def _count_layers(model: Any) -> int:
    """Layers of ``model``, nested models' layers included."""
    return sum(1 + (_count_layers(layer) if hasattr(layer, "layers") else 0) for layer in getattr(model, "layers", ()))


def clone_layer(layer: Any) -> Any:
    """A new layer (or plain ``keras.ops`` operation) from ``layer``'s config."""
    try:
        cfg = layer.get_config()
        return from_config_tolerant(layer.__class__, cfg)
    except NotImplementedError as e:
        raise TypeError(
            f"layer {layer.name!r} ({type(layer).__name__}) cannot be cloned: it does not implement "
            f"get_config() ({e}); add get_config() returning its constructor arguments"
        ) from None
    except Exception as e:
        raise TypeError(
            f"layer {layer.name!r} ({type(layer).__name__}) cannot be cloned from its config: "
            f"{type(e).__name__}: {e}"
        ) from None


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


class _Rewriter:
    def next_seed(self) -> Optional[int]:
        """The seed of the next rounding layer made (``None`` without a model seed)."""
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
        """Remove the ``add_weight`` hooks the clone put on the new layers."""
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


# --------------------------------------------------------------------------- public
def quantize_model(
    model: keras.Model,
    bits: Optional[int] = None,
    *,
    format: Any = None,
    range: Optional[Tuple[float, float]] = None,
    rounding: str = "nearest",
    weights: Optional[bool] = None,
    weight_bits: Optional[int] = None,
    weight_format: Any = None,
    weight_rounding: str = "nearest",
    include: Any = None,
    exclude: Any = None,
    overrides: Any = None,
    dense: bool = False,
    weight_storage: Any = None,
    storage_rounding: str = "nearest",
    calibration_data: Any = None,
    calibration_method: str = "minmax",
    calibration_percentile: float = 99.99,
    verbose: Optional[bool] = None,
    config: Optional[QuantizeConfig] = None,
    registry: Optional[Registry] = None,
    fold_batchnorm: bool = True,
    seed: Optional[int] = None,
    allow_requantize: bool = False,
    target: Any = None,
    kernels: Optional[str] = None,
    freeze_bn_after: Optional[int] = None,
    **options: Any,
) -> keras.Model:
    """A copy of ``model`` with rounding after every convolution group.

    The source model is untouched: the copy has new layers with the source's
    weights. Each group found by the pattern registry (default: convolution
    -> [BatchNormalization] -> [activation]) gets one
    :class:`graphquant.keras.Quantize` layer after its last layer.

    Args:
        model: a Functional or Sequential Keras 3 model (nested models allowed).
        bits: bits of the activation format. Alone: 8-bit-style affine with a
            learned range (EMA while training, or ``calibration_data``); with
            ``range``: :class:`FixedPoint` over that range. Default 8.
        format: a format (object, string like ``"e4m3"``, or dict) instead of bits.
        range: ``(lo, hi)`` fixed range.
        rounding: rounding mode while training; inference uses it too unless
            it is ``"stochastic"`` (then ``"nearest"``; see
            ``inference_rounding=``).
        weights: also round the targets' weights (per-channel symmetric affine
            with ``weight_bits`` by default; float formats: the same format).
        weight_bits / weight_format / weight_rounding: weight rounding options.
            A scaled format (``format`` or ``weight_format``, e.g. ``"mxfp4"``)
            is placed on each kernel's reduction axis, whatever its own ``axis``:
            see :func:`graphquant.plan.scaled_weight_format`. A weight of which
            more than half of the nonzero values round to zero is warned about
            (a ``UserWarning``, the log and a plan note naming the layer and
            suggesting a scaled format).
        include / exclude: which targets, by name regex, class or ``"class:Name"``.
            Convolutions inside custom layers are addressed by path: the layer's
            name, then attribute names (``"block_3/conv"``,
            ``"block_3/se/reduce"``); see :mod:`graphquant.keras.custom`.
        overrides: ``{selector: {"bits": 4, "rounding": ...}}`` per target, or
            ``{selector: None}`` to skip.
        dense: treat ``Dense`` layers as targets too.
        weight_storage / storage_rounding: round every trainable weight onto
            this storage format after every optimizer update (Gupta et al. 2015).
        calibration_data: a numpy array, ``tf.data.Dataset`` or iterable of
            batches; sets the learned ranges before the model is returned.
        calibration_method: ``"minmax"``, ``"percentile"``, ``"mse"`` or
            ``"entropy"`` (see :mod:`graphquant.calibration`).
        calibration_percentile: ``p`` of ``"percentile"``, in (50, 100] (default 99.99).
        verbose: a progress bar while calibrating (``None``: when stderr is a
            terminal and calibration runs longer than a second).
        config: a prepared :class:`QuantizeConfig` (instead of the keywords).
        registry: the pattern registry (default :data:`DEFAULT_REGISTRY`).
        fold_batchnorm: copy ``BatchNormalization`` layers as
            :class:`~graphquant.keras.FoldingBatchNormalization`, which at
            inference in a ``tf.function`` (``predict``, ``export``) folds into
            a preceding weight-quantized convolution: same values up to float
            reassociation, same rounding points, one memory pass less.
        seed: integer seed for every stochastic rounding the copy does
            (activation and weight layers, weight storage), so runs repeat;
            ``None`` draws from Keras' global seed
            (``keras.utils.set_random_seed``).
        allow_requantize: quantize a model that already contains graphquant
            rounding layers (:class:`Quantize` / :class:`QuantizeWeights`),
            stacking a second rounding on the first; warned about (a
            ``UserWarning`` and the log) and noted in the plan. Without it
            such a model is a ``ValueError``.
        target: a deployment target (``"tflite_int8"`` or a
            :class:`graphquant.targets.Target`): its registry places rounding
            where the runtime rounds (for ``tflite_int8``: the model input,
            conv/depthwise/Dense groups with BN folded before the weights are
            rounded, Add, Concatenate, pooling, resizing, ...) with its
            weight and activation formats (int8 per-channel symmetric narrow
            weights, int8 per-tensor asymmetric activations). Give
            ``calibration_data`` (or train) to set the ranges.
        kernels: with a target that computes the runtime's integer arithmetic
            at inference (``tflite_int8``), which kernel set: ``"reference"``
            (default; LiteRT's reference kernels) or ``"xnnpack"`` (the
            default interpreter's XNNPACK delegate, what a deployed model
            usually runs). Change it later with
            :func:`graphquant.keras.integer.link_integer`.
        freeze_bn_after: with a target that folds BatchNormalization before
            rounding: training steps after which the fold uses the moving
            statistics instead of the batch statistics (``None``: never).
        **options: further :class:`QuantizeConfig` options
            (``inference_rounding``, ``activations``, ``options``, ``range_momentum``).

    Returns:
        A new ``keras.Model`` (Functional, or Sequential for a Sequential source).

    Raises:
        TypeError: ``model`` is not a Functional/Sequential Keras model.
        ValueError: contradictory or invalid options (the message names them),
            or ``model`` is already quantized and ``allow_requantize`` is False.
    """
    t0 = time.perf_counter()
    check_model(model)
    if not isinstance(allow_requantize, bool):
        raise TypeError(f"allow_requantize must be a bool, got {allow_requantize!r}")
    existing = sum(1 for l in model._flatten_layers(include_self=False, recursive=True)
                   if isinstance(l, (Quantize, QuantizeWeights)))
    requant_msg = f"model {model.name!r} is already quantized ({existing} graphquant rounding layers)"
    if existing and not allow_requantize:
        raise ValueError(f"{requant_msg}; pass allow_requantize=True (CLI: --force) to stack a second rounding")
    bad = set(options) - set(CONFIG_KEYS)
    if bad:
        raise TypeError(f"quantize_model() got unexpected keyword arguments {sorted(bad)}")
    tgt = None
    if target is not None:
        from ..targets import get_target

        tgt = get_target(target)
        if registry is not None or config is not None:
            raise ValueError("give target= or registry=/config=, not both")
        if bits not in (None, 8) or format is not None or range is not None:
            raise ValueError(f"target={tgt.name!r} sets the activation format; drop bits=/format=/range=")
        if tgt.activation_format is not None:
            format = tgt.activation_format
        if tgt.weight_format is not None:
            if weights is False:
                raise ValueError(f"target={tgt.name!r} rounds the weights; weights=False contradicts it")
            weights = True
            per_channel = getattr(tgt.weight_format, "axis", None) is not None
            if weight_format is None and per_channel:
                # per output channel on each weight's own channel axis (a depthwise kernel's is -2: a fixed
                # axis=-1 gave all its channels one scale); sub-8-bit QAT: the same grid with fewer bits
                weight_bits = weight_bits or tgt.weight_format.bits
            elif weight_bits is None and weight_format is None:
                weight_format = tgt.weight_format
            elif weight_format is None:
                weight_format = Affine(weight_bits, symmetric=True, narrow_range=True, axis=-1)
                weight_bits = None
        if tgt.dense_weight_format is not None and overrides is None:
            wb = getattr(weight_format, "bits", None) or weight_bits or 8  # weight_bits=4: Dense too
            overrides = {"class:Dense": {"weight_format": Affine(wb, symmetric=True, narrow_range=True)}}
        registry = tgt.registry
    if kernels is not None:
        from .integer import check_kernels

        check_kernels(kernels)
        if tgt is None or not tgt.integer_arithmetic:
            raise ValueError("kernels= needs a target that computes integer kernels (target='tflite_int8')")
    if freeze_bn_after is not None and (tgt is None or not tgt.fold_batchnorm):
        raise ValueError("freeze_bn_after= needs a target that folds BatchNormalization (target='tflite_int8')")
    kw: Dict[str, Any] = dict(options)
    given = dict(
        bits=bits, format=format, range=range, weights=weights, weight_bits=weight_bits, weight_format=weight_format,
        include=include, exclude=exclude, overrides=overrides, weight_storage=weight_storage,
    )  # fmt: skip
    kw.update({k: v for k, v in given.items() if v is not None})
    if rounding != "nearest":
        kw["rounding"] = rounding
    if weight_rounding != "nearest":
        kw["weight_rounding"] = weight_rounding
    if storage_rounding != "nearest":
        kw["storage_rounding"] = storage_rounding
    if dense is not False:
        kw["dense"] = dense  # QuantizeConfig.create checks it is a bool
    if config is not None and kw:
        raise ValueError(f"give config= or keyword options, not both (got {sorted(kw)})")
    cfg = _config(config, kw)
    split: List[str] = []
    if tgt is not None and tgt.split_activations:
        from .split import split_activations

        model, split = split_activations(model)
    plan = _make_keras_plan(model, cfg, registry)
    if tgt is not None:
        from ..targets import uncovered_layers

        for cls, names in uncovered_layers(tgt, model).items():
            plan.notes.append(f"target {tgt.name} does not cover {cls} ({', '.join(names[:4])}"
                              f"{', ...' if len(names) > 4 else ''}): no rounding point; the converter calibrates "
                              "its output itself, or it stays float (export_tflite's report then says the model "
                              "is not fully integer)")
    if tgt is not None and tgt.split_activations and not split and is_sequential(model):
        from .split import to_split

        kept = [l.name for l in model.layers if to_split(l)]
        if kept:
            plan.notes.append(f"target {tgt.name}: a Sequential model keeps the own activation of "
                              f"{', '.join(kept[:4])} inside its layer (one rounding after it; the converter "
                              "calibrates the tensor before the activation itself): build it as a Functional model "
                              "to split it")
    if split:
        plan.notes.append(f"target {tgt.name}: the activation of {len(split)} layers ({', '.join(split[:4])}"
                          f"{', ...' if len(split) > 4 else ''}) runs as its own layer <name>_activation after a "
                          "rounding point (the converter fuses only ReLU/ReLU6 into a conv/Dense)")
    plan.check_calibration(calibration_data, calibration_method, calibration_percentile)
    if existing:
        if plan.points:
            what = f"stacking a second rounding at {len(plan.targets)} groups (allow_requantize=True)"
        else:  # a convolution wrapped in QuantizeWeights is not matched again
            what = "allow_requantize=True, but no group is found outside the existing rounding layers; nothing is stacked"
        msg = f"{requant_msg}: {what}"
        warnings.warn(msg, UserWarning, stacklevel=2)
        log.warning(msg)
        plan.notes.append(f"requantized: the model already had {existing} graphquant rounding layers; {what}")
    if plan.left_float:
        msg = (f"{len(plan.left_float)} convolutions inside custom layers are left in float (they cannot be swapped; "
               f"plan.left_float names each and why), e.g. {plan.left_float[0][0]}: {plan.left_float[0][2]}")
        warnings.warn(msg, UserWarning, stacklevel=2)
        log.warning(msg)
    if not plan.points:
        msg = f"model {model.name!r} has no layer matching the quantization patterns (no convolution); returning a plain copy"
        warnings.warn(msg, UserWarning, stacklevel=2)
        log.warning(msg)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    if not isinstance(fold_batchnorm, bool):
        raise TypeError(f"fold_batchnorm must be a bool, got {fold_batchnorm!r}")
    if tgt is not None:
        plan.notes.append(f"target {tgt.name}: {tgt.arithmetic}")
    rw = _Rewriter(plan, fold_batchnorm=fold_batchnorm, seed=seed,
                   fold_before_rounding=bool(tgt is not None and tgt.fold_batchnorm), freeze_bn_after=freeze_bn_after)
    with _gc_paused(), recursion_room(4 * (len(plan.points) + _count_layers(model))):
        try:
            with _cached_signatures():
                new = rw.rewrite(model)
        finally:
            rw.unhook()
        rw.copy_weights()
    if cfg.weight_storage is not None:
        apply_weight_storage(new, cfg.weight_storage, cfg.storage_rounding, seed=rw.next_seed())
    for msg in zeroed_weights_warnings(new):
        warnings.warn(msg, UserWarning, stacklevel=2)
        log.warning(msg)
        plan.notes.append(msg)
    new._graphquant_plan = plan  # for inspection; not serialized
    if calibration_data is not None:
        from ..ranges import calibrate_keras

        calibrate_keras(new, calibration_data, calibration_method, percentile=calibration_percentile,
                         what="calibration_data", verbose=verbose)  # fmt: skip
    if tgt is not None and tgt.integer_arithmetic:
        from .integer import link_integer

        n_linked = link_integer(new, kernels or "reference")
        log.info("quantize_model: %d layers compute the runtime's integer kernels (%s) at inference", n_linked,
                 kernels or "reference")
    log.info("quantize_model: %d rounding layers inserted in %.2fs", rw.inserted, time.perf_counter() - t0)
    return new


def zeroed_weights_warnings(model: keras.Model) -> List[str]:
    """A warning (:func:`graphquant.plan.zeroed_weights_warning`) for each weight of ``model``'s
    :class:`QuantizeWeights` layers of which more than half of the nonzero values round to zero."""
    from ..rounding import use_xla

    out = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, QuantizeWeights):
            if not any(may_zero_most_weights(layer._variable(s["slot"]).numpy(), s["format"]) for s in layer.slots):
                continue  # the usual case: no rounding needed to know
            with use_xla(False):  # once per weight, eagerly: compiling a kernel per shape costs far more
                rounded = layer.rounded_weights()
            for slot, w, q, fmt in rounded:
                msg = zeroed_weights_warning(f"layer {layer.name!r} ({type(layer.layer).__name__}.{slot})", w, q, fmt)
                if msg:
                    out.append(msg)
    return out


def apply_weight_storage(model: keras.Model, format: Any, rounding: str = "nearest", seed: Optional[int] = None) -> int:
    """Round every trainable float weight of ``model`` onto ``format`` now and after every optimizer update.

    Sets a :class:`StorageRounding` constraint on each trainable variable
    (composed with any existing constraint); Keras optimizers apply it after
    each update. Returns the number of variables.
    """
    owners = _constraint_owners(model)
    n = 0
    for i, v in enumerate(model.trainable_variables):
        if not str(v.dtype).startswith(("float", "bfloat")):
            continue
        c = StorageRounding(format, rounding, inner=v.constraint, seed=None if seed is None else seed + i)
        v.constraint = c
        owner = owners.get(id(v))
        if owner is not None:  # the layer's constraint argument too, so get_config (and .keras files) keep it
            setattr(owner[0], owner[1], c)
        v.assign(c(v.value))
        n += 1
    return n


def _constraint_owners(model: keras.Model) -> Dict[int, Tuple[Any, str]]:
    """``id(variable) -> (layer, attribute)`` for weights whose layer takes their constraint as an argument
    (``kernel_constraint``, ``depthwise_constraint``, ``bias_constraint``, ``gamma_constraint``, ...): the
    attribute that holds, right now, the very constraint object the variable has."""
    out: Dict[int, Tuple[Any, str]] = {}
    for layer in model._flatten_layers(include_self=False, recursive=True):
        for name, attrs in _CONSTRAINT_ARGS.items():
            try:
                v = getattr(layer, name, None)
            except Exception:  # a property that needs something the layer does not have
                continue
            if not isinstance(v, keras.Variable) or id(v) in out:
                continue
            for attr in attrs:
                if attr in vars(layer) and getattr(layer, attr) is v.constraint:
                    out[id(v)] = (layer, attr)
                    break
    return out


#: weight attribute -> the constructor arguments of Keras' layers that hold its constraint
#: (DepthwiseConv*D keeps its kernel's in ``depthwise_constraint``)
_CONSTRAINT_ARGS = {
    "kernel": ("kernel_constraint", "depthwise_constraint"),
    "depthwise_kernel": ("depthwise_constraint",),
    "pointwise_kernel": ("pointwise_constraint",),
    "bias": ("bias_constraint",),
    "gamma": ("gamma_constraint",),
    "beta": ("beta_constraint",),
    "embeddings": ("embeddings_constraint",),
}
