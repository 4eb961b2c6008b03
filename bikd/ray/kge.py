"""Sharded KG-embedding training on Ray actors, DGL-KE style.

- One ``KGETrainer`` actor per METIS partition owns that partition's entity rows with their sparse
  optimiser state (it is the partition's embedding shard: DGL-KE's KVStore server and trainer in one
  process, so the partition-local part of every step never leaves it) and trains on the triples whose
  head it owns. Rows of other partitions are pulled from their owners and the gradients pushed back, one
  call per remote partition per step. With ``negatives="local"`` the negatives are drawn from the partition's own entities
  (PyTorch-BigGraph's setting), so only the cut edges' tails travel; the default draws them from all
  entities, as a single process does (local negatives cost quality on small graphs).
- An ``EmbeddingShard`` actor owns the relation table and its optimiser state.
- Same machine, no messages (``DistConfig.same_node_rows="shared"``, the default): every shard keeps its
  rows in shared memory (:mod:`bikd.kge.shared`) and the trainers of its node read and update them in place,
  as DGL-KE's trainers do with a machine's shared-memory embeddings; only rows on other nodes travel.
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
import json
import logging
import posixpath
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from bikd.kge.export import export_embeddings
from bikd.kge.models import KGEModel, build_interaction, build_model
from bikd.kge.partition import PartitionConfig, Partitioning, partition
from bikd.kge.sampling import BatchIterator, NegativeSampler, degrees_from_triples
from bikd.kge.shard import ShardState
from bikd.kge.shared import SharedLayout, attach, can_share, share, shm_root, unlink
from bikd.kge.training import KGETrainConfig, TrainingTriples, check_added_triples, plan_step, step_gradients
from bikd.ray.messages import AddTriples, Peers, PullRequest, PushGrads, Rows, Snapshot, array, snapshot_prefix, tensor
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
        self.num_calls = 0
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
        are in shared memory, and the relation shard if it is here, are mapped and used without messages."""
        self.peers = {p: peer for p, peer in enumerate(msg.trainers) if p != self.part}
        here, interaction = self.node_id(), self.shard.interaction
        self.attached = {p: attach(layout, (self.owner == p).nonzero().flatten(), self.cfg.optimizer, interaction, "entity")
                         for p, (node, layout) in enumerate(msg.layouts)
                         if p != self.part and node == here and layout is not None}
        node, layout = msg.relation_layout
        self.relation_rows = None
        if node == here and layout is not None:
            self.relation_rows = attach(layout, torch.arange(self.num_relations), self.cfg.optimizer, interaction, "relation")

    def counters(self) -> tuple[int, int]:
        """(steps, actor calls made for them) so far: the exchange cost the bench reports."""
        return self.step_count, self.num_calls

    # --- the trainer side ------------------------------------------------------------------------------
    def begin_epoch(self) -> int:
        self.target_epoch = self.batches.epoch
        return len(self.data)

    def compute(self) -> float | None:
        """One step up to the gradients, which wait in ``self.pending`` for ``apply``; None once the epoch is done."""
        step = self._prepare()
        return None if step is None else self._finish(step)

    def _prepare(self) -> tuple | None:
        """Draw the next step's batch and negatives, plan its rows and send the pulls of rows that live on other
        nodes (they travel meanwhile); None once the epoch is done."""
        if self.batches.epoch != self.target_epoch:
            return None
        if torch.get_num_threads() != self.num_threads:
            # methods of a threaded actor run on pool threads, and OpenMP's thread count is per calling thread
            torch.set_num_threads(self.num_threads)
        batch, weights, kd = self.data.gather(self.batches.next_batch(), self.cfg.reverse_kd.weight > 0)
        neg = self.sampler.sample_batch(len(batch), self.generator)
        if self.negative_ids is not None:
            neg = neg._replace(negatives=self.negative_ids[neg.negatives])
        plan = plan_step(batch, neg, None if kd is None else self.num_relations)  # KD: every relation row
        owner = self.owner[plan.entity_ids]
        groups = [(s, (owner == s).nonzero().flatten()) for s in owner.unique().tolist()]
        version = self.step_count
        # messages first (they travel while this process gathers the rows it can read itself)
        rel_ref = None
        if self.relation_rows is None:
            rel_ref = self.relation_shard.pull.remote(PullRequest(version=version, ids=array(plan.relation_ids)))
        remote = [(pos, self.peers[s].pull.remote(PullRequest(version=version, ids=array(plan.entity_ids[pos]))))
                  for s, pos in groups if s != self.part and s not in self.attached]
        self.num_calls += len(remote) + (rel_ref is not None)
        return plan, neg, weights, kd, groups, rel_ref, remote

    def _finish(self, step: tuple) -> float:
        """Read this node's rows, wait for the pulled ones, and compute the loss and the gradients."""
        plan, neg, weights, kd, groups, rel_ref, remote = step
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
        rel_rows = self.relation_rows.pull(plan.relation_ids) if rel_ref is None else tensor(ray.get(rel_ref).rows)
        loss, ent_grad, rel_grad = step_gradients(self.shard.interaction, plan, neg, ent_rows, rel_rows,
                                                  self.cfg.loss, self.cfg.regularizer, weights, None, kd,
                                                  self.cfg.reverse_kd)
        self.step_count += 1
        # (target, ids, grads): target None = this trainer's rows, a ShardState = mapped, else an actor
        self.pending = [(self.relation_rows or self.relation_shard, plan.relation_ids, rel_grad)]
        whole = len(groups) == 1
        for s, pos in groups:
            ids, grads = (plan.entity_ids, ent_grad) if whole else (plan.entity_ids[pos], ent_grad[pos])
            self.pending.append((None if s == self.part else self.attached.get(s) or self.peers[s], ids, grads))
        return loss

    def apply(self) -> list:
        """Apply the last step's gradients: this trainer's rows and mapped shards' rows here, other nodes'
        rows pushed; returns the pushes' refs."""
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
        self.pending = []
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
                in_flight.append(self.apply())
                while len(in_flight) > self.staleness:
                    ray.get(in_flight.pop(0))
                step = ahead if self.prefetch else self._prepare()
        finally:
            # even when a peer died: no push of this epoch may land after the driver restores the shards
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
        self.pending = []

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


