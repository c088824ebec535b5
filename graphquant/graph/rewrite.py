"""Edit a GraphDef: splice rounding nodes in at the plan's insertion points.

Each insertion rounds one tensor (output 0 of a node, in the top-level graph
or inside a function-library body) and rewires every consumer of that tensor
(including the function's return values) to the rounded tensor. The rounding
itself is :func:`graphquant.quantize`, traced once per distinct
``(format, rounding, dtype)`` into a library function that the inserted
``PartitionedCall`` / ``StatefulPartitionedCall`` node calls. Affine nearest
rounding with a known range (the serving-friendly common case) is spliced as a
single ``FakeQuantWithMinMaxArgs`` node, which is exactly what ``quantize``
computes for it. Every inserted node and function carries ``graphquant`` in
its name, and every inserted node records what it does in two string
attributes, ``_graphquant_format`` (``str(format)``, with the range actually
used for affine formats) and ``_graphquant_rounding``.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import function_pb2, graph_pb2, node_def_pb2, types_pb2

from ..formats import Affine, Format, channel_axis
from ..weights import round_weight
from .view import CALL_OPS, output_arg_names

log = logging.getLogger(__name__)

__all__ = ["Insertion", "GraphEditor", "FLOAT_DTYPES", "FORMAT_ATTR", "ROUNDING_ATTR", "rounding_nodes", "follow_redirects"]

FLOAT_DTYPES = {"float": tf.float32, "half": tf.float16, "bfloat16": tf.bfloat16, "double": tf.float64}


@dataclass
class Insertion:
    """One tensor to round.

    Attributes:
        scope: ``""`` for the top-level graph, else the library function's name.
        node: local name of the node whose output 0 is rounded.
        format: the number format.
        rounding: rounding mode.
        range: for an :class:`Affine` format without its own range, the
            calibrated ``(lo, hi)``; ``None`` there means a dynamic range
            (min/max of each batch).
        target: ``"activations"`` (every consumer is rewired) or ``"weights"``.
        consumer: for weights, the local name of the one consumer to rewire
            and ``input_index`` its input.
        label: a readable label (the plan's group), used in the node name.
        depthwise: for weights, the tensor is a depthwise filter (one scale per
            output channel = input channel x multiplier).
    """

    scope: str
    node: str
    format: Format
    rounding: str = "nearest"
    range: Optional[Tuple[float, float]] = None
    target: str = "activations"
    consumer: Optional[str] = None
    input_index: Optional[int] = None
    label: str = ""
    inserted: Optional[str] = None
    depthwise: bool = False


def _dtype_name(enum: int) -> str:
    return types_pb2.DataType.Name(enum).replace("DT_", "").lower()


def _safe(text: str) -> str:
    out = "".join(c if c.isalnum() or c in "_-" else "_" for c in text)
    return out[:60] or "x"


class _Scope:
    """Uniform editing of the top-level graph or one FunctionDef body."""

    def __init__(self, editor: "GraphEditor", name: str):
        self.editor = editor
        self.name = name
        if name:
            self.fdef: Optional[function_pb2.FunctionDef] = editor.library[name]
            self.nodes = self.fdef.node_def
        else:
            self.fdef = None
            self.nodes = editor.graph_def.node
        self.by_name: Dict[str, node_def_pb2.NodeDef] = {n.name: n for n in self.nodes}
        self.arg_types: Dict[str, int] = {}
        if self.fdef is not None:
            for a in self.fdef.signature.input_arg:
                self.arg_types[a.name] = a.type

    @property
    def in_function(self) -> bool:
        return self.fdef is not None

    def unique(self, base: str) -> str:
        name, k = base, 1
        while name in self.by_name or name in self.arg_types:
            k += 1
            name = f"{base}_{k}"
        return name

    def ref(self, node: node_def_pb2.NodeDef, index: int = 0) -> str:
        if not self.in_function:
            return node.name if index == 0 else f"{node.name}:{index}"
        outs = output_arg_names(node.op, self.editor.library)
        if node.op in CALL_OPS or len(outs) == 1:
            return f"{node.name}:{outs[0]}:{index}"
        return f"{node.name}:{outs[index]}:0"

    def aliases(self, node_name: str) -> Tuple[str, ...]:
        nd = self.by_name.get(node_name)
        if nd is None:
            return (node_name,)  # a function argument
        r = self.ref(nd, 0)
        if not self.in_function:
            return (r, f"{node_name}:0")
        return (r,)

    def out_dtype(self, node_name: str) -> int:
        if node_name in self.arg_types:
            return self.arg_types[node_name]
        nd = self.by_name[node_name]
        for key in ("T", "dtype", "out_type"):
            if key in nd.attr and nd.attr[key].WhichOneof("value") == "type":
                return nd.attr[key].type
        if "Tout" in nd.attr and nd.attr["Tout"].list.type:
            return nd.attr["Tout"].list.type[0]
        fixed = _default_out_dtype(nd)  # SavedModels strip attributes at their default (LeakyRelu's T=float)
        if fixed is not None:
            return fixed
        raise ValueError(f"cannot tell the dtype of node {node_name!r} ({nd.op})")

    def add(self, nd: node_def_pb2.NodeDef) -> node_def_pb2.NodeDef:
        new = self.nodes.add()
        new.CopyFrom(nd)
        self.by_name[new.name] = new
        return new

    def rewire(self, old: Sequence[str], new: str, skip: Iterable[str]) -> int:
        skip = set(skip)
        old = set(old)
        n = 0
        for nd in self.nodes:
            if nd.name in skip:
                continue
            for i, r in enumerate(nd.input):
                if r in old:
                    nd.input[i] = new
                    n += 1
        if self.fdef is not None:
            for k, r in list(self.fdef.ret.items()):
                if r in old:
                    self.fdef.ret[k] = new
                    n += 1
        else:  # outputs named outside the graph (signatures, fetches) follow through redirect()
            new_t = _tensor_name(new)
            for r in old:
                self.editor.redirects[_tensor_name(r)] = new_t
        return n


def _default_out_dtype(nd: node_def_pb2.NodeDef) -> Optional[int]:
    """The first output's dtype from the op's definition: a fixed type, or its type attribute's default."""
    from tensorflow.python.framework import op_def_registry  # noqa: PLC0415

    op_def = op_def_registry.get(nd.op)
    if op_def is None or not op_def.output_arg:
        return None
    out = op_def.output_arg[0]
    if out.type:
        return out.type
    for a in op_def.attr:
        if a.name == out.type_attr and a.HasField("default_value") and a.default_value.WhichOneof("value") == "type":
            return a.default_value.type
    return None


def _tensor_name(ref: str) -> str:
    """``"relu"`` -> ``"relu:0"``; ``"relu:1"`` unchanged (top-level spelling)."""
    head, _, port = ref.rpartition(":")
    return ref if head and port.isdigit() else f"{ref}:0"


def follow_redirects(redirects: Dict[str, str], tensor: str) -> str:
    """``tensor`` mapped through ``redirects`` (chains followed), or unchanged."""
    t = _tensor_name(tensor)
    seen = set()
    while t in redirects and t not in seen:
        seen.add(t)
        t = redirects[t]
    return t if t != _tensor_name(tensor) else tensor


def rounding_nodes(graph_def: graph_pb2.GraphDef) -> List[Tuple[str, str]]:
    """``(scope, node)`` of every node a graphquant rewrite inserted (it carries :data:`FORMAT_ATTR`)."""
    out = [("", n.name) for n in graph_def.node if FORMAT_ATTR in n.attr]
    for f in graph_def.library.function:
        out.extend((f.signature.name, n.name) for n in f.node_def if FORMAT_ATTR in n.attr)
    return out


def _const_node(name: str, value: np.ndarray, dtype: int) -> node_def_pb2.NodeDef:
    nd = node_def_pb2.NodeDef(name=name, op="Const")
    nd.attr["dtype"].type = dtype
    nd.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value, dtype=tf.dtypes.as_dtype(dtype)))
    return nd


