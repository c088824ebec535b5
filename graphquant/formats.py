"""Number formats: what a format is, as pure, validated, immutable data.

Nothing in this module imports TensorFlow. A format describes a grid of
representable values; :func:`graphquant.quantize` rounds tensors onto it.

Three families:

* :class:`FixedPoint` -- ``2**bits`` evenly spaced values ``lo + k*step`` with
  ``step = (hi - lo) / 2**bits``; saturating.
* :class:`Affine` -- TensorFlow's FakeQuant integer grid (nudged zero point,
  ``step = (hi - lo) / (2**bits - 1)``, optional narrow range), per tensor or
  per channel. A range of ``None`` means "to be learned or calibrated".
* :class:`FloatFormat` -- a reduced-precision binary floating-point format of
  any exponent/mantissa width (bfloat16, float16, fp8, fp6, fp4, ...).
* :class:`Scaled` -- an element format (float or fixed point) with a shared scale
  per tensor, per channel or per block of ``k`` elements: scaled fp8, OCP
  Microscaling (MX: ``mxfp8_e4m3``, ``mxfp4``, ``mxint8``, ...) and ``nvfp4``.

Every format converts to and from a plain dict (:meth:`to_dict`,
:func:`format_from_dict`) and a short string (``str(fmt)``,
:func:`parse_format`), e.g. ``"fixed8[0,1]"``, ``"affine8"``,
``"affine8[-1,1]:narrow:axis=-1"``, ``"e4m3"``, ``"e3m4:nosub"``,
``"mxfp4"``, ``"nvfp4"``, ``"e4m3@channel"``, ``"e2m1@block32:scale=e8m0"``.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

__all__ = [
    "register_format",
    "unregister_format",
    "registered_formats",
    "inference_rounding_for",
    "FixedPoint",
    "Affine",
    "FloatFormat",
    "Scaled",
    "Format",
    "PRESETS",
    "SCALED_PRESETS",
    "parse_format",
    "format_from_dict",
    "as_format",
    "ROUNDING_MODES",
    "check_rounding",
]

#: Rounding modes understood by every kernel (see the README's table).
ROUNDING_MODES = ("nearest", "nearest_away", "toward_zero", "down", "up", "stochastic")


def check_rounding(value: Any, what: str = "rounding") -> str:
    """Return ``value`` if it names a rounding mode; ``ValueError`` naming ``what`` otherwise."""
    if not isinstance(value, str) or value not in ROUNDING_MODES:
        raise ValueError(f"{what} must be one of {ROUNDING_MODES}, got {value!r}")
    return value


def inference_rounding_for(rounding: str, inference_rounding: Optional[str] = None) -> str:
    """The rounding used at inference (``training=False``, exported and served graphs):
    ``inference_rounding`` if given, else ``rounding`` -- except that stochastic
    training rounding infers with ``"nearest"`` (deterministic serving). The one
    place this default is decided for every front end."""
    if inference_rounding is not None:
        return inference_rounding
    return "nearest" if rounding == "stochastic" else rounding


_MAX_FIXED_BITS = 24
_MAX_AFFINE_BITS = 24


def _check_bits(bits: Any, lo: int, hi: int, what: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int):
        # numpy integers are fine, floats are not
        if hasattr(bits, "__index__") and not isinstance(bits, bool):
            bits = int(bits.__index__())
        else:
            raise TypeError(f"{what} must be an integer, got {type(bits).__name__} {bits!r}")
    if not lo <= bits <= hi:
        raise ValueError(f"{what} must be between {lo} and {hi}, got {bits}")
    return bits


#: Largest magnitude allowed for a range endpoint and for its width ``hi - lo``: 2**127,
#: half of float32's largest finite value (about 3.4e38), so that every value the
#: kernels compute in float32 (the grid, one step beyond either end, FakeQuant's
#: nudged range) stays finite.
RANGE_MAX = 2.0**127
#: Smallest grid step allowed: float32's smallest normal number. TensorFlow and
#: XLA on CPU flush subnormal numbers to zero, so a smaller step divides by zero
#: (NaN) or rounds differently with XLA on and off.
RANGE_MIN_STEP = 2.0**-126


def _f32(v: float) -> float:
    """``v`` rounded to float32 (to nearest), as a Python float; ``|v| <= RANGE_MAX``."""
    return struct.unpack("f", struct.pack("f", v))[0]


def _check_range(rng: Any, steps: int, what: str = "range", symmetric: bool = False) -> Tuple[float, float]:
    """Validate a ``(lo, hi)`` range for a grid of ``steps`` equal steps; return it as floats.

    The one rule for every range of a :class:`FixedPoint` or :class:`Affine` format
    (and so for ``quantize(..., range=...)`` with Python numbers). The kernels compute
    in float32, so the range must be one float32 can hold:

    * ``lo`` and ``hi`` are finite numbers with ``lo < hi``;
    * ``|lo|``, ``|hi|`` and ``hi - lo`` are at most :data:`RANGE_MAX` (``2**127``,
      about 1.7e38);
    * the grid step ``(hi - lo) / steps``, with ``lo`` and ``hi`` rounded to float32
      first, is at least :data:`RANGE_MIN_STEP` (``2**-126``, float32's smallest
      normal number; this also rejects ranges whose ends round to the same float32).

    ``symmetric=True`` checks (and returns) ``(-m, m)``, ``m = max(|lo|, |hi|)``.
    Raises ``ValueError`` naming ``what`` and the bound broken.
    """
    try:
        lo, hi = rng
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a pair (lo, hi) of numbers, got {rng!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{what} must be finite, got ({lo}, {hi})")
    if not lo < hi:
        raise ValueError(f"{what} must have lo < hi, got ({lo}, {hi})")
    sym = ""
    if symmetric:
        sym = f" (made symmetric from ({lo:g}, {hi:g}))"
        m = max(abs(lo), abs(hi))
        lo, hi = -m, m
    if max(abs(lo), abs(hi), hi - lo) > RANGE_MAX:
        raise ValueError(
            f"{what} ({lo:g}, {hi:g}){sym} is too wide for float32: |lo|, |hi| and hi - lo must be at "
            f"most 2**127 ({RANGE_MAX:.4g}) so that the grid stays finite"
        )
    step = (_f32(hi) - _f32(lo)) / steps
    if step < RANGE_MIN_STEP:
        raise ValueError(
            f"{what} ({lo:g}, {hi:g}){sym} is too narrow for float32: its grid step "
            f"({step:g} = (hi - lo) / {steps}, with lo and hi rounded to float32) must be at least "
            f"2**-126 ({RANGE_MIN_STEP:.4g}, the smallest normal float32; TensorFlow flushes smaller numbers to zero)"
        )
    return (lo, hi)


def _num(v: float) -> str:
    """Shortest text for a float that reads back to the same value."""
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


@dataclass(frozen=True)
class FixedPoint:
    """Fixed point over a range: ``2**bits`` values ``lo + k*step``.

    ``step = (hi - lo) / 2**bits`` and ``k = 0 ... 2**bits - 1``, so ``hi`` itself
    is not on the grid (the top value is ``hi - step``). Values outside saturate.

    >>> FixedPoint(8, range=(0.0, 1.0)).step
    0.00390625

    Args:
        bits: number of bits, 1 to 24.
        range: ``(lo, hi)`` with ``lo < hi``, both finite, that float32 can hold:
            ``|lo|``, ``|hi|`` and ``hi - lo`` at most ``2**127`` and a step of at
            least ``2**-126`` (float32's smallest normal number); see
            :data:`RANGE_MAX` and :data:`RANGE_MIN_STEP`. ``ValueError`` otherwise.
    """

    bits: int
    range: Tuple[float, float]

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", _check_bits(self.bits, 1, _MAX_FIXED_BITS))
        object.__setattr__(self, "range", _check_range(self.range, 2**self.bits))

    @property
    def step(self) -> float:
        lo, hi = self.range
        return (hi - lo) / 2**self.bits

    @property
    def levels(self) -> int:
        return 2**self.bits

    @property
    def min_value(self) -> float:
        return self.range[0]

    @property
    def max_value(self) -> float:
        return self.range[0] + (self.levels - 1) * self.step

    def to_dict(self) -> dict:
        return {"kind": "fixed", "bits": self.bits, "range": list(self.range)}

    def __str__(self) -> str:
        lo, hi = self.range
        return f"fixed{self.bits}[{_num(lo)},{_num(hi)}]"


@dataclass(frozen=True)
class Affine:
    """TensorFlow-compatible affine integer grid (FakeQuant semantics).

    The range ``(lo, hi)`` is nudged so that zero is exactly representable,
    ``step = (hi - lo) / (2**bits - 1)`` (``2**bits - 2`` with ``narrow_range``),
    exactly as ``tf.quantization.fake_quant_with_min_max_vars``. With
    ``rounding="nearest"`` results equal TensorFlow's kernel bit for bit (its
    ties round upward on the integer grid).

    Args:
        bits: 2 to 24 (TensorFlow's own kernel covers 2 to 16).
        range: ``(lo, hi)``, or ``None`` when the range is learned or
            calibrated by a model rewriter (then pass ``range=`` to
            :func:`graphquant.quantize`). As for :class:`FixedPoint`, ``lo < hi``,
            ``|lo|``, ``|hi|`` and ``hi - lo`` at most ``2**127``, and a step
            ``(hi - lo) / (quant_max - quant_min)`` of at least ``2**-126``
            (checked after ``symmetric`` widens the range).
        narrow_range: drop the lowest integer level (``[1, 2**bits - 1]``).
        symmetric: ranges are made symmetric around zero, ``(-m, m)`` with
            ``m = max(|lo|, |hi|)``.
        axis: channel axis for per-channel ranges, or ``None`` for per tensor.
    """

    bits: int = 8
    range: Optional[Tuple[float, float]] = None
    narrow_range: bool = False
    symmetric: bool = False
    axis: Optional[int] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", _check_bits(self.bits, 2, _MAX_AFFINE_BITS))
        for name in ("narrow_range", "symmetric"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.range is not None:
            rng = _check_range(self.range, self.quant_max - self.quant_min, symmetric=self.symmetric)
            object.__setattr__(self, "range", rng)
        if self.axis is not None:
            if isinstance(self.axis, bool) or not isinstance(self.axis, int):
                raise ValueError(f"axis must be an integer or None, got {self.axis!r}")

    @property
    def quant_min(self) -> int:
        return 1 if self.narrow_range else 0

    @property
    def quant_max(self) -> int:
        return 2**self.bits - 1

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    def with_range(self, range: Optional[Tuple[float, float]]) -> "Affine":
        return Affine(self.bits, range, self.narrow_range, self.symmetric, self.axis)

    def to_dict(self) -> dict:
        return {
            "kind": "affine",
            "bits": self.bits,
            "range": None if self.range is None else list(self.range),
            "narrow_range": self.narrow_range,
            "symmetric": self.symmetric,
            "axis": self.axis,
        }

    def __str__(self) -> str:
        s = f"affine{self.bits}"
        if self.range is not None:
            s += f"[{_num(self.range[0])},{_num(self.range[1])}]"
        if self.narrow_range:
            s += ":narrow"
        if self.symmetric:
            s += ":symmetric"
        if self.axis is not None:
            s += f":axis={self.axis}"
        return s


_INF_NAN_MODES = ("ieee", "fn", "finite")


def channel_axis(fmt: Any) -> Optional[int]:
    """The channel axis of a per-channel :class:`Affine` format (one range per channel), else ``None``."""
    return fmt.axis if isinstance(fmt, Affine) and fmt.per_channel else None


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format with ``exponent_bits`` and ``mantissa_bits``.

    ``bias = 2**(exponent_bits - 1) - 1`` unless given. ``inf_nan`` says how
    the top exponent is used:

    * ``"ieee"`` (default): the top exponent is reserved for inf and NaN
      (float16, bfloat16, e5m2).
    * ``"fn"``: finite with NaN: only the all-ones pattern is NaN, there is no
      inf (OCP E4M3FN: max 448).
    * ``"finite"``: every pattern is a number, no inf, no NaN (OCP MX e3m2,
      e2m3, e2m1).

    Overflow: with ``saturate=True`` finite values beyond the largest finite
    value become +-max; with ``saturate=False`` they become inf (``"ieee"``) or
    NaN (no inf in the format), except that rounding toward zero never
    overflows (IEEE 754 rule). The default is ``False`` for ``"ieee"``
    (as IEEE and ``ml_dtypes``) and ``True`` otherwise. NaN inputs always stay
    NaN; inf inputs stay inf in a format with inf and follow the overflow rule
    otherwise.

    Args:
        exponent_bits: 2 to 8 (values must fit in float32).
        mantissa_bits: 0 to 23 (stored fraction bits, without the implicit one).
        subnormals: keep subnormal numbers; ``False`` flushes them (the grid
            below the smallest normal is just 0).
        inf_nan: ``"ieee"``, ``"fn"`` or ``"finite"``.
        saturate: overflow behaviour, see above; ``None`` picks the default.
        bias: exponent bias; default ``2**(exponent_bits-1) - 1``.
    """

    exponent_bits: int
    mantissa_bits: int
    subnormals: bool = True
    inf_nan: str = "ieee"
    saturate: Optional[bool] = None
    bias: Optional[int] = None

    def __post_init__(self) -> None:
        e = _check_bits(self.exponent_bits, 2, 8, "exponent_bits")
        m = _check_bits(self.mantissa_bits, 0, 23, "mantissa_bits")
        object.__setattr__(self, "exponent_bits", e)
        object.__setattr__(self, "mantissa_bits", m)
        if self.inf_nan not in _INF_NAN_MODES:
            raise ValueError(f"inf_nan must be one of {_INF_NAN_MODES}, got {self.inf_nan!r}")
        if not isinstance(self.subnormals, bool):
            raise TypeError(f"subnormals must be a bool, got {self.subnormals!r}")
        if self.inf_nan == "fn" and m == 0:
            raise ValueError("inf_nan='fn' needs mantissa_bits >= 1 (the all-ones pattern is NaN)")
        if self.saturate is None:
            object.__setattr__(self, "saturate", self.inf_nan != "ieee")
        elif not isinstance(self.saturate, bool):
            raise TypeError(f"saturate must be a bool or None, got {self.saturate!r}")
        default_bias = 2 ** (e - 1) - 1
        if self.bias is None:
            object.__setattr__(self, "bias", default_bias)
        else:
            b = _check_bits(self.bias, -1000, 1000, "bias")
            object.__setattr__(self, "bias", b)
        if self.max_exponent > 127 or self.min_exponent < -126:
            raise ValueError(
                f"exponent_bits={e} with bias={self.bias} does not fit in float32 "
                f"(exponents {self.min_exponent}..{self.max_exponent})"
            )

    # --- derived properties -------------------------------------------------
    @property
    def has_inf(self) -> bool:
        return self.inf_nan == "ieee"

    @property
    def has_nan(self) -> bool:
        return self.inf_nan in ("ieee", "fn")

    @property
    def min_exponent(self) -> int:
        """Exponent of the smallest normal number."""
        return 1 - self.bias

    @property
    def max_exponent(self) -> int:
        """Exponent of the largest finite number."""
        top = 2**self.exponent_bits - 1
        return (top - 1 if self.inf_nan == "ieee" else top) - self.bias

    @property
    def max_value(self) -> float:
        m = self.mantissa_bits
        frac = 2.0 - 2.0 ** (-m)
        if self.inf_nan == "fn":
            frac = 2.0 - 2.0 ** (1 - m)
        return frac * 2.0**self.max_exponent

    @property
    def min_normal(self) -> float:
        return 2.0**self.min_exponent

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.min_exponent - self.mantissa_bits) if self.subnormals else self.min_normal

    @property
    def epsilon(self) -> float:
        return 2.0 ** (-self.mantissa_bits)

    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    def to_dict(self) -> dict:
        return {
            "kind": "float",
            "exponent_bits": self.exponent_bits,
            "mantissa_bits": self.mantissa_bits,
            "subnormals": self.subnormals,
            "inf_nan": self.inf_nan,
            "saturate": self.saturate,
            "bias": self.bias,
        }

    def __str__(self) -> str:
        for name, preset in PRESETS.items():
            if preset == self:
                return name
        s = f"e{self.exponent_bits}m{self.mantissa_bits}"
        # "e4m3", "e3m2", ... name presets that are not IEEE-style: parse_format
        # starts from the preset, so spell inf_nan whenever it differs from it.
        base = PRESETS.get(s)
        if self.inf_nan != (base.inf_nan if base is not None else "ieee"):
            s += f":{self.inf_nan}"
        if not self.subnormals:
            s += ":nosub"
        if self.saturate != (self.inf_nan != "ieee"):
            s += ":sat" if self.saturate else ":nosat"
        if self.bias != 2 ** (self.exponent_bits - 1) - 1:
            s += f":bias={self.bias}"
        return s


