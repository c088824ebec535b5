"""graphquant: simulate reduced numeric precision inside TensorFlow/Keras models."""

from ._version import __version__
from .formats import PRESETS, Affine, FixedPoint, FloatFormat, Format, as_format, format_from_dict, parse_format
from .ops import ROUNDING_MODES, quantize, representable_range, set_seed

__all__ = [
    "__version__",
    "Affine",
    "FixedPoint",
    "FloatFormat",
    "Format",
    "PRESETS",
    "ROUNDING_MODES",
    "as_format",
    "format_from_dict",
    "parse_format",
    "quantize",
    "representable_range",
    "set_seed",
]
