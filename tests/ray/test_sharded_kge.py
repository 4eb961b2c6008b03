"""Sharded KG-embedding training on real Ray actors."""

from __future__ import annotations

import pytest
import torch

from bikd.eval import evaluate
from bikd.kg.datasets import load_dataset
from bikd.kge.training import LocalTrainer
from bikd.ray.kge import DistConfig
from bikd.ray.sharded import ShardedKGE
from kge_configs import cfg


@pytest.fixture(scope="module")
def nations():
    return load_dataset("nations")


@pytest.mark.slow
def test_one_partition_sync_equals_local_trainer(ray_local, nations):
    local = LocalTrainer(nations.train, nations.num_entities, nations.num_relations, cfg())
    sharded = ShardedKGE(nations.train, nations.num_entities, nations.num_relations, cfg(), DistConfig(num_parts=1, mode="sync"))
    try:
        for _ in range(2):
            local.train_epoch()
            sharded.train_epoch()
        snap = sharded.snapshot()
        assert torch.equal(snap.entity, local.model.entity.detach())
        assert torch.equal(snap.relation, local.model.relation.detach())
    finally:
        sharded.shutdown()


@pytest.mark.slow
def test_sync_mode_is_reproducible_and_learns(ray_local, nations):
    """Also: rows read and updated in shared memory (the default on one node) give the very same bits as rows
    pulled and pushed as actor calls, with no call at all."""
    snaps, mrrs, calls = [], [], []
    for rows in ("shared", "calls"):
        dist = DistConfig(num_parts=2, mode="sync", same_node_rows=rows)
        sharded = ShardedKGE(nations.train, nations.num_entities, nations.num_relations, cfg(), dist)
        try:
            before = evaluate(sharded.model(), nations.valid, [nations.all_triples()], nations.num_relations).mrr
            for _ in range(5):
                stats = sharded.train_epoch()
            calls.append(stats["calls_per_step"])
            snaps.append(sharded.snapshot())
            mrrs.append(evaluate(sharded.model(snaps[-1]), nations.valid, [nations.all_triples()], nations.num_relations).mrr)
        finally:
            sharded.shutdown()
    assert torch.equal(snaps[0].entity, snaps[1].entity) and torch.equal(snaps[0].relation, snaps[1].relation)
    assert mrrs[0] > before + 0.1, (before, mrrs)
    assert stats["triples_per_s"] > 0
    assert calls[0] == 0 and 2 <= calls[1] <= 4, calls  # relation pull + push, and the other partition's


@pytest.mark.slow
def test_async_mode_learns(ray_local, nations):
    sharded = ShardedKGE(nations.train, nations.num_entities, nations.num_relations, cfg(), DistConfig(num_parts=2, staleness=2))
    try:
        before = evaluate(sharded.model(), nations.valid, [nations.all_triples()], nations.num_relations).mrr
        losses = [sharded.train_epoch()["loss"] for _ in range(5)]
        after = evaluate(sharded.model(), nations.valid, [nations.all_triples()], nations.num_relations).mrr
    finally:
        sharded.shutdown()
    assert losses[-1] < losses[0]
    assert after > before + 0.1, (before, after)


@pytest.mark.slow
def test_publish_snapshot_as_ref_and_files(ray_local, nations, tmp_path):
    import ray

    from bikd.kge.export import load_embeddings
    from bikd.storage import Storage

    storage = Storage(str(tmp_path / "run"))
    sharded = ShardedKGE(nations.train, nations.num_entities, nations.num_relations, cfg(), DistConfig(num_parts=2))
    try:
        sharded.train_epoch()
        snap, ref = sharded.publish(storage, nations.entities.labels, nations.relations.labels)
        sharded.train_epoch()
        later, _ = sharded.publish(storage, nations.entities.labels, nations.relations.labels)
    finally:
        sharded.shutdown()
    assert (snap.version, later.version) == (1, 2)
    assert torch.equal(ray.get(ref).entity, snap.entity)
    entity, relation, entity_labels, _, meta = load_embeddings(storage, "snapshots/v000001")
    assert torch.equal(torch.from_numpy(entity), snap.entity) and torch.equal(torch.from_numpy(relation), snap.relation)
    assert entity_labels == list(nations.entities.labels) and meta["extra"]["version"] == 1
    assert not torch.equal(later.entity, snap.entity)  # the stored v1 stays as it was

    # what the LM side does with a published snapshot: load it and swap it in; its version must survive
    # (the export once recorded "snapshot_version" while KGTable read "version": every snapshot loaded as 0)
    from bikd.lm.encoder import EncoderConfig
    from bikd.lm.fusion import FusionConfig
    from bikd.lm.kd import KDConfig
    from bikd.lm.kg_teacher import KGTable
    from bikd.lm.model import LMConfig
    from bikd.lm.train import build_lm

    first, second = KGTable.from_export(storage, "snapshots/v000001"), KGTable.from_export(storage, "snapshots/v000002")
    assert (first.version, second.version) == (1, 2)
    lm, _ = build_lm(LMConfig(task="triple_cls", encoder=EncoderConfig(name_or_path="tiny"), fusion=FusionConfig(layers=(1,)),
                              kd=KDConfig(num_sampled_candidates=8)), first)
    assert lm.table_version == 1
    lm.set_kg_table(second)
    assert lm.table_version == 2 and torch.equal(lm.table.entity, later.entity)
