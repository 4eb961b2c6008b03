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
  (many and few rows a call), exchanging every 1, 4 and 8 steps: the other node's core is free to serve, as on
  a cluster node with a core for its server. Each run also reports the trainer thread's time in the exchange
  and the serving process's CPU per call; one fit of all six gives the per-step, per-call and per-row costs
  the model uses, and each run is checked against it. (4 simulated nodes on 2 cores would time contention,
  not the network.)

Then the model: for FB15k-237, Wikidata5M and Freebase, memory per partition, the exchange per step at
4 and 16 partitions (one per node, or 16 on 4 nodes) against a step's compute, and the cores the node servers
keep busy (docs/SCALING.md says how each number is made).

    python bench/kge_scaling.py [--data-dir ../shared/data/fb15k-237] [--reps 5]   # ~11 min on 2 cores
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
    """Positives/s of the async Ray path (median of timed epochs after one warm-up) and its calls per step.
    ``only_first``: only partition 0's trainer trains; the others just hold their rows (their node's server,
    or with ``cross="trainer"`` the idle trainer itself, answers on a core nobody trains on); then also the
    trainer's rows pulled, its thread's time in the node exchange per step, and the other node's server's
    calls, rows and CPU time."""
    import ray

    from bikd.ray.kge import DistConfig
    from bikd.ray.sharded import ShardedKGE

    dist = DistConfig(num_parts=parts, mode="async", cpus_per_trainer=cpus, same_node_rows=rows, cross_node_rows=cross,
                      negatives=negatives, exchange_every=every)
    sharded = ShardedKGE(kg.train, kg.num_entities, kg.num_relations, bikd_config(args, args.negatives), dist)
    try:
        if only_first:
            first = sharded.trainers[0]
            here = ray.get(first.node_id.remote())
            servers = [s for node, group in sharded.servers.items() if node != here for s in group]
            stats = []
            for _ in range(1 + args.ray_epochs):
                before, served = ray.get(first.counters.remote()), ray.get([s.counters.remote() for s in servers])
                epoch = ray.get(first.run_epoch.remote())
                d = ray.get(first.counters.remote()) - before
                steps = max(d.steps, 1)
                stat = {"triples_per_s": epoch["triples"] / epoch["seconds"], "calls_per_step": d.calls / steps,
                        "rows_per_step": d.rows_pulled / steps, "exchange_ms_per_step": d.exchange_s / steps * 1e3}
                if servers:
                    sd = ray.get(servers[0].counters.remote()) - served[0]
                    stat |= {"server_rows_per_call": sd.rows / max(sd.calls, 1),
                             "server_cpu_ms_per_call": sd.cpu_s / max(sd.calls, 1) * 1e3}
                stats.append(stat)
            stats = stats[1:]
        else:
            stats = [sharded.train_epoch() for _ in range(1 + args.ray_epochs)][1:]
    finally:
        sharded.shutdown()
    out = {"pos_per_s": statistics.median(s["triples_per_s"] for s in stats),
           "epochs_pos_per_s": [s["triples_per_s"] for s in stats]}
    return out | {k: statistics.median(s[k] for s in stats) for k in stats[0] if k != "triples_per_s"}


#: the idle-peer runs through node servers: (negatives, steps per exchange) -> setting; their exchange costs
#: are what the model is fitted to (global negatives pull many rows a call, local ones few; windows cut calls)
IDLE_PEER = {(neg, every): "ray_2nodes_idle_peer" + ("_local_neg" if neg == "local" else "") + (f"_every{every}" if every > 1 else "")
             for neg in ("global", "local") for every in (1, 4, 8)}


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
            for (neg, every), key in IDLE_PEER.items():
                runs.setdefault(key, []).append(ray_epochs(kg, args, 2, "shared", 1.0, only_first=True, negatives=neg, every=every))
            runs.setdefault("ray_2nodes_idle_peer_trainer", []).append(
                ray_epochs(kg, args, 2, "shared", 1.0, cross="trainer", only_first=True))
        finally:
            ray.shutdown()
            cluster.shutdown()
        print(f"rep {rep}: " + ", ".join(f"{k} {v[-1]['pos_per_s']:,.0f}" for k, v in runs.items()), flush=True)
    return runs


