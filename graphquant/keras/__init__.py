"""The Keras 3 front end: ``quantize_model``, ``inspect`` and the layers it inserts."""

from .fold import FoldedConvBatchNorm
from .layers import FoldingBatchNormalization, Quantize, QuantizeWeights, StorageRounding, quantize_weight
from .loading import load_model
from .rewrite import inspect, plan_model, quantize_model
from .storage import apply_weight_storage
from .view import keras_view

__all__ = [
    "Quantize",
    "QuantizeWeights",
    "StorageRounding",
    "FoldingBatchNormalization",
    "FoldedConvBatchNorm",
    "quantize_weight",
    "quantize_model",
    "inspect",
    "plan_model",
    "apply_weight_storage",
    "keras_view",
    "load_model",
]
