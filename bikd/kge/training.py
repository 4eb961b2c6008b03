"""One sLCWA training step as pure functions on gathered rows, and a single-process trainer built on them.

A step is split so that the rows can come from anywhere (a local table, or remote embedding shards):

1. ``plan_step``: which entity and relation rows the batch needs (unique ids), and where each positive
   and each shared negative sits among them;
2. the caller gathers those rows (``pull``);
3. ``step_gradients``: loss and gradients w.r.t. exactly those rows, using joint negative sampling
   (each chunk of positives scored against one shared block of negatives as a batched matrix product);
4. the caller applies the gradients with a sparse row-wise optimiser (``push``).

``LocalTrainer`` does 2 and 4 against in-process tables; the Ray trainers do them against shards.

Triples can be added between epochs (issue 12, mined from text): :class:`TrainingTriples` keeps the gold
triples a trainer started with, the added ones after them with per-triple weights (the miner's
confidences; gold weighs 1) and, for some, the LM's relation distribution, the target of the reverse
distillation term (:func:`bikd.kge.losses.reverse_kd_loss`). A batch with such targets pulls ALL relation
rows (the KD softmax runs over every relation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch

from bikd.kge.interactions import Interaction, pairwise, row_constraint, rowwise
from bikd.kge.losses import (LossConfig, RegularizerConfig, ReverseKDConfig, compute_loss, compute_regularizer,
                              reverse_kd_loss)
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
    #: KD term on added triples that carry the LM's relation distribution (weight 0: off)
    reverse_kd: ReverseKDConfig = field(default_factory=ReverseKDConfig)

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


class KDTargets(NamedTuple):
    """The batch's triples with LM relation targets: positions (M,) into the batch, targets (M, R)."""

    positions: torch.Tensor
    targets: torch.Tensor


