"""sLCWA losses and embedding regularisers as pure functions on score tensors.

Shapes: ``pos`` (B,) scores of the positives, ``neg`` (B, K) scores of each positive's K negatives. Joint
negative sampling produces chunked scores, pos (N, C) and neg (N, C, K); they are flattened to B = N * C.
Scores follow the "higher = more plausible" convention (TransE: score = -distance).

``weights`` (B,) >= 0 weight whole triples (positive term and its negatives): the loss is the weighted mean
sum_b w_b l_b / sum_b w_b, so scaling all weights is a no-op, a zero weight removes a triple (chunk padding,
or mined triples of zero confidence), and all-zero weights give 0 (the denominator is clamped to eps, as
pykeen's weighted_reduction does). ``labels`` (B,) in [0, 1] are soft targets for the positive term only
(reverse distillation: the LM's belief in the triple instead of 1.0); the negatives keep target 0.

The logistic and self-adversarial losses average the positive and the negative term, loss = (pos + neg) / 2,
as RotatE's reference code, DGL-KE and pykeen's NSSALoss do, so the values are comparable to theirs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _flatten(pos: Tensor, neg: Tensor, *per_triple: Tensor | None) -> tuple[Tensor, ...]:
    if neg.ndim < 2 or pos.shape != neg.shape[:-1]:
        raise ValueError(f"need pos (*S,) and neg (*S, K), got {tuple(pos.shape)} and {tuple(neg.shape)}")
    out = [pos.reshape(-1), neg.reshape(-1, neg.shape[-1])]
    for x in per_triple:
        if x is not None and x.shape != pos.shape:
            raise ValueError(f"weights/labels must have the positives' shape {tuple(pos.shape)}, got {tuple(x.shape)}")
        out.append(None if x is None else x.reshape(-1).to(pos.dtype))
    return tuple(out)


def _weighted_mean(per_triple: Tensor, weights: Tensor | None) -> Tensor:
    if weights is None:
        return per_triple.mean()
    return (per_triple * weights).sum() / weights.sum().clamp_min(torch.finfo(weights.dtype).eps)


def _positive_term(logit: Tensor, labels: Tensor | None) -> Tensor:
    # BCE against the soft target; with labels None this is exactly -log sigmoid(logit)
    if labels is None:
        return -F.logsigmoid(logit)
    return F.binary_cross_entropy_with_logits(logit, labels, reduction="none")


def margin_ranking_loss(pos: Tensor, neg: Tensor, margin: float, weights: Tensor | None = None) -> Tensor:
    """l_b = (1/K) sum_k relu(margin - pos_b + neg_bk);  loss = sum_b w_b l_b / sum_b w_b  (scalar).

    Unweighted this equals pykeen's MarginRankingLoss(margin) with mean reduction over all B*K pairs.
    """
    pos, neg, weights = _flatten(pos, neg, weights)
    return _weighted_mean(torch.relu(margin - pos[:, None] + neg).mean(1), weights)


def logistic_loss(pos: Tensor, neg: Tensor, weights: Tensor | None = None, labels: Tensor | None = None) -> Tensor:
    """Negative-sampling logistic loss (softplus form, DGL-KE "Logistic"/RotatE without self-adversarial):

    l_b = 1/2 * ( BCE(pos_b, y_b) + (1/K) sum_k -log sigmoid(-neg_bk) ),   BCE(x, y) = -y log s(x) - (1-y) log s(-x)

    with y_b = labels_b (default 1, where BCE = -log sigmoid(pos_b) = softplus(-pos_b)); loss = weighted mean.
    """
    pos, neg, weights, labels = _flatten(pos, neg, weights, labels)
    per_triple = 0.5 * (_positive_term(pos, labels) - F.logsigmoid(-neg).mean(1))
    return _weighted_mean(per_triple, weights)


def self_adversarial_loss(
    pos: Tensor,
    neg: Tensor,
    margin_gamma: float,
    temperature: float,
    weights: Tensor | None = None,
    labels: Tensor | None = None,
) -> Tensor:
    """Self-adversarial negative sampling loss (Sun et al. 2019, RotatE) in score form.

    RotatE writes it with a distance d and margin gamma: -log s(gamma - d_pos) - sum_i p_i log s(d_neg_i - gamma).
    With score = -d this is, per positive b (pos (B,), neg (B, K), p (B, K)):

        p_bk = softmax_k(temperature * neg_bk), DETACHED (a constant weight, no gradient flows through it)
        l_b  = 1/2 * ( BCE(gamma + pos_b, y_b) - sum_k p_bk log s(-neg_bk - gamma) )

    y_b = labels_b (default 1: BCE = -log s(gamma + pos_b)); loss = sum_b w_b l_b / sum_b w_b.
    ``temperature`` is RotatE's alpha, an INVERSE softmax temperature (alpha = 0: uniform p, i.e. plain
    negative sampling with margin gamma). Unweighted and without labels this equals pykeen's
    NSSALoss(margin=gamma, adversarial_temperature=alpha) with mean reduction (which also halves the sum).
    """
    pos, neg, weights, labels = _flatten(pos, neg, weights, labels)
    p = torch.softmax(temperature * neg.detach(), dim=1)
    neg_term = -(p * F.logsigmoid(-neg - margin_gamma)).sum(1)
    per_triple = 0.5 * (_positive_term(margin_gamma + pos, labels) + neg_term)
    return _weighted_mean(per_triple, weights)


@dataclass(kw_only=True, frozen=True)
class LossConfig:
    """``margin`` is the ranking margin for "margin" and RotatE's gamma for "self_adversarial" (RotatE
    used 6-24; pykeen's FB15k-237 default is 9); "logistic" has no margin. ``adversarial_temperature`` is
    RotatE's alpha (an inverse temperature), used only by "self_adversarial"."""

    name: Literal["margin", "logistic", "self_adversarial"] = "margin"
    margin: float = 1.0
    adversarial_temperature: float = 1.0

    def __post_init__(self):
        if self.name not in ("margin", "logistic", "self_adversarial"):
            raise ValueError(f"loss.name must be 'margin', 'logistic' or 'self_adversarial', got {self.name!r}")
        if self.name == "margin" and not self.margin >= 0:
            raise ValueError(f"loss.margin must be >= 0 for the margin ranking loss, got {self.margin}")
        if not self.adversarial_temperature >= 0:
            raise ValueError(f"loss.adversarial_temperature must be >= 0, got {self.adversarial_temperature}")