Format = Union[FixedPoint, Affine, FloatFormat, "Scaled"]

#: Named float formats. ``e4m3`` is OCP E4M3FN (max 448, no inf); ``e5m2`` is
#: IEEE-style; ``e3m2``, ``e2m3``, ``e2m1`` are the OCP MX element types
#: (no inf, no NaN).
PRESETS: Mapping[str, FloatFormat] = {
    "bfloat16": FloatFormat(8, 7),
    "float16": FloatFormat(5, 10),
    "e5m2": FloatFormat(5, 2),
    "e4m3": FloatFormat(4, 3, inf_nan="fn"),
    "e3m2": FloatFormat(3, 2, inf_nan="finite"),
    "e2m3": FloatFormat(2, 3, inf_nan="finite"),
    "e2m1": FloatFormat(2, 1, inf_nan="finite"),
}
_ALIASES = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp8": "e4m3",
    "fp8_e4m3": "e4m3",
    "fp8_e5m2": "e5m2",
    "e4m3fn": "e4m3",
    "fp6": "e3m2",
    "fp6_e3m2": "e3m2",
    "fp6_e2m3": "e2m3",
    "fp4": "e2m1",
    "fp4_e2m1": "e2m1",
}


#: Scale formats of :class:`Scaled` given by name (a :class:`FloatFormat` may be given too).
SCALE_FORMATS = ("float32", "e8m0")

