"""Patterns, registry and planner on hand-built views (both spellings), no model needed."""

import json

import pytest

from graphquant.formats import Affine, FixedPoint, FloatFormat
from graphquant.patterns import (
    ACTIVATION,
    CONV,
    DEFAULT_REGISTRY,
    NORM,
    Matcher,
    Node,
    Pattern,
    Registry,
    Step,
    View,
    default_registry,
    weight_slots,
)
from graphquant.plan import ROUNDING_MODES, QuantizeConfig, make_plan


def G(name, kind, *inputs):
    return Node(name, kind, "graph", inputs=list(inputs))


def K(name, classes, *inputs, **attrs):
    return Node(name, classes[0], "keras", inputs=list(inputs), attrs=attrs, classes=tuple(classes))


def test_rounding_modes_agree_with_ops():
    from graphquant.ops import ROUNDING_MODES as OPS_MODES

    assert set(ROUNDING_MODES) == set(OPS_MODES)


def test_graph_group_with_folded_batchnorm_and_bias():
    v = View([
        G("x", "Placeholder"), G("c", "Conv2D", "x"), G("b", "BiasAdd", "c"),
        G("m", "Mul", "b"), G("a", "AddV2", "m"), G("r", "Relu6", "a"), G("out", "Identity", "r"),
    ])  # fmt: skip
    (m,) = DEFAULT_REGISTRY.match(v)
    assert m.names == ("c", "b", "m", "a", "r")
    assert m.after.name == "r" and m.target.name == "c"
    assert dict(m.steps)["norm"] == ("m", "a")


def test_graph_group_stops_at_a_branch():
    v = View([
        G("x", "Placeholder"), G("c", "DepthwiseConv2dNative", "x"), G("bn", "FusedBatchNormV3", "c"),
        G("o1", "Identity", "bn"), G("o2", "Identity", "c"),
    ])  # fmt: skip
    (m,) = DEFAULT_REGISTRY.match(v)
    assert m.names == ("c",)  # c feeds two consumers: nothing fuses past it


@pytest.mark.parametrize(
    "op", ["Conv2D", "DepthwiseConv2dNative", "Conv3D", "Conv2DBackpropInput", "_FusedConv2D"]
)
def test_every_conv_op_is_a_target(op):
    v = View([G("x", "Placeholder"), G("c", op, "x"), G("r", "Relu", "c")])
    (m,) = DEFAULT_REGISTRY.match(v)
    assert m.names == ("c", "r")


def test_keras_spellings_and_subclasses():
    v = View([
        K("in", ["InputLayer"]),
        K("c", ["MyConv", "Conv2D", "BaseConv", "Layer"], "in"),
        K("bn", ["BatchNormalization", "Layer"], "c"),
        K("act", ["LeakyReLU", "Layer"], "bn"),
        K("t", ["Conv2DTranspose", "BaseConvTranspose", "Layer"], "act", activation="relu"),
        K("bn2", ["BatchNormalization", "Layer"], "t"),
    ])  # fmt: skip
    ms = DEFAULT_REGISTRY.match(v)
    assert [m.names for m in ms] == [("c", "bn", "act"), ("t",)]  # own activation ends the group


def test_keras_layer_names_do_not_match_graph_ops():
    # a Keras "Relu"-named class is not the op Relu, and a graph Conv2D is not a Keras layer
    assert CONV.match(View([]), K("c", ["Conv2D"])) is not None
    assert NORM.match(View([]), G("n", "BatchNormalization")) is None


def test_longest_match_then_registry_order():
    a = Matcher("a", ops=("A",))
    b = Matcher("b", ops=("B",))
    c = Matcher("c", ops=("C",))
    v = View([G("x", "A"), G("y", "B", "x"), G("z", "C", "y")])
    reg = Registry([Pattern("short", (a,)), Pattern("long", (a, b, Step(c, optional=True)))])
    (m,) = reg.match(v)
    assert m.pattern.name == "long" and m.names == ("x", "y", "z")
    reg2 = Registry([Pattern("first", (a, b)), Pattern("second", (a, b))])
    assert reg2.match(v)[0].pattern.name == "first"


