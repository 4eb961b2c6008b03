"""KG-embedding models: entity and relation tables plus an interaction from :mod:`bikd.kge.interactions`.

A model scores index triples, and one side of a batch of queries against all entities: the interaction
turns (h, r) or (r, t) into a query vector q, and every model here compares q to the entity table either
by a dot product (DistMult, ComplEx) or by a distance (TransE, RotatE), so that scoring a batch against
all entities is one GEMM (TransE-L1, with no such form, falls back to ``torch.cdist``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from bikd.kge.interactions import INTERACTIONS, Interaction, TransEInteraction, pairwise

ModelName = Literal["transe", "distmult", "complex", "rotate"]


@dataclass(kw_only=True, frozen=True)
class ModelConfig:
    """``dim`` counts model coordinates: ComplEx and RotatE entities hold ``dim`` complex numbers (2*dim reals).
    ``p`` is TransE's norm; ``init_scale`` overrides the half-width of the uniform initialisation (default
    per model, see the interactions; RotatE phases are always uniform in [-pi, pi])."""

    name: ModelName = "transe"
    dim: int = 64
    p: int = 2
    init_scale: float | None = None
    #: TransE only: project entities onto the unit sphere after each step (Bordes et al.); False frees
    #: their norms (DGL-KE, RotatE's TransE), which lets self-adversarial training use a large gamma
    normalize_entities: bool = True

    def __post_init__(self):
        if self.name not in INTERACTIONS:
            raise ValueError(f"model.name must be one of {sorted(INTERACTIONS)}, got {self.name!r}")
        if self.dim < 1:
            raise ValueError(f"model.dim must be >= 1, got {self.dim}")
        if self.p not in (1, 2):
            raise ValueError(f"model.p must be 1 or 2, got {self.p}")
        if self.p != 2 and self.name != "transe":
            raise ValueError(f"model.p applies to transe only, got p={self.p} for {self.name!r}")
        if not self.normalize_entities and self.name != "transe":
            raise ValueError(f"model.normalize_entities applies to transe only, got False for {self.name!r}")
        if self.init_scale is not None and not (self.init_scale > 0 and math.isfinite(self.init_scale)):
            raise ValueError(f"model.init_scale must be a positive finite number, got {self.init_scale}")


def build_interaction(cfg: ModelConfig) -> Interaction:
    return TransEInteraction(cfg.p, cfg.normalize_entities) if cfg.name == "transe" else INTERACTIONS[cfg.name]()


def build_model(cfg: ModelConfig, num_entities: int, num_relations: int) -> KGEModel:
    if cfg.name == "transe":
        return TransE(num_entities, num_relations, cfg.dim, p=cfg.p, init_scale=cfg.init_scale,
                      normalize=cfg.normalize_entities)
    return KGEModel(build_interaction(cfg), num_entities, num_relations, cfg.dim, init_scale=cfg.init_scale)


class KGEModel(nn.Module):
    """Embedding tables ``entity (num_entities, dim * interaction.entity_factor)`` and ``relation
    (num_relations, dim * interaction.relation_factor)`` scored by a stateless ``interaction``.

    Scores are higher-is-better. ``score_t``/``score_h`` are exact and differentiable; ``ranking_scores_t/h``
    only preserve the order within each row (what :mod:`bikd.eval.ranking` needs) and carry no gradient
    through the entity norms, so they are for evaluation only.
    """

    def __init__(self, interaction: Interaction, num_entities: int, num_relations: int, dim: int,
                 init_scale: float | None = None):
        super().__init__()
        if num_entities < 1 or num_relations < 1 or dim < 1:
            raise ValueError(f"need num_entities, num_relations, dim >= 1, got {num_entities}, {num_relations}, {dim}")
        self.interaction = interaction
        self.num_entities, self.num_relations, self.dim = num_entities, num_relations, dim
        self.entity = nn.Parameter(torch.empty(num_entities, dim * interaction.entity_factor))
        self.relation = nn.Parameter(torch.empty(num_relations, dim * interaction.relation_factor))
        with torch.no_grad():
            interaction.init_entity_(self.entity, init_scale)
            interaction.init_relation_(self.relation, init_scale)

    def extra_repr(self) -> str:
        return f"{self.interaction}, num_entities={self.num_entities}, num_relations={self.num_relations}, dim={self.dim}"

    def score(self, h: Tensor, r: Tensor, t: Tensor) -> Tensor:
        """Index tensors of broadcastable shapes (e.g. (B,) or (B, 1) against (1, k)) -> that shape."""
        return self.interaction.score(self.entity[h], self.relation[r], self.entity[t])

    def tail_query(self, h: Tensor, r: Tensor) -> Tensor:
        return self.interaction.tail_query(self.entity[h], self.relation[r])

    def head_query(self, r: Tensor, t: Tensor) -> Tensor:
        return self.interaction.head_query(self.relation[r], self.entity[t])

    def score_t(self, h: Tensor, r: Tensor) -> Tensor:
        """(B,), (B,) -> (B, num_entities): score of (h, r, every entity)."""
        return pairwise(self.interaction.similarity, self.tail_query(h, r), self.entity)

    def score_h(self, r: Tensor, t: Tensor) -> Tensor:
        """(B,), (B,) -> (B, num_entities): score of (every entity, r, t)."""
        return pairwise(self.interaction.similarity, self.head_query(r, t), self.entity)

    def ranking_scores_t(self, h: Tensor, r: Tensor) -> Tensor:
        """(B,), (B,) -> (B, num_entities), ordered within each row like ``score_t``."""
        return self._ranking_scores(self.tail_query(h, r))

    def ranking_scores_h(self, r: Tensor, t: Tensor) -> Tensor:
        """(B,), (B,) -> (B, num_entities), ordered within each row like ``score_h``."""
        return self._ranking_scores(self.head_query(r, t))

    def _ranking_scores(self, q: Tensor) -> Tensor:
        """(B, d_e) -> (B, num_entities). For L2, ``-||q - e||`` orders like ``2 q.e - ||e||^2`` (dropping
        the per-row ||q||^2 and the monotone sqrt), one GEMM with the norms as its bias. The product is
        computed as (E, B) and the transposed view returned: MKL is faster on that layout for a skinny batch."""
        similarity = self.interaction.similarity
        if similarity == "l2":
            return torch.addmm(self._entity_sq_norms(), self.entity, q.t(), beta=-1.0, alpha=2.0).t()
        if similarity == "dot":
            return torch.mm(self.entity, q.t()).t()
        return pairwise(similarity, q, self.entity)

    def _entity_sq_norms(self) -> Tensor:
        """(num_entities, 1) of ||e||^2. Recomputed on every call: trainers update the table in place
        through ``.data`` (which bumps no version counter a cache could key on), and it costs one pass
        over the table against the batch's (B x E x d) product."""
        with torch.no_grad():
            return self.entity.detach().pow(2).sum(1, keepdim=True)

    def constrain_(self) -> None:
        """Apply the interaction's constraints in place; the training loop calls this after every optimiser
        step. TransE: entity rows back to unit L2 norm (Bordes et al.); RotatE: phases wrapped into
        [-pi, pi); DistMult, ComplEx: nothing."""
        with torch.no_grad():
            self.interaction.constrain_entity_(self.entity)
            self.interaction.constrain_relation_(self.relation)


class TransE(KGEModel):
    """TransE (Bordes et al., 2013): ``score(h, r, t) = -||e_h + w_r - e_t||_p``, tables (num_entities, dim)
    and (num_relations, dim). Kept as a class for the callers that construct it directly."""

    def __init__(self, num_entities: int, num_relations: int, dim: int, p: int = 2, init_scale: float | None = None,
                 normalize: bool = True):
        super().__init__(TransEInteraction(p, normalize), num_entities, num_relations, dim, init_scale)

    @property
    def p(self) -> int:
        return self.interaction.p  # type: ignore[attr-defined]