#: E8M0 (OCP MX shared scale): an unsigned power of two ``2**e``, ``-127 <= e <= 127``,
#: and NaN (pattern 0xFF).
E8M0_MIN_EXPONENT = -127
E8M0_MAX_EXPONENT = 127


def _element_max(element: Union["FloatFormat", "FixedPoint"]) -> float:
    return element.max_value


def _floor_log2(v: float) -> int:
    """``floor(log2(v))`` exactly, for ``v > 0``."""
    return math.frexp(v)[1] - 1


@dataclass(frozen=True)
class Scaled:
    """An element format with a shared scale per tensor, per channel or per block.

    A group of values (the whole tensor, one channel, or one block) with
    largest magnitude ``amax`` is stored as elements of ``element`` times one
    scale ``s``: ``y = Q(x / s) * s`` in float32, where ``Q`` rounds onto
    ``element`` with the rounding mode given to :func:`graphquant.quantize`
    (every mode, stochastic included). The scale itself is computed
    deterministically, from ``amax`` only:

    * ``scale_format="float32"`` (default): ``s = amax / emax_value`` in float32,
      ``emax_value`` the element's largest value (448 for e4m3), so ``amax``
      lands on the top of the element grid; at least ``2**-126``.
    * ``scale_format="e8m0"`` (OCP MX v1.0): ``s = 2**(floor(log2(amax)) -
      emax_elem)``, ``emax_elem = floor(log2(element.max_value))`` (e4m3: 8,
      e5m2: 15, e3m2: 4, e2m3: 2, e2m1: 2, the int8 grid ``[-2, 127/64]``: 0),
      the exponent clamped to E8M0's ``[-127, 127]`` (an all-zero block gets
      ``2**-127``). Values of ``x / s`` up to ``2**(emax_elem + 1)`` can exceed
      the element's largest value; the element format then saturates (the MX
      presets use saturating elements, as the specification requires).
    * a :class:`FloatFormat` (e.g. ``e4m3``): ``s = amax / emax_value``
      clamped to ``[scale_format.min_normal, scale_format.max_value]`` and
      rounded to nearest onto ``scale_format``.

    With ``tensor_scale=True`` (two-level scaling, NVFP4; needs a
    :class:`FloatFormat` scale) a float32 per-tensor scale ``t = amax_tensor /
    (emax_value * scale_format.max_value)`` (at least ``2**-126``; ``amax_tensor``
    over the finite values) comes first: the block scale is computed from
    ``(amax / emax_value) / t`` as above and the values are ``Q(x / (s * t)) *
    (s * t)``.

    A group whose ``amax`` is inf or NaN (it contains an inf or a NaN) becomes
    NaN entirely (its scale is NaN, as E8M0's NaN in the MX specification).
    Granularity:

    * ``"tensor"``: one scale for the whole tensor (``axis`` unused);
    * ``"channel"``: one scale per index along ``axis`` (as ``Affine.axis``);
    * an integer ``k``: blocks of ``k`` consecutive elements along ``axis``
      (the MX block is 32 along the dot product's reduction axis). When the
      axis length is not a multiple of ``k`` the last block is short: its
      remaining elements share a scale of their own (the same as padding the
      block with zeros, as microxcaling does).

    Results are float32 (float16/bfloat16 inputs are rounded in float32 and
    cast back); as everywhere in TensorFlow on CPU, float32 subnormal inputs
    and results are flushed to zero. The gradient passes straight through,
    unchanged (the scale follows the tensor, so no value is out of range; no
    gradient flows through the scale).

    Args:
        element: a :class:`FloatFormat` or :class:`FixedPoint` with a positive
            largest value (or a string/dict naming one).
        granularity: ``"tensor"``, ``"channel"`` or a block size (int >= 1).
        axis: the channel axis, or the axis along which blocks run.
        scale_format: ``"float32"``, ``"e8m0"`` or a :class:`FloatFormat`.
        tensor_scale: add a float32 per-tensor scale (two-level scaling).
    """

    element: Union["FloatFormat", "FixedPoint"]
    granularity: Union[str, int] = "tensor"
    axis: int = -1
    scale_format: Union[str, "FloatFormat"] = "float32"
    tensor_scale: bool = False

    def __post_init__(self) -> None:
        el = self.element
        if isinstance(el, (str, Mapping)):
            try:
                el = parse_format(el)
            except ValueError as e:
                raise ValueError(f"element: {e}") from None
        if not isinstance(el, (FloatFormat, FixedPoint)):
            raise TypeError(f"element must be a FloatFormat or FixedPoint format, got {type(el).__name__} {el!r}")
        if not el.max_value > 0:
            raise ValueError(f"element {el} must have a positive largest value, got {el.max_value}")
        object.__setattr__(self, "element", el)
        g = self.granularity
        if isinstance(g, str):
            gl = g.strip().lower()
            if gl.startswith("block") and gl[5:].isdigit():
                g = int(gl[5:])
            elif gl in ("tensor", "channel"):
                g = gl
            else:
                raise ValueError(f"granularity must be 'tensor', 'channel' or a block size, got {self.granularity!r}")
        if not isinstance(g, str):
            g = _check_bits(g, 1, 2**31 - 1, "granularity")
        object.__setattr__(self, "granularity", g)
        if isinstance(self.axis, bool) or not isinstance(self.axis, int):
            if hasattr(self.axis, "__index__") and not isinstance(self.axis, bool):
                object.__setattr__(self, "axis", int(self.axis.__index__()))
            else:
                raise TypeError(f"axis must be an integer, got {self.axis!r}")
        sf = self.scale_format
        if isinstance(sf, str) and sf.strip().lower() in SCALE_FORMATS:
            sf = sf.strip().lower()
        elif isinstance(sf, (str, Mapping)):
            try:
                sf = parse_format(sf)
            except ValueError as e:
                raise ValueError(f"scale_format must be 'float32', 'e8m0' or a float format: {e}") from None
        if not (isinstance(sf, FloatFormat) or sf in SCALE_FORMATS):
            raise TypeError(f"scale_format must be 'float32', 'e8m0' or a FloatFormat, got {sf!r}")
        object.__setattr__(self, "scale_format", sf)
        if not isinstance(self.tensor_scale, bool):
            raise TypeError(f"tensor_scale must be a bool, got {self.tensor_scale!r}")
        if self.tensor_scale and not isinstance(sf, FloatFormat):
            raise ValueError(f"tensor_scale=True needs a FloatFormat scale_format (as nvfp4's e4m3), got {sf!r}")

    # --- derived properties -------------------------------------------------
    @property
    def block_size(self) -> Optional[int]:
        """The block size, or ``None`` for per-tensor and per-channel scales."""
        return self.granularity if isinstance(self.granularity, int) else None

    @property
    def emax_elem(self) -> int:
        """``floor(log2(element.max_value))``: the MX specification's emax of the element."""
        return _floor_log2(self.element.max_value)

    @property
    def element_max(self) -> float:
        """The element's largest value (the target of ``amax`` for float scales)."""
        return self.element.max_value

    def to_dict(self) -> dict:
        sf = self.scale_format
        return {
            "kind": "scaled",
            "element": self.element.to_dict(),
            "granularity": self.granularity,
            "axis": self.axis,
            "scale_format": sf.to_dict() if isinstance(sf, FloatFormat) else sf,
            "tensor_scale": self.tensor_scale,
        }

    def __str__(self) -> str:
        for name, preset in SCALED_PRESETS.items():
            if preset == self:
                return name
        g = self.granularity
        s = f"{self.element}@{g if isinstance(g, str) else f'block{g}'}"
        if self.axis != -1:
            s += f":axis={self.axis}"
        if self.scale_format != "float32":
            s += f":scale={self.scale_format}"
        if self.tensor_scale:
            s += ":tensor_scale"
        return s


