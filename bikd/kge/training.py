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
from typing import Callable, NamedTuple

import torch

from bikd.kge.interactions import Interaction, pairwise, row_constraint, rowwise
from bikd.kge.losses import LossConfig, RegularizerConfig, compute_loss, compute_regularizer
from bikd.kge.models import ModelConfig, build_model
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
        if self.epochs < 1:  # 0 would "train" nothing and still evaluate, export and mine a random model
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")


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
    B = len(triples)
    ids = torch.cat([triples[:, 0], triples[:, 2], neg.negatives.flatten()])
    entity_ids, inverse = torch.unique(ids, return_inverse=True)
    relation_ids, r_pos = torch.unique(triples[:, 1], return_inverse=True)
    return StepPlan(entity_ids, relation_ids, inverse[:B], r_pos, inverse[B:2 * B],
                    inverse[2 * B:].view_as(neg.negatives))


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

    Every positive is laid out in its chunk (N, C) as the entity its chunk keeps, ``e`` (the tail of a
    head-corrupted chunk, else the head), its relation and the entity that is replaced, ``x``: the chunk's
    query is ``q = interaction.side_query(e, r)``, the positive scores ``sim(q, x)`` and the negatives
    ``sim(q, negatives)``, one batched product per chunk. Those rows are gathered once with
    ``index_select`` into leaf tensors; autograd runs on the leaves only and their gradients are summed
    back onto the pulled rows with ``index_add_``. (Autograd through ``rows[positions]`` instead turns
    every gather into a zero-filled (U_e, d) ``index_put_`` in the backward pass.)
    """
    ent, rel = entity_rows.detach(), relation_rows.detach()
    num_chunks, chunk = neg.index.shape
    num_neg = plan.negatives.shape[1]
    flat = neg.index.flatten()
    if len(flat) == len(plan.h) and torch.equal(flat, torch.arange(len(flat), device=flat.device)):
        h_pos, r_pos, t_pos = plan.h, plan.r, plan.t  # no padding: the chunks are the batch in order
    else:
        h_pos, r_pos, t_pos = plan.h.index_select(0, flat), plan.r.index_select(0, flat), plan.t.index_select(0, flat)
    head = neg.corrupt_head.repeat_interleave(chunk)
    kept, replaced = torch.where(head, t_pos, h_pos), torch.where(head, h_pos, t_pos)

    def leaf(rows: torch.Tensor, pos: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return rows.index_select(0, pos).view(*shape, -1).requires_grad_(True)

    e, x = leaf(ent, kept, (num_chunks, chunk)), leaf(ent, replaced, (num_chunks, chunk))  # (N, C, d_e)
    r = leaf(rel, r_pos, (num_chunks, chunk))  # (N, C, d_r)
    cand = leaf(ent, plan.negatives.flatten(), (num_chunks, num_neg))  # (N, K, d_e)
    query = interaction.side_query(e, r, neg.corrupt_head)
    pos = rowwise(interaction.similarity, query, x)  # (N, C)
    neg_scores = pairwise(interaction.similarity, query, cand)  # (N, C, K)

    w = neg.mask.to(pos.dtype)
    if weights is not None:
        w = w * weights.index_select(0, flat).view_as(w)
    lab = labels.index_select(0, flat).view_as(w) if labels is not None else None
    loss = compute_loss(loss_cfg, pos, neg_scores, w, lab)
    reg_rows = None
    if reg_cfg.name != "none" and reg_cfg.weight != 0:  # on the batch's own rows, without the padding
        batch = (len(plan.h),)
        reg_rows = (leaf(ent, plan.h, batch), leaf(rel, plan.r, batch), leaf(ent, plan.t, batch))
        loss = loss + compute_regularizer(reg_cfg, *reg_rows)
    loss.backward()

    ent_grad = torch.zeros_like(ent).index_add_(0, kept, e.grad.flatten(0, 1))
    ent_grad.index_add_(0, replaced, x.grad.flatten(0, 1)).index_add_(0, plan.negatives.flatten(), cand.grad.flatten(0, 1))
    rel_grad = torch.zeros_like(rel).index_add_(0, r_pos, r.grad.flatten(0, 1))
    if reg_rows is not None:
        ent_grad.index_add_(0, plan.h, reg_rows[0].grad).index_add_(0, plan.t, reg_rows[2].grad)
        rel_grad.index_add_(0, plan.r, reg_rows[1].grad)
    return float(loss.detach()), ent_grad, rel_grad


class LocalTrainer:
    """Single-process sLCWA trainer on full in-process tables: the reference the sharded trainers match.

    On another ``device`` (a GPU) the tables and optimiser state live there; batches and negatives are
    still drawn on the CPU (the same draws as on CPU) and moved over, a few KB per step."""

    def __init__(self, triples: torch.Tensor, num_entities: int, num_relations: int, cfg: KGETrainConfig,
                 device: str | torch.device = "cpu"):
        self.cfg, self.triples, self.device = cfg, triples, torch.device(device)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model, num_entities, num_relations).to(self.device)
        self.model.requires_grad_(False)  # gradients come from step_gradients, not autograd on the tables
        dims = self.model.entity.shape[1], self.model.relation.shape[1]
        self.entity_opt = build_sparse_optimizer(cfg.optimizer, num_entities, dims[0], device=self.device)
        self.relation_opt = build_sparse_optimizer(cfg.optimizer, num_relations, dims[1], device=self.device)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        degrees = degrees_from_triples(triples, num_entities) if cfg.sampler.distribution == "degree" else None
        self.sampler = NegativeSampler(cfg.sampler, num_entities, degrees)
        self.batches = BatchIterator(len(triples), cfg.batch_size, cfg.seed)
        self._entity_constraint = row_constraint(self.model.interaction, "entity")
        self._relation_constraint = row_constraint(self.model.interaction, "relation")

    def step(self, batch: torch.Tensor, weights: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> float:
        model = self.model
        neg = self.sampler.sample_batch(len(batch), self.generator)
        plan = plan_step(self.triples.index_select(0, batch), neg)
        if self.device.type != "cpu":
            plan = StepPlan(*(x.to(self.device, non_blocking=True) for x in plan))
            neg = NegativeBatch(*(x.to(self.device, non_blocking=True) for x in neg))
            weights = None if weights is None else weights.to(self.device)
            labels = None if labels is None else labels.to(self.device)
        entity, relation = model.entity.data, model.relation.data
        ent_rows, rel_rows = entity.index_select(0, plan.entity_ids), relation.index_select(0, plan.relation_ids)
        loss, ent_grad, rel_grad = step_gradients(model.interaction, plan, neg, ent_rows, rel_rows, self.cfg.loss,
                                                  self.cfg.regularizer, weights, labels)
        # the optimisers update the pulled rows (still the tables' rows: nothing else wrote them) in place,
        # apply the model's constraint to them and write them back
        self.entity_opt.step(entity, plan.entity_ids, ent_grad, constrain=self._entity_constraint, rows=ent_rows)
        self.relation_opt.step(relation, plan.relation_ids, rel_grad, constrain=self._relation_constraint,
                               rows=rel_rows)
        return loss

    def train_epoch(self, stop: Callable[[], bool] | None = None) -> float:
        """The rest of the current epoch; mean loss of its steps. ``stop`` is asked after every step: when it
        says so the epoch ends early, and ``mid_epoch`` is true (the next call continues where it ended)."""
        losses = []
        for batch in self.batches:
            losses.append(self.step(batch))
            if stop is not None and stop():
                break
        return sum(losses) / max(len(losses), 1)

    @property
    def mid_epoch(self) -> bool:
        return self.batches.offset != 0

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