def test_user_pattern_for_custom_norm_without_touching_defaults():
    v = View([
        K("in", ["InputLayer"]), K("c", ["Conv2D", "BaseConv"], "in"),
        K("n", ["MyNorm", "Layer"], "c"), K("r", ["ReLU"], "n"),
    ])  # fmt: skip
    assert DEFAULT_REGISTRY.match(v)[0].names == ("c",)
    reg = DEFAULT_REGISTRY.copy()
    mynorm = Matcher("mynorm", layers=("MyNorm",))
    reg.register(Pattern("conv_mynorm", (CONV, mynorm, Step(ACTIVATION, optional=True))), before="conv")
    assert [p.name for p in reg][:2] == ["conv_mynorm", "conv"]
    assert reg.match(v)[0].names == ("c", "n", "r")
    assert len(DEFAULT_REGISTRY) == 2  # the default is untouched
    with pytest.raises(ValueError, match="already registered"):
        reg.register(Pattern("conv", (CONV,)))
    with pytest.raises(ValueError, match="before='nope'"):
        reg.register(Pattern("x", (CONV,)), before="nope")
    with pytest.raises(TypeError, match="pattern must be a Pattern"):
        reg.register("conv")
    reg.unregister("conv_mynorm")
    assert [p.name for p in reg] == [p.name for p in default_registry()]


def test_pattern_validation():
    with pytest.raises(ValueError, match="first step"):
        Pattern("p", (Step(CONV, optional=True),))
    with pytest.raises(ValueError, match="target"):
        Pattern("p", (CONV,), target=3)
    with pytest.raises(ValueError, match="no steps"):
        Pattern("p", ())


def test_insert_at_a_step():
    p = Pattern("conv_then_act", (CONV, Step(NORM, optional=True), Step(ACTIVATION, optional=True)), insert=0)
    v = View([G("x", "Placeholder"), G("c", "Conv2D", "x"), G("r", "Relu", "c")])
    (m,) = Registry([p]).match(v)
    assert m.after.name == "c" and m.names == ("c", "r")


def test_dense_is_an_option():
    v = View([K("in", ["InputLayer"]), K("d", ["Dense"], "in"), K("r", ["ReLU"], "d")])
    assert make_plan(v, QuantizeConfig.create(bits=8)).points == []
    plan = make_plan(v, QuantizeConfig.create(bits=8, dense=True))
    assert [(p.target, p.after) for p in plan.points] == [("d", "r")]


def test_weight_slots_axes():
    assert weight_slots(G("c", "Conv2D")) == (("input:1", -1),)
    assert weight_slots(G("c", "DepthwiseConv2dNative")) == (("input:1", -2),)
    assert weight_slots(G("c", "Conv2DBackpropInput")) == (("input:1", -2),)
    assert weight_slots(K("s", ["SeparableConv2D", "BaseSeparableConv"])) == (
        ("depthwise_kernel", -2),
        ("pointwise_kernel", -1),
    )
    assert weight_slots(K("d", ["DepthwiseConv2D", "BaseDepthwiseConv"])) == (("kernel", -2),)
    assert weight_slots(K("x", ["Lambda"])) == ()


def _chain_view():
    return View([
        K("in", ["InputLayer"]),
        K("conv_a", ["Conv2D", "BaseConv"], "in"), K("bn_a", ["BatchNormalization"], "conv_a"),
        K("conv_b", ["Conv2D", "BaseConv"], "bn_a"),
        K("dw_c", ["DepthwiseConv2D", "BaseDepthwiseConv"], "conv_b"),
    ])  # fmt: skip


def test_plan_include_exclude_overrides_and_table():
    v = _chain_view()
    plan = make_plan(v, QuantizeConfig.create(bits=8, weights=True))
    assert plan.targets == ["conv_a", "conv_b", "dw_c"]
    assert len(plan.activations) == 3 and len(plan.weights) == 3
    assert plan.weights[2].format == Affine(8, narrow_range=True, symmetric=True, axis=-2)
    text = str(plan)
    for word in ("layer", "group", "insert after", "format", "conv_a > bn_a", "affine8"):
        assert word in text
    json.loads(plan.to_json())

    plan = make_plan(v, QuantizeConfig.create(bits=8, exclude=["^conv_b$"]))
    assert plan.targets == ["conv_a", "dw_c"]
    assert any("conv_b" in s[0] for s in plan.skipped)
    plan = make_plan(v, QuantizeConfig.create(bits=8, include="class:DepthwiseConv2D"))
    assert plan.targets == ["dw_c"]
    plan = make_plan(
        v,
        QuantizeConfig.create(
            bits=8,
            overrides={"conv_a": {"bits": 4, "range": (0, 6), "rounding": "stochastic"}, "dw_c": None},
        ),
    )
    assert plan.targets == ["conv_a", "conv_b"]
    a = plan.points[0]
    assert a.format == FixedPoint(4, (0.0, 6.0)) and a.rounding == "stochastic" and a.inference_rounding == "nearest"
    assert plan.points[1].format == Affine(8)


