"""One server per KGE node for the rows other nodes ask for (DGL-KE's per-machine KVStore server).

Every shard keeps its rows in shared memory (:mod:`bikd.kge.shared`); a node's ``NodeServer`` maps all of its
node's shards and answers the other nodes' trainers: a trainer step makes ONE pull (and after the step one
push) per other node it touches, whatever the number of partitions there, instead of one per remote partition
plus the relation shard's. The server is a process of its own, so serving never waits on a training thread's
GIL (a trainer that served its own rows did). It holds no state: the rows are the owners' shared memory, so
checkpoints, restores and recoveries go through the owners; after a recovery the driver sends the new
layouts again. Updates are unlocked against the node's trainers, as between the trainers of one node (and
ordered in sync mode, where the driver applies one trainer's updates at a time).
"""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import ray
import torch

from bikd.kge.models import build_interaction
from bikd.kge.shard import ShardState
from bikd.kge.shared import attach
from bikd.kge.training import KGETrainConfig
from bikd.ray.kge import ActorRestarted
from bikd.ray.messages import NodePull, NodePush, NodeShards, ServerCounters, array, pieces, tensor, unpiece


@ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=8)
class NodeServer:
    """Thin actor: each method unpacks a message and reads or updates mapped :class:`ShardState` rows."""

    def __init__(self, cfg: KGETrainConfig, num_relations: int):
        self.cfg, self.num_relations = cfg, num_relations
        self.interaction = build_interaction(cfg.model)
        self.born = uuid.uuid4().hex
        self.entity: dict[int, ShardState] = {}
        self.relation: ShardState | None = None
        self.lock = threading.Lock()  # the counts: calls run on up to max_concurrency threads
        self.num_calls = self.num_rows = 0

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def incarnation(self) -> str:
        """Set when the process starts: a changed value means Ray restarted the actor (its mappings are gone)."""
        return self.born

    def counters(self) -> ServerCounters:
        """Calls and rows served so far, and this process's CPU time (it does nothing else: Ray's threads that
        receive and send the calls included)."""
        return ServerCounters(calls=self.num_calls, rows=self.num_rows, cpu_s=time.process_time())

    def _count(self, calls: int, msg: NodePull | NodePush) -> None:
        with self.lock:
            self.num_calls += calls
            self.num_rows += len(msg.ids) + (0 if msg.relation_ids is None else len(msg.relation_ids))

    def connect(self, msg: NodeShards) -> None:
        optim = self.cfg.optimizer
        self.entity = {p: attach(layout, tensor(ids), optim, self.interaction, "entity") for p, ids, layout in msg.entity}
        self.relation = None
        if msg.relation is not None:
            self.relation = attach(msg.relation, torch.arange(self.num_relations), optim, self.interaction, "relation")

    def _check(self, msg: NodePull | NodePush) -> None:
        if torch.get_num_threads() != 1:
            # a num_cpus=0 actor gets no OMP_NUM_THREADS from Ray: torch would start a thread per core and its
            # spinning workers would take the cores from the node's trainers (per calling thread: pool threads)
            torch.set_num_threads(1)
        if any(p not in self.entity for p in msg.parts) or (msg.relation_ids is not None and self.relation is None):
            # restarted by Ray since the driver connected it: the recovery reconnects and reruns the epoch
            raise ActorRestarted(f"node server asked for partitions {msg.parts} but maps {sorted(self.entity)}")

    def pull(self, msg: NodePull) -> tuple | np.ndarray:
        """The rows asked (entity rows, then relation rows) in ``msg.num_pieces`` pieces: the caller asks for
        that many return values, so each goes inline in the reply."""
        self._count(1, msg)
        out = self._rows(msg)
        return out[0] if len(out) == 1 else tuple(out)

    def exchange(self, push: NodePush, pull: NodePull, *grads: np.ndarray) -> tuple:
        """A trainer's last step's push and its next step's pull in one call (the push first): (step, *pieces)."""
        self._count(1, pull)
        self._count(0, push)
        return (self._push(push, *grads), *self._rows(pull))

    def _rows(self, msg: NodePull) -> list[np.ndarray]:
        self._check(msg)
        ids = tensor(msg.ids).split(list(msg.sizes))
        chunks = [self.entity[p].pull(i) for p, i in zip(msg.parts, ids)]
        relation = None if msg.relation_ids is None else array(self.relation.pull(tensor(msg.relation_ids)))
        out = pieces(array(torch.cat(chunks)) if chunks else None, relation)
        if len(out) != msg.num_pieces:
            raise ValueError(f"node server: {len(out)} pieces of rows for a pull that expects {msg.num_pieces} "
                             "(the trainer and the server disagree on the rows' widths)")
        return out

    def push(self, msg: NodePush, *grads: np.ndarray) -> int:
        """Apply the gradients of ``msg``'s rows, sent as :func:`~bikd.ray.messages.pieces` after it."""
        self._count(1, msg)
        return self._push(msg, *grads)

    def _push(self, msg: NodePush, *grads: np.ndarray) -> int:
        self._check(msg)
        num_ids = len(msg.ids)
        shapes = [(num_ids, self._width(self.entity[msg.parts[0]]) if msg.parts else 0)]
        if msg.relation_ids is not None:
            shapes.append((len(msg.relation_ids), self._width(self.relation)))
        entity, *relation = unpiece(grads, *shapes)
        for p, ids, g in zip(msg.parts, tensor(msg.ids).split(list(msg.sizes)), entity.split(list(msg.sizes))):
            self.entity[p].push(ids, g)
        if relation:
            self.relation.push(tensor(msg.relation_ids), relation[0])
        return msg.step

    @staticmethod
    def _width(shard: ShardState) -> int:
        return shard.table.shape[1]
