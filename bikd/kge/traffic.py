"""What a sharded KGE step exchanges, counted without running it (docs/SCALING.md, bench/kge_scaling.py).

Each partition's trainer (``bikd.ray.kge.KGETrainer``) draws its batch and negatives, plans the rows with
:func:`~bikd.kge.training.plan_step`, pulls the rows owned by other partitions (one call per remote
partition) and the batch's relation rows (one call to the relation shard), and after the step pushes the
gradients of the same rows back (one call each). This module replays that with the trainer's own batch
iterator, sampler and planner, so the counts are those of the real step, not of a model of it.

With ``parts_per_node`` > 1 the partitions sit ``parts_per_node`` to a node (partition p on node
p // parts_per_node, the relation shard on node 0): rows of partitions on the trainer's own node are read in
shared memory and count as local, and ``server_calls_per_step`` counts the node-server path
(``DistConfig.cross_node_rows="server"``) as async mode with prefetch (the defaults) calls it, in windows of
``exchange_every`` steps (bikd/ray/node_exchange.py): one pull per other node the window touches, carrying the
push of an earlier window to that node (two windows before with one step a window: its pull is sent while
that step computes; three with more, since a window's pull is sent as the window before it starts), and a
push of its own to each node that earlier window touched and this one does not (the pushes of an epoch's last
windows, sent alone at its end, are not counted); ``server_rows_per_step`` the rows those pulls carry (a
window's union, relation rows included where the relation shard is on another node).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bikd.kge.partition import Partitioning
from bikd.kge.sampling import BatchIterator, NegativeSampler
from bikd.kge.training import KGETrainConfig, plan_step

__all__ = ["StepTraffic", "count_step_traffic"]

FLOAT_BYTES = 4


@dataclass(frozen=True)
class StepTraffic:
    """Per trainer step, averaged over the trainers' first steps. Rows are entity rows unless named;
    ``calls_per_step`` counts actor calls (pulls and pushes), ``bytes_per_step`` what they carry (float32
    rows pulled plus gradients pushed, relations included, ids and message overhead not)."""

    num_parts: int
    local_rows_per_step: float
    remote_rows_per_step: float
    relation_rows_per_step: float
    remote_parts_per_step: float
    calls_per_step: float
    bytes_per_step: float
    parts_per_node: int = 1
    remote_nodes_per_step: float = 0.0
    server_calls_per_step: float = 0.0
    server_rows_per_step: float = 0.0
    exchange_every: int = 1

    @property
    def server_calls_per_step_unpaired(self) -> float:
        """The node-server calls, were every push sent alone (as in sync mode): one pull and one push per other node."""
        return 2 * self.remote_nodes_per_step


def count_step_traffic(partitioning: Partitioning, num_entities: int, cfg: KGETrainConfig, *, entity_width: int,
                       relation_width: int, negatives: str = "global", num_steps: int = 20,
                       parts_per_node: int = 1, exchange_every: int = 1) -> StepTraffic:
    """Over the training triples ``partitioning`` was made from (it keeps them); ``entity_width`` /
    ``relation_width`` the floats per row (e.g. 2 x dim for ComplEx's entities); ``negatives`` as
    ``DistConfig.negatives`` ("local": drawn from the trainer's own entities, so they never travel)."""
    assert negatives in ("global", "local"), negatives
    owner = partitioning.entity_part
    node_of = owner // parts_per_node
    local = remote = rel = parts = calls = nbytes = nodes = server_calls = server_rows = 0.0
    lag = 2 if exchange_every == 1 else 3  # windows between a window and the pull its push rides on
    count = 0
    for p in range(partitioning.num_parts):
        mine = partitioning.triples[partitioning.triples_of(p)]
        if not len(mine):
            continue
        ids = partitioning.entities_of(p)
        sampler = NegativeSampler(cfg.sampler, num_entities if negatives == "global" else len(ids))
        seed = cfg.seed + 7919 * p  # as KGETrainer seeds partition p's negatives and batch order
        generator = torch.Generator().manual_seed(seed)
        batches = BatchIterator(len(mine), cfg.batch_size, seed)
        served: list[tuple] = []  # per step: (other nodes, their entity ids, relation ids if they travel)
        for _ in range(num_steps):
            batch = mine[batches.next_batch()]
            neg = sampler.sample_batch(len(batch), generator)
            if negatives == "local":
                neg = neg._replace(negatives=ids[neg.negatives])
            plan = plan_step(batch, neg)
            where, node = owner[plan.entity_ids], p // parts_per_node
            elsewhere = node_of[plan.entity_ids] != node
            n_remote = int(elsewhere.sum())
            n_parts = len(set(where[elsewhere].tolist()))
            other_nodes = set(node_of[plan.entity_ids][elsewhere].tolist()) | ({0} if node != 0 else set())
            nodes += len(other_nodes)
            travel = plan.relation_ids if node != 0 else plan.relation_ids[:0]
            served.append((other_nodes, plan.entity_ids[elsewhere], travel))
            local += len(plan.entity_ids) - n_remote
            remote += n_remote
            rel += len(plan.relation_ids)
            parts += n_parts
            calls += 2 + 2 * n_parts  # relation pull + push, and a pull + push per remote partition
            nbytes += 2 * FLOAT_BYTES * (n_remote * entity_width + len(plan.relation_ids) * relation_width)
            count += 1
        touched: list[set] = []  # the other nodes of this trainer's windows so far
        for w in range(0, len(served), exchange_every):
            window = served[w:w + exchange_every]
            other_nodes = set().union(*(n for n, _, _ in window))
            waiting = touched[-lag] if len(touched) >= lag else set()  # pushes of an earlier window
            server_calls += len(other_nodes) + len(waiting - other_nodes)
            touched.append(other_nodes)
            server_rows += sum(len(torch.cat([x[i] for x in window]).unique()) for i in (1, 2))
    assert count, "no partition has triples"
    return StepTraffic(num_parts=partitioning.num_parts, local_rows_per_step=local / count,
                       remote_rows_per_step=remote / count, relation_rows_per_step=rel / count,
                       remote_parts_per_step=parts / count, calls_per_step=calls / count, bytes_per_step=nbytes / count,
                       parts_per_node=parts_per_node, remote_nodes_per_step=nodes / count,
                       server_calls_per_step=server_calls / count,
                       server_rows_per_step=server_rows / count, exchange_every=exchange_every)
