"""The Keras front end: plan a model's rounding and apply the plan.

``quantize_model`` checks its options (a deployment target's among them),
makes the :class:`~graphquant.plan.Plan`, and has :mod:`graphquant.keras.clone`
copy the model layer by layer (new layer objects from ``get_config``, the
source's weights copied in), inserting a :class:`~graphquant.keras.Quantize`
layer after each planned activation point and wrapping targets whose weights
are planned in :class:`~graphquant.keras.QuantizeWeights`. Nested models are
rewritten recursively (a shared nested model stays shared in the copy). The
source model is never modified. Weight storage rounding is
:mod:`graphquant.keras.storage`; the copy's process-wide speed-ups are
:mod:`graphquant.keras._speedups`.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import TYPE_CHECKING, Any, List, Mapping, Optional, Tuple, Union

import keras

from ..formats import Affine
from ..patterns import Registry, View
from ..plan import (CONFIG_KEYS, Plan, QuantizeConfig, make_plan, may_zero_most_weights, no_match_message, resolve_config,
                    zeroed_weights_warning)
from ..types import DataLike, FormatLike, Selector, Selectors
from ._speedups import cached_signatures, gc_paused, recursion_room
from .clone import Rewriter, count_layers
from .integer import link_integer
from .integer_ops import DEFAULT_KERNELS, check_kernels
from .layers import Quantize, QuantizeWeights
from .storage import apply_weight_storage
from .view import is_sequential, check_model, is_graph_model, keras_view

if TYPE_CHECKING:  # pragma: no cover
    from ..targets import Target

__all__ = ["quantize_model", "inspect", "plan_model", "apply_weight_storage", "zeroed_weights_warnings"]

log = logging.getLogger(__name__)



def plan_model(
    model: keras.Model, config: Optional[QuantizeConfig] = None, registry: Optional[Registry] = None, **kwargs: Any
) -> Plan:
    """The :class:`Plan` for ``model`` (nothing is changed)."""
    check_model(model)
    return _make_keras_plan(model, resolve_config(config, kwargs), registry)


def _make_keras_plan(model: keras.Model, cfg: QuantizeConfig, registry: Optional[Registry]) -> Plan:
    view = keras_view(model)
    plan = make_plan(view, cfg, registry)
    for path, sub in _subclassed_inside(view):
        msg = (f"{path} is a subclassed model ({type(sub).__name__}): it is copied as it is and nothing inside "
               "it is quantized (build it as a Functional model to have it rewritten)")
        plan.notes.append(msg)
        log.warning(msg)
    plan.left_float.extend(_left_float(view))
    return plan


def _left_float(view: View, prefix: str = "") -> List[Tuple[str, str, str]]:
    """``(path, kind, reason)`` of the convolutions custom layers hold but cannot round (nested views included)."""
    out = [(prefix + p, k, r) for p, k, r in getattr(view, "left_float", ())]
    for name, child in view.children.items():
        if not hasattr(child, "left_float"):  # a nested model: its custom layers' own lists
            out += _left_float(child, f"{prefix}{name}/")
        # a custom layer's list already holds its nested custom layers' convolutions
        else:
            out += [(f"{prefix}{name}/{p}", k, r) for p, k, r in child.left_float]
    return out


def _subclassed_inside(view: View, prefix: str = "") -> List[Tuple[str, keras.Model]]:
    """``(path, model)`` of every subclassed model called in a model's view (nested views included)."""
    out: List[Tuple[str, keras.Model]] = []
    seen: set = set()
    for node in view.nodes.values():
        obj = node.obj
        if isinstance(obj, keras.Model) and not is_graph_model(obj) and id(obj) not in seen:
            seen.add(id(obj))
            out.append((prefix + obj.name, obj))
    for name, child in view.children.items():
        out += _subclassed_inside(child, f"{prefix}{name}/")
    return out


def inspect(
    model: keras.Model,
    bits: Optional[int] = None,
    *,
    config: Optional[QuantizeConfig] = None,
    registry: Optional[Registry] = None,
    **kwargs: Any,
) -> Plan:
    """The plan ``quantize_model`` would apply, without changing anything.

    Takes the same options as :func:`quantize_model`. ``print(plan)`` shows a
    table (layer, group, insertion point, format); the plan is data
    (``plan.points``, ``plan.to_dict()``).
    """
    if bits is not None:
        kwargs["bits"] = bits
    bad = set(kwargs) - set(CONFIG_KEYS)
    if bad:
        raise TypeError(f"inspect() got unexpected keyword arguments {sorted(bad)}")
    return plan_model(model, config, registry, **kwargs)


