"""Sharded KG-embedding training on Ray actors, DGL-KE style.

- One ``KGETrainer`` actor per METIS partition owns that partition's entity rows with their sparse
  optimiser state (it is the partition's embedding shard: DGL-KE's KVStore server and trainer in one
  process, so the partition-local part of every step never leaves it) and trains on the triples whose
  head it owns. Rows of other partitions are read where they are (below) and their gradients sent back. With ``negatives="local"`` the negatives are drawn from the partition's own entities
  (PyTorch-BigGraph's setting), so only the cut edges' tails travel; the default draws them from all
  entities, as a single process does (local negatives cost quality on small graphs).
- An ``EmbeddingShard`` actor owns the relation table and its optimiser state.
- Same machine, no messages (``DistConfig.same_node_rows="shared"``, the default): every shard keeps its
  rows in shared memory (:mod:`bikd.kge.shared`) and the trainers of its node read and update them in place,
  as DGL-KE's trainers do with a machine's shared-memory embeddings; only rows on other nodes travel.
- Other nodes (``DistConfig.cross_node_rows="server"``, the default): each node's
  :class:`~bikd.ray.node_server.NodeServer` maps that node's shared shards and answers other nodes' trainers
  (DGL-KE's per-machine KVStore server): one pull per other node a step (or a window of
  ``DistConfig.exchange_every`` steps) touches, the push of an earlier one riding on it
  (:mod:`bikd.ray.node_exchange`).
- Each trainer is placed on a node of its own (node-affinity scheduling) among the nodes that have every
  resource of ``DistConfig.resources_per_trainer`` (e.g. ``{kge: 1}`` for nodes started with
  ``--resources='{"kge": 1}'``; none: every node with CPUs); the relation shard sits on the first.

Triples can be added between epochs (issue 12: mined from text): ``ShardedKGE.add_triples`` routes each to
the trainer owning its head, which appends it to its :class:`~bikd.kge.training.TrainingTriples` and grows
its batch order from the next epoch on. A batch holding triples with LM relation targets (the reverse KD
term) pulls every relation row from the relation shard and pushes all their gradients back.

Modes: ``async`` (default) lets every trainer run its epoch freely with at most ``staleness`` steps'
pushes in flight; ``sync`` runs lock-step rounds driven by the driver (every trainer computes on the same
state, then the updates are applied in trainer order), which makes runs bit-for-bit reproducible.
"""

from __future__ import annotations

import io
import logging
import posixpath
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import ray
import torch

from bikd.kge.models import build_interaction
from bikd.kge.sampling import BatchIterator, NegativeSampler, degrees_from_triples
from bikd.kge.shard import ShardState
from bikd.kge.shared import SharedLayout, attach, can_share, share, shm_root, unlink
from bikd.kge.training import KGETrainConfig, TrainingTriples, plan_step, step_gradients
from bikd.ray.messages import AddTriples, Counters, Peers, PullRequest, PushGrads, Rows, array, tensor
from bikd.ray.node_exchange import NodeExchange
from bikd.manifest import read_listed, sha256_hex
from bikd.storage import Storage

#: written last in each ``epoch-NNNNNN/`` checkpoint folder: a checkpoint exists iff it does
CHECKPOINT_MANIFEST = "MANIFEST.json"


