"""Keras 3 layers that round: activations (:class:`Quantize`), weights
(:class:`QuantizeWeights`), and weight storage (:class:`StorageRounding`).

All are registered for serialization under the package ``"graphquant"``, so a
``.keras`` file loads without ``custom_objects`` once graphquant is imported.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import random
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from ..formats import Affine, Format, check_rounding, format_from_dict, inference_rounding_for, parse_format
from ..ops import fake_quant, quantize
from ..rounding import FUSED_ACTIVATIONS, min_max_fn, xla_enabled
from ..types import FormatLike
from ..weights import round_weight
from .integer_ops import check_kernels, integer_call, plain_operands

__all__ = ["Quantize", "QuantizeWeights", "StorageRounding", "FoldingBatchNormalization", "quantize_weight"]

#: Called with a :class:`Quantize` layer whose config recorded ``integer_kernels`` (the rounding point of a
#: ``tflite_int8`` model's input) once its model is loaded: the graph is complete and the layer's variables are
#: restored. :mod:`graphquant.keras.integer` registers the re-linking of the runtime's integer kernels here
#: (that module imports this one, so this one cannot call it).
ON_LOADED: List[Callable[[Any], None]] = []

log = logging.getLogger(__name__)

#: Range used by a learned-range layer before it saw any data (as tfmot).
INITIAL_RANGE = (-6.0, 6.0)


def format_arg(value: Any, what: str = "format") -> Format:
    """A format from a layer argument (string, dict or format); errors name ``what``."""
    if isinstance(value, dict) and "kind" in value:
        return format_from_dict(value)
    try:
        return parse_format(value)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{what}: {e}") from None


def _fast_affine(fmt: Format, x: Any) -> bool:
    """Whether :func:`graphquant.ops.fake_quant` applies (TensorFlow's FakeQuant grid)."""
    return isinstance(fmt, Affine) and fmt.bits <= 16 and x.dtype == tf.float32 and x.shape.rank is not None


def _training(training: Any) -> bool:
    return bool(training) if training is not None else False


class _InitialRange:
    """Initializer of :attr:`Quantize.range`: rows ``INITIAL_RANGE[0]``, ``INITIAL_RANGE[1]``
    and 0 (not initialised), as a numpy array (one op to create the variable)."""

    def __call__(self, shape: Any, dtype: Any = None) -> Any:
        value = np.empty(tuple(shape), dtype=keras.backend.standardize_dtype(dtype or "float32"))
        value[0], value[1], value[2] = INITIAL_RANGE[0], INITIAL_RANGE[1], 0.0
        return value


@keras.saving.register_keras_serializable(package="graphquant")
class Quantize(keras.layers.Layer):
    """Round its input onto a number format (simulated low precision).

    Args:
        format: a format object, string (``"affine8"``, ``"e4m3"``,
            ``"fixed8[0,6]"``) or dict. An :class:`~graphquant.Affine` format
            without a range has a *learned* range: an exponential moving
            average of the batch min/max while ``training=True`` (the first
            batch sets it), frozen at inference; :func:`graphquant.calibrate`
            sets it from data. Before that the range is ``(-6, 6)``. It lives in
            one non-trainable variable ``range`` (rows: min, max, and 1.0 once
            initialised; one column per channel if per-channel); use
            :meth:`get_range` / :meth:`set_range`. The range takes no
            gradient (as tfmot); the input gets FakeQuant's
            straight-through gradient. While training, affine nearest rounding
            runs as an XLA replica of TensorFlow's FakeQuant kernel (same
            values bit for bit; :func:`graphquant.use_xla` turns it off); at
            inference it is TensorFlow's FakeQuant op.
        rounding: rounding while training.
        inference_rounding: rounding with ``training=False``; default
            ``rounding``, except ``"nearest"`` when ``rounding="stochastic"``.
        momentum: EMA momentum of the learned range.
        seed: integer seed of the layer's stochastic rounding.
        fused_activation: ``"relu"`` or ``"relu6"``: the layer may be called
            as ``Quantize(...)(y, pre_activation=x)`` where ``y`` is that
            activation of ``x`` (``tf.nn.relu`` / ``tf.nn.relu6``, what
            ``keras.layers.ReLU()`` / ``ReLU(6.0)`` /
            ``Activation("relu" | "relu6")`` compute). While training on the
            XLA path of a learned affine range, the layer then rounds
            ``activation(x)`` from ``x`` in one pass, with the activation's
            gradient folded into the straight-through mask: the same values
            and gradients as rounding ``y``, and the activation's own
            forward and backward passes drop out of a traced training step
            (its output is not used). At inference, and on every other path,
            it rounds ``y`` as usual. ``quantize_model`` sets this up for
            groups that end in such an activation.
        integer_kernels: set by :func:`graphquant.keras.integer.link_integer` on
            the rounding point of a ``tflite_int8`` model's input: the kernel
            set (``"reference"`` or ``"xnnpack"``) the model computes at
            inference. It is saved in the config, so a model loaded from a
            ``.keras`` file (``keras.models.load_model``) links its integer
            kernels again, with the same set.

    Masks pass through unchanged. The output has the input's shape and dtype.
    """

    def __init__(
        self,
        format: FormatLike = "affine8",
        rounding: str = "nearest",
        inference_rounding: Optional[str] = None,
        momentum: float = 0.999,
        seed: Optional[int] = None,
        fused_activation: Optional[str] = None,
        integer_kernels: Optional[str] = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.integer_kernels = None if integer_kernels is None else check_kernels(integer_kernels, "integer_kernels")
        if fused_activation is not None and fused_activation not in FUSED_ACTIVATIONS:
            raise ValueError(
                f"fused_activation must be one of {sorted(FUSED_ACTIVATIONS)} or None, got {fused_activation!r}"
            )
        self.fused_activation = fused_activation
        self.format = format_arg(format)
        self.rounding = check_rounding(rounding, "rounding")
        self.inference_rounding = check_rounding(inference_rounding_for(rounding, inference_rounding),
                                                 "inference_rounding")
        if not isinstance(momentum, (int, float)) or not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        self.seed = seed
        self.supports_masking = True
        self._calibrator: Any = None  # see observe_with()
        self.seed_generator = None
        if "stochastic" in (self.rounding, self.inference_rounding):
            self.seed_generator = keras.random.SeedGenerator(seed)

    @property
    def learned(self) -> bool:
        """Whether the range is learned/calibrated (an Affine without range)."""
        return isinstance(self.format, Affine) and self.format.range is None

    def build(self, input_shape: Any) -> None:
        if self.learned:
            shape: tuple = ()
            if self.format.axis is not None:
                n = input_shape[self.format.axis]
                if n is None:
                    raise ValueError(f"{self.name}: per-channel axis {self.format.axis} has unknown size")
                shape = (int(n),)
            # one variable (creating variables is most of the cost of quantize_model):
            # rows min, max, and 1.0 once initialised (repeated per channel)
            self.range = self.add_weight(
                shape=(3,) + shape, initializer=_InitialRange(), trainable=False,
                aggregation="mean", name="range", dtype="float32",
            )  # fmt: skip
        self.built = True

    def _batch_range(self, x: tf.Tensor, activation: Optional[str] = None):
        x = tf.cast(x, tf.float32)
        rank = x.shape.rank
        axis = None if self.format.axis is None else self.format.axis % rank
        if activation is None:
            return min_max_fn(axis, rank, xla_enabled())(x)
        # f is relu or relu6: monotone, so max f(x) = f(max x); f(x) >= 0, and the
        # range's lower end is min(batch min, 0) = 0 (a max alone is half the work)
        _, hi = min_max_fn(axis, rank, xla_enabled(), need_min=False)(x)
        hi = FUSED_ACTIVATIONS[activation][0](hi)
        return tf.zeros_like(hi), hi

    @property
    def calibrating(self) -> bool:
        """Whether the layer feeds an observer instead of rounding (:meth:`observe_with`)."""
        return self._calibrator is not None

    def observe_with(self, calibrator: Any) -> None:
        """Route the layer's inputs to ``calibrator.update(layer, inputs)`` (which returns the
        layer's output) instead of rounding them; ``None`` restores rounding. Calibration
        (:func:`graphquant.calibrate`) sets it around its passes over the data."""
        if calibrator is not None and not callable(getattr(calibrator, "update", None)):
            raise TypeError(f"calibrator must have an update(layer, inputs) method or be None, got {calibrator!r}")
        self._calibrator = calibrator

    def call(self, inputs: Any, training: Any = None, mask: Any = None, pre_activation: Any = None) -> Any:
        if self._calibrator is not None:
            return self._calibrator.update(self, inputs)
        train = _training(training)
        rounding = self.rounding if train else self.inference_rounding
        seed = self.seed_generator.next() if rounding == "stochastic" else None
        if not self.learned:
            return quantize(inputs, self.format, rounding, seed=seed)
        state = self.range.value
        lo, hi, init = state[0], state[1], state[2]
        if train:
            fuse = (
                pre_activation is not None and self.fused_activation is not None and rounding == "nearest"
                and xla_enabled() and _fast_affine(self.format, inputs) and pre_activation.dtype == inputs.dtype
            )  # fmt: skip
            if fuse:
                bmin, bmax = self._batch_range(pre_activation, self.fused_activation)
            else:
                bmin, bmax = self._batch_range(inputs)
            # the range is a moving average, not a function of this batch for the
            # gradient (as tfmot): no gradient flows through min/max
            bmin, bmax = tf.stop_gradient(bmin), tf.stop_gradient(bmax)
            bmin = tf.minimum(bmin, 0.0)  # the grid always contains zero
            bmax = tf.maximum(bmax, 0.0)
            m = self.momentum
            new_lo = init * (m * lo + (1.0 - m) * bmin) + (1.0 - init) * bmin
            new_hi = init * (m * hi + (1.0 - m) * bmax) + (1.0 - init) * bmax
            self.range.assign(tf.stack([new_lo, new_hi, tf.ones_like(init)]))
            if fuse:
                return fake_quant(pre_activation, self.format, new_lo, new_hi, self.fused_activation)
            if rounding == "nearest" and _fast_affine(self.format, inputs):
                return fake_quant(inputs, self.format, new_lo, new_hi)
            lo, hi = new_lo, new_hi
        else:
            lo, hi = tf.convert_to_tensor(lo), tf.convert_to_tensor(hi)
        return quantize(inputs, self.format, rounding, range=(lo, hi), seed=seed)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def compute_mask(self, inputs: Any, mask: Any = None) -> Any:
        return mask

    def set_range(self, lo: Any, hi: Any) -> None:
        """Set a learned range (scalars, or one value per channel) and mark it initialised."""
        if not self.learned:
            raise ValueError(f"{self.name}: format {self.format} has no learned range")
        shape = self.range.shape[1:]
        lo = tf.reshape(tf.cast(lo, tf.float32), shape)
        hi = tf.reshape(tf.cast(hi, tf.float32), shape)
        self.range.assign(tf.stack([lo, hi, tf.ones_like(lo)]))

    def get_range(self):
        """The current range as numpy arrays ``(lo, hi)``, or the format's fixed range."""
        if not self.learned:
            return getattr(self.format, "range", None)
        value = keras.ops.convert_to_numpy(self.range)
        return value[0], value[1]

    def get_config(self) -> Dict[str, Any]:
        cfg = super().get_config()
        cfg.update(
            format=self.format.to_dict(),
            rounding=self.rounding,
            inference_rounding=self.inference_rounding,
            momentum=self.momentum,
            seed=self.seed,
        )
        if self.fused_activation is not None:
            cfg["fused_activation"] = self.fused_activation
        if self.integer_kernels is not None:
            cfg["integer_kernels"] = self.integer_kernels
        return cfg

    def load_own_variables(self, store: Any) -> None:
        super().load_own_variables(store)
        if self.integer_kernels is not None:  # a tflite_int8 model's input, loaded: link its kernels again
            for hook in ON_LOADED:
                hook(self)


def quantize_weight(w: Any, fmt: Format, rounding: str = "nearest", seed: Any = None) -> tf.Tensor:
    """Round a weight tensor as the Keras layers do: :func:`graphquant.weights.round_weight`
    (an Affine format without range uses the weight's own range) with its fused symmetric path."""
    return round_weight(w, fmt, rounding, seed, fused=True)


# ----------------------------------------------------------------------------- BN folding
# Exact classes only: a subclass may override call() with something that is not
# linear in the kernel. Transposed convolutions are not folded.
_FOLD_OUTPUT_SLOT = {
    keras.layers.Conv1D: "kernel",
    keras.layers.Conv2D: "kernel",
    keras.layers.Conv3D: "kernel",
    keras.layers.DepthwiseConv1D: "kernel",
    keras.layers.DepthwiseConv2D: "kernel",
    keras.layers.SeparableConv1D: "pointwise_kernel",
    keras.layers.SeparableConv2D: "pointwise_kernel",
}


# A convolution wrapped in QuantizeWeights offers, on its traced output tensor, to recompute itself with a
# following BatchNormalization folded into its weights; FoldingBatchNormalization takes the offer. The offer
# travels with the tensor because a layer's call() sees only its input tensors, not the layer producing them.
_FOLD_OFFER_ATTR = "_graphquant_fold"


def offer_fold(y: Any, folded: Any) -> None:
    """Attach ``folded(inv, shift) -> tensor`` to the traced output ``y`` of a convolution: the
    convolution recomputed with per-output-channel scale ``inv`` and shift ``shift`` folded in."""
    try:
        setattr(y, _FOLD_OFFER_ATTR, folded)
    except AttributeError:  # pragma: no cover - a tensor type without attributes
        pass


def fold_offer(x: Any) -> Any:
    """The ``folded(inv, shift)`` function :func:`offer_fold` attached to ``x``, or None."""
    return getattr(x, _FOLD_OFFER_ATTR, None)


_NO_FOLDING: contextvars.ContextVar[bool] = contextvars.ContextVar("graphquant_no_folding", default=False)


@contextlib.contextmanager
def unfolded() -> Iterator[None]:
    """Within the block, traced inference does not fold BatchNormalization into convolutions.

    Calibration traces the model to observe it; it observes the unfolded values
    (what eager inference computes), so a model calibrates to the same ranges
    with ``fold_batchnorm`` on or off.
    """
    token = _NO_FOLDING.set(True)
    try:
        yield
    finally:
        _NO_FOLDING.reset(token)


def _foldable_conv(layer: keras.layers.Layer) -> Optional[str]:
    """The weight that carries the output channels if ``layer`` can absorb a following BN, else None."""
    slot = _FOLD_OUTPUT_SLOT.get(type(layer))
    if slot is None:
        return None
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return None
    if getattr(layer, "activation", None) not in (None, keras.activations.linear):
        return None
    if layer.compute_dtype != "float32" or layer.variable_dtype != "float32":
        return None
    return slot


@keras.saving.register_keras_serializable(package="graphquant")
class FoldingBatchNormalization(keras.layers.BatchNormalization):
    """``BatchNormalization`` that, at inference inside a traced function, folds into the preceding convolution.

    ``quantize_model`` uses it for every ``BatchNormalization`` it copies. It
    computes exactly what ``BatchNormalization`` computes, except in one case:
    at inference (``training`` false), in graph mode (``tf.function``,
    ``predict``, ``export``), when its input is the output of a
    :class:`QuantizeWeights` convolution (float32, channels-last, no own
    activation) that offered itself for folding. Then it returns
    ``conv(x, Q(W) * s) + (b * s + t)`` with ``s = gamma / sqrt(var + eps)``,
    ``t = beta - mean * s``: the same values as ``BN(conv(x, Q(W)) + b)`` up
    to float reassociation, with the weight rounding point unchanged, and the
    unfused convolution is pruned from the graph. In eager mode, while
    training, or with ``fold=False`` it is a plain ``BatchNormalization``.
    """

    def __init__(self, *args: Any, fold: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.fold = bool(fold)

    def _fold_params(self, inputs: Any):
        if self.renorm or inputs.dtype != tf.float32 or self.compute_dtype != "float32":
            return None
        rank = inputs.shape.rank
        if rank is None or self.axis % rank != rank - 1:
            return None
        inv = tf.math.rsqrt(tf.convert_to_tensor(self.moving_variance) + self.epsilon)
        if self.scale:
            inv = inv * tf.convert_to_tensor(self.gamma)
        shift = -tf.convert_to_tensor(self.moving_mean) * inv
        if self.center:
            shift = tf.convert_to_tensor(self.beta) + shift
        return inv, shift

    def call(self, inputs: Any, training: Any = None, mask: Any = None) -> Any:
        if self.fold and not (training and self.trainable):
            folder = fold_offer(inputs)
            if folder is not None:
                params = self._fold_params(inputs)
                if params is not None:
                    return folder(*params)
        return super().call(inputs, training=training, mask=mask)

    def get_config(self) -> Dict[str, Any]:
        cfg = super().get_config()
        cfg["fold"] = self.fold
        return cfg


@keras.saving.register_keras_serializable(package="graphquant")
class QuantizeWeights(keras.layers.Wrapper):
    """Run ``layer`` with some of its weights rounded (straight-through to the float weights).

    The float variables stay the layer's trainable variables; each call reads
    them, rounds them and runs the layer on the rounded values (through
    ``keras.StatelessScope``), so the optimizer updates the float weights.

    Args:
        layer: the wrapped layer (e.g. a ``Conv2D``).
        slots: a list of dicts ``{"slot": "kernel", "format": ..., "rounding":
            "nearest", "inference_rounding": None}``; ``slot`` is the name of
            the weight (``kernel``, ``depthwise_kernel``, ``pointwise_kernel``).
        seed: integer seed for stochastic weight rounding.
    """

    def __init__(self, layer: keras.layers.Layer, slots: Sequence[Dict[str, Any]], seed: Optional[int] = None, **kwargs):
        kwargs.setdefault("name", layer.name)
        super().__init__(layer, **kwargs)
        norm: List[Dict[str, Any]] = []
        if not slots:
            raise ValueError("slots must name at least one weight")
        for s in slots:
            if not isinstance(s, dict) or "slot" not in s or "format" not in s:
                raise ValueError(f"each slot must be a dict with 'slot' and 'format', got {s!r}")
            rnd = check_rounding(s.get("rounding", "nearest"), "rounding")
            inf = inference_rounding_for(rnd, s.get("inference_rounding") or None)
            norm.append(
                {"slot": str(s["slot"]), "format": format_arg(s["format"]), "rounding": rnd,
                 "inference_rounding": check_rounding(inf, "inference_rounding")}
            )  # fmt: skip
        self.slots = norm
        self.seed = seed
        self.supports_masking = getattr(layer, "supports_masking", False)
        self.seed_generator = None
        if any("stochastic" in (s["rounding"], s["inference_rounding"]) for s in norm):
            self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape: Any = None) -> None:
        if not self.layer.built:
            self.layer.build(input_shape)
        names = {v.name: v for v in self.layer.trainable_weights + self.layer.non_trainable_weights}
        for s in self.slots:
            if s["slot"] not in names:
                raise ValueError(f"{self.name}: layer {self.layer.name!r} has no weight named {s['slot']!r}")
        self.built = True

    def _is_depthwise(self, slot: str) -> bool:
        """Whether ``slot`` is a depthwise kernel (output channels = input channel x multiplier)."""
        if slot == "depthwise_kernel":
            return isinstance(self.layer, (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D))
        return slot == "kernel" and isinstance(self.layer, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D))

    def _variable(self, slot: str):
        for v in self.layer.weights:
            if v.name == slot:
                return v
        raise ValueError(f"{self.name}: no weight {slot!r}")

    def _gq_operands(self) -> Tuple[Callable, Tuple, Optional[tf.Tensor], Format, bool]:
        """The integer kernel's operands at inference (:func:`~graphquant.keras.integer_ops.integer_call`) of a
        layer whose one rounded weight is its kernel: :func:`~graphquant.keras.integer_ops.plain_operands` of
        the kernel and bias (or ``None``), the kernel as inference rounds it (:meth:`rounded_weights`; ``None``
        when that is to nearest, which the integer kernel does itself), format, depthwise."""
        (s,) = self.slots
        rounded = None if s["inference_rounding"] == "nearest" else self.rounded_weights()[0][2]
        bias = self.layer.bias.value if getattr(self.layer, "use_bias", False) else None
        w = self._variable(s["slot"]).value
        return plain_operands, (w, bias), rounded, s["format"], self._is_depthwise("kernel")

    def _round_slot(self, s: Dict[str, Any], w: Any, rounding: str, seed: Any) -> tf.Tensor:
        fmt = s["format"]
        return round_weight(w, fmt, rounding, seed, depthwise=self._is_depthwise(s["slot"]), fused=True)

    def rounded_weights(self) -> List[Tuple[str, tf.Tensor, tf.Tensor, Format]]:
        """``(slot, float value, value as inference rounds it, format)`` for each rounded weight
        (stochastic inference rounding draws with seed 0)."""
        out = []
        for s in self.slots:
            w = self._variable(s["slot"]).value
            rnd = s["inference_rounding"]
            out.append((s["slot"], w, self._round_slot(s, w, rnd, 0 if rnd == "stochastic" else None), s["format"]))
        return out

    def call(self, inputs: Any, training: Any = None, **kwargs: Any) -> Any:
        train = _training(training)
        mapping = []
        for s in self.slots:
            var = self._variable(s["slot"])
            rnd = s["rounding"] if train else s["inference_rounding"]
            seed = self.seed_generator.next() if rnd == "stochastic" else None
            mapping.append((var, self._round_slot(s, var.value, rnd, seed)))
        if not train and not kwargs and getattr(self, "_gq_integer", None) is not None:  # the runtime's kernel
            y = integer_call(self, self.layer, inputs)
            if y is not None:
                return y
        with keras.StatelessScope(state_mapping=mapping):
            y = self.layer.call(inputs, **kwargs)
        if not train and not kwargs and not tf.executing_eagerly() and not _NO_FOLDING.get():
            slot = _foldable_conv(self.layer)
            if slot is not None:
                # Offer a following FoldingBatchNormalization the folded convolution. If it takes
                # it, ``y`` has no consumer left and TF prunes it from the function graph.
                offer_fold(y, lambda inv, shift: self._folded(inputs, mapping, slot, inv, shift))
        return y

    def _folded(self, inputs: Any, mapping: List[Any], slot: str, inv: tf.Tensor, shift: tf.Tensor) -> tf.Tensor:
        """``layer(inputs)`` with BN (per-output-channel ``* inv + shift``) folded into kernel and bias."""
        layer = self.layer
        values = {id(v): t for v, t in mapping}
        kvar = self._variable(slot)
        k = values.get(id(kvar), kvar.value)
        if isinstance(layer, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)):
            scale = tf.reshape(inv, k.shape[-2:])  # output channel = in * multiplier + m
        else:
            scale = inv
        new = dict(values)
        new[id(kvar)] = k * scale
        fmap = [(v, new[id(v)]) for v, _ in mapping]
        if id(kvar) not in values:
            fmap.append((kvar, new[id(kvar)]))
        if layer.use_bias:
            bias = layer.bias
            fmap.append((bias, bias.value * inv + shift))
        with keras.StatelessScope(state_mapping=fmap):
            y = layer.call(inputs)
        if not layer.use_bias:
            y = tf.nn.bias_add(y, shift)
        return y

    def compute_output_shape(self, input_shape: Any) -> Any:
        return self.layer.compute_output_shape(input_shape)

    def compute_output_spec(self, *args: Any, **kwargs: Any) -> Any:
        # the wrapped layer's own rule: its compute_output_shape if it has one, else Keras traces its call
        # (a custom layer without compute_output_shape builds in a model, so it must build wrapped too)
        return self.layer.compute_output_spec(*args, **kwargs)

    def compute_mask(self, inputs: Any, mask: Any = None) -> Any:
        return self.layer.compute_mask(inputs, mask)

    def get_config(self) -> Dict[str, Any]:
        cfg = super().get_config()
        cfg["slots"] = [dict(s, format=s["format"].to_dict()) for s in self.slots]
        cfg["seed"] = self.seed
        return cfg