def quantize_model(
    model: keras.Model,
    bits: Optional[int] = None,
    *,
    format: Optional[FormatLike] = None,
    range: Optional[Tuple[float, float]] = None,
    rounding: str = "nearest",
    weights: Optional[bool] = None,
    weight_bits: Optional[int] = None,
    weight_format: Optional[FormatLike] = None,
    weight_rounding: str = "nearest",
    include: Optional[Selectors] = None,
    exclude: Optional[Selectors] = None,
    overrides: Optional[Mapping[Selector, Optional[Mapping[str, Any]]]] = None,
    dense: bool = False,
    weight_storage: Optional[FormatLike] = None,
    storage_rounding: str = "nearest",
    calibration_data: Optional[DataLike] = None,
    calibration_method: str = "minmax",
    calibration_percentile: float = 99.99,
    verbose: Optional[bool] = None,
    config: Optional[QuantizeConfig] = None,
    registry: Optional[Registry] = None,
    fold_batchnorm: bool = True,
    seed: Optional[int] = None,
    allow_requantize: bool = False,
    target: Union[str, "Target", None] = None,
    kernels: Optional[str] = None,
    freeze_bn_after: Optional[int] = None,
    **options: Any,
) -> keras.Model:
    """A copy of ``model`` with rounding after every convolution group.

    The source model is untouched: the copy has new layers with the source's
    weights. Each group found by the pattern registry (default: convolution
    -> [BatchNormalization] -> [activation]) gets one
    :class:`graphquant.keras.Quantize` layer after its last layer.

    Args:
        model: a Functional or Sequential Keras 3 model (nested models allowed).
        bits: bits of the activation format. Alone: 8-bit-style affine with a
            learned range (EMA while training, or ``calibration_data``); with
            ``range``: :class:`FixedPoint` over that range. Default 8.
        format: a format (object, string like ``"e4m3"``, or dict) instead of bits.
        range: ``(lo, hi)`` fixed range.
        rounding: rounding mode while training; inference uses it too unless
            it is ``"stochastic"`` (then ``"nearest"``; see
            ``inference_rounding=``).
        weights: also round the targets' weights (per-channel symmetric affine
            with ``weight_bits`` by default; float formats: the same format).
        weight_bits / weight_format / weight_rounding: weight rounding options.
            A scaled format (``format`` or ``weight_format``, e.g. ``"mxfp4"``)
            is placed on each kernel's reduction axis, whatever its own ``axis``:
            see :func:`graphquant.plan.scaled_weight_format`. A weight of which
            more than half of the nonzero values round to zero is warned about
            (a ``UserWarning``, the log and a plan note naming the layer and
            suggesting a scaled format).
        include / exclude: which targets, by name regex, class or ``"class:Name"``.
            Convolutions inside custom layers are addressed by path: the layer's
            name, then attribute names (``"block_3/conv"``,
            ``"block_3/se/reduce"``); see :mod:`graphquant.keras.custom`.
        overrides: ``{selector: {"bits": 4, "rounding": ...}}`` per target, or
            ``{selector: None}`` to skip.
        dense: treat ``Dense`` layers as targets too.
        weight_storage / storage_rounding: round every trainable weight onto
            this storage format after every optimizer update (Gupta et al. 2015).
        calibration_data: a numpy array, ``tf.data.Dataset`` or iterable of
            batches; sets the learned ranges before the model is returned.
        calibration_method: ``"minmax"``, ``"percentile"``, ``"mse"`` or
            ``"entropy"`` (see :mod:`graphquant.calibration`).
        calibration_percentile: ``p`` of ``"percentile"``, in (50, 100] (default 99.99).
        verbose: a progress bar while calibrating (``None``: when stderr is a
            terminal and calibration runs longer than a second).
        config: a prepared :class:`QuantizeConfig` (instead of the keywords).
        registry: the pattern registry (default :data:`DEFAULT_REGISTRY`).
        fold_batchnorm: copy ``BatchNormalization`` layers as
            :class:`~graphquant.keras.FoldingBatchNormalization`, which at
            inference in a ``tf.function`` (``predict``, ``export``) folds into
            a preceding weight-quantized convolution: same values up to float
            reassociation, same rounding points, one memory pass less.
        seed: integer seed for every stochastic rounding the copy does
            (activation and weight layers, weight storage), so runs repeat;
            ``None`` draws from Keras' global seed
            (``keras.utils.set_random_seed``).
        allow_requantize: quantize a model that already contains graphquant
            rounding layers (:class:`Quantize` / :class:`QuantizeWeights`),
            stacking a second rounding on the first; warned about (a
            ``UserWarning`` and the log) and noted in the plan. Without it
            such a model is a ``ValueError``.
        target: a deployment target (``"tflite_int8"`` or a
            :class:`graphquant.targets.Target`): its registry places rounding
            where the runtime rounds (for ``tflite_int8``: the model input,
            conv/depthwise/Dense groups with BN folded before the weights are
            rounded, Add, Concatenate, pooling, resizing, ...) with its
            weight and activation formats (int8 per-channel symmetric narrow
            weights, int8 per-tensor asymmetric activations). Give
            ``calibration_data`` (or train) to set the ranges.
        kernels: with a target that computes the runtime's integer arithmetic
            at inference (``tflite_int8``), which kernel set: ``"xnnpack"``
            (default: the XNNPACK delegate a default LiteRT interpreter
            applies, what a deployed model usually runs) or ``"reference"``
            (LiteRT's reference kernels, ``BUILTIN_REF``). Change it later
            with :func:`graphquant.keras.integer.link_integer`.
        freeze_bn_after: with a target that folds BatchNormalization before
            rounding: training steps after which the fold uses the moving
            statistics instead of the batch statistics (``None``: never).
        **options: further :class:`QuantizeConfig` options
            (``inference_rounding``, ``activations``, ``options``, ``range_momentum``).

    Returns:
        A new ``keras.Model`` (Functional, or Sequential for a Sequential source).

    Raises:
        TypeError: ``model`` is not a Functional/Sequential Keras model.
        ValueError: contradictory or invalid options (the message names them),
            or ``model`` is already quantized and ``allow_requantize`` is False.
    """
    t0 = time.perf_counter()
    check_model(model)
    existing, requant_msg = _existing_rounding(model, allow_requantize)
    bad = set(options) - set(CONFIG_KEYS)
    if bad:
        raise TypeError(f"quantize_model() got unexpected keyword arguments {sorted(bad)}")
    tgt = None
    if target is not None:
        tgt = _resolve_target(target, registry=registry, config=config, bits=bits, format=format, range=range)
        format, weights, weight_bits, weight_format, overrides = _target_formats(
            tgt, format, weights, weight_bits, weight_format, overrides
        )
        registry = tgt.registry
    _check_target_options(tgt, kernels, freeze_bn_after)
    kw = dict(options, bits=bits, format=format, range=range, weights=weights, weight_bits=weight_bits,
              weight_format=weight_format, include=include, exclude=exclude, overrides=overrides,
              weight_storage=weight_storage, rounding=rounding, weight_rounding=weight_rounding,
              storage_rounding=storage_rounding, dense=dense)  # options at their defaults count as not given
    cfg = resolve_config(config, kw)
    model, plan = _plan_for_target(model, cfg, registry, tgt)
    plan.check_calibration(calibration_data, calibration_method, calibration_percentile)
    _warn_about_plan(plan, model, existing, requant_msg)
    _check_copy_options(seed, fold_batchnorm)
    if tgt is not None:
        plan.notes.append(f"target {tgt.name}: {tgt.arithmetic}")
    rw = Rewriter(plan, fold_batchnorm=fold_batchnorm, seed=seed,
                  fold_before_rounding=bool(tgt is not None and tgt.fold_batchnorm), freeze_bn_after=freeze_bn_after)
    new = _clone(model, plan, rw)
    if cfg.weight_storage is not None:
        apply_weight_storage(new, cfg.weight_storage, cfg.storage_rounding, seed=rw.next_seed())
    for msg in zeroed_weights_warnings(new):
        warnings.warn(msg, UserWarning, stacklevel=2)
        log.warning(msg)
        plan.notes.append(msg)
    new._graphquant_plan = plan  # for inspection; not serialized
    _prepare_inference(new, tgt, kernels, calibration_data, calibration_method, calibration_percentile, verbose)
    log.info("quantize_model: %d rounding layers inserted in %.2fs", rw.inserted, time.perf_counter() - t0)
    return new


