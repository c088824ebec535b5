"""The graph front end: tf.function and SavedModel rewriting."""

from .function import QuantizedFunction, quantize_function
from .saved_model import ConversionReport, SavedModelError, convert_saved_model, inspect_saved_model, is_saved_model

__all__ = [
    "quantize_function",
    "QuantizedFunction",
    "convert_saved_model",
    "inspect_saved_model",
    "ConversionReport",
    "SavedModelError",
    "is_saved_model",
]
