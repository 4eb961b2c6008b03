"""ShardedKGE.add_triples on real Ray actors (issue 12 item 4): routing by head, the sync equality with
LocalTrainer, reproducibility, and checkpoints taken before and after an addition."""

from __future__ import annotations

import pytest
import ray
import torch

from bikd.kge.losses import LossConfig, ReverseKDConfig
from bikd.kge.models import ModelConfig
from bikd.kge.sampling import NegativeSamplerConfig
from bikd.kge.training import LocalTrainer
from bikd.ray.kge import DistConfig
from bikd.ray.sharded import ShardedKGE
from bikd.storage import Storage
from kge_configs import cfg as base_cfg

NUM_ENTITIES, NUM_RELATIONS = 30, 4


def triples_of(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(NUM_ENTITIES, (n,), generator=g), torch.randint(NUM_RELATIONS, (n,), generator=g),
                        torch.randint(NUM_ENTITIES, (n,), generator=g)], 1)


GOLD = triples_of(150, 0)
ADDED = triples_of(40, 1)
WEIGHTS = torch.rand(40, generator=torch.Generator().manual_seed(2))
TARGETS = torch.softmax(2 * torch.randn(40, NUM_RELATIONS, generator=torch.Generator().manual_seed(3)), 1)


def cfg():
    return base_cfg(model=ModelConfig(name="distmult", dim=8), batch_size=32, loss=LossConfig(name="logistic"),
                    sampler=NegativeSamplerConfig(num_negatives=8, chunk_size=8, distribution="degree"),
                    reverse_kd=ReverseKDConfig(weight=0.5, temperature=2.0))


@pytest.mark.slow
def test_one_partition_sync_with_added_triples_equals_local_trainer(ray_local):
    local = LocalTrainer(GOLD, NUM_ENTITIES, NUM_RELATIONS, cfg())
    sharded = ShardedKGE(GOLD, NUM_ENTITIES, NUM_RELATIONS, cfg(), DistConfig(num_parts=1, mode="sync"))
    try:
        local.train_epoch(), sharded.train_epoch()
        local.add_triples(ADDED, WEIGHTS, TARGETS, kg_version=1)
        assert sharded.add_triples(ADDED, WEIGHTS, TARGETS, kg_version=1) == [190]
        local.train_epoch(), sharded.train_epoch()
        snap = sharded.snapshot()
        assert torch.equal(snap.entity, local.model.entity.detach())
        assert torch.equal(snap.relation, local.model.relation.detach())
    finally:
        sharded.shutdown()


@pytest.mark.slow
def test_two_partitions_route_by_head_reproduce_and_restore(ray_local, tmp_path):
    snaps = []
    for run in range(2):
        storage = Storage(str(tmp_path / f"run{run}"))
        sharded = ShardedKGE(GOLD, NUM_ENTITIES, NUM_RELATIONS, cfg(), DistConfig(num_parts=2, mode="sync"))
        try:
            sharded.train_epoch()
            before = sharded.checkpoint(storage)
            gold_parts = sharded.trainer_triples()
            with pytest.raises(ValueError, match=r"relation_targets must have shape \(40, 4\)"):
                sharded.add_triples(ADDED, WEIGHTS, TARGETS[:, :3], kg_version=1)
            assert [len(t) for t in sharded.trainer_triples()] == [len(t) for t in gold_parts]  # nothing changed
            counts = sharded.add_triples(ADDED, WEIGHTS, TARGETS, kg_version=1)
            owner = sharded.partitioning.entity_part
            parts = sharded.trainer_triples()
            for p, (gold, now) in enumerate(zip(gold_parts, parts)):
                assert torch.equal(now[:len(gold)], gold) and len(now) == counts[p]
                assert torch.equal(now[len(gold):], ADDED[owner[ADDED[:, 0]] == p])  # exactly its heads' triples
                assert (owner[now[:, 0]] == p).all()
            assert sum(len(now) - len(gold) for gold, now in zip(gold_parts, parts)) == len(ADDED)
            assert min(len(now) - len(gold) for gold, now in zip(gold_parts, parts)) > 0  # both partitions got some
            sharded.train_epoch()
            snaps.append(sharded.snapshot())
            after = sharded.checkpoint(storage)
            if run == 1:
                # a checkpoint from before the addition: the later triples stay, and the epoch replays exactly
                assert sharded.restore(storage, before) == 1 and sharded.kg_version == 1
                assert all(torch.equal(a, b) for a, b in zip(sharded.trainer_triples(), parts))
                sharded.train_epoch()
                replay = sharded.snapshot()
                assert torch.equal(replay.entity, snaps[1].entity) and torch.equal(replay.relation, snaps[1].relation)
                # a trainer interrupted mid-epoch: no addition anywhere
                ray.get(sharded.trainers[0].begin_epoch.remote())
                ray.get(sharded.trainers[0].compute.remote())
                with pytest.raises(ValueError, match="between epochs"):
                    sharded.add_triples(ADDED[:2], kg_version=2)
                assert sharded.kg_version == 1
        finally:
            sharded.shutdown()
    assert torch.equal(snaps[0].entity, snaps[1].entity) and torch.equal(snaps[0].relation, snaps[1].relation)

    # a checkpoint written after the addition, restored into a fresh run on the gold triples, brings them back
    fresh = ShardedKGE(GOLD, NUM_ENTITIES, NUM_RELATIONS, cfg(), DistConfig(num_parts=2, mode="sync"))
    try:
        assert fresh.restore(Storage(str(tmp_path / "run0")), after) == 2
        assert fresh.kg_version == 1 and fresh.num_triples == len(GOLD) + len(ADDED)
        assert all(torch.equal(a, b) for a, b in zip(fresh.trainer_triples(), parts))
        fresh_snap = fresh.snapshot()
        assert torch.equal(fresh_snap.entity, snaps[0].entity)
    finally:
        fresh.shutdown()
