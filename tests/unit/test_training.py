"""The pure sLCWA step (plan -> gradients on pulled rows) and the single-process trainer."""

from __future__ import annotations

import pytest
import torch

from bikd.eval import evaluate
from bikd.kg.datasets import load_dataset
from bikd.kge.losses import LossConfig, RegularizerConfig, compute_loss
from bikd.kge.models import ModelConfig, build_model
from bikd.kge.optim import SparseOptimConfig
from bikd.kge.sampling import NegativeSampler, NegativeSamplerConfig
from bikd.kge.training import KGETrainConfig, LocalTrainer, plan_step, step_gradients


@pytest.fixture(scope="module")
def nations():
    return load_dataset("nations")


@pytest.mark.parametrize("name", ["transe", "distmult", "complex", "rotate"])
@pytest.mark.parametrize("loss", ["margin", "self_adversarial"])
def test_step_gradients_equal_dense_autograd(nations, name, loss):
    """Gradients on the pulled rows equal autograd through the whole tables with per-triple scoring."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, dim=6), nations.num_entities, nations.num_relations).double()
    sampler = NegativeSampler(NegativeSamplerConfig(num_negatives=5, chunk_size=4), nations.num_entities)
    batch = nations.train[:10]  # 10 positives -> chunks of 4, 4, 2 (+2 padding)
    neg = sampler.sample_batch(len(batch), torch.Generator().manual_seed(1))
    weights = torch.rand(10, dtype=torch.float64)
    loss_cfg, reg_cfg = LossConfig(name=loss, margin=2.0), RegularizerConfig(name="l2", weight=0.01)
    plan = plan_step(batch, neg)
    value, ent_grad, rel_grad = step_gradients(model.interaction, plan, neg, model.entity[plan.entity_ids],
                                               model.relation[plan.relation_ids], loss_cfg, reg_cfg, weights)

    # reference: build every (positive, negative) triple explicitly and score it one by one
    h, r, t = batch.unbind(1)
    pos_rows, neg_rows, w = [], [], []
    for c in range(len(neg.index)):
        for j, b in enumerate(neg.index[c].tolist()):
            if not neg.mask[c, j]:
                continue
            k = neg.negatives[c]
            if neg.corrupt_head[c]:
                neg_rows.append(model.score(k, r[b].expand(len(k)), t[b].expand(len(k))))
            else:
                neg_rows.append(model.score(h[b].expand(len(k)), r[b].expand(len(k)), k))
            pos_rows.append(b)
            w.append(weights[b])
    idx = torch.tensor(pos_rows)
    ref = compute_loss(loss_cfg, model.score(h, r, t)[idx], torch.stack(neg_rows), torch.stack(w))
    ref = ref + 0.01 * (model.entity[h].pow(2).sum(1).mean() + model.relation[r].pow(2).sum(1).mean()
                        + model.entity[t].pow(2).sum(1).mean())
    ref.backward()
    assert value == pytest.approx(ref.item(), rel=1e-9)
    assert torch.allclose(ent_grad, model.entity.grad[plan.entity_ids], atol=1e-10)
    assert torch.allclose(rel_grad, model.relation.grad[plan.relation_ids], atol=1e-10)
    untouched = torch.ones(nations.num_entities, dtype=torch.bool)
    untouched[plan.entity_ids] = False
    assert (model.entity.grad[untouched] == 0).all()


def test_zero_weights_give_zero_gradients(nations):
    model = build_model(ModelConfig(name="distmult", dim=4), nations.num_entities, nations.num_relations)
    neg = NegativeSampler(NegativeSamplerConfig(num_negatives=3, chunk_size=2), nations.num_entities).sample_batch(
        4, torch.Generator().manual_seed(0))
    plan = plan_step(nations.train[:4], neg)
    loss, ent_grad, rel_grad = step_gradients(model.interaction, plan, neg, model.entity[plan.entity_ids],
                                              model.relation[plan.relation_ids], LossConfig(name="logistic"),
                                              RegularizerConfig(), weights=torch.zeros(4))
    assert loss == 0 and (ent_grad == 0).all() and (rel_grad == 0).all()


def small_cfg(**kw) -> KGETrainConfig:
    base = dict(model=ModelConfig(name="distmult", dim=32), loss=LossConfig(name="logistic"), batch_size=128,
                sampler=NegativeSamplerConfig(num_negatives=32, chunk_size=32), optimizer=SparseOptimConfig(lr=0.1))
    return KGETrainConfig(**{**base, **kw})


def test_local_trainer_learns(nations):
    trainer = LocalTrainer(nations.train, nations.num_entities, nations.num_relations, small_cfg())
    before = evaluate(trainer.model, nations.valid, [nations.all_triples()], nations.num_relations).mrr
    losses = [trainer.train_epoch() for _ in range(15)]
    after = evaluate(trainer.model, nations.valid, [nations.all_triples()], nations.num_relations).mrr
    assert losses[-1] < losses[0]
    assert after > before + 0.15, (before, after)


def test_resume_is_bit_identical(nations):
    cfg = small_cfg(batch_size=100)
    straight = LocalTrainer(nations.train, nations.num_entities, nations.num_relations, cfg)
    for _ in range(3):
        straight.train_epoch()
    first = LocalTrainer(nations.train, nations.num_entities, nations.num_relations, cfg)
    first.train_epoch()
    for _ in range(5):  # stop mid-epoch
        first.step(first.batches.next_batch())
    state = first.state_dict()
    resumed = LocalTrainer(nations.train, nations.num_entities, nations.num_relations, cfg)
    resumed.load_state_dict(state)
    resumed.train_epoch()  # the rest of epoch 2
    resumed.train_epoch()
    assert torch.equal(resumed.model.entity, straight.model.entity)
    assert torch.equal(resumed.model.relation, straight.model.relation)


def test_bad_train_config():
    with pytest.raises(ValueError, match="batch_size"):
        small_cfg(batch_size=0)


def test_evaluation_sees_in_place_updates(nations):
    """The trainer updates the tables in place through ``.data``; an evaluation after more training must
    score with the new rows and their new norms (a cache of RotatE's entity norms once went stale here)."""
    import copy

    cfg = KGETrainConfig(model=ModelConfig(name="rotate", dim=8), loss=LossConfig(name="self_adversarial", margin=3.0),
                         sampler=NegativeSamplerConfig(num_negatives=8, chunk_size=32), batch_size=64)
    trainer = LocalTrainer(nations.train, nations.num_entities, nations.num_relations, cfg)
    known = [nations.all_triples()]
    evaluate(trainer.model, nations.valid, known, nations.num_relations)
    for _ in range(3):
        trainer.train_epoch()
    h, r = nations.valid[:, 0], nations.valid[:, 1]
    fresh = copy.deepcopy(trainer.model)
    assert torch.equal(trainer.model.ranking_scores_t(h, r), fresh.ranking_scores_t(h, r))
    assert evaluate(trainer.model, nations.valid, known, nations.num_relations).mrr == \
        evaluate(fresh, nations.valid, known, nations.num_relations).mrr
