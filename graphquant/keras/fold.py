"""A convolution with its BatchNormalization folded in *before* the weights are rounded.

What an int8 runtime ships is ``round(W * gamma / sqrt(var + eps))`` per
output channel, not ``round(W) * gamma / sqrt(var + eps)``; QAT should train
the former (Jacob et al. 2018, "Quantization and Training of Neural Networks
for Efficient Integer-Arithmetic-Only Inference", section 3.2; Krishnamoorthi
2018). While training, the fold uses the batch statistics (one extra float
convolution computes them, and the moving averages are updated from them)
until ``freeze_bn_after`` training steps, then the moving statistics (frozen).
At inference it always uses the moving statistics.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import keras
import tensorflow as tf

from ..formats import Format
from ..types import FormatLike
from ..weights import round_weight
from .integer_ops import integer_call
from .layers import format_arg

__all__ = ["FoldedConvBatchNorm", "foldable", "fold_operands"]

_DEPTHWISE = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
_FOLDABLE = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D) + _DEPTHWISE


def foldable(conv: Any, bn: Any) -> bool:
    """Whether ``conv`` followed by ``bn`` can be folded (exact classes, channels-last, float32, no own activation)."""
    if type(conv) not in _FOLDABLE or type(bn) is not keras.layers.BatchNormalization:
        return False
    if getattr(conv, "data_format", "channels_last") != "channels_last" or bn.renorm:
        return False
    if getattr(conv, "activation", None) not in (None, keras.activations.linear):
        return False
    return bn.axis in (-1, conv.rank + 1)


def fold_operands(kernel: tf.Tensor, bias: Optional[tf.Tensor], inv: tf.Tensor, mean: tf.Tensor,
                  beta: Optional[tf.Tensor], *, depthwise: bool, guard: Optional[Callable] = None
                  ) -> Tuple[tf.Tensor, tf.Tensor]:
    """``(kernel * inv, beta + (bias - mean) * inv)`` computed as ``bias * inv + (-mean * inv + beta)`` (``bias``,
    ``beta`` ``None``: 0), ``inv = gamma / sqrt(var + eps)`` per output channel: the folded kernel and bias, the
    one fold rule (training, export and the integer kernels, where it runs inside an XLA function with ``guard``
    keeping each product from FMA contraction into the sum after it)."""
    guard = guard or (lambda t: t)
    shift = guard(-mean * inv)
    if beta is not None:
        shift = shift + beta
    wf = kernel * (tf.reshape(inv, kernel.shape[-2:]) if depthwise else inv)
    return wf, (guard(bias * inv) + shift if bias is not None else shift)


@keras.saving.register_keras_serializable(package="graphquant")
class FoldedConvBatchNorm(keras.layers.Layer):
    """``bn(conv(x))`` computed as ``conv_{Q(W*s)}(x) + (beta + (b - mean) * s)``, ``s = gamma / sqrt(var + eps)``.

    Args:
        conv: a ``Conv1D/2D/3D`` or ``DepthwiseConv1D/2D`` layer (no activation).
        bn: the ``BatchNormalization`` layer that follows it.
        weight_format: the format of the folded weights (per output channel).
        freeze_bn_after: training steps after which the fold uses the moving
            statistics (and stops updating them); ``None``: never (batch
            statistics whenever training), ``0``: from the start.
    """

    def __init__(self, conv: Any, bn: Any, weight_format: FormatLike, freeze_bn_after: Optional[int] = None, **kwargs: Any):
        kwargs.setdefault("name", conv.name if isinstance(conv, keras.layers.Layer) else None)
        super().__init__(**kwargs)
        if isinstance(conv, dict):
            conv = keras.layers.deserialize(conv)
        if isinstance(bn, dict):
            bn = keras.layers.deserialize(bn)
        self.conv = conv
        self.bn = bn
        self.weight_format: Format = format_arg(weight_format, "weight_format")
        if freeze_bn_after is not None and (isinstance(freeze_bn_after, bool) or not isinstance(freeze_bn_after, int)
                                            or freeze_bn_after < 0):
            raise ValueError(f"freeze_bn_after must be a non-negative int or None, got {freeze_bn_after!r}")
        self.freeze_bn_after = freeze_bn_after

    def build(self, input_shape: Any) -> None:
        if not self.conv.built:
            self.conv.build(input_shape)
        if not self.bn.built:
            self.bn.build(self.conv.compute_output_shape(input_shape))
        self.step = self.add_weight(shape=(), initializer="zeros", trainable=False, dtype="float32", name="step")
        self.built = True

    def compute_output_shape(self, input_shape: Any) -> Any:
        return self.conv.compute_output_shape(input_shape)

    def _scale(self, var: tf.Tensor) -> tf.Tensor:
        """``s = gamma / sqrt(var + eps)`` (TensorFlow's ``rsqrt``: XLA's differs in the last bit)."""
        inv = tf.math.rsqrt(var + self.bn.epsilon)
        if self.bn.scale:
            inv = inv * tf.convert_to_tensor(self.bn.gamma)
        return inv

    def _folded(self, mean: tf.Tensor, var: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
        """``(kernel * s, beta + (b - mean) * s)`` with ``s = gamma / sqrt(var + eps)``: the folded kernel and bias."""
        return fold_operands(*self._fold_args(mean, var), depthwise=isinstance(self.conv, _DEPTHWISE))

    def _fold_args(self, mean: tf.Tensor, var: tf.Tensor) -> Tuple:
        conv, bn = self.conv, self.bn
        return (conv.kernel.value, conv.bias.value if conv.use_bias else None, self._scale(var), mean,
                tf.convert_to_tensor(bn.beta) if bn.center else None)

    def _gq_operands(self) -> Tuple[Callable, Tuple, None, Format, bool]:
        """The integer kernel's operands at inference (:func:`~graphquant.keras.integer_ops.integer_call`):
        :func:`fold_operands` of the moving statistics, ``None`` (rounded there), format, depthwise."""
        args = self._fold_args(tf.convert_to_tensor(self.bn.moving_mean), tf.convert_to_tensor(self.bn.moving_variance))
        return fold_operands, args, None, self.weight_format, isinstance(self.conv, _DEPTHWISE)

    def call(self, inputs: Any, training: Any = None) -> Any:
        conv, bn = self.conv, self.bn
        if not training and getattr(self, "_gq_integer", None) is not None:  # the runtime's integer kernel
            y = integer_call(self, conv, inputs)
            if y is not None:
                return y
        kernel = conv.kernel
        mean = tf.convert_to_tensor(bn.moving_mean)
        var = tf.convert_to_tensor(bn.moving_variance)
        if training and bn.trainable and self.freeze_bn_after != 0:
            y = conv.call(inputs)  # float, for the batch statistics
            axes = list(range(y.shape.rank - 1))
            bmean, bvar = tf.nn.moments(tf.stop_gradient(y), axes)
            frozen = tf.constant(False) if self.freeze_bn_after is None else self.step >= float(self.freeze_bn_after)
            m = float(bn.momentum)
            bn.moving_mean.assign(tf.where(frozen, mean, m * mean + (1.0 - m) * bmean))
            bn.moving_variance.assign(tf.where(frozen, var, m * var + (1.0 - m) * bvar))
            mean = tf.where(frozen, mean, bmean)
            var = tf.where(frozen, var, bvar)
        if training:
            self.step.assign_add(1.0)
        wf, bias = self._folded(mean, var)
        wq = round_weight(wf, self.weight_format, "nearest", depthwise=isinstance(conv, _DEPTHWISE), fused=True)
        mapping = [(kernel, wq)]
        if conv.use_bias:
            mapping.append((conv.bias, bias))
        with keras.StatelessScope(state_mapping=mapping):
            y = conv.call(inputs)
        if not conv.use_bias:
            y = tf.nn.bias_add(y, bias)
        return y

    def get_config(self) -> Dict[str, Any]:
        cfg = super().get_config()
        cfg.update(
            conv=keras.layers.serialize(self.conv),
            bn=keras.layers.serialize(self.bn),
            weight_format=self.weight_format.to_dict(),
            freeze_bn_after=self.freeze_bn_after,
        )
        return cfg
