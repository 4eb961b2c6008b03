"""End to end (issue 13): the default bidirectional job, timed, and what the exchange costs each side.

In one sitting, on the same machine, every run a fresh ``python jobs/bikd_full.py`` process on the embedded
default (the FB15k-237 slice, MiniLM, 3 rounds) with its own run directory:

1. ``async`` (the default): its wall time is ``default_wall_s``;
2. ``sync``, directions ``both``;
3. ``sync``, directions ``none`` (each side alone: no snapshots, no mining, no added triples) with the
   same resources.

``kge_joint_vs_alone`` / ``lm_joint_vs_alone``: each side's median per-round throughput (KGE positive
triples/s, LM rows/s) in run 2 over run 3. Sync mode alternates the sides, so neither shares cores with
the other there: the ratio is the cost of exchanging (publishing and swapping snapshots, polling, training
on added triples), not of sharing 2 cores (in async mode, on 2 cores, it would be mostly the latter: the
async run's per-side throughputs are in ``details``). ``async_vs_sync_wall``: run 1's wall time over run
2's. Wall times include Ray start-up and the final test evaluation, as a user sees them.

    python bench/e2e.py                 # ~25 min on 2 CPU cores
    python bench/e2e.py --set loop.rounds=2 --allow-dirty   # extra overrides for every run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_common_args, run_bikd_full, start_run  # noqa: E402

RUNS = {"async_both": ["loop.mode=async"], "sync_both": ["loop.mode=sync"],
        "sync_none": ["loop.mode=sync", "loop.directions=none"]}


def run_job(name: str, overrides: list[str], run_dir: Path) -> dict:
    wall, rows, progress = run_bikd_full(overrides, run_dir)
    print(f"{name}: {wall:.0f} s, {len(rows)} rounds", flush=True)
    return {"wall_s": wall, "rows": rows, "final": progress}


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows if isinstance(r.get(key), (int, float)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", dest="overrides", action="append", default=[], help="an override for every run")
    p.add_argument("--work-dir", default=None, help="where the run directories go (default: a temporary folder)")
    add_common_args(p)
    args = p.parse_args()
    run = start_run("e2e", args)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        results = {name: run_job(name, [*extra, *args.overrides], work / name) for name, extra in RUNS.items()}
    a, both, none = results["async_both"], results["sync_both"], results["sync_none"]
    metrics = {
        "default_wall_s": round(a["wall_s"], 1),
        "kge_joint_vs_alone": median(both["rows"], "kge_triples_per_s") / median(none["rows"], "kge_triples_per_s"),
        "lm_joint_vs_alone": median(both["rows"], "rows_per_s") / median(none["rows"], "rows_per_s"),
        "async_vs_sync_wall": a["wall_s"] / both["wall_s"],
        "sync_wall_s": round(both["wall_s"], 1),
        "sync_none_wall_s": round(none["wall_s"], 1),
        "async_kge_triples_per_s_median": median(a["rows"], "kge_triples_per_s"),
        "async_lm_rows_per_s_median": median(a["rows"], "rows_per_s"),
        "default_final_kg_valid_mrr": a["rows"][-1]["kg_valid_mrr"],
        "default_kg_test_mrr": a["final"]["kg_test"]["mrr"],
    }
    keep = ("round", "kge_triples_per_s", "rows_per_s", "kg_valid_mrr", "eval_accuracy", "eval_nokg_accuracy", "probe_p1",
            "probe_nokg_p1", "mined", "kg_staleness", "kge_seconds", "lm_seconds", "mining_seconds", "wall_s")
    details = {name: {"wall_s": r["wall_s"], "final": r["final"], "rounds": [{k: row.get(k) for k in keep} for row in r["rows"]]}
               for name, r in results.items()}
    path = run.write(metrics, details)
    print(json.dumps(metrics, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
