"""graphquant: simulate reduced numeric precision inside TensorFlow/Keras models.

The public API, re-exported (see the README for a tour):

* numerics: :func:`quantize`, the formats :class:`FixedPoint`, :class:`Affine`,
  :class:`FloatFormat`, :class:`Scaled` (MX, NVFP4), :data:`PRESETS`,
  :data:`SCALED_PRESETS`, :func:`parse_format`;
* Keras models: :func:`quantize_model`, :func:`inspect`, :func:`calibrate`,
  the inserted layer ``graphquant.keras.Quantize``;
* evidence: :func:`compare` (per-layer error report);
* graphs: :func:`quantize_function`, :func:`convert_saved_model`,
  :func:`inspect_saved_model`, :func:`convert_batch`;
* the pattern registry: :class:`Registry`, :class:`Pattern`, :class:`Step`,
  :class:`Matcher`, :data:`DEFAULT_REGISTRY`, :class:`QuantizeConfig`, :class:`Plan`.

Importing graphquant registers its Keras layers for serialization, so a
quantized ``.keras`` file loads without ``custom_objects``.
"""

from ._version import __version__
from .formats import PRESETS, SCALED_PRESETS, Affine, FixedPoint, FloatFormat, Format, Scaled, as_format, format_from_dict, parse_format
from .ops import ROUNDING_MODES, quantize, representable_range, set_seed
from .rounding import use_xla
from .patterns import (
    ACTIVATION,
    BIAS,
    CONV,
    DEFAULT_REGISTRY,
    DENSE,
    NORM,
    Match,
    Matcher,
    Node,
    Pattern,
    Registry,
    Step,
    View,
    default_registry,
    weight_slots,
)
from .plan import InsertionPoint, Plan, QuantizeConfig, make_plan
from .ranges import calibrate
from . import keras  # noqa: F401  (registers the Keras layers for deserialization)
from .keras import Quantize, QuantizeWeights, StorageRounding, apply_weight_storage, inspect, quantize_model
from .graph import ConversionReport, SavedModelError, convert_saved_model, inspect_saved_model, quantize_function
from .batch import convert_batch
from .compare import CompareReport, compare
from .tflite import TFLiteReport, TFLiteScales, compare_tflite, export_tflite, tflite_scales

__all__ = [
    "__version__",
    # numerics
    "Affine",
    "FixedPoint",
    "FloatFormat",
    "Format",
    "PRESETS",
    "ROUNDING_MODES",
    "SCALED_PRESETS",
    "Scaled",
    "as_format",
    "format_from_dict",
    "parse_format",
    "quantize",
    "representable_range",
    "set_seed",
    "use_xla",
    # patterns and plans
    "ACTIVATION",
    "BIAS",
    "CONV",
    "DEFAULT_REGISTRY",
    "DENSE",
    "NORM",
    "InsertionPoint",
    "Match",
    "Matcher",
    "Node",
    "Pattern",
    "Plan",
    "QuantizeConfig",
    "Registry",
    "Step",
    "View",
    "default_registry",
    "make_plan",
    "weight_slots",
    # Keras
    "Quantize",
    "QuantizeWeights",
    "StorageRounding",
    "apply_weight_storage",
    "calibrate",
    "inspect",
    "quantize_model",
    # evidence
    "CompareReport",
    "compare",
    # deployment
    "TFLiteReport",
    "TFLiteScales",
    "compare_tflite",
    "export_tflite",
    "tflite_scales",
    # graphs
    "ConversionReport",
    "SavedModelError",
    "convert_batch",
    "convert_saved_model",
    "inspect_saved_model",
    "quantize_function",
]
