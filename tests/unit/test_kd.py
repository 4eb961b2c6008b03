"""KD losses (bikd/lm/kd.py) against values written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from bikd.lm.kd import (KDConfig, check_spans, entity_alignment_loss, mention_pairs, mention_representations,
                        relation_distillation_loss, sample_candidates, span_tokens)


def test_entity_alignment_loss_by_hand():
    entity = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [5.0, 5.0]])
    mentions = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    ents = torch.tensor([0, 1])
    candidates = torch.tensor([0, 1, 2])  # entity 3 is not a candidate
    # logits: m1 . (e0, e1, e2) = (1, 0, 1), target 0; m2 = (0, 2, 2), target 1
    ce1 = math.log(math.exp(1) + math.exp(0) + math.exp(1)) - 1
    ce2 = math.log(math.exp(0) + math.exp(2) + math.exp(2)) - 2
    loss = entity_alignment_loss(mentions, ents, candidates, entity)
    assert loss.item() == pytest.approx((ce1 + ce2) / 2, rel=1e-6)
    # candidate order must not matter: the target is found by id
    loss2 = entity_alignment_loss(mentions, ents, torch.tensor([2, 0, 1]), entity)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-6)


def test_entity_alignment_loss_with_projection_and_gradients():
    entity = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    proj = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        proj.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]]))  # (x, y, z) -> (x, 2z)
    mentions = torch.tensor([[3.0, 7.0, 1.0]], requires_grad=True)  # -> (3, 2): logits (3, 2), target 1
    loss = entity_alignment_loss(mentions, torch.tensor([1]), torch.tensor([0, 1]), entity, proj)
    assert loss.item() == pytest.approx(math.log(math.exp(3) + math.exp(2)) - 2, rel=1e-6)
    loss.backward()
    assert proj.weight.grad is not None and mentions.grad is not None
    assert entity.grad is None  # the KG table is the teacher: no gradient into it


def test_entity_alignment_edge_cases():
    entity = torch.eye(3)
    with pytest.raises(ValueError, match=r"lack the mention entities \[2\]"):
        entity_alignment_loss(torch.ones(1, 3), torch.tensor([2]), torch.tensor([0, 1]), entity)
    empty = entity_alignment_loss(torch.zeros(0, 3, requires_grad=True), torch.zeros(0, dtype=torch.long),
                                  torch.tensor([0]), entity)
    assert empty.item() == 0.0 and empty.requires_grad


def test_relation_distillation_loss_by_hand():
    T = 2.0
    teacher = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 4.0]])
    student = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]])

    def softmax(xs):
        z = sum(math.exp(x / T) for x in xs)
        return [math.exp(x / T) / z for x in xs]

    kls = []
    for t_row, s_row in zip(teacher.tolist(), student.tolist()):
        p, q = softmax(t_row), softmax(s_row)
        kls.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))
    # pair 1 written out: p = softmax(0.5, 1, 1.5), q = (1/3, 1/3, 1/3)
    z = math.exp(0.5) + math.exp(1) + math.exp(1.5)
    assert kls[0] == pytest.approx(sum(math.exp(a) / z * math.log(math.exp(a) / z * 3) for a in (0.5, 1, 1.5)))
    expected = T ** 2 * (kls[0] + kls[1]) / 2
    loss = relation_distillation_loss(student, teacher, T)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert relation_distillation_loss(teacher, teacher, T).item() == pytest.approx(0.0, abs=1e-7)


def test_relation_distillation_gradient_goes_to_the_student_only():
    student = torch.zeros(1, 3, requires_grad=True)
    teacher = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    relation_distillation_loss(student, teacher, 1.0).backward()
    # d/ds of KL(p || softmax(s)) at T = 1 is softmax(s) - p
    p = torch.softmax(teacher.detach(), -1)
    torch.testing.assert_close(student.grad, (torch.full((1, 3), 1 / 3) - p))
    assert teacher.grad is None
    with pytest.raises(ValueError, match="differ"):
        relation_distillation_loss(torch.zeros(2, 3), torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError, match="temperature"):
        relation_distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)
    assert relation_distillation_loss(torch.zeros(0, 3), torch.zeros(0, 3), 1.0).item() == 0.0


def test_mention_representations_by_hand():
    hidden = torch.arange(2 * 4 * 2, dtype=torch.float32).view(2, 4, 2)  # hidden[b, s] = (8b + 2s, 8b + 2s + 1)
    spans = torch.tensor([[0, 1, 3, 5], [1, 0, 1, 6], [1, 1, 4, 7]])
    out = mention_representations(hidden, spans)
    expected = torch.tensor([[(2 + 4) / 2, (3 + 5) / 2], [8, 9], [(10 + 12 + 14) / 3, (11 + 13 + 15) / 3]])
    torch.testing.assert_close(out, expected)
    owner, flat = span_tokens(spans, 4)
    assert owner.tolist() == [0, 0, 1, 2, 2, 2] and flat.tolist() == [1, 2, 4, 5, 6, 7]
    assert mention_representations(hidden, torch.zeros(0, 4, dtype=torch.long)).shape == (0, 2)


def test_sample_candidates():
    ents = torch.tensor([7, 3, 7])
    cands, target = sample_candidates(ents, 100, 10, torch.Generator().manual_seed(0))
    assert torch.equal(cands[target], ents)
    assert torch.equal(cands, cands.unique()) and 2 <= len(cands) <= 12
    again, _ = sample_candidates(ents, 100, 10, torch.Generator().manual_seed(0))
    assert torch.equal(cands, again)
    only, target = sample_candidates(ents, 100, 0)
    assert only.tolist() == [3, 7] and target.tolist() == [1, 0, 1]


def test_mention_pairs():
    # seq 0: mentions 0 (e1), 1 (e2), 2 (e1); seq 1: mention 3 (e5) alone
    spans = torch.tensor([[0, 1, 2, 1], [0, 3, 4, 2], [0, 5, 6, 1], [1, 1, 2, 5]])
    pairs = mention_pairs(spans, 10)
    assert sorted(map(tuple, pairs.tolist())) == [(0, 1), (1, 0), (1, 2), (2, 1)]  # no (0, 2): same entity
    capped = mention_pairs(spans, 2, torch.Generator().manual_seed(0))
    assert len(capped) == 2 and set(map(tuple, capped.tolist())) <= set(map(tuple, pairs.tolist()))
    assert mention_pairs(spans[:1], 4).shape == (0, 2)


def test_config_and_span_validation():
    for bad in (dict(entity_weight=-1.0), dict(relation_weight=float("nan")), dict(temperature=0.0),
                dict(num_sampled_candidates=-1), dict(max_pairs_per_sequence=0), dict(alignment_mask_prob=1.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            KDConfig(**bad)
    check_spans(torch.tensor([[1, 0, 4, 0]]), 2, 4)
    for row in ([2, 0, 1, 0], [0, 2, 2, 0], [0, 3, 5, 0], [0, 0, 1, -1], [0, -1, 1, 0]):
        with pytest.raises(ValueError, match=r"row 0"):
            check_spans(torch.tensor([row]), 2, 4)
    with pytest.raises(ValueError, match=r"\(M, 4\)"):
        check_spans(torch.zeros(3, 3, dtype=torch.long), 2, 4)
