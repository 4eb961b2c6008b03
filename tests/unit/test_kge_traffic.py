"""bikd.kge.traffic: the rows and calls of a sharded step, replayed with the trainer's own batches and sampler."""

from __future__ import annotations

import pytest

from bikd.kg.datasets import load_dataset
from bikd.kge.partition import PartitionConfig, partition
from bikd.kge.sampling import NegativeSamplerConfig
from bikd.kge.traffic import count_step_traffic
from bikd.kge.training import KGETrainConfig


@pytest.fixture(scope="module")
def kg():
    return load_dataset("umls")


def traffic(kg, num_parts: int, negatives: str = "global", parts_per_node: int = 1, exchange_every: int = 1, num_steps: int = 5):
    parts = partition(kg.train, kg.num_entities, kg.num_relations, PartitionConfig(num_parts=num_parts, method="metis"))
    cfg = KGETrainConfig(batch_size=64, sampler=NegativeSamplerConfig(num_negatives=32, chunk_size=16))
    return count_step_traffic(parts, kg.num_entities, cfg, entity_width=8, relation_width=8, negatives=negatives,
                              num_steps=num_steps, parts_per_node=parts_per_node, exchange_every=exchange_every)


def test_one_partition_exchanges_only_relations(kg):
    one = traffic(kg, 1)
    assert one.remote_rows_per_step == 0 and one.remote_parts_per_step == 0 and one.calls_per_step == 2
    assert one.bytes_per_step == 2 * 4 * 8 * one.relation_rows_per_step  # relation rows pulled, gradients pushed
    assert one.local_rows_per_step > 64  # a batch's heads, tails and shared negatives, deduplicated


def test_more_partitions_pull_more_rows_and_local_negatives_pull_fewer(kg):
    two, four = traffic(kg, 2), traffic(kg, 4)
    assert 0 < two.remote_rows_per_step < four.remote_rows_per_step
    assert two.calls_per_step == 4 and 4 < four.calls_per_step <= 8  # 2 + a pull and a push per remote partition
    local = traffic(kg, 4, negatives="local")
    assert local.remote_rows_per_step < four.remote_rows_per_step
    assert local.remote_rows_per_step <= 64  # only the tails of cut edges travel: at most one per positive


def test_node_servers_take_one_call_per_other_node(kg):
    """4 partitions, 2 to a node: rows of the node's other partition are local (shared memory), and a step
    calls each other node's server once whatever the partitions there (relations ride along, and the push of
    the step two before rides on the pull)."""
    apart, paired = traffic(kg, 4), traffic(kg, 4, parts_per_node=2)
    assert paired.remote_rows_per_step < apart.remote_rows_per_step
    assert paired.local_rows_per_step + paired.remote_rows_per_step == apart.local_rows_per_step + apart.remote_rows_per_step
    assert paired.remote_nodes_per_step <= 1 and paired.server_calls_per_step_unpaired == 2 * paired.remote_nodes_per_step
    # a push alone only where the step two before touched a node this one does not
    assert paired.remote_nodes_per_step <= paired.server_calls_per_step < 1.5 * paired.remote_nodes_per_step
    # one node per partition: the relations ride along with node 0's rows instead of 2 calls of their own
    assert 2 <= apart.server_calls_per_step_unpaired <= 6 and apart.server_calls_per_step_unpaired < apart.calls_per_step
    assert apart.remote_nodes_per_step <= apart.server_calls_per_step < apart.server_calls_per_step_unpaired


def test_windows_of_steps_cut_calls_and_share_rows(kg):
    """exchange_every=4: one call per other node per window of 4 steps, for the union of the window's rows."""
    one, four = traffic(kg, 4, num_steps=16), traffic(kg, 4, num_steps=16, exchange_every=4)
    assert one.remote_rows_per_step == four.remote_rows_per_step  # the same steps
    # a step's ids are unique: without windows the pulls carry the step's remote rows and travelling relations
    assert one.remote_rows_per_step <= one.server_rows_per_step <= one.remote_rows_per_step + one.relation_rows_per_step
    assert one.server_rows_per_step / 4 <= four.server_rows_per_step < one.server_rows_per_step  # rows repeat in a window
    assert four.server_calls_per_step <= one.server_calls_per_step / 4 + 0.5
