"""Convolutions inside custom layers (keras-hub blocks and the like).

A *custom layer* is a layer whose class is not Keras' own (nor graphquant's)
and is not itself a convolution, normalisation, activation or dense layer:
typically a block (``ConvBnActBlock``, ``InvertedResidualBlock``) that holds
sublayers as attributes and calls them in ``call()``.

Reading: :func:`custom_view` calls the layer's ``call()`` once on symbolic
Keras tensors, which records every sublayer call and every ``keras.ops`` call
with its inputs (the source's sublayers gain no node: their node lists are
restored after). That gives a :class:`~graphquant.patterns.View` whose nodes
are named by *attribute path* (``conv``, ``blocks.2``); nested custom layers
become nested views, so a point's path reads ``block_3/conv`` or
``block_1_0/squeeze_excite/conv_reduce`` and ``include``/``exclude``/
``overrides`` address them like any other node. The registry finds groups
there as in a model. Convolutions that cannot be swapped (a sublayer called
twice, ``keras.ops.conv`` or ``tf.nn`` calls, a layer that cannot be cloned
or whose weights are not all held by attributes) are listed on the view as
``left_float`` ``(path, kind, reason)``.

Rewriting: :func:`clone_custom` clones the layer from its config and replaces
each planned sublayer attribute by a :class:`QuantizedSublayer` (the sublayer,
weight-rounded through :class:`~graphquant.keras.QuantizeWeights` if planned,
followed by a :class:`~graphquant.keras.Quantize` if its output is a planned
activation point), and wraps the clone in :class:`QuantizedCustomLayer`,
whose config records the swaps so a ``.keras`` file loads to the same model.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import keras
import tensorflow as tf

from ..patterns import CONV, CONV_OPS, DENSE, KERAS, NORM, ACTIVATION, Node, View
from .layers import Quantize, QuantizeWeights

__all__ = ["QuantizedSublayer", "QuantizedCustomLayer", "is_custom_layer", "custom_view", "clone_custom", "clone_layer", "layer_attrs"]

log = logging.getLogger(__name__)

#: keras.ops operation classes that are convolutions (``keras.ops.conv`` etc.)
_KERAS_CONV_OPS = ("Conv", "DepthwiseConv", "SeparableConv", "ConvTranspose")
_CONCEPT_CLASSES = frozenset(
    c for m in (CONV, DENSE, NORM, ACTIVATION) for c in m.layers if isinstance(c, str)
)


def _classes(obj: Any) -> Tuple[str, ...]:
    return tuple(c.__name__ for c in type(obj).__mro__ if c is not object)


def _is_conv(layer: Any) -> bool:
    return bool(set(_classes(layer)) & {c for c in CONV.layers if isinstance(c, str)})


def is_custom_layer(layer: Any) -> bool:
    """A layer from outside Keras/graphquant that is none of the concepts the registry knows."""
    if not isinstance(layer, keras.layers.Layer) or isinstance(layer, keras.Model):
        return False
    mod = type(layer).__module__ or ""
    if mod.split(".")[0] in ("keras", "graphquant", "tf_keras", "tensorflow"):
        return False
    return not (set(_classes(layer)) & _CONCEPT_CLASSES)


# --------------------------------------------------------------------------- attribute paths
def _children(layer: Any) -> List[Tuple[str, Any]]:
    """``(attribute path, sublayer)`` of the layers ``layer`` holds as public attributes
    (``conv``; list items ``blocks.2``; dict items ``heads.q``)."""
    out: List[Tuple[str, Any]] = []
    for k, v in list(vars(layer).items()):
        if k.startswith("_"):
            continue
        if isinstance(v, keras.layers.Layer):
            out.append((k, v))
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                if isinstance(x, keras.layers.Layer):
                    out.append((f"{k}.{i}", x))
        elif isinstance(v, dict):
            for kk, x in v.items():
                if isinstance(x, keras.layers.Layer) and isinstance(kk, str) and "." not in kk and "/" not in kk:
                    out.append((f"{k}.{kk}", x))
    return out


def _get(layer: Any, attr: str) -> Any:
    head, _, rest = attr.partition(".")
    v = getattr(layer, head)
    if rest:
        v = v[int(rest)] if isinstance(v, (list, tuple)) else v[rest]
    return v


def _set(layer: Any, attr: str, value: Any) -> None:
    old = _get(layer, attr)
    head, _, rest = attr.partition(".")
    if rest:
        container = getattr(layer, head)
        if isinstance(container, tuple):
            raise ValueError(f"cannot replace {attr!r} of {layer.name!r}: it is in a tuple")
        container[int(rest) if isinstance(container, list) else rest] = value
    else:
        tracker = getattr(layer, "_tracker", None)
        locked = bool(getattr(tracker, "locked", False))
        if locked:  # a built layer (one loaded from a file): the swap wraps a sublayer it already has
            tracker.unlock()
        try:
            setattr(layer, head, value)
        finally:
            if locked:
                tracker.lock(tracker._lock_violation_msg)
    tracked = getattr(layer, "_layers", None)
    if isinstance(tracked, list):  # the replaced sublayer is no longer part of the layer
        for i, x in enumerate(tracked):
            if x is old:
                del tracked[i]
                break


def _resolve(layer: Any, path: Sequence[str]) -> Any:
    for attr in path:
        layer = _get(layer, attr)
    return layer


def _walk(layer: Any, prefix: Tuple[str, ...] = ()) -> List[Tuple[Tuple[str, ...], Any]]:
    """Every layer reachable through attributes (``layer`` itself first), with its path."""
    out = [(prefix, layer)]
    for attr, sub in _children(layer):
        if isinstance(sub, keras.Model):
            out.append((prefix + (attr,), sub))
            continue
        out += _walk(sub, prefix + (attr,))
    return out


def _own_variables(layer: Any) -> List[Any]:
    return list(getattr(layer, "_trainable_variables", [])) + list(getattr(layer, "_non_trainable_variables", []))


#: constructor keywords every Keras layer takes (through ``**kwargs``)
_BASE_KWARGS = frozenset({"name", "trainable", "dtype", "autocast", "input_dim", "input_shape", "batch_size",
                          "batch_input_shape", "input_length", "activity_regularizer"})  # fmt: skip


def from_config_tolerant(cls: type, config: Dict[str, Any]) -> Any:
    """``cls.from_config(config)``; if that raises ``TypeError``, again without the config keys the
    constructor does not take (some layers' ``get_config`` returns derived values, e.g. keras-hub's
    ``ViTPatchingAndEmbedding`` adds ``num_patches``). The first error is raised if that fails too."""
    import inspect  # noqa: PLC0415

    try:
        return cls.from_config(config)
    except TypeError as first:
        try:
            params = inspect.signature(cls.__init__).parameters
        except (TypeError, ValueError):
            raise first from None
        named = {n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        kept = {k: v for k, v in config.items() if k in named or k in _BASE_KWARGS}
        if len(kept) == len(config):
            raise first from None
        try:
            return cls.from_config(kept)
        except Exception:  # noqa: BLE001
            raise first from None


def _deserialize_tolerant(obj: Any) -> Any:
    """``keras.saving.deserialize_keras_object``, with :func:`from_config_tolerant` for a layer whose
    saved config its constructor rejects."""
    try:
        return keras.saving.deserialize_keras_object(obj)
    except TypeError:
        if not isinstance(obj, dict) or "config" not in obj:
            raise
        cls = keras.saving.get_registered_object(obj.get("registered_name") or obj.get("class_name"))
        if cls is None and obj.get("module"):
            import importlib  # noqa: PLC0415

            cls = getattr(importlib.import_module(obj["module"]), obj["class_name"], None)
        if cls is None:
            raise
        layer = from_config_tolerant(cls, obj["config"])
        if obj.get("build_config") and not layer.built:
            layer.build_from_config(obj["build_config"])
        return layer


# --------------------------------------------------------------------------- reading
def _symbolic_like(x: Any, batch: Optional[int]) -> Any:
    if isinstance(x, keras.KerasTensor):
        shape = tuple(x.shape)
        if batch is not None and shape and shape[0] is None:
            shape = (batch,) + shape[1:]
        return keras.KerasTensor(shape, dtype=x.dtype, sparse=getattr(x, "sparse", False))
    return x


def _conv_layers(layer: Any) -> List[Tuple[str, Any]]:
    """``(path, conv)`` for every convolution layer reachable through ``layer``'s attributes."""
    out = []
    for path, sub in _walk(layer)[1:]:
        if _is_conv(sub):
            out.append(("/".join(path), sub))
        elif isinstance(sub, keras.Model):
            for l in sub._flatten_layers(include_self=False, recursive=True):
                if _is_conv(l):
                    out.append(("/".join(path) + "/" + l.name, l))
    return out


