"""Reverse distillation into the KG embeddings (issue 12 item 4): the KD term, and LocalTrainer.add_triples."""

from __future__ import annotations

import pytest
import torch

from bikd.kge.losses import LossConfig, RegularizerConfig, ReverseKDConfig, compute_loss, reverse_kd_loss
from bikd.kge.models import ModelConfig, build_model
from bikd.kge.optim import SparseOptimConfig
from bikd.kge.sampling import BatchIterator, NegativeSampler, NegativeSamplerConfig, degrees_from_triples
from bikd.kge.training import KDTargets, KGETrainConfig, LocalTrainer, plan_step, step_gradients

NUM_ENTITIES, NUM_RELATIONS = 30, 4


def tiny_kg(n: int = 120, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(NUM_ENTITIES, (n,), generator=g), torch.randint(NUM_RELATIONS, (n,), generator=g),
                        torch.randint(NUM_ENTITIES, (n,), generator=g)], 1)


def mined(n: int = 20, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    targets = torch.softmax(3 * torch.randn(n, NUM_RELATIONS, generator=g), 1)
    targets[0] = torch.tensor([0.0, 1.0, 0.0, 0.0])  # a relation the LM rules out: 0 log 0 = 0
    return tiny_kg(n, seed + 100), torch.rand(n, generator=g), targets


def cfg(**kw) -> KGETrainConfig:
    base = dict(model=ModelConfig(name="distmult", dim=8), loss=LossConfig(name="logistic"), batch_size=32,
                sampler=NegativeSamplerConfig(num_negatives=8, chunk_size=8), optimizer=SparseOptimConfig(lr=0.1),
                reverse_kd=ReverseKDConfig(weight=0.5, temperature=2.0))
    return KGETrainConfig(**{**base, **kw})


def naive_kd(model, triples: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(q || softmax(score / T)) per triple, one relation at a time with the model's own score."""
    total = torch.zeros((), dtype=model.entity.dtype)
    for (h, _, t), q in zip(triples.tolist(), targets):
        scores = torch.stack([model.score(torch.tensor([h]), torch.tensor([r]), torch.tensor([t]))[0]
                              for r in range(NUM_RELATIONS)]) / temperature
        p = torch.exp(scores - torch.logsumexp(scores, 0))
        total = total + sum(q[r] * (torch.log(q[r]) - torch.log(p[r])) for r in range(NUM_RELATIONS) if q[r] > 0)
    return total / len(triples)


@pytest.mark.parametrize("name", ["transe", "distmult", "complex", "rotate"])
def test_reverse_kd_loss_matches_naive_reference(name):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, dim=6), NUM_ENTITIES, NUM_RELATIONS).double()
    triples, _, targets = mined(6)
    targets = targets.double()
    h, t = model.entity[triples[:, 0]], model.entity[triples[:, 2]]
    scores = model.interaction.score(h[:, None], model.relation[None], t[:, None])  # (M, R)
    value = reverse_kd_loss(scores, targets, 1.7)
    assert value.item() == pytest.approx(naive_kd(model, triples, targets, 1.7).item(), rel=1e-10)
    assert value.item() >= 0
    assert reverse_kd_loss(scores[:0], targets[:0], 1.0).item() == 0.0  # no mined triple with targets


