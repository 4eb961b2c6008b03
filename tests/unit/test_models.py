"""KGE models: all-entity scoring and ranking forms against brute force, config validation, state_dict,
constraints, and the sLCWA loop running on every model."""

from __future__ import annotations

import io
import math

import pytest
import torch

from bikd.eval import EvalConfig, evaluate
from bikd.kge.interactions import INTERACTIONS
from bikd.kge.models import KGEModel, ModelConfig, TransE, build_model
from bikd.kge.optim import SparseOptimConfig
from bikd.kge.sampling import NegativeSamplerConfig
from bikd.kge.training import KGETrainConfig, LocalTrainer

CONFIGS = [ModelConfig(name="transe", dim=6, p=1), ModelConfig(name="transe", dim=6, p=2),
           ModelConfig(name="distmult", dim=6), ModelConfig(name="complex", dim=6), ModelConfig(name="rotate", dim=6)]
IDS = [f"{c.name}-p{c.p}" if c.name == "transe" else c.name for c in CONFIGS]
NUM_ENTITIES, NUM_RELATIONS = 23, 4


def test_configs_cover_every_interaction():
    assert {c.name for c in CONFIGS} == set(INTERACTIONS)


def make(cfg: ModelConfig, seed: int = 0, dtype=torch.float64) -> KGEModel:
    torch.manual_seed(seed)
    model = build_model(cfg, NUM_ENTITIES, NUM_RELATIONS).to(dtype)
    with torch.no_grad():  # off the unit sphere, so that norms matter
        model.entity.mul_(1 + torch.rand(NUM_ENTITIES, 1, dtype=dtype))
    return model


def queries(n=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(NUM_ENTITIES, (n,), generator=g), torch.randint(NUM_RELATIONS, (n,), generator=g),
            torch.randint(NUM_ENTITIES, (n,), generator=g))


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_score_t_and_score_h_equal_brute_force(cfg):
    model = make(cfg)
    h, r, t = queries()
    every = torch.arange(NUM_ENTITIES)
    brute_t = torch.stack([model.score(h, r, torch.full_like(h, e)) for e in every], dim=1)
    brute_h = torch.stack([model.score(torch.full_like(t, e), r, t) for e in every], dim=1)
    assert model.score_t(h, r).shape == model.score_h(r, t).shape == (len(h), NUM_ENTITIES)
    assert torch.allclose(model.score_t(h, r), brute_t, atol=1e-10)
    assert torch.allclose(model.score_h(r, t), brute_h, atol=1e-10)
    # the broadcast form the sLCWA loop uses
    assert torch.allclose(model.score(h[:, None], r[:, None], every[None, :]), brute_t, atol=1e-10)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_ranking_scores_order_like_scores(cfg):
    model = make(cfg)
    h, r, t = queries()
    with torch.no_grad():
        for exact, fast in [(model.score_t(h, r), model.ranking_scores_t(h, r)),
                            (model.score_h(r, t), model.ranking_scores_h(r, t))]:
            assert fast.shape == exact.shape
            # strictly increasing per row: every pairwise comparison within a row agrees
            assert torch.equal(torch.sign(exact[:, :, None] - exact[:, None, :]), torch.sign(fast[:, :, None] - fast[:, None, :]))


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c.name in ("transe", "rotate") and c.p == 2], ids=["transe-p2", "rotate"])
def test_l2_ranking_scores_are_the_expansion(cfg):
    model = make(cfg)
    h, r, _ = queries()
    q = model.tail_query(h, r)
    with torch.no_grad():
        expected = (q * q).sum(1, keepdim=True) - model.score_t(h, r) ** 2  # ||q||^2 - ||q - e||^2 = 2 q.e - ||e||^2
        assert torch.allclose(model.ranking_scores_t(h, r), expected, atol=1e-10)


class ScoresOnly:
    """The same model seen without its ranking_scores_*, so the evaluator falls back to score_t/score_h."""

    def __init__(self, model):
        self.num_entities, self.score_t, self.score_h = model.num_entities, model.score_t, model.score_h


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_evaluator_ranks_equal_with_and_without_ranking_scores(cfg):
    model = make(cfg)
    triples = torch.stack(queries(n=30, seed=5), dim=1)
    cfg_eval = EvalConfig(batch_size=7, compile="never")
    fast = evaluate(model, triples, [], NUM_RELATIONS, cfg_eval)
    slow = evaluate(ScoresOnly(model), triples, [], NUM_RELATIONS, cfg_eval)
    for side in ("head", "tail"):
        assert torch.equal(fast.ranks[side].optimistic, slow.ranks[side].optimistic)
        assert torch.equal(fast.ranks[side].pessimistic, slow.ranks[side].pessimistic)


