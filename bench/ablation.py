"""The three-row ablation of the bidirectional job (issue 13): plain (``--directions none``), KG -> LM
(``kg2lm``) and both ways (``both``), each over several seeds, in sync mode (reproducible), on the embedded
default unless overridden. Every run is a fresh ``python jobs/bikd_full.py`` process with its own run
directory; per (directions, seed) the last round's valid metrics and the final KG test MRR are kept, and
the JSON reports per directions the median over seeds and the spread (min, max).

Metrics (valid unless named test): ``kg_valid_mrr``, ``kg_test_mrr`` (read once, after the last round),
the LM's task metrics with the KG table (``eval_*``: accuracy for triple classification, f1/exact for QA) and
without it (``eval_nokg_*``), the cloze probe's ``probe_p1`` / ``probe_nokg_p1``, ``mined`` (triples over all
rounds) and the last round's mined precision against valid.

    python bench/ablation.py                                  # ~70 min on 2 CPU cores (9 runs)
    python bench/ablation.py --name ablation_fb15k237_squad --config configs/bikd_fb15k237_squad_small.yaml
    python bench/ablation.py --seeds 0 --set loop.rounds=1 --allow-dirty --name ablation_smoke

The JSON is rewritten after every run (``details.complete`` false until the last). With ``--work-dir``, runs an
earlier, interrupted invocation finished there with the same config are kept, not rerun (each run records the
commit it was made at; a kept run's ``wall_s`` is null).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_common_args, run_bikd_full, start_run  # noqa: E402
from bikd.config import load_config, to_dict  # noqa: E402
from bikd.driver import BikdConfig  # noqa: E402

DIRECTIONS = ("none", "kg2lm", "both")


def keys_of(row: dict) -> list[str]:
    """The last round's numbers the ablation compares (the LM's eval metrics depend on its task)."""
    return ["kg_valid_mrr", *sorted(k for k, v in row.items() if k.startswith(("eval_", "probe_", "mined_precision"))
                                    and isinstance(v, (int, float)) and not k.endswith(("_seconds", "_per_s")))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--config", default=None, help="a bikd_full config file (default: the embedded default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="an override for every run")
    p.add_argument("--name", default="ablation_default", help="the result's name (bench/results/<name>.json)")
    p.add_argument("--work-dir", default=None)
    add_common_args(p)
    args = p.parse_args()
    run = start_run(args.name, args)
    per: dict[str, list[dict]] = {d: [] for d in DIRECTIONS}
    total = len(args.seeds) * len(DIRECTIONS)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        for seed in args.seeds:
            for d in DIRECTIONS:
                overrides = ["loop.mode=sync", f"loop.directions={d}", f"seed={seed}", *args.overrides]
                run_dir = work / f"{d}_seed{seed}"
                done = finished_run(run_dir, args.config, overrides)
                if done is None:
                    wall, rows, final = run_bikd_full(overrides, run_dir, args.config)
                    made_at = {"commit": run.commit}
                else:  # made by an earlier, interrupted invocation with this work dir: kept, not rerun
                    (rows, final), wall = done[:2], None
                    made_at = {"commit": done[2], "reused": True, "defaults_added_since": done[3]}
                last = rows[-1]
                got = {k: last.get(k) for k in keys_of(last)}
                got.update(kg_test_mrr=final["kg_test"]["mrr"], mined=sum(r.get("mined") or 0 for r in rows), wall_s=wall,
                           seed=seed, rounds=len(rows), **made_at)
                per[d].append(got)
                print(f"{d} seed {seed}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in got.items()), flush=True)
                # after every run: an interrupted ablation leaves the runs it finished, marked incomplete
                path = write(run, per, sum(map(len, per.values())), total)
    print(f"wrote {path}")


def write(run, per: dict[str, list[dict]], num_done: int, total: int) -> Path:
    metrics = {}
    for d, results in per.items():
        for k in sorted({k for r in results for k in r} - {"seed", "rounds", "commit", "reused", "defaults_added_since"}):
            values = [r[k] for r in results if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)]
            if values:
                metrics[f"{d}.{k}.median"] = statistics.median(values)
                metrics[f"{d}.{k}.min"], metrics[f"{d}.{k}.max"] = min(values), max(values)
    return run.write(metrics, {"runs": per, "complete": num_done == total, "runs_done": num_done, "runs_planned": total})


def finished_run(run_dir: Path, config: str | None, overrides: list[str]) -> tuple[list[dict], dict, str, list[str]] | None:
    """A run an earlier invocation finished in ``run_dir`` with this same config: (rows, final record, the
    commit it was made at, config keys this checkout has that it had not: defaults added since). An
    unfinished one is removed (rerun whole, at one commit); one with another config is an error."""
    progress = run_dir / "progress.json"
    if not run_dir.exists():
        return None
    final = json.loads(progress.read_text()) if progress.exists() else {}
    if not final.get("finished"):
        shutil.rmtree(run_dir)
        return None
    record = json.loads((run_dir / "run.json").read_text())
    want = json.loads(json.dumps(to_dict(load_config(BikdConfig, config, [f"run_dir={run_dir}", *overrides]))))
    added, differ = [], []
    compare(record["config"], want, "", added, differ)
    if differ:
        raise SystemExit(f"{run_dir} was made with another config ({', '.join(differ[:5])}): remove it or use another --work-dir")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows, final, record["environment"].get("git_commit", "unknown"), added


def compare(had: dict, want: dict, path: str, added: list[str], differ: list[str]) -> None:
    for key, value in want.items():
        where = f"{path}{key}"
        if key not in had:
            added.append(where)
        elif isinstance(value, dict) and isinstance(had[key], dict):
            compare(had[key], value, where + ".", added, differ)
        elif had[key] != value:
            differ.append(f"{where}: {had[key]!r} != {value!r}")


if __name__ == "__main__":
    main()