def fit(points: list[tuple[list[float], float]]) -> list[float]:
    """Least squares, non-negative by clipping: coefficients of ``y = sum(c_i * x_i)`` over (x, y) points."""
    import numpy as np

    x, y = np.array([p[0] for p in points]), np.array([p[1] for p in points])
    return [max(0.0, float(c)) for c in np.linalg.lstsq(x, y, rcond=None)[0]]


def exchange_fit(idle: dict) -> dict:
    """The exchange's cost, fitted to the six idle-peer runs (medians), each a point: per step, per call and per
    row (of ``--dim`` floats) pulled, for (1) the trainer thread's measured time in the exchange (what a step
    pays where Ray's threads and the server have cores of their own) and (2) the step's measured overhead over
    LocalTrainer at 1 thread (the same plus this 2-core machine's contention); and the serving process's CPU
    per call, per call and per row served (pulled and pushed)."""
    def per_step(target: str) -> list[float]:
        return fit([([1.0, r["calls_per_step"], r["rows_per_step"]], r[target]) for r in idle.values()])

    out = {"exchange": per_step("exchange_ms_per_step"), "overhead": per_step("overhead_ms_per_step"),
           "server": fit([([1.0, r["server_rows_per_call"]], r["server_cpu_ms_per_call"]) for r in idle.values()])}
    for key, r in idle.items():  # how well each run is predicted by the fit made from all six
        for name, target in (("exchange", "exchange_ms_per_step"), ("overhead", "overhead_ms_per_step")):
            s, c, row = out[name]
            r[f"{name}_predicted"] = s + c * r["calls_per_step"] + row * r["rows_per_step"]
    return out