class GraphEditor:
    """Applies insertions to a GraphDef in place (its library included).

    Args:
        graph_def: edited in place.
        seed: optional seed for stochastic rounding (op-level seed of the
            random draw feeding each rounding call).
    """

    def __init__(self, graph_def: graph_pb2.GraphDef, *, seed: Optional[int] = None):
        self.graph_def = graph_def
        self.library: Dict[str, function_pb2.FunctionDef] = {f.signature.name: f for f in graph_def.library.function}
        self._scopes: Dict[str, _Scope] = {}
        self._kernels: Dict[Tuple, Tuple[str, bool]] = {}
        self.seed = seed
        self.counter = 0
        #: top-level tensor name -> the tensor now holding its rounded value
        self.redirects: Dict[str, str] = {}
        self._handles: Dict[Tuple[str, str], str] = {}
        self._references: Optional[Dict[str, List[Tuple[str, str, bool]]]] = None
        self._compiled: Dict[str, bool] = {}
        self._side_effects: Dict[str, bool] = {}

    def redirect(self, tensor: str) -> str:
        """The top-level tensor that now carries ``tensor``'s (rounded) value.

        Rewiring reaches every consumer inside the graph; names read from
        outside it (TF1 signature outputs, fetches) must be mapped with this.
        """
        return follow_redirects(self.redirects, tensor)

    def scope(self, name: str) -> _Scope:
        if name not in self._scopes:
            if name and name not in self.library:
                raise KeyError(f"no function {name!r} in the graph's library")
            self._scopes[name] = _Scope(self, name)
        return self._scopes[name]

    # -- resource variables ------------------------------------------------
    def _refs(self) -> Dict[str, List[Tuple[str, str, bool]]]:
        """Function name -> ``(scope, node, is_call)`` of every node naming it (a call node's
        ``f``, a direct call, or any other function-valued attribute)."""
        if self._references is None:
            refs: Dict[str, List[Tuple[str, str, bool]]] = {}
            scopes = [("", self.graph_def.node)] + [(n, f.node_def) for n, f in self.library.items()]
            for scope, nodes in scopes:
                for nd in nodes:
                    named = set()
                    if nd.op in CALL_OPS and "f" in nd.attr:
                        refs.setdefault(nd.attr["f"].func.name, []).append((scope, nd.name, True))
                        named.add(("f", nd.attr["f"].func.name))
                    elif nd.op in self.library:
                        refs.setdefault(nd.op, []).append((scope, nd.name, True))
                    for k, v in nd.attr.items():
                        which = v.WhichOneof("value")
                        funcs = [v.func.name] if which == "func" else list(f.name for f in v.list.func) if which == "list" else []
                        for fn in funcs:
                            if fn in self.library and (k, fn) not in named:
                                refs.setdefault(fn, []).append((scope, nd.name, False))
            self._references = refs
        return self._references

    def compiled(self, scope: str) -> bool:
        """Whether XLA compiles the body of ``scope``: the function must compile
        (``_XlaMustCompile``), or is called or referenced from a body that does."""
        if not scope:
            return False
        if scope not in self._compiled:
            self._compiled[scope] = False  # a recursive reference does not make it compiled
            fdef = self.library[scope]
            res = fdef.attr["_XlaMustCompile"].b if "_XlaMustCompile" in fdef.attr else False
            for caller, node, _ in self._refs().get(scope, []):
                if res:
                    break
                nd = self.scope(caller).by_name[node]
                res = (nd.attr["_XlaMustCompile"].b if "_XlaMustCompile" in nd.attr else False) or self.compiled(caller)
            self._compiled[scope] = res
        return self._compiled[scope]

    def runs_side_effects(self, scope: str) -> bool:
        """Whether a node of function ``scope`` that is only a control output (``control_ret``) is sure
        to run whenever the function is called: the function is not compiled by XLA and every node
        naming it is a ``StatefulPartitionedCall`` in the top-level graph or in a function of which
        this holds too. (A ``PartitionedCall`` is inlined keeping only what its data outputs need;
        a function with no caller in the graph, or named otherwise, is not vouched for.)"""
        if not scope:
            return False
        if scope not in self._side_effects:
            self._side_effects[scope] = False  # a recursive reference vouches for nothing
            refs = self._refs().get(scope, [])
            self._side_effects[scope] = bool(refs) and not self.compiled(scope) and all(
                is_call and self.scope(caller).by_name[node].op == "StatefulPartitionedCall"
                and (not caller or self.runs_side_effects(caller))
                for caller, node, is_call in refs
            )  # fmt: skip
        return self._side_effects[scope]

    def resource_handle(self, scope: str, shared_name: str, dtype: int, shape: Sequence[Optional[int]],
                        name: str) -> str:  # fmt: skip
        """A reference, valid in ``scope``, to the resource variable ``shared_name`` (container ``""``).

        A ``VarHandleOp`` node where one can run; in a body XLA compiles (see
        :meth:`compiled`), where ``VarHandleOp`` cannot, a new resource argument
        of the function, which every call of it passes from the caller's own
        handle (recursively up to a body that is not compiled): the variable
        then reaches XLA as the compiled function's resource input. Calls of
        such a function become ``StatefulPartitionedCall``.

        Raises:
            ValueError: when the compiled function is referenced otherwise than by
                a call (e.g. as a ``While`` body): its callers cannot pass the handle.
        """
        key = (scope, shared_name)
        if key in self._handles:
            return self._handles[key]
        sc = self.scope(scope)
        if not self.compiled(scope):
            h = node_def_pb2.NodeDef(name=sc.unique(name), op="VarHandleOp")
            h.attr["dtype"].type = dtype
            if shape is None:
                h.attr["shape"].shape.unknown_rank = True
            else:
                h.attr["shape"].shape.SetInParent()
                for d in shape:
                    h.attr["shape"].shape.dim.add().size = -1 if d is None else int(d)
            h.attr["shared_name"].s = shared_name.encode()
            h.attr["container"].s = b""
            h.attr["allowed_devices"].list.SetInParent()
            ref = sc.ref(sc.add(h), 0)
        else:
            refs = self._refs().get(scope, [])
            bad = [(c, n) for c, n, is_call in refs if not is_call]
            if bad:
                c, n = bad[0]
                op = self.scope(c).by_name[n].op
                where = f"function {c!r}" if c else "the graph"
                raise ValueError(f"cannot pass a variable into XLA-compiled function {scope!r}: "
                                 f"{op} node {n!r} in {where} uses it otherwise than by a call")  # fmt: skip
            fdef = sc.fdef
            arg = sc.unique(_arg_name(name))
            fdef.signature.input_arg.add(name=arg, type=types_pb2.DT_RESOURCE)
            fdef.signature.is_stateful = True
            sc.arg_types[arg] = types_pb2.DT_RESOURCE
            if "_input_shapes" in fdef.attr:
                fdef.attr["_input_shapes"].list.shape.add()  # a scalar: a resource handle
            ref = arg
            for caller, node, _ in refs:
                h = self.resource_handle(caller, shared_name, dtype, shape, name)
                nd = self.scope(caller).by_name[node]
                ctrl = [r for r in nd.input if r.startswith("^")]
                data = [r for r in nd.input if not r.startswith("^")]
                del nd.input[:]
                nd.input.extend(data + [h] + ctrl)
                if nd.op in CALL_OPS:
                    nd.attr["Tin"].list.type.append(types_pb2.DT_RESOURCE)
                    nd.op = "StatefulPartitionedCall"
        self._handles[key] = ref
        return ref

    # -- functions ---------------------------------------------------------
    def add_functions(self, fdefs: Sequence[function_pb2.FunctionDef], main: str) -> str:
        """Copy traced functions into the library under content-hashed names; return ``main``'s new name."""
        digest = hashlib.sha1()
        for f in sorted(fdefs, key=lambda f: f.signature.name):
            digest.update(f.SerializeToString(deterministic=True))
        tag = digest.hexdigest()[:10]
        mapping = {f.signature.name: f"graphquant_{_safe(f.signature.name.replace('__inference_', ''))[:40]}_{tag}" for f in fdefs}
        for f in fdefs:
            new = function_pb2.FunctionDef()
            new.CopyFrom(f)
            new.signature.name = mapping[f.signature.name]
            for nd in new.node_def:
                rename_functions(nd, mapping)
                # custom gradients of the traced kernel are training-time only
                # and not registered in a process that loads the result
                if "_gradient_op_type" in nd.attr:
                    del nd.attr["_gradient_op_type"]
            if new.signature.name in self.library:
                continue
            self.graph_def.library.function.add().CopyFrom(new)
            self.library[new.signature.name] = self.graph_def.library.function[-1]
        return mapping[main]

    def _trace_kernel(self, key: Tuple, build: Callable, specs: Sequence[tf.TensorSpec]) -> Tuple[str, bool]:
        if key in self._kernels:
            return self._kernels[key]
        fn = tf.function(build, autograph=False)
        cf = fn.get_concrete_function(*specs)
        if cf.graph.captures:
            raise ValueError("internal: the traced rounding kernel captured a variable")
        lib = list(cf.graph.as_graph_def().library.function)
        names = {f.signature.name for f in lib}
        fdefs = [cf.function_def] + [f for f in lib if f.signature.name != cf.function_def.signature.name]
        del names
        stateful = _is_stateful(fdefs)
        fname = self.add_functions(fdefs, cf.function_def.signature.name)
        self._kernels[key] = (fname, stateful)
        return self._kernels[key]

    def _kernel_for(self, ins: Insertion, dtype: int, shape=None) -> Tuple[str, bool, List[np.ndarray]]:
        """The library function rounding one tensor, and the extra constant inputs it takes."""
        from ..ops import quantize

        fmt, rounding = ins.format, ins.rounding
        tf_dtype = tf.dtypes.as_dtype(dtype)
        seed = self.seed

        def seed_for():
            if rounding != "stochastic":
                return None
            return tf.random.uniform([2], minval=0, maxval=2**31 - 1, dtype=tf.int32, seed=seed)

        if ins.target == "weights":
            def build(w):
                return round_weight(w, fmt, rounding, seed_for(), depthwise=ins.depthwise)

            key = ("w", str(fmt), rounding, dtype, tuple(shape or ()), ins.depthwise)
            name, st = self._trace_kernel(key, build, [tf.TensorSpec(shape, tf_dtype)])
            return name, st, []
        # a per-channel activation format: the kernel takes x at its rank (the channel axis must
        # be known), its range one entry per channel
        rank = None if channel_axis(fmt) is None or shape is None else len(shape)
        x_spec = tf.TensorSpec(None if rank is None else [None] * rank, tf_dtype)
        if isinstance(fmt, Affine) and fmt.range is None and ins.range is not None:
            lo, hi = (np.asarray(r, np.float32) for r in ins.range)

            def build(x, lo, hi):
                return quantize(x, fmt, rounding, range=(lo, hi), seed=seed_for())
            key = ("a_args", str(fmt), rounding, dtype, rank, lo.shape)
            name, st = self._trace_kernel(
                key, build, [x_spec, tf.TensorSpec(lo.shape, tf.float32), tf.TensorSpec(hi.shape, tf.float32)]
            )
            return name, st, [lo, hi]
        if isinstance(fmt, Affine) and fmt.range is None:
            def build(x):
                # per tensor, or per channel (reduced over every other axis)
                axes = None if rank is None else [i for i in range(rank) if i != fmt.axis % rank]
                lo = tf.minimum(tf.cast(tf.reduce_min(x, axis=axes), tf.float32), 0.0)
                hi = tf.maximum(tf.cast(tf.reduce_max(x, axis=axes), tf.float32), 0.0)
                hi = tf.maximum(hi, lo + 1e-6)
                return quantize(x, fmt, rounding, range=(lo, hi), seed=seed_for())
            key = ("a_dyn", str(fmt), rounding, dtype, rank)
            name, st = self._trace_kernel(key, build, [x_spec])
            return name, st, []

        def build(x):
            return quantize(x, fmt, rounding, seed=seed_for())
        key = ("fixed", str(fmt), rounding, dtype)
        name, st = self._trace_kernel(key, build, [tf.TensorSpec(None, tf_dtype)])
        return name, st, []

    # -- insertion ---------------------------------------------------------
    def insert(self, ins: Insertion) -> str:
        """Splice one rounding into the graph; return the inserted node's name."""
        sc = self.scope(ins.scope)
        dtype = sc.out_dtype(ins.node)
        dname = _dtype_name(dtype)
        if dname not in FLOAT_DTYPES:
            where = f"function {ins.scope!r}" if ins.scope else "the graph"
            raise ValueError(f"node {ins.node!r} in {where} has dtype {dname}; only float16, bfloat16, float32 and float64 can be rounded")
        self.counter += 1
        label = _safe(ins.label or ins.node)
        base = f"graphquant/{'w' if ins.target == 'weights' else 'q'}{self.counter}_{label}"
        qname = sc.unique(base)
        src_nd = sc.by_name.get(ins.node)
        src_ref = sc.ref(src_nd, 0) if src_nd is not None else ins.node
        fmt = ins.format
        fq_range = None
        if ins.target == "activations" and isinstance(fmt, Affine) and ins.rounding == "nearest" and fmt.axis is None and fmt.bits <= 16 and dtype == types_pb2.DT_FLOAT:
            fq_range = fmt.range or ins.range
        if fq_range is not None:
            lo, hi = float(fq_range[0]), float(fq_range[1])
            if fmt.symmetric:
                m = max(abs(lo), abs(hi))
                lo, hi = -m, m
            nd = node_def_pb2.NodeDef(name=qname, op="FakeQuantWithMinMaxArgs", input=[src_ref])
            nd.attr["min"].f = lo
            nd.attr["max"].f = hi
            nd.attr["num_bits"].i = fmt.bits
            nd.attr["narrow_range"].b = fmt.narrow_range
            new = sc.add(nd)
        else:
            shape = None
            if ins.target == "activations" and channel_axis(fmt) is not None:
                shape = static_shape(sc, ins.node)
                if shape is None or not -len(shape) <= fmt.axis < len(shape):
                    raise ValueError(f"node {ins.node!r}: a per-channel format (axis={fmt.axis}) needs the tensor's "
                                     f"rank, and the graph gives its shape as {shape}")  # fmt: skip
            if ins.target == "weights":
                shape = static_shape(sc, ins.node)
                if shape is None:
                    cons_op = sc.by_name[ins.consumer].op if ins.consumer in sc.by_name else ""
                    rank = 5 if "3D" in cons_op else 2 if "MatMul" in cons_op else 4
                    shape = [None] * rank
            fname, stateful, extras = self._kernel_for(ins, dtype, shape)
            inputs = [src_ref]
            tin = [dtype]
            for k, val in enumerate(extras):
                cname = sc.unique(f"{qname}/arg{k}")
                sc.add(_const_node(cname, np.asarray(val), types_pb2.DT_FLOAT))
                inputs.append(sc.ref(sc.by_name[cname], 0))
                tin.append(types_pb2.DT_FLOAT)
            nd = node_def_pb2.NodeDef(name=qname, op="StatefulPartitionedCall" if stateful else "PartitionedCall", input=inputs)
            nd.attr["Tin"].list.type.extend(tin)
            nd.attr["Tout"].list.type.append(dtype)
            nd.attr["f"].func.name = fname
            nd.attr["config"].s = b""
            nd.attr["config_proto"].s = b""
            nd.attr["executor_type"].s = b""
            new = sc.add(nd)
        _record(new, ins, fq_range)
        new_ref = sc.ref(new, 0)
        if ins.target == "weights":
            cons = sc.by_name[ins.consumer]
            cons.input[ins.input_index] = new_ref
        else:
            sc.rewire(sc.aliases(ins.node), new_ref, skip={qname})
        ins.inserted = qname
        return qname

    def replace_const(self, scope: str, node: str, fn: Callable[[np.ndarray], np.ndarray]) -> None:
        """Replace a ``Const`` node's value by ``fn(value)`` (weights pre-rounding)."""
        sc = self.scope(scope)
        nd = sc.by_name[node]
        val = tf.make_ndarray(nd.attr["value"].tensor)
        new = np.asarray(fn(val), dtype=val.dtype)
        nd.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(new, dtype=tf.dtypes.as_dtype(nd.attr["dtype"].type)))


