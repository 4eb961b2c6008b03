"""Placement of shards and trainers on several (simulated) nodes: ray.cluster_utils.Cluster."""

from __future__ import annotations

import os

import pytest

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
            # across nodes the rows travel as calls (one pull and one push each for the other partition and, for
            # the trainer without it, the relation shard), prefetched a step ahead; training still learns
            before = evaluate(sharded.model(), kg.valid, [kg.all_triples()], kg.num_relations).mrr
            stats = [sharded.train_epoch() for _ in range(4)]
            after = evaluate(sharded.model(), kg.valid, [kg.all_triples()], kg.num_relations).mrr
            assert 1 <= stats[-1]["calls_per_step"] <= 4, stats[-1]
            assert stats[-1]["loss"] < stats[0]["loss"] and after > before + 0.1, (before, after)
        finally:
            sharded.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()
        if saved is None:  # ray.init(address=...) exported it; later local instances must not see it
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = saved