def model(fitted: dict, counts: dict, local_ms_2thread: float, args) -> dict:
    """Memory per partition and the exchange per step against compute, for each dataset at 4 partitions and
    at 16 (one per node, or 4 nodes of 4).

    A step's exchange is the fitted cost (``exchange_fit``) of the calls and rows counted for the layout, the
    rows scaled by width: per step + calls x per call + rows x per row; the pulls are sent a step (a window)
    ahead, so the bytes' time on an assumed link is charged only where it exceeds the compute it overlaps. The
    same with the fit to step overheads gives the 2-core machine's figure. A node's servers answer every
    trainer on the other nodes: parts per node x calls per step x CPU per call (its rows pulled and pushed),
    over a step's compute, is the cores they keep busy (``server_cores``; each server process is one core's
    worth of Python, so a node needs ``DistConfig.servers_per_node`` >= that). Compute is LocalTrainer's
    measured step at 2 threads, scaled by dim."""
    out = {}
    (s, c, r), (s2, c2, r2), (a, b) = fitted["exchange"], fitted["overhead"], fitted["server"]
    for name, (num_ent, num_rel, num_triples, dim) in DATASETS.items():
        for num_parts, per_node, every in MODEL_LAYOUTS:
            for neg in ("global", "local"):
                key = layout_key(num_parts, per_node, neg, every)
                cnt = counts[key]
                # a step's shape is the batch's, not the graph's: the counted rows per step carry over; the
                # remote share is FB15k-237's METIS cut (dense, so hard to cut: an upper bound for sparser graphs)
                rows, calls, scale = cnt["server_rows_per_step"], cnt["server_calls_per_step"], dim / args.dim
                pull_mb = rows * 4 * dim / 1e6
                compute_ms = local_ms_2thread * scale
                wire_ms = max(0.0, pull_mb / (NETWORK_GBPS / 8 * 1e3) * 1e3 - compute_ms)
                exchange_ms = s + c * calls + r * rows * scale + wire_ms
                contended_ms = s2 + c2 * calls + r2 * rows * scale + wire_ms
                served_ms = per_node * calls * (a + b * 2 * rows / max(calls, 1e-9) * scale)
                out[f"{name}_{key}"] = {
                    "entities": num_ent, "relations": num_rel, "triples": num_triples, "dim": dim,
                    "num_parts": num_parts, "parts_per_node": per_node, "exchange_every": every, "negatives": neg,
                    # rows and row-wise Adagrad state (one float per row), and the partition's triples (int64)
                    "memory_gb_per_part": (num_ent / num_parts * (dim + 1) * 4 + num_triples / num_parts * 3 * 8) / 1e9,
                    "remote_rows_per_step": cnt["remote_rows_per_step"], "server_calls_per_step": calls,
                    "pull_mb_per_step": pull_mb, "exposed_wire_ms_per_step": wire_ms, "exchange_ms_per_step": exchange_ms,
                    "compute_ms_per_step": compute_ms, "exchange_vs_compute": exchange_ms / compute_ms,
                    "exchange_vs_compute_2core": contended_ms / compute_ms, "server_cores": served_ms / compute_ms}
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
        lines.append(f"| {k} | {v:,.0f} | {v / med[base]:.2f}x ({base}) | {training_trainers(k) * 1024 / v * 1e3:.1f} | {calls:.2f} |")
    lines += ["", "| idle-peer run | calls / step | rows pulled / step | exchange ms / step (trainer thread) | fit | "
              "step overhead ms (vs LocalTrainer 1 thread) | fit | server rows / call | server CPU ms / call |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k, r in d["idle_peer"].items():
        lines.append(f"| {k.removeprefix('ray_2nodes_idle_peer').lstrip('_') or 'global, every step'} | {r['calls_per_step']:.2f} | "
                     f"{r['rows_per_step']:,.0f} | {r['exchange_ms_per_step']:.2f} | {r['exchange_predicted']:.2f} | "
                     f"{r['overhead_ms_per_step']:.2f} | {r['overhead_predicted']:.2f} | {r['server_rows_per_call']:,.0f} | "
                     f"{r['server_cpu_ms_per_call']:.2f} |")
    lines += ["", "| graph | parts | per node | steps per exchange | negatives | entities | dim | GB per partition | "
              "pulled MB / step | server calls / step | exchange ms / step | compute ms / step | exchange / compute | "
              "same, 2-core fit | node server cores |",
              "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, r in d["model"].items():
        lines.append(f"| {key.split('_')[0]} | {r['num_parts']} | {r['parts_per_node']} | {r['exchange_every']} | {r['negatives']} | "
                     f"{r['entities']:,} | "
                     f"{r['dim']} | {r['memory_gb_per_part']:.2f} | {r['pull_mb_per_step']:.2f} | {r['server_calls_per_step']:.2f} | "
                     f"{r['exchange_ms_per_step']:.1f} | {r['compute_ms_per_step']:.1f} | {r['exchange_vs_compute']:.0%} | "
                     f"{r['exchange_vs_compute_2core']:.0%} | {r['server_cores']:.1f} |")
    lines += ["", f"(from `{result['benchmark']}` at commit {result['commit']}, {result['date']}; load average "
              f"{result.get('loadavg_start')} -> {result.get('loadavg_end')}; "
              f"ray_2trainers_vs_local {m['ray_2trainers_vs_local']:.2f}; fitted exchange on the trainer thread "
              f"{m['exchange_per_step_ms_fitted']:.2f} ms per step + {m['exchange_per_call_ms_fitted']:.2f} ms per call + "
              f"{m['exchange_per_row_ms_fitted'] * 1e3:.2f} us per row (worst run {m['exchange_fit_max_rel_error']:.0%} off); "
              f"2-core step overhead {m['overhead_per_step_ms_fitted']:.2f} + {m['overhead_per_call_ms_fitted']:.2f} per call + "
              f"{m['overhead_per_row_ms_fitted'] * 1e3:.2f} us per row (worst {m['overhead_fit_max_rel_error']:.0%} off); "
              f"node server {m['server_per_call_ms_fitted']:.2f} ms CPU per call + {m['server_per_row_ms_fitted'] * 1e3:.2f} us "
              f"per row served)"]
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
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions of every timed setting (median)")
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
    # the idle-peer runs' medians, each with its step's overhead over LocalTrainer at 1 thread
    idle = {key: {m: statistics.median(r[m] for r in runs[key]) for m in runs[key][0] if m != "epochs_pos_per_s"}
            | {"overhead_ms_per_step": trainer_ms[key] - ms["local_1thread"]} for key in IDLE_PEER.values()}
    fitted = exchange_fit(idle)
    metrics = {
        "overhead_ms_per_step_1node": trainer_ms["ray_1trainer"] - ms["local_1thread"],
        "overhead_ms_per_step_2node": trainer_ms["ray_2nodes"] - ms["local_1thread"],
        "overhead_ms_per_step_2node_trainer": trainer_ms["ray_2nodes_trainer"] - ms["local_1thread"],
        "overhead_ms_per_step_2node_idle_peer_trainer": trainer_ms["ray_2nodes_idle_peer_trainer"] - ms["local_1thread"],
        "calls_per_step_2node_measured": calls["ray_2nodes"],
        "calls_per_step_2node_trainer_measured": calls["ray_2nodes_trainer"],
        "overhead_ms_per_step_2trainers_shared": trainer_ms["ray_2trainers_shared"] - ms["local_1thread"],
        "overhead_ms_per_step_2trainers_calls": trainer_ms["ray_2trainers_calls"] - ms["local_1thread"],
        "remote_rows_per_step_2part": counts["2part_global"]["remote_rows_per_step"],
        "remote_rows_per_step_4part": counts["4part_global"]["remote_rows_per_step"],
        "remote_rows_per_step_16part": counts["16part_global"]["remote_rows_per_step"],
        "remote_rows_per_step_4part_local_neg": counts["4part_local"]["remote_rows_per_step"],
        "calls_per_step_4part": counts["4part_global"]["calls_per_step"],
        "server_calls_per_step_16part_local": counts["16part_local"]["server_calls_per_step"],
        "server_calls_per_step_16part_4pernode_local": counts["16part_4pernode_local"]["server_calls_per_step"],
        "ray_2trainers_vs_local": med["ray_2trainers_shared"] / med["local_2thread"],
        "ray_2trainers_calls_vs_local": med["ray_2trainers_calls"] / med["local_2thread"],
        "ray_2nodes_vs_local": med["ray_2nodes"] / med["local_2thread"],
        "ray_1trainer_vs_local_1thread": med["ray_1trainer"] / med["local_1thread"],
        "local_ms_per_step_1thread": ms["local_1thread"],
        "local_ms_per_step_2thread": ms["local_2thread"],
    }
    for key, r in idle.items():
        name = key.removeprefix("ray_")
        metrics[f"{name}_vs_local_1thread"] = med[key] / med["local_1thread"]
        metrics |= {f"{m}_{name}": r[m] for m in ("overhead_ms_per_step", "exchange_ms_per_step", "exchange_predicted",
                                                   "overhead_predicted", "calls_per_step", "rows_per_step",
                                                   "server_cpu_ms_per_call", "server_rows_per_call")}
    for name, coefs in fitted.items():
        labels = ("per_call", "per_row") if name == "server" else ("per_step", "per_call", "per_row")
        metrics |= {f"{name}_{label}_ms_fitted": v for label, v in zip(labels, coefs)}
    # the worst of the six runs against the fit made from all of them
    metrics["exchange_fit_max_rel_error"] = max(abs(r["exchange_predicted"] / r["exchange_ms_per_step"] - 1) for r in idle.values())
    metrics["overhead_fit_max_rel_error"] = max(abs(r["overhead_predicted"] / r["overhead_ms_per_step"] - 1) for r in idle.values())
    scaled = model(fitted, counts, ms["local_2thread"], args)
    for key in ("wikidata5m_16part_global", "freebase_16part_global", "freebase_16part_local",
                "freebase_16part_4pernode_global", "freebase_16part_4pernode_local", "freebase_16part_4pernode_every4_global",
                "freebase_16part_4pernode_every4_local", "freebase_16part_4pernode_every8_global",
                "freebase_16part_4pernode_every8_local"):
        for m in ("exchange_vs_compute", "exchange_vs_compute_2core", "server_cores", "memory_gb_per_part"):
            metrics[f"{key}_{m}"] = scaled[key][m]
    for k, v in metrics.items():
        print(f"{k}: {v:.4g}")
    path = run.write(metrics, {"counts": counts, "runs": runs, "medians_pos_per_s": med, "idle_peer": idle,
                               "fitted": fitted, "model": scaled,
                               "network_gbps_assumed": NETWORK_GBPS, "datasets_quoted": DATASETS,
                               "timed_seconds": time.perf_counter() - t0})
    print(tables(json.loads(Path(path).read_text())))
    print(path)


if __name__ == "__main__":
    main()