def _graph_convs(layer: Any, args: Any, kwargs: Any) -> List[str]:
    """Names of the TF convolution ops ``layer``'s call runs (traced in a scratch graph)."""
    def spec(x: Any) -> Any:
        if isinstance(x, keras.KerasTensor):
            shape = tuple(1 if (i == 0 and d is None) else d for i, d in enumerate(x.shape))
            return tf.TensorSpec(shape, x.dtype)
        return x

    s_args, s_kwargs = keras.tree.map_structure(spec, (args, kwargs))
    flat = [s for s in keras.tree.flatten((s_args, s_kwargs)) if isinstance(s, tf.TensorSpec)]

    def fn(*tensors: Any) -> Any:
        it = iter(tensors)
        a, k = keras.tree.map_structure(lambda s: next(it) if isinstance(s, tf.TensorSpec) else s, (s_args, s_kwargs))
        return layer(*a, **k)

    try:
        graph = tf.function(fn, autograph=False).get_concrete_function(*flat).graph
    except Exception as e:  # noqa: BLE001 - reported, never raised
        log.debug("cannot trace %s in a graph: %s", layer.name, e)
        return []
    names = [op.name for op in graph.get_operations() if op.type in CONV_OPS]
    for fdef in graph.as_graph_def().library.function:
        names += [f"{fdef.signature.name}/{n.name}" for n in fdef.node_def if n.op in CONV_OPS]
    return names