#: OCP Microscaling (MX v1.0) formats and NVIDIA's NVFP4, as :class:`Scaled` formats.
#: MX: blocks of 32 along the last axis, E8M0 scale, saturating elements (MXINT8:
#: two's complement int8 with an implicit 2**-6, the grid ``k/64``, ``-128 <= k <= 127``).
#: NVFP4: e2m1 in blocks of 16, an e4m3 scale per block and a float32 per-tensor scale.
SCALED_PRESETS: Mapping[str, Scaled] = {
    "mxfp8_e4m3": Scaled(PRESETS["e4m3"], 32, -1, "e8m0"),
    "mxfp8_e5m2": Scaled(FloatFormat(5, 2, saturate=True), 32, -1, "e8m0"),
    "mxfp6_e3m2": Scaled(PRESETS["e3m2"], 32, -1, "e8m0"),
    "mxfp6_e2m3": Scaled(PRESETS["e2m3"], 32, -1, "e8m0"),
    "mxfp4": Scaled(PRESETS["e2m1"], 32, -1, "e8m0"),
    "mxint8": Scaled(FixedPoint(8, (-2.0, 2.0)), 32, -1, "e8m0"),
    "nvfp4": Scaled(PRESETS["e2m1"], 16, -1, PRESETS["e4m3"], tensor_scale=True),
}
_SCALED_ALIASES = {"mxfp8": "mxfp8_e4m3", "mxfp4_e2m1": "mxfp4"}
_FLOAT_OPTIONS = ("fn", "finite", "ieee", "nosub", "sat", "nosat")


