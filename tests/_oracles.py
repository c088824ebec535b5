"""Independent numpy oracles for the numerics tests (no graphquant code here)."""

from __future__ import annotations

import functools
from fractions import Fraction

import ml_dtypes
import numpy as np

#: preset name -> (ml_dtypes type, storage bits)
ML_DTYPES = {
    "bfloat16": (ml_dtypes.bfloat16, 16),
    "float16": (np.dtype(np.float16).type, 16),
    "e5m2": (ml_dtypes.float8_e5m2, 8),
    "e4m3": (ml_dtypes.float8_e4m3fn, 8),
    "e3m2": (ml_dtypes.float6_e3m2fn, 6),
    "e2m3": (ml_dtypes.float6_e2m3fn, 6),
    "e2m1": (ml_dtypes.float4_e2m1fn, 4),
}


@functools.lru_cache(maxsize=None)
def ml_positive_grid(name: str) -> np.ndarray:
    """All finite non-negative values of an ml_dtypes type, by enumerating its codes.

    Index i holds the value of code i (codes of a binary float grow with the value),
    so the parity of the index is the parity of the last mantissa bit.
    """
    dt, nbits = ML_DTYPES[name]
    storage = np.uint16 if nbits == 16 else np.uint8
    codes = np.arange(2 ** (nbits - 1), dtype=storage)  # sign bit clear
    with np.errstate(invalid="ignore"):
        vals = codes.view(dt).astype(np.float64)
    vals = vals[np.isfinite(vals)]
    assert vals[0] == 0 and np.all(np.diff(vals) > 0)
    return vals


def format_positive_grid(e: int, m: int, subnormals=True, inf_nan="ieee", bias=None):
    """Non-negative grid of a FloatFormat built from its definition: ``(values, codes)``."""
    bias = 2 ** (e - 1) - 1 if bias is None else bias
    emin = 1 - bias
    top = 2**e - 1
    emax = (top - 1 if inf_nan == "ieee" else top) - bias
    j = np.arange(2**m)
    frac = j / 2**m
    vals = [frac * 2.0**emin if subnormals else np.zeros(1)]
    codes = [j if subnormals else np.zeros(1, np.int64)]
    for ex in range(emin, emax + 1):
        vals.append((1 + frac) * 2.0**ex)
        codes.append((ex - emin + 1) * 2**m + j)
    v, c = np.concatenate(vals), np.concatenate(codes)
    if inf_nan == "fn":
        v, c = v[:-1], c[:-1]  # the all-ones pattern is NaN
    assert v[0] == 0 and np.all(np.diff(v) > 0)
    return v, c


def round_to_grid(x: np.ndarray, grid: np.ndarray, mode: str, codes=None) -> np.ndarray:
    """Round float64 values ``x`` (|x| <= grid[-1]) onto the symmetric grid ``+-grid``.

    ``grid`` is the sorted non-negative grid, ``codes`` its bit patterns (default: the
    index, as for a full enumeration of codes); ties to even look at the code's parity.
    Zero results keep the sign of x (IEEE). Returns float64.
    """
    x = np.asarray(x, np.float64)
    ax = np.abs(x)
    assert np.all(ax <= grid[-1]), "oracle only covers the finite range"
    i = np.searchsorted(grid, ax, side="right") - 1
    j = np.minimum(i + 1, len(grid) - 1)
    lo, hi = grid[i], grid[j]
    exact = lo == ax
    hi = np.where(exact, lo, hi)
    neg = np.signbit(x)
    if mode == "toward_zero":
        m = lo
    elif mode == "down":
        m = np.where(neg, hi, lo)
    elif mode == "up":
        m = np.where(neg, lo, hi)
    elif mode in ("nearest", "nearest_away"):
        mid = (lo + hi) / 2  # exact in float64 for these small grids
        if mode == "nearest_away":
            tie = hi
        else:
            c = np.arange(len(grid)) if codes is None else np.asarray(codes)
            tie = np.where(c[i] % 2 == 0, lo, hi)
        m = np.where(ax < mid, lo, np.where(ax > mid, hi, tie))
    else:
        raise ValueError(mode)
    return np.copysign(m, x)


def neighbours(x: np.ndarray, grid: np.ndarray):  # noqa: D401
    """(lower, upper) neighbours of x on the symmetric grid (equal when x is on the grid)."""
    x = np.asarray(x, np.float64)
    return round_to_grid(x, grid, "down"), round_to_grid(x, grid, "up")


def fractions_equal(q: float, lo: float, k: int, step: float) -> bool:
    return Fraction(float(q)) == Fraction(float(lo)) + k * Fraction(float(step))