@dataclass(kw_only=True, frozen=True)
class DistConfig:
    num_parts: int = 2
    partition: Literal["metis", "relation", "random"] = "metis"
    mode: Literal["async", "sync"] = "async"
    #: async mode: pushes a trainer may have in flight before it waits for the oldest to land
    staleness: int = 2
    cpus_per_trainer: float = 1.0
    #: actor failures survived (each restarts the epoch from its start) before the run gives up
    max_recoveries: int = 3
    #: "local": negatives from the trainer's own partition (never travel); "global": from all entities
    negatives: Literal["local", "global"] = "global"
    #: custom Ray resources each trainer needs: trainers go only to nodes that have them (e.g. {kge: 1})
    resources_per_trainer: dict[str, float] = field(default_factory=dict)
    #: rows of shards on the trainer's own node: "shared" (read and updated in place in shared memory, no
    #: message; unlocked updates in async mode, as DGL-KE) or "calls" (pulled and pushed as actor calls)
    same_node_rows: Literal["shared", "calls"] = "shared"
    #: async mode: send a step's pulls (rows on other nodes) before the previous step computes, hiding their
    #: latency; those rows are then one step staler
    prefetch: bool = True
    #: rows of shared shards on OTHER nodes: "server" (one call per other node a step touches, answered by that
    #: node's NodeServer process) or "trainer" (one call per remote partition, answered by its trainer)
    cross_node_rows: Literal["server", "trainer"] = "server"
    #: async mode, node servers: steps per exchange with another node (one pull for all their rows there, one
    #: push of their summed gradients; bikd/ray/node_exchange.py): cuts calls per step by this factor, and
    #: those rows are up to ~3x this many steps staler (the next window is pulled while one runs)
    exchange_every: int = 1
    #: node server processes per node (DGL-KE's servers per machine): a server is one process, one core's worth
    #: of Python, answering every trainer of the other nodes; trainers spread their calls over a node's servers
    #: by partition (bench/kge_scaling.py models their load). Each needs a core the trainers do not use.
    servers_per_node: int = 1

    def __post_init__(self):
        if any(not v > 0 for v in self.resources_per_trainer.values()):
            raise ValueError(f"dist.resources_per_trainer must map resource names to amounts > 0, got {self.resources_per_trainer}")
        if self.num_parts < 1:
            raise ValueError(f"dist.num_parts must be >= 1, got {self.num_parts}")
        if self.mode not in ("async", "sync"):
            raise ValueError(f"dist.mode must be 'async' or 'sync', got {self.mode!r}")
        if self.staleness < 0:
            raise ValueError(f"dist.staleness must be >= 0, got {self.staleness}")
        if self.negatives not in ("local", "global"):
            raise ValueError(f"dist.negatives must be 'local' or 'global', got {self.negatives!r}")
        if self.same_node_rows not in ("shared", "calls"):
            raise ValueError(f"dist.same_node_rows must be 'shared' or 'calls', got {self.same_node_rows!r}")
        if self.cross_node_rows not in ("server", "trainer"):
            raise ValueError(f"dist.cross_node_rows must be 'server' or 'trainer', got {self.cross_node_rows!r}")
        if self.servers_per_node < 1:
            raise ValueError(f"dist.servers_per_node must be >= 1, got {self.servers_per_node}")
        if self.exchange_every < 1:
            raise ValueError(f"dist.exchange_every must be >= 1, got {self.exchange_every}")
        if self.mode == "sync" and self.exchange_every != 1:
            raise ValueError(f"dist.exchange_every={self.exchange_every} needs dist.mode='async' (sync mode exchanges every step)")
        if not self.cpus_per_trainer >= 0:
            raise ValueError(f"dist.cpus_per_trainer must be >= 0, got {self.cpus_per_trainer}")


class _RowServer:
    """The embedding-shard side of an actor: thin, lock-protected wrappers around ``self.shard`` (a
    :class:`ShardState`), so that peers' calls and the actor's own training thread never interleave."""

    shard: ShardState
    lock: threading.Lock

    def pull(self, msg: PullRequest) -> Rows:
        with self.lock:
            return Rows(version=self.shard.version, rows=array(self.shard.pull(tensor(msg.ids))))

    def push(self, msg: PushGrads) -> int:
        with self.lock:
            return self.shard.push(tensor(msg.ids), tensor(msg.grads))

    def rows(self) -> Rows:
        with self.lock:
            return Rows(version=self.shard.version, rows=array(self.shard.table.clone()))

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def _init_sharing(self, name: str, dist: DistConfig, optim) -> None:
        """This process's identity (see ``incarnation``) and, if its rows may be shared, their file's name."""
        self.born = uuid.uuid4().hex
        self.share_name = name if dist.same_node_rows == "shared" and can_share(optim) else None
        self.layout = None

    def share_rows(self) -> tuple[str, SharedLayout | None]:
        """Move the rows into a new shared-memory file (the current values; again at every (re)connection,
        so a restarted peer maps the same memory as the others) and return (this node, its layout), or a
        None layout when sharing is off or /dev/shm is full: peers then send messages."""
        with self.lock:
            self.layout = share(self.shard, self.share_name) if self.share_name else None
        if self.share_name and self.layout is None:
            logging.getLogger(__name__).warning(
                "%s: no room in %s for %.1f MB of rows; peers on this node use actor calls (slower, same result)",
                self.share_name, shm_root(), self.shard.table.numel() * self.shard.table.element_size() / 1e6)
        return self.node_id(), self.layout

    def incarnation(self) -> str:
        """Set when the process starts: a changed value means Ray restarted the actor (its state is gone)."""
        return self.born

    def release_file(self) -> None:
        """Unlink the shared file once the peers mapped it: the memory goes with the last process."""
        unlink(self.layout)