def _parse_scaled(text: str, spec: Any) -> "Scaled":
    """``<element>@<tensor|channel|block<k>>[:axis=N][:scale=<float32|e8m0|float format>][:tensor_scale]``."""
    head, _, rest = text.partition("@")
    tokens = rest.split(":")
    kw: dict = {"element": parse_format(head), "granularity": tokens[0]}
    scale_parts: Optional[list] = None
    for o in tokens[1:]:
        if scale_parts is not None and (o in _FLOAT_OPTIONS or o.startswith("bias=")):
            scale_parts.append(o)  # options of the scale's float format
            continue
        if scale_parts is not None:
            kw["scale_format"] = ":".join(scale_parts)
            scale_parts = None
        if o.startswith("axis="):
            kw["axis"] = int(o[5:])
        elif o.startswith("scale="):
            scale_parts = [o[6:]]
        elif o == "tensor_scale":
            kw["tensor_scale"] = True
        else:
            raise ValueError(f"unknown option {o!r}")
    if scale_parts is not None:
        kw["scale_format"] = ":".join(scale_parts)
    return Scaled(**kw)


_RANGE_RE = r"(?:\[\s*([^\],]+)\s*,\s*([^\]]+)\s*\])?"
_FIXED_RE = re.compile(r"^fixed(\d+)" + _RANGE_RE + r"$")
_AFFINE_RE = re.compile(r"^(?:affine|int|uint)(\d+)" + _RANGE_RE + r"$")
_FLOAT_RE = re.compile(r"^e(\d+)m(\d+)$")