def custom_view(layer: Any, args: Any = (), kwargs: Any = None) -> View:
    """The view of a custom layer's ``call()`` (see the module docstring).

    ``args`` / ``kwargs`` are the arguments of one call of the layer (Keras
    tensors give shapes and dtypes). The returned view has a ``left_float``
    attribute: ``(path, kind, reason)`` for each convolution inside the layer
    that cannot be rounded, paths relative to the layer.
    """
    kwargs = dict(kwargs or {})
    left: List[Tuple[str, str, str]] = []
    subs = [sub for _, sub in _walk(layer)[1:]]
    dense = {c for c in DENSE.layers if isinstance(c, str)}
    if subs and not any(_is_conv(s) or set(_classes(s)) & dense or isinstance(s, keras.Model) for s in subs):
        view = View([], name=layer.name)  # sublayers, none a target: nothing to read (and no cost)
        view.left_float = left
        return view
    view = _trace(layer, args, kwargs, left)
    view.left_float = left
    return view


def _everything_float(layer: Any, left: List[Tuple[str, str, str]], reason: str, prefix: str = "") -> None:
    for path, conv in _conv_layers(layer):
        left.append((prefix + path, type(conv).__name__, reason))


def _trace(
    layer: Any, args: Any, kwargs: Dict[str, Any], left: List[Tuple[str, str, str]], prefix: str = "", top: bool = True
) -> View:
    empty = View([], name=layer.name)
    # 1. can it be cloned (a nested custom layer is made by its parent's constructor),
    #    and are all its weights held by attributes (so they can be copied)?
    if top:
        try:
            from_config_tolerant(type(layer), layer.get_config())
        except Exception as e:  # noqa: BLE001
            _everything_float(layer, left, f"{type(layer).__name__} cannot be cloned from its config "
                                           f"({type(e).__name__}: {str(e)[:80]})", prefix)  # fmt: skip
            return empty
    tree = _walk(layer)
    held = {id(v) for _, sub in tree for v in _own_variables(sub)}
    for _, sub in tree:
        if isinstance(sub, keras.Model):
            held |= {id(v) for v in sub.weights}
    if any(id(v) not in held for v in layer.weights):
        _everything_float(layer, left, f"{type(layer).__name__} has weights not held by its attributes", prefix)
        return empty
    # 2. call it on symbolic tensors; the sublayers' node lists are restored after
    subs = [sub for _, sub in tree]
    saved = [(s, len(s._inbound_nodes), len(s._outbound_nodes)) for s in subs]
    outputs = None
    error: Optional[Exception] = None
    try:
        for batch in (None, 1):
            try:
                a, k = keras.tree.map_structure(lambda x: _symbolic_like(x, batch), (tuple(args), kwargs))
                inputs = [x for x in keras.tree.flatten((a, k)) if isinstance(x, keras.KerasTensor)]
                outputs = layer.call(*a, **k)
                error = None
                break
            except Exception as e:  # noqa: BLE001
                error = e
        if outputs is None or error is not None:
            names = _graph_convs(layer, args, kwargs)
            why = f"{type(layer).__name__}.call() cannot run on symbolic Keras tensors ({type(error).__name__})" \
                if error is not None else f"{type(layer).__name__}.call() returned nothing"
            left += [(prefix + n, "tf op", why + "; raw TensorFlow calls?") for n in names]
            if not names:
                _everything_float(layer, left, why, prefix)
            return empty
        return _view_from_trace(layer, tree, inputs, outputs, left, prefix)
    finally:
        for s, n_in, n_out in saved:
            del s._inbound_nodes[n_in:]
            del s._outbound_nodes[n_out:]


