"""Placement of shards and trainers on several (simulated) nodes: ray.cluster_utils.Cluster."""

from __future__ import annotations

import os

import pytest
import torch

from bikd.kg.datasets import load_dataset
from bikd.eval import evaluate
from bikd.ray.kge import DistConfig
from bikd.ray.sharded import ShardedKGE
from kge_configs import cfg


@pytest.mark.slow
def test_each_partition_on_its_own_node():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    saved = os.environ.get("RAY_ADDRESS")
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        kg = load_dataset("nations")
        sharded = ShardedKGE(kg.train, kg.num_entities, kg.num_relations, cfg(), DistConfig(num_parts=2))
        try:
            trainer_nodes = ray.get([t.node_id.remote() for t in sharded.trainers])
            assert len(set(trainer_nodes)) == 2  # one partition (trainer + its entity rows) per node
            assert ray.get(sharded.relation_shard.node_id.remote()) in trainer_nodes
            # a node server on each node answers the other node's trainer: one call per step, a pull carrying an
            # earlier step's push (the other partition's rows and, for the trainer without it, the relations)
            assert sorted(ray.get([s.node_id.remote() for s, in sharded.servers.values()])) == sorted(trainer_nodes)
            before = evaluate(sharded.model(), kg.valid, [kg.all_triples()], kg.num_relations).mrr
            stats = [sharded.train_epoch() for _ in range(3)]
            # a server dies (node trouble): Ray restarts it, the epoch is rerun from its start, training goes on
            ray.kill(next(iter(sharded.servers.values()))[0], no_restart=False)
            stats.append(sharded.train_epoch())
            after = evaluate(sharded.model(), kg.valid, [kg.all_triples()], kg.num_relations).mrr
            assert 1 <= stats[2]["calls_per_step"] < 1.5, stats[2]  # (the rerun epoch counts the failed one's calls too)
            assert sharded.num_recoveries == 1
            assert stats[-1]["loss"] < stats[0]["loss"] and after > before + 0.1, (before, after)
        finally:
            sharded.shutdown()
        # sync mode: through the servers (one or two per node) or as calls to each partition's trainer, the
        # very same bits
        snaps, calls = [], []
        for rows, num_servers in (("server", 1), ("trainer", 1), ("server", 2)):
            sharded = ShardedKGE(kg.train, kg.num_entities, kg.num_relations, cfg(),
                                 DistConfig(num_parts=2, mode="sync", cross_node_rows=rows, servers_per_node=num_servers))
            try:
                assert all(len(group) == num_servers for group in sharded.servers.values())
                for _ in range(2):
                    stats = sharded.train_epoch()
                snaps.append(sharded.snapshot())
                calls.append(stats["calls_per_step"])
            finally:
                sharded.shutdown()
        for snap in snaps[1:]:
            assert torch.equal(snaps[0].entity, snap.entity) and torch.equal(snaps[0].relation, snap.relation)
        assert calls[0] == calls[2] <= 2 < calls[1] <= 4, calls
        # async, 2 steps per exchange (trainer 0 has 4 steps an epoch: 2 windows, both opened at the start, so the
        # first window's push goes alone): one pull and one push per window; the pushes land (the other node's
        # rows change though only this node's trainer trains) and training still learns
        sharded = ShardedKGE(kg.train, kg.num_entities, kg.num_relations, cfg(), DistConfig(num_parts=2, exchange_every=2))
        try:
            other = sharded.entity_ids[1]
            here = ray.get(sharded.trainers[0].node_id.remote())
            server, = next(group for node, group in sharded.servers.items() if node != here)
            before, counts = sharded.snapshot().entity[other], ray.get(sharded.trainers[0].counters.remote())
            served = ray.get(server.counters.remote())
            ray.get(sharded.trainers[0].run_epoch.remote())
            diff = ray.get(sharded.trainers[0].counters.remote()) - counts
            steps, calls = diff.steps, diff.calls
            changed = (sharded.snapshot().entity[other] != before).any(dim=1).float().mean().item()
            assert changed > 0.5 and steps >= 4 and calls <= steps, (changed, steps, calls)
            # what the bench's model is fitted to: the trainer's time in the exchange, what its node server served
            served = ray.get(server.counters.remote()) - served
            assert diff.exchange_s > 0 and diff.rows_pulled > 0, diff
            assert served.calls == calls and served.rows >= diff.rows_pulled and served.cpu_s > 0, (served, diff)
            stats = [sharded.train_epoch() for _ in range(3)]
            assert stats[-1]["loss"] < stats[0]["loss"], stats
        finally:
            sharded.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()
        if saved is None:  # ray.init(address=...) exported it; later local instances must not see it
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = saved
