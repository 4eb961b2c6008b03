"""What exchanging rows with other nodes every few steps costs in quality (``DistConfig.exchange_every``).

FB15k-237, TransE with bench/kge_quality.py's CPU timing recipe (it reaches validation MRR 0.30 on this
machine), 2 partitions on 2 simulated nodes (``ray.cluster_utils.Cluster``, 1 CPU each) so that every row of
the other partition goes through its node server, async mode; ``exchange_every`` 1, 4 and 8, with negatives
drawn from all entities (the default) and from the trainer's own partition (``negatives: local``, what
PyTorch-BigGraph does and what docs/SCALING.md's model needs at Freebase's size), each for the same number of
epochs and seeds, side by side with ``LocalTrainer`` (the single-process anchor, 2 threads). The
score is the filtered MRR on bench/kge_quality.py's fixed 2,000-triple validation subset after the last epoch
(the test set is not read: this chooses a setting).

    python bench/kge_exchange_quality.py [--epochs 12] [--seeds 0 1]    # ~8 min on 2 cores
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import DATA_DIR, add_common_args, start_run  # noqa: E402
from bench.kge_quality import TIME_RECIPE, valid_subset  # noqa: E402
from bikd.eval import evaluate  # noqa: E402
from bikd.eval.ranking import EvalConfig  # noqa: E402
from bikd.kg.datasets import load_dataset  # noqa: E402
from bikd.kge.training import LocalTrainer  # noqa: E402


def valid_mrr(model, kg, valid) -> float:
    return evaluate(model, valid, [kg.all_triples()], kg.num_relations, EvalConfig(compile="never")).mrr


def local_run(kg, valid, cfg, args) -> dict:
    import torch

    torch.set_num_threads(2)
    trainer = LocalTrainer(kg.train, kg.num_entities, kg.num_relations, cfg)
    start = time.perf_counter()
    for _ in range(args.epochs):
        trainer.train_epoch()
    seconds = time.perf_counter() - start
    return {"valid_mrr": valid_mrr(trainer.model, kg, valid), "pos_per_s": args.epochs * len(kg.train) / seconds}


def sharded_run(kg, valid, cfg, every: int, negatives: str, args) -> dict:
    from bikd.ray.kge import DistConfig
    from bikd.ray.sharded import ShardedKGE

    sharded = ShardedKGE(kg.train, kg.num_entities, kg.num_relations, cfg,
                         DistConfig(num_parts=2, mode="async", exchange_every=every, negatives=negatives))
    try:
        stats = [sharded.train_epoch() for _ in range(args.epochs)]
        mrr = valid_mrr(sharded.model(), kg, valid)
    finally:
        sharded.shutdown()
    return {"valid_mrr": mrr, "pos_per_s": statistics.median(s["triples_per_s"] for s in stats),
            "calls_per_step": stats[-1]["calls_per_step"]}


def setting(negatives: str, every: int) -> str:
    """A run's key: ``every4`` (global negatives, the names of earlier results), ``local_neg_every4``."""
    return ("local_neg_" if negatives == "local" else "") + f"every{every}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(DATA_DIR / "fb15k-237"))
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--every", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--negatives", nargs="+", default=["global", "local"], choices=["global", "local"])
    add_common_args(p)
    args = p.parse_args()
    import ray
    from ray.cluster_utils import Cluster

    run = start_run("kge_exchange_quality", args)
    kg = load_dataset("fb15k237", path=args.data_dir)
    valid = valid_subset(kg)
    runs: dict[str, list] = {}
    for seed in args.seeds:
        cfg = dataclasses.replace(TIME_RECIPE, seed=seed)
        runs.setdefault("local", []).append(local_run(kg, valid, cfg, args))
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        try:
            for _ in range(2):
                cluster.add_node(num_cpus=1)
            ray.init(address=cluster.address, log_to_driver=False)
            for neg in args.negatives:
                for every in args.every:
                    runs.setdefault(setting(neg, every), []).append(sharded_run(kg, valid, cfg, every, neg, args))
        finally:
            ray.shutdown()
            cluster.shutdown()
        print(f"seed {seed}: " + ", ".join(f"{k} MRR {v[-1]['valid_mrr']:.4f} ({v[-1]['pos_per_s']:,.0f}/s)"
                                         for k, v in runs.items()), flush=True)
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("valid_mrr", "pos_per_s")} for k, v in runs.items()}
    metrics = {f"valid_mrr_{k}": v["valid_mrr"] for k, v in med.items()}
    metrics |= {f"pos_per_s_{k}": v["pos_per_s"] for k, v in med.items()}
    for neg in args.negatives:
        for every in args.every:
            key, first = setting(neg, every), setting(neg, args.every[0])
            metrics[f"valid_mrr_{key}_vs_{first}"] = med[key]["valid_mrr"] / med[first]["valid_mrr"]
            metrics[f"valid_mrr_{key}_vs_local"] = med[key]["valid_mrr"] / med["local"]["valid_mrr"]
            metrics[f"calls_per_step_{key}"] = statistics.median(r["calls_per_step"] for r in runs[key])
            if neg == "local" and "global" in args.negatives:  # what local negatives cost at the same windows
                metrics[f"valid_mrr_{key}_vs_{setting('global', every)}"] = (med[key]["valid_mrr"]
                                                                             / med[setting("global", every)]["valid_mrr"])
    for k, v in metrics.items():
        print(f"{k}: {v:.4g}")
    print(run.write(metrics, {"runs": runs, "recipe": dataclasses.asdict(TIME_RECIPE)}))


if __name__ == "__main__":
    main()
