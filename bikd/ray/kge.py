"""Sharded KG-embedding training on Ray actors, DGL-KE style.

- ``EmbeddingShard`` actors own the entity rows of one METIS partition (one more owns the relations) with
  their sparse optimiser state, and answer ``pull``/``push`` messages (DGL-KE's KVStore).
- One ``KGETrainer`` actor per partition draws local mini-batches and joint negatives, pulls the rows it
  needs (one call per shard per step), computes gradients with the pure-torch step, and pushes them.
- Each trainer is placed on its shard's node (node-affinity scheduling), so the partition-local rows METIS
  keeps together are pulled through the node's object store rather than over the network.

Modes: ``async`` (default) lets every trainer run its epoch freely with at most ``staleness`` pushes in
flight; ``sync`` runs lock-step rounds driven by the driver (every trainer pulls the same state, then the
pushes are applied in trainer order), which makes runs bit-for-bit reproducible.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass
from typing import Literal

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from bikd.kge.export import export_embeddings
from bikd.kge.models import KGEModel, build_interaction, build_model
from bikd.kge.partition import PartitionConfig, Partitioning, partition
from bikd.kge.sampling import BatchIterator, NegativeSampler, degrees_from_triples
from bikd.kge.shard import ShardState
from bikd.kge.training import KGETrainConfig, plan_step, step_gradients
from bikd.ray.messages import PullRequest, PushGrads, Rows, Snapshot
from bikd.storage import Storage


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

    def __post_init__(self):
        if self.num_parts < 1:
            raise ValueError(f"dist.num_parts must be >= 1, got {self.num_parts}")
        if self.mode not in ("async", "sync"):
            raise ValueError(f"dist.mode must be 'async' or 'sync', got {self.mode!r}")
        if self.staleness < 0:
            raise ValueError(f"dist.staleness must be >= 0, got {self.staleness}")
        if not self.cpus_per_trainer >= 0:
            raise ValueError(f"dist.cpus_per_trainer must be >= 0, got {self.cpus_per_trainer}")


@ray.remote(num_cpus=0, max_restarts=-1)
class EmbeddingShard:
    """Thin actor around :class:`ShardState`: each method unpacks a message and calls it."""

    def __init__(self, ids: torch.Tensor, table: torch.Tensor, cfg: KGETrainConfig, kind: str):
        self.state = ShardState(ids, table, cfg.optimizer, build_interaction(cfg.model), kind)

    def pull(self, msg: PullRequest) -> Rows:
        return Rows(version=self.state.version, rows=self.state.pull(msg.ids))

    def push(self, msg: PushGrads) -> int:
        return self.state.push(msg.ids, msg.grads)

    def rows(self) -> Rows:
        return Rows(version=self.state.version, rows=self.state.table.clone())

    def state_dict(self) -> dict:
        return self.state.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.state.load_state_dict(state)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def save(self, storage: Storage, rel: str) -> str:
        """Write this shard's state (rows, optimiser state, version) to ``storage``; returns its sha256."""
        return _save(storage, rel, self.state.state_dict())

    def restore(self, storage: Storage, rel: str, sha256: str) -> None:
        self.state.load_state_dict(_load(storage, rel, sha256))


