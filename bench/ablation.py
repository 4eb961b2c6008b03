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
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        for seed in args.seeds:
            for d in DIRECTIONS:
                wall, rows, final = run_bikd_full(["loop.mode=sync", f"loop.directions={d}", f"seed={seed}", *args.overrides],
                                                  work / f"{d}_seed{seed}", args.config)
                last = rows[-1]
                got = {k: last.get(k) for k in keys_of(last)}
                got.update(kg_test_mrr=final["kg_test"]["mrr"], mined=sum(r.get("mined") or 0 for r in rows), wall_s=wall,
                           seed=seed, rounds=len(rows))
                per[d].append(got)
                print(f"{d} seed {seed}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in got.items()), flush=True)
    metrics = {}
    for d, results in per.items():
        for k in sorted({k for r in results for k in r} - {"seed", "rounds"}):
            values = [r[k] for r in results if isinstance(r.get(k), (int, float))]
            if values:
                metrics[f"{d}.{k}.median"] = statistics.median(values)
                metrics[f"{d}.{k}.min"], metrics[f"{d}.{k}.max"] = min(values), max(values)
    path = run.write(metrics, {"runs": per})
    print(json.dumps(metrics, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
