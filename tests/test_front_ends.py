"""What every front end (Keras, tf.function, SavedModel) shares: config= and its precedence, the defaults."""

import keras
import pytest

import graphquant.keras as gk
from graphquant.plan import QuantizeConfig, resolve_config


def test_resolve_config_precedence():
    cfg = QuantizeConfig.create(format="e4m3")
    # keywords at QuantizeConfig.create's defaults are "not given": they do not clash with config=
    assert resolve_config(cfg, {"bits": None, "rounding": "nearest", "dense": False}) is cfg
    assert resolve_config(None, {"rounding": "nearest"}).to_dict() == QuantizeConfig.create(8).to_dict()
    with pytest.raises(ValueError, match=r"not both \(got \['dense', 'rounding'\]\)"):
        resolve_config(cfg, {"rounding": "stochastic", "dense": True})
    with pytest.raises(TypeError, match="config must be a graphquant.QuantizeConfig, got dict"):
        resolve_config({"bits": 8}, {})
    with pytest.raises(TypeError, match="dense must be a bool"):  # a non-default value of another type is given
        resolve_config(None, {"dense": 0})


def test_keras_config_same_rule():
    m = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, name="conv")])
    cfg = QuantizeConfig.create(format="e4m3")
    plan = gk.inspect(m, config=cfg)
    assert plan.config is cfg and [str(p.format) for p in plan.activations] == ["e4m3"]
    assert gk.inspect(m).to_dict() == gk.inspect(m, config=QuantizeConfig.create(8)).to_dict()
    with pytest.raises(TypeError, match="config must be a graphquant.QuantizeConfig, got str"):
        gk.quantize_model(m, config="e4m3")
    with pytest.raises(ValueError, match="config= or keyword options, not both"):
        gk.inspect(m, config=cfg, bits=8)
