"""tuning.spaces: search spaces are dotted config keys, checked against the job's config before any trial."""

from __future__ import annotations

import functools
import random

import pytest
from ray import tune

from tuning.spaces import SPACES, check_space, overrides, trial_config


def get(cfg, key: str):
    return functools.reduce(getattr, key.split("."), cfg)


@pytest.mark.parametrize("name", sorted(SPACES))
def test_every_shipped_space_fits_the_default_config(name):
    check_space(SPACES[name], num_samples=4)


def test_a_trial_config_is_the_base_plus_the_sampled_values():
    rng = random.Random(0)
    space = SPACES["full"]
    point = {k: d.sample(random_state=rng.randrange(2**31)) if hasattr(d, "sample") else d for k, d in space.items()}
    cfg = trial_config(point, base_overrides=("loop.rounds=2",))
    for key, value in point.items():
        got = get(cfg, key)
        assert (list(got) if isinstance(got, tuple) else got) == value, key
    assert cfg.loop.rounds == 2
    assert overrides({"lm.fusion.layers": [1, 3], "exchange.kge_publish_epochs": None, "kge.model.name": "rotate"}) == [
        "lm.fusion.layers=[1, 3]", "exchange.kge_publish_epochs=null", "kge.model.name=rotate"]


def test_kd_weights_span_a_hundredfold_on_a_log_scale():
    for key in ("lm.kd.entity_weight", "lm.kd.relation_weight"):
        domain = SPACES["fusion"][key]
        assert isinstance(domain.get_sampler(), tune.search.sample.LogUniform) and (domain.lower, domain.upper) == (0.01, 1.0)


def test_a_bad_key_or_value_fails_before_any_trial_naming_it():
    with pytest.raises(ValueError, match="entity_wieght.*did you mean 'entity_weight'"):
        check_space({"lm.kd.entity_wieght": tune.loguniform(0.01, 1.0)})
    with pytest.raises(ValueError, match="kge.model.name.*'transE'"):
        check_space({"kge.model.name": tune.choice(["transE"])})
