"""1vsAll training with reciprocal relations (pure torch)."""

from __future__ import annotations

import copy

import pytest
import torch

from bikd.eval import evaluate
from bikd.kg.datasets import load_dataset
from bikd.kge.losses import RegularizerConfig
from bikd.kge.models import ModelConfig
from bikd.kge.one_vs_all import OneVsAllConfig, OneVsAllTrainer, ReciprocalModel, queries


@pytest.fixture(scope="module")
def umls():
    return load_dataset("umls")


def test_queries_add_reciprocals():
    triples = torch.tensor([[0, 1, 2], [3, 0, 4]])
    assert queries(triples, num_relations=5).tolist() == [[0, 1, 2], [3, 0, 4], [2, 6, 0], [4, 5, 3]]


def test_reciprocal_model_answers_head_queries_with_inverse_relations():
    cfg = OneVsAllConfig(model=ModelConfig(name="complex", dim=8))
    trainer = OneVsAllTrainer(torch.tensor([[0, 0, 1]]), num_entities=6, num_relations=3, cfg=cfg)
    model = trainer.eval_model()
    assert isinstance(model, ReciprocalModel) and trainer.model.num_relations == 6
    r, t = torch.tensor([0, 2]), torch.tensor([5, 1])
    assert torch.equal(model.score_h(r, t), trainer.model.score_t(t, r + 3))
    assert torch.equal(model.score_t(t, r), trainer.model.score_t(t, r))


@pytest.mark.parametrize("name,scale", [("complex", 1.0), ("rotate", 5.0)])  # a dot and an L2 model
def test_learns_umls(umls, name, scale):
    reg = RegularizerConfig(name="n3", weight=1e-2, is_complex=name == "complex") if name in ("complex", "distmult") else RegularizerConfig()
    cfg = OneVsAllConfig(model=ModelConfig(name=name, dim=32), regularizer=reg, lr=0.1, batch_size=256, logit_scale=scale)
    trainer = OneVsAllTrainer(umls.train, umls.num_entities, umls.num_relations, cfg)
    before = evaluate(trainer.eval_model(), umls.valid, [umls.all_triples()], umls.num_relations).mrr
    losses = [trainer.train_epoch()["loss"] for _ in range(5)]
    after = evaluate(trainer.eval_model(), umls.valid, [umls.all_triples()], umls.num_relations).mrr
    assert losses[-1] < losses[0]
    assert after > 0.5 > before + 0.3, (before, after)


def test_state_dict_resume_is_exact(umls):
    cfg = OneVsAllConfig(model=ModelConfig(name="distmult", dim=16), batch_size=512)
    straight = OneVsAllTrainer(umls.train, umls.num_entities, umls.num_relations, cfg)
    straight.train_epoch()
    state = copy.deepcopy(straight.state_dict())
    straight.train_epoch()
    resumed = OneVsAllTrainer(umls.train, umls.num_entities, umls.num_relations, cfg)
    resumed.load_state_dict(state)
    resumed.train_epoch()
    assert resumed.epoch == 2
    assert torch.equal(resumed.model.entity, straight.model.entity)


@pytest.mark.parametrize("kw,match", [
    (dict(model=ModelConfig(name="transe", dim=8, p=1)), "TransE-L1"),
    (dict(lr=0.0), "lr"),
    (dict(logit_scale=-1.0), "logit_scale"),
    (dict(label_smoothing=1.0), "label_smoothing"),
])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        OneVsAllConfig(**kw)