@pytest.mark.parametrize("name", ["transe", "complex"])
def test_step_gradients_with_kd_equal_dense_autograd(name):
    """The KD term's gradients on the pulled rows (all relations) equal autograd through the whole tables."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, dim=6), NUM_ENTITIES, NUM_RELATIONS).double()
    batch, _, targets = mined(10)
    neg = NegativeSampler(NegativeSamplerConfig(num_negatives=5, chunk_size=10), NUM_ENTITIES).sample_batch(
        10, torch.Generator().manual_seed(1))
    kd_cfg, loss_cfg = ReverseKDConfig(weight=0.7, temperature=1.5), LossConfig(name="self_adversarial", margin=2.0)
    kd = KDTargets(torch.tensor([1, 4, 5]), targets[[1, 4, 5]].double())
    plan = plan_step(batch, neg, NUM_RELATIONS)
    assert torch.equal(plan.relation_ids, torch.arange(NUM_RELATIONS))
    value, ent_grad, rel_grad = step_gradients(model.interaction, plan, neg, model.entity[plan.entity_ids],
                                               model.relation, loss_cfg, RegularizerConfig(), kd=kd, kd_cfg=kd_cfg)
    without, _, _ = step_gradients(model.interaction, plan, neg, model.entity[plan.entity_ids], model.relation,
                                   loss_cfg, RegularizerConfig())

    h, r, t = batch.unbind(1)
    k = neg.negatives[0]
    neg_scores = (model.score(k[None].expand(10, -1), r[:, None].expand(-1, 5), t[:, None].expand(-1, 5))
                  if neg.corrupt_head[0] else
                  model.score(h[:, None].expand(-1, 5), r[:, None].expand(-1, 5), k[None].expand(10, -1)))
    kd_ref = naive_kd(model, batch[kd.positions], kd.targets, 1.5)
    ref = compute_loss(loss_cfg, model.score(h, r, t), neg_scores) + 0.7 * kd_ref
    ref.backward()
    assert value == pytest.approx(ref.item(), rel=1e-9)
    assert value - without == pytest.approx(0.7 * kd_ref.item(), rel=1e-9)
    assert torch.allclose(ent_grad, model.entity.grad[plan.entity_ids], atol=1e-10)
    assert torch.allclose(rel_grad, model.relation.grad, atol=1e-10)


def test_reverse_kd_config_is_validated():
    with pytest.raises(ValueError, match="reverse_kd.weight"):
        ReverseKDConfig(weight=-1.0)
    with pytest.raises(ValueError, match="reverse_kd.temperature"):
        ReverseKDConfig(temperature=0.0)
    assert KGETrainConfig().reverse_kd.weight == 0.0  # off unless asked for


def test_added_triples_are_trained_with_weights_and_targets():
    gold = tiny_kg()
    trainer = LocalTrainer(gold, NUM_ENTITIES, NUM_RELATIONS, cfg())
    trainer.train_epoch()
    triples, weights, targets = mined()
    trainer.add_triples(triples, weights, targets, kg_version=1)
    assert trainer.kg_version == 1 and torch.equal(trainer.triples, torch.cat([gold, triples]))
    assert trainer.batches.num_triples == 140 and trainer.batches.epoch == 1
    seen = []
    trainer.step = lambda batch, w, labels, kd: seen.append((batch, w, kd)) or 0.0  # records what the epoch passes
    trainer.train_epoch()
    positions = torch.cat([b for b, _, _ in seen])
    assert torch.equal(positions.sort().values, torch.arange(140))  # every gold and added triple, once
    for batch, w, kd in seen:
        expected = torch.where(batch >= 120, torch.cat([torch.ones(120), weights])[batch], torch.ones(()))
        assert torch.equal(w, expected)
        added = (batch >= 120).nonzero().flatten()
        assert kd is not None and torch.equal(kd.positions, added)
        assert torch.equal(kd.targets, targets[batch[added] - 120])


def test_kd_pulls_the_kge_relation_distribution_towards_the_lm():
    gold = tiny_kg()
    triples, _, targets = mined()
    trainer = LocalTrainer(gold, NUM_ENTITIES, NUM_RELATIONS,
                           cfg(reverse_kd=ReverseKDConfig(weight=5.0), optimizer=SparseOptimConfig(lr=0.05)))
    trainer.add_triples(triples, torch.zeros(20), targets, kg_version=3)  # weight 0: only the KD term acts on them

    def kl() -> float:
        m = trainer.model
        scores = m.interaction.score(m.entity[triples[:, 0]][:, None], m.relation[None], m.entity[triples[:, 2]][:, None])
        return reverse_kd_loss(scores, targets, 1.0).item()

    before = kl()
    for _ in range(30):
        trainer.train_epoch()
    assert kl() < 0.5 * before, (before, kl())


def test_nothing_added_trains_as_before_and_an_empty_addition_only_bumps_the_version():
    plain = LocalTrainer(tiny_kg(), NUM_ENTITIES, NUM_RELATIONS, cfg())
    bumped = LocalTrainer(tiny_kg(), NUM_ENTITIES, NUM_RELATIONS, cfg())
    bumped.add_triples(torch.zeros(0, 3, dtype=torch.long), kg_version=2)
    for _ in range(2):
        plain.train_epoch(), bumped.train_epoch()
    assert bumped.kg_version == 2 and torch.equal(plain.model.entity, bumped.model.entity)


def test_state_dict_carries_the_added_triples():
    gold, (triples, weights, targets) = tiny_kg(), mined()
    run = LocalTrainer(gold, NUM_ENTITIES, NUM_RELATIONS, cfg())
    run.train_epoch()
    run.add_triples(triples, weights, targets, kg_version=1)
    run.train_epoch()
    restored = LocalTrainer(gold, NUM_ENTITIES, NUM_RELATIONS, cfg())  # a fresh trainer on the gold triples
    restored.load_state_dict(run.state_dict())
    assert restored.kg_version == 1 and torch.equal(restored.triples, run.triples)
    run.train_epoch(), restored.train_epoch()
    assert torch.equal(restored.model.entity, run.model.entity)
    assert torch.equal(restored.model.relation, run.model.relation)


def test_a_state_from_before_an_addition_continues_with_the_later_triples():
    gold, (triples, weights, targets) = tiny_kg(), mined()
    run = LocalTrainer(gold, NUM_ENTITIES, NUM_RELATIONS, cfg(sampler=NegativeSamplerConfig(
        num_negatives=8, chunk_size=8, distribution="degree")))
    run.train_epoch()
    before = run.state_dict()
    run.train_epoch()
    run.step(run.batches.next_batch())
    mid_epoch = run.state_dict()
    run.train_epoch()
    run.add_triples(triples, weights, targets, kg_version=1)
    assert torch.allclose(run.sampler.probabilities(), _degree_probs(run.triples))  # degrees include the addition
    run.load_state_dict(before)
    assert run.kg_version == 1 and len(run.triples) == 140 and run.batches.num_triples == 140
    assert run.batches.epoch == 1 and torch.allclose(run.sampler.probabilities(), _degree_probs(run.triples))
    run.train_epoch()
    assert run.batches.epoch == 2
    with pytest.raises(ValueError, match="mid-epoch"):  # the batch order cannot resize mid-epoch
        run.load_state_dict(mid_epoch)


def _degree_probs(triples: torch.Tensor) -> torch.Tensor:
    w = degrees_from_triples(triples, NUM_ENTITIES).double().pow(0.75)
    return w / w.sum()


def test_add_triples_mid_epoch_is_an_error():
    trainer = LocalTrainer(tiny_kg(), NUM_ENTITIES, NUM_RELATIONS, cfg())
    trainer.train_epoch(stop=lambda: True)  # one step, then stop
    assert trainer.mid_epoch
    with pytest.raises(ValueError, match="between epochs"):
        trainer.add_triples(*mined(), kg_version=1)
    assert len(trainer.triples) == 120 and trainer.kg_version == 0


@pytest.mark.parametrize("args, match", [
    ((torch.zeros(5, 2, dtype=torch.long),), r"triples must have shape \(n, 3\), got \(5, 2\)"),
    ((torch.zeros(5, 3),), "integer ids"),
    ((torch.tensor([[0, 0, 0], [0, 4, 1]]),), "row 1 has relation id 4, outside"),
    ((torch.tensor([[0, 0, 30]]),), "row 0 has tail id 30"),
    ((torch.zeros(3, 3, dtype=torch.long), torch.ones(2)), r"weights must have shape \(3,\)"),
    ((torch.zeros(2, 3, dtype=torch.long), torch.tensor([1.0, -0.5])), "weights row 1 is -0.5"),
    ((torch.zeros(2, 3, dtype=torch.long), None, torch.full((2, 3), 1 / 3)),
     r"relation_targets must have shape \(2, 4\).*got \(2, 3\)"),
    ((torch.zeros(2, 3, dtype=torch.long), None, torch.tensor([[0.25] * 4, [0.5, 0.5, 0.5, 0.0]])),
     "relation_targets row 1 sums to 1.5, not 1"),
    ((torch.zeros(1, 3, dtype=torch.long), None, torch.tensor([[1.5, -0.5, 0.0, 0.0]])), "row 0 has a negative"),
])
def test_bad_additions_are_rejected_and_change_nothing(args, match):
    trainer = LocalTrainer(tiny_kg(), NUM_ENTITIES, NUM_RELATIONS, cfg())
    with pytest.raises(ValueError, match=match):
        trainer.add_triples(*args, kg_version=1)
    assert len(trainer.triples) == 120 and trainer.kg_version == 0 and trainer.batches.num_triples == 120


def test_kg_version_must_increase():
    trainer = LocalTrainer(tiny_kg(), NUM_ENTITIES, NUM_RELATIONS, cfg())
    trainer.add_triples(*mined(), kg_version=2)
    with pytest.raises(ValueError, match="kg_version must increase, got 2 after 2"):
        trainer.add_triples(*mined(seed=5), kg_version=2)


def test_batch_iterator_resizes_only_at_an_epoch_boundary():
    it = BatchIterator(10, 4, 0)
    list(it)
    it.resize(13)
    assert sorted(torch.cat(list(it)).tolist()) == list(range(13))
    it.next_batch()
    with pytest.raises(ValueError, match="mid-epoch"):
        it.resize(20)
    old = BatchIterator(10, 4, 0)
    list(old)
    grown = BatchIterator(13, 4, 0)
    with pytest.raises(ValueError, match="10 triples"):
        grown.load_state_dict(old.state_dict())  # without resize a changed count stays an error
    grown.load_state_dict(old.state_dict(), resize=True)
    assert (grown.num_triples, grown.epoch, grown.offset) == (13, 1, 0)
