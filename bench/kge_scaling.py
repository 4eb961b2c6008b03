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
- 2 trainers on 2 simulated nodes (``ray.cluster_utils.Cluster``, 1 CPU each): every remote row travels, as
  between machines but over loopback, through the other node's server (the default: one call per step, a pull
  carrying an earlier step's push, the floats in pieces Ray sends inline) or as calls to the owning trainer:
  ``overhead_ms_per_step_2node`` and ``..._trainer``. Both trainers train, so each node's one core also serves
  the other's rows: contention, not the network;
- the same with only partition 0's trainer training (``..._idle_peer``), with global and with local negatives
  (many and few rows a call): the other node's core is free to serve, as on a cluster node with a core for its
  server; the two give the per-call and per-row cost the model uses. (4 simulated nodes on 2 cores would time
  contention, not the network.)

Then the model: for FB15k-237, Wikidata5M and Freebase, memory per partition and the exchange per step at
4 and 16 partitions (one per node, or 16 on 4 nodes) against a step's compute (docs/SCALING.md says how each
number is made).

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
#: (partitions per node, steps per exchange) counted besides (1, 1): Freebase's 16 partitions on 4 nodes of 4,
#: exchanging every step or every 4 or 8 steps (DistConfig.exchange_every), and 2 parts every 4 (timed too)
NODE_LAYOUTS = {2: ((1, 1), (1, 4)), 16: ((1, 1), (4, 1), (4, 4), (4, 8))}
#: the layouts the model is made for
MODEL_LAYOUTS = ((4, 1, 1), (16, 1, 1), (16, 4, 1), (16, 4, 4), (16, 4, 8))
NETWORK_GBPS = 10.0  # an assumed 10 Gb/s link between nodes (cloud instances have 10 to 100)


def counted(kg, args) -> dict:
    """rows/calls/bytes per step for each partition count and negatives setting (dim 200 rows)."""
    cfg = bikd_config(args, args.negatives)
    out = {}
    for num_parts in PARTS:
        parts = partition(kg.train, kg.num_entities, kg.num_relations, PartitionConfig(num_parts=num_parts, seed=args.seed))
        for per_node, every in NODE_LAYOUTS.get(num_parts, ((1, 1),)):
            for neg in ("global", "local"):
                t = count_step_traffic(parts, kg.num_entities, cfg, entity_width=args.dim, relation_width=args.dim,
                                       negatives=neg, num_steps=args.count_steps, parts_per_node=per_node,
                                       exchange_every=every)
                out[layout_key(num_parts, per_node, neg, every)] = {**t.__dict__, "negatives": neg}
                print(f"{num_parts:2d} parts, {per_node} per node, every {every}, {neg:6s} negatives: {t.remote_rows_per_step:7.0f} remote rows, "
                      f"{t.local_rows_per_step:6.0f} local, {t.calls_per_step:4.1f} calls to trainers, "
                      f"{t.server_calls_per_step:4.1f} to node servers, {t.bytes_per_step / 1e6:5.2f} MB per step", flush=True)
    return out


def layout_key(num_parts: int, per_node: int, neg: str, every: int = 1) -> str:
    return (f"{num_parts}part" + (f"_{per_node}pernode" if per_node > 1 else "") + (f"_every{every}" if every > 1 else "")
            + f"_{neg}")


