"""Filtered rank-based link-prediction evaluation (MRR, Hits@k, mean rank), head and tail sides.

Works on any model with ``score_t(h, r) -> (B, num_entities)`` and ``score_h(r, t) -> (B, num_entities)``
(higher is better). Ranks follow PyKEEN's definitions so numbers agree with ``RankBasedEvaluator``:

- optimistic rank  = 1 + #{e : s(e) > s(true)}
- pessimistic rank = #{e : s(e) >= s(true)}            (counts the true entity itself)
- realistic rank   = (optimistic + pessimistic) / 2     (expected rank under random tie-breaking)

"Filtered": every other entity that forms a known triple (train + valid + test by convention) is left
out of the comparison. Rather than writing a dense (B, E) mask, the comparison counts are taken over the
whole row and the counts of the few filtered entries (gathered through a CSR index) are subtracted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, Protocol, Sequence

import torch

Side = Literal["head", "tail"]


class LinkPredictor(Protocol):
    num_entities: int

    def score_t(self, h: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """(B,), (B,) -> (B, num_entities): scores of (h, r, every entity)."""

    def score_h(self, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(B,), (B,) -> (B, num_entities): scores of (every entity, r, t)."""


@dataclass(kw_only=True, frozen=True)
class EvalConfig:
    batch_size: int = 512
    sides: tuple[str, ...] = ("head", "tail")
    ks: tuple[int, ...] = (1, 3, 10)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"eval.batch_size must be >= 1, got {self.batch_size}")
        if not self.sides or any(s not in ("head", "tail") for s in self.sides):
            raise ValueError(f"eval.sides must be a non-empty subset of ('head', 'tail'), got {self.sides}")
        if any(k < 1 for k in self.ks):
            raise ValueError(f"eval.ks must be positive, got {self.ks}")


class FilterIndex:
    """CSR index of known answers: for side 'tail', key (h, r) -> all t; for side 'head', key (r, t) -> all h."""

    def __init__(self, triples: torch.Tensor, num_entities: int, num_relations: int, side: Side):
        triples = torch.unique(triples.long(), dim=0)
        if side == "tail":
            keys, answers = triples[:, 0] * num_relations + triples[:, 1], triples[:, 2]
        else:
            keys, answers = triples[:, 2] * num_relations + triples[:, 1], triples[:, 0]
        order = torch.argsort(keys, stable=True)
        self.keys, counts = torch.unique_consecutive(keys[order], return_counts=True)
        self.offsets = torch.zeros(len(self.keys) + 1, dtype=torch.long)
        self.offsets[1:] = torch.cumsum(counts, 0)
        self.answers = answers[order]
        self.num_relations = num_relations

    def gather(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For a batch of query keys (B,), the flat (row, entity) pairs of all known answers."""
        pos = torch.searchsorted(self.keys, keys).clamp_(max=len(self.keys) - 1)
        found = self.keys[pos] == keys
        start = self.offsets[pos]
        length = torch.where(found, self.offsets[pos + 1] - start, torch.zeros_like(start))
        rows = torch.repeat_interleave(torch.arange(len(keys)), length)
        # position of each entry inside its row's slice: global index minus the row's first index
        within = torch.arange(int(length.sum())) - torch.repeat_interleave(torch.cumsum(length, 0) - length, length)
        return rows, self.answers[start[rows] + within]


@dataclass(frozen=True)
class Ranks:
    """Per-query ranks of one side, each (n,) float64."""

    optimistic: torch.Tensor
    pessimistic: torch.Tensor

    @property
    def realistic(self) -> torch.Tensor:
        return 0.5 * (self.optimistic + self.pessimistic)


@torch.no_grad()
def rank_side(
    model: LinkPredictor, triples: torch.Tensor, side: Side, index: FilterIndex, batch_size: int
) -> Ranks:
    """Filtered optimistic/pessimistic ranks of the true ``side`` entity of each triple."""
    opt, pes = [], []
    for start in range(0, len(triples), batch_size):
        h, r, t = triples[start : start + batch_size].long().unbind(1)
        if side == "tail":
            scores, true, keys = model.score_t(h, r), t, h * index.num_relations + r
        else:
            scores, true, keys = model.score_h(r, t), h, t * index.num_relations + r
        assert scores.shape == (len(h), model.num_entities), f"model returned scores of shape {tuple(scores.shape)}"
        true_score = scores.gather(1, true[:, None])  # (B, 1)
        greater = (scores > true_score).sum(1)
        not_smaller = (scores >= true_score).sum(1)
        rows, ents = index.gather(keys)
        keep = ents != true[rows]  # the true entity itself stays in the comparison
        rows, ents = rows[keep], ents[keep]
        known = scores[rows, ents]
        greater -= torch.zeros_like(greater).index_add_(0, rows, (known > true_score[rows, 0]).long())
        not_smaller -= torch.zeros_like(not_smaller).index_add_(0, rows, (known >= true_score[rows, 0]).long())
        opt.append(greater.double() + 1)
        pes.append(not_smaller.double())
    return Ranks(torch.cat(opt), torch.cat(pes))


def rank_metrics(ranks: torch.Tensor, ks: Iterable[int]) -> dict[str, float]:
    ranks = ranks.double()
    out = {"mrr": float((1.0 / ranks).mean()), "mean_rank": float(ranks.mean())}
    for k in ks:
        out[f"hits_at_{k}"] = float((ranks <= k).double().mean())
    return out


@dataclass(frozen=True)
class RankResults:
    """Ranks per side; ``metrics()`` gives flat ``{side}.{metric}`` names with side in head/tail/both."""

    ranks: dict[str, Ranks]
    ks: tuple[int, ...]

    def metrics(self, rank_type: Literal["realistic", "optimistic", "pessimistic"] = "realistic") -> dict[str, float]:
        per_side = {side: getattr(r, rank_type) for side, r in self.ranks.items()}
        out = {}
        for side, ranks in [*per_side.items(), ("both", torch.cat(list(per_side.values())))]:
            out.update({f"{side}.{name}": v for name, v in rank_metrics(ranks, self.ks).items()})
        return out

    @property
    def mrr(self) -> float:
        return self.metrics()["both.mrr"]


def evaluate(
    model: LinkPredictor,
    triples: torch.Tensor,
    filter_triples: Sequence[torch.Tensor],
    num_relations: int,
    config: EvalConfig = EvalConfig(),
) -> RankResults:
    """Filtered ranking of ``triples`` (n, 3); ``filter_triples`` are the known triples to filter out
    (pass train, valid and test; ``triples`` are always added)."""
    known = torch.cat([triples.long(), *(f.long() for f in filter_triples)])
    ranks = {}
    for side in config.sides:
        index = FilterIndex(known, model.num_entities, num_relations, side)  # type: ignore[arg-type]
        ranks[side] = rank_side(model, triples, side, index, config.batch_size)  # type: ignore[arg-type]
    return RankResults(ranks, tuple(config.ks))
