"""Train a KG embedding (locally or sharded on Ray), evaluate it, and export it for other tools.

    python jobs/kge_train.py --config configs/kge_umls.yaml [--set backend=local --set train.epochs=5 ...]

backend "ray" trains on ``dist.num_parts`` METIS partitions with embedding-shard actors (joins the cluster
at $RAY_ADDRESS, else starts a local Ray); "local" trains in this process. Every epoch prints the loss and
positive triples/s, every ``eval_every`` epochs the filtered validation MRR (on at most ``valid_limit``
triples). The run directory (any fsspec URL) gets config.yaml, metrics.json and export/ (the embeddings
as .npy + TSV label maps + model.json, see bikd.kge.export), run.json (what the directory belongs to: another
dataset, model or backend is refused) and checkpoints/ (every ``checkpoint_every`` epochs). Ctrl-C or SIGTERM
stops after the current step (local) or epoch (ray) with a checkpoint; the same command resumes from it, and
on a finished run it says so and changes nothing (raise train.epochs to train on).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Literal

import ray
import torch

from bikd.cli import GracefulStop, job_parser, parse_job_config, run_main, set_num_threads
from bikd.config import dump_yaml, to_dict
from bikd.eval import EvalConfig, evaluate
from bikd.kg.datasets import DataConfig, load_from_config
from bikd.kge.export import export_embeddings
from bikd.kge.loop import LocalEpochs, LoopConfig, train_epochs
from bikd.kge.training import KGETrainConfig, LocalTrainer
from bikd.ray.kge import DistConfig
from bikd.ray.sharded import ShardedEpochs, ShardedKGE
from bikd.runs import RunDir
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
    #: a checkpoint every this many epochs (and after the last one, and at Ctrl-C / SIGTERM)
    checkpoint_every: int = 1
    #: torch threads of this process (the local trainer, evaluation); null: the CPUs it may run on
    num_threads: int | None = None

    def __post_init__(self):
        if not self.run_dir:
            raise ValueError("run_dir is empty")
        for key in ("eval_every", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.valid_limit is not None and self.valid_limit < 1:
            raise ValueError(f"valid_limit must be >= 1 or null, got {self.valid_limit}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or null, got {self.num_threads}")


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
        raise ValueError(f"dist.num_parts * dist.cpus_per_trainer = {need:g} CPUs, but the Ray cluster has {have:g}")


def train(cfg: KGEJobConfig) -> int:
    print(dump_yaml(cfg))
    storage = Storage(cfg.run_dir)
    run = RunDir(storage, {"job": "kge_train", "dataset": cfg.data.name, "data": cfg.data.source,
                           "model": to_dict(cfg.train.model), "backend": cfg.backend},
                 choose="choose another one with --set run_dir=...")
    progress = run.finished() if run.check() else None  # refuses another run's directory before any work
    if progress and progress["epochs_done"] >= cfg.train.epochs:
        print(f"{storage.url}: this run finished ({progress['epochs_done']} epochs); its results are in "
              f"{storage.url_of('metrics.json')}. Nothing to do (raise train.epochs to train on).")
        return 0
    print(f"torch threads: {set_num_threads(cfg.num_threads)}")
    kg = load_from_config(cfg.data)
    print(kg.summary(), flush=True)
    known, valid = [kg.all_triples()], kg.valid
    if cfg.valid_limit is not None and len(valid) > cfg.valid_limit:
        pick = torch.randperm(len(valid), generator=torch.Generator().manual_seed(cfg.train.seed))[: cfg.valid_limit]
        valid = valid[pick.sort().values]
    run.claim(to_dict(cfg))
    storage.write_text("config.yaml", dump_yaml(cfg))

    if cfg.backend == "ray":
        start_ray(cfg.dist)
        try:
            sharded = ShardedKGE(kg.train, kg.num_entities, kg.num_relations, cfg.train, cfg.dist)
        except BaseException:
            ray.shutdown()
            raise
        part = sharded.partitioning.stats()
        print(f"ray: {part['num_parts']} {part['method']} partitions ({cfg.dist.mode}), edge cut {part['edge_cut']:.1%}, "
              f"triples per part {part['num_triples_per_part']}", flush=True)
        trainer, close = ShardedEpochs(sharded), lambda: (sharded.shutdown(), ray.shutdown())
    else:
        trainer, close = LocalEpochs(LocalTrainer(kg.train, kg.num_entities, kg.num_relations, cfg.train)), lambda: None

    loop = LoopConfig(epochs=cfg.train.epochs, eval_every=cfg.eval_every, checkpoint_every=cfg.checkpoint_every)
    try:
        with GracefulStop(trainer.unit) as stop:  # after ray.init: Ray's own SIGTERM handler would exit at once
            result = train_epochs(trainer, run, loop, lambda m: evaluate(m, valid, known, kg.num_relations, cfg.eval).mrr,
                                  lambda: stop.signal, log=lambda line: print(line, flush=True))
            if result.stopped_by is None:
                model = trainer.model()
    finally:
        close()
    if result.stopped_by is not None:
        print("run the same command again to resume from it")
        return 128 + result.stopped_by

    metrics = evaluate(model, kg.test, known, kg.num_relations, cfg.eval).metrics()
    print("test (filtered, realistic): " + "  ".join(f"{k} {metrics[f'both.{k}']:.4f}" for k in ("mrr", "hits_at_1", "hits_at_3", "hits_at_10")))
    summary = {"dataset": kg.name, "backend": cfg.backend, "model": cfg.train.model.name, "data": kg.load_counts(),
               "resumed_from_epoch": result.resumed_from, "epochs": result.history, "test": metrics}
    storage.write_text("metrics.json", json.dumps(summary, indent=2))
    export_embeddings(storage, model.entity, model.relation, kg.entities.labels, kg.relations.labels, cfg.train.model,
                      prefix="export", extra={"dataset": kg.name, "test": metrics})
    run.mark_finished()
    print(f"metrics: {storage.url_of('metrics.json')}\nembeddings: {storage.url_of('export')}")
    return 0


def main() -> None:
    parser = job_parser(__doc__)
    args, cfg = parse_job_config(parser, KGEJobConfig)
    run_main(lambda: train(cfg), args.debug)


if __name__ == "__main__":
    main()