def parse_format(spec: Union[str, Format, Mapping[str, Any]]) -> Format:
    """Parse a short format string (or pass a format or dict through).

    Grammar: ``fixed<bits>[lo,hi]``; ``affine<bits>[lo,hi]`` (range optional,
    also spelled ``int8``) followed by optional ``:narrow``, ``:symmetric``,
    ``:axis=N``; a preset name (``bfloat16``, ``float16``, ``e5m2``, ``e4m3``,
    ``e3m2``, ``e2m3``, ``e2m1`` and aliases like ``fp8``, ``bf16``); or
    ``e<E>m<M>`` (IEEE-style) with optional ``:fn``, ``:finite``, ``:nosub``,
    ``:sat``, ``:nosat``, ``:bias=N``; a scaled preset (``mxfp8_e4m3``,
    ``mxfp8_e5m2``, ``mxfp6_e3m2``, ``mxfp6_e2m3``, ``mxfp4``, ``mxint8``,
    ``nvfp4``; ``mxfp8`` is ``mxfp8_e4m3``) or ``<element>@<granularity>``
    (:class:`Scaled`): granularity ``tensor``, ``channel`` or ``block<k>``,
    then optional ``:axis=N``, ``:scale=float32|e8m0|<float format>``,
    ``:tensor_scale``, e.g. ``e4m3@channel``, ``e2m1@block32:scale=e8m0``,
    ``fixed8[-2,2]@block32:axis=0:scale=e8m0``; or a name given to
    :func:`register_format` (also as the element of ``<element>@<granularity>``).

    Raises:
        ValueError: the string is not a known format (the message names it).
    """
    if isinstance(spec, (FixedPoint, Affine, FloatFormat, Scaled)):
        return spec
    if isinstance(spec, Mapping):
        return format_from_dict(spec)
    if not isinstance(spec, str):
        raise TypeError(f"format must be a string, a dict or a format object, got {type(spec).__name__}")
    user = _registered(spec.strip().lower().replace(" ", ""))
    if user is not None:
        return user
    return _parse_builtin(spec)