@ray.remote(num_cpus=0, max_restarts=-1)
class EmbeddingShard(_RowServer):
    """Thin actor around :class:`ShardState`: each method unpacks a message and calls it."""

    def __init__(self, ids: torch.Tensor, table: torch.Tensor, cfg: KGETrainConfig, kind: str, dist: DistConfig):
        self.shard = ShardState(ids, table, cfg.optimizer, build_interaction(cfg.model), kind)
        self.lock = threading.Lock()
        self._init_sharing(kind, dist, cfg.optimizer)

    def state_dict(self) -> dict:
        return self.shard.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.shard.load_state_dict(state)

    def save(self, storage: Storage, rel: str) -> str:
        """Write this shard's state (rows, optimiser state, version) to ``storage``; returns its sha256."""
        return _save(storage, rel, self.shard.state_dict())

    def restore(self, storage: Storage, rel: str, sha256: str) -> None:
        self.shard.load_state_dict(_load(storage, rel, sha256))


@ray.remote(max_restarts=-1, max_concurrency=8)
class KGETrainer(_RowServer):
    """Trains on one partition's triples; also the embedding shard of that partition's entity rows.

    The rows (with their optimiser state) live in this process, so the partition-local part of a step
    (METIS keeps most of it local) is an in-process gather and update; only the rows owned by other
    partitions and the relations travel, one call per remote shard per step. The actor is threaded:
    peers' ``pull``/``push`` are served while ``run_epoch`` runs, under a lock on the rows.
    """

    def __init__(self, part: int, triples: torch.Tensor, num_entities: int, num_relations: int,
                 entity_owner: torch.Tensor, table: torch.Tensor, cfg: KGETrainConfig, relation_shard, dist: DistConfig):
        self.num_threads = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
        self.part, self.cfg, self.owner = part, cfg, entity_owner
        self.num_entities, self.num_relations = num_entities, num_relations
        self.data = TrainingTriples(triples, num_relations)
        self.relation_shard, self.staleness, self.peers = relation_shard, dist.staleness, {}
        self.prefetch = dist.prefetch
        ids = (entity_owner == part).nonzero().flatten()
        self.shard = ShardState(ids, table, cfg.optimizer, build_interaction(cfg.model), "entity")
        self.lock = threading.Lock()
        self._init_sharing(f"part{part}", dist, cfg.optimizer)
        #: shards of this node mapped from shared memory: partition -> ShardState, and the relation shard
        self.attached: dict[int, ShardState] = {}
        self.relation_rows: ShardState | None = None
        self.served, self.relation_node = {}, None
        #: rows on other nodes, through their node servers, in windows of steps (async: ``exchange_every``)
        self.exchange = NodeExchange(part=part, owner=entity_owner, entity_width=table.shape[1])
        self.exchange_every = dist.exchange_every
        self.queue: deque = deque()  # the current window's planned steps, with their tickets
        self.pending_ticket = None
        self.num_calls = self.num_rows_pulled = 0
        seed = cfg.seed + 7919 * part  # partition 0 draws exactly what LocalTrainer draws
        self.generator = torch.Generator().manual_seed(seed)
        # local negatives (PyTorch-BigGraph): drawn from this partition's entities, so they never travel
        self.negative_ids = ids if dist.negatives == "local" else None
        self._build_sampler()
        self.batches = BatchIterator(len(triples), cfg.batch_size, seed)
        self.step_count, self.target_epoch, self.pending = 0, 0, []

    def _build_sampler(self) -> None:
        """The negative sampler; a degree sampler's degrees are this partition's triples' (again after additions)."""
        pool = self.num_entities if self.negative_ids is None else len(self.negative_ids)
        degrees = None
        if self.cfg.sampler.distribution == "degree":
            degrees = degrees_from_triples(self.data.triples, self.num_entities)
            if self.negative_ids is not None:
                degrees = degrees[self.negative_ids]
        self.sampler = NegativeSampler(self.cfg.sampler, pool, degrees)

    def get_triples(self) -> tuple[int, torch.Tensor]:
        """(kg_version, every triple this trainer trains on (n, 3): its gold ones, then the added ones)."""
        return self.data.kg_version, self.data.triples.clone()

    def mid_epoch(self) -> bool:
        return self.batches.offset != 0

    def num_triples(self) -> int:
        return len(self.data)

    def add_triples(self, msg: AddTriples) -> int:
        """Append the (driver-checked) triples routed here; returns this trainer's triple count."""
        if self.mid_epoch():
            raise ValueError(f"add_triples between epochs only: trainer {self.part} is mid-epoch "
                             f"(epoch {self.batches.epoch}, offset {self.batches.offset})")
        targets = None if msg.targets is None else tensor(msg.targets).clone()
        self.data.add(tensor(msg.triples).clone(), tensor(msg.weights).clone(), targets, msg.kg_version)
        self.batches.resize(len(self.data))
        if self.cfg.sampler.distribution == "degree":
            self._build_sampler()
        return len(self.data)

    def connect(self, msg: Peers) -> None:
        """Every partition's trainer (the owners of the other entity rows); those on this node whose rows
        are in shared memory, and the relation shard if it is here, are mapped and used without messages.
        Shared shards on other nodes are read through their node's server (``msg.servers``), one call per node."""
        self.peers = {p: peer for p, peer in enumerate(msg.trainers) if p != self.part}
        here, interaction = self.node_id(), self.shard.interaction
        self.attached = {p: attach(layout, (self.owner == p).nonzero().flatten(), self.cfg.optimizer, interaction, "entity")
                         for p, (node, layout) in enumerate(msg.layouts)
                         if p != self.part and node == here and layout is not None}
        node, layout = msg.relation_layout
        self.relation_rows = None
        if node == here and layout is not None:
            self.relation_rows = attach(layout, torch.arange(self.num_relations), self.cfg.optimizer, interaction, "relation")
        # a node's servers share its callers: this trainer always calls the same one (its partition picks it)
        servers = {n: group[self.part % len(group)] for n, group in (msg.servers or {}).items()}
        #: partition -> the node whose server has its rows (shared shards on other nodes with a server)
        self.served = {p: n for p, (n, lay) in enumerate(msg.layouts) if n != here and lay is not None and n in servers}
        self.relation_node = node if node != here and layout is not None and node in servers else None
        relation_width = None if layout is None else dict((n, shape) for n, shape, *_ in layout.tensors)["table"][1]
        self.exchange.connect(servers, self.served, self.relation_node, relation_width)
        self.queue.clear()

    def counters(self) -> Counters:
        """Steps so far and their exchange: what the bench reports."""
        return Counters(steps=self.step_count, calls=self.num_calls + self.exchange.num_calls,
                        rows_pulled=self.num_rows_pulled + self.exchange.num_rows,
                        exchange_s=self.exchange.seconds)

    # --- the trainer side ------------------------------------------------------------------------------
    def begin_epoch(self) -> int:
        self.target_epoch = self.batches.epoch
        return len(self.data)

    def compute(self) -> float | None:
        """One step up to the gradients, which wait in ``self.pending`` for ``apply``; None once the epoch is done."""
        step = self._prepare()
        return None if step is None else self._finish(step)

    def _prepare(self) -> tuple | None:
        """The next step, planned, its pulls of rows that live on other nodes sent (they travel meanwhile);
        None once the epoch is done. Steps are planned a window at a time (``exchange_every``)."""
        if not self.queue and self.batches.epoch != self.target_epoch:
            self.exchange.flush()
            return None
        if torch.get_num_threads() != self.num_threads:
            # methods of a threaded actor run on pool threads, and OpenMP's thread count is per calling thread
            torch.set_num_threads(self.num_threads)
        size = self.exchange_every if self.exchange.active else 1
        # windows of several steps: the next window is opened when this one starts, so that its (larger) pull
        # has a whole window of steps to arrive in (its rows are up to ~3 windows staler)
        while len(self.queue) <= (size if size > 1 else 0) and self.batches.epoch == self.target_epoch:
            steps = []
            while len(steps) < size and self.batches.epoch == self.target_epoch:
                steps.append(self._plan())
            tickets = [None] * len(steps)
            if self.exchange.active:
                tickets = self.exchange.open([(st[0].entity_ids, st[0].relation_ids, st[4]) for st in steps], self.step_count)
            self.queue.extend((*st, ticket) for st, ticket in zip(steps, tickets))
        return self.queue.popleft()

    def _plan(self) -> tuple:
        """Draw a batch and its negatives, plan its rows and send the pulls of rows other trainers or the
        relation shard answer themselves (not node servers)."""
        batch, weights, kd = self.data.gather(self.batches.next_batch(), self.cfg.reverse_kd.weight > 0)
        neg = self.sampler.sample_batch(len(batch), self.generator)
        if self.negative_ids is not None:
            neg = neg._replace(negatives=self.negative_ids[neg.negatives])
        plan = plan_step(batch, neg, None if kd is None else self.num_relations)  # KD: every relation row
        owner = self.owner[plan.entity_ids]
        groups = [(s, (owner == s).nonzero().flatten()) for s in owner.unique().tolist()]
        version = self.step_count
        rel_ref = None
        if self.relation_rows is None and self.relation_node is None:
            rel_ref = self.relation_shard.pull.remote(PullRequest(version=version, ids=array(plan.relation_ids)))
        remote = [(pos, self.peers[s].pull.remote(PullRequest(version=version, ids=array(plan.entity_ids[pos]))))
                  for s, pos in groups if s != self.part and s not in self.attached and s not in self.served]
        self.num_calls += len(remote) + (rel_ref is not None)
        self.num_rows_pulled += sum(len(pos) for pos, _ in remote) + len(plan.relation_ids) * (rel_ref is not None)
        return plan, neg, weights, kd, groups, rel_ref, remote

    def _finish(self, step: tuple) -> float:
        """Read this node's rows, wait for the pulled ones, and compute the loss and the gradients."""
        plan, neg, weights, kd, groups, rel_ref, remote, ticket = step
        if len(groups) == 1 and groups[0][0] == self.part:  # all rows are this trainer's: no scatter
            with self.lock:
                ent_rows = self.shard.pull(plan.entity_ids)
        else:
            ent_rows = torch.empty(len(plan.entity_ids), self.shard.table.shape[1])
            for s, pos in groups:
                if s == self.part:
                    with self.lock:
                        ent_rows[pos] = self.shard.pull(plan.entity_ids[pos])
                elif s in self.attached:
                    ent_rows[pos] = self.attached[s].pull(plan.entity_ids[pos])
            for pos, ref in remote:
                ent_rows[pos] = tensor(ray.get(ref).rows)
        rel_rows = None if ticket is None else self.exchange.read(ticket, ent_rows)
        if rel_rows is None:
            rel_rows = self.relation_rows.pull(plan.relation_ids) if rel_ref is None else tensor(ray.get(rel_ref).rows)
        loss, ent_grad, rel_grad = step_gradients(self.shard.interaction, plan, neg, ent_rows, rel_rows,
                                                  self.cfg.loss, self.cfg.regularizer, weights, None, kd,
                                                  self.cfg.reverse_kd)
        self.step_count += 1
        # (target, ids, grads): target None = this trainer's rows, a ShardState = mapped, else an actor
        self.pending = [] if self.relation_node else [(self.relation_rows or self.relation_shard, plan.relation_ids, rel_grad)]
        whole = len(groups) == 1
        for s, pos in groups:
            if s not in self.served:
                ids, grads = (plan.entity_ids, ent_grad) if whole else (plan.entity_ids[pos], ent_grad[pos])
                self.pending.append((None if s == self.part else self.attached.get(s) or self.peers[s], ids, grads))
        self.pending_ticket = None if ticket is None else (ticket, ent_grad, rel_grad)  # rows of node servers
        return loss

    def apply(self, defer: bool = False) -> list:
        """Apply the last step's gradients: this trainer's rows and mapped shards' rows here, other nodes'
        rows pushed; returns the pushes' refs. ``defer``: pushes to node servers wait for the next window's pull
        to that node and go with it, or alone if it does not touch the node (bikd/ray/node_exchange.py)."""
        refs = []
        for target, ids, grads in self.pending:
            if target is None:
                with self.lock:
                    self.shard.push(ids, grads)
            elif isinstance(target, ShardState):
                target.push(ids, grads)  # another process's rows in shared memory: unlocked, as DGL-KE
            else:
                refs.append(target.push.remote(PushGrads(step=self.step_count, source=self.part, ids=array(ids),
                                                         grads=array(grads))))
        self.num_calls += len(refs)
        if self.pending_ticket is not None:
            refs += self.exchange.add(*self.pending_ticket, defer=defer, step=self.step_count)
        self.pending, self.pending_ticket = [], None
        return refs

    def apply_sync(self) -> None:
        refs = self.apply()
        # every push has landed or failed before an error reaches the driver, which then restores the shards:
        # a push still in flight could land after the restore
        ray.wait(refs, num_returns=len(refs))
        ray.get(refs)

    def run_epoch(self) -> dict:
        """Async mode: the whole local epoch with at most ``staleness`` steps' pushes in flight."""
        self.begin_epoch()
        start, losses, in_flight = time.perf_counter(), [], []
        try:
            step = self._prepare()
            while step is not None:
                # prefetch: the next step's pulls are sent before this step computes, so their latency hides
                # behind it (those rows miss this step's update: one step staler, as async mode allows)
                ahead = self._prepare() if self.prefetch else None
                losses.append(self._finish(step))
                # pushes to node servers wait for the next pull to their node (one call for both)
                in_flight.append(self.apply(defer=True) + self.exchange.take_sent())
                while len(in_flight) > self.staleness:
                    ray.get(in_flight.pop(0))
                step = ahead if self.prefetch else self._prepare()
            self.exchange.flush()
        finally:
            # even when a peer died: no push of this epoch may land after the driver restores the shards (a
            # push not sent yet is dropped: the restore replaces what it would have updated)
            in_flight.append(self.exchange.take_sent())
            self.exchange.reset()
            refs = [ref for step in in_flight for ref in step]
            ray.wait(refs, num_returns=len(refs))
        for refs in in_flight:
            ray.get(refs)
        return {"part": self.part, "loss": sum(losses) / max(len(losses), 1), "steps": len(losses),
                "triples": len(self.data), "seconds": time.perf_counter() - start}

    def state_dict(self) -> dict:
        with self.lock:
            shard = self.shard.state_dict()
        return {"shard": shard, "batches": self.batches.state_dict(), "generator": self.generator.get_state(),
                "step": self.step_count, "target_epoch": self.target_epoch, "triples": self.data.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state; one from an older KG version than this trainer's keeps this trainer's (later)
        triples and continues with them, which is accepted at an epoch boundary only."""
        kept_later = self.data.load_state_dict(state.get("triples"))  # states from before issue 12 have none
        if not kept_later:  # the state's triples: its batch order is over them
            self.batches = BatchIterator(len(self.data), self.cfg.batch_size, self.batches.seed)
        self.batches.load_state_dict(state["batches"], resize=kept_later)
        if self.cfg.sampler.distribution == "degree":
            self._build_sampler()
        with self.lock:
            self.shard.load_state_dict(state["shard"])
        self.generator.set_state(state["generator"])
        self.step_count = int(state["step"])
        self.target_epoch = int(state["target_epoch"])
        self.pending, self.pending_ticket = [], None
        self.queue.clear()
        self.exchange.reset()

    def save(self, storage: Storage, rel: str) -> str:
        return _save(storage, rel, self.state_dict())

    def restore(self, storage: Storage, rel: str, sha256: str) -> None:
        self.load_state_dict(_load(storage, rel, sha256))


class ActorRestarted(RuntimeError):
    """An actor of the run was restarted by Ray (found by its incarnation, not by a failed call)."""


def _save(storage: Storage, rel: str, state: dict) -> str:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    storage.write_bytes(rel, data)
    return sha256_hex(data)


def _load(storage: Storage, rel: str, sha256: str) -> dict:
    manifest = storage.url_of(f"{posixpath.dirname(rel)}/{CHECKPOINT_MANIFEST}")
    return torch.load(io.BytesIO(read_listed(storage, rel, sha256, listed_in=manifest)), weights_only=True)
