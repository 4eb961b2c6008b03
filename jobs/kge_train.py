"""Train a KG embedding (locally or sharded on Ray), evaluate it, and export it for other tools.

    python jobs/kge_train.py --config configs/kge_umls.yaml [--set backend=local --set train.epochs=5 ...]

backend "ray" trains on ``dist.num_parts`` METIS partitions with embedding-shard actors (joins the cluster
at $RAY_ADDRESS, else starts a local Ray); "local" trains in this process. Every epoch prints the loss and
positive triples/s, every ``eval_every`` epochs the filtered validation MRR (on at most ``valid_limit``
triples). The run directory (any fsspec URL) gets config.yaml, metrics.json and export/ (the embeddings
as .npy + TSV label maps + model.json, see bikd.kge.export).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Literal

import ray
import torch

from bikd.config import add_config_args, config_from_args, dump_yaml
from bikd.eval import EvalConfig, evaluate
from bikd.kg.datasets import DataConfig, load_from_config
from bikd.kge.export import export_embeddings
from bikd.kge.training import KGETrainConfig, LocalTrainer
from bikd.ray.kge import DistConfig, ShardedKGE
from bikd.storage import Storage


@dataclass(kw_only=True, frozen=True)
class KGEJobConfig:
    data: DataConfig = field(default_factory=DataConfig)
    train: KGETrainConfig = field(default_factory=KGETrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    backend: Literal["ray", "local"] = "ray"
    run_dir: str = "runs/kge_train"
    #: validation MRR every this many epochs (and after the last one)
    eval_every: int = 5
    #: validate on a fixed random subset of at most this many triples (null: all); test always uses all
    valid_limit: int | None = 2000

    def __post_init__(self):
        if not self.run_dir:
            raise ValueError("run_dir is empty")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {self.eval_every}")
        if self.valid_limit is not None and self.valid_limit < 1:
            raise ValueError(f"valid_limit must be >= 1 or null, got {self.valid_limit}")


def start_ray(dist: DistConfig) -> None:
    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # joins that cluster; it has its own CPUs, so no num_cpus here (Ray would refuse it)
    else:
        # address="local": a new instance, never a cluster some earlier `ray start` left running here
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(dist.num_parts * dist.cpus_per_trainer)),
                 include_dashboard=False)
    need, have = dist.num_parts * dist.cpus_per_trainer, ray.cluster_resources().get("CPU", 0)
    if need > have:
        ray.shutdown()
        raise SystemExit(f"dist.num_parts * dist.cpus_per_trainer = {need:g} CPUs, but the Ray cluster has {have:g}")


def main() -> None:
    parser = add_config_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    try:
        cfg = config_from_args(KGEJobConfig, parser.parse_args())
    except (ValueError, FileNotFoundError) as e:  # before any work: no run dir, no Ray
        parser.error(str(e))
    print(dump_yaml(cfg))
    kg = load_from_config(cfg.data)
    print(kg.summary(), flush=True)
    known = [kg.all_triples()]
    valid = kg.valid
    if cfg.valid_limit is not None and len(valid) > cfg.valid_limit:
        pick = torch.randperm(len(valid), generator=torch.Generator().manual_seed(cfg.train.seed))[: cfg.valid_limit]
        valid = valid[pick.sort().values]
    storage = Storage(cfg.run_dir)
    storage.write_text("config.yaml", dump_yaml(cfg))

    if cfg.backend == "ray":  # wrap either trainer as: epoch() -> stats, current() -> KGEModel, close()
        start_ray(cfg.dist)
        try:
            sharded = ShardedKGE(kg.train, kg.num_entities, kg.num_relations, cfg.train, cfg.dist)
        except BaseException:
            ray.shutdown()
            raise
        part = sharded.partitioning.stats()
        print(f"ray: {part['num_parts']} {part['method']} partitions ({cfg.dist.mode}), edge cut {part['edge_cut']:.1%}, "
              f"triples per part {part['num_triples_per_part']}", flush=True)
        epoch_fn, current = sharded.train_epoch, lambda: sharded.model(sharded.snapshot())
        close = lambda: (sharded.shutdown(), ray.shutdown())  # noqa: E731
    else:
        local = LocalTrainer(kg.train, kg.num_entities, kg.num_relations, cfg.train)

        def epoch_fn() -> dict:
            start = time.perf_counter()
            loss = local.train_epoch()
            return {"loss": loss, "triples_per_s": len(kg.train) / (time.perf_counter() - start)}

        current, close = lambda: local.model, lambda: None

    history = []
    try:
        for epoch in range(1, cfg.train.epochs + 1):
            stats = epoch_fn()
            row = {"epoch": epoch, "loss": stats["loss"], "triples_per_s": stats["triples_per_s"]}
            line = f"epoch {epoch:3d}  loss {row['loss']:.4f}  {row['triples_per_s']:,.0f} triples/s"
            if epoch % cfg.eval_every == 0 or epoch == cfg.train.epochs:
                row["valid_mrr"] = evaluate(current(), valid, known, kg.num_relations, cfg.eval).mrr
                line += f"  valid MRR {row['valid_mrr']:.4f}"
            history.append(row)
            print(line, flush=True)
        model = current()
    finally:
        close()

    metrics = evaluate(model, kg.test, known, kg.num_relations, cfg.eval).metrics()
    print("test (filtered, realistic): " + "  ".join(f"{k} {metrics[f'both.{k}']:.4f}" for k in ("mrr", "hits_at_1", "hits_at_3", "hits_at_10")))
    summary = {"dataset": kg.name, "backend": cfg.backend, "model": cfg.train.model.name, "epochs": history, "test": metrics}
    storage.write_text("metrics.json", json.dumps(summary, indent=2))
    export_embeddings(storage, model.entity, model.relation, kg.entities.labels, kg.relations.labels, cfg.train.model,
                      prefix="export", extra={"dataset": kg.name, "test": metrics})
    print(f"metrics: {storage.url_of('metrics.json')}\nembeddings: {storage.url_of('export')}")


if __name__ == "__main__":
    main()