@keras.saving.register_keras_serializable(package="graphquant")
class StorageRounding(keras.constraints.Constraint):
    """A constraint that rounds a weight onto a storage format after every update.

    Keras optimizers apply ``variable.constraint`` after each update, so this
    is Gupta et al. (2015) low-precision storage: the weight itself lives on
    the storage grid. ``rounding="stochastic"`` keeps small updates alive in
    expectation; ``"nearest"`` loses updates smaller than half a step.

    Args:
        format: the storage format (fixed grid: FixedPoint, float, ranged Affine).
        rounding: ``"nearest"`` or ``"stochastic"``.
        inner: another constraint applied first (e.g. the layer's own).
        seed: integer seed for stochastic rounding.
    """

    def __init__(self, format: FormatLike, rounding: str = "nearest", inner: Any = None, seed: Optional[int] = None):
        self.format = format_arg(format, "weight_storage")
        if isinstance(self.format, Affine) and self.format.range is None:
            raise ValueError("weight_storage: an Affine storage format needs a range")
        if rounding not in ("nearest", "stochastic"):
            raise ValueError(f"storage_rounding must be 'nearest' or 'stochastic', got {rounding!r}")
        self.rounding = rounding
        self.inner = keras.constraints.get(inner) if isinstance(inner, (dict, str)) else inner
        self.seed = seed
        self._generator = None
        if rounding == "stochastic":
            # seed None: draw one from Python's generator, which
            # keras.utils.set_random_seed seeds, so seeded programs repeat
            gen_seed = seed if seed is not None else random.randrange(2**31)
            with tf.init_scope():
                self._generator = tf.random.Generator.from_seed(gen_seed)

    def __call__(self, w: Any) -> Any:
        if self.inner is not None:
            w = self.inner(w)
        return quantize(w, self.format, self.rounding, seed=self._generator)

    def get_config(self) -> Dict[str, Any]:
        return {
            "format": self.format.to_dict(),
            "rounding": self.rounding,
            "inner": None if self.inner is None else keras.constraints.serialize(self.inner),
            "seed": self.seed,
        }
