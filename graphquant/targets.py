"""Deployment targets: where a runtime rounds (a pattern registry) and how (formats, arithmetic), as data.

A :class:`Target` bundles

* ``registry`` -- the patterns that place rounding wherever the runtime
  rounds (see :mod:`graphquant.patterns`);
* the number formats of weights, activations and biases;
* flags for the structural choices of the runtime's converter
  (``quantize_input``: the model input is rounded; ``fold_batchnorm``:
  BatchNormalization is folded into the convolution *before* its weights are
  rounded, so QAT trains the weights that ship);
* ``arithmetic`` -- a plain-text description of the integer arithmetic.

``quantize_model(model, target="tflite_int8", ...)`` uses it; the default
behaviour of ``quantize_model`` (rounding after every convolution group) is
the ``"default"`` target.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from .formats import Affine, Format
from .patterns import BIAS, CONV, DENSE, NORM, Matcher, Pattern, Registry, Step, default_registry

__all__ = ["Target", "TARGETS", "TFLITE_INT8", "get_target", "uncovered_layers"]


@dataclass(frozen=True)
class Target:
    """A deployment target: the registry of rounding points and the formats and arithmetic used there."""

    name: str
    registry: Registry
    weight_format: Optional[Format] = None
    activation_format: Optional[Format] = None
    dense_weight_format: Optional[Format] = None
    bias: str = "float"
    quantize_input: bool = False
    fold_batchnorm: bool = False
    integer_arithmetic: bool = False  # weight layers compute the runtime's integer kernels at inference
    split_activations: bool = False  # a conv/Dense's own non-fusable activation becomes a layer (its own op)
    arithmetic: str = ""
    covered: Tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "patterns": [p.name for p in self.registry.patterns],
            "weight_format": None if self.weight_format is None else str(self.weight_format),
            "dense_weight_format": None if self.dense_weight_format is None else str(self.dense_weight_format),
            "activation_format": None if self.activation_format is None else str(self.activation_format),
            "bias": self.bias,
            "quantize_input": self.quantize_input,
            "fold_batchnorm": self.fold_batchnorm,
            "integer_arithmetic": self.integer_arithmetic,
            "split_activations": self.split_activations,
            "arithmetic": self.arithmetic,
            "covered": list(self.covered),
        }


def _single(name: str, layers: Tuple[str, ...]) -> Pattern:
    return Pattern(name, (Step(Matcher(name, layers=layers)),), weights=False)


#: Keras layers after which the int8 runtime requantizes (its output has its own scale and zero point).
_REQUANTIZING = {
    "add": ("Add",),
    "subtract": ("Subtract",),
    "multiply": ("Multiply",),
    "concatenate": ("Concatenate",),
    "average_pool": ("AveragePooling1D", "AveragePooling2D", "GlobalAveragePooling1D", "GlobalAveragePooling2D"),
    "resize": ("UpSampling2D", "Resizing"),
    # x * scale + offset by constants (EfficientNet's input preprocessing): MUL / ADD / SUB ops with int8 outputs
    "rescale": ("Rescaling", "Normalization"),
    # a lone activation (not fused into a group): LOGISTIC (sigmoid) has the fixed output scale 1/256, zero point
    # -128, then an int8 -> int8 QUANTIZE to this point's range; swish is LOGISTIC then MUL (this point rounds the MUL)
    "activation": ("ReLU", "Activation", "LeakyReLU", "PReLU", "ELU"),
}


def _fusable_activation(node: Any) -> bool:
    """Whether a Keras activation layer is one the converter fuses into ADD/SUB/MUL (RELU, RELU6)."""
    obj = getattr(node, "obj", None)
    if obj is None:
        return False
    if type(obj).__name__ == "ReLU":
        return (float(getattr(obj, "negative_slope", 0.0) or 0.0) == 0.0
                and float(getattr(obj, "threshold", 0.0) or 0.0) == 0.0
                and getattr(obj, "max_value", None) in (None, 6.0, 6))  # fmt: skip
    if type(obj).__name__ == "Activation":
        return getattr(getattr(obj, "activation", None), "__name__", "") in ("relu", "relu6")
    return False


#: An activation the converter fuses into the op before it (one output tensor, one rounding).
FUSED_ACTIVATION = Matcher("fused_activation", layers=("ReLU", "Activation"), predicate=_fusable_activation)

#: Ops that take a fused RELU/RELU6: ``op -> activation`` is one rounding point, as the converter emits it.
_FUSING = ("add", "subtract", "multiply")  # not CONCATENATION: its output keeps its own tensor


def _tflite_registry() -> Registry:
    # the converter fuses only RELU/RELU6 into CONV_2D/DEPTHWISE_CONV_2D/FULLY_CONNECTED: any other activation
    # after a conv/Dense is an op of its own after an int8 tensor (a "lone activation" point below)
    patterns = [
        Pattern("input", (Step(Matcher("input", layers=("InputLayer",))),), weights=False),
        Pattern("conv", (Step(CONV), Step(BIAS, optional=True), Step(NORM, optional=True),
                         Step(FUSED_ACTIVATION, optional=True))),
        Pattern("dense", (Step(DENSE), Step(NORM, optional=True), Step(FUSED_ACTIVATION, optional=True))),
    ]
    for k, v in _REQUANTIZING.items():
        if k in _FUSING:
            patterns.append(Pattern(k, (Step(Matcher(k, layers=v)), Step(FUSED_ACTIVATION, optional=True)),
                                    weights=False))  # fmt: skip
        else:
            patterns.append(_single(k, v))
    return Registry(patterns)


TFLITE_INT8 = Target(
    name="tflite_int8",
    registry=_tflite_registry(),
    weight_format=Affine(8, symmetric=True, narrow_range=True, axis=-1),
    # the converter quantizes FULLY_CONNECTED weights per tensor (a per-channel FakeQuant on a Dense kernel fails
    # to convert: "tfl.transpose op has mismatched quantized axes")
    dense_weight_format=Affine(8, symmetric=True, narrow_range=True),
    activation_format=Affine(8),
    bias="int32 at scale s_in * s_w[c] (the converter rounds the folded bias)",
    quantize_input=True,
    fold_batchnorm=True,
    integer_arithmetic=True,
    split_activations=True,
    arithmetic=(
        "int32 accumulation of (q_in - zp_in) * q_w + q_bias; output = zp_out + "
        "MultiplyByQuantizedMultiplier(acc, M0, shift) with M = s_in*s_w[c]/s_out = M0 * 2**(shift-31) "
        "(gemmlowp SaturatingRoundingDoublingHighMul + RoundingDivideByPOT), clamped to the fused activation's "
        "range in [-128, 127]. At inference (training=False) the simulation computes the reference kernels' integer "
        "arithmetic (graphquant.keras.integer: conv/depthwise, FULLY_CONNECTED (one rounding), ADD, MEAN, "
        "AVERAGE_POOL_2D, CONCATENATION with the converter's shared scale, the input QUANTIZE, LOGISTIC (the "
        "lookup table LiteRT fills in float32 for int8), swish as LOGISTIC then MUL, MUL); with "
        "kernels='xnnpack' (quantize_model(kernels=) / link_integer) those of the default interpreter's XNNPACK "
        "delegate instead: conv/depthwise/FULLY_CONNECTED requantize as rint(float32(acc) * float32(s_in*s_w[c]/s_out))"
        " (ties to even), ADD with 20-bit multipliers lrintf(s_i/s_out * 2**shift) and an arithmetic shift, MEAN in "
        "float32 (AVERAGE_POOL_2D, requantizing CONCATENATION, LOGISTIC and MUL keep the reference arithmetic). While "
        "training, FakeQuant grids at the same points (and LOGISTIC's 1/256 grid inside sigmoid/swish) with "
        "straight-through gradients."
    ),
    covered=("model input", "Conv1D/2D/3D, DepthwiseConv, SeparableConv, Conv*Transpose -> [BatchNormalization] -> "
             "[ReLU/ReLU6]", "Dense -> [BatchNormalization] -> [ReLU/ReLU6]", "Add", "Subtract",
             "Multiply (each of these three with a following ReLU/ReLU6 as one group: the converter fuses it)",
             "Concatenate", "AveragePooling, GlobalAveragePooling (MEAN)", "UpSampling2D, Resizing",
             "Rescaling, Normalization (MUL/SUB by constants; float arithmetic at that point)",
             "a lone ReLU/Activation/LeakyReLU/PReLU/ELU",
             "a conv/Dense's own activation other than ReLU/ReLU6 (e.g. sigmoid, swish) is split into its own "
             "layer with a rounding point before it, as the converter emits it",
             "sigmoid (LOGISTIC, output scale 1/256, zero point -128, then requantized to its point's range)",
             "swish/silu (LOGISTIC then MUL)", "Multiply with broadcasting (squeeze-and-excitation)",
             "same-scale ops need no rounding: MaxPooling, Reshape, Flatten, ZeroPadding, Dropout"),
)

DEFAULT = Target(name="default", registry=default_registry())

TARGETS: Dict[str, Target] = {"default": DEFAULT, "tflite_int8": TFLITE_INT8}


def get_target(target: Any) -> Target:
    """A :class:`Target` from a name or a Target."""
    if isinstance(target, Target):
        return target
    if not isinstance(target, str) or target not in TARGETS:
        raise ValueError(f"target must be one of {sorted(TARGETS)} or a graphquant.targets.Target, got {target!r}")
    return TARGETS[target]


#: Layers that need no rounding of their own in the int8 runtime (same scale in and out), or that the
#: tflite_int8 target handles structurally (BatchNormalization folded into the conv before it).
_NO_ROUNDING = ("InputLayer", "BatchNormalization", "Dropout", "SpatialDropout1D", "SpatialDropout2D",
                "SpatialDropout3D", "GaussianNoise", "GaussianDropout", "ActivityRegularization")  # fmt: skip


def uncovered_layers(target: Target, model: Any) -> Dict[str, list]:
    """``{layer class: [layer names]}`` of the layers of ``model`` (top level) that ``target``'s registry does not
    match and that are not same-scale ops: the converter calibrates their outputs itself (or leaves them float,
    which the export report then says). Empty for a target without ``integer_arithmetic``."""
    if not target.integer_arithmetic:
        return {}
    from .keras.integer import SAME_SCALE_LAYERS

    known = set(_NO_ROUNDING) | set(SAME_SCALE_LAYERS)
    for p in target.registry.patterns:
        for st in p.steps:
            known |= {c if isinstance(c, str) else c.__name__ for c in st.matcher.layers}
    out: Dict[str, list] = {}
    for layer in getattr(model, "layers", []):
        name = type(layer).__name__
        if name not in known and not name.startswith(("Quantize", "Folded", "Folding")):
            out.setdefault(name, []).append(layer.name)
    return out
