"""KG-embedding models that score one side against all entities, for training and ranking."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass(kw_only=True, frozen=True)
class ModelConfig:
    name: Literal["transe"] = "transe"
    dim: int = 64
    p: int = 2

    def __post_init__(self):
        if self.dim < 1:
            raise ValueError(f"model.dim must be >= 1, got {self.dim}")
        if self.p not in (1, 2):
            raise ValueError(f"model.p must be 1 or 2, got {self.p}")


def build_model(cfg: ModelConfig, num_entities: int, num_relations: int) -> nn.Module:
    return TransE(num_entities, num_relations, cfg.dim, p=cfg.p)


class TransE(nn.Module):
    """TransE (Bordes et al., 2013): ``score(h, r, t) = -||e_h + w_r - e_t||_p``.

    Shapes: entity table (num_entities, dim), relation table (num_relations, dim). Scoring against all
    entities with p = 2 is done as a matrix product through
    ``||q - e||^2 = ||q||^2 - 2 q.e + ||e||^2`` (q = e_h + w_r), the form that makes ranking 40k queries
    against 15k entities a GEMM rather than a (B, E, dim) broadcast; p = 1 falls back to ``torch.cdist``.
    """

    def __init__(self, num_entities: int, num_relations: int, dim: int, p: int = 2):
        super().__init__()
        if p not in (1, 2):
            raise ValueError(f"TransE norm p must be 1 or 2, got {p}")
        self.num_entities, self.num_relations, self.dim, self.p = num_entities, num_relations, dim, p
        self.entity = nn.Parameter(torch.empty(num_entities, dim))
        self.relation = nn.Parameter(torch.empty(num_relations, dim))
        bound = 6.0 / dim**0.5
        nn.init.uniform_(self.entity, -bound, bound)
        nn.init.uniform_(self.relation, -bound, bound)
        with torch.no_grad():
            self.relation.div_(self.relation.norm(dim=1, keepdim=True))

    def score(self, h: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Index tensors of broadcastable shapes (e.g. (B,) or (B, 1) against (1, k)) -> that shape."""
        return -(self.entity[h] + self.relation[r] - self.entity[t]).norm(p=self.p, dim=-1)

    def _distance_to_all(self, q: torch.Tensor) -> torch.Tensor:
        """(B, dim) -> (B, num_entities) of ||q - e||_p."""
        e = self.entity
        if self.p == 1:
            return torch.cdist(q, e, p=1.0)
        sq = torch.addmm((e * e).sum(1)[None, :], q, e.t(), alpha=-2.0).add_((q * q).sum(1, keepdim=True))
        return sq.clamp_(min=0.0).sqrt_()

    def score_t(self, h: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """(B,), (B,) -> (B, num_entities): score of (h, r, every entity)."""
        return -self._distance_to_all(self.entity[h] + self.relation[r])

    def score_h(self, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(B,), (B,) -> (B, num_entities): score of (every entity, r, t); ||e + w_r - e_t|| = ||e - (e_t - w_r)||."""
        return -self._distance_to_all(self.entity[t] - self.relation[r])

    def _ranking_scores(self, q: torch.Tensor) -> torch.Tensor:
        """(B, dim) -> (B, num_entities) ordered like -||q - e||_2 within each row: 2 q.e - ||e||^2.

        Dropping the per-row constant ||q||^2 and the monotone sqrt leaves one GEMM; computing it as
        (E, B) and returning the transposed view keeps MKL on its faster layout for a skinny batch."""
        if self.p == 1:
            return -self._distance_to_all(q)
        return torch.addmm(self._entity_sq_norms(), self.entity, q.t(), beta=-1.0, alpha=2.0).t()

    def _entity_sq_norms(self) -> torch.Tensor:
        """(num_entities, 1) of ||e||^2, recomputed only when the table changed (optimiser steps and
        load_state_dict bump the tensor's version counter), so ranking a test set computes it once."""
        key = (self.entity.data_ptr(), self.entity._version)
        if getattr(self, "_sq_norm_key", None) != key:
            with torch.no_grad():
                self._sq_norms = self.entity.detach().pow(2).sum(1, keepdim=True)
            self._sq_norm_key = key
        return self._sq_norms

    def ranking_scores_t(self, h: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return self._ranking_scores(self.entity[h] + self.relation[r])

    def ranking_scores_h(self, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self._ranking_scores(self.entity[t] - self.relation[r])