def test_nested_views_carry_scope():
    inner = View([K("in", ["InputLayer"]), K("conv", ["Conv2D", "BaseConv"], "in")])
    outer = View([K("in", ["InputLayer"]), K("sub", ["Functional"], "in")], children={"sub": inner})
    plan = make_plan(outer, QuantizeConfig.create(format="e4m3"))
    (p,) = plan.points
    assert p.scope == ("sub",) and p.path == "sub/conv" and p.format == FloatFormat(4, 3, inf_nan="fn")
    assert make_plan(outer, QuantizeConfig.create(exclude="sub/conv")).points == []


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        (dict(bits=4, format="e4m3"), ValueError, "bits"),
        (dict(format="e4m3", range=(0, 1)), ValueError, "range"),
        (dict(rounding="banker"), ValueError, "rounding"),
        (dict(weights=False, weight_bits=4), ValueError, "weights=False"),
        (dict(weight_bits=4, weight_format="affine8"), ValueError, "weight_bits"),
        (dict(include=3), TypeError, "include"),
        (dict(exclude="("), ValueError, "exclude"),
        (dict(overrides={"a": {"bitz": 3}}), ValueError, "bitz"),
        (dict(overrides={"a": {"bits": 99}}), ValueError, "overrides"),
        (dict(storage_rounding="up", weight_storage="fixed16[-128,128]"), ValueError, "storage_rounding"),
        (dict(weight_storage="affine8"), ValueError, "weight_storage"),
        (dict(activations=False), ValueError, "nothing to quantize"),
        (dict(storage_rounding="stochastic"), ValueError, "storage_rounding.*weight_storage"),
        (dict(weight_rounding="stochastic"), ValueError, "weight_rounding.*weights=True"),
        (dict(weight_rounding="stochastic", weights=False), ValueError, "weight_rounding"),
    ],
)
def test_config_errors_name_the_argument(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        QuantizeConfig.create(**kwargs)


def test_weight_rounding_with_weights_only_in_overrides_is_not_a_contradiction():
    c = QuantizeConfig.create(weight_rounding="stochastic", overrides={"conv1": {"weight_bits": 4}})
    w = c.for_node(Node("conv1", kind="Conv2D", domain="graph"))
    assert w.weights and w.weight_rounding == "stochastic"


def test_config_defaults():
    c = QuantizeConfig.create()
    assert c.format == Affine(8) and not c.weights
    c = QuantizeConfig.create(bits=4, range=(0.0, 6.0))
    assert c.format == FixedPoint(4, (0.0, 6.0))
    c = QuantizeConfig.create(weight_bits=4)
    assert c.weights and c.weight_format_for(-1) == Affine(4, narrow_range=True, symmetric=True, axis=-1)
    c = QuantizeConfig.create(format="bfloat16", weights=True)
    assert c.weight_format_for(-1) == FloatFormat(8, 7)


def test_override_keeps_what_it_leaves_out():
    """An override refines the config: {"range": r} keeps the bits, {"bits": b} keeps a fixed range."""
    node = Node("conv1", kind="Conv2D", domain="graph")
    base = QuantizeConfig.create(bits=4, range=(0.0, 8.0), overrides={"conv1": {"range": (0.0, 4.0)}})
    assert base.for_node(node).format == FixedPoint(4, (0.0, 4.0))
    base = QuantizeConfig.create(bits=4, range=(0.0, 8.0), overrides={"conv1": {"bits": 6}})
    assert base.for_node(node).format == FixedPoint(6, (0.0, 8.0))
    base = QuantizeConfig.create(bits=4, overrides={"conv1": {"range": (0.0, 4.0)}})
    assert base.for_node(node).format == FixedPoint(4, (0.0, 4.0))
    base = QuantizeConfig.create(format="e4m3", overrides={"conv1": {"bits": 6}})
    assert base.for_node(node).format == Affine(6)