def _traced_calls(inputs: Any, outputs: Any) -> List[Any]:
    """The Keras Nodes (calls) between the symbolic ``inputs`` and ``outputs`` of a traced ``call()``,
    depth first from the outputs: a topological order."""
    order: List[Any] = []
    seen: set = set()
    input_ids = {id(x) for x in inputs}

    def visit(t: Any) -> None:
        hist = getattr(t, "_keras_history", None)
        if hist is None or hist.operation is None or id(t) in input_ids:
            return
        node = hist.operation._inbound_nodes[hist.node_index]
        if id(node) in seen:
            return
        seen.add(id(node))
        for x in node.input_tensors:
            visit(x)
        order.append(node)

    for t in keras.tree.flatten(outputs):
        visit(t)
    return order


def _traced_node(node: Any, k: int, attr: Optional[str], n_calls: int, children: Dict[str, View],
                 left: List[Tuple[str, str, str]], prefix: str) -> Tuple[str, Tuple[str, ...], Any]:
    """``(base name, classes, object to swap or None)`` of the ``k``-th call ``node`` of an operation in a
    traced ``call()`` (``attr``: the custom layer's attribute holding it; ``n_calls``: its calls). Only a layer
    held as an attribute and called once can be swapped; a convolution that cannot is added to ``left``
    (why), and a custom sublayer gets its own view in ``children``."""
    op = node.operation
    kind = type(op).__name__
    if not isinstance(op, keras.layers.Layer):
        base = f"{op.name}()"
        if kind in _KERAS_CONV_OPS:
            left.append((prefix + base, kind, "a keras.ops convolution in call(), not a layer: nothing to swap"))
        return base, (f"op:{kind}",), None
    if attr is None:
        base = f"~{op.name}"
        if _is_conv(op):
            left.append((prefix + base, kind, "a layer that call() uses but the custom layer does not hold "
                                              "as an attribute"))
        return base, (f"unheld:{kind}",), None
    if n_calls > 1:
        if k == 0:
            if _is_conv(op):
                left.append((prefix + attr, kind, f"called {n_calls} times in call(): a swap would "
                                                  "change every call"))
            elif is_custom_layer(op):
                _everything_float(op, left, f"inside {attr}, which call() calls {n_calls} times",
                                  prefix + attr + "/")  # fmt: skip
        return attr, (f"shared:{kind}",), None
    if is_custom_layer(op):
        a, kw = node.arguments.args, node.arguments.kwargs
        sub_left: List[Tuple[str, str, str]] = []
        children[attr] = _trace(op, a, kw, sub_left, "", top=False)
        left += [(f"{prefix}{attr}/{p}", kd, r) for p, kd, r in sub_left]
    elif isinstance(op, keras.Model):
        _everything_float(op, left, "in a Keras model inside a custom layer", prefix)
    return attr, _classes(op), op


