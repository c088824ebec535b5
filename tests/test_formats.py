"""Formats are pure data: validated, immutable, comparable, printable, round-trippable."""

import dataclasses
import json
import math

import pytest

import graphquant as gq
from graphquant import Affine, FixedPoint, FloatFormat, PRESETS, as_format, format_from_dict, parse_format
from graphquant.formats import _ALIASES

# ---------------------------------------------------------------------------
# a wide sample of formats used by the round-trip tests
# ---------------------------------------------------------------------------
FORMATS = [
    FixedPoint(8, (0.0, 1.0)),
    FixedPoint(1, (-1.0, 1.0)),
    FixedPoint(24, (-3.5, 0.1)),
    FixedPoint(4, (1e-3, 1e20)),
    FixedPoint(3, (-0.1, 0.7)),
    Affine(8),
    Affine(2, (-1.0, 1.0)),
    Affine(8, (-1.0, 1.0), narrow_range=True, axis=-1),
    Affine(16, (0.25, 6.0), axis=0),
    Affine(24, (-0.3, 0.2), symmetric=True),
    Affine(4, None, narrow_range=True, symmetric=True, axis=2),
    FloatFormat(4, 3),  # IEEE-style e4m3, not the OCP preset
    FloatFormat(3, 2),
    FloatFormat(2, 3),
    FloatFormat(2, 1),
    FloatFormat(5, 2, inf_nan="fn"),
    FloatFormat(4, 3, subnormals=False),
    FloatFormat(4, 3, bias=5),
    FloatFormat(4, 3, inf_nan="fn", saturate=False),
    FloatFormat(3, 4, subnormals=False),
    FloatFormat(8, 23),
    FloatFormat(8, 0),
    FloatFormat(2, 0, inf_nan="finite"),
    FloatFormat(5, 10, saturate=True),
    FloatFormat(6, 9, inf_nan="finite", saturate=False, bias=20),
    FloatFormat(8, 7, subnormals=False),
    *PRESETS.values(),
]
IDS = [repr(f) for f in FORMATS]


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_dict_round_trip(fmt):
    d = fmt.to_dict()
    assert format_from_dict(d) == fmt
    # plain JSON-able data
    assert format_from_dict(json.loads(json.dumps(d))) == fmt
    assert parse_format(d) == fmt


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_string_round_trip(fmt):
    s = str(fmt)
    assert isinstance(s, str) and s and " " not in s
    assert parse_format(s) == fmt, s
    assert parse_format(s.upper()) == fmt
    assert str(parse_format(s)) == s


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_immutable_hashable_printable(fmt):
    field = dataclasses.fields(fmt)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(fmt, field, 3)
    clone = format_from_dict(fmt.to_dict())
    assert clone == fmt and hash(clone) == hash(fmt)
    assert len({fmt, clone}) == 1
    assert type(fmt).__name__ in repr(fmt)
    assert parse_format(fmt) is fmt


def test_formats_compare_by_value():
    assert FixedPoint(8, (0, 1)) == FixedPoint(8, [0.0, 1.0])
    assert FixedPoint(8, (0, 1)) != FixedPoint(7, (0, 1))
    assert FixedPoint(8, (0, 1)) != FixedPoint(8, (0, 2))
    assert Affine(8, [-1, 1]) == Affine(8, (-1.0, 1.0))
    assert Affine(8, (-1, 1)) != Affine(8, (-1, 1), narrow_range=True)
    assert Affine(8, (-1, 1)) != Affine(8, (-1, 1), axis=0)
    assert FloatFormat(4, 3) != PRESETS["e4m3"]
    assert FloatFormat(4, 3, inf_nan="fn") == PRESETS["e4m3"]
    assert FloatFormat(8, 7) == PRESETS["bfloat16"]
    assert FloatFormat(5, 10) == PRESETS["float16"]
    assert FloatFormat(5, 2) == PRESETS["e5m2"]
    assert FloatFormat(5, 2, saturate=False) == PRESETS["e5m2"]  # default resolved
    assert FloatFormat(5, 2, saturate=True) != PRESETS["e5m2"]
    assert FloatFormat(4, 3, bias=7) == FloatFormat(4, 3)
    assert len({FixedPoint(8, (0, 1)), Affine(8, (0, 1)), FloatFormat(3, 4)}) == 3


