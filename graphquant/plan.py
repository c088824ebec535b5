"""User intent (:class:`QuantizeConfig`) + a view + a registry -> a :class:`Plan`.

The plan is plain data: a list of :class:`InsertionPoint` saying after which
node rounding goes, which group of nodes it closes, with which format and
rounding, and whether it rounds activations (the output of the group) or the
weights of the group's target. Both front ends apply plans; ``str(plan)`` is
the readable table that ``inspect`` prints.
"""

from __future__ import annotations

import difflib
import inspect
import json
import re
from dataclasses import dataclass, field, replace
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from ._table import render_table
from .formats import (
    ROUNDING_MODES,
    Affine,
    FixedPoint,
    FloatFormat,
    Format,
    SCALED_PRESETS,
    Scaled,
    as_format,
    check_rounding,
    inference_rounding_for,
    parse_format,
)
from .patterns import DEFAULT_REGISTRY, Node, Registry, View, is_depthwise_weight
from .types import FormatLike, Selector, Selectors

__all__ = ["QuantizeConfig", "InsertionPoint", "Plan", "make_plan", "ROUNDING_MODES"]

#: Options of :meth:`QuantizeConfig.create` that apply to the whole model; every other option can
#: also be set per layer in ``overrides`` (:data:`OVERRIDE_KEYS`, derived after the class).
_MODEL_WIDE_KEYS = ("include", "exclude", "overrides", "dense", "options", "weight_storage", "storage_rounding",
                    "range_momentum")