def _view_from_trace(layer, tree, inputs, outputs, left, prefix) -> View:
    """The view of a custom layer from its ``call()`` traced on symbolic tensors: one node per call
    (:func:`_traced_node`), named by the attribute holding the layer; the convolutions it holds that the
    trace never called are added to ``left``."""
    attr_of: Dict[int, str] = {}
    for attr, sub in _children(layer):
        attr_of.setdefault(id(sub), attr)
    order = _traced_calls(inputs, outputs)
    calls: Dict[int, int] = {}
    for node in order:
        calls[id(node.operation)] = calls.get(id(node.operation), 0) + 1
    name_of: Dict[int, str] = {}
    nodes: List[Node] = []
    children: Dict[str, View] = {}
    k_of: Dict[int, int] = {}
    used_names: set = set()
    for node in order:
        op = node.operation
        k = k_of.get(id(op), 0)
        k_of[id(op)] = k + 1
        base, classes, obj = _traced_node(node, k, attr_of.get(id(op)), calls[id(op)], children, left, prefix)
        name = base if k == 0 else f"{base}@{k}"
        while name in used_names:
            name += "_"
        used_names.add(name)
        name_of[id(node)] = name
        ins: List[str] = []
        for x in node.input_tensors:
            hist = getattr(x, "_keras_history", None)
            if hist is None or hist.operation is None:
                continue
            src = name_of.get(id(hist.operation._inbound_nodes[hist.node_index]))
            if src is not None and src not in ins:
                ins.append(src)
        attrs = layer_attrs(op) if isinstance(op, keras.layers.Layer) else {}
        nodes.append(Node(name, type(op).__name__, KERAS, inputs=ins, attrs=attrs, obj=obj, classes=classes))
    for path, conv in _conv_layers(layer):
        if id(conv) not in calls and "/" not in path and conv.built:  # (unbuilt: never ran, e.g. unused)
            left.append((prefix + path, type(conv).__name__, "not called when call() runs on symbolic tensors "
                                                             "(unused, or on another branch)"))
    return View(nodes, children, name=layer.name)