def compute_loss(
    cfg: LossConfig, pos: Tensor, neg: Tensor, weights: Tensor | None = None, labels: Tensor | None = None
) -> Tensor:
    """Dispatch on ``cfg.name``; soft ``labels`` need a probabilistic loss (not "margin")."""
    if cfg.name == "margin":
        if labels is not None:
            raise ValueError("soft labels need the 'logistic' or 'self_adversarial' loss, not 'margin'")
        return margin_ranking_loss(pos, neg, cfg.margin, weights)
    if cfg.name == "logistic":
        return logistic_loss(pos, neg, weights, labels)
    return self_adversarial_loss(pos, neg, cfg.margin, cfg.adversarial_temperature, weights, labels)


@dataclass(kw_only=True, frozen=True)
class ReverseKDConfig:
    """Reverse distillation LM -> KG (issue 12): ``weight`` scales the KD term of :func:`reverse_kd_loss` on
    mined triples that carry the LM's relation distribution (0 switches it off); ``temperature`` T > 0
    softens the KGE's relation softmax."""

    weight: float = 0.0
    temperature: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.weight < float("inf"):
            raise ValueError(f"reverse_kd.weight must be finite and >= 0, got {self.weight}")
        if not 0.0 < self.temperature < float("inf"):
            raise ValueError(f"reverse_kd.temperature must be finite and > 0, got {self.temperature}")


