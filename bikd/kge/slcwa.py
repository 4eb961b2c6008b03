"""A compact sLCWA training epoch (pure torch) for the KG-side demo and as the reference loop.

Each positive chunk is scored against one block of uniformly drawn entities shared by the whole chunk
(DGL-KE's joint negative sampling), corrupting heads for half the batch and tails for the other half,
with a margin ranking loss. The distributed trainers build on the same scoring calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(kw_only=True, frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 256
    num_negatives: int = 64
    lr: float = 0.01
    margin: float = 1.0
    seed: int = 0

    def __post_init__(self):
        for name in ("epochs", "batch_size", "num_negatives"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if self.margin < 0:
            raise ValueError(f"train.margin must be >= 0, got {self.margin}")


def train_epoch(
    model: nn.Module, triples: torch.Tensor, optimizer: torch.optim.Optimizer, cfg: TrainConfig, generator: torch.Generator
) -> float:
    """One pass over ``triples`` (n, 3) in random order; returns the mean loss."""
    model.train()
    order = torch.randperm(len(triples), generator=generator)
    total, num_batches = 0.0, 0
    for start in range(0, len(triples), cfg.batch_size):
        h, r, t = triples[order[start : start + cfg.batch_size]].unbind(1)
        neg = torch.randint(model.num_entities, (cfg.num_negatives,), generator=generator)
        pos = model.score(h, r, t)  # (B,)
        half = len(h) // 2
        # (B/2, k) tail-corrupted and (B - B/2, k) head-corrupted scores against the shared block
        neg_t = model.score(h[:half, None], r[:half, None], neg[None, :])
        neg_h = model.score(neg[None, :], r[half:, None], t[half:, None])
        loss = torch.cat([
            torch.relu(cfg.margin - pos[:half, None] + neg_t).mean(1),
            torch.relu(cfg.margin - pos[half:, None] + neg_h).mean(1),
        ]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.constrain_()  # e.g. TransE's entities back onto the unit sphere
        total += loss.item()
        num_batches += 1
    return total / max(num_batches, 1)