# --------------------------------------------------------------------------- rewriting
@keras.saving.register_keras_serializable(package="graphquant")
class QuantizedSublayer(keras.layers.Wrapper):
    """A sublayer of a custom layer, followed by an activation rounding.

    ``layer`` is the sublayer (possibly a :class:`QuantizeWeights` around it);
    ``quantize`` a :class:`Quantize` applied to its output, or ``None``.
    Attributes the wrapper does not have (``filters``, ``kernel``...) are read
    from the innermost wrapped layer, so the custom layer's own ``build()``
    keeps working.
    """

    def __init__(self, layer: keras.layers.Layer, quantize: Optional[keras.layers.Layer] = None, **kwargs: Any):
        kwargs.setdefault("name", layer.name)
        super().__init__(layer, **kwargs)
        if isinstance(quantize, dict):
            quantize = keras.saving.deserialize_keras_object(quantize)
        self.quantize = quantize
        self.supports_masking = getattr(layer, "supports_masking", False)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or "layer" not in self.__dict__:
            raise AttributeError(name)
        inner = self.__dict__["layer"]
        while isinstance(inner, keras.layers.Wrapper) and "layer" in inner.__dict__:
            inner = inner.__dict__["layer"]
        return getattr(inner, name)

    def build(self, input_shape: Any = None) -> None:
        if not self.layer.built and input_shape is not None:
            self.layer.build(input_shape)
        if self.quantize is not None and not self.quantize.built and input_shape is not None:
            try:
                self.quantize.build(self.layer.compute_output_shape(input_shape))
            except Exception:  # noqa: BLE001 - built on first call instead
                pass
        self.built = True

    def call(self, inputs: Any, *args: Any, training: Any = None, **kwargs: Any) -> Any:
        if getattr(self.layer, "_call_has_training_arg", False):
            kwargs["training"] = training
        y = self.layer(inputs, *args, **kwargs)
        if self.quantize is not None:
            y = self.quantize(y, training=training)
        return y

    def compute_output_shape(self, input_shape: Any) -> Any:
        return self.layer.compute_output_shape(input_shape)

    def get_config(self) -> Dict[str, Any]:
        cfg = super().get_config()
        cfg["quantize"] = None if self.quantize is None else keras.saving.serialize_keras_object(self.quantize)
        return cfg


def _apply_swaps(inner: Any, swaps: Sequence[Dict[str, Any]]) -> None:
    for s in swaps:
        path = s["path"].split("/")
        parent = _resolve(inner, path[:-1])
        sub = _get(parent, path[-1])
        if isinstance(sub, QuantizedSublayer):
            raise ValueError(f"sublayer {s['path']!r} of {inner.name!r} is swapped twice")
        rep = sub
        if s.get("weights"):
            rep = QuantizeWeights(sub, s["weights"], seed=s.get("weight_seed"), name=sub.name)
        q = s.get("quantize")
        if isinstance(q, dict):
            q = Quantize.from_config(q)
        _set(parent, path[-1], QuantizedSublayer(rep, q, name=sub.name))


@keras.saving.register_keras_serializable(package="graphquant")
class QuantizedCustomLayer(keras.layers.Wrapper):
    """A custom layer whose convolution sublayers (and their partners) round.

    ``swaps`` lists ``{"path": "block/conv", "weights": [slot dicts] or None,
    "weight_seed": int or None, "quantize": Quantize config or None}``; on
    construction each sublayer at ``path`` (attribute names, ``/`` between
    nested custom layers) is replaced by a :class:`QuantizedSublayer`. The
    config keeps the swaps, so a saved model loads to the same structure.
    """

    def __init__(self, layer: keras.layers.Layer, swaps: Sequence[Dict[str, Any]] = (), **kwargs: Any):
        kwargs.setdefault("name", layer.name)
        super().__init__(layer, **kwargs)
        norm = []
        for s in swaps:
            d = dict(s)
            if d.get("weights"):
                d["weights"] = [dict(w, format=w["format"] if isinstance(w["format"], dict) else w["format"].to_dict())
                                for w in d["weights"]]  # fmt: skip
            norm.append(d)
        self.swaps = norm
        _apply_swaps(layer, norm)
        self.supports_masking = getattr(layer, "supports_masking", False)

    def build(self, input_shape: Any = None) -> None:
        # the custom layer builds on its first call (Keras runs call() to find the output
        # spec when the wrapper is first called on symbolic tensors), with its own arguments
        self.built = True

    def call(self, *args: Any, **kwargs: Any) -> Any:
        if "training" in kwargs and not getattr(self.layer, "_call_has_training_arg", False):
            kwargs.pop("training")
        return self.layer(*args, **kwargs)

    def get_config(self) -> Dict[str, Any]:
        cfg = super().get_config()
        cfg["swaps"] = [dict(s) for s in self.swaps]
        return cfg

    @classmethod
    def from_config(cls, config: Dict[str, Any], custom_objects: Any = None) -> "QuantizedCustomLayer":
        config = dict(config)
        with keras.saving.custom_object_scope(custom_objects or {}):
            layer = _deserialize_tolerant(config.pop("layer"))
        return cls(layer, **config)