def test_cached_norms_follow_parameter_updates():
    model = make(CONFIGS[1])
    h, r, _ = queries()
    with torch.no_grad():
        model.ranking_scores_t(h, r)  # fills the cache
        model.entity.mul_(3.0)
        q = model.tail_query(h, r)
        expected = (q * q).sum(1, keepdim=True) - model.score_t(h, r) ** 2
        assert torch.allclose(model.ranking_scores_t(h, r), expected, atol=1e-9)
        model.load_state_dict(make(CONFIGS[1], seed=7).state_dict())
        q = model.tail_query(h, r)
        expected = (q * q).sum(1, keepdim=True) - model.score_t(h, r) ** 2
        assert torch.allclose(model.ranking_scores_t(h, r), expected, atol=1e-9)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_state_dict_round_trip(cfg):
    model = make(cfg, seed=0)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    assert set(state) == {"entity", "relation"}
    factor_e, factor_r = model.interaction.entity_factor, model.interaction.relation_factor
    assert state["entity"].shape == (NUM_ENTITIES, cfg.dim * factor_e)
    assert state["relation"].shape == (NUM_RELATIONS, cfg.dim * factor_r)
    other = make(cfg, seed=1)
    h, r, t = queries()
    assert not torch.allclose(other.score(h, r, t), model.score(h, r, t))
    other.load_state_dict(state)
    assert torch.equal(other.score(h, r, t), model.score(h, r, t))
    with torch.no_grad():
        assert torch.equal(other.ranking_scores_h(r, t), model.ranking_scores_h(r, t))


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_constrain(cfg):
    model = make(cfg)
    with torch.no_grad():
        model.relation.mul_(4.0)
    h, r, t = queries()
    entity, relation, before = model.entity.detach().clone(), model.relation.detach().clone(), model.score(h, r, t)
    model.constrain_()
    if cfg.name == "transe":
        assert torch.allclose(model.entity.norm(dim=1), torch.ones(NUM_ENTITIES, dtype=torch.float64))
        assert torch.allclose(model.entity, entity / entity.norm(dim=1, keepdim=True))
    else:
        assert torch.equal(model.entity, entity)
    if cfg.name == "rotate":
        assert (model.relation >= -math.pi).all() and (model.relation < math.pi).all()
        assert torch.allclose(model.score(h, r, t), before, atol=1e-10)
    else:
        assert torch.equal(model.relation, relation)


def test_initialisation():
    torch.manual_seed(0)
    rotate = build_model(ModelConfig(name="rotate", dim=500), 10, 200)
    assert rotate.relation.abs().max() <= math.pi and rotate.relation.abs().max() > 3.0
    assert rotate.entity.shape == (10, 1000) and rotate.relation.shape == (200, 500)
    transe = build_model(ModelConfig(name="transe", dim=16), 10, 3)
    assert torch.allclose(transe.relation.norm(dim=1), torch.ones(3))
    assert transe.entity.abs().max() <= 6 / 4
    scaled = build_model(ModelConfig(name="distmult", dim=16, init_scale=0.01), 10, 3)
    assert scaled.entity.abs().max() <= 0.01 and scaled.relation.abs().max() <= 0.01


def test_transe_keeps_its_old_api():
    torch.manual_seed(0)
    model = TransE(11, 3, 5, p=1)
    assert (model.num_entities, model.num_relations, model.dim, model.p) == (11, 3, 5, 1)
    assert model.entity.shape == (11, 5) and model.relation.shape == (3, 5)
    h, r, t = torch.tensor([0, 1]), torch.tensor([2, 0]), torch.tensor([3, 4])
    assert torch.allclose(model.score(h, r, t), -(model.entity[h] + model.relation[r] - model.entity[t]).norm(p=1, dim=-1))
    assert isinstance(build_model(ModelConfig(p=1, dim=5), 11, 3), TransE)
    with pytest.raises(ValueError, match="p must be 1 or 2"):
        TransE(11, 3, 5, p=3)


@pytest.mark.parametrize("kwargs,match", [
    ({"name": "transh"}, "model.name"),
    ({"dim": 0}, "model.dim"),
    ({"p": 3}, "model.p"),
    ({"name": "distmult", "p": 1}, "transe only"),
    ({"init_scale": 0.0}, "init_scale"),
    ({"init_scale": -1.0}, "init_scale"),
    ({"init_scale": float("inf")}, "init_scale"),
    ({"init_scale": float("nan")}, "init_scale"),
])
def test_bad_model_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_local_trainer_trains_every_model(cfg):
    triples = torch.stack(queries(n=64, seed=2), dim=1)
    train_cfg = KGETrainConfig(model=cfg, batch_size=16, sampler=NegativeSamplerConfig(num_negatives=8, chunk_size=8),
                               optimizer=SparseOptimConfig(lr=0.05))
    trainer = LocalTrainer(triples, NUM_ENTITIES, NUM_RELATIONS, train_cfg)
    model = trainer.model
    losses = [trainer.train_epoch() for _ in range(15)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    if cfg.name == "transe":  # the optimiser step applies the model's constraint to the rows it moves
        touched = torch.unique(triples[:, [0, 2]])
        assert torch.allclose(model.entity[touched].norm(dim=1), torch.ones(len(touched)), atol=1e-5)
    if cfg.name == "rotate":
        assert (model.relation.abs() <= math.pi).all()


def test_transe_free_norms():
    """normalize_entities=False (DGL-KE's TransE): no projection after a step, so entity norms may grow."""
    from bikd.kge.interactions import row_constraint

    free = build_model(ModelConfig(name="transe", dim=4, normalize_entities=False), 5, 2)
    unit = build_model(ModelConfig(name="transe", dim=4), 5, 2)
    assert row_constraint(free.interaction, "entity") is None
    assert row_constraint(unit.interaction, "entity") is not None
    rows = torch.full((3, 4), 2.0)
    free.interaction.constrain_entity_(rows)
    assert torch.equal(rows, torch.full((3, 4), 2.0))
    with pytest.raises(ValueError, match="normalize_entities applies to transe only"):
        ModelConfig(name="distmult", normalize_entities=False)
