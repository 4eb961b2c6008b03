"""Scale on paper, checked against measurements (issue 14; docs/SCALING.md).

Counted (not timed), on FB15k-237 with the trainer's own batches, sampler and planner
(``bikd.kge.traffic``): per trainer step the entity rows owned by other partitions, the relation rows and the
actor calls, for 1, 2, 4, 8 and 16 METIS partitions, with negatives drawn from all entities ("global", the
default) and from the trainer's own partition ("local", PyTorch-BigGraph). Each partition is taken to be on a
node of its own, so every remote row is a message.

Timed, side by side in one run on this machine (TransE-L2 dim 200, batches of 1024, 256 negatives, as
bench/kge_throughput.py):
- ``LocalTrainer`` at 1 and 2 torch threads (the reference);
- the Ray path with 1 trainer (1 thread) on one node: its step time minus LocalTrainer's at 1 thread is
  ``overhead_ms_per_step_1node``;
- 2 trainers (1 thread each) on ONE node, rows in shared memory (the default), and the same with rows as
  actor calls: ``ray_2trainers_vs_local`` is the first against LocalTrainer at 2 threads;
- 2 trainers on 2 simulated nodes (``ray.cluster_utils.Cluster``, 1 CPU each): every remote row a call, as
  between machines but over loopback: ``overhead_ms_per_step_2node``. (4 simulated nodes on 2 cores would
  time contention, not the network.)

Then the model: for FB15k-237, Wikidata5M and Freebase, memory per partition and the exchange per step at
16 partitions against a step's compute (docs/SCALING.md says how each number is made).

    python bench/kge_scaling.py [--data-dir ../shared/data/fb15k-237] [--reps 3]   # ~10 min on 2 cores
    python bench/kge_scaling.py --table bench/results/kge_scaling.json                # the docs' tables
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import DATA_DIR, add_common_args, start_run  # noqa: E402
from bench.kge_throughput import bikd_config, bikd_local_throughput  # noqa: E402
from bikd.kg.datasets import load_dataset  # noqa: E402
from bikd.kge.partition import PartitionConfig, partition  # noqa: E402
from bikd.kge.traffic import count_step_traffic  # noqa: E402

PARTS = (1, 2, 4, 8, 16)
#: quoted, not measured here: entity / relation / training-triple counts from the datasets' papers
#: (Wikidata5M: Wang et al. 2021, KEPLER; Freebase: Zheng et al. 2020, DGL-KE, its TransE runs at dim 400)
DATASETS = {"fb15k237": (14_505, 237, 272_115, 200), "wikidata5m": (4_594_485, 822, 20_614_279, 400),
            "freebase": (86_054_151, 14_824, 338_586_276, 400)}
NETWORK_GBPS = 10.0  # an assumed 10 Gb/s link between nodes (cloud instances have 10 to 100)


def counted(kg, args) -> dict:
    """rows/calls/bytes per step for each partition count and negatives setting (dim 200 rows)."""
    cfg = bikd_config(args, args.negatives)
    out = {}
    for num_parts in PARTS:
        parts = partition(kg.train, kg.num_entities, kg.num_relations, PartitionConfig(num_parts=num_parts, seed=args.seed))
        for neg in ("global", "local"):
            t = count_step_traffic(parts, kg.num_entities, cfg, entity_width=args.dim, relation_width=args.dim,
                                   negatives=neg, num_steps=args.count_steps)
            out[f"{num_parts}part_{neg}"] = t.__dict__
            print(f"{num_parts:2d} parts, {neg:6s} negatives: {t.remote_rows_per_step:7.0f} remote rows, "
                  f"{t.local_rows_per_step:6.0f} local, {t.calls_per_step:4.1f} calls, {t.bytes_per_step / 1e6:5.2f} MB per step",
                  flush=True)
    return out


def ray_epochs(kg, args, parts: int, rows: str, cpus: float) -> dict:
    """Positives/s of the async Ray path (median of timed epochs after one warm-up) and its calls per step."""
    from bikd.ray.kge import DistConfig
    from bikd.ray.sharded import ShardedKGE

    dist = DistConfig(num_parts=parts, mode="async", cpus_per_trainer=cpus, same_node_rows=rows)
    sharded = ShardedKGE(kg.train, kg.num_entities, kg.num_relations, bikd_config(args, args.negatives), dist)
    try:
        stats = [sharded.train_epoch() for _ in range(1 + args.ray_epochs)][1:]
    finally:
        sharded.shutdown()
    return {"pos_per_s": statistics.median(s["triples_per_s"] for s in stats), "calls_per_step": stats[-1]["calls_per_step"],
            "epochs_pos_per_s": [s["triples_per_s"] for s in stats]}


def timed(kg, args) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    runs: dict[str, list] = {}
    one = SimpleNamespace(**{**vars(args), "reps": 1, "warmup": 3})  # one timed run of LocalTrainer per repetition
    for rep in range(args.reps):  # interleaved, so drift of the machine hits every setting alike
        for threads in (1, 2):
            runs.setdefault(f"local_{threads}thread", []).append(bikd_local_throughput(kg, one, args.negatives, threads))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            runs.setdefault("ray_1trainer", []).append(ray_epochs(kg, args, 1, "shared", 1.0))
            runs.setdefault("ray_2trainers_shared", []).append(ray_epochs(kg, args, 2, "shared", 1.0))
            runs.setdefault("ray_2trainers_calls", []).append(ray_epochs(kg, args, 2, "calls", 1.0))
        finally:
            ray.shutdown()
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        try:
            for _ in range(2):
                cluster.add_node(num_cpus=1)
            ray.init(address=cluster.address, log_to_driver=False)
            runs.setdefault("ray_2nodes", []).append(ray_epochs(kg, args, 2, "shared", 1.0))
        finally:
            ray.shutdown()
            cluster.shutdown()
        print(f"rep {rep}: " + ", ".join(f"{k} {v[-1]['pos_per_s']:,.0f}" for k, v in runs.items()), flush=True)
    return runs


def model(measured: dict, counts: dict, args) -> dict:
    """Memory per partition and the exchange per step against compute, for each dataset at 4 and 16 parts.

    A trainer issues all its pulls at once and waits for them (pushes go out after the step and overlap the
    next one), so a step's exchange is: the measured Ray cost of a step with remote rows (2 simulated nodes:
    latency, serialisation, serving the peer's pulls), scaled by the remote rows it moves, plus the pulled
    bytes over an assumed link. Compute is LocalTrainer's measured step at 2 threads, scaled by dim."""
    out = {}
    base_rows = counts["2part_global"]["remote_rows_per_step"] + counts["2part_global"]["relation_rows_per_step"]
    for name, (num_ent, num_rel, num_triples, dim) in DATASETS.items():
        for num_parts in (4, 16):
            for neg in ("global", "local"):
                c = counts[f"{num_parts}part_{neg}"]
                # a step's shape is the batch's, not the graph's: the counted rows per step carry over; the
                # remote share is FB15k-237's METIS cut (dense, so hard to cut: an upper bound for sparser graphs)
                rows = c["remote_rows_per_step"] + c["relation_rows_per_step"]
                pull_mb = rows * 4 * dim / 1e6
                ray_ms = measured["overhead_ms_per_step_2node"] * rows / base_rows * dim / args.dim
                exchange_ms = ray_ms + pull_mb / (NETWORK_GBPS / 8 * 1e3) * 1e3
                compute_ms = measured["local_ms_per_step_2thread"] * dim / args.dim
                out[f"{name}_{num_parts}part_{neg}"] = {
                    "entities": num_ent, "relations": num_rel, "triples": num_triples, "dim": dim,
                    # rows and row-wise Adagrad state (one float per row), and the partition's triples (int64)
                    "memory_gb_per_part": (num_ent / num_parts * (dim + 1) * 4 + num_triples / num_parts * 3 * 8) / 1e9,
                    "remote_rows_per_step": c["remote_rows_per_step"], "calls_per_step": c["calls_per_step"],
                    "pull_mb_per_step": pull_mb, "exchange_ms_per_step": exchange_ms,
                    "compute_ms_per_step": compute_ms, "exchange_vs_compute": exchange_ms / compute_ms}
    return out