def _resolve_target(target: Union[str, "Target"], *, registry: Optional[Registry],
                    config: Optional[QuantizeConfig], bits: Optional[int], format: Optional[FormatLike],
                    range: Any) -> "Target":
    """The :class:`graphquant.targets.Target` that ``target=`` names; ``registry=``/``config=`` and an
    activation format other than its own contradict it."""
    from ..targets import get_target

    tgt = get_target(target)
    if registry is not None or config is not None:
        raise ValueError("give target= or registry=/config=, not both")
    if bits not in (None, 8) or format is not None or range is not None:
        raise ValueError(f"target={tgt.name!r} sets the activation format; drop bits=/format=/range=")
    return tgt


def _plan_for_target(model: keras.Model, cfg: QuantizeConfig, registry: Optional[Registry],
                     tgt: Any) -> Tuple[keras.Model, Plan]:
    """``(the model to copy, its plan)``: a target that splits activations off their layers first gets a
    model with them split (:func:`graphquant.keras.split.split_activations`), and notes in the plan."""
    split: List[str] = []
    if tgt is not None and tgt.split_activations:
        from .split import split_activations

        model, split = split_activations(model)
    plan = _make_keras_plan(model, cfg, registry)
    if tgt is not None:
        _target_notes(plan, tgt, model, split)
    return model, plan


