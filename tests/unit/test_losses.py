"""sLCWA losses and regularisers: hand-computed values, weights, soft labels, pykeen parity, gradients."""

import math

import pytest
import torch
from pykeen.losses import MarginRankingLoss, NSSALoss

from bikd.kge.losses import (
    LossConfig,
    RegularizerConfig,
    compute_loss,
    compute_regularizer,
    l2_regularizer,
    logistic_loss,
    margin_ranking_loss,
    n3_regularizer,
    self_adversarial_loss,
)
from bikd.kge.sampling import chunk_layout

LN2, LN3 = math.log(2.0), math.log(3.0)
# -log sigmoid(0) = ln 2, -log sigmoid(ln 3) = ln(4/3), -log sigmoid(-ln 3) = ln 4


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def close(a, b):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64))


def random_scores(b=6, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, generator=g, dtype=torch.float64), torch.randn(b, k, generator=g, dtype=torch.float64)


ALL_LOSSES = [
    LossConfig(name="margin", margin=1.0),
    LossConfig(name="logistic"),
    LossConfig(name="self_adversarial", margin=2.0, adversarial_temperature=0.5),
]


def test_margin_ranking_hand_computed():
    pos, neg = t([1.0, 0.0]), t([[0.5, 2.0], [-1.0, 0.5]])
    # triple 0: relu(1 - 1 + 0.5) = 0.5, relu(1 - 1 + 2) = 2   -> mean 1.25
    # triple 1: relu(1 - 0 - 1) = 0,     relu(1 - 0 + 0.5) = 1.5 -> mean 0.75
    close(margin_ranking_loss(pos, neg, 1.0), 1.0)
    close(margin_ranking_loss(pos, neg, 1.0, weights=t([1.0, 3.0])), (1.25 + 3 * 0.75) / 4)
    close(pykeen_margin(pos, neg, 1.0), 1.0)


def pykeen_margin(pos, neg, margin):
    return MarginRankingLoss(margin=margin).process_slcwa_scores(pos[:, None], neg)


def test_margin_ranking_matches_pykeen():
    pos, neg = random_scores()
    close(margin_ranking_loss(pos, neg, 0.7), pykeen_margin(pos, neg, 0.7))


def test_logistic_hand_computed():
    pos, neg = t([0.0, LN3]), t([[0.0, LN3], [-LN3, -LN3]])
    # triple 0: 1/2 (ln 2 + (ln 2 + ln 4) / 2) = 1.25 ln 2;  triple 1: 1/2 (ln 4/3 + ln 4/3) = ln 4/3
    close(logistic_loss(pos, neg), (1.25 * LN2 + math.log(4 / 3)) / 2)
    # soft label y = 0.5 on triple 1: BCE(ln 3, 0.5) = 0.5 ln(4/3) + 0.5 ln 4
    soft = 0.5 * (0.5 * math.log(4 / 3) + 0.5 * math.log(4)) + 0.5 * math.log(4 / 3)
    close(logistic_loss(pos, neg, labels=t([1.0, 0.5])), (1.25 * LN2 + soft) / 2)


def test_self_adversarial_hand_computed():
    # gamma = ln 3, alpha = 1: p = softmax([-ln 3, 0]) = [1/4, 3/4];  -neg - gamma = [0, -ln 3]
    pos, neg = t([0.0]), t([[-LN3, 0.0]])
    expected = 0.5 * (math.log(4 / 3) + 0.25 * LN2 + 0.75 * math.log(4))
    close(self_adversarial_loss(pos, neg, LN3, 1.0), expected)
    # gamma = 0: p = softmax([0, ln 3]) = [1/4, 3/4] -> 1/2 (ln 2 + 1/4 ln 2 + 3/4 ln 4) = 1.375 ln 2
    close(self_adversarial_loss(t([0.0]), t([[0.0, LN3]]), 0.0, 1.0), 1.375 * LN2)


@pytest.mark.parametrize("gamma,alpha", [(9.0, 1.0), (0.5, 0.3), (3.0, 2.0)])
def test_self_adversarial_matches_pykeen_nssa(gamma, alpha):
    # pykeen's NSSALoss: margin = gamma added to positive scores, -(neg + gamma) for negatives, weights
    # softmax(adversarial_temperature * neg) detached, and (pos + neg) / 2 under mean reduction: ours exactly
    pos, neg = random_scores(seed=1)
    ref = NSSALoss(margin=gamma, adversarial_temperature=alpha).process_slcwa_scores(pos[:, None], neg)
    close(self_adversarial_loss(pos, neg, gamma, alpha), ref)


def test_self_adversarial_with_zero_temperature_is_logistic_with_margin():
    pos, neg = random_scores(seed=2)
    close(self_adversarial_loss(pos, neg, 1.5, 0.0), logistic_loss(pos + 1.5, neg + 1.5))


def test_self_adversarial_weights_carry_no_gradient():
    pos, neg = random_scores(seed=3)
    gamma, alpha = 2.0, 1.5
    neg_a, neg_b, neg_c = (neg.clone().requires_grad_() for _ in range(3))
    self_adversarial_loss(pos, neg_a, gamma, alpha).backward()
    p = torch.softmax(alpha * neg, dim=1)  # a constant computed outside the graph
    reference = 0.5 * (-torch.nn.functional.logsigmoid(gamma + pos) - (p * torch.nn.functional.logsigmoid(-neg_b - gamma)).sum(1))
    reference.mean().backward()
    torch.testing.assert_close(neg_a.grad, neg_b.grad)
    # the same formula with the softmax inside the graph has a different gradient: the test can fail
    p_live = torch.softmax(alpha * neg_c, dim=1)
    (0.5 * -(p_live * torch.nn.functional.logsigmoid(-neg_c - gamma)).sum(1)).mean().backward()
    assert not torch.allclose(neg_a.grad, neg_c.grad)


