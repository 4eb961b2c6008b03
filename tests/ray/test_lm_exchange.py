"""KG -> LM, live: the LM job (2 Ray Train workers, DeepSpeed ZeRO-2, tiny BERT on UMLS) polls a named
Exchange actor while the test publishes newer KG snapshots; the table version in use advances mid-run, every
rank swaps at the same step, and after a worker crash the resumed workers fuse the version their checkpoint
fused (read back from the snapshot exports once the actor no longer holds it)."""

from __future__ import annotations

import threading
import time

import pytest
import ray
import torch

from bikd.config import apply_overrides, from_dict
from bikd.kg.datasets import load_dataset
from bikd.kge.export import export_embeddings
from bikd.kge.models import ModelConfig
from bikd.lm.train import load_fused
from bikd.ray.exchange import ExchangeConfig, TableOffer, exchange_actor
from bikd.ray.lm_train import LMJobConfig, run
from bikd.ray.messages import Snapshot, snapshot_prefix
from bikd.storage import Storage

pytestmark = pytest.mark.slow

BASE = {
    "encoder": {"name_or_path": "tiny", "attn_implementation": "eager"},
    "fusion": {"layers": [0]},
    "kd": {"num_sampled_candidates": 8},
    "kg": {"train": {"epochs": 1, "batch_size": 1024, "model": {"name": "distmult", "dim": 8}}},
    "task": {"max_train": 24, "max_eval": 8, "link": True, "triple_cls": {"max_length": 24}},
    "train": {"batch_size": 2, "eval_batch_size": 16, "checkpoint_every": 2, "log_every": 1, "lr": 1e-3, "steps": 10},
    "num_workers": 2, "cpus_per_worker": 1.0, "name": "run",
}


class Publisher(threading.Thread):
    """The KGE side's part, played by the test: publishes version v + 1 once the LM has polled version v (so
    the LM sees every version, in order), each as an object and as an export under ``snapshots/``."""

    def __init__(self, actor, storage: Storage, num_entities: int, num_relations: int, labels):
        super().__init__(daemon=True)
        self.actor, self.storage, self.shape = actor, storage, (num_entities, num_relations)
        self.labels, self.version, self.stop = labels, 0, threading.Event()
        self.error: BaseException | None = None

    def publish(self) -> None:
        self.version += 1
        g = torch.Generator().manual_seed(self.version)
        snap = Snapshot(version=self.version, entity=torch.randn(self.shape[0], 8, generator=g),
                        relation=torch.randn(self.shape[1], 8, generator=g))
        export_embeddings(self.storage, snap.entity, snap.relation, *self.labels, ModelConfig(name="distmult", dim=8),
                          prefix=snapshot_prefix(snap.version), extra={"version": snap.version})
        ray.get(self.actor.offer_table.remote(TableOffer(version=snap.version, refs=(ray.put(snap),))))

    def run(self) -> None:
        try:
            self.publish()
            while not self.stop.is_set():
                if ray.get(self.actor.stats.remote())["last_polled"] == self.version:
                    self.publish()
                time.sleep(0.05)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e


def test_table_version_advances_mid_run_and_survives_a_worker_restart(ray_local, tmp_path):
    umls = load_dataset("umls")
    exchange = ExchangeConfig(actor="test-exchange", namespace="bikd-test", snapshots=str(tmp_path / "kge"),
                              lm_poll_steps=1, keep_tables=1)
    actor = exchange_actor(exchange, create=True)
    publisher = Publisher(actor, Storage(exchange.snapshots), umls.num_entities, umls.num_relations,
                          (umls.entities.labels, umls.relations.labels))
    publisher.start()
    marker = tmp_path / "killed"
    cfg = from_dict(LMJobConfig, apply_overrides({**BASE, "exchange": {
        "actor": exchange.actor, "namespace": exchange.namespace, "snapshots": exchange.snapshots,
        "lm_poll_steps": 1, "keep_tables": 1}}, ["debug.fail_at_step=5", f"debug.marker={marker}",
                                                  f"storage_path={tmp_path / 'ckpt'}"]))
    try:
        result = run(cfg)
    finally:
        publisher.stop.set()
        publisher.join()
        ray.kill(actor)
    assert publisher.error is None, publisher.error
    assert marker.read_text().startswith("rank 1 exited at step 5")
    history = result.return_value["history"]
    by_step = {row["step"]: row for row in history}
    versions = [row["kg_table_version"] for row in history]
    assert versions == sorted(versions) and versions[0] >= 1 and versions[-1] > versions[0] + 2, versions
    # resumed from the step-4 checkpoint, with the table version that checkpoint recorded
    resumed = result.metrics["resumed_from_step"]
    assert resumed == 4 and result.metrics["resumed_table_version"] == by_step[4]["kg_table_version"]
    assert publisher.version > by_step[4]["kg_table_version"] + 1  # the actor held only the newest: read from the export
    assert by_step[10]["kg_table_version"] > by_step[4]["kg_table_version"]
    assert all(row["kg_versions_behind"] >= 0 for row in history)
    assert {"eval_accuracy", "eval_nokg_accuracy"} <= set(result.metrics)
    back = load_fused(result.metrics["export"])  # the export carries the table the LM ended with
    assert back.table_version == by_step[10]["kg_table_version"]


def test_a_missing_exchange_actor_fails_before_any_worker_starts(ray_local, tmp_path):
    cfg = from_dict(LMJobConfig, apply_overrides(BASE, ["exchange.actor=nobody", f"storage_path={tmp_path}"]))
    with pytest.raises(ValueError, match="exchange.actor 'nobody'"):
        run(cfg)
    assert not (tmp_path / "run").exists()