def reverse_kd_loss(scores: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """Mean KL from the LM's relation distribution to the KGE's softmax over relations, a scalar.

    scores (M, R): ``score(h_m, r', t_m)`` of each of M mined pairs against every relation r';
    targets (M, R): the LM's distribution q_m over the R relations (rows sum to 1).

        p_m  = softmax_r'(scores_m / T)
        loss = (1/M) sum_m KL(q_m || p_m) = (1/M) sum_m sum_r q_mr (log q_mr - log p_mr)

    with 0 log 0 = 0 (a relation the LM rules out adds nothing); 0 when M = 0. Gradients flow into the
    scores only (q is a fixed teacher).
    """
    if scores.ndim != 2 or targets.shape != scores.shape:
        raise ValueError(f"need scores and targets of the same shape (M, R), got {tuple(scores.shape)} and "
                         f"{tuple(targets.shape)}")
    if len(scores) == 0:
        return scores.sum() * 0.0
    q = targets.to(scores.dtype)
    log_p = torch.log_softmax(scores / temperature, dim=1)
    return (torch.xlogy(q, q) - q * log_p).sum(1).mean()


def l2_regularizer(*embs: Tensor) -> Tensor:
    """sum over the given tensors of the mean over their rows of ||x_row||_2^2 (rows = all leading dims).

    E.g. l2_regularizer(h, r, t) with (B, d) each = (1/B) sum_b (||h_b||^2 + ||r_b||^2 + ||t_b||^2), the same
    normalisation as n3_regularizer. Complex embeddings (complex dtype or [re | im] halves) need no flag:
    |re|^2 + |im|^2 is the squared modulus either way.
    """
    return sum(((x.abs() ** 2 if x.is_complex() else x.pow(2)).sum(-1).mean() for x in embs), torch.zeros(()))


def n3_regularizer(h: Tensor, r: Tensor, t: Tensor, is_complex: bool = False) -> Tensor:
    """Nuclear 3-norm (Lacroix et al. 2018): (1/B) sum_b sum_i (|h_bi|^3 + |r_bi|^3 + |t_bi|^3), h, r, t (B, d).

    For complex embeddings |.| is the modulus of each complex coordinate: a complex-dtype tensor uses it
    directly; ``is_complex=True`` reads a real (B, 2m) tensor as [re | im] halves (the RotatE/DGL-KE layout).
    """
    def cubed(x: Tensor) -> Tensor:
        if x.is_complex():
            mod = x.abs()
        elif is_complex:
            if x.shape[-1] % 2:
                raise ValueError(f"is_complex needs an even last dimension ([re | im]), got {x.shape[-1]}")
            re, im = x.chunk(2, dim=-1)
            mod = torch.sqrt(re * re + im * im)
        else:
            mod = x.abs()
        return mod.pow(3).sum()

    return (cubed(h) + cubed(r) + cubed(t)) / h.shape[0]


@dataclass(kw_only=True, frozen=True)
class RegularizerConfig:
    name: Literal["none", "l2", "n3"] = "none"
    weight: float = 0.0
    is_complex: bool = False  # n3 only: real embeddings laid out as [re | im] halves

    def __post_init__(self):
        if self.name not in ("none", "l2", "n3"):
            raise ValueError(f"regularizer.name must be 'none', 'l2' or 'n3', got {self.name!r}")
        if not self.weight >= 0:
            raise ValueError(f"regularizer.weight must be >= 0, got {self.weight}")


def compute_regularizer(cfg: RegularizerConfig, h: Tensor, r: Tensor, t: Tensor) -> Tensor:
    """weight * regulariser(h, r, t) over the batch's rows, a scalar (0 for "none")."""
    if cfg.name == "none" or cfg.weight == 0:
        return torch.zeros((), dtype=h.real.dtype if h.is_complex() else h.dtype)
    if cfg.name == "l2":
        return cfg.weight * l2_regularizer(h, r, t)
    return cfg.weight * n3_regularizer(h, r, t, is_complex=cfg.is_complex)