#: The ``:option`` suffixes of affine and float format strings: a flag -> ``(keyword, value)``, and the
#: ``name=<int>`` options -> keyword.
_AFFINE_FLAGS = {"narrow": ("narrow_range", True), "symmetric": ("symmetric", True)}
_AFFINE_INT_OPTIONS = {"axis": "axis"}
_FLOAT_FLAGS = {"fn": ("inf_nan", "fn"), "finite": ("inf_nan", "finite"), "ieee": ("inf_nan", "ieee"),
                "nosub": ("subnormals", False), "sat": ("saturate", True), "nosat": ("saturate", False)}
_FLOAT_INT_OPTIONS = {"bias": "bias"}


def _string_options(opts: List[str], flags: Mapping[str, Tuple[str, Any]], ints: Mapping[str, str]) -> Dict[str, Any]:
    """Format keywords from the ``:option`` suffixes of a format string (later ones win)."""
    kw: Dict[str, Any] = {}
    for o in opts:
        name, eq, value = o.partition("=")
        if not eq and o in flags:
            key, v = flags[o]
            kw[key] = v
        elif eq and name in ints:
            kw[ints[name]] = int(value)
        else:
            raise ValueError(f"unknown option {o!r}")
    return kw


def _parse_builtin(spec: str) -> Format:
    """:func:`parse_format` of a string, built-in spellings only."""
    text = spec.strip().lower().replace(" ", "")
    text = _SCALED_ALIASES.get(text, text)
    if text in SCALED_PRESETS:
        return SCALED_PRESETS[text]
    if "@" in text:
        try:
            return _parse_scaled(text, spec)
        except (ValueError, TypeError) as e:
            raise ValueError(f"format {spec!r} is not valid: {e}") from None
    head, *opts = text.split(":")
    head = _ALIASES.get(head, head)
    try:
        if head in PRESETS and not opts:
            return PRESETS[head]
        m = _FIXED_RE.match(head)
        if m:
            if m.group(2) is None:
                raise ValueError("a fixed-point format needs a range, e.g. fixed8[0,1]")
            if opts:
                raise ValueError(f"unknown options {opts}")
            return FixedPoint(int(m.group(1)), (float(m.group(2)), float(m.group(3))))
        m = _AFFINE_RE.match(head)
        if m:
            rng = None if m.group(2) is None else (float(m.group(2)), float(m.group(3)))
            return Affine(int(m.group(1)), rng, **_string_options(opts, _AFFINE_FLAGS, _AFFINE_INT_OPTIONS))
        base = PRESETS.get(head)
        m = _FLOAT_RE.match(head)
        if m or base is not None:
            if base is not None:
                kw = dict(base.to_dict())
                kw.pop("kind")
                kw["saturate"] = None if base.saturate == (base.inf_nan != "ieee") else base.saturate
            else:
                kw = {"exponent_bits": int(m.group(1)), "mantissa_bits": int(m.group(2))}
            kw.update(_string_options(opts, _FLOAT_FLAGS, _FLOAT_INT_OPTIONS))
            return FloatFormat(**kw)
    except (ValueError, TypeError) as e:
        raise ValueError(f"format {spec!r} is not valid: {e}") from None
    users = f", a registered name ({', '.join(sorted(_USER_FORMATS))})" if _USER_FORMATS else ""
    raise ValueError(
        f"format {spec!r} is not a known format; expected a preset ({', '.join(PRESETS)}, "
        f"{', '.join(SCALED_PRESETS)}), e<E>m<M>, fixed<bits>[lo,hi], affine<bits>{users} or <element>@<granularity>"
    )


# ----------------------------------------------------------------------------- user formats
#: Entry-point group through which an installed package names formats (``name = "module:FORMAT"``):
#: loaded the first time an unknown name is parsed, so they parse in configs and on the command line.
ENTRY_POINT_GROUP = "graphquant.formats"
_USER_FORMATS: Dict[str, Format] = {}
_ENTRY_POINTS_LOADED = [False]
_NAME_RE = re.compile(r"^[a-z_][a-z0-9_.\-]*$")