def plan_step(triples: torch.Tensor, neg: NegativeBatch, num_relations: int | None = None) -> StepPlan:
    """triples (B, 3) global ids, neg the batch's joint negatives -> the rows to pull and their positions.

    With ``num_relations`` (a batch with KD targets) the relation rows are all of them, ids 0..R-1 in order."""
    B = len(triples)
    ids = torch.cat([triples[:, 0], triples[:, 2], neg.negatives.flatten()])
    entity_ids, inverse = torch.unique(ids, return_inverse=True)
    if num_relations is None:
        relation_ids, r_pos = torch.unique(triples[:, 1], return_inverse=True)
    else:
        relation_ids, r_pos = torch.arange(num_relations), triples[:, 1].clone()
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
    kd: KDTargets | None = None,
    kd_cfg: ReverseKDConfig | None = None,
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Loss and gradients w.r.t. the pulled rows.

    entity_rows (U_e, d_e) and relation_rows (U_r, d_r) are the rows of ``plan``'s ids; ``weights`` and
    ``labels`` (B,) weight whole triples and give soft targets for the positives (mined triples).
    ``kd`` adds ``kd_cfg.weight * reverse_kd_loss(score(h_m, r', t_m) for all r', targets, T)`` over its M
    triples; the plan must then hold all R relation rows in id order (``plan_step(..., num_relations)``).
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
    kd_rows = None
    if kd is not None and kd_cfg is not None and kd_cfg.weight != 0 and len(kd.positions):
        assert rel.shape[0] == kd.targets.shape[1], "KD needs every relation row: plan_step(..., num_relations)"
        m = (len(kd.positions),)
        kd_rows = (leaf(ent, plan.h.index_select(0, kd.positions), m), rel.clone().requires_grad_(True),
                   leaf(ent, plan.t.index_select(0, kd.positions), m))
        scores = interaction.score(kd_rows[0][:, None], kd_rows[1][None], kd_rows[2][:, None])  # (M, R)
        loss = loss + kd_cfg.weight * reverse_kd_loss(scores, kd.targets, kd_cfg.temperature)
    loss.backward()

    ent_grad = torch.zeros_like(ent).index_add_(0, kept, e.grad.flatten(0, 1))
    ent_grad.index_add_(0, replaced, x.grad.flatten(0, 1)).index_add_(0, plan.negatives.flatten(), cand.grad.flatten(0, 1))
    rel_grad = torch.zeros_like(rel).index_add_(0, r_pos, r.grad.flatten(0, 1))
    if reg_rows is not None:
        ent_grad.index_add_(0, plan.h, reg_rows[0].grad).index_add_(0, plan.t, reg_rows[2].grad)
        rel_grad.index_add_(0, plan.r, reg_rows[1].grad)
    if kd_rows is not None:
        ent_grad.index_add_(0, plan.h.index_select(0, kd.positions), kd_rows[0].grad)
        ent_grad.index_add_(0, plan.t.index_select(0, kd.positions), kd_rows[2].grad)
        rel_grad.add_(kd_rows[1].grad)
    return float(loss.detach()), ent_grad, rel_grad


def check_added_triples(triples: torch.Tensor, weights: torch.Tensor | None, relation_targets: torch.Tensor | None,
                        num_entities: int, num_relations: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Validate what ``add_triples`` is handed: triples (n, 3) integer ids in range, weights (n,) finite >= 0
    (default 1), relation_targets (n, R) finite >= 0 with rows summing to 1. Returns (triples long, weights
    float32, targets float32 or None); a ValueError names the argument, the row and what is wrong."""
    triples = torch.as_tensor(triples)
    if triples.ndim != 2 or triples.shape[1] != 3:
        raise ValueError(f"add_triples: triples must have shape (n, 3), got {tuple(triples.shape)}")
    if triples.is_floating_point() or triples.is_complex() or triples.dtype == torch.bool:
        raise ValueError(f"add_triples: triples must hold integer ids, got dtype {triples.dtype}")
    triples, n = triples.long(), len(triples)
    for col, name, bound in ((0, "head", num_entities), (1, "relation", num_relations), (2, "tail", num_entities)):
        bad = ((triples[:, col] < 0) | (triples[:, col] >= bound)).nonzero().flatten()
        if len(bad):
            raise ValueError(f"add_triples: triples row {int(bad[0])} has {name} id {int(triples[bad[0], col])}, "
                             f"outside [0, {bound})")
    if weights is None:
        weights = torch.ones(n)
    weights = torch.as_tensor(weights)
    if weights.shape != (n,):
        raise ValueError(f"add_triples: weights must have shape ({n},) (one per triple), got {tuple(weights.shape)}")
    weights = weights.float()
    bad = (~torch.isfinite(weights) | (weights < 0)).nonzero().flatten()
    if len(bad):
        raise ValueError(f"add_triples: weights row {int(bad[0])} is {float(weights[bad[0]])}, not finite and >= 0")
    if relation_targets is None:
        return triples, weights, None
    targets = torch.as_tensor(relation_targets)
    if targets.shape != (n, num_relations):
        raise ValueError(f"add_triples: relation_targets must have shape ({n}, {num_relations}) (one distribution "
                         f"over the KG's {num_relations} relations per triple), got {tuple(targets.shape)}")
    targets = targets.float()
    bad = (~torch.isfinite(targets) | (targets < 0)).any(1).nonzero().flatten()
    if len(bad):
        raise ValueError(f"add_triples: relation_targets row {int(bad[0])} has a negative or non-finite entry")
    sums = targets.sum(1)
    bad = ((sums - 1).abs() > 1e-4).nonzero().flatten()
    if len(bad):
        raise ValueError(f"add_triples: relation_targets row {int(bad[0])} sums to {float(sums[bad[0]]):.6g}, not 1")
    return triples, weights, targets


class TrainingTriples:
    """A trainer's triples: the gold ones it was built with, then those added between epochs.

    ``triples`` (n, 3) gold first; ``weights`` (n,) (gold 1) and ``target_row`` (n,) (row of ``targets``
    (m, R), -1 for none) exist once anything was added (before, batches carry no weights, exactly as
    without this class). ``kg_version`` is the KG store version the triples are from (0: gold only).
    The state holds the added part only; the gold part comes from the constructor.
    """

    def __init__(self, gold: torch.Tensor, num_relations: int):
        self.num_gold, self.num_relations, self.triples = len(gold), num_relations, gold
        self.weights = self.target_row = None
        self.targets = torch.zeros(0, num_relations)
        self.kg_version = 0

    def __len__(self) -> int:
        return len(self.triples)

    def add(self, triples: torch.Tensor, weights: torch.Tensor, targets: torch.Tensor | None, kg_version: int) -> None:
        """Append checked (:func:`check_added_triples`) triples as KG version ``kg_version``."""
        if kg_version <= self.kg_version:
            raise ValueError(f"add_triples: kg_version must increase, got {kg_version} after {self.kg_version}")
        self.kg_version = int(kg_version)
        if len(triples) == 0:
            return
        if self.weights is None:
            self.weights = torch.ones(len(self.triples))
            self.target_row = torch.full((len(self.triples),), -1, dtype=torch.long)
        rows = torch.full((len(triples),), -1, dtype=torch.long)
        if targets is not None:
            rows = torch.arange(len(self.targets), len(self.targets) + len(triples))
            self.targets = torch.cat([self.targets, targets])
        self.triples = torch.cat([self.triples, triples])
        self.weights, self.target_row = torch.cat([self.weights, weights]), torch.cat([self.target_row, rows])

    def gather(self, positions: torch.Tensor, with_kd: bool) -> tuple[torch.Tensor, torch.Tensor | None, KDTargets | None]:
        """A batch: its triples (B, 3), weights (B,) or None, and its KD targets (only ``with_kd``, else None)."""
        triples = self.triples.index_select(0, positions)
        if self.weights is None:
            return triples, None, None
        kd = None
        if with_kd:
            rows = self.target_row.index_select(0, positions)
            where = (rows >= 0).nonzero().flatten()
            if len(where):
                kd = KDTargets(where, self.targets.index_select(0, rows.index_select(0, where)))
        return triples, self.weights.index_select(0, positions), kd

    def state_dict(self) -> dict:
        added = slice(self.num_gold, None)
        has_weights = self.weights is not None
        return {"num_gold": self.num_gold, "kg_version": self.kg_version, "triples": self.triples[added].clone(),
                "weights": self.weights[added].clone() if has_weights else torch.zeros(0),
                "target_row": self.target_row[added].clone() if has_weights else torch.zeros(0, dtype=torch.long),
                "targets": self.targets.clone()}

    def load_state_dict(self, state: dict | None) -> bool:
        """Take the state's added triples, unless this set is from a LATER KG version (a checkpoint taken
        before an addition): then it keeps its own and training continues with them. Returns True when
        the kept triples differ from the state's (the caller's batch order must then resize)."""
        state = state or {"num_gold": self.num_gold, "kg_version": 0, "triples": torch.zeros(0, 3, dtype=torch.long)}
        if state["num_gold"] != self.num_gold:
            raise ValueError(f"state is for {state['num_gold']} gold triples, this trainer has {self.num_gold}")
        if state["kg_version"] < self.kg_version:
            return len(state["triples"]) != len(self) - self.num_gold
        if state["kg_version"] == self.kg_version and len(state["triples"]) != len(self) - self.num_gold:
            raise ValueError(f"state has {len(state['triples'])} added triples at KG version {self.kg_version}, "
                             f"this trainer {len(self) - self.num_gold}")
        gold = self.triples[:self.num_gold]
        self.triples, self.kg_version = torch.cat([gold, state["triples"]]), int(state["kg_version"])
        self.targets = state.get("targets", torch.zeros(0, self.num_relations))
        self.weights = self.target_row = None
        if len(state["triples"]):
            self.weights = torch.cat([torch.ones(self.num_gold), state["weights"]])
            self.target_row = torch.cat([torch.full((self.num_gold,), -1, dtype=torch.long), state["target_row"]])
        return False


class LocalTrainer:
    """Single-process sLCWA trainer on full in-process tables: the reference the sharded trainers match.

    On another ``device`` (a GPU) the tables and optimiser state live there; batches and negatives are
    still drawn on the CPU (the same draws as on CPU) and moved over, a few KB per step.

    ``add_triples`` appends triples between epochs; ``state_dict`` carries them (see :class:`TrainingTriples`
    for what a restore keeps). With nothing added, training is exactly what it was before that existed."""

    def __init__(self, triples: torch.Tensor, num_entities: int, num_relations: int, cfg: KGETrainConfig,
                 device: str | torch.device = "cpu"):
        self.cfg, self.device = cfg, torch.device(device)
        self.num_entities, self.num_relations = num_entities, num_relations
        self.data = TrainingTriples(triples, num_relations)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model, num_entities, num_relations).to(self.device)
        self.model.requires_grad_(False)  # gradients come from step_gradients, not autograd on the tables
        dims = self.model.entity.shape[1], self.model.relation.shape[1]
        self.entity_opt = build_sparse_optimizer(cfg.optimizer, num_entities, dims[0], device=self.device)
        self.relation_opt = build_sparse_optimizer(cfg.optimizer, num_relations, dims[1], device=self.device)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self._build_sampler()
        self.batches = BatchIterator(len(triples), cfg.batch_size, cfg.seed)
        self._entity_constraint = row_constraint(self.model.interaction, "entity")
        self._relation_constraint = row_constraint(self.model.interaction, "relation")

    def _build_sampler(self) -> None:
        triples = self.data.triples
        degrees = degrees_from_triples(triples, self.num_entities) if self.cfg.sampler.distribution == "degree" else None
        self.sampler = NegativeSampler(self.cfg.sampler, self.num_entities, degrees)

    @property
    def triples(self) -> torch.Tensor:
        """(n, 3) every triple trained on: the gold ones, then the added ones."""
        return self.data.triples

    @property
    def kg_version(self) -> int:
        """The KG store version of the triples (0 until ``add_triples``)."""
        return self.data.kg_version

    def add_triples(self, triples: torch.Tensor, weights: torch.Tensor | None = None,
                    relation_targets: torch.Tensor | None = None, *, kg_version: int) -> None:
        """Train on ``triples`` (n, 3) too, from the next epoch on, as KG store version ``kg_version``.

        ``weights`` (n,) weight each triple's loss (default 1; the miner passes confidences; gold triples
        keep 1); ``relation_targets`` (n, R), rows summing to 1, are the LM's relation distributions for the
        KD term (``cfg.reverse_kd``). Between epochs only: ValueError mid-epoch or on bad input."""
        if self.mid_epoch:
            raise ValueError(f"add_triples between epochs only: this trainer is mid-epoch "
                             f"(epoch {self.batches.epoch}, offset {self.batches.offset})")
        checked = check_added_triples(triples, weights, relation_targets, self.num_entities, self.num_relations)
        self.data.add(*checked, kg_version=kg_version)
        self.batches.resize(len(self.data))
        if self.cfg.sampler.distribution == "degree":
            self._build_sampler()

    def step(self, batch: torch.Tensor, weights: torch.Tensor | None = None, labels: torch.Tensor | None = None,
             kd: KDTargets | None = None) -> float:
        model = self.model
        neg = self.sampler.sample_batch(len(batch), self.generator)
        plan = plan_step(self.data.triples.index_select(0, batch), neg, None if kd is None else self.num_relations)
        if self.device.type != "cpu":
            plan = StepPlan(*(x.to(self.device, non_blocking=True) for x in plan))
            neg = NegativeBatch(*(x.to(self.device, non_blocking=True) for x in neg))
            weights = None if weights is None else weights.to(self.device)
            labels = None if labels is None else labels.to(self.device)
            kd = None if kd is None else KDTargets(*(x.to(self.device) for x in kd))
        entity, relation = model.entity.data, model.relation.data
        ent_rows, rel_rows = entity.index_select(0, plan.entity_ids), relation.index_select(0, plan.relation_ids)
        loss, ent_grad, rel_grad = step_gradients(model.interaction, plan, neg, ent_rows, rel_rows, self.cfg.loss,
                                                  self.cfg.regularizer, weights, labels, kd, self.cfg.reverse_kd)
        # the optimisers update the pulled rows (still the tables' rows: nothing else wrote them) in place,
        # apply the model's constraint to them and write them back
        self.entity_opt.step(entity, plan.entity_ids, ent_grad, constrain=self._entity_constraint, rows=ent_rows)
        self.relation_opt.step(relation, plan.relation_ids, rel_grad, constrain=self._relation_constraint,
                               rows=rel_rows)
        return loss

    def train_epoch(self, stop: Callable[[], bool] | None = None) -> float:
        """The rest of the current epoch; mean loss of its steps. ``stop`` is asked after every step: when it
        says so the epoch ends early, and ``mid_epoch`` is true (the next call continues where it ended)."""
        losses, with_kd = [], self.cfg.reverse_kd.weight > 0
        for batch in self.batches:
            _, weights, kd = self.data.gather(batch, with_kd)
            losses.append(self.step(batch, weights, None, kd))
            if stop is not None and stop():
                break
        return sum(losses) / max(len(losses), 1)

    @property
    def mid_epoch(self) -> bool:
        return self.batches.offset != 0

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "entity_opt": self.entity_opt.state_dict(),
                "relation_opt": self.relation_opt.state_dict(), "batches": self.batches.state_dict(),
                "generator": self.generator.get_state(), "triples": self.data.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state; a state from before ``add_triples`` (an older ``kg_version``) keeps this trainer's
        later triples and continues with them, which needs the state to be at an epoch boundary."""
        kept_later = self.data.load_state_dict(state.get("triples"))  # states from before issue 12 have none
        if not kept_later:  # the state's triples: its batch order is over them
            self.batches = BatchIterator(len(self.data), self.cfg.batch_size, self.cfg.seed)
        self.batches.load_state_dict(state["batches"], resize=kept_later)
        self.model.load_state_dict(state["model"])
        self.entity_opt.load_state_dict(state["entity_opt"])
        self.relation_opt.load_state_dict(state["relation_opt"])
        self.generator.set_state(state["generator"])
        if self.cfg.sampler.distribution == "degree":
            self._build_sampler()
