"""scripts/digits.py --quick: QAT on real data and the Gupta et al. 2015 effect, reduced for CI."""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits():
    spec = importlib.util.spec_from_file_location("digits_script", ROOT / "scripts" / "digits.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def results(digits):
    lines = []
    qat = digits.run_qat(quick=True, echo=lines.append)
    gupta = digits.run_gupta(quick=True, echo=lines.append)
    return qat, gupta, lines


def test_qat_quick(results):
    qat, _, _ = results
    rows = {(r["config"], r["rounding"]): r["accuracy"] for r in qat["rows"]}
    f = qat["float"]
    assert f > 0.95  # ten classes: chance is 0.10
    assert rows[("affine 8-bit", "nearest")] >= f - 0.02
    assert rows[("affine 4-bit", "nearest")] >= f - 0.04
    # 4-bit fixed point trained with stochastic rounding (activations and weights): once lost 5.6 points
    # when its ranges were the powers of two covering the largest activation / weight
    assert rows[("fixed point 4-bit", "stochastic")] >= f - 0.04


def test_mse_range_saturates_outliers_at_low_bit_widths(digits):
    """The per-block ranges come from the calibration engine's "mse" method."""
    rng = np.random.RandomState(0)
    v = np.abs(rng.normal(0.0, 0.5, 10_000)).astype("float32")
    v[0] = 7.8  # one outlier
    assert digits.mse_range(v, 16, signed=False) == (0.0, pytest.approx(7.8, rel=1e-6))  # at 16 bits: cover it
    lo, hi = digits.mse_range(v, 4, signed=False)
    assert lo == 0.0 and 0.8 < hi <= 3.0  # at 4 bits saturating the outlier is better
    w = rng.normal(0.0, 0.1, 1000).astype("float32")
    lo, hi = digits.mse_range(w, 4, signed=True)
    assert lo < 0.0 < hi and hi - lo < np.ptp(w)


def test_gupta_quick(results):
    _, gupta, _ = results
    (row,) = gupta["rows"]
    assert row["fraction_bits"] == 8
    flt = gupta["float"]["accuracy"]
    near, sto = row["nearest"], row["stochastic"]
    assert flt > 0.6
    # the median update is far below half a storage step: nearest rounding discards it ...
    assert row["half_step"] > 10 * gupta["update"]
    assert near["accuracy"] < 0.3 and near["moved"] < 0.2
    # ... stochastic rounding keeps it in expectation and tracks float
    assert sto["accuracy"] > flt - 0.05
    assert sto["moved"] > 0.5


def test_quick_writes_results(digits, results, tmp_path):
    qat, gupta, lines = results
    digits.write_results(tmp_path, qat, gupta, "(compare table)", True, 1.0)
    text = (tmp_path / "results.md").read_text()
    assert "| affine 8-bit | nearest |" in text and "16-bit fixed, 8 fraction bits" in text
    assert (tmp_path / "gupta.png").read_bytes()[:4] == b"\x89PNG"
    assert any("float CNN" in line for line in lines)


def test_results_keep_sections_the_script_does_not_write(digits):
    """docs/results.md: the script replaces its own sections and keeps the others (the Deployment section
    written by scripts/tflite_agreement.py) as they are."""
    old = ("# Results\n\nold intro\n\n## Quantization-aware training\n\nold table\n\n"
           "## Deployment: simulated int8\n\n```\n#  layer\n```\nkept text\n")
    new = "# Results\n\nnew intro\n\n## Quantization-aware training\n\nnew table\n"
    out = digits.keep_foreign_sections(new, old)
    assert out == new + "\n## Deployment: simulated int8\n\n```\n#  layer\n```\nkept text\n"
    assert "old" not in out and digits.keep_foreign_sections(new, out) == out  # a second run changes nothing
    assert digits.keep_foreign_sections(new, "") == new
    assert "mxfp4" in digits.SCALED_ROWS and "nvfp4" in digits.SCALED_ROWS