def _node_strategy(node_id: str) -> NodeAffinitySchedulingStrategy | PlacementGroupSchedulingStrategy:
    """On ``node_id``; inside a placement group (a Ray Tune trial's bundles) into that group instead, so a
    trial's trainers use the CPUs reserved for them rather than wait for CPUs the group holds."""
    group = ray.util.get_current_placement_group()
    if group is not None:
        return PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)
    return NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)


def kge_nodes(dist: DistConfig) -> list[str]:
    """The alive nodes trainers may go to (CPUs, and every resource of ``dist.resources_per_trainer``), sorted."""
    need = dist.resources_per_trainer
    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0
                   and all(n["Resources"].get(k, 0) >= v for k, v in need.items()))
    if not nodes:
        raise ValueError(f"no alive Ray node has CPUs and the resources {need} that kge_dist.resources_per_trainer asks "
                         f"for (start the KGE nodes with ray start --resources='{{\"kge\": 1}}' or similar)")
    return nodes


class ShardedKGE:
    """Driver-side handle: partitions the KG, starts shards and trainers, runs epochs, takes snapshots."""

    def __init__(self, triples: torch.Tensor, num_entities: int, num_relations: int, cfg: KGETrainConfig, dist: DistConfig):
        self.cfg, self.dist = cfg, dist
        self.num_entities, self.num_relations = num_entities, num_relations
        self.partitioning = partition(triples, num_entities, num_relations,
                                      PartitionConfig(num_parts=dist.num_parts, method=dist.partition, seed=cfg.seed))
        torch.manual_seed(cfg.seed)
        init = build_model(cfg.model, num_entities, num_relations)  # same initial tables as LocalTrainer
        nodes = kge_nodes(dist)
        self.node_of_part = [nodes[p % len(nodes)] for p in range(dist.num_parts)]
        self.entity_ids = [self.partitioning.entities_of(p) for p in range(dist.num_parts)]
        self.relation_shard = EmbeddingShard.options(scheduling_strategy=_node_strategy(nodes[0])).remote(
            torch.arange(num_relations), init.relation.detach(), cfg, "relation", dist)
        owner = self.partitioning.entity_part
        # keep the actors' constructor arguments referenced: a restarted actor is rebuilt from them
        self._init_args = [(ray.put(triples[self.partitioning.triples_of(p)]), ray.put(init.entity.detach()[ids]))
                           for p, ids in enumerate(self.entity_ids)]
        self.trainers = [
            KGETrainer.options(num_cpus=dist.cpus_per_trainer, resources=dict(dist.resources_per_trainer),
                               scheduling_strategy=_node_strategy(self.node_of_part[p])).remote(
                p, part_triples, num_entities, num_relations, owner, table, cfg, self.relation_shard, dist)
            for p, (part_triples, table) in enumerate(self._init_args)
        ]
        self.num_recoveries = 0
        self._connect()
        self.interaction = init.interaction
        self.snapshot_version = 0
        self.epoch = 0
        self.kg_version, self.num_triples = 0, len(triples)

    def add_triples(self, triples: torch.Tensor, weights: torch.Tensor | None = None,
                    relation_targets: torch.Tensor | None = None, *, kg_version: int) -> list[int]:
        """Train on ``triples`` (n, 3) too, from the next epoch on, as KG store version ``kg_version``.

        Same contract as :meth:`bikd.kge.training.LocalTrainer.add_triples` (weights (n,) default 1,
        relation_targets (n, R) for the KD term). Each triple goes to the trainer owning its HEAD (the
        partitioning stays as built: mining adds facts, not entities); every trainer records the version,
        also those that get no triple. Everything is checked before any trainer changes, so a ValueError
        (bad input, a version that does not increase) leaves the run as it was. Returns the trainers'
        triple counts."""
        checked = check_added_triples(triples, weights, relation_targets, self.num_entities, self.num_relations)
        if kg_version <= self.kg_version:
            raise ValueError(f"add_triples: kg_version must increase, got {kg_version} after {self.kg_version}")
        if any(ray.get([t.mid_epoch.remote() for t in self.trainers])):  # only after an interrupted epoch
            raise ValueError("add_triples between epochs only: a trainer is mid-epoch")
        triples, weights, targets = checked
        owner = self.partitioning.entity_part[triples[:, 0]]
        msgs = []
        for p in range(self.dist.num_parts):
            sel = (owner == p).nonzero().flatten()
            msgs.append(AddTriples(kg_version=kg_version, triples=array(triples[sel]), weights=array(weights[sel]),
                                   targets=None if targets is None else array(targets[sel])))
        counts = ray.get([t.add_triples.remote(m) for t, m in zip(self.trainers, msgs)])
        self.kg_version, self.num_triples = int(kg_version), sum(counts)
        return counts

    def trainer_triples(self) -> list[torch.Tensor]:
        """Every trainer's triples (n_p, 3), gold then added, in partition order (for inspection and tests)."""
        return [triples for _, triples in ray.get([t.get_triples.remote() for t in self.trainers])]

    def _actors(self) -> list:
        return [self.relation_shard, *self.trainers]

    def _connect(self) -> None:
        """Tell every trainer its peers and which shards it can map; then the shared files are unlinked (the
        memory stays while a process maps it), so a killed run leaves nothing behind in /dev/shm."""
        layouts = ray.get([a.share_rows.remote() for a in self._actors()])
        msg = Peers(version=self.num_recoveries, trainers=list(self.trainers), layouts=tuple(layouts[1:]),
                    relation_layout=layouts[0])
        ray.get([t.connect.remote(msg) for t in self.trainers])
        ray.get([a.release_file.remote() for a in self._actors()])
        self._incarnations = ray.get([a.incarnation.remote() for a in self._actors()])

    def _check_restarts(self) -> None:
        """Raise if an actor died and was restarted since the connection: same-node peers write its rows in
        shared memory, so its death can go unnoticed by the epoch (the relation shard gets no call at all)."""
        if ray.get([a.incarnation.remote() for a in self._actors()]) != self._incarnations:
            raise ActorRestarted("a shard actor was restarted during the epoch")

    def entity_shard(self, part: int):
        """The actor holding partition ``part``'s entity rows (its trainer)."""
        return self.trainers[part]

    def _capture(self) -> list[dict]:
        """Every actor's state, fetched to the driver: the restore point if an actor dies mid-epoch."""
        return ray.get([a.state_dict.remote() for a in self._actors()])

    def _restore_from(self, states: list[dict]) -> None:
        ray.get([a.load_state_dict.remote(s) for a, s in zip(self._actors(), states)])

    def train_epoch(self) -> dict:
        """One epoch over every partition. If an actor dies (node loss, OOM, a kill), Ray restarts it, every
        actor is reset to the state captured at the epoch's start and the epoch runs again, so no triple
        of the epoch is skipped or trained twice."""
        start = time.perf_counter()
        restore_point = self._capture()
        before = ray.get([t.counters.remote() for t in self.trainers])
        while True:
            try:
                losses = self._run_epoch()
                self._check_restarts()
                break
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ActorRestarted) as error:
                self.num_recoveries += 1
                if self.num_recoveries > self.dist.max_recoveries:
                    raise RuntimeError(f"gave up after {self.dist.max_recoveries} actor failures") from error
                self._wait_alive()
                self._connect()  # a restarted trainer was rebuilt from its constructor arguments alone
                self._restore_from(restore_point)
        self.epoch += 1
        seconds = time.perf_counter() - start
        after = ray.get([t.counters.remote() for t in self.trainers])
        steps, calls = (sum(a[i] - b[i] for a, b in zip(after, before)) for i in (0, 1))
        return {"loss": sum(losses) / max(len(losses), 1), "seconds": seconds, "triples_per_s": self.num_triples / seconds,
                "calls_per_step": calls / max(steps, 1)}  # actor calls per trainer step (approximate after a recovery)

    def _run_epoch(self) -> list[float]:
        if self.dist.mode == "sync":
            return self._sync_epoch()
        refs = [t.run_epoch.remote() for t in self.trainers]
        ray.wait(refs, num_returns=len(refs))  # every trainer has stopped before a failure is handled
        return [s["loss"] for s in ray.get(refs)]

    def _wait_alive(self, timeout_s: float = 120.0) -> None:
        """Block until every (restarted) actor answers again."""
        deadline = time.monotonic() + timeout_s
        for actor in self._actors():
            while True:
                try:
                    ray.get(actor.node_id.remote(), timeout=10)
                    break
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)

    def checkpoint(self, storage: Storage) -> str:
        """Write every shard (rows + optimiser state), the trainers' sampler positions and added triples, and
        the partitioning under ``storage/epoch-NNNNNN/``; the manifest (with the ``kg_version``) is written
        last, so a checkpoint exists iff its manifest does. Returns the checkpoint's name."""
        name = f"epoch-{self.epoch:06d}"
        # the actors write the data files themselves, so this is bikd.manifest's order by hand: a rewrite of
        # this name is invisible until its own manifest lands
        storage.delete(f"{name}/{CHECKPOINT_MANIFEST}")
        actors = self._actors()
        rels = [f"{name}/actor-{i:03d}.pt" for i in range(len(actors))]
        shas = ray.get([a.save.remote(storage, rel) for a, rel in zip(actors, rels)])
        shas.append(_save(storage, f"{name}/partition.pt", self.partitioning.state_dict()))
        manifest = {"epoch": self.epoch, "num_parts": self.dist.num_parts, "files": [*rels, f"{name}/partition.pt"],
                    "sha256": shas, "snapshot_version": self.snapshot_version, "kg_version": self.kg_version}
        storage.write_text(f"{name}/{CHECKPOINT_MANIFEST}", json.dumps(manifest, indent=1))
        return name

    @staticmethod
    def latest_checkpoint(storage: Storage) -> str | None:
        names = [n for n in storage.ls() if n.startswith("epoch-") and storage.exists(f"{n}/{CHECKPOINT_MANIFEST}")]
        return max(names) if names else None

    def restore(self, storage: Storage, name: str | None = None) -> int:
        """Load a checkpoint (the latest complete one by default) into every actor; returns its epoch.

        Triples: a checkpoint written after ``add_triples`` brings the added triples back (also into a fresh
        ShardedKGE). One from an OLDER KG version than this run's (taken before an addition) keeps this
        run's later triples, and training continues with them from the checkpoint's tables and epoch; a
        sharded checkpoint is always at an epoch boundary, where the batch order may grow."""
        name = name or self.latest_checkpoint(storage)
        if name is None:
            raise FileNotFoundError(f"no complete checkpoint under {storage.url}")
        manifest = json.loads(storage.read_text(f"{name}/{CHECKPOINT_MANIFEST}"))
        if manifest["num_parts"] != self.dist.num_parts:
            raise ValueError(f"{storage.url_of(name)} has {manifest['num_parts']} partitions, this run {self.dist.num_parts}")
        saved = Partitioning.from_state_dict(_load(storage, manifest["files"][-1], manifest["sha256"][-1]))
        if not torch.equal(saved.entity_part, self.partitioning.entity_part):
            raise ValueError(f"{storage.url_of(name)} was partitioned differently (other data, method or seed)")
        actors = self._actors()
        ray.get([a.restore.remote(storage, rel, sha) for a, rel, sha in zip(actors, manifest["files"], manifest["sha256"])])
        self.epoch, self.snapshot_version = int(manifest["epoch"]), int(manifest["snapshot_version"])
        self.kg_version = max(self.kg_version, int(manifest.get("kg_version", 0)))
        self.num_triples = sum(ray.get([t.num_triples.remote() for t in self.trainers]))
        return self.epoch

    def _sync_epoch(self) -> list[float]:
        ray.get([t.begin_epoch.remote() for t in self.trainers])
        active, losses = list(self.trainers), []
        while active:
            refs = [t.compute.remote() for t in active]  # all compute on the same state
            # all of them finish (or fail) before a failure is handled: a compute still running on a threaded
            # trainer would otherwise draw negatives and count a step after the driver restored it
            ray.wait(refs, num_returns=len(refs))
            results = ray.get(refs)
            active = [t for t, loss in zip(active, results) if loss is not None]
            losses += [loss for loss in results if loss is not None]
            for trainer in active:  # then the updates land, in trainer order
                ray.get(trainer.apply_sync.remote())
        return losses

    def snapshot(self) -> Snapshot:
        """A consistent copy of both tables, taken between epochs (no pushes in flight)."""
        entity = torch.empty(self.num_entities, *self.interaction_shape("entity"))
        for ids, rows in zip(self.entity_ids, ray.get([t.rows.remote() for t in self.trainers])):
            entity[ids] = tensor(rows.rows)
        relation = tensor(ray.get(self.relation_shard.rows.remote()).rows).clone()
        self.snapshot_version += 1
        return Snapshot(version=self.snapshot_version, entity=entity, relation=relation)

    def publish(self, storage: Storage | None = None, entity_labels=None, relation_labels=None) -> tuple[Snapshot, "ray.ObjectRef"]:
        """A new snapshot as an object ref (what the LM side pulls) and, with ``storage``, written as an
        export under ``snapshots/vNNNNNN/`` (complete iff its model.json exists)."""
        snapshot = self.snapshot()
        if storage is not None:
            entity_labels = entity_labels or [str(i) for i in range(self.num_entities)]
            relation_labels = relation_labels or [str(i) for i in range(self.num_relations)]
            export_embeddings(storage, snapshot.entity, snapshot.relation, entity_labels, relation_labels,
                              self.cfg.model, prefix=snapshot_prefix(snapshot.version),
                              extra={"version": snapshot.version, "epoch": self.epoch})  # KGTable.from_export's key
        return snapshot, ray.put(snapshot)

    def interaction_shape(self, kind: str) -> tuple[int]:
        factor = self.interaction.entity_factor if kind == "entity" else self.interaction.relation_factor
        return (self.cfg.model.dim * factor,)

    def model(self, snapshot: Snapshot | None = None) -> KGEModel:
        """A KGEModel over a snapshot's tables, for evaluation or export."""
        snapshot = snapshot or self.snapshot()
        model = build_model(self.cfg.model, self.num_entities, self.num_relations)
        model.load_state_dict({"entity": snapshot.entity, "relation": snapshot.relation})
        return model

    def trainer_nodes(self) -> list[str]:
        """The Ray node each partition's trainer runs on."""
        return ray.get([t.node_id.remote() for t in self.trainers])

    def shutdown(self) -> None:
        for actor in self._actors():
            ray.kill(actor)


class ShardedEpochs:
    """:class:`ShardedKGE` as a ``bikd.kge.loop.EpochTrainer``: a stop request waits for the running epoch
    (the trainers run it without the driver), the checkpoint is the sharded one."""

    unit = "the current epoch"
    mid_epoch = False

    def __init__(self, sharded: ShardedKGE):
        self.sharded = sharded

    def train_epoch(self, stop) -> dict:  # noqa: ARG002 - an epoch runs to its end
        return self.sharded.train_epoch()

    def model(self) -> KGEModel:
        return self.sharded.model(self.sharded.snapshot())

    def checkpoint(self, storage: Storage, epochs_done: int) -> str:
        assert self.sharded.epoch == epochs_done, (self.sharded.epoch, epochs_done)
        return self.sharded.checkpoint(storage)

    def restore(self, storage: Storage, name: str) -> None:
        """:meth:`ShardedKGE.restore`: triples added since the checkpoint (a later KG version) are kept."""
        self.sharded.restore(storage, name)

    def delete(self, storage: Storage, name: str) -> None:
        storage.delete(name, recursive=True)
