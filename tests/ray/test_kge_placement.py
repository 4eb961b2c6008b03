"""Placement of shards and trainers on several (simulated) nodes: ray.cluster_utils.Cluster."""

from __future__ import annotations

import os

import pytest

from bikd.kg.datasets import load_dataset
from bikd.ray.kge import DistConfig, ShardedKGE
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
            assert sharded.train_epoch()["loss"] > 0
        finally:
            sharded.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()
        if saved is None:  # ray.init(address=...) exported it; later local instances must not see it
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = saved
