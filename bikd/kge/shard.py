"""One shard of an embedding table with its sparse optimiser state (DGL-KE's KVStore, pure torch).

A shard owns the rows of a set of global ids (the entities of one partition, or all relations). ``pull``
returns copies of rows, ``push`` applies gradients with a row-wise optimiser that touches only the pushed
rows, then the model's constraint on those rows. The Ray actor around it only unpacks messages.
"""

from __future__ import annotations

import torch

from bikd.kge.interactions import Interaction, row_constraint
from bikd.kge.optim import SparseOptimConfig, build_sparse_optimizer


class ShardState:
    """Rows ``table[i]`` of global id ``ids[i]`` (ids sorted, unique); ``kind`` picks the constraint."""

    def __init__(self, ids: torch.Tensor, table: torch.Tensor, optim: SparseOptimConfig, interaction: Interaction,
                 kind: str = "entity", *, copy: bool = True):
        """``copy=False`` works on ``table`` itself (a shared-memory view, see :mod:`bikd.kge.shared`)."""
        assert kind in ("entity", "relation"), kind
        assert ids.ndim == 1 and len(ids) == len(table), (ids.shape, table.shape)
        assert len(ids) < 2 or bool((ids[1:] > ids[:-1]).all()), "shard ids must be sorted and unique"
        self.ids, self.table = ids.long(), table.detach().clone().contiguous() if copy else table
        self.optimizer = build_sparse_optimizer(optim, len(ids), table.shape[1], dtype=table.dtype)
        self.interaction, self.kind = interaction, kind
        #: applied by the optimiser to the rows it updates; None when the model has no such constraint
        self.constraint = row_constraint(interaction, kind)
        self.version = 0  # number of pushes applied: snapshots and messages carry it
        # ids 0..n-1 (the relation shard, a single entity shard): a global id is its own row position
        self._identity = len(self.ids) == 0 or (int(self.ids[0]) == 0 and int(self.ids[-1]) == len(self.ids) - 1)

    def local(self, ids: torch.Tensor) -> torch.Tensor:
        """Global ids -> row positions in this shard; ids this shard does not own are a caller bug."""
        ids = ids.long()
        if self._identity:
            if len(ids) and not (0 <= int(ids.min()) and int(ids.max()) < len(self.ids)):
                missing = ids[(ids < 0) | (ids >= len(self.ids))][:5].tolist()
                raise KeyError(f"ids {missing} are not in this {self.kind} shard")
            return ids
        pos = torch.searchsorted(self.ids, ids).clamp_(max=len(self.ids) - 1)
        found = self.ids.index_select(0, pos)
        if not torch.equal(found, ids):
            missing = ids[found != ids][:5].tolist()
            raise KeyError(f"ids {missing} are not in this {self.kind} shard")
        return pos

    def pull(self, ids: torch.Tensor) -> torch.Tensor:
        """(n,) global ids -> (n, d) copies of their rows."""
        return self.table.index_select(0, self.local(ids))

    def push(self, ids: torch.Tensor, grads: torch.Tensor) -> int:
        """Apply (n, d) gradients of (n,) global ids (duplicates are summed); returns the new version."""
        pos = self.local(ids)
        self.optimizer.step(self.table, pos, grads, constrain=self.constraint)
        self.version += 1
        return self.version

    def state_dict(self) -> dict:
        return {"ids": self.ids.clone(), "table": self.table.clone(), "optimizer": self.optimizer.state_dict(),
                "version": self.version, "kind": self.kind}

    def load_state_dict(self, state: dict) -> None:
        if not torch.equal(state["ids"], self.ids) or state["kind"] != self.kind:
            raise ValueError(f"checkpoint is for another {state['kind']} shard ({len(state['ids'])} rows), "
                             f"this one has {len(self.ids)} {self.kind} rows")
        self.table.copy_(state["table"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.version = int(state["version"])