def test_fixed_point_properties():
    f = FixedPoint(8, (0.0, 1.0))
    assert f.step == 1 / 256
    assert f.levels == 256
    assert f.min_value == 0.0 and f.max_value == 255 / 256
    assert str(f) == "fixed8[0,1]"
    assert FixedPoint(4, (-1, 1)).step == 0.125


def test_affine_properties():
    a = Affine(8, (-1.0, 1.0))
    assert (a.quant_min, a.quant_max) == (0, 255)
    assert Affine(8, narrow_range=True).quant_min == 1
    assert not a.per_channel and Affine(8, axis=1).per_channel
    assert Affine(8, (-0.5, 2.0), symmetric=True).range == (-2.0, 2.0)
    assert a.with_range((0.0, 3.0)) == Affine(8, (0.0, 3.0))
    assert a.with_range(None).range is None
    assert str(Affine(8, (-1, 1), narrow_range=True, axis=-1)) == "affine8[-1,1]:narrow:axis=-1"


# (preset, max, min normal, min subnormal, has_inf, has_nan)
PRESET_FACTS = [
    ("bfloat16", 3.3895313892515355e38, 2.0**-126, 2.0**-133, True, True),
    ("float16", 65504.0, 2.0**-14, 2.0**-24, True, True),
    ("e5m2", 57344.0, 2.0**-14, 2.0**-16, True, True),
    ("e4m3", 448.0, 2.0**-6, 2.0**-9, False, True),
    ("e3m2", 28.0, 2.0**-2, 2.0**-4, False, False),
    ("e2m3", 7.5, 1.0, 0.125, False, False),
    ("e2m1", 6.0, 1.0, 0.5, False, False),
]


@pytest.mark.parametrize("name,mx,mn,sub,has_inf,has_nan", PRESET_FACTS)
def test_preset_facts(name, mx, mn, sub, has_inf, has_nan):
    f = PRESETS[name]
    assert f.max_value == mx
    assert f.min_normal == mn
    assert f.min_subnormal == sub
    assert (f.has_inf, f.has_nan) == (has_inf, has_nan)
    assert f.saturate == (not has_inf)
    assert str(f) == name
    assert f.bits == 1 + f.exponent_bits + f.mantissa_bits


def test_float_format_no_subnormals():
    f = FloatFormat(4, 3, subnormals=False)
    assert f.min_subnormal == f.min_normal


@pytest.mark.parametrize("alias,name", sorted(_ALIASES.items()))
def test_aliases(alias, name):
    assert parse_format(alias) is PRESETS[name]
    assert parse_format(alias.upper()) is PRESETS[name]
    assert str(parse_format(alias)) == name


@pytest.mark.parametrize(
    "text,expected",
    [
        ("fixed8[0,1]", FixedPoint(8, (0.0, 1.0))),
        ("fixed4[-1, 1]", FixedPoint(4, (-1.0, 1.0))),
        (" Fixed8[0,1] ", FixedPoint(8, (0.0, 1.0))),
        ("affine8", Affine(8)),
        ("int8", Affine(8)),
        ("uint4[0,6]", Affine(4, (0.0, 6.0))),
        ("affine8[-1,1]:narrow:axis=-1", Affine(8, (-1.0, 1.0), narrow_range=True, axis=-1)),
        ("affine8:symmetric", Affine(8, symmetric=True)),
        ("e4m3", FloatFormat(4, 3, inf_nan="fn")),
        ("e4m3:ieee", FloatFormat(4, 3)),
        ("e3m4", FloatFormat(3, 4)),
        ("e3m4:nosub", FloatFormat(3, 4, subnormals=False)),
        ("e5m2:sat", FloatFormat(5, 2, saturate=True)),
        ("e4m3:nosat", FloatFormat(4, 3, inf_nan="fn", saturate=False)),
        ("e5m4:finite:bias=10", FloatFormat(5, 4, inf_nan="finite", bias=10)),
        ("bf16:nosub", FloatFormat(8, 7, subnormals=False)),
    ],
)
def test_parse_examples(text, expected):
    assert parse_format(text) == expected


