"""One sLCWA training step as pure functions on gathered rows, and a single-process trainer built on them.

A step is split so that the rows can come from anywhere (a local table, or remote embedding shards):

1. ``plan_step``: which entity and relation rows the batch needs (unique ids), and where each positive
   and each shared negative sits among them;
2. the caller gathers those rows (``pull``);
3. ``step_gradients``: loss and gradients w.r.t. exactly those rows, using joint negative sampling
   (each chunk of positives scored against one shared block of negatives as a batched matrix product);
4. the caller applies the gradients with a sparse row-wise optimiser (``push``).

``LocalTrainer`` does 2 and 4 against in-process tables; the Ray trainers do them against shards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from bikd.kge.interactions import Interaction
from bikd.kge.losses import LossConfig, RegularizerConfig, compute_loss, compute_regularizer
from bikd.kge.models import KGEModel, ModelConfig, build_model
from bikd.kge.optim import SparseOptimConfig, build_sparse_optimizer
from bikd.kge.sampling import BatchIterator, NegativeBatch, NegativeSampler, NegativeSamplerConfig, degrees_from_triples


@dataclass(kw_only=True, frozen=True)
class KGETrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: NegativeSamplerConfig = field(default_factory=lambda: NegativeSamplerConfig(num_negatives=64, chunk_size=64))
    loss: LossConfig = field(default_factory=LossConfig)
    regularizer: RegularizerConfig = field(default_factory=RegularizerConfig)
    optimizer: SparseOptimConfig = field(default_factory=SparseOptimConfig)
    batch_size: int = 1024
    epochs: int = 10
    seed: int = 0

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")


class StepPlan(NamedTuple):
    """Rows a batch needs and where everything sits among them.

    entity_ids (U_e,), relation_ids (U_r,): unique global ids to pull; h, r, t (B,): positions of the
    positives' rows in those; negatives (num_chunks, K): positions of the shared negatives.
    """

    entity_ids: torch.Tensor
    relation_ids: torch.Tensor
    h: torch.Tensor
    r: torch.Tensor
    t: torch.Tensor
    negatives: torch.Tensor


def plan_step(triples: torch.Tensor, neg: NegativeBatch) -> StepPlan:
    """triples (B, 3) global ids, neg the batch's joint negatives -> the rows to pull and their positions."""
    num_pos = len(triples) * 2
    entity_ids, inverse = torch.unique(torch.cat([triples[:, 0], triples[:, 2], neg.negatives.flatten()]), return_inverse=True)
    relation_ids, r_pos = torch.unique(triples[:, 1], return_inverse=True)
    B = len(triples)
    return StepPlan(entity_ids, relation_ids, inverse[:B], r_pos, inverse[B:num_pos],
                    inverse[num_pos:].view_as(neg.negatives))


def step_gradients(
    interaction: Interaction,
    plan: StepPlan,
    neg: NegativeBatch,
    entity_rows: torch.Tensor,
    relation_rows: torch.Tensor,
    loss_cfg: LossConfig,
    reg_cfg: RegularizerConfig,
    weights: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Loss and gradients w.r.t. the pulled rows.

    entity_rows (U_e, d_e) and relation_rows (U_r, d_r) are the rows of ``plan``'s ids; ``weights`` and
    ``labels`` (B,) weight whole triples and give soft targets for the positives (mined triples).
    Returns (loss, entity grads (U_e, d_e), relation grads (U_r, d_r)).
    """
    ent = entity_rows.detach().requires_grad_(True)
    rel = relation_rows.detach().requires_grad_(True)
    h, r, t = ent[plan.h], rel[plan.r], ent[plan.t]  # (B, d)
    pos = interaction.score(h, r, t)  # (B,)
    idx, ch = neg.index, neg.corrupt_head  # (N, C), (N,)
    negs = ent[plan.negatives]  # (N, K, d_e)
    hc, rc, tc = h[idx], r[idx], t[idx]  # (N, C, d)
    neg_scores = torch.cat([
        interaction.score_heads(negs[ch], rc[ch], tc[ch]),
        interaction.score_tails(hc[~ch], rc[~ch], negs[~ch]),
    ])  # (N, C, K), chunks reordered: head-corrupted first
    order = torch.cat([ch.nonzero().flatten(), (~ch).nonzero().flatten()])
    w = neg.mask[order].to(pos.dtype)
    if weights is not None:
        w = w * weights[idx[order]]
    lab = labels[idx[order]] if labels is not None else None
    loss = compute_loss(loss_cfg, pos[idx[order]], neg_scores, w, lab) + compute_regularizer(reg_cfg, h, r, t)
    loss.backward()
    return float(loss.detach()), ent.grad, rel.grad


class LocalTrainer:
    """Single-process sLCWA trainer on full in-process tables: the reference the sharded trainers match."""

    def __init__(self, triples: torch.Tensor, num_entities: int, num_relations: int, cfg: KGETrainConfig):
        self.cfg, self.triples = cfg, triples
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model, num_entities, num_relations)
        self.model.requires_grad_(False)  # gradients come from step_gradients, not autograd on the tables
        self.entity_opt = build_sparse_optimizer(cfg.optimizer, num_entities, self.model.entity.shape[1])
        self.relation_opt = build_sparse_optimizer(cfg.optimizer, num_relations, self.model.relation.shape[1])
        self.generator = torch.Generator().manual_seed(cfg.seed)
        degrees = degrees_from_triples(triples, num_entities) if cfg.sampler.distribution == "degree" else None
        self.sampler = NegativeSampler(cfg.sampler, num_entities, degrees)
        self.batches = BatchIterator(len(triples), cfg.batch_size, cfg.seed)

    def step(self, batch: torch.Tensor, weights: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> float:
        model = self.model
        neg = self.sampler.sample_batch(len(batch), self.generator)
        plan = plan_step(self.triples[batch], neg)
        loss, ent_grad, rel_grad = step_gradients(
            model.interaction, plan, neg, model.entity[plan.entity_ids], model.relation[plan.relation_ids],
            self.cfg.loss, self.cfg.regularizer, weights, labels)
        self.entity_opt.step(model.entity.data, plan.entity_ids, ent_grad)
        self.relation_opt.step(model.relation.data, plan.relation_ids, rel_grad)
        _constrain_rows(model, plan.entity_ids, plan.relation_ids)
        return loss

    def train_epoch(self) -> float:
        losses = [self.step(batch) for batch in self.batches]
        return sum(losses) / max(len(losses), 1)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "entity_opt": self.entity_opt.state_dict(),
                "relation_opt": self.relation_opt.state_dict(), "batches": self.batches.state_dict(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.entity_opt.load_state_dict(state["entity_opt"])
        self.relation_opt.load_state_dict(state["relation_opt"])
        self.batches.load_state_dict(state["batches"])
        self.generator.set_state(state["generator"])


def _constrain_rows(model: KGEModel, entity_ids: torch.Tensor, relation_ids: torch.Tensor) -> None:
    """Apply the model's constraints to the rows a step touched (the others did not move)."""
    rows = model.entity.data[entity_ids]
    model.interaction.constrain_entity_(rows)
    model.entity.data[entity_ids] = rows
    rows = model.relation.data[relation_ids]
    model.interaction.constrain_relation_(rows)
    model.relation.data[relation_ids] = rows