def _check_selectors(value: Optional[Selectors], what: str) -> Tuple[Selector, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, type)):
        value = (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{what} must be a regex string, a class, or a list of them; got {value!r}") from None
    for s in items:
        if isinstance(s, str):
            try:
                re.compile(s.split(":", 1)[1] if s.startswith(("class:", "kind:")) else s)
            except re.error as e:
                raise ValueError(f"{what}: {s!r} is not a valid regular expression ({e})") from None
        elif not isinstance(s, type):
            raise TypeError(f"{what} entries must be regex strings or classes, got {s!r}")
    return items


def selector_matches(sel: Selector, node: Node, path: str) -> bool:
    """Does a user selector pick ``node``?

    * a class: the node's object is an instance (or its class names include it);
    * ``"class:Name"`` / ``"kind:Name"``: ``Name`` is the node kind or one of its classes;
    * any other string: a regex searched in the node name and its scoped path.
    """
    if isinstance(sel, type):
        return (node.obj is not None and isinstance(node.obj, sel)) or sel.__name__ in node.classes
    if sel.startswith(("class:", "kind:")):
        want = sel.split(":", 1)[1]
        return want == node.kind or want in node.classes
    return re.search(sel, node.name) is not None or re.search(sel, path) is not None


def _resolve_act_format(format: Any, bits: Any, range: Any) -> Format:
    if format is not None and bits is not None:
        raise ValueError(f"bits={bits!r} contradicts format={str(parse_format(format))!r} (give one or the other)")
    if format is not None and range is not None:
        fmt = parse_format(format)
        if isinstance(fmt, Affine) and fmt.range is None:
            return fmt.with_range(range)
        raise ValueError(f"range={range!r} contradicts format={str(fmt)!r} (give one or the other)")
    if format is None and bits is None:
        bits = 8
    if range is not None and bits is None:
        raise ValueError("range= needs bits= (or an affine format=)")
    return as_format(format, bits=bits, range=range)


def scaled_weight_format(fmt: Scaled, out_axis: int, depthwise: bool = False) -> Scaled:
    """A :class:`Scaled` format placed on a kernel whose output channels lie on ``out_axis``.

    Blocks (and per-tensor scales) run along the kernel's reduction axis, the
    axis MX hardware blocks for the dot product; ``@channel`` scales sit on the
    output channels. The format's own ``axis`` is replaced:

    * Dense ``(in, out)``, Conv ``(..., in, out)`` (``out_axis=-1``): blocks along
      ``-2`` (the input channels), channel scales along ``-1``;
    * transposed convolutions ``(..., out, in)`` (``out_axis=-2``): blocks along
      ``-1`` (the input channels), channel scales along ``-2``;
    * depthwise kernels ``(..., in, multiplier)`` (``depthwise=True``): each output
      channel ``c * multiplier + m`` is a dot product over the spatial taps of
      input channel ``c`` alone, so the kernel is rounded seen as the matrix
      ``(taps, in * multiplier)`` (:func:`graphquant.ops.per_output_channel`) and
      the format is placed as on a Dense kernel: blocks of ``k`` consecutive taps
      (row-major over the kernel window) of one output channel, channel scales per
      output channel. A 3x3 or 5x5 window (9 or 25 taps) is a single, short block
      of 32: one E8M0 scale per output channel.
    """
    if depthwise:
        out_axis = -1
    if fmt.granularity == "channel":
        return replace(fmt, axis=out_axis)
    return replace(fmt, axis=-2 if out_axis == -1 else -1)


#: A weight tensor of which more than this fraction of the nonzero values rounds to zero gets a warning.
ZEROED_WEIGHTS_WARNING = 0.5


def zeroed_weights_warning(where: str, w: Any, q: Any, fmt: Format) -> Optional[str]:
    """The warning for a weight ``w`` rounded to ``q`` on ``fmt`` when more than half of its
    nonzero values became zero (``None`` otherwise): it names ``where`` (layer and slot) and
    suggests a scaled format, whose scale follows the weights."""
    import numpy as np

    w, q = np.asarray(w, np.float32), np.asarray(q, np.float32)
    nonzero = w != 0
    n = int(nonzero.sum())
    if n == 0:
        return None
    frac = float(np.sum(nonzero & (q == 0))) / n
    if frac <= ZEROED_WEIGHTS_WARNING:
        return None
    typical = float(np.median(np.abs(w[nonzero])))
    if isinstance(fmt, FloatFormat):
        presets = [name for name, p in SCALED_PRESETS.items()
                   if p.element == fmt or p.element == replace(fmt, saturate=True)]
        hint = "a scaled format, whose scale follows the weights, keeps them: " + " or ".join(
            [f"'{m}'" for m in presets] + [f"'{fmt}@channel'"])
    elif isinstance(fmt, Scaled):
        hint = f"smaller groups keep more of them, e.g. '{fmt.element}@channel' or 'nvfp4'"
    else:
        hint = "a range that follows the weights keeps them: 'mxint8', or weight_bits= (per-channel ranges)"
    small = _smallest(fmt)
    small_s = f", the format's smallest nonzero value {small:.3g}" if small == small else ""
    return (f"{where}: {frac:.0%} of its nonzero weights round to zero on {fmt} (median |w| {typical:.3g}{small_s}); "
            f"{hint}")


def may_zero_most_weights(w: Any, fmt: Format) -> bool:
    """A cheap necessary condition for :func:`zeroed_weights_warning` (NumPy, no rounding):
    ``False`` when at most half of the nonzero values of ``w`` lie below a bound under which
    every value that rounds to zero on ``fmt`` must lie (in any rounding mode)."""
    import numpy as np

    a = np.abs(np.asarray(w, np.float32)).ravel()
    nonzero = np.count_nonzero(a)
    if nonzero == 0:
        return False
    amax = float(a.max())
    if not np.isfinite(amax):
        fin = a[np.isfinite(a)]
        amax = float(fin.max()) if fin.size else 0.0
    if isinstance(fmt, FloatFormat):
        bound = fmt.min_subnormal
    elif isinstance(fmt, Scaled):  # a scale is at most about 2 * amax / element max (E8M0: a power of two below)
        el = fmt.element
        least = el.min_subnormal if isinstance(el, FloatFormat) else el.step
        bound = 2.2 * amax * least / fmt.element_max
    elif isinstance(fmt, FixedPoint):
        bound = fmt.step * 1.01
    elif isinstance(fmt, Affine) and fmt.range is not None:
        bound = 1.01 * (fmt.range[1] - fmt.range[0]) / (fmt.quant_max - fmt.quant_min)
    else:  # a range from the weights: at most the whole tensor's
        bound = 1.01 * 2 * amax / (fmt.quant_max - fmt.quant_min)
    below = np.count_nonzero(a < bound) - (a.size - nonzero)  # the zeros are below any bound > 0
    return below > ZEROED_WEIGHTS_WARNING * nonzero


def _smallest(fmt: Format) -> float:
    if isinstance(fmt, FloatFormat):
        return fmt.min_subnormal
    if isinstance(fmt, (FixedPoint, Affine)) and getattr(fmt, "step", None) is not None:
        return fmt.step
    if isinstance(fmt, Affine) and fmt.range is not None:
        return (fmt.range[1] - fmt.range[0]) / (fmt.quant_max - fmt.quant_min)
    return float("nan")


def _check_roundings_and_flags(rounding: str, inference_rounding: Optional[str], weight_rounding: str,
                               storage_rounding: str, *, activations: Any, dense: Any, weights: Any) -> None:
    """Check :meth:`QuantizeConfig.create`'s rounding modes and bool flags (errors name the argument)."""
    check_rounding(rounding, "rounding")
    if inference_rounding is not None:
        check_rounding(inference_rounding, "inference_rounding")
    check_rounding(weight_rounding, "weight_rounding")
    check_rounding(storage_rounding, "storage_rounding")
    if storage_rounding not in ("nearest", "stochastic"):
        raise ValueError(f"storage_rounding must be 'nearest' or 'stochastic', got {storage_rounding!r}")
    for name, v in (("activations", activations), ("dense", dense)):
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be a bool, got {v!r}")
    if weights is not None and not isinstance(weights, bool):
        raise TypeError(f"weights must be a bool, got {weights!r}")


def _weight_options(weights: Optional[bool], weight_bits: Optional[int],
                    weight_format: Optional[FormatLike]) -> Tuple[bool, Optional[Format]]:
    """``(whether weights are rounded, the parsed weight format or None)`` from ``weights=``, ``weight_bits=``
    and ``weight_format=`` (either of the last two turns weight rounding on; contradictions raise)."""
    if weights is False and (weight_bits is not None or weight_format is not None):
        raise ValueError("weight_bits=/weight_format= contradict weights=False")
    use_weights = bool(weights) or weight_bits is not None or weight_format is not None
    wfmt = None
    if weight_format is not None:
        wfmt = parse_format(weight_format)
        if weight_bits is not None and getattr(wfmt, "bits", weight_bits) != weight_bits:
            raise ValueError(f"weight_bits={weight_bits} contradicts weight_format={str(wfmt)!r}")
    elif weight_bits is not None:
        Affine(weight_bits)  # validates
        if isinstance(weight_bits, bool) or not isinstance(weight_bits, int):
            raise TypeError(f"weight_bits must be an integer, got {weight_bits!r}")
    return use_weights, wfmt


def _storage_format(weight_storage: Optional[FormatLike], storage_rounding: str) -> Optional[Format]:
    """The parsed ``weight_storage=`` format (``None`` for none): a fixed grid; ``storage_rounding`` other
    than ``"nearest"`` needs one."""
    if storage_rounding != "nearest" and weight_storage is None:
        raise ValueError(f"storage_rounding={storage_rounding!r} needs weight_storage= (the format weights are stored in)")
    if weight_storage is None:
        return None
    storage = parse_format(weight_storage)
    if isinstance(storage, Affine) and storage.range is None:
        raise ValueError("weight_storage needs a fixed grid: a FixedPoint, float, or an Affine with a range")
    return storage


def _parse_overrides(overrides: Any) -> List[Tuple[Selector, Optional[Dict[str, Any]]]]:
    """``overrides=`` as ``[(selector, settings dict or None)]``, selectors and keys checked (the settings'
    values are checked by :meth:`QuantizeConfig._merge`)."""
    ov: List[Tuple[Selector, Optional[Dict[str, Any]]]] = []
    if overrides is None:
        return ov
    if not isinstance(overrides, Mapping):
        raise TypeError(f"overrides must be a dict {{selector: settings}}, got {type(overrides).__name__}")
    for sel, settings in overrides.items():
        (sel,) = _check_selectors(sel, "overrides")
        if settings is not None:
            if not isinstance(settings, Mapping):
                raise TypeError(f"overrides[{sel!r}] must be a dict or None, got {settings!r}")
            bad = set(settings) - set(OVERRIDE_KEYS)
            if bad:
                raise ValueError(f"overrides[{sel!r}]: unknown keys {sorted(bad)}; allowed: {OVERRIDE_KEYS}")
            settings = dict(settings)
        ov.append((sel, settings))
    return ov


@dataclass(frozen=True)
class QuantizeConfig:
    """What the user asks for. Build with :meth:`create` (validates the keywords).

    Attributes:
        format: activation format (``Affine`` with ``range=None`` = learned).
        rounding: rounding while training (and at inference unless stochastic).
        inference_rounding: rounding with ``training=False``; default: same as
            ``rounding``, except ``"nearest"`` when ``rounding="stochastic"``.
        activations: round the output of each matched group.
        weights: also round the weights of each group's target.
        weight_format: ``None`` = per-channel symmetric affine with
            ``weight_bits`` (or the activation bits) for integer formats, the
            activation format for float formats.
        weight_rounding: rounding of weights.
        include / exclude: selectors (name regex, class, ``"class:Name"``);
            only targets picked by ``include`` (if given) and not by ``exclude``.
        overrides: ``{selector: {bits/format/range/rounding/weights/...}}`` or
            ``{selector: None}`` to skip; later entries win.
        options: enabled optional patterns, e.g. ``{"dense"}``.
        weight_storage / storage_rounding: Gupta et al. low-precision storage.
        range_momentum: EMA momentum of learned ranges.
    """

    format: Format = field(default_factory=lambda: Affine(8))
    rounding: str = "nearest"
    inference_rounding: Optional[str] = None
    activations: bool = True
    weights: bool = False
    weight_bits: Optional[int] = None
    weight_format: Optional[Format] = None
    weight_rounding: str = "nearest"
    include: Tuple[Selector, ...] = ()
    exclude: Tuple[Selector, ...] = ()
    overrides: Tuple[Tuple[Selector, Optional[Mapping[str, Any]]], ...] = ()
    options: frozenset = frozenset()
    weight_storage: Optional[Format] = None
    storage_rounding: str = "nearest"
    range_momentum: float = 0.999

    # ------------------------------------------------------------------ building
    @classmethod
    def create(
        cls,
        bits: Optional[int] = None,
        *,
        format: Optional[FormatLike] = None,
        range: Optional[Tuple[float, float]] = None,
        rounding: str = "nearest",
        inference_rounding: Optional[str] = None,
        activations: bool = True,
        weights: Optional[bool] = None,
        weight_bits: Optional[int] = None,
        weight_format: Optional[FormatLike] = None,
        weight_rounding: str = "nearest",
        include: Optional[Selectors] = None,
        exclude: Optional[Selectors] = None,
        overrides: Optional[Mapping[Selector, Optional[Mapping[str, Any]]]] = None,
        dense: bool = False,
        options: Iterable[str] = (),
        weight_storage: Optional[FormatLike] = None,
        storage_rounding: str = "nearest",
        range_momentum: float = 0.999,
    ) -> "QuantizeConfig":
        """Validate user keywords into a config.

        Raises:
            ValueError / TypeError naming the offending argument.
        """
        fmt = _resolve_act_format(format, bits, range)
        _check_roundings_and_flags(rounding, inference_rounding, weight_rounding, storage_rounding,
                                   activations=activations, dense=dense, weights=weights)
        use_weights, wfmt = _weight_options(weights, weight_bits, weight_format)
        if not activations and not use_weights:
            raise ValueError("activations=False and no weights: nothing to quantize")
        storage = _storage_format(weight_storage, storage_rounding)
        override_weights = isinstance(overrides, Mapping) and any(
            isinstance(v, Mapping) and any(k.startswith("weight") for k in v) for v in overrides.values()
        )
        if weight_rounding != "nearest" and not use_weights and not override_weights:
            raise ValueError(
                f"weight_rounding={weight_rounding!r} has no weights to round: add weights=True "
                "(or weight_bits= / weight_format=)"
            )
        if not isinstance(range_momentum, (int, float)) or not 0.0 <= float(range_momentum) < 1.0:
            raise ValueError(f"range_momentum must be in [0, 1), got {range_momentum!r}")
        opts = set(options) if not isinstance(options, str) else {options}
        if dense:
            opts.add("dense")
        ov = _parse_overrides(overrides)
        cfg = cls(
            format=fmt,
            rounding=rounding,
            inference_rounding=inference_rounding,
            activations=activations,
            weights=use_weights,
            weight_bits=weight_bits,
            weight_format=wfmt,
            weight_rounding=weight_rounding,
            include=_check_selectors(include, "include"),
            exclude=_check_selectors(exclude, "exclude"),
            overrides=tuple(ov),
            options=frozenset(opts),
            weight_storage=storage,
            storage_rounding=storage_rounding,
            range_momentum=float(range_momentum),
        )
        for sel, settings in ov:  # validate overrides eagerly
            if settings:
                cfg._merge(settings, f"overrides[{sel!r}]")
        return cfg

    def _merge(self, settings: Mapping[str, Any], what: str) -> "QuantizeConfig":
        kw: Dict[str, Any] = {}
        try:
            if any(k in settings for k in ("bits", "format", "range")):
                fmt, bits, rng = settings.get("format"), settings.get("bits"), settings.get("range")
                if fmt is None and isinstance(self.format, (FixedPoint, Affine)):
                    # what the override leaves out comes from the config it refines:
                    # {"range": r} keeps the bits, {"bits": b} keeps a fixed range
                    if bits is None and rng is not None:
                        bits = self.format.bits
                    if rng is None and bits is not None and isinstance(self.format, FixedPoint):
                        rng = self.format.range
                kw["format"] = _resolve_act_format(fmt, bits, rng)
            for k in ("rounding", "weight_rounding"):
                if k in settings:
                    kw[k] = check_rounding(settings[k], k)
            if "inference_rounding" in settings:
                kw["inference_rounding"] = settings["inference_rounding"] and check_rounding(
                    settings["inference_rounding"], "inference_rounding"
                )
            if "activations" in settings:
                kw["activations"] = bool(settings["activations"])
            if "weights" in settings:
                kw["weights"] = bool(settings["weights"])
            if settings.get("weight_format") is not None:
                kw["weight_format"] = parse_format(settings["weight_format"])
                kw.setdefault("weights", True)
            if settings.get("weight_bits") is not None:
                kw["weight_bits"] = int(settings["weight_bits"])
                kw["weight_format"] = None
                kw.setdefault("weights", True)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{what}: {e}") from None
        return replace(self, **kw)

    # ------------------------------------------------------------------ per node
    @property
    def effective_inference_rounding(self) -> str:
        return inference_rounding_for(self.rounding, self.inference_rounding)

    def accepts(self, node: Node, path: str = "") -> bool:
        """Include/exclude/override-to-None filter on a target node."""
        path = path or node.name
        if self.include and not any(selector_matches(s, node, path) for s in self.include):
            return False
        if any(selector_matches(s, node, path) for s in self.exclude):
            return False
        cfg = self.for_node(node, path)
        return cfg is not None

    def for_node(self, node: Node, path: str = "") -> Optional["QuantizeConfig"]:
        """The config after applying matching overrides (``None`` = skip)."""
        path = path or node.name
        cfg: Optional[QuantizeConfig] = self
        for sel, settings in self.overrides:
            if selector_matches(sel, node, path):
                cfg = None if settings is None else (cfg or self)._merge(settings, f"overrides[{sel!r}]")
        return cfg

    def weight_format_for(self, axis: int, depthwise: bool = False) -> Format:
        """The weight format for a weight whose output channels lie on ``axis``
        (``depthwise``: a depthwise kernel). A :class:`Scaled` format (given as
        ``format`` or ``weight_format``) is placed on the kernel's reduction axis
        by :func:`scaled_weight_format`, whatever its own ``axis``."""
        if isinstance(self.weight_format, Scaled):
            return scaled_weight_format(self.weight_format, axis, depthwise)
        if self.weight_format is not None:
            return self.weight_format
        if isinstance(self.format, FloatFormat) and self.weight_bits is None:
            return self.format
        if isinstance(self.format, Scaled) and self.weight_bits is None:
            return scaled_weight_format(self.format, axis, depthwise)
        bits = self.weight_bits or self.format.bits
        return Affine(bits, symmetric=True, narrow_range=True, axis=axis)

    def to_dict(self) -> Dict[str, Any]:
        def sel(s: Selector) -> str:
            return f"class:{s.__name__}" if isinstance(s, type) else s

        return {
            "format": self.format.to_dict(),
            "rounding": self.rounding,
            "inference_rounding": self.inference_rounding,
            "activations": self.activations,
            "weights": self.weights,
            "weight_bits": self.weight_bits,
            "weight_format": None if self.weight_format is None else self.weight_format.to_dict(),
            "weight_rounding": self.weight_rounding,
            "include": [sel(s) for s in self.include],
            "exclude": [sel(s) for s in self.exclude],
            "overrides": [[sel(s), v] for s, v in self.overrides],
            "options": sorted(self.options),
            "weight_storage": None if self.weight_storage is None else self.weight_storage.to_dict(),
            "storage_rounding": self.storage_rounding,
            "range_momentum": self.range_momentum,
        }


#: Every keyword option of the front ends: the parameters of :meth:`QuantizeConfig.create`, the one definition.
CONFIG_KEYS: Tuple[str, ...] = tuple(inspect.signature(QuantizeConfig.create).parameters)
#: The options ``overrides`` may set per layer: all but the model-wide ones.
OVERRIDE_KEYS: Tuple[str, ...] = tuple(k for k in CONFIG_KEYS if k not in _MODEL_WIDE_KEYS)
assert set(_MODEL_WIDE_KEYS) <= set(CONFIG_KEYS), "plan._MODEL_WIDE_KEYS names an option create() does not take"


@dataclass(frozen=True)
class InsertionPoint:
    """One place where rounding goes.

    ``what="activations"``: round the output of node ``after`` (the end of the
    group). ``what="weights"``: round the weight ``slot`` of node ``target``
    (``"kernel"``, ``"depthwise_kernel"``, or ``"input:1"`` in a graph).
    """

    what: str
    scope: Tuple[str, ...]
    target: str
    target_kind: str
    after: str
    group: Tuple[str, ...]
    pattern: str
    format: Format
    rounding: str
    inference_rounding: str
    slot: Optional[str] = None

    @property
    def path(self) -> str:
        """``scope/.../after`` -- unique across nested views."""
        return "/".join(self.scope + (self.after if self.what == "activations" else f"{self.target}.{self.slot}",))

    def to_dict(self) -> Dict[str, Any]:
        return {
            "what": self.what,
            "scope": list(self.scope),
            "target": self.target,
            "target_kind": self.target_kind,
            "after": self.after,
            "group": list(self.group),
            "pattern": self.pattern,
            "format": self.format.to_dict(),
            "format_str": str(self.format),
            "rounding": self.rounding,
            "inference_rounding": self.inference_rounding,
            "slot": self.slot,
        }


@dataclass
class Plan:
    """The planner's result: insertion points plus the reasons for skips."""

    points: List[InsertionPoint]
    config: QuantizeConfig
    skipped: List[Tuple[str, str, str]] = field(default_factory=list)  # (path, kind, reason)
    notes: List[str] = field(default_factory=list)
    #: (path, kind, reason) of each convolution the front end found but cannot round
    #: (inside a custom layer: a sublayer called twice, a keras.ops/tf.nn convolution...)
    left_float: List[Tuple[str, str, str]] = field(default_factory=list)

    # -- queries
    @property
    def activations(self) -> List[InsertionPoint]:
        return [p for p in self.points if p.what == "activations"]

    @property
    def learned(self) -> List[InsertionPoint]:
        """Activation points whose format has no range yet (affine without ``range``): what calibration sets."""
        return [p for p in self.activations if isinstance(p.format, Affine) and p.format.range is None]

    def check_calibration(self, calibration_data: Any, calibration_method: str, calibration_percentile: Any = 99.99) -> None:
        """Raise ``ValueError`` when the calibration keywords contradict each other or this plan."""
        from .calibration import check_method

        check_method(calibration_method, calibration_percentile, percentile_name="calibration_percentile")
        if calibration_data is None:
            if calibration_method != "minmax":
                raise ValueError(f"calibration_method={calibration_method!r} needs calibration_data= to calibrate from")
            return
        if self.activations and not self.learned:
            raise ValueError(
                "calibration_data= has nothing to calibrate: every activation rounding of this plan has a fixed "
                f"range or needs none (e.g. {self.activations[0].format}); calibration sets learned affine ranges "
                "(bits= without range=)"
            )
        if not self.activations and self.points:
            raise ValueError("calibration_data= has nothing to calibrate: activations are not rounded (activations=False)")

    @property
    def weights(self) -> List[InsertionPoint]:
        return [p for p in self.points if p.what == "weights"]

    @property
    def targets(self) -> List[str]:
        """Scoped names of the group targets (e.g. the convolutions), in order."""
        seen: Dict[str, None] = {}
        for p in self.points:
            seen["/".join(p.scope + (p.target,))] = None
        return list(seen)

    def in_scope(self, scope: Sequence[str]) -> List[InsertionPoint]:
        scope = tuple(scope)
        return [p for p in self.points if p.scope == scope]

    def __len__(self) -> int:
        return len(self.points)

    def __iter__(self):
        return iter(self.points)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "points": [p.to_dict() for p in self.points],
            "skipped": [list(s) for s in self.skipped],
            "notes": list(self.notes),
            "left_float": [list(s) for s in self.left_float],
        }

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **kw)

    def table(self) -> str:
        """The plan as a fixed-width text table."""
        rows = [("#", "layer", "kind", "group", "insert after", "what", "format", "rounding")]
        for i, p in enumerate(self.points):
            scope = "/".join(p.scope + (p.target,))
            rnd = p.rounding if p.rounding == p.inference_rounding else f"{p.rounding} (infer {p.inference_rounding})"
            rows.append(
                (
                    str(i),
                    scope,
                    p.target_kind,
                    f"{p.pattern}: " + " > ".join(p.group),
                    p.after if p.what == "activations" else "-",
                    "activations" if p.what == "activations" else f"weights:{p.slot}",
                    str(p.format),
                    rnd,
                )
            )
        lines = render_table(rows[0], rows[1:], max_width=60)
        n_act, n_w = len(self.activations), len(self.weights)
        lines.append(f"{len(self.targets)} groups, {n_act} activation and {n_w} weight insertion points")
        if self.config.weight_storage is not None:
            lines.append(f"weight storage: {self.config.weight_storage} ({self.config.storage_rounding} rounding)")
        for path, kind, reason in self.skipped:
            lines.append(f"skipped {path} ({kind}): {reason}")
        for path, kind, reason in self.left_float:
            lines.append(f"left in float: {path} ({kind}): {reason}")
        for n in self.notes:
            lines.append(f"note: {n}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # IPython
        p.text(self.table())


def make_plan(
    view: View,
    config: Optional[QuantizeConfig] = None,
    registry: Optional[Registry] = None,
    *,
    scope: Tuple[str, ...] = (),
) -> Plan:
    """Join a view, user intent and the registry's patterns into a :class:`Plan`.

    Recurses into ``view.children`` (nested models, function bodies); their
    points carry the child's name in ``scope``.

    Raises:
        TypeError: ``view``, ``config`` or ``registry`` has the wrong type.
    """
    if not isinstance(view, View):
        raise TypeError(f"view must be a graphquant.patterns.View, got {type(view).__name__}")
    config = QuantizeConfig.create() if config is None else config
    if not isinstance(config, QuantizeConfig):
        raise TypeError(f"config must be a QuantizeConfig, got {type(config).__name__}")
    registry = DEFAULT_REGISTRY if registry is None else registry
    if not isinstance(registry, Registry):
        raise TypeError(f"registry must be a graphquant.patterns.Registry, got {type(registry).__name__}")
    _check_overrides(view, config)
    plan = Plan(points=[], config=config)
    _plan_into(plan, view, config, registry, scope)
    return plan


def _check_overrides(view: View, config: QuantizeConfig) -> None:
    """Every string key of ``overrides`` must pick some node of the view (nested views included).

    Class objects are not checked (a config may name classes a model does not use).

    Raises:
        ValueError: naming the key that matches nothing and the closest node names.
    """
    keys = [sel for sel, _ in config.overrides if isinstance(sel, str)]
    if not keys:
        return
    nodes: List[Tuple[Node, str]] = []

    def walk(v: View, scope: Tuple[str, ...]) -> None:
        for n in v.nodes.values():
            nodes.append((n, "/".join(scope + (n.name,))))
        for name, child in v.children.items():
            walk(child, scope + (name,))

    walk(view, ())
    for sel in keys:
        if any(selector_matches(sel, n, path) for n, path in nodes):
            continue
        if sel.startswith(("class:", "kind:")):
            word = sel.split(":", 1)[1]
            names = {n.kind for n, _ in nodes} | {c for n, _ in nodes for c in n.classes}
        else:
            word = sel
            names = {n.name for n, _ in nodes} | {path for _, path in nodes}
        close = difflib.get_close_matches(word, sorted(names), n=3, cutoff=0.5)
        hint = f"; closest: {', '.join(repr(c) for c in close)}" if close else ""
        raise ValueError(f"overrides: {sel!r} matches no layer or node of the model{hint}")


def _plan_into(plan: Plan, view: View, config: QuantizeConfig, registry: Registry, scope: Tuple[str, ...]) -> None:
    def path_of(n: Node) -> str:
        return "/".join(scope + (n.name,))

    rejected: List[Node] = []

    def accept(n: Node) -> bool:
        ok = config.accepts(n, path_of(n))
        if not ok and n not in rejected:
            rejected.append(n)
        return ok

    matches = registry.match(view, options=config.options, accept=accept)
    matched_targets = {m.target.name for m in matches}
    for n in rejected:
        if n.name not in matched_targets:
            plan.skipped.append((path_of(n), n.kind, "excluded by include/exclude/overrides"))
    for m in matches:
        cfg = config.for_node(m.target, path_of(m.target))
        assert cfg is not None
        group = m.names
        if cfg.activations:
            plan.points.append(
                InsertionPoint(
                    what="activations",
                    scope=scope,
                    target=m.target.name,
                    target_kind=m.target.kind,
                    after=m.after.name,
                    group=group,
                    pattern=m.pattern.name,
                    format=cfg.format,
                    rounding=cfg.rounding,
                    inference_rounding=cfg.effective_inference_rounding,
                )
            )
        if cfg.weights and m.pattern.weights:
            slots = m.pattern.slots_for(m.target)
            if not slots:
                plan.notes.append(f"{path_of(m.target)} ({m.target.kind}): no known weights to quantize")
            for slot, axis in slots:
                wr = cfg.weight_rounding
                plan.points.append(
                    InsertionPoint(
                        what="weights",
                        scope=scope,
                        target=m.target.name,
                        target_kind=m.target.kind,
                        after=m.target.name,
                        group=group,
                        pattern=m.pattern.name,
                        format=cfg.weight_format_for(axis, is_depthwise_weight(m.target, slot)),
                        rounding=wr,
                        inference_rounding=inference_rounding_for(wr),
                        slot=slot,
                    )
                )
    for name, child in view.children.items():
        _plan_into(plan, child, config, registry, scope + (name,))


# --------------------------------------------------------------------------- front ends
def resolve_config(config: Optional[QuantizeConfig], options: Mapping[str, Any]) -> QuantizeConfig:
    """The :class:`QuantizeConfig` of a front-end call (``quantize_model``, ``inspect``,
    ``convert_saved_model``, ``inspect_saved_model``, ``quantize_function``): a prepared
    ``config`` or the keyword ``options`` the caller gave, not both.

    An option at :meth:`QuantizeConfig.create`'s default (``rounding="nearest"``,
    ``bits=None``, ...) counts as not given, so every front end has the same defaults:
    neither ``bits`` nor ``format`` is 8-bit affine.

    Raises:
        TypeError: ``config`` is not a :class:`QuantizeConfig`.
        ValueError: ``config`` and options both given (the message names the options), or an
            invalid option (from :meth:`QuantizeConfig.create`).
    """
    defaults = {k: p.default for k, p in inspect.signature(QuantizeConfig.create).parameters.items()}
    given = {k: v for k, v in options.items()
             if k not in defaults or not (v is defaults[k] or (type(v) is type(defaults[k]) and v == defaults[k]))}
    if config is not None:
        if not isinstance(config, QuantizeConfig):
            raise TypeError(f"config must be a graphquant.QuantizeConfig, got {type(config).__name__}")
        if given:
            raise ValueError(f"give config= or keyword options, not both (got {sorted(given)})")
        return config
    return QuantizeConfig.create(**given)


def no_match_message(what: str, result: str) -> str:
    """The warning every front end gives when no convolution matched the patterns (nothing is
    rounded): ``what`` names the model or function, ``result`` says what is returned or written."""
    return f"{what}: no convolution matched the quantization patterns; {result}"