def tables(result: dict) -> str:
    """docs/SCALING.md's tables from a kge_scaling JSON (``--table PATH``)."""
    m, d = result["metrics"], result["details"]
    lines = ["| partitions | negatives | remote entity rows / step | local rows / step | relation rows / step | calls / step | MB / step (dim 200) |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for key, c in d["counts"].items():
        lines.append(f"| {c['num_parts']} | {key.split('_')[1]} | {c['remote_rows_per_step']:,.0f} | {c['local_rows_per_step']:,.0f} | "
                     f"{c['relation_rows_per_step']:,.0f} | {c['calls_per_step']:.1f} | {c['bytes_per_step'] / 1e6:.2f} |")
    lines += ["", "| setting (2 CPU cores) | positives/s (median) | vs LocalTrainer | ms per trainer step |", "|---|---:|---:|---:|"]
    med = d["medians_pos_per_s"]
    ref = {"local_1thread": med["local_1thread"], "local_2thread": med["local_2thread"]}
    for k, v in med.items():
        per = 2 if k.startswith("ray_2") else 1
        base = "local_1thread" if k in ("local_1thread", "ray_1trainer") else "local_2thread"
        lines.append(f"| {k} | {v:,.0f} | {v / ref[base]:.2f}x ({base}) | {per * 1024 / v * 1e3:.1f} |")
    lines += ["", "| graph | parts | negatives | entities | dim | GB per partition | pulled MB / step | exchange ms / step | "
              "compute ms / step | exchange / compute |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, r in d["model"].items():
        name, parts, neg = key.split("_")
        lines.append(f"| {name} | {parts.removesuffix('part')} | {neg} | {r['entities']:,} | {r['dim']} | {r['memory_gb_per_part']:.2f} | "
                     f"{r['pull_mb_per_step']:.2f} | {r['exchange_ms_per_step']:.1f} | {r['compute_ms_per_step']:.1f} | "
                     f"{r['exchange_vs_compute']:.0%} |")
    lines += ["", f"(from `{result['benchmark']}` at commit {result['commit']}, {result['date']}; load average "
              f"{result.get('loadavg_start')} -> {result.get('loadavg_end')}; "
              f"ray_2trainers_vs_local {m['ray_2trainers_vs_local']:.2f})"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", metavar="JSON", help="print docs/SCALING.md's tables from a result and exit")
    p.add_argument("--data-dir", default=str(DATA_DIR / "fb15k-237"))
    p.add_argument("--dim", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--negatives", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions of every timed setting (median)")
    p.add_argument("--steps", type=int, default=60, help="LocalTrainer: steps per timed run")
    p.add_argument("--ray-epochs", type=int, default=1, help="timed epochs per Ray run (after a warm-up epoch)")
    p.add_argument("--count-steps", type=int, default=20, help="steps per partition replayed for the counts")
    p.add_argument("--seed", type=int, default=0)
    add_common_args(p)
    args = p.parse_args()
    if args.table:
        print(tables(json.loads(Path(args.table).read_text())))
        return
    run = start_run("kge_scaling", args)
    kg = load_dataset("fb15k237", path=args.data_dir)
    counts = counted(kg, args)
    t0 = time.perf_counter()
    runs = timed(kg, args)
    med = {k: statistics.median(r["pos_per_s"] for r in v) for k, v in runs.items()}
    ms = {k: args.batch_size / v * 1e3 for k, v in med.items()}  # ms per step of ONE trainer
    trainer_ms = {k: ms[k] * (2 if k.startswith("ray_2") else 1) for k in ms}  # 2 trainers share the rate
    calls_2node = statistics.median(r["calls_per_step"] for r in runs["ray_2nodes"])
    metrics = {
        "overhead_ms_per_step_1node": trainer_ms["ray_1trainer"] - ms["local_1thread"],
        "overhead_ms_per_step_2node": trainer_ms["ray_2nodes"] - ms["local_1thread"],
        "overhead_ms_per_step_2trainers_shared": trainer_ms["ray_2trainers_shared"] - ms["local_1thread"],
        "overhead_ms_per_step_2trainers_calls": trainer_ms["ray_2trainers_calls"] - ms["local_1thread"],
        "remote_rows_per_step_2part": counts["2part_global"]["remote_rows_per_step"],
        "remote_rows_per_step_4part": counts["4part_global"]["remote_rows_per_step"],
        "remote_rows_per_step_16part": counts["16part_global"]["remote_rows_per_step"],
        "remote_rows_per_step_4part_local_neg": counts["4part_local"]["remote_rows_per_step"],
        "calls_per_step_4part": counts["4part_global"]["calls_per_step"],
        "calls_per_step_2node_measured": calls_2node,
        "ray_2trainers_vs_local": med["ray_2trainers_shared"] / med["local_2thread"],
        "ray_2trainers_calls_vs_local": med["ray_2trainers_calls"] / med["local_2thread"],
        "ray_2nodes_vs_local": med["ray_2nodes"] / med["local_2thread"],
        "ray_1trainer_vs_local_1thread": med["ray_1trainer"] / med["local_1thread"],
        "local_ms_per_step_1thread": ms["local_1thread"],
        "local_ms_per_step_2thread": ms["local_2thread"],
    }
    scaled = model(metrics, counts, args)
    for key in ("wikidata5m_16part_global", "freebase_16part_global", "freebase_16part_local"):
        metrics[f"{key}_exchange_vs_compute"] = scaled[key]["exchange_vs_compute"]
        metrics[f"{key}_memory_gb_per_part"] = scaled[key]["memory_gb_per_part"]
    for k, v in metrics.items():
        print(f"{k}: {v:.4g}")
    path = run.write(metrics, {"counts": counts, "runs": runs, "medians_pos_per_s": med, "model": scaled,
                               "network_gbps_assumed": NETWORK_GBPS, "datasets_quoted": DATASETS,
                               "timed_seconds": time.perf_counter() - t0})
    print(tables(json.loads(Path(path).read_text())))
    print(path)


if __name__ == "__main__":
    main()