@ray.remote(max_restarts=-1)
class KGETrainer:
    """Trains on one partition's triples against the shards; see the module docstring."""

    def __init__(self, part: int, triples: torch.Tensor, num_entities: int, entity_owner: torch.Tensor,
                 cfg: KGETrainConfig, shards: list, relation_shard, staleness: int):
        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        self.part, self.triples, self.cfg = part, triples, cfg
        self.owner, self.shards, self.relation_shard, self.staleness = entity_owner, shards, relation_shard, staleness
        self.interaction = build_interaction(cfg.model)
        seed = cfg.seed + 7919 * part  # partition 0 draws exactly what LocalTrainer draws
        self.generator = torch.Generator().manual_seed(seed)
        degrees = degrees_from_triples(triples, num_entities) if cfg.sampler.distribution == "degree" else None
        self.sampler = NegativeSampler(cfg.sampler, num_entities, degrees)
        self.batches = BatchIterator(len(triples), cfg.batch_size, seed)
        self.step_count, self.target_epoch = 0, 0

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def begin_epoch(self) -> int:
        self.target_epoch = self.batches.epoch
        return len(self.triples)

    def _pull(self, ids: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        """Rows of ``ids`` from their owning shards: one call per shard, results put back in ids' order."""
        groups = [(s, (owner == s).nonzero().flatten()) for s in owner.unique().tolist()]
        refs = [self.shards[s].pull.remote(PullRequest(version=self.step_count, ids=ids[pos])) for s, pos in groups]
        rows = None
        for (s, pos), got in zip(groups, ray.get(refs)):
            if rows is None:
                rows = torch.empty(len(ids), got.rows.shape[1], dtype=got.rows.dtype)
            rows[pos] = got.rows
        return rows

    def compute(self) -> tuple[float, int, list] | None:
        """One step up to the gradients: (loss, batch size, [(target, PushGrads)]); None once the epoch is done."""
        if self.batches.epoch != self.target_epoch:
            return None
        batch = self.triples[self.batches.next_batch()]
        neg = self.sampler.sample_batch(len(batch), self.generator)
        plan = plan_step(batch, neg)
        owner = self.owner[plan.entity_ids]
        rel_rows = self.relation_shard.pull.remote(PullRequest(version=self.step_count, ids=plan.relation_ids))
        ent_rows = self._pull(plan.entity_ids, owner)
        loss, ent_grad, rel_grad = step_gradients(self.interaction, plan, neg, ent_rows, ray.get(rel_rows).rows,
                                                  self.cfg.loss, self.cfg.regularizer)
        self.step_count += 1
        pushes = [(self.relation_shard, PushGrads(step=self.step_count, source=self.part, ids=plan.relation_ids, grads=rel_grad))]
        for s in owner.unique().tolist():
            pos = (owner == s).nonzero().flatten()
            pushes.append((self.shards[s], PushGrads(step=self.step_count, source=self.part,
                                                     ids=plan.entity_ids[pos], grads=ent_grad[pos])))
        return loss, len(batch), pushes

    def run_epoch(self) -> dict:
        """Async mode: the whole local epoch with at most ``staleness`` steps' pushes in flight."""
        self.begin_epoch()
        start, losses, pending = time.perf_counter(), [], []
        try:
            while (result := self.compute()) is not None:
                loss, _, pushes = result
                losses.append(loss)
                pending.append([target.push.remote(msg) for target, msg in pushes])
                while len(pending) > self.staleness:
                    ray.get(pending.pop(0))
        finally:
            # even when a shard died: no push of this epoch may land after the driver restores the shards
            ray.wait([ref for refs in pending for ref in refs], num_returns=sum(map(len, pending)))
        for refs in pending:
            ray.get(refs)
        return {"part": self.part, "loss": sum(losses) / max(len(losses), 1), "steps": len(losses),
                "triples": len(self.triples), "seconds": time.perf_counter() - start}

    def state_dict(self) -> dict:
        return {"batches": self.batches.state_dict(), "generator": self.generator.get_state(), "step": self.step_count,
                "target_epoch": self.target_epoch}

    def save(self, storage: Storage, rel: str) -> str:
        return _save(storage, rel, self.state_dict())

    def restore(self, storage: Storage, rel: str, sha256: str) -> None:
        self.load_state_dict(_load(storage, rel, sha256))

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state["batches"])
        self.generator.set_state(state["generator"])
        self.step_count = int(state["step"])
        self.target_epoch = int(state["target_epoch"])


def _save(storage: Storage, rel: str, state: dict) -> str:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    storage.write_bytes(rel, data)
    return hashlib.sha256(data).hexdigest()


def _load(storage: Storage, rel: str, sha256: str) -> dict:
    data = storage.read_bytes(rel)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise IOError(f"{storage.url_of(rel)}: checksum mismatch; the checkpoint file is corrupted")
    return torch.load(io.BytesIO(data), weights_only=True)


def _node_strategy(node_id: str) -> NodeAffinitySchedulingStrategy:
    return NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)