class _Own:
    """A layer's own variables (not its sublayers'), for :meth:`graphquant.keras.clone.Rewriter.copy_weights`."""

    def __init__(self, layer: Any):
        self.layer = layer
        self.name = layer.name

    @property
    def built(self) -> bool:
        return self.layer.built or not _own_variables(self.layer)

    @property
    def weights(self) -> List[Any]:
        return _own_variables(self.layer)

    def get_weights(self) -> List[Any]:
        return [v.numpy() for v in self.weights]

    def set_weights(self, values: List[Any]) -> None:
        mine = self.weights
        if len(mine) != len(values):
            raise ValueError(f"layer {self.name!r}: {len(mine)} weights in the copy, {len(values)} in the source")
        for v, x in zip(mine, values):
            if tuple(v.shape) != tuple(x.shape):
                raise ValueError(f"layer {self.name!r}: weight {v.name!r} has shape {tuple(v.shape)} in the copy, "
                                 f"{tuple(x.shape)} in the source")  # fmt: skip
            v.assign(x)


def _act_name(layer: Any) -> Any:
    act = getattr(layer, "activation", None)
    if act is None:
        return None
    return getattr(act, "__name__", str(act))


def layer_attrs(layer: Any) -> Dict[str, Any]:
    """The attributes of ``layer``'s node in a view: its fused activation, if any."""
    attrs: Dict[str, Any] = {}
    if not isinstance(layer, keras.layers.Activation):  # its activation is the point, not a fused extra
        act = _act_name(layer)
        if act is not None:
            attrs["activation"] = act
    return attrs


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


def clone_custom(rw: Any, layer: Any, scope: Tuple[str, ...]) -> QuantizedCustomLayer:
    """A clone of custom ``layer`` with the plan's points under ``scope`` swapped in.

    Registers ``(source, clone)`` weight pairs for every attribute-held layer
    with ``rw`` (a :class:`graphquant.keras.clone.Rewriter`) so its ``copy_weights`` copies them.
    """
    try:
        inner = from_config_tolerant(type(layer), layer.get_config())
    except Exception:  # noqa: BLE001 - the planner checked this; raise the usual message
        inner = clone_layer(layer)
    own_build = type(layer).build is not keras.layers.Layer.build
    build_config = layer.get_build_config() if layer.built and own_build else None
    if build_config:  # built as the source was (some layers make their sublayers in build())
        inner.build_from_config(build_config)
    for path, sub in _walk(layer):
        new = _resolve(inner, path)
        # a Keras model inside is copied whole; every other layer its own variables
        rw.pairs.append((sub, new) if isinstance(sub, keras.Model) else (_Own(sub), _Own(new)))
    swaps: Dict[str, Dict[str, Any]] = {}
    n = len(scope)
    for p in rw.plan.points:
        if p.scope[:n] != scope:
            continue
        rel = p.scope[n:]
        if p.what == "activations":
            s = swaps.setdefault("/".join(rel + (p.after,)), {})
            s["quantize"] = Quantize(
                format=p.format, rounding=p.rounding, inference_rounding=p.inference_rounding,
                momentum=rw.plan.config.range_momentum, seed=rw.next_seed(),
                name="_".join(scope + rel + (p.after,)).replace(".", "_") + "_quant",
            ).get_config()  # fmt: skip
            rw.inserted += 1
        else:
            s = swaps.setdefault("/".join(rel + (p.target,)), {})
            if "weights" not in s:
                s["weights"] = []
                s["weight_seed"] = rw.next_seed()
            s["weights"].append({"slot": p.slot, "format": p.format.to_dict(), "rounding": p.rounding,
                                 "inference_rounding": p.inference_rounding})  # fmt: skip
    spec = [dict(v, path=k) for k, v in swaps.items()]
    return QuantizedCustomLayer(inner, spec, name=layer.name)