def _check_copy_options(seed: Optional[int], fold_batchnorm: bool) -> None:
    """``seed=`` is an int or None, ``fold_batchnorm=`` a bool."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    if not isinstance(fold_batchnorm, bool):
        raise TypeError(f"fold_batchnorm must be a bool, got {fold_batchnorm!r}")


def _prepare_inference(new: keras.Model, tgt: Any, kernels: Optional[str], calibration_data: Any,
                       calibration_method: str, calibration_percentile: float, verbose: Optional[bool]) -> None:
    """Calibrate the copy's ranges on ``calibration_data`` (when given), then, for a target that computes the
    runtime's integer arithmetic, link its layers to the integer kernels."""
    if calibration_data is not None:
        from ..ranges import calibrate_keras

        calibrate_keras(new, calibration_data, calibration_method, percentile=calibration_percentile,
                         what="calibration_data", verbose=verbose)  # fmt: skip
    if tgt is not None and tgt.integer_arithmetic:
        n_linked = link_integer(new, kernels or DEFAULT_KERNELS)
        log.info("quantize_model: %d layers compute the runtime's integer kernels (%s) at inference", n_linked,
                 kernels or DEFAULT_KERNELS)


def _existing_rounding(model: keras.Model, allow_requantize: bool) -> Tuple[int, str]:
    """How many graphquant rounding layers ``model`` already has, and the message that says so; raises
    unless ``allow_requantize``."""
    if not isinstance(allow_requantize, bool):
        raise TypeError(f"allow_requantize must be a bool, got {allow_requantize!r}")
    existing = sum(1 for l in model._flatten_layers(include_self=False, recursive=True)
                   if isinstance(l, (Quantize, QuantizeWeights)))
    requant_msg = f"model {model.name!r} is already quantized ({existing} graphquant rounding layers)"
    if existing and not allow_requantize:
        raise ValueError(f"{requant_msg}; pass allow_requantize=True (CLI: --force) to stack a second rounding")
    return existing, requant_msg


def _target_formats(tgt: "Target", format: Optional[FormatLike], weights: Optional[bool], weight_bits: Optional[int],
                    weight_format: Optional[FormatLike], overrides: Any) -> Tuple[Any, Optional[bool], Optional[int], Any, Any]:  # fmt: skip
    """The activation and weight options a deployment target sets: ``(format, weights, weight_bits,
    weight_format, overrides)``."""
    if tgt.activation_format is not None:
        format = tgt.activation_format
    if tgt.weight_format is not None:
        if weights is False:
            raise ValueError(f"target={tgt.name!r} rounds the weights; weights=False contradicts it")
        weights = True
        per_channel = getattr(tgt.weight_format, "axis", None) is not None
        if weight_format is None and per_channel:
            # per output channel on each weight's own channel axis (a depthwise kernel's is -2: a fixed
            # axis=-1 gave all its channels one scale); sub-8-bit QAT: the same grid with fewer bits
            weight_bits = weight_bits or tgt.weight_format.bits
        elif weight_bits is None and weight_format is None:
            weight_format = tgt.weight_format
        elif weight_format is None:
            weight_format = Affine(weight_bits, symmetric=True, narrow_range=True, axis=-1)
            weight_bits = None
    if tgt.dense_weight_format is not None and overrides is None:
        wb = getattr(weight_format, "bits", None) or weight_bits or 8  # weight_bits=4: Dense too
        overrides = {"class:Dense": {"weight_format": Affine(wb, symmetric=True, narrow_range=True)}}
    return format, weights, weight_bits, weight_format, overrides