class ShardedKGE:
    """Driver-side handle: partitions the KG, starts shards and trainers, runs epochs, takes snapshots."""

    def __init__(self, triples: torch.Tensor, num_entities: int, num_relations: int, cfg: KGETrainConfig, dist: DistConfig):
        self.cfg, self.dist = cfg, dist
        self.num_entities, self.num_relations = num_entities, num_relations
        self.partitioning = partition(triples, num_entities, num_relations,
                                      PartitionConfig(num_parts=dist.num_parts, method=dist.partition, seed=cfg.seed))
        torch.manual_seed(cfg.seed)
        init = build_model(cfg.model, num_entities, num_relations)  # same initial tables as LocalTrainer
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0)
        self.node_of_part = [nodes[p % len(nodes)] for p in range(dist.num_parts)]
        self.entity_ids = [self.partitioning.entities_of(p) for p in range(dist.num_parts)]
        self.shards = [
            EmbeddingShard.options(scheduling_strategy=_node_strategy(self.node_of_part[p])).remote(
                ids, init.entity.detach()[ids], cfg, "entity")
            for p, ids in enumerate(self.entity_ids)
        ]
        self.relation_shard = EmbeddingShard.options(scheduling_strategy=_node_strategy(nodes[0])).remote(
            torch.arange(num_relations), init.relation.detach(), cfg, "relation")
        owner = self.partitioning.entity_part
        # keep the actors' constructor arguments referenced: a restarted actor is rebuilt from them
        self._init_args = [ray.put(triples[self.partitioning.triples_of(p)]) for p in range(dist.num_parts)]
        self.trainers = [
            KGETrainer.options(num_cpus=dist.cpus_per_trainer, scheduling_strategy=_node_strategy(self.node_of_part[p])).remote(
                p, self._init_args[p], num_entities, owner, cfg, self.shards, self.relation_shard,
                dist.staleness)
            for p in range(dist.num_parts)
        ]
        self.interaction = init.interaction
        self.snapshot_version = 0
        self.epoch = 0
        self.num_recoveries = 0

    def _actors(self) -> list:
        return [*self.shards, self.relation_shard, *self.trainers]

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
        while True:
            try:
                losses = self._run_epoch()
                break
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as error:
                self.num_recoveries += 1
                if self.num_recoveries > self.dist.max_recoveries:
                    raise RuntimeError(f"gave up after {self.dist.max_recoveries} actor failures") from error
                self._wait_alive()
                self._restore_from(restore_point)
        self.epoch += 1
        seconds = time.perf_counter() - start
        num_triples = sum(len(self.partitioning.triples_of(p)) for p in range(self.dist.num_parts))
        return {"loss": sum(losses) / max(len(losses), 1), "seconds": seconds, "triples_per_s": num_triples / seconds}

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
        """Write every shard (rows + optimiser state), the trainers' sampler positions and the partitioning
        under ``storage/epoch-NNNNNN/``; the manifest is written last, so a checkpoint exists iff its
        manifest does. Returns the checkpoint's name."""
        name = f"epoch-{self.epoch:06d}"
        actors = self._actors()
        rels = [f"{name}/actor-{i:03d}.pt" for i in range(len(actors))]
        shas = ray.get([a.save.remote(storage, rel) for a, rel in zip(actors, rels)])
        shas.append(_save(storage, f"{name}/partition.pt", self.partitioning.state_dict()))
        manifest = {"epoch": self.epoch, "num_parts": self.dist.num_parts, "files": [*rels, f"{name}/partition.pt"],
                    "sha256": shas, "snapshot_version": self.snapshot_version}
        storage.write_text(f"{name}/MANIFEST.json", json.dumps(manifest, indent=1))
        return name

    @staticmethod
    def latest_checkpoint(storage: Storage) -> str | None:
        names = [n for n in storage.ls() if n.startswith("epoch-") and storage.exists(f"{n}/MANIFEST.json")]
        return max(names) if names else None

    def restore(self, storage: Storage, name: str | None = None) -> int:
        """Load a checkpoint (the latest complete one by default) into every actor; returns its epoch."""
        name = name or self.latest_checkpoint(storage)
        if name is None:
            raise FileNotFoundError(f"no complete checkpoint under {storage.url}")
        manifest = json.loads(storage.read_text(f"{name}/MANIFEST.json"))
        if manifest["num_parts"] != self.dist.num_parts:
            raise ValueError(f"{storage.url_of(name)} has {manifest['num_parts']} partitions, this run {self.dist.num_parts}")
        saved = Partitioning.from_state_dict(_load(storage, manifest["files"][-1], manifest["sha256"][-1]))
        if not torch.equal(saved.entity_part, self.partitioning.entity_part):
            raise ValueError(f"{storage.url_of(name)} was partitioned differently (other data, method or seed)")
        actors = self._actors()
        ray.get([a.restore.remote(storage, rel, sha) for a, rel, sha in zip(actors, manifest["files"], manifest["sha256"])])
        self.epoch, self.snapshot_version = int(manifest["epoch"]), int(manifest["snapshot_version"])
        return self.epoch

    def _sync_epoch(self) -> list[float]:
        ray.get([t.begin_epoch.remote() for t in self.trainers])
        active, losses = list(self.trainers), []
        while active:
            results = ray.get([t.compute.remote() for t in active])  # all pull the same state
            active = [t for t, r in zip(active, results) if r is not None]
            for loss, _, pushes in (r for r in results if r is not None):  # applied in trainer order
                losses.append(loss)
                for target, msg in pushes:
                    ray.get(target.push.remote(msg))
        return losses

    def snapshot(self) -> Snapshot:
        """A consistent copy of both tables, taken between epochs (no pushes in flight)."""
        entity = torch.empty(self.num_entities, *self.interaction_shape("entity"))
        for ids, rows in zip(self.entity_ids, ray.get([s.rows.remote() for s in self.shards])):
            entity[ids] = rows.rows
        relation = ray.get(self.relation_shard.rows.remote()).rows
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
                              self.cfg.model, prefix=f"snapshots/v{snapshot.version:06d}",
                              extra={"snapshot_version": snapshot.version, "epoch": self.epoch})
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

    def shutdown(self) -> None:
        for actor in [*self.trainers, *self.shards, self.relation_shard]:
            ray.kill(actor)
