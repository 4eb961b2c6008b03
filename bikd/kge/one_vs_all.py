"""1vsAll training (Lacroix et al. 2018; Ruffinelli et al. 2020): every training query is scored against ALL
entities and trained with cross-entropy on the true answer, with reciprocal relations (pure torch).

Each triple (h, r, t) gives two queries, (h, r, ?) -> t and (t, r + R, ?) -> h (reciprocal relations), so
the model holds 2R relations and only ever scores tails: ``loss = CE(score_t(h, r) (B, E), t)``, one
(B, d) x (d, E) product per batch for the dot and L2 similarities (every model here but TransE-L1). This is
how the best published DistMult/ComplEx numbers on FB15k-237 were reached; it needs the whole entity table
on one worker (the gradient of a softmax over all entities touches every row), so it runs in one process,
on a GPU when there is one, with dense Adagrad as in Lacroix et al.

``ReciprocalModel`` answers the evaluator's head queries (?, r, t) as tail queries (t, r + R, ?).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from bikd.kge.losses import RegularizerConfig, compute_regularizer
from bikd.kge.models import KGEModel, ModelConfig, build_model


@dataclass(kw_only=True, frozen=True)
class OneVsAllConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="complex", dim=200))
    regularizer: RegularizerConfig = field(default_factory=RegularizerConfig)
    #: dense Adagrad (Lacroix et al.: 0.1)
    lr: float = 0.1
    batch_size: int = 1000
    epochs: int = 50
    label_smoothing: float = 0.0
    #: scores times this before the softmax: distance scores of unit-norm TransE entities span only a few
    #: units, too flat a softmax over 14k entities; the dot-product models need none
    logit_scale: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.model.name == "transe" and self.model.p == 1:
            raise ValueError("1vsAll needs a GEMM-form score; TransE-L1 has none (use p=2 or negative sampling)")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.batch_size < 1 or self.epochs < 0:
            raise ValueError(f"batch_size must be >= 1 and epochs >= 0, got {self.batch_size}, {self.epochs}")
        if not self.logit_scale > 0:
            raise ValueError(f"logit_scale must be > 0, got {self.logit_scale}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


class ReciprocalModel(torch.nn.Module):
    """A model over 2R relations seen as one over R: head queries (?, r, t) are tail queries (t, r + R, ?)."""

    def __init__(self, model: KGEModel, num_relations: int):
        super().__init__()
        assert model.num_relations == 2 * num_relations, (model.num_relations, num_relations)
        self.model, self.num_relations, self.num_entities = model, num_relations, model.num_entities

    def score_t(self, h: Tensor, r: Tensor) -> Tensor:
        return self.model.score_t(h, r)

    def score_h(self, r: Tensor, t: Tensor) -> Tensor:
        return self.model.score_t(t, r + self.num_relations)

    def ranking_scores_t(self, h: Tensor, r: Tensor) -> Tensor:
        return self.model.ranking_scores_t(h, r)

    def ranking_scores_h(self, r: Tensor, t: Tensor) -> Tensor:
        return self.model.ranking_scores_t(t, r + self.num_relations)


def queries(triples: Tensor, num_relations: int) -> Tensor:
    """(n, 3) triples -> (2n, 3) rows (query entity, query relation, answer), the reciprocals second."""
    inverse = torch.stack([triples[:, 2], triples[:, 1] + num_relations, triples[:, 0]], dim=1)
    return torch.cat([triples, inverse])


class OneVsAllTrainer:
    """Trains a KGEModel with 1vsAll cross-entropy on ``device``; ``eval_model()`` is what the evaluator takes."""

    def __init__(self, triples: Tensor, num_entities: int, num_relations: int, cfg: OneVsAllConfig,
                 device: str | torch.device = "cpu"):
        self.cfg, self.device, self.num_relations = cfg, torch.device(device), num_relations
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model, num_entities, 2 * num_relations).to(self.device)
        self.optimizer = torch.optim.Adagrad(self.model.parameters(), lr=cfg.lr)
        self.queries = queries(triples, num_relations).to(self.device)
        self.generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
        self.epoch = 0

    def eval_model(self) -> ReciprocalModel:
        return ReciprocalModel(self.model, self.num_relations)

    def step(self, q: Tensor) -> Tensor:
        """One optimiser step on (B, 3) queries; returns the loss (a 0-dim tensor: no device sync here)."""
        model, cfg = self.model, self.cfg
        scores = model.score_t(q[:, 0], q[:, 1]) * cfg.logit_scale  # (B, E)
        loss = torch.nn.functional.cross_entropy(scores, q[:, 2], label_smoothing=cfg.label_smoothing)
        if cfg.regularizer.name != "none" and cfg.regularizer.weight > 0:
            loss = loss + compute_regularizer(cfg.regularizer, model.entity[q[:, 0]], model.relation[q[:, 1]],
                                              model.entity[q[:, 2]])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        model.constrain_()
        return loss.detach()

    def train_epoch(self) -> dict:
        start = time.perf_counter()
        order = torch.randperm(len(self.queries), generator=self.generator).to(self.device)
        total, num_batches = torch.zeros((), device=self.device), 0
        for i in range(0, len(order), self.cfg.batch_size):
            total += self.step(self.queries[order[i:i + self.cfg.batch_size]])
            num_batches += 1
        self.epoch += 1
        return {"epoch": self.epoch, "loss": float(total) / max(num_batches, 1), "seconds": time.perf_counter() - start}

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(), "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.epoch = int(state["epoch"])