def ray_epochs(kg, args, parts: int, rows: str, cpus: float, cross: str = "server", only_first: bool = False,
               negatives: str = "global", every: int = 1) -> dict:
    """Positives/s of the async Ray path (median of timed epochs after one warm-up), its calls per step and the
    rows a call pulls. ``only_first``: only partition 0's trainer trains; the others just hold their rows (their
    node's server, or with ``cross="trainer"`` the idle trainer itself, answers on a core nobody trains on)."""
    import ray

    from bikd.ray.kge import DistConfig
    from bikd.ray.sharded import ShardedKGE

    dist = DistConfig(num_parts=parts, mode="async", cpus_per_trainer=cpus, same_node_rows=rows, cross_node_rows=cross,
                      negatives=negatives, exchange_every=every)
    sharded = ShardedKGE(kg.train, kg.num_entities, kg.num_relations, bikd_config(args, args.negatives), dist)
    try:
        if only_first:
            first = sharded.trainers[0]
            stats = []
            for _ in range(1 + args.ray_epochs):
                before = ray.get(first.counters.remote())
                epoch = ray.get(first.run_epoch.remote())
                steps, calls, pulled = (a - b for a, b in zip(ray.get(first.counters.remote()), before))
                stats.append({"triples_per_s": epoch["triples"] / epoch["seconds"], "calls_per_step": calls / max(steps, 1),
                              "rows_per_call": pulled / max(calls, 1)})
            stats = stats[1:]
        else:
            stats = [sharded.train_epoch() for _ in range(1 + args.ray_epochs)][1:]
    finally:
        sharded.shutdown()
    return {"pos_per_s": statistics.median(s["triples_per_s"] for s in stats), "calls_per_step": stats[-1]["calls_per_step"],
            "rows_per_call": stats[-1].get("rows_per_call"), "epochs_pos_per_s": [s["triples_per_s"] for s in stats]}


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
            runs.setdefault("ray_2nodes_trainer", []).append(ray_epochs(kg, args, 2, "shared", 1.0, cross="trainer"))
            runs.setdefault("ray_2nodes_idle_peer", []).append(ray_epochs(kg, args, 2, "shared", 1.0, only_first=True))
            runs.setdefault("ray_2nodes_idle_peer_local_neg", []).append(
                ray_epochs(kg, args, 2, "shared", 1.0, only_first=True, negatives="local"))
            runs.setdefault("ray_2nodes_idle_peer_every4", []).append(
                ray_epochs(kg, args, 2, "shared", 1.0, only_first=True, every=4))
            runs.setdefault("ray_2nodes_idle_peer_trainer", []).append(
                ray_epochs(kg, args, 2, "shared", 1.0, cross="trainer", only_first=True))
        finally:
            ray.shutdown()
            cluster.shutdown()
        print(f"rep {rep}: " + ", ".join(f"{k} {v[-1]['pos_per_s']:,.0f}" for k, v in runs.items()), flush=True)
    return runs


def per_call_cost(measured: dict) -> tuple[float, float]:
    """(ms per call, ms per row of ``--dim`` floats) a trainer step loses to its node-server calls, fitted to the
    two idle-peer runs (global negatives: many rows a call; local: few): each run's overhead per step over its
    calls per step is one point (rows a call pulled, ms a call)."""
    points = [(measured[f"rows_per_call_2node_idle_peer{k}"],
               measured[f"overhead_ms_per_step_2node_idle_peer{k}"] / measured[f"calls_per_step_2node_idle_peer{k}_measured"])
              for k in ("", "_local_neg")]
    (rows_g, ms_g), (rows_l, ms_l) = points
    per_row = max(0.0, (ms_g - ms_l) / (rows_g - rows_l))
    return max(0.0, ms_l - per_row * rows_l), per_row


def model(measured: dict, counts: dict, args) -> dict:
    """Memory per partition and the exchange per step against compute, for each dataset at 4 partitions and
    at 16 (one per node, or 4 nodes of 4).

    A step's exchange is what a trainer step loses to its node-server calls, per call plus per row (fitted to
    two measured runs on 2 simulated nodes with the serving node's core free, ``per_call_cost``: what a cluster
    node with a core for its server pays, serialisation, loopback transfer and the prefetch's overlap
    included), for the calls and rows counted for the layout, the rows scaled by width; plus the pulled bytes
    over an assumed link. Calls to different nodes are charged one after another (they in fact run
    concurrently). Compute is LocalTrainer's measured step at 2 threads, scaled by dim."""
    out = {}
    per_call_ms, per_row_ms = per_call_cost(measured)
    for name, (num_ent, num_rel, num_triples, dim) in DATASETS.items():
        for num_parts, per_node, every in MODEL_LAYOUTS:
            for neg in ("global", "local"):
                key = layout_key(num_parts, per_node, neg, every)
                c = counts[key]
                # a step's shape is the batch's, not the graph's: the counted rows per step carry over; the
                # remote share is FB15k-237's METIS cut (dense, so hard to cut: an upper bound for sparser graphs)
                rows = c["server_rows_per_step"]
                pull_mb = rows * 4 * dim / 1e6
                exchange_ms = (per_call_ms * c["server_calls_per_step"] + per_row_ms * rows * dim / args.dim
                               + pull_mb / (NETWORK_GBPS / 8 * 1e3) * 1e3)
                compute_ms = measured["local_ms_per_step_2thread"] * dim / args.dim
                out[f"{name}_{key}"] = {
                    "entities": num_ent, "relations": num_rel, "triples": num_triples, "dim": dim,
                    "num_parts": num_parts, "parts_per_node": per_node, "exchange_every": every, "negatives": neg,
                    # rows and row-wise Adagrad state (one float per row), and the partition's triples (int64)
                    "memory_gb_per_part": (num_ent / num_parts * (dim + 1) * 4 + num_triples / num_parts * 3 * 8) / 1e9,
                    "remote_rows_per_step": c["remote_rows_per_step"], "server_calls_per_step": c["server_calls_per_step"],
                    "pull_mb_per_step": pull_mb, "exchange_ms_per_step": exchange_ms,
                    "compute_ms_per_step": compute_ms, "exchange_vs_compute": exchange_ms / compute_ms}
    return out