#: Attributes every inserted rounding node carries (strings; the leading
#: underscore makes TensorFlow accept them on any op when loading and serving).
FORMAT_ATTR = "_graphquant_format"
ROUNDING_ATTR = "_graphquant_rounding"


def recorded_format(ins: Insertion, fq_range: Optional[Tuple[float, float]] = None) -> Format:
    """The format an inserted node actually applies: an :class:`Affine` without
    its own range gets the fixed (FakeQuant) or calibrated range it was given."""
    fmt = ins.format
    rng = fq_range if fq_range is not None else (ins.range if ins.target == "activations" else None)
    if rng is not None and np.size(rng[0]) != 1:  # per channel: the range is the node's inputs, not the format's
        return fmt
    if isinstance(fmt, Affine) and fmt.range is None and rng is not None:
        return fmt.with_range((float(rng[0]), float(rng[1])))
    return fmt


def _record(nd: node_def_pb2.NodeDef, ins: Insertion, fq_range: Optional[Tuple[float, float]]) -> None:
    """Write the format (``str(fmt)``, readable by ``parse_format``) and rounding on an inserted node."""
    nd.attr[FORMAT_ATTR].s = str(recorded_format(ins, fq_range)).encode()
    nd.attr[ROUNDING_ATTR].s = str(ins.rounding).encode()


