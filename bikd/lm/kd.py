"""Knowledge-distillation losses with the KG as the teacher (pure torch).

- **Entity alignment** (ERNIE's dEA): the representation of a mention must pick its own entity among
  candidates, scored against the (frozen) KG entity embeddings:
  ``logits[m, c] = (P m_m) . E[cand_c]``, loss = mean over mentions of ``CE(logits[m], index of entity_m)``.
- **Relation distillation**: for an ordered pair of linked mentions (h, t) of one sequence, the LM's pair
  classifier matches the KG model's relation distribution:
  ``T^2 * KL(softmax(score(h, r, t) / T) || softmax(student(h, t) / T))`` averaged over pairs (Hinton et
  al.'s scaling, so that gradients keep their size as T changes).

Mention representations are the mean of their tokens' final hidden states (:func:`mention_representations`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["KDConfig", "check_spans", "span_tokens", "mention_representations", "sample_candidates",
           "entity_alignment_loss", "mention_pairs", "relation_distillation_loss"]


@dataclass(kw_only=True, frozen=True)
class KDConfig:
    """``entity_weight``/``relation_weight``: weights of the two KD losses in the total (0 = off). Choose them
    on held-out data: under global gradient clipping a weight of 1 can leave the task a small share of each
    update (SQuAD + MiniLM: entity alignment's gradient is ~6x the QA loss's at step 0, and 0.03 beat 0.1,
    0.3 and 1 on held-out fine-tune articles, bench/squad_fusion.py).
    ``temperature``: T of the relation distillation. ``num_sampled_candidates``: entities drawn uniformly
    per batch on top of the in-batch ones for entity alignment. ``max_pairs_per_sequence``: cap on the
    ordered mention pairs per sequence (drawn at random when there are more). ``alignment_mask_prob``:
    ERNIE's dEA masking: in training with ``entity_weight > 0``, each mention's fusion is switched off
    with this probability, so that alignment has to come from the text and not from the entity embedding
    just added to the mention. ``seed``: of the generator that draws candidates, pairs and masks."""

    entity_weight: float = 1.0
    relation_weight: float = 1.0
    temperature: float = 2.0
    num_sampled_candidates: int = 64
    max_pairs_per_sequence: int = 8
    alignment_mask_prob: float = 0.15
    seed: int = 0

    def __post_init__(self):
        for name in ("entity_weight", "relation_weight"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"kd.{name} must be a finite number >= 0, got {value}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"kd.temperature must be > 0, got {self.temperature}")
        if self.num_sampled_candidates < 0:
            raise ValueError(f"kd.num_sampled_candidates must be >= 0, got {self.num_sampled_candidates}")
        if self.max_pairs_per_sequence < 1:
            raise ValueError(f"kd.max_pairs_per_sequence must be >= 1, got {self.max_pairs_per_sequence}")
        if not 0.0 <= self.alignment_mask_prob < 1.0:
            raise ValueError(f"kd.alignment_mask_prob must be in [0, 1), got {self.alignment_mask_prob}")


def check_spans(mention_spans: Tensor, batch_size: int, seq_len: int) -> None:
    """ValueError unless ``mention_spans (M, 4)`` rows are (b, start, end_exclusive, entity) with
    ``0 <= b < B``, ``0 <= start < end <= S`` and ``entity >= 0``."""
    if mention_spans.ndim != 2 or mention_spans.shape[1] != 4:
        raise ValueError(f"mention_spans must be (M, 4), got {tuple(mention_spans.shape)}")
    if mention_spans.numel() == 0:
        return
    b, start, end, ent = mention_spans.unbind(1)
    bad = (b < 0) | (b >= batch_size) | (start < 0) | (end <= start) | (end > seq_len) | (ent < 0)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"mention_spans row {row} = {mention_spans[row].tolist()} is not (b, start, end, entity) "
                         f"with 0 <= b < {batch_size}, 0 <= start < end <= {seq_len}, entity >= 0")


def span_tokens(mention_spans: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    """Every token of every mention: ``mention_spans (M, 4)`` -> ``(owner (T,), flat (T,))``, the mention row
    and the flat position ``b * S + s`` of each of the ``T = sum_m (end_m - start_m)`` mention tokens."""
    b, start, end = mention_spans[:, :3].unbind(1)
    lengths = end - start
    owner = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
    offset = torch.arange(len(owner), device=lengths.device) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    return owner, (b * seq_len + start)[owner] + offset


def mention_representations(hidden: Tensor, mention_spans: Tensor) -> Tensor:
    """Mean of each mention's token states: ``hidden (B, S, H)``, ``mention_spans (M, 4)`` -> ``(M, H)``,
    ``out[m] = mean_{s in [start_m, end_m)} hidden[b_m, s]``. One gather and one ``index_add`` over the
    mention tokens only."""
    B, S, H = hidden.shape
    if mention_spans.numel() == 0:
        return hidden.new_zeros(0, H)
    spans = mention_spans.to(hidden.device)
    owner, tokens = span_tokens(spans, S)
    summed = hidden.new_zeros(len(spans), H).index_add(0, owner, hidden.reshape(-1, H)[tokens])
    return summed / (spans[:, 2] - spans[:, 1]).to(hidden.dtype)[:, None]


def sample_candidates(mention_entity: Tensor, num_entities: int, num_sampled: int,
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Candidates for entity alignment: the unique in-batch entities and ``num_sampled`` uniform draws.

    ``mention_entity (M,)`` -> ``(candidates (C,) sorted unique ids, target (M,))`` with
    ``candidates[target[m]] == mention_entity[m]``. Draws use ``generator`` (CPU) for reproducibility.
    """
    sampled = torch.randint(num_entities, (num_sampled,), generator=generator).to(mention_entity.device)
    candidates, inverse = torch.unique(torch.cat([mention_entity, sampled]), sorted=True, return_inverse=True)
    return candidates, inverse[: len(mention_entity)]