def training_trainers(setting: str) -> int:
    """Trainers that train in a timed setting (they share its positives/s)."""
    return 1 if "idle_peer" in setting or not setting.startswith("ray_2") else 2


def tables(result: dict) -> str:
    """docs/SCALING.md's tables from a kge_scaling JSON (``--table PATH``)."""
    m, d = result["metrics"], result["details"]
    lines = ["| partitions | per node | steps per exchange | negatives | remote entity rows / step | local rows / step | "
             "relation rows / step | calls to trainers / step | calls to node servers / step | rows through node servers / step | "
             "MB / step (dim 200) |",
             "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in d["counts"].values():
        lines.append(f"| {c['num_parts']} | {c['parts_per_node']} | {c['exchange_every']} | {c['negatives']} | "
                     f"{c['remote_rows_per_step']:,.0f} | {c['local_rows_per_step']:,.0f} | {c['relation_rows_per_step']:,.0f} | "
                     f"{c['calls_per_step']:.1f} | {c['server_calls_per_step']:.2f} | {c['server_rows_per_step']:,.0f} | "
                     f"{c['bytes_per_step'] / 1e6:.2f} |")
    lines += ["", "| setting (2 CPU cores) | positives/s (median) | vs LocalTrainer | ms per trainer step | calls / step |",
              "|---|---:|---:|---:|---:|"]
    med = d["medians_pos_per_s"]
    for k, v in med.items():
        base = "local_2thread" if training_trainers(k) == 2 or k == "local_2thread" else "local_1thread"
        calls = statistics.median(r["calls_per_step"] for r in d["runs"][k]) if k.startswith("ray") else 0
        lines.append(f"| {k} | {v:,.0f} | {v / med[base]:.2f}x ({base}) | {training_trainers(k) * 1024 / v * 1e3:.1f} | {calls:.1f} |")
    lines += ["", "| graph | parts | per node | steps per exchange | negatives | entities | dim | GB per partition | "
              "pulled MB / step | server calls / step | exchange ms / step | compute ms / step | exchange / compute |",
              "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, r in d["model"].items():
        lines.append(f"| {key.split('_')[0]} | {r['num_parts']} | {r['parts_per_node']} | {r['exchange_every']} | {r['negatives']} | "
                     f"{r['entities']:,} | "
                     f"{r['dim']} | {r['memory_gb_per_part']:.2f} | {r['pull_mb_per_step']:.2f} | {r['server_calls_per_step']:.2f} | "
                     f"{r['exchange_ms_per_step']:.1f} | {r['compute_ms_per_step']:.1f} | {r['exchange_vs_compute']:.0%} |")
    lines += ["", f"(from `{result['benchmark']}` at commit {result['commit']}, {result['date']}; load average "
              f"{result.get('loadavg_start')} -> {result.get('loadavg_end')}; "
              f"ray_2trainers_vs_local {m['ray_2trainers_vs_local']:.2f}; fitted cost {m['per_call_ms_fitted']:.2f} ms per call + "
              f"{m['per_row_ms_fitted'] * 1e3:.2f} us per row; exchanging every 4 steps, 2 nodes: "
              f"{m['overhead_ms_per_step_2node_idle_peer_every4']:.2f} ms per step measured, "
              f"{m['predicted_overhead_ms_per_step_2node_idle_peer_every4']:.2f} predicted)"]
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
    p.add_argument("--count-steps", type=int, default=32, help="steps per partition replayed for the counts")
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
    trainer_ms = {k: ms[k] * training_trainers(k) for k in ms}  # 2 trainers share the rate
    calls = {k: statistics.median(r["calls_per_step"] for r in v) for k, v in runs.items() if k.startswith("ray")}
    rows_per_call = {k: statistics.median(r["rows_per_call"] for r in v) for k, v in runs.items() if "idle_peer" in k}
    metrics = {
        "overhead_ms_per_step_1node": trainer_ms["ray_1trainer"] - ms["local_1thread"],
        "overhead_ms_per_step_2node": trainer_ms["ray_2nodes"] - ms["local_1thread"],
        "overhead_ms_per_step_2node_trainer": trainer_ms["ray_2nodes_trainer"] - ms["local_1thread"],
        "overhead_ms_per_step_2node_idle_peer": trainer_ms["ray_2nodes_idle_peer"] - ms["local_1thread"],
        "overhead_ms_per_step_2node_idle_peer_trainer": trainer_ms["ray_2nodes_idle_peer_trainer"] - ms["local_1thread"],
        "calls_per_step_2node_measured": calls["ray_2nodes"],
        "calls_per_step_2node_trainer_measured": calls["ray_2nodes_trainer"],
        "calls_per_step_2node_idle_peer_measured": calls["ray_2nodes_idle_peer"],
        "overhead_ms_per_step_2node_idle_peer_local_neg": trainer_ms["ray_2nodes_idle_peer_local_neg"] - ms["local_1thread"],
        "calls_per_step_2node_idle_peer_local_neg_measured": calls["ray_2nodes_idle_peer_local_neg"],
        "rows_per_call_2node_idle_peer": rows_per_call["ray_2nodes_idle_peer"],
        "rows_per_call_2node_idle_peer_local_neg": rows_per_call["ray_2nodes_idle_peer_local_neg"],
        "overhead_ms_per_step_2node_idle_peer_every4": trainer_ms["ray_2nodes_idle_peer_every4"] - ms["local_1thread"],
        "calls_per_step_2node_idle_peer_every4_measured": calls["ray_2nodes_idle_peer_every4"],
        "rows_per_call_2node_idle_peer_every4": rows_per_call["ray_2nodes_idle_peer_every4"],
        "ray_2nodes_idle_peer_vs_local_1thread": med["ray_2nodes_idle_peer"] / med["local_1thread"],
        "ray_2nodes_idle_peer_every4_vs_local_1thread": med["ray_2nodes_idle_peer_every4"] / med["local_1thread"],
        "server_calls_per_step_16part_local": counts["16part_local"]["server_calls_per_step"],
        "server_calls_per_step_16part_4pernode_local": counts["16part_4pernode_local"]["server_calls_per_step"],
        "overhead_ms_per_step_2trainers_shared": trainer_ms["ray_2trainers_shared"] - ms["local_1thread"],
        "overhead_ms_per_step_2trainers_calls": trainer_ms["ray_2trainers_calls"] - ms["local_1thread"],
        "remote_rows_per_step_2part": counts["2part_global"]["remote_rows_per_step"],
        "remote_rows_per_step_4part": counts["4part_global"]["remote_rows_per_step"],
        "remote_rows_per_step_16part": counts["16part_global"]["remote_rows_per_step"],
        "remote_rows_per_step_4part_local_neg": counts["4part_local"]["remote_rows_per_step"],
        "calls_per_step_4part": counts["4part_global"]["calls_per_step"],
        "ray_2trainers_vs_local": med["ray_2trainers_shared"] / med["local_2thread"],
        "ray_2trainers_calls_vs_local": med["ray_2trainers_calls"] / med["local_2thread"],
        "ray_2nodes_vs_local": med["ray_2nodes"] / med["local_2thread"],
        "ray_1trainer_vs_local_1thread": med["ray_1trainer"] / med["local_1thread"],
        "local_ms_per_step_1thread": ms["local_1thread"],
        "local_ms_per_step_2thread": ms["local_2thread"],
    }
    metrics["per_call_ms_fitted"], metrics["per_row_ms_fitted"] = per_call_cost(metrics)
    # the check: the fit (made with one exchange per step) predicts the run that exchanges every 4 steps
    every4 = metrics["calls_per_step_2node_idle_peer_every4_measured"]
    metrics["predicted_overhead_ms_per_step_2node_idle_peer_every4"] = every4 * (
        metrics["per_call_ms_fitted"] + metrics["per_row_ms_fitted"] * metrics["rows_per_call_2node_idle_peer_every4"])
    scaled = model(metrics, counts, args)
    for key in ("wikidata5m_16part_global", "freebase_16part_global", "freebase_16part_local",
                "freebase_16part_4pernode_global", "freebase_16part_4pernode_local", "freebase_16part_4pernode_every4_global",
                "freebase_16part_4pernode_every4_local", "freebase_16part_4pernode_every8_global",
                "freebase_16part_4pernode_every8_local"):
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