def static_shape(sc: _Scope, node: str) -> Optional[List[Optional[int]]]:
    """The static shape of output 0 of ``node`` in scope ``sc`` (a Const's, or its ``_output_shapes``), or ``None``."""
    nd = sc.by_name.get(node)
    if nd is None:
        return None
    if nd.op == "Const":
        return [d.size for d in nd.attr["value"].tensor.tensor_shape.dim]
    if "_output_shapes" in nd.attr and nd.attr["_output_shapes"].list.shape:
        s = nd.attr["_output_shapes"].list.shape[0]
        if not s.unknown_rank:
            return [d.size if d.size >= 0 else None for d in s.dim]
    return None


def _arg_name(text: str) -> str:
    """A valid function argument name (``[a-z][a-z0-9_]*``) from ``text``."""
    out = "".join(c if c.isalnum() else "_" for c in text.lower())
    return out if out[:1].isalpha() else f"arg_{out}"


def rename_functions(nd: node_def_pb2.NodeDef, mapping: Dict[str, str]) -> None:
    """Point ``nd``'s op and function-valued attributes at renamed library functions (``old -> new``)."""
    if nd.op in mapping:
        nd.op = mapping[nd.op]
    for v in nd.attr.values():
        which = v.WhichOneof("value")
        if which == "func" and v.func.name in mapping:
            v.func.name = mapping[v.func.name]
        elif which == "list":
            for f in v.list.func:
                if f.name in mapping:
                    f.name = mapping[f.name]


def _is_stateful(fdefs: Sequence[function_pb2.FunctionDef]) -> bool:
    from tensorflow.python.framework import op_def_registry

    names = {f.signature.name for f in fdefs}
    for f in fdefs:
        if f.signature.is_stateful:
            return True
        for nd in f.node_def:
            if nd.op in names or nd.op in CALL_OPS:
                if nd.op == "StatefulPartitionedCall":
                    return True
                continue
            od = op_def_registry.get(nd.op)
            if od is not None and od.is_stateful:
                return True
    return False
