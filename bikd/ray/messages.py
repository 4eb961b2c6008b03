"""Messages between the driver, trainers and embedding shards: small frozen dataclasses with a version."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class PullRequest:
    version: int  # the requesting trainer's step, for tracing staleness
    ids: torch.Tensor  # (n,) global ids owned by the receiving shard


@dataclass(frozen=True, kw_only=True)
class Rows:
    version: int  # the shard's version (pushes applied) when the rows were read
    rows: torch.Tensor  # (n, d)


@dataclass(frozen=True, kw_only=True)
class PushGrads:
    step: int  # the sending trainer's step
    source: int  # the sending trainer's partition
    ids: torch.Tensor  # (n,) global ids, owned by the receiving shard
    grads: torch.Tensor  # (n, d)


@dataclass(frozen=True, kw_only=True)
class Snapshot:
    version: int
    entity: torch.Tensor  # (num_entities, d_e)
    relation: torch.Tensor  # (num_relations, d_r)