def _check_target_options(tgt: Any, kernels: Optional[str], freeze_bn_after: Optional[int]) -> None:
    """``kernels=`` and ``freeze_bn_after=`` only mean something with a target that uses them."""
    if kernels is not None:
        check_kernels(kernels)
        if tgt is None or not tgt.integer_arithmetic:
            raise ValueError("kernels= needs a target that computes integer kernels (target='tflite_int8')")
    if freeze_bn_after is not None and (tgt is None or not tgt.fold_batchnorm):
        raise ValueError("freeze_bn_after= needs a target that folds BatchNormalization (target='tflite_int8')")


def _target_notes(plan: Plan, tgt: Any, model: keras.Model, split: List[str]) -> None:
    """Plan notes on what a deployment target leaves out: layers it does not cover, activations it
    could not split off their layer, and those it did split."""
    from ..targets import uncovered_layers

    for cls, names in uncovered_layers(tgt, model).items():
        plan.notes.append(f"target {tgt.name} does not cover {cls} ({', '.join(names[:4])}"
                          f"{', ...' if len(names) > 4 else ''}): no rounding point; the converter calibrates "
                          "its output itself, or it stays float (export_tflite's report then says the model "
                          "is not fully integer)")
    if tgt.split_activations and not split and is_sequential(model):
        from .split import to_split

        kept = [l.name for l in model.layers if to_split(l)]
        if kept:
            plan.notes.append(f"target {tgt.name}: a Sequential model keeps the own activation of "
                              f"{', '.join(kept[:4])} inside its layer (one rounding after it; the converter "
                              "calibrates the tensor before the activation itself): build it as a Functional model "
                              "to split it")
    if split:
        plan.notes.append(f"target {tgt.name}: the activation of {len(split)} layers ({', '.join(split[:4])}"
                          f"{', ...' if len(split) > 4 else ''}) runs as its own layer <name>_activation after a "
                          "rounding point (the converter fuses only ReLU/ReLU6 into a conv/Dense)")


def _warn_about_plan(plan: Plan, model: keras.Model, existing: int, requant_msg: str) -> None:
    """Warn (``UserWarning`` at quantize_model's caller, and the log) about a plan that stacks a second
    rounding, leaves convolutions of custom layers float, or has no point at all."""
    if existing:
        if plan.points:
            what = f"stacking a second rounding at {len(plan.targets)} groups (allow_requantize=True)"
        else:  # a convolution wrapped in QuantizeWeights is not matched again
            what = "allow_requantize=True, but no group is found outside the existing rounding layers; nothing is stacked"
        msg = f"{requant_msg}: {what}"
        warnings.warn(msg, UserWarning, stacklevel=3)
        log.warning(msg)
        plan.notes.append(f"requantized: the model already had {existing} graphquant rounding layers; {what}")
    if plan.left_float:
        msg = (f"{len(plan.left_float)} convolutions inside custom layers are left in float (they cannot be swapped; "
               f"plan.left_float names each and why), e.g. {plan.left_float[0][0]}: {plan.left_float[0][2]}")
        warnings.warn(msg, UserWarning, stacklevel=3)
        log.warning(msg)
    if not plan.points:
        msg = no_match_message(f"model {model.name!r}", "returning a plain copy")
        warnings.warn(msg, UserWarning, stacklevel=3)
        log.warning(msg)


def _clone(model: keras.Model, plan: Plan, rw: Rewriter) -> keras.Model:
    """``rw``'s copy of ``model`` with the source's weights, built with the copy speed-ups on."""
    with gc_paused(), recursion_room(4 * (len(plan.points) + count_layers(model))):
        try:
            with cached_signatures():
                new = rw.rewrite(model)
        finally:
            rw.unhook()
        rw.copy_weights()
    return new


def zeroed_weights_warnings(model: keras.Model) -> List[str]:
    """A warning (:func:`graphquant.plan.zeroed_weights_warning`) for each weight of ``model``'s
    :class:`QuantizeWeights` layers of which more than half of the nonzero values round to zero."""
    from ..rounding import use_xla

    out = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, QuantizeWeights):
            if not any(may_zero_most_weights(layer._variable(s["slot"]).numpy(), s["format"]) for s in layer.slots):
                continue  # the usual case: no rounding needed to know
            with use_xla(False):  # once per weight, eagerly: compiling a kernel per shape costs far more
                rounded = layer.rounded_weights()
            for slot, w, q, fmt in rounded:
                msg = zeroed_weights_warning(f"layer {layer.name!r} ({type(layer.layer).__name__}.{slot})", w, q, fmt)
                if msg:
                    out.append(msg)
    return out