def entity_alignment_loss(mention_repr: Tensor, mention_entity: Tensor, candidate_ids: Tensor, entity: Tensor,
                          proj: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """ERNIE's dEA: ``mention_repr (M, H)``, ``mention_entity (M,)`` ids, ``candidate_ids (C,)`` (must hold
    every mention's entity), ``entity (N, d_e)`` the KG table, ``proj`` H -> d_e (None: identity, H = d_e).

    ``logits = proj(mention_repr) @ entity[candidate_ids].T  (M, C)``;
    loss = ``mean_m [logsumexp_c logits[m, c] - logits[m, pos(entity_m)]]``. 0 (with a graph) when M = 0.
    The table gets no gradient (it is used detached).
    """
    query = proj(mention_repr) if proj is not None else mention_repr
    if len(mention_entity) == 0:
        return query.sum() * 0.0
    match = candidate_ids[None, :] == mention_entity[:, None]  # (M, C)
    if not bool(match.any(1).all()):
        missing = mention_entity[~match.any(1)].tolist()
        raise ValueError(f"candidate_ids lack the mention entities {missing}")
    target = match.int().argmax(1)
    cand = entity.detach()[candidate_ids.to(entity.device)].to(query.device, query.dtype)
    return F.cross_entropy(query @ cand.T, target)


def mention_pairs(mention_spans: Tensor, max_per_sequence: int, generator: torch.Generator | None = None) -> Tensor:
    """Ordered pairs ``(i, j)``, i != j, of mentions in the same sequence whose entities differ -> ``(P, 2)``
    row indices into ``mention_spans``; at most ``max_per_sequence`` per sequence (a random subset drawn
    with ``generator`` when there are more). Pairs of one entity with itself carry no relation to distil."""
    if len(mention_spans) < 2:
        return torch.zeros(0, 2, dtype=torch.long)
    spans = mention_spans.cpu()
    b, ent = spans[:, 0], spans[:, 3]
    i, j = torch.meshgrid(torch.arange(len(spans)), torch.arange(len(spans)), indexing="ij")
    ok = (b[:, None] == b[None, :]) & (ent[:, None] != ent[None, :])
    i, j = i[ok], j[ok]  # row-major, so grouped by sequence when the spans are
    keep = []
    for seq in torch.unique(b[i]).tolist():
        rows = (b[i] == seq).nonzero().squeeze(1)
        if len(rows) > max_per_sequence:
            rows = rows[torch.randperm(len(rows), generator=generator)[:max_per_sequence]].sort().values
        keep.append(rows)
    if not keep:
        return torch.zeros(0, 2, dtype=torch.long)
    sel = torch.cat(keep)
    return torch.stack([i[sel], j[sel]], dim=1)


def relation_distillation_loss(pair_logits: Tensor, teacher_scores: Tensor, temperature: float) -> Tensor:
    """``pair_logits (P, R)`` (student), ``teacher_scores (P, R)`` (KG scores, no gradient), T > 0 ->
    ``T^2 / P * sum_p KL(softmax(teacher_p / T) || softmax(student_p / T))``; 0 (with a graph) when P = 0."""
    if pair_logits.shape != teacher_scores.shape:
        raise ValueError(f"pair_logits {tuple(pair_logits.shape)} and teacher_scores {tuple(teacher_scores.shape)} differ")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if len(pair_logits) == 0:
        return pair_logits.sum() * 0.0
    log_student = F.log_softmax(pair_logits / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_scores.detach().to(pair_logits.dtype) / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean") * temperature ** 2
