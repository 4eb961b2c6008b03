"""bikd/driver.py's configuration: the defaults name the embedded slice, bad loop settings and a resource split
that does not fit the cluster fail before any actor starts, each round's LM job is derived as documented, and
the plateau rule."""

from __future__ import annotations

import dataclasses

import pytest

from bikd.config import apply_overrides, from_dict
from bikd.driver import BikdConfig, Driver, lm_side, required_cpus, validate

TINY_LM = ["lm.encoder.name_or_path=tiny", "lm.fusion.layers=[1]"]


def cfg(*overrides: str) -> BikdConfig:
    return from_dict(BikdConfig, apply_overrides({}, list(overrides)))


def test_defaults_run_the_embedded_slice_both_ways_asynchronously():
    c = BikdConfig()
    assert c.data.name == "fb15k237_slice" and c.loop.directions == "both" and c.loop.mode == "async"
    assert c.kge_dist.mode == "sync" and c.lm.task.link
    assert required_cpus(c) == {"kge": 1.0, "lm": 2.0, "mining": 2.0}
    assert required_cpus(cfg("loop.directions=kg2lm"))["mining"] == 0.0


@pytest.mark.parametrize("override, message", [
    ("loop.mode=asynch", "expected one of"),
    ("loop.directions=lm2kg", "expected one of"),
    ("loop.rounds=0", "loop.rounds must be >= 1"),
    ("loop.plateau_patience=0", "plateau_patience must be >= 1"),
    ("loop.max_kge_lead=-1", "max_kge_lead must be >= 0"),
    ("loop.mode=sync kge_dist.mode=async", "loop.mode sync needs kge_dist.mode sync"),
    ("probe_limit=0", "probe_limit must be >= 1"),
    ("kge_dist.exchange_every=4", "exchange_every=4 needs dist.mode='async'"),
    ("kge_dist.mode=async kge_dist.exchange_every=0", "exchange_every must be >= 1"),
    ("kge_dist.servers_per_node=0", "servers_per_node must be >= 1"),
])
def test_bad_loop_settings_fail_when_the_config_is_built(override, message):
    with pytest.raises(ValueError, match=message):
        cfg(*override.split())


def test_resource_split_is_checked_against_the_cluster(ray_local):
    with pytest.raises(ValueError, match=r"resource split kge 1 CPUs, lm 4 CPUs, mining 2 CPUs needs 7 CPUs; the Ray cluster has 2"):
        validate(cfg(*TINY_LM, "lm.num_workers=2"))
    validate(cfg(*TINY_LM, "lm.cpus_per_worker=0.5", "mine.scoring.num_cpus=0.25", "kge_dist.cpus_per_trainer=0.25"))


def test_the_lm_side_is_one_fit_cut_into_rounds_on_one_schedule(tmp_path):
    c = cfg(f"run_dir={tmp_path}", "loop.mode=sync", "loop.rounds=4", "loop.lm_steps_per_round=6", "exchange.lm_poll_steps=4",
            "exchange.actor=x")
    lm = lm_side(c, "SNAP")
    assert (lm.train.steps, lm.train.schedule_steps, lm.train.checkpoint_every) == (24, 24, 6)
    assert (lm.rounds.steps, lm.rounds.gated) == (6, True)  # sync: each round waits for the driver
    assert lm.exchange.lm_poll_steps == 2  # sync: divides the round, so the first step of every round polls
    free = lm_side(dataclasses.replace(c, loop=dataclasses.replace(c.loop, mode="async")), "S")
    assert free.exchange.lm_poll_steps == 4 and not free.rounds.gated
    assert lm.kg.export == "SNAP" and lm.export_path.endswith("lm/exports") and lm.name == "ckpt"
    assert lm.data == c.data and lm.task.link and lm.kd.entity_weight == c.lm.kd.entity_weight
    plain = lm_side(cfg(f"run_dir={tmp_path}", "loop.directions=none", "exchange.actor=x"), "SNAP")
    assert not plain.task.link and plain.kd.entity_weight == plain.kd.relation_weight == 0.0  # never sees the KG


def test_plateau_stops_when_the_metric_has_not_risen_by_min_delta(tmp_path):
    d = Driver.__new__(Driver)  # the rule alone: no run directory needed
    d.cfg = cfg("loop.plateau_patience=2", "loop.plateau_min_delta=0.01")
    rows = lambda *v: [{"round": i + 1, "kg_valid_mrr": x} for i, x in enumerate(v)]  # noqa: E731
    assert not d._plateaued(rows(0.1, 0.2))  # too few rounds
    assert not d._plateaued(rows(0.1, 0.2, 0.215, 0.19))  # 0.215 >= 0.2 + 0.01
    assert d._plateaued(rows(0.1, 0.2, 0.205, 0.19))
    d.cfg = cfg("loop.plateau_patience=1", "loop.plateau_metric=no_such_metric")
    with pytest.raises(ValueError, match="'no_such_metric' is not a per-round metric"):
        d._plateaued(rows(0.1, 0.2))


def test_one_seed_sets_every_side_and_keeps_the_data_samples():
    c = cfg("seed=7")
    assert (c.kge.seed, c.lm.train.seed, c.lm.kd.seed, c.mine.extractor.seed) == (7, 7, 7, 7)
    assert c.lm.task.seed == BikdConfig().lm.task.seed and cfg().kge.seed == BikdConfig().kge.seed


def test_the_fb15k237_squad_preset_is_a_valid_config():
    from pathlib import Path

    from bikd.config import load_config

    path = Path(__file__).resolve().parents[2] / "configs" / "bikd_fb15k237_squad.yaml"
    c = load_config(BikdConfig, str(path))
    assert c.data.name == "fb15k237" and c.lm.task.name == "qa" and c.loop.mode == "async"
    assert c.kge.model.dim == 200 and c.kge_dist.num_parts == 2