# ---------------------------------------------------------------------------
# validation: ValueError naming the argument
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make,word",
    [
        (lambda: FixedPoint(0, (0, 1)), "bits"),
        (lambda: FixedPoint(-3, (0, 1)), "bits"),
        (lambda: FixedPoint(25, (0, 1)), "bits"),
        (lambda: FixedPoint(8, (1, 0)), "range"),
        (lambda: FixedPoint(8, (1, 1)), "range"),
        (lambda: FixedPoint(8, (0, math.inf)), "range"),
        (lambda: FixedPoint(8, (-math.inf, 0)), "range"),
        (lambda: FixedPoint(8, (math.nan, 1)), "range"),
        (lambda: FixedPoint(8, (0, 1, 2)), "range"),
        (lambda: FixedPoint(8, "ab"), "range"),
        (lambda: FixedPoint(8, None), "range"),
        (lambda: Affine(1), "bits"),
        (lambda: Affine(0), "bits"),
        (lambda: Affine(25), "bits"),
        (lambda: Affine(8, (2.0, -2.0)), "range"),
        (lambda: Affine(8, (0.0, math.nan)), "range"),
        (lambda: Affine(8, axis=1.5), "axis"),
        (lambda: Affine(8, axis="0"), "axis"),
        (lambda: Affine(8, axis=True), "axis"),
        (lambda: FloatFormat(1, 2), "exponent_bits"),
        (lambda: FloatFormat(9, 2), "exponent_bits"),
        (lambda: FloatFormat(0, 2), "exponent_bits"),
        (lambda: FloatFormat(4, -1), "mantissa_bits"),
        (lambda: FloatFormat(4, 24), "mantissa_bits"),
        (lambda: FloatFormat(4, 3, inf_nan="nope"), "inf_nan"),
        (lambda: FloatFormat(4, 0, inf_nan="fn"), "inf_nan"),
        (lambda: FloatFormat(8, 7, bias=-200), "bias"),
        (lambda: FloatFormat(8, 7, bias=5000), "bias"),
        (lambda: parse_format("e9m2"), "exponent_bits"),
        (lambda: parse_format("fixed0[0,1]"), "bits"),
        (lambda: parse_format("fixed8[1,0]"), "range"),
        (lambda: parse_format("fixed8"), "range"),
        (lambda: parse_format("affine1"), "bits"),
        (lambda: parse_format("affine8:axis=x"), "axis"),
        (lambda: parse_format("float7"), "float7"),
        (lambda: parse_format("e4m3:bogus"), "bogus"),
        (lambda: parse_format("affine8:bogus"), "bogus"),
        (lambda: parse_format("fixed8[0,1]:narrow"), "narrow"),
        (lambda: parse_format(""), "format"),
        (lambda: format_from_dict({"bits": 8}), "kind"),
        (lambda: format_from_dict({"kind": "weird"}), "weird"),
        (lambda: format_from_dict({"kind": "fixed", "range": [0, 1]}), "bits"),
        (lambda: format_from_dict({"kind": "affine", "bits": 8, "colour": 1}), "colour"),
        (lambda: format_from_dict({"kind": "float", "exponent_bits": 4}), "mantissa_bits"),
        (lambda: as_format(), "format"),
        (lambda: as_format("e4m3", bits=4), "bits"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(make, word):
    with pytest.raises(ValueError) as info:
        make()
    assert word in str(info.value)


@pytest.mark.parametrize(
    "make",
    [
        lambda: FixedPoint(8.0, (0, 1)),
        lambda: FixedPoint("8", (0, 1)),
        lambda: FloatFormat(4, 3, subnormals="yes"),
        lambda: FloatFormat(4, 3, saturate=1),
        lambda: Affine(8, narrow_range=1),
        lambda: parse_format(8),
    ],
)
def test_wrong_types_raise_type_error(make):
    with pytest.raises(TypeError):
        make()


def test_numpy_integers_accepted():
    np = pytest.importorskip("numpy")
    assert FixedPoint(np.int64(8), (0, 1)) == FixedPoint(8, (0, 1))
    assert type(FixedPoint(np.int32(8), (0, 1)).bits) is int
    assert FloatFormat(np.int8(4), np.uint8(3)) == FloatFormat(4, 3)


def test_as_format():
    assert as_format(bits=8, range=(0, 1)) == FixedPoint(8, (0, 1))
    assert as_format(bits=8) == Affine(8)
    assert as_format("e4m3") is PRESETS["e4m3"]
    assert as_format("e4m3", bits=8) is PRESETS["e4m3"]
    assert as_format({"kind": "fixed", "bits": 3, "range": [0, 1]}) == FixedPoint(3, (0, 1))


def test_public_api():
    for name in ("FixedPoint", "Affine", "FloatFormat", "PRESETS", "parse_format", "format_from_dict",
                 "as_format", "quantize", "set_seed", "representable_range", "ROUNDING_MODES"):
        assert hasattr(gq, name), name
    assert gq.ROUNDING_MODES == ("nearest", "nearest_away", "toward_zero", "down", "up", "stochastic")


def test_formats_module_does_not_import_tensorflow():
    import subprocess
    import sys

    import graphquant.formats as fm

    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('gqformats', {fm.__file__!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['gqformats'] = m; spec.loader.exec_module(m)\n"
        "m.parse_format('e4m3')\n"
        "print('tensorflow' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.fixture
def user_formats(monkeypatch):
    """Registered names are process-wide: each test starts and ends with none."""
    from graphquant import formats

    monkeypatch.setattr(formats, "_USER_FORMATS", {})
    monkeypatch.setattr(formats, "_ENTRY_POINTS_LOADED", [False])
    return formats


def test_registered_format_parses_everywhere_by_name(user_formats):
    from graphquant.plan import QuantizeConfig

    myfp = FloatFormat(3, 4, subnormals=False)
    with pytest.raises(ValueError, match="not a known format"):
        parse_format("myfp")
    assert user_formats.register_format("MyFP", myfp) == myfp
    assert parse_format("myfp") == parse_format(" MYFP ") == myfp
    assert parse_format("myfp@block32") == parse_format("e3m4:nosub@block32")  # as a scaled element too
    cfg = QuantizeConfig.create(format="myfp", weight_format="myfp", overrides={"conv1": {"format": "myfp"}})
    assert cfg.format == myfp and cfg.weight_format == myfp and cfg.overrides[0][1]["format"] == "myfp"
    assert format_from_dict(json.loads(json.dumps(myfp.to_dict()))) == myfp  # stored structurally
    assert "myfp" in str(pytest.raises(ValueError, parse_format, "nope").value)  # the error lists it
    assert user_formats.registered_formats() == {"myfp": myfp}
    assert user_formats.register_format("myfp", "e3m4:nosub") == myfp  # same format again: fine
    with pytest.raises(ValueError, match="already registered"):
        user_formats.register_format("myfp", "e4m3")
    assert user_formats.register_format("myfp", "e4m3", replace=True) == PRESETS["e4m3"]
    with pytest.raises(ValueError, match="built-in format affine8"):
        user_formats.register_format("int8", myfp)
    with pytest.raises(ValueError, match="built-in format e4m3"):
        user_formats.register_format("fp8", myfp)
    with pytest.raises(ValueError, match="not a valid format name"):
        user_formats.register_format("my:fp", myfp)
    with pytest.raises(TypeError, match="name must be a string"):
        user_formats.register_format(8, myfp)
    user_formats.unregister_format("myfp")
    with pytest.raises(ValueError, match="not a known format"):
        parse_format("myfp")
    with pytest.raises(KeyError):
        user_formats.unregister_format("myfp")


def test_installed_package_names_a_format_through_an_entry_point(user_formats, tmp_path, monkeypatch):
    (tmp_path / "gq_plugin_formats.py").write_text(
        "from graphquant.formats import FloatFormat\nE3M3 = FloatFormat(3, 3, inf_nan='finite')\n"
    )
    dist = tmp_path / "gq_plugin_formats-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: gq-plugin-formats\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[graphquant.formats]\nplugfp = gq_plugin_formats:E3M3\nbroken = gq_plugin_formats:MISSING\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert parse_format("plugfp") == FloatFormat(3, 3, inf_nan="finite")  # loaded on first unknown name
    assert set(user_formats.registered_formats()) == {"plugfp"}  # a broken entry point is skipped (logged)
