"""The calibration engine: range statistics computed in TensorFlow, and the methods that read them.

One engine serves every front end (``quantize_model(calibration_data=...)``,
:func:`graphquant.calibrate`, ``convert_saved_model(calibration_data=...)``,
``quantize_function``): they only ask it for an :class:`Observer` per
calibrated point and feed the observer's TensorFlow update with the tensor at
that point, inside the model's own traced graph.

Statistics (per point, per tensor or per channel with ``axis=``), kept in
TensorFlow resource variables and updated by TensorFlow ops inside the model's
graph -- no tensor is ever copied to Python, only the final statistics
(``O(NUM_BINS)`` numbers per channel) are read once at the end. The update
takes the variables' handles as inputs and compiles with XLA (constant-size
bincounts), so it also runs inside XLA-compiled functions (Keras' grouped
convolutions), with the same statistics. Min/max, counts and the per-tensor
histogram are updated in place under the variable's lock, so two calls
running at once (a function called twice in one step) both count:

* exact running ``min`` / ``max`` of the finite values;
* the number of values seen and of non-finite values (NaN, +-inf: excluded
  from every statistic, counted, logged);
* for the histogram methods, a histogram of :data:`NUM_BINS` bins over
  ``[-2**e, 2**e]`` (bin width ``2**(e+1) / NUM_BINS``, zero is a bin edge),
  ``2**e`` the smallest power of two covering the data, bins ``[k*w, (k+1)*w)``.
  Bins at exponents ``e' < e`` nest exactly in these (``2**(e-e')`` into one), so
  one pass gives the histogram a second pass over the final range would,
  whatever the order of the batches. Per tensor, each batch is binned at its
  own exponent and added (scatter-add, race-free) to that exponent's row, whose
  last column counts the batches binned in it; only those rows are read, and
  merged. The histogram takes a sample of each batch, about
  :data:`HISTOGRAM_SAMPLE` values per example, in whole positions (every value
  of the last axis at one position: every channel is sampled alike, and the
  sample reads one run of memory per position instead of one cache line per
  value), the first of every ``stride`` positions, the stride a prime that does
  not divide the width (the next-to-last axis), so the sampled columns rotate;
  the same sample on every front end. Binning every value costs more than the
  model's own inference on CPU. Per channel the histogram takes every value and
  its exponent grows with the data (old bins merged in the graph; a
  read-modify-write, so per-channel calls of one observer must not overlap).

The calibration passes run their graph with Grappler off (:func:`call_unoptimized`): over a
few batches, optimizing the model and every call site's copy of the observer costs more
than it saves. The same ops run either way, so the statistics do not depend on it.

Methods (:data:`METHODS`), each a function of the statistics and the target format:

* ``"minmax"``: the exact min and max of the finite values seen.
* ``"percentile"``: the ``100 - p`` and ``p`` percentiles of all values seen
  (not a mean of per-batch percentiles; per tensor, of the sample), read from the histogram with linear
  interpolation inside a bin (error at most one bin width), clamped to the
  exact min/max (``p=100`` is exactly minmax).
* ``"mse"``: the range ``(a*lo, a*hi)``, ``a`` among :data:`MSE_CANDIDATES`
  scalings of the min/max range, minimising the expected squared error of
  rounding to the target format's grid over the histogram: clipping error of
  every bin (at its centre) plus ``step**2 / 12`` for every value inside the
  range.
* ``"entropy"``: TensorRT's KL-divergence calibration: over the histogram of
  ``|x|`` (or of ``x`` for one-signed data), the threshold ``t`` minimising
  ``KL(P || Q)`` where ``P`` is the histogram clipped at ``t`` (the outliers
  added to its last bin) and ``Q`` is ``P`` quantized to the format's levels
  (``2**(bits-1)`` per side for two-signed data, ``2**bits`` for one-signed)
  and expanded back over ``P``'s non-empty bins; the range is ``(-t, t)``
  intersected with ``[min, max]`` (``(0, t)`` for non-negative data).

Every method then goes through :func:`range_of`'s rules: the range includes
zero, is at least :data:`MIN_RANGE_WIDTH` wide, and a point
that saw no finite value is an error naming it.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "MIN_RANGE_WIDTH", "METHODS", "NUM_BINS", "MSE_CANDIDATES", "Observer", "PointStats", "check_method", "range_of", "ranges_of",
    "percentile_range", "mse_range", "entropy_range", "array_range", "HISTOGRAM_SAMPLE",
]  # fmt: skip

#: the narrowest calibrated range: a narrower one (e.g. all-zero data) is widened to this width,
#: on every path (Keras layers, graphs, in-graph dynamic ranges use the same 1e-6)
MIN_RANGE_WIDTH = 1e-6

log = logging.getLogger(__name__)

#: the calibration methods, by name
METHODS = ("minmax", "percentile", "mse", "entropy")

#: histogram bins per point (per channel), over ``[-2**e, 2**e]``: 1024 on each side of zero
NUM_BINS = 2048
_HALF = NUM_BINS // 2
_LOG2_HALF = int(math.log2(_HALF))

#: the ``"mse"`` search: ranges ``a * (lo, hi)`` for ``a`` in ``1/MSE_CANDIDATES, 2/MSE_CANDIDATES, ..., 1``
MSE_CANDIDATES = 200

#: smallest histogram exponent: data below ``2**_E_MIN`` in magnitude all falls in the two central bins
_E_MIN = -64
#: largest: every finite float32 is below ``2**128`` in magnitude
_E_MAX = 128

#: per-tensor histograms take about this many values per example of a batch: a sample of
#: whole positions (all channels of one position), one in every ``stride`` positions, the
#: stride the first prime ``>= ceil(values per example / HISTOGRAM_SAMPLE)`` that does not
#: divide the width (the next-to-last axis); min, max and counts always see every value
HISTOGRAM_SAMPLE = 1 << 12


def _primes_below(n: int) -> list:
    sieve = np.ones(n, bool)
    sieve[:2] = False
    for p in range(2, int(n**0.5) + 1):
        if sieve[p]:
            sieve[p * p::p] = False
    return np.flatnonzero(sieve).tolist()


#: candidate strides: examples up to about ``2**16 * HISTOGRAM_SAMPLE`` values get a prime stride
_PRIMES = _primes_below(1 << 16)

_counter = itertools.count()

#: the shared name TensorFlow reserves for anonymous resources (``ResourceHandle::ANONYMOUS_NAME``):
#: a VarHandleOp run eagerly with it makes a new variable, owned by the handle it returns
_ANONYMOUS = "cd2c89b7-88b7-44c8-ad83-06c2a9158347"


def no_grappler_config() -> bytes:
    """A serialized ``ConfigProto`` with Grappler off: the ``config_proto`` of observer function calls
    and of the calibration passes (:func:`call_unoptimized`)."""
    from tensorflow.core.protobuf import config_pb2

    cfg = config_pb2.ConfigProto()
    cfg.graph_options.rewrite_options.disable_meta_optimizer = True
    return cfg.SerializeToString()


def call_unoptimized(fn: Any, *args: Any, **kwargs: Any) -> list:
    """Run the concrete function ``fn`` on ``args``/``kwargs`` with Grappler off; its flat outputs.

    A calibration pass runs its graph over a few batches, where Grappler's optimization of the
    whole model with its observers costs more than it saves: on MobileNetV2 (52 points, 8
    batches) it was most of the pass's first call, and the steady time per batch is the same
    without it. The statistics do not depend on it (the same ops run, unfused). Falls back to a
    plain call where the flat inputs do not match ``fn``'s.
    """
    import tensorflow as tf

    flat = [tf.convert_to_tensor(t) for t in tf.nest.flatten((args, kwargs), expand_composites=True)]
    captured = list(fn.captured_inputs)
    params = fn.inputs[: len(fn.inputs) - len(captured)]
    if len(flat) != len(params) or any(t.dtype != p.dtype or not p.shape.is_compatible_with(t.shape)
                                       for t, p in zip(flat, params)):  # fmt: skip
        out = fn(*args, **kwargs)
        return tf.nest.flatten(out, expand_composites=True)
    fn.add_to_graph()
    try:  # internal: the function run as itself (what calling it does), with Grappler off
        from tensorflow.python.eager import context, execute  # noqa: PLC0415
    except ImportError:  # pragma: no cover - a TensorFlow without the module: the same call, wrapped
        return tf.raw_ops.StatefulPartitionedCall(args=flat + captured, Tout=[t.dtype for t in fn.outputs], f=fn,
                                                  config_proto=no_grappler_config())  # fmt: skip
    # (an eager StatefulPartitionedCall op is run inside a function of its own: one more
    # instantiation at the first call, whose graph passes walk the model and every observer
    # body again, and one more function run per batch)
    name = fn.name.decode() if isinstance(fn.name, bytes) else fn.name
    return execute.execute(name, num_outputs=len(fn.outputs), inputs=flat + captured,
                           attrs=("executor_type", "", "config_proto", no_grappler_config()), ctx=context.context())


def check_method(method: Any, percentile: Any = 99.99, what: str = "calibration_method",
                 percentile_name: str = "percentile") -> None:  # fmt: skip
    """Raise ``ValueError`` for an unknown method name or a bad percentile."""
    if method not in METHODS:
        names = ", ".join(repr(m) for m in METHODS)
        raise ValueError(f"{what} must be one of {names}, got {method!r}")
    if method == "percentile" and (
        isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 50.0 < float(percentile) <= 100.0
    ):
        raise ValueError(f"{percentile_name} must be in (50, 100], got {percentile!r}")


# --------------------------------------------------------------------------- TensorFlow side
class _Constants:
    """The constants of one traced body, each made once (``k(value, dtype)``). Every call site of an
    observer instantiates its body, twice more in XLA's graph passes that look for reference
    variables: each node fewer is saved at every one (TensorFlow's wrappers make a constant per use)."""

    def __init__(self) -> None:
        self._made: Dict[Any, Any] = {}

    def __call__(self, value: Any, dtype: Any = "int32") -> Any:
        import tensorflow as tf

        dtype = tf.as_dtype(dtype)
        a = np.asarray(value, dtype.as_numpy_dtype)
        key = (dtype, a.shape, a.tobytes())
        t = self._made.get(key)
        if t is None:
            t = self._made[key] = tf.constant(a, dtype)
        return t


def _plain(value: Any, dtype: Any = "int32") -> Any:
    """A new constant at every use: :class:`_Constants`' stand-in outside a body written for few nodes."""
    import tensorflow as tf

    return tf.constant(value, dtype)


def _pow2(e: Any, k: Any = _plain) -> Any:
    """``2.0 ** e`` (float32, exact) for int32 ``e`` in ``[-126, 127]``, built from the exponent bits
    (``k``: a :class:`_Constants` for the constants)."""
    import tensorflow as tf

    return tf.bitcast(tf.bitwise.left_shift(e + k(127), k(23)), tf.float32)


def _ceil_log2(m: Any, k: Any = _plain) -> Any:
    """``ceil(log2(m))`` (int32, exact) for finite float32 ``m >= 0``, clamped to ``[_E_MIN, _E_MAX]``."""
    import tensorflow as tf

    # adding a mantissa of all ones carries into the exponent unless the mantissa is zero
    # (m a power of two); zero and subnormals come out at -127 or -126, below _E_MIN
    e = tf.bitwise.right_shift(tf.bitcast(m, tf.int32) + k(0x7FFFFF), k(23)) - k(127)
    return tf.maximum(tf.minimum(e, k(_E_MAX)), k(_E_MIN))


class Observer:
    """The running statistics of one calibrated point, kept in TensorFlow resource variables.

    :meth:`update` runs eagerly or traced in a ``tf.function`` (the Keras front end: the
    function captures the variables' handles). With ``shared=True`` the variables
    also have process-unique shared names, so a graph can refer to them by name: the
    update as a library function (:meth:`function_def`) spliced into an imported or
    loaded graph (the graph front ends) updates the same state. Only :meth:`stats`
    reads them back (once, at the end).

    Args:
        point: the point's name (used in errors and logs).
        axis: channel axis for per-channel statistics, or ``None``.
        channels: the size of that axis (1 per tensor).
        histogram: keep a histogram (needed by every method but ``"minmax"``).
        shared: name the variables (:meth:`shared_name`), created at the first :meth:`initialise`,
            :meth:`rebind`, :meth:`update` or :meth:`stats`; otherwise they are anonymous (cheaper
            to create) and created now.
    """

    def __init__(self, point: str, axis: Optional[int] = None, channels: int = 1, histogram: bool = True,
                 shared: bool = False):  # fmt: skip
        import tensorflow as tf

        self.point = point
        self.axis = axis
        self.channels = int(channels) if axis is not None else 1
        self.histogram = bool(histogram)
        self.shared = bool(shared)
        self._prefix = f"graphquant_calibration_{os.getpid()}_{next(_counter)}"
        c = self.channels
        if axis is None:  # per tensor: one table (see _table_shape), one variable to create, name and pass
            self._specs = {"table": (tf.int64, list(_table_shape(self.histogram)))}
        else:
            self._specs = {
                "minmax": (tf.float32, [2, c]),
                "counts": (tf.int64, [2, c]),  # values seen, non-finite values
            }
            if self.histogram:
                self._specs["exp"] = (tf.int32, [c])
                self._specs["hist"] = (tf.int64, [c, NUM_BINS])
        self._suffix = ""
        self._handles: Dict[str, Any] = {}
        if not self.shared:
            self._initialise()

    @property
    def prefix(self) -> str:
        """The shared-name prefix of this observer's variables."""
        return self._prefix

    def _initialise(self) -> None:
        """Create the variables with their initial values; keep their (eager) handles."""
        import tensorflow as tf

        # an anonymous variable lives as long as its handle; a named one (``shared``) until released.
        # (Eagerly, a VarHandleOp with a new shared name costs 0.5 ms: TensorFlow instantiates a
        # kernel for each new attribute value. An anonymous one reuses one kernel: 0.03 ms.)
        with tf.init_scope():  # eagerly, also when first asked for while a function is traced
            for k, (dtype, shape) in self._specs.items():
                name = self.shared_name(k) if self.shared else _ANONYMOUS
                h = tf.raw_ops.VarHandleOp(dtype=dtype, shape=shape, shared_name=name, container="")
                tf.raw_ops.AssignVariableOp(resource=h, value=_initial_value(k, self.channels, self.histogram))
                self._handles[k] = h

    def initialise(self) -> None:
        """Create a ``shared`` observer's variables under their :meth:`shared_name` (done at the first
        :meth:`update`, :meth:`stats` or :meth:`rebind`): before a graph that refers to them by name runs."""
        if not self._handles:
            self._initialise()

    def rebind(self, suffix: str) -> None:
        """Use the variables named with ``suffix`` appended (what ``tf.saved_model.load`` does to
        the shared names in the functions it loads); they are initialised now."""
        self._require_shared("rebind")
        if suffix != self._suffix or not self._handles:
            self.release()
            self._suffix = suffix
            self._initialise()

    def _require_shared(self, what: str) -> None:
        if not self.shared:
            raise ValueError(f"{self.point!r}: {what} needs an observer made with shared=True "
                             f"(its variables have no name a graph can refer to)")  # fmt: skip

    def _handle(self, key: str) -> Any:
        """The (eager) handle of variable ``key`` (creating a ``shared`` observer's variables first)."""
        self.initialise()
        return self._handles[key]

    def _read(self, key: str) -> Any:
        import tensorflow as tf

        return tf.raw_ops.ReadVariableOp(resource=self._handle(key), dtype=self._specs[key][0])

    def shared_name(self, key: str) -> str:
        """The shared name of variable ``key`` (as the current graph sees it; ``shared`` observers only)."""
        self._require_shared("a shared name")
        return f"{self._prefix}/{key}{self._suffix}"

    def variable_specs(self) -> Dict[str, Tuple[Any, Any]]:
        """``{key: (dtype, shape)}`` of the variables, in :attr:`keys` order."""
        return dict(self._specs)

    @property
    def samples(self) -> bool:
        """Whether the update reads its ``sample`` argument (a per-tensor histogram; see :func:`sample_spec`)."""
        return self.histogram and self.axis is None

    @property
    def keys(self) -> Tuple[str, ...]:
        """The observer's variables, in the order :meth:`function_def`'s function takes their handles."""
        return tuple(self._specs)

    def _generic(self, dtype: Any, rank: Optional[int] = None, xla: bool = False) -> Any:
        """The update as a ``tf.function(x, *handles) -> x``, shared by every observer of the same kind
        (``xla``: the variant XLA compiles, see :meth:`update`)."""
        import tensorflow as tf

        rank = rank if self.axis is not None else None
        key = (tf.as_dtype(dtype), self.axis, self.channels, self.histogram, rank, bool(xla))
        fn = _GENERIC.get(key)
        if fn is None:
            specs = dict(self._specs)

            def update(x, sample, *handles):
                return _update_ops(x, sample, dict(zip(specs, handles)), specs, self.axis, self.channels,
                                   self.histogram, self.point, xla)  # fmt: skip

            fn = tf.function(update, autograph=False, experimental_attributes={"_noinline": True}).get_concrete_function(
                tf.TensorSpec(None if rank is None else [None] * rank, key[0]),
                tf.TensorSpec([2], tf.int32),
                *[tf.TensorSpec([], tf.resource) for _ in specs],
            )
            _GENERIC[key] = fn
        return fn

    def update(self, x: Any, xla: bool = False) -> Any:
        """Fold ``x`` into the statistics; returns ``x``.

        Pure TensorFlow ops (reductions, a bincount) in one library function shared by
        the observers of the same kind: traceable in any graph. ``xla=True`` where XLA will
        compile the caller: the update then skips its masked pass with a ``tf.cond`` (what XLA
        compiles) instead of a Switch/Merge pair (cheaper to instantiate, not compilable).

        Traced, the update is a side effect of the function being traced (``tf.function`` runs
        every stateful op before it returns): what is returned is ``x`` itself, not the call's
        output, so the rest of the model does not wait for the update and runs beside it (on
        MobileNetV2, 52 points, 7 % less per batch). Under XLA (``xla=True``) the call's output
        is returned, as before.
        """
        import tensorflow as tf

        x = tf.convert_to_tensor(x)
        if self.axis is not None and x.shape.rank is not None:
            n = x.shape[self.axis % x.shape.rank]
            if n is not None and n != self.channels:
                raise ValueError(f"{self.point!r}: axis {self.axis} has {n} channels, the observer {self.channels}")
        fn = self._generic(x.dtype, x.shape.rank, xla)
        fn.add_to_graph()
        sample = sample_spec(x) if self.samples else tf.constant([1, 1])
        args = [x, sample] + [self._handle(k) for k in self._specs]
        if tf.executing_eagerly():
            (out,) = tf.raw_ops.StatefulPartitionedCall(args=args, Tout=[x.dtype], f=fn, config_proto=no_grappler_config())
            return out
        out = _call_without_shape_inference(fn, args, x)
        return out if xla else x

    def function_def(self, dtype: Any, xla: bool = False, rank: Optional[int] = None) -> Tuple[str, list]:
        """``(name, FunctionDefs)``: the library function ``(x, sample, *handles) -> x`` that updates
        the statistics (``sample``: :func:`sample_spec` of ``x``; handles of :attr:`keys`'
        variables, by :meth:`shared_name`), for splicing into a graph (``xla``: into a body XLA
        compiles, see :meth:`update`; ``rank``: the rank of ``x``, which a per-channel observer
        needs); the first FunctionDef is the function itself."""
        return function_defs(self._generic(dtype, rank, xla))

    def stats(self) -> "PointStats":
        """The statistics so far, as numpy arrays."""
        import tensorflow as tf

        hist = exp = None
        if "table" in self._specs:
            r = _counts_row(self.histogram)
            table = self._handle("table")
            tail = tf.raw_ops.ResourceGather(resource=table, indices=[r, r + 1, r + 2], dtype=tf.int64).numpy()
            mm = _from_order_key(tail[1:, :1] * [[1], [-1]]).astype(np.float64)  # (the max's key is kept negated)
            if self.histogram:
                m = max(abs(mm[0, 0]), abs(mm[1, 0]))
                e = _E_MIN if not np.isfinite(m) or m == 0 else min(max(math.ceil(math.log2(m)), _E_MIN), _E_MAX)
                e = e + 1 if 2.0**e < m else e  # guard log2 rounding
                hist, exp = _merge_rows(*_used_rows(table), e)[None, :], np.array([e])
            return PointStats(self.point, mm[0], mm[1], int(tail[0, 0]), int(tail[0, 1]), hist, exp, None)
        mm = self._read("minmax").numpy().astype(np.float64)
        counts = self._read("counts").numpy()
        if self.histogram:
            hist = self._read("hist").numpy()
            exp = self._read("exp").numpy()
        return PointStats(self.point, mm[0], mm[1], int(counts[0].sum()), int(counts[1].sum()), hist, exp,
                          self.axis)  # fmt: skip

    def release(self) -> None:
        """Free the variables (an anonymous one once no traced function holds its handle either)."""
        import tensorflow as tf

        handles, self._handles = self._handles, {}
        if not self.shared:
            return
        for h in handles.values():
            try:
                tf.raw_ops.DestroyResourceOp(resource=h, ignore_lookup_error=True)
            except Exception:  # pragma: no cover - best effort
                pass


_GENERIC: Dict[Any, Any] = {}


def _call_without_shape_inference(fn: Any, args: list, x: Any) -> Any:
    """``fn(*args)`` (returning ``x``'s value) as a StatefulPartitionedCall node of the current graph,
    Grappler off, that the graph's shape refiner does not descend into (what inferring the shapes
    through the observer's body cost at every call site: 2 ms each, most of the time the
    observers added to tracing a model); its output has ``x``'s static shape."""
    import tensorflow as tf
    from tensorflow.core.framework import attr_value_pb2

    types = attr_value_pb2.AttrValue.ListValue
    attrs = {
        "Tin": attr_value_pb2.AttrValue(list=types(type=[a.dtype.as_datatype_enum for a in args])),
        "Tout": attr_value_pb2.AttrValue(list=types(type=[x.dtype.as_datatype_enum])),
        "f": attr_value_pb2.AttrValue(func=attr_value_pb2.NameAttrList(name=fn.name)),
        "config_proto": attr_value_pb2.AttrValue(s=no_grappler_config()),
        "executor_type": attr_value_pb2.AttrValue(s=b""),
        NO_CALL_SHAPE_INFERENCE: attr_value_pb2.AttrValue(b=True),
    }
    op = tf.compat.v1.get_default_graph().create_op("StatefulPartitionedCall", args, [x.dtype],
                                                    name="StatefulPartitionedCall", attrs=attrs)  # fmt: skip
    out = op.outputs[0]
    out.set_shape(x.shape)
    return out


#: the node attribute that keeps TensorFlow's shape refiner out of a function call's body
NO_CALL_SHAPE_INFERENCE = "_disable_call_shape_inference"


def function_defs(cf: Any) -> Tuple[str, list]:
    """``(name, FunctionDefs)`` of the concrete function ``cf``, itself first, for splicing into a
    graph (it must capture nothing: spliced, it takes every input as an argument)."""
    if cf.graph.captures:
        raise ValueError(f"internal: {cf.name} captured a tensor")
    name = cf.function_def.signature.name
    lib = [f for f in cf.graph.as_graph_def().library.function if f.signature.name != name]
    return name, [cf.function_def] + lib


def sample_spec(x: Any) -> Any:
    """``[stride, channels]`` (int32) of the per-tensor histogram's sample of ``x`` (see
    :data:`HISTOGRAM_SAMPLE`): a constant where ``x``'s shape past the batch is known (the
    observer's body then holds no shape arithmetic: every call site instantiates the body,
    and its size was most of what the observers added to a model's first call), else
    computed from ``tf.shape(x)`` by the same rule (:func:`_sample_spec_ops`)."""
    import tensorflow as tf

    static = static_sample_spec(x.shape)
    if static is not None:
        return tf.constant(static, tf.int32)
    return _sample_spec_ops(tf.shape(x))


def static_sample_spec(shape: Any) -> Optional[Tuple[int, int]]:
    """:func:`sample_spec` of a tensor of static shape ``shape`` (a ``TensorShape`` or a list, the
    batch may be unknown), or ``None`` where it depends on unknown sizes."""
    import tensorflow as tf

    shape = tf.TensorShape(shape)
    if shape.rank is None:
        return None
    dims = shape.as_list()
    if not dims:
        return (1, 1)
    if any(d is None for d in dims[1:]):
        return None
    want = (int(np.prod(dims[1:], dtype=np.int64)) + HISTOGRAM_SAMPLE - 1) // HISTOGRAM_SAMPLE
    if want <= 1:
        return (1, 1)
    width = dims[-2] if len(dims) >= 2 else 1
    if width is None:
        return None
    width = max(width, 1)
    stride = next((p for p in _PRIMES if p >= want and width % p != 0), want)
    return (int(stride), max(dims[-1], 1))


def _sample_spec_ops(shape: Any) -> Any:
    """:func:`sample_spec` computed in TensorFlow from the shape tensor ``shape``: the stride is the first
    prime ``>= ceil(values per example / HISTOGRAM_SAMPLE)`` that does not divide the width (the
    next-to-last axis), the channels the size of the last axis (1 when the stride is 1)."""
    import tensorflow as tf

    batch = tf.maximum(tf.reduce_prod(shape[:1]), 1)  # 1 for a scalar
    channels = tf.maximum(tf.reduce_prod(shape[-1:]), 1)
    width = tf.maximum(tf.reduce_prod(shape[-2:-1]), 1)
    want = (tf.reduce_prod(shape) // batch + HISTOGRAM_SAMPLE - 1) // HISTOGRAM_SAMPLE
    primes = tf.constant(_PRIMES, tf.int32)
    ok = (primes >= want) & (tf.math.floormod(width, primes) != 0)
    prime = tf.gather(primes, tf.argmax(tf.cast(ok, tf.int32), output_type=tf.int32))
    stride = tf.where(want <= 1, 1, tf.where(tf.reduce_any(ok), prime, want))
    return tf.stack([stride, tf.where(stride == 1, 1, channels)])


def sample_spec_function_def(dtype: Any) -> Tuple[str, list]:
    """``(name, FunctionDefs)`` of the library function ``x -> sample_spec(x)`` (int32 ``[2]``),
    for splicing where a graph does not tell ``x``'s shape."""
    import tensorflow as tf

    key = ("sample_spec", tf.as_dtype(dtype))
    fn = _GENERIC.get(key)
    if fn is None:
        fn = _GENERIC[key] = tf.function(lambda x: _sample_spec_ops(tf.shape(x)), autograph=False).get_concrete_function(
            tf.TensorSpec(None, dtype))
    return function_defs(fn)


_INITIAL: Dict[Any, Any] = {}


def _table_shape(histogram: bool) -> Tuple[int, int]:
    """Shape of a per-tensor observer's table (int64): with a histogram, a row per batch exponent
    ``r + _E_MIN`` (:data:`NUM_BINS` bins, the count of the value ``2**e`` itself, the number of
    batches binned in the row); then a row of counts (values seen, non-finite values), a row holding
    the minimum's :func:`_order_key` and one holding the maximum's, negated (both kept by one
    scatter-min of whole rows, every column alike)."""
    if histogram:
        return _E_MAX - _E_MIN + 1 + 3, NUM_BINS + 2
    return 3, 2


def _counts_row(histogram: bool) -> int:
    """The row of the counts in :func:`_table_shape`'s table; the min's and the (negated) max's follow it."""
    return _table_shape(histogram)[0] - 3


def _order_key(f: Any, k: Any = _plain) -> Any:
    """int64 keys of float32 ``f`` in the floats' order (``-0.0`` just below ``0.0``): the bits, with
    the magnitude bits of negative numbers inverted. Exact and invertible (:func:`_from_order_key`)."""
    import tensorflow as tf

    i = tf.bitcast(f, tf.int32)
    return tf.cast(tf.bitwise.bitwise_xor(i, tf.bitwise.bitwise_and(tf.bitwise.right_shift(i, k(31)), k(0x7FFFFFFF))),
                   tf.int64)  # fmt: skip


def _from_order_key(k: np.ndarray) -> np.ndarray:
    """The float32 values of :func:`_order_key` keys ``k``."""
    i = np.asarray(k).astype(np.int32)
    return np.where(i < 0, i ^ np.int32(0x7FFFFFFF), i).astype(np.int32).view(np.float32)


def _initial_value(key: str, c: int, histogram: bool = True) -> Any:
    """The initial value of an observer's variable ``key`` with ``c`` channels (one tensor per
    kind, shared: a variable that is updated copies it first, as TensorFlow does for any
    buffer it does not own alone)."""
    import tensorflow as tf

    def table():
        rows, width = _table_shape(histogram)
        t = np.zeros([rows, width], np.int64)
        inf = np.array([np.inf, -np.inf], np.float32).view(np.int32).astype(np.int64)
        t[-2], t[-1] = inf[0], 1 + (inf[1] & 0x7FFFFFFF)  # the key of +inf (min), minus the key of -inf (max)
        return t

    t = _INITIAL.get((key, c, histogram))
    if t is None:
        value = {
            "table": table,
            "minmax": lambda: np.stack([np.full(c, np.inf, np.float32), np.full(c, -np.inf, np.float32)]),
            "counts": lambda: np.zeros([2, c], np.int64),
            "exp": lambda: np.full(c, _E_MIN, np.int32),
            "hist": lambda: np.zeros([c, NUM_BINS], np.int64),
        }[key]()
        t = _INITIAL[(key, c, histogram)] = tf.constant(value)
    return t


def _update_ops(x: Any, sample: Any, handles: Dict[str, Any], specs: Dict[str, Any], axis: Optional[int], c: int,
                histogram: bool, point: str, xla: bool = False) -> Any:  # fmt: skip
    import tensorflow as tf

    with tf.name_scope("graphquant_observe"):
        if axis is None:
            _update_table(x, sample, handles["table"], histogram, xla)
        else:
            _update_channels(x, handles, specs, axis, c, histogram, point, xla)
        # not gated on the updates: the model goes on while they run (the function's
        # stateful ops still all run before the call returns)
        return tf.identity(x)


def _finite_or_masked(all_finite: Any, plain: Tuple[Any, ...], masked: Any, v: Any, xla: bool) -> list:
    """``plain`` where ``all_finite`` (min, max from plain reductions, which propagate NaN: when both
    are finite every value is), else ``masked(v)`` (several passes over ``v``, skipped otherwise).
    ``xla``: a ``tf.cond`` (what XLA compiles); else a Switch/Merge pair, cheaper to instantiate (a
    ``tf.cond``'s two branch functions are instantiated at every call site at the model's first call:
    on MobileNetV2's 52 points that was most of what the observers added to it)."""
    import tensorflow as tf

    if xla:
        return list(tf.cond(all_finite, lambda: plain, lambda: masked(v)))
    v_bad, _ = tf.raw_ops.Switch(data=v, pred=all_finite)
    ok = [tf.raw_ops.Switch(data=t, pred=all_finite)[1] for t in plain]
    return [tf.raw_ops.Merge(inputs=[a, b]).output for a, b in zip(masked(v_bad), ok)]


def _update_table(x: Any, sample: Any, table: Any, histogram: bool, xla: bool) -> None:
    """The per-tensor update of ``table`` (:func:`_table_shape`) by ``x``: min, max and counts, and with
    a histogram the sample of ``x`` binned at this batch's own exponent. In-place updates that lock the
    variable (scatter-min, scatter-add), not read-then-assign: two calls running at once (a function
    called twice in one step) both count. Written for few graph nodes (:class:`_Constants`)."""
    import tensorflow as tf

    k = _Constants()
    r, width = _counts_row(histogram), _table_shape(histogram)[1]
    v = tf.reshape(tf.cast(x, tf.float32), k([-1]))
    seen = tf.size(v, out_type=tf.int64)
    fmin, fmax = tf.raw_ops.Min(input=v, axis=k(0)), tf.raw_ops.Max(input=v, axis=k(0))  # full reductions
    all_finite = tf.logical_and(tf.math.is_finite(fmin), tf.math.is_finite(fmax))

    def masked(v):
        finite = tf.math.is_finite(v)
        return (
            tf.raw_ops.Min(input=tf.where(finite, v, k(np.inf, tf.float32)), axis=k(0)),
            tf.raw_ops.Max(input=tf.where(finite, v, k(-np.inf, tf.float32)), axis=k(0)),
            tf.raw_ops.Sum(input=tf.cast(tf.logical_not(finite), tf.int64), axis=k(0)),
        )

    bmin, bmax, nonfinite = _finite_or_masked(all_finite, (fmin, fmax, k(0, tf.int64)), masked, v, xla)
    # the min's key and the max's key negated, each broadcast over its whole row: one scatter-min
    keys = tf.reshape(_order_key(tf.stack([bmin, bmax]), k) * k([1, -1], tf.int64), k([2, 1]))
    tf.raw_ops.ResourceScatterMin(resource=table, indices=k([r + 1, r + 2]),
                                  updates=tf.broadcast_to(keys, k([2, width])))  # fmt: skip
    counts = tf.pad(tf.reshape(tf.stack([seen, nonfinite]), k([1, 2])), k([[0, 0], [0, width - 2]]))
    if not histogram:
        tf.raw_ops.ResourceScatterAdd(resource=table, indices=k([r]), updates=counts)
        return
    # a sample (HISTOGRAM_SAMPLE), binned at this batch's own exponent and added to that
    # exponent's row (a scatter-add: concurrent calls both count); the rows are merged
    # into the final range's bins when read (exact, powers of two)
    # (where XLA compiles the update, the spec comes from x's shape, which XLA folds: passed in
    # as an argument, one of two calls of a nested XLA function lost its updates)
    h = _sample(v, _sample_spec_ops(tf.shape(x)) if xla else sample, k)
    m = tf.maximum(-bmin, bmax)  # max(|min|, |max|), as min <= max; -inf where no finite value
    e = _ceil_log2(tf.where(tf.math.is_finite(m), m, k(0.0, tf.float32)), k)
    scale = _pow2(k(_LOG2_HALF) - e, k)
    if xla:
        index = _tensor_bin_index(h, scale, False, k)
    else:  # the masked binning only for a batch with a non-finite value (Switch/Merge, as above)
        h_bad, h_ok = tf.raw_ops.Switch(data=h, pred=all_finite)
        index = tf.raw_ops.Merge(inputs=[_tensor_bin_index(h_bad, scale, False, k),
                                         _tensor_bin_index(h_ok, scale, True, k)]).output  # fmt: skip
    row = tf.concat([_bincount(index, NUM_BINS + 1, k), k([1], tf.int64)], k(0))  # + this batch
    # one scatter-add: the exponent's row and the counts' row
    tf.raw_ops.ResourceScatterAdd(resource=table, indices=tf.stack([e - k(_E_MIN), k(r)]),
                                  updates=tf.concat([tf.reshape(row, k([1, width])), counts], k(0)))  # fmt: skip


def _update_channels(x: Any, handles: Dict[str, Any], specs: Dict[str, Any], axis: int, c: int, histogram: bool,
                     point: str, xla: bool) -> None:  # fmt: skip
    """The per-channel update (variables minmax, counts, exp, hist; see :class:`Observer`)."""
    import tensorflow as tf

    def read(key):
        return tf.raw_ops.ReadVariableOp(resource=handles[key], dtype=specs[key][0])

    def assign(key, value):
        return tf.raw_ops.AssignVariableOp(resource=handles[key], value=value)

    v = tf.cast(x, tf.float32)
    rank = v.shape.rank
    if rank is None:
        raise ValueError(f"{point}: per-channel calibration needs a tensor of known rank")
    ax = axis % rank
    if ax != rank - 1:
        v = tf.transpose(v, [i for i in range(rank) if i != ax] + [ax])
    v = tf.reshape(v, [-1, c])
    seen = tf.fill([c], tf.size(v, out_type=tf.int64) // c)
    fmin, fmax = tf.reduce_min(v, axis=0), tf.reduce_max(v, axis=0)
    all_finite = tf.reduce_all(tf.math.is_finite(fmin) & tf.math.is_finite(fmax))

    def masked(v):
        finite = tf.math.is_finite(v)
        return (
            tf.reduce_min(tf.where(finite, v, np.inf), axis=0),
            tf.reduce_max(tf.where(finite, v, -np.inf), axis=0),
            tf.reduce_sum(tf.cast(tf.logical_not(finite), tf.int64), axis=0),
        )

    bmin, bmax, nonfinite = _finite_or_masked(all_finite, (fmin, fmax, tf.constant([0] * c, tf.int64)), masked, v, xla)
    # in-place updates that lock the variable (scatter min/max, assign-add), not read-then-assign
    row = tf.constant([1, c])
    tf.raw_ops.ResourceScatterMin(resource=handles["minmax"], indices=tf.constant([0]), updates=tf.reshape(bmin, row))
    tf.raw_ops.ResourceScatterMax(resource=handles["minmax"], indices=tf.constant([1]), updates=tf.reshape(bmax, row))
    tf.raw_ops.AssignAddVariableOp(resource=handles["counts"], value=tf.stack([seen, nonfinite]))
    if histogram:
        # (re-binning as the range grows is a read-modify-write: per-channel calls must not overlap)
        mm = read("minmax")
        lo, hi = tf.minimum(mm[0], bmin), tf.maximum(mm[1], bmax)
        _update_histogram(v, lo, hi, c, read, assign)


def _sample(flat: Any, spec: Any, k: Any = _plain) -> Any:
    """The per-tensor histogram's sample of the flattened tensor ``flat`` (``spec``: its
    :func:`sample_spec`): whole positions (``channels`` values, contiguous in memory), the first
    of each complete group of ``stride`` positions (the stride at most the number of positions;
    every value when it is 1). A reshape and a slice: one run of memory per position (a strided
    slice of single values touches a cache line per value, as costly as reading the whole tensor)."""
    import tensorflow as tf

    stride, channels = tf.unstack(spec)
    positions = tf.size(flat) // channels
    stride = tf.minimum(stride, tf.maximum(positions, k(1)))
    rows = positions // stride
    run = stride * channels
    grouped = tf.reshape(tf.slice(flat, k([0]), tf.reshape(rows * run, k([1]))), tf.stack([rows, run]))
    return tf.reshape(tf.slice(grouped, k([0, 0]), tf.stack([rows, channels])), k([-1]))


def _tensor_bin_index(h: Any, scale: Any, finite: bool, k: Any = _plain) -> Any:
    """Bin of each value of the 1-D sample ``h`` over ``[-2**e, 2**e]`` (``|h| <= 2**e``, ``scale``
    the scalar ``2**(log2(half) - e)``): ``floor(h * scale) + half``, exact (a power-of-two
    scaling and integers); the value ``2**e`` itself gets index ``NUM_BINS`` (folded into the
    last bin when read). ``finite=False``: non-finite values get ``NUM_BINS + 1`` (dropped by
    the bincount)."""
    import tensorflow as tf

    half = k(float(_HALF), tf.float32)
    if finite:
        return tf.cast(tf.floor(h * scale) + half, tf.int32)
    ok = tf.math.is_finite(h)
    b = tf.cast(tf.floor(tf.where(ok, h, k(0.0, tf.float32)) * scale) + half, tf.int32)
    return tf.where(ok, b, k(NUM_BINS + 1))


def _bincount(arr: Any, size: int, k: Any = _plain) -> Any:
    """Counts (int64) of the int32 values ``0 .. size - 1`` in 1-D ``arr``; other values are dropped.

    ``Bincount`` with a constant ``size``: what XLA compiles too (the observer may run inside
    an XLA-compiled function), unlike ``tf.math.bincount``'s size computed from the data.
    """
    import tensorflow as tf

    return tf.raw_ops.Bincount(arr=arr, size=k(size), weights=k(np.zeros(0), tf.int64))


def _bin_index(v: Any, e: Any) -> Any:
    """Bin of each value of ``v`` over ``[-2**e, 2**e]``: ``floor(v * 2**(log2(half) - e)) + half``
    (exact: a power-of-two scaling), clipped to the histogram; non-finite values get index
    ``NUM_BINS * channels`` (dropped by the bincount). ``v`` is ``[n]`` with scalar ``e`` or
    ``[n, c]`` with ``e`` per channel (the index then counts ``channel * NUM_BINS`` in)."""
    import tensorflow as tf

    b = tf.cast(tf.floor(v * _pow2(_LOG2_HALF - e)), tf.int32) + _HALF
    b = tf.clip_by_value(b, 0, NUM_BINS - 1)
    c = 1
    if v.shape.rank == 2:
        c = v.shape[1]
        b = b + tf.range(c, dtype=tf.int32)[None, :] * NUM_BINS
    return tf.reshape(tf.where(tf.math.is_finite(v), b, c * NUM_BINS), [-1])


def _update_histogram(v: Any, lo: Any, hi: Any, c: int, read: Any, assign: Any) -> list:
    import tensorflow as tf

    m = tf.maximum(tf.abs(lo), tf.abs(hi))
    m = tf.where(tf.math.is_finite(m), m, 0.0)  # a channel without a finite value yet
    e_old = read("exp")
    e_new = tf.maximum(e_old, _ceil_log2(m))
    # merge the old bins 2**d into one (exact: old edges are multiples of the new bin width);
    # beyond 2**(log2(half)) every old bin lands in one of the two central bins anyway
    d = tf.minimum(e_new - e_old, _LOG2_HALF)
    k = tf.bitwise.left_shift(tf.ones_like(d), d)[:, None]  # [c, 1]
    j = tf.range(NUM_BINS, dtype=tf.int32)[None, :] - _HALF  # signed bin offsets
    new_bin = tf.math.floordiv(j, k) + _HALF  # [c, NUM_BINS]
    rows = tf.range(c, dtype=tf.int32)[:, None] * NUM_BINS
    old = tf.math.unsorted_segment_sum(
        tf.reshape(read("hist"), [-1]), tf.reshape(new_bin + rows, [-1]), c * NUM_BINS
    )
    counts = _bincount(_bin_index(v, e_new[None, :]), c * NUM_BINS)
    hist = tf.reshape(old, [c, NUM_BINS]) + tf.reshape(counts, [c, NUM_BINS])
    return [assign("exp", e_new), assign("hist", hist)]


def _merge_rows(index: np.ndarray, rows: np.ndarray, e: int) -> np.ndarray:
    """The histogram over ``[-2**e, 2**e]`` of per-exponent rows (:func:`_used_rows`: row number ``r`` binned
    over ``[-2**(r + _E_MIN), 2**(r + _E_MIN)]``, ``r + _E_MIN <= e``, its extra last bin the count of the
    value ``2**(r + _E_MIN)`` itself): bins merged ``2**d`` into one."""
    out = np.zeros(NUM_BINS + 1, np.int64)
    j = np.arange(NUM_BINS + 1) - _HALF
    for r, row in zip(index, rows):
        d = min(max(e - (int(r) + _E_MIN), 0), _LOG2_HALF + 1)
        np.add.at(out, np.floor_divide(j, 1 << d) + _HALF, row)
    out[NUM_BINS - 1] += out[NUM_BINS]  # 2**e: the last bin holds its upper edge
    return out[:NUM_BINS]


def _used_rows(table: Any) -> Tuple[np.ndarray, np.ndarray]:
    """``(row numbers, rows)`` of the histogram rows of the resource variable ``table`` (see
    :func:`_table_shape`: a row per exponent, its last column the number of batches binned in it) that
    binned a batch: the few exponents the batches had; the rows without that column. Only that column
    and those rows are read (gathers: reading the whole table copies 3 MB per point, as TensorFlow
    does for a variable updated by scatter ops)."""
    import tensorflow as tf

    used = np.flatnonzero(tf.raw_ops.ResourceGatherNd(resource=table, indices=_LAST_COLUMN, dtype=tf.int64).numpy())
    if not len(used):
        return used, np.zeros([0, NUM_BINS + 1], np.int64)
    rows = tf.raw_ops.ResourceGather(resource=table, indices=used.astype(np.int32), dtype=tf.int64).numpy()
    return used, rows[:, : NUM_BINS + 1]


#: the indices of the histogram rows' last column (their batch counts), for a gather
_LAST_COLUMN = np.stack([np.arange(_E_MAX - _E_MIN + 1), np.full(_E_MAX - _E_MIN + 1, NUM_BINS + 1)], 1).astype(np.int32)


# --------------------------------------------------------------------------- statistics -> ranges
@dataclass
class PointStats:
    """The statistics of one point (numpy): per channel ``lo``/``hi`` (``+inf``/``-inf``
    where no finite value was seen), totals ``seen`` and ``nonfinite``, and, when
    kept, ``hist`` (``[channels, NUM_BINS]``) over ``[-2**exp, 2**exp]`` per channel."""

    point: str
    lo: np.ndarray
    hi: np.ndarray
    seen: int
    nonfinite: int
    hist: Optional[np.ndarray] = None
    exp: Optional[np.ndarray] = None
    axis: Optional[int] = None

    def bin_width(self, c: int = 0) -> float:
        """Histogram bin width of channel ``c``."""
        assert self.exp is not None
        return 2.0 ** (int(self.exp[c]) - _LOG2_HALF)


def _grid(fmt: Any) -> Tuple[int, bool, bool]:
    """``(steps, symmetric, fixed)`` of the target grid: steps between the range ends."""
    from .formats import Affine, FixedPoint

    if isinstance(fmt, Affine):
        return fmt.quant_max - fmt.quant_min, fmt.symmetric, False
    if isinstance(fmt, FixedPoint):
        return 2**fmt.bits, False, True
    raise TypeError(f"calibration needs a FixedPoint or Affine format, got {fmt!r}")


def percentile_range(h: np.ndarray, width: float, lo: float, hi: float, p: float) -> Tuple[float, float]:
    """``(100 - p, p)`` percentiles of histogram ``h`` (bins of ``width`` from ``-NUM_BINS/2 * width``),
    linearly interpolated inside a bin, clamped to ``[lo, hi]``."""
    n = float(h.sum())
    cum = np.cumsum(h, dtype=np.float64)
    left = (np.arange(NUM_BINS) - _HALF) * width

    def at(q: float) -> float:
        t = q / 100.0 * n
        if t <= 0:
            return lo
        i = int(np.searchsorted(cum, t, side="left"))
        i = min(i, NUM_BINS - 1)
        before = cum[i - 1] if i else 0.0
        return float(left[i] + (t - before) / max(float(h[i]), 1.0) * width)

    return float(np.clip(at(100.0 - p), lo, hi)), float(np.clip(at(p), lo, hi))


def mse_range(h: np.ndarray, width: float, lo: float, hi: float, fmt: Any) -> Tuple[float, float]:
    """The range ``a * (lo, hi)`` (``a`` in ``k / MSE_CANDIDATES``) of least expected squared
    rounding + clipping error on ``fmt``'s grid over histogram ``h``."""
    steps, symmetric, fixed = _grid(fmt)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        m = max(-lo, hi)
        lo, hi = -m, m
    # every candidate at once from prefix sums over the non-empty bins (centres x ascending, counts w):
    # below c_lo the clipping error is sum w (x - c_lo)**2 = WX2 - 2 c_lo WX + c_lo**2 W over those
    # bins, likewise above the top; every value inside adds step**2 / 12
    nz = np.flatnonzero(h)
    x = (nz - _HALF + 0.5) * width
    w = h[nz].astype(np.float64)
    W, WX, WX2 = (np.concatenate([[0.0], np.cumsum(t)]) for t in (w, w * x, w * x * x))
    a = np.arange(1, MSE_CANDIDATES + 1, dtype=np.float64) / MSE_CANDIDATES
    c_lo, c_hi = a * lo, a * hi
    step = (c_hi - c_lo) / steps
    top = c_hi - step if fixed else c_hi  # a fixed-point grid stops one step below hi
    i = np.searchsorted(x, c_lo, side="left")  # bins [0, i) lie below c_lo
    j = np.maximum(np.searchsorted(x, top, side="right"), i)  # bins [j, n) above the top
    below = WX2[i] - 2 * c_lo * WX[i] + c_lo**2 * W[i]
    above = (WX2[-1] - WX2[j]) - 2 * top * (WX[-1] - WX[j]) + top**2 * (W[-1] - W[j])
    err = below + above + (W[j] - W[i]) * step**2 / 12.0
    best = int(np.argmin(err))
    return float(c_lo[best]), float(c_hi[best])


def _kl_threshold(bins: np.ndarray, levels: int) -> int:
    """TensorRT's entropy calibration over a one-sided histogram: the number of bins ``i``
    (``levels <= i <= len(bins)``) whose clipped, ``levels``-quantized copy is closest in KL."""
    bins = bins.astype(np.float64)
    nz = np.flatnonzero(bins)
    last = int(nz[-1]) + 1 if nz.size else 0
    if last <= levels:
        return max(last, 1)
    # every threshold i at once, by chunk sums: with P the clipped copy (total T), Q its quantized
    # copy (chunks j of bins [j*i // levels, (j+1)*i // levels), each chunk's mass S_j spread over
    # its K_j non-empty bins), KL = sum P log P / T - log T - (sum_j S_j log(S_j / K_j)
    # + tail * log q_last) / T + log C[i], C[i] = mass of bins[:i] = mass of Q
    b = bins[:last]
    cum = np.concatenate([[0.0], np.cumsum(b)])
    ncum = np.concatenate([[0], np.cumsum(b > 0)])
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.concatenate([[0.0], np.cumsum(np.where(b > 0, b * np.log(np.where(b > 0, b, 1.0)), 0.0))])
        i = np.arange(levels, last + 1)
        edges = (np.arange(levels + 1)[None, :] * i[:, None]) // levels
        S = cum[edges[:, 1:]] - cum[edges[:, :-1]]
        K = ncum[edges[:, 1:]] - ncum[edges[:, :-1]]
        chunks = np.where(S > 0, S * np.log(S / np.maximum(K, 1)), 0.0).sum(axis=1)
        total = cum[last]
        tail = total - cum[i]
        edge = b[i - 1]
        p_last = edge + tail
        q_last = S[:, -1] / np.maximum(K[:, -1], 1)
        p_logp = plogp[i - 1] + np.where(p_last > 0, p_last * np.log(np.where(p_last > 0, p_last, 1.0)), 0.0)
        p_logq = chunks + np.where(tail > 0, tail * np.log(np.where(edge > 0, q_last, 1.0)), 0.0)
        kl = (p_logp - p_logq) / total - np.log(total) + np.log(cum[i])
    kl = np.where((cum[i] > 0) & ~((p_last > 0) & (edge == 0)), kl, np.inf)
    return int(i[np.argmin(kl)]) if np.isfinite(kl).any() else last


def entropy_range(h: np.ndarray, width: float, lo: float, hi: float, fmt: Any) -> Tuple[float, float]:
    """TensorRT's KL-divergence range over histogram ``h`` (see the module docstring)."""
    steps, symmetric, _ = _grid(fmt)
    pos, neg = h[_HALF:], h[:_HALF][::-1]
    if lo >= 0 and not symmetric:
        i = _kl_threshold(pos, steps + 1)
        return 0.0, min(i * width, hi)
    if hi <= 0 and not symmetric:
        i = _kl_threshold(neg, steps + 1)
        return max(-i * width, lo), 0.0
    i = _kl_threshold(pos + neg, (steps + 1) // 2)
    t = i * width
    if symmetric:
        return -t, t
    return max(-t, lo), min(t, hi)


def range_of(stats: PointStats, method: str = "minmax", fmt: Any = None, percentile: float = 99.99,
             what: str = "calibration_data") -> Tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """``(lo, hi)`` (float32, per channel when the statistics are) of one point by ``method``.

    The range includes 0 and is at least ``MIN_RANGE_WIDTH`` wide.

    Raises:
        ValueError: naming ``what`` and the point, when it saw no data or no finite value (in some channel).
    """
    from .formats import Affine

    check_method(method, percentile)
    point = f"{what}: {stats.point!r}" if what else str(stats.point)
    if stats.seen == 0:
        raise ValueError(f"{point}: no data seen")
    missing = ~(np.isfinite(stats.lo) & np.isfinite(stats.hi))
    if np.any(missing):
        where = "" if stats.axis is None else f" in channel(s) {np.flatnonzero(missing).tolist()[:8]}"
        raise ValueError(f"{point}: no finite value{where} ({stats.nonfinite} of {stats.seen} values were NaN or inf)")
    if method != "minmax" and stats.hist is None:
        raise ValueError(f"internal: {stats.point!r} has no histogram for method {method!r}")
    if fmt is None:
        fmt = Affine(8)
    los, his = [], []
    for c in range(len(stats.lo)):
        lo, hi = float(stats.lo[c]), float(stats.hi[c])
        if method == "percentile":
            lo, hi = percentile_range(stats.hist[c], stats.bin_width(c), lo, hi, float(percentile))
        elif method == "mse":
            lo, hi = mse_range(stats.hist[c], stats.bin_width(c), lo, hi, fmt)
        elif method == "entropy":
            lo, hi = entropy_range(stats.hist[c], stats.bin_width(c), lo, hi, fmt)
        los.append(lo)
        his.append(hi)
    lo_a, hi_a = np.minimum(np.asarray(los), 0.0), np.maximum(np.asarray(his), 0.0)
    hi_a = np.where(hi_a - lo_a < MIN_RANGE_WIDTH, lo_a + MIN_RANGE_WIDTH, hi_a)
    if stats.axis is None:
        return np.float32(lo_a[0]), np.float32(hi_a[0])
    return lo_a.astype(np.float32), hi_a.astype(np.float32)


def array_range(values: Any, method: str = "minmax", fmt: Any = None, percentile: float = 99.99,
                axis: Optional[int] = None, name: str = "values") -> Tuple[Any, Any]:  # fmt: skip
    """``(lo, hi)`` that ``method`` gives for the values of one array (a batch of activations,
    a kernel), from the same statistics and rules as calibration (see :func:`range_of`).

    Args:
        values: an array or tensor of floats; its first axis is the batch (see
            :data:`HISTOGRAM_SAMPLE`).
        method: one of :data:`METHODS`.
        fmt: the target ``FixedPoint``/``Affine`` format (its grid matters to ``"mse"`` and
            ``"entropy"``; its range is ignored); default ``Affine(8)``.
        percentile: for ``"percentile"``.
        axis: per-channel ranges along this axis, or ``None``.
        name: what errors call the values.

    Raises:
        ValueError: a bad method or percentile, or no finite value.
    """
    import tensorflow as tf

    check_method(method, percentile, what="method")
    x = tf.cast(tf.convert_to_tensor(values), tf.float32)
    channels = 1 if axis is None else int(x.shape[axis])
    o = Observer(name, axis, channels, histogram=method != "minmax")
    try:
        o.update(x)
        return range_of(o.stats(), method, fmt, percentile, what="")
    finally:
        o.release()


def ranges_of(observers: Mapping[str, Observer], method: str, formats: Optional[Mapping[str, Any]] = None,
              percentile: float = 99.99, what: str = "calibration_data") -> Dict[str, Tuple[Any, Any]]:  # fmt: skip
    """``{point: (lo, hi)}`` of every observer that saw data (every front end goes through here).

    Warns about points the data never reached (left out of the result), logs
    the non-finite values ignored at each point.

    Raises:
        ValueError: naming ``what`` and the point, when a point saw data but no finite value.
    """
    out: Dict[str, Tuple[Any, Any]] = {}
    for key, obs in observers.items():
        s = obs.stats()
        if s.seen == 0:
            log.warning("calibration: no data reached %r; its range is not calibrated", key)
            continue
        out[key] = range_of(s, method, (formats or {}).get(key), percentile, what)
        if s.nonfinite:
            log.warning("calibration: %d non-finite values ignored at %r", s.nonfinite, key)
    return out


def rebind_loaded(observers: Sequence[Observer], graph_defs: Sequence[Any]) -> None:
    """After ``tf.saved_model.load`` renamed the shared names in the loaded functions
    (``graph_defs``: the loaded functions' GraphDefs, libraries included), point
    every observer at its renamed variables."""
    by_prefix = {o.prefix + "/": o for o in observers}
    for gd in graph_defs:
        for f in gd.library.function:
            for nd in f.node_def:
                if nd.op != "VarHandleOp":
                    continue
                name = nd.attr["shared_name"].s.decode()
                for prefix, o in by_prefix.items():
                    if name.startswith(prefix):
                        rest = name[len(prefix):]
                        key = next((k for k in o._specs if rest.startswith(k)), None)
                        if key is not None:
                            o.rebind(rest[len(key):])


def release_all(observers: Sequence[Observer]) -> None:
    """Free the variables of ``observers``."""
    for o in observers:
        o.release()


# --------------------------------------------------------------------------- progress
def _batch_size(batch: Any) -> int:
    import tensorflow as tf

    leaves = tf.nest.flatten(batch)
    shape = getattr(leaves[0], "shape", None) if leaves else None
    return int(shape[0]) if shape is not None and len(shape) and shape[0] is not None else 1


def progress(batches: Any, description: str, verbose: Optional[bool] = None, total: Optional[int] = None,
             delay: float = 1.0) -> Any:  # fmt: skip
    """Yield ``batches``, showing a ``rich`` progress bar (batches done, images/s) on stderr.

    ``verbose=None`` shows it only when stderr is a terminal and the loop has
    run longer than ``delay`` seconds; ``True`` always (after ``delay``);
    ``False`` never.
    """
    import sys
    import time

    if verbose is False or (verbose is None and not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())):
        yield from batches
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    t0 = time.perf_counter()
    bar = None
    task = None
    done = images = 0
    try:
        for batch in batches:
            yield batch
            done += 1
            images += _batch_size(batch)
            now = time.perf_counter()
            if bar is None and now - t0 >= delay:
                bar = Progress(
                    TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("batches"),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=True,
                )  # fmt: skip
                bar.start()
                task = bar.add_task(description, total=total, rate="")
            if bar is not None:
                bar.update(task, completed=done, rate=f"{images / max(now - t0, 1e-9):.1f} images/s")
    finally:
        if bar is not None:
            bar.stop()