@pytest.mark.parametrize("cfg", ALL_LOSSES, ids=lambda c: c.name)
def test_weights(cfg):
    pos, neg = random_scores(seed=4)
    plain = compute_loss(cfg, pos, neg)
    close(compute_loss(cfg, pos, neg, weights=torch.ones(6, dtype=torch.float64)), plain)
    w = t([0.5, 2.0, 0.0, 1.0, 3.0, 0.25])
    close(compute_loss(cfg, pos, neg, weights=2 * w), compute_loss(cfg, pos, neg, weights=w))
    keep = w != 0  # a zero weight removes the triple entirely
    close(compute_loss(cfg, pos, neg, weights=w), compute_loss(cfg, pos[keep], neg[keep], weights=w[keep]))
    close(compute_loss(cfg, pos, neg, weights=torch.zeros(6, dtype=torch.float64)), 0.0)


@pytest.mark.parametrize("cfg", ALL_LOSSES[1:], ids=lambda c: c.name)
def test_soft_labels(cfg):
    pos, neg = random_scores(seed=5)
    close(compute_loss(cfg, pos, neg, labels=torch.ones(6, dtype=torch.float64)), compute_loss(cfg, pos, neg))
    lower = compute_loss(cfg, pos, neg, labels=torch.full((6,), 0.3, dtype=torch.float64))
    assert not torch.allclose(lower, compute_loss(cfg, pos, neg))


def test_soft_label_gradient_pulls_the_positive_score_towards_the_target():
    pos = t([0.0]).requires_grad_()
    logistic_loss(pos, t([[0.0]]), labels=t([0.8])).backward()
    close(pos.grad, 0.5 * (torch.sigmoid(t([0.0])) - 0.8))  # dBCE/dx = sigmoid(x) - y


@pytest.mark.parametrize("cfg", ALL_LOSSES, ids=lambda c: c.name)
def test_chunked_shapes_and_padding_mask(cfg):
    pos, neg = random_scores(b=10, k=3, seed=6)
    index, mask = chunk_layout(10, 4)  # (3, 4): last chunk padded with 2 repeats of position 9
    chunked = compute_loss(cfg, pos[index], neg[index], weights=mask.double())
    close(chunked, compute_loss(cfg, pos, neg))
    close(compute_loss(cfg, pos.view(2, 5), neg.view(2, 5, 3)), compute_loss(cfg, pos, neg))


def test_invalid_inputs():
    pos, neg = random_scores()
    with pytest.raises(ValueError):
        compute_loss(LossConfig(name="margin"), pos, neg, labels=torch.ones(6, dtype=torch.float64))
    with pytest.raises(ValueError):
        margin_ranking_loss(pos[:5], neg, 1.0)
    with pytest.raises(ValueError):
        logistic_loss(pos, neg, weights=torch.ones(5, dtype=torch.float64))
    for bad in (dict(name="hinge"), dict(name="margin", margin=-1.0), dict(adversarial_temperature=-1.0)):
        with pytest.raises(ValueError):
            LossConfig(**bad)
    with pytest.raises(ValueError):
        RegularizerConfig(name="l1")


def test_l2_regularizer_hand_computed():
    h, r, tt = t([[1.0, 2.0], [0.0, 0.0]]), t([[0.0, 1.0], [1.0, 1.0]]), t([[2.0, 0.0], [0.0, 0.0]])
    # means of squared row norms: h (5 + 0)/2, r (1 + 2)/2, t (4 + 0)/2
    close(l2_regularizer(h, r, tt), 2.5 + 1.5 + 2.0)
    close(l2_regularizer(t([[3.0, 4.0]])), 25.0)
    close(l2_regularizer(torch.tensor([[3 + 4j]], dtype=torch.complex128)), 25.0)


def test_n3_regularizer_hand_computed():
    h, r, tt = t([[1.0, -2.0], [0.0, 0.0]]), t([[0.0, 1.0], [1.0, 1.0]]), t([[2.0, 0.0], [0.0, 0.0]])
    # sum |x|^3: h 1 + 8 = 9, r 1 + 1 + 1 = 3, t 8; / B = 2
    close(n3_regularizer(h, r, tt), 10.0)
    # complex coordinate 3 + 4i has modulus 5 -> 125, as [re | im] halves or as a complex dtype
    zero = t([[0.0, 0.0]])
    close(n3_regularizer(t([[3.0, 4.0]]), zero, zero, is_complex=True), 125.0)
    close(n3_regularizer(t([[3.0, 4.0]]), zero, zero), 27.0 + 64.0)  # without the flag: real coordinates
    c = torch.tensor([[3 + 4j]], dtype=torch.complex128)
    close(n3_regularizer(c, torch.zeros_like(c), torch.zeros_like(c)), 125.0)
    with pytest.raises(ValueError):
        n3_regularizer(t([[1.0, 2.0, 3.0]]), t([[1.0, 2.0, 3.0]]), t([[1.0, 2.0, 3.0]]), is_complex=True)


def test_compute_regularizer_dispatch():
    h, r, tt = t([[1.0, -2.0]]), t([[0.0, 1.0]]), t([[2.0, 0.0]])
    close(compute_regularizer(RegularizerConfig(name="none", weight=1.0), h, r, tt), 0.0)
    close(compute_regularizer(RegularizerConfig(name="l2", weight=0.1), h, r, tt), 0.1 * (5 + 1 + 4))
    close(compute_regularizer(RegularizerConfig(name="n3", weight=0.5), h, r, tt), 0.5 * (9 + 1 + 8))
    close(compute_regularizer(RegularizerConfig(name="n3", weight=1.0, is_complex=True), h, r, tt),
          5 ** 1.5 + 1 + 8)