def register_format(name: str, fmt: Union[Format, str, Mapping[str, Any]], *, replace: bool = False) -> Format:
    """Give ``fmt`` a string name that :func:`parse_format` (so configs, overrides and the
    command line) accepts from now on, e.g.
    ``register_format("myfp", FloatFormat(3, 4, subnormals=False))``.

    Names are case-insensitive; they may not shadow a built-in format spelling
    (``"e4m3"``, ``"int8"``, ...). A format in a saved config is stored as its
    dict, so files written with a user format load without registering it.

    Args:
        name: letters, digits, ``_``, ``.``, ``-``; not starting with a digit.
        fmt: a format object, or anything :func:`parse_format` accepts.
        replace: allow re-registering ``name`` to another format.

    Returns:
        The registered format.

    Raises:
        ValueError: the name is malformed, means a built-in format, or is taken.
        TypeError: ``name`` is not a string.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    if not _NAME_RE.match(key):
        raise ValueError(f"name {name!r} is not a valid format name (letters, digits, '_', '.', '-')")
    fmt = parse_format(fmt)
    if key not in _USER_FORMATS:
        try:
            builtin = _parse_builtin(key)
        except ValueError:
            builtin = None
        if builtin is not None:
            raise ValueError(f"name {name!r} already means the built-in format {builtin}")
    elif not replace and _USER_FORMATS[key] != fmt:
        raise ValueError(f"name {name!r} is already registered as {_USER_FORMATS[key]}; pass replace=True")
    _USER_FORMATS[key] = fmt
    return fmt


def unregister_format(name: str) -> None:
    """Forget a name given to :func:`register_format` (``KeyError`` if it is not registered)."""
    key = str(name).strip().lower()
    if key not in _USER_FORMATS:
        raise KeyError(f"no registered format named {name!r}")
    del _USER_FORMATS[key]


def registered_formats() -> Dict[str, Format]:
    """The names given to :func:`register_format` (and by installed packages' entry points)."""
    _load_entry_points()
    return dict(_USER_FORMATS)


def _load_entry_points() -> None:
    if _ENTRY_POINTS_LOADED[0]:
        return
    _ENTRY_POINTS_LOADED[0] = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name.strip().lower() in _USER_FORMATS:
            continue
        try:
            register_format(ep.name, ep.load())
        except Exception as e:  # noqa: BLE001 - a broken plugin must not break parsing other formats
            import logging

            logging.getLogger(__name__).warning("format entry point %r (%s) not loaded: %s", ep.name, ep.value, e)


def _registered(key: str) -> Optional[Format]:
    fmt = _USER_FORMATS.get(key)
    if fmt is None and not _ENTRY_POINTS_LOADED[0] and _NAME_RE.match(key):
        try:
            _parse_builtin(key)
            return None  # a built-in spelling: no need to look at plugins
        except ValueError:
            _load_entry_points()
            fmt = _USER_FORMATS.get(key)
    return fmt


def format_from_dict(d: Mapping[str, Any]) -> Format:
    """Inverse of ``fmt.to_dict()``."""
    if not isinstance(d, Mapping) or "kind" not in d:
        raise ValueError(f"format dict must have a 'kind' key, got {d!r}")
    kw = {k: v for k, v in d.items() if k != "kind"}
    kind = d["kind"]
    try:
        if kind == "fixed":
            return FixedPoint(kw["bits"], tuple(kw["range"]))
        if kind == "affine":
            if kw.get("range") is not None:
                kw["range"] = tuple(kw["range"])
            return Affine(**kw)
        if kind == "float":
            return FloatFormat(**kw)
        if kind == "scaled":
            el = kw.get("element")
            if not isinstance(el, Mapping):
                raise TypeError(f"element must be a format dict, got {el!r}")
            kw["element"] = format_from_dict(el)
            if isinstance(kw.get("scale_format"), Mapping):
                kw["scale_format"] = format_from_dict(kw["scale_format"])
            return Scaled(**kw)
    except KeyError as e:  # a required key is missing: name it in a ValueError
        raise ValueError(f"format dict {dict(d)!r} is not valid: missing key {e}") from None
    except TypeError as e:
        raise ValueError(f"format dict {dict(d)!r} is not valid: {e}") from None
    raise ValueError(f"format dict has unknown kind {kind!r}; expected 'fixed', 'affine', 'float' or 'scaled'")


def as_format(
    format: Union[str, Format, Mapping[str, Any], None] = None,
    *,
    bits: Optional[int] = None,
    range: Optional[Tuple[float, float]] = None,
) -> Format:
    """Resolve the user-facing ``format=`` / ``bits=`` / ``range=`` trio.

    * ``format`` given: parsed; ``bits`` must not contradict it.
    * ``bits`` and ``range``: :class:`FixedPoint` over that range.
    * ``bits`` alone: :class:`Affine` with a range to be learned/calibrated.
    """
    if format is not None:
        fmt = parse_format(format)
        if bits is not None and getattr(fmt, "bits", bits) != bits:
            raise ValueError(f"bits={bits} contradicts format={str(fmt)!r}")
        return fmt
    if bits is None:
        raise ValueError("give a format= or bits=")
    if range is not None:
        return FixedPoint(bits, range)
    return Affine(bits)
