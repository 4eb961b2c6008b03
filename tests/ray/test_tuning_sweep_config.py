"""tuning.sweep's config: a bad objective, key or schedule is refused before Ray starts, naming what was wrong;
a trial's reservation covers its driver, KGE trainers and mining actors (its LM workers are Ray Train's)."""

from __future__ import annotations

import pytest

from bikd.config import load_config
from tuning.results import importance
from tuning.sweep import SweepConfig, check, objective, trial_bundles


def sweep(*overrides: str) -> SweepConfig:
    return load_config(SweepConfig, None, overrides)


def test_bad_sweep_configs_are_refused_before_anything_starts():
    with pytest.raises(ValueError, match="objective key 'kg_valid_mr' is not a per-round metric"):
        sweep("objective={kg_valid_mr: 1.0}")
    with pytest.raises(ValueError, match="space must be one of"):
        sweep("space=fusoin")
    with pytest.raises(ValueError, match="only: 'kge.model.dim' is not a swept key of space 'fusion'"):
        sweep("only=[kge.model.dim]")
    with pytest.raises(ValueError, match="asha.grace_period 4 is past the trials' loop.rounds 3"):
        check(sweep("asha.grace_period=4"))
    with pytest.raises(ValueError, match="loop.rounds must be >= 1"):
        check(sweep("base_overrides=[loop.rounds=0]"))


def test_the_objective_is_a_weighted_sum_with_missing_values_as_zero():
    row = {"kg_valid_mrr": 0.3, "eval_accuracy": 0.8, "mined_precision_at_100_valid": None}
    assert objective(row, {"kg_valid_mrr": 2.0, "eval_accuracy": 1.0, "mined_precision_at_100_valid": 1.0}) == pytest.approx(1.4)


def test_a_trial_reserves_its_driver_trainers_and_mining_actors():
    cfg = sweep("base_overrides=[kge_dist.num_parts=2, kge_dist.cpus_per_trainer=0.5, mine.scoring.num_actors=1]").base()
    assert trial_bundles(cfg, 0.25) == [{"CPU": 0.25}, {"CPU": 0.5}, {"CPU": 0.5}, {"CPU": cfg.mine.scoring.num_cpus}]
    cfg = sweep("base_overrides=[loop.directions=kg2lm]").base()
    assert trial_bundles(cfg, 0.25) == [{"CPU": 0.25}, {"CPU": cfg.kge_dist.cpus_per_trainer}]  # nothing is mined


def test_importance_ranks_the_hyperparameter_that_explains_the_objective():
    rows = [{"objective": 0.1 * i, "lr": 0.01 * i, "gate": "vector" if i % 2 else "scalar", "dim": 64} for i in range(1, 9)]
    ranked = importance(rows, ["gate", "lr", "dim"])
    assert list(ranked) == ["lr", "gate", "dim"] and ranked["lr"] == pytest.approx(1.0) and ranked["dim"] == 0.0
    assert 0 < ranked["gate"] < 0.5
