"""The driver-side handle of sharded KG-embedding training (:mod:`bikd.ray.kge` has the actors and the design):
:class:`ShardedKGE` partitions the KG, places the shards and trainers, runs epochs (async or lock-step sync),
recovers from actor failures, checkpoints and publishes snapshots; :class:`ShardedEpochs` wraps it as a
``bikd.kge.loop.EpochTrainer``."""

from __future__ import annotations

import json
import time

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from bikd.kge.export import export_embeddings
from bikd.kge.models import KGEModel, build_model
from bikd.kge.partition import Partitioning, PartitionConfig, partition
from bikd.kge.training import KGETrainConfig, check_added_triples
from bikd.ray.kge import CHECKPOINT_MANIFEST, ActorRestarted, DistConfig, EmbeddingShard, KGETrainer, _load, _save
from bikd.ray.messages import AddTriples, NodeShards, Peers, Snapshot, array, snapshot_prefix, tensor
from bikd.ray.node_server import NodeServer
from bikd.storage import Storage



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
        self.servers: dict[str, tuple] = {}  # node id -> its NodeServers, once the shards span several nodes
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
        self._connect_servers(layouts)
        msg = Peers(version=self.num_recoveries, trainers=list(self.trainers), layouts=tuple(layouts[1:]),
                    relation_layout=layouts[0], servers=dict(self.servers))
        ray.get([t.connect.remote(msg) for t in self.trainers])
        ray.get([a.release_file.remote() for a in self._actors()])
        self._incarnations = ray.get([a.incarnation.remote() for a in self._watched()])

    def _connect_servers(self, layouts: list[tuple]) -> None:
        """With shards on more than one node, ``servers_per_node`` NodeServers per node map that node's shared
        shards (started once; after a recovery they map the new files)."""
        nodes = {node for node, _ in layouts}
        if self.dist.cross_node_rows != "server" or len(nodes) < 2:
            return
        for node in sorted(nodes - set(self.servers)):
            self.servers[node] = tuple(NodeServer.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False)).remote(self.cfg, self.num_relations)
                for _ in range(self.dist.servers_per_node))
        (rel_node, rel_layout), parts = layouts[0], layouts[1:]
        ray.get([server.connect.remote(NodeShards(
            version=self.num_recoveries,
            entity=tuple((p, array(self.entity_ids[p]), lay) for p, (n, lay) in enumerate(parts) if n == node and lay is not None),
            relation=rel_layout if rel_node == node else None)) for node, group in self.servers.items() for server in group])

    def _watched(self) -> list:
        """The actors whose restart loses rows or mappings: shards, trainers and node servers."""
        return [*self._actors(), *(server for group in self.servers.values() for server in group)]

    def _check_restarts(self) -> None:
        """Raise if an actor died and was restarted since the connection: same-node peers write its rows in
        shared memory, so its death can go unnoticed by the epoch (the relation shard gets no call at all)."""
        if ray.get([a.incarnation.remote() for a in self._watched()]) != self._incarnations:
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
        steps, calls = (sum(getattr(a - b, k) for a, b in zip(after, before)) for k in ("steps", "calls"))
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
        for actor in self._watched():
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
        for actor in self._watched():
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
