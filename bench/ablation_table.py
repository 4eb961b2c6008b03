"""The markdown tables of an ablation result (bench/ablation.py): one row per directions, each cell the median
over seeds with the range [min, max]; then the paired differences to the plain row (same seed, so the same
data order and initial weights), per seed and their median; docs/RESULTS.md pastes its output.

    python bench/ablation_table.py bench/results/ablation_default.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ROWS = {"none": "plain (`--directions none`)", "kg2lm": "KG -> LM (`kg2lm`)", "both": "both ways (`both`)"}
#: the columns, in order, where the result has them (the LM's task metrics depend on its task)
COLUMNS = {"kg_valid_mrr": "KG MRR valid", "kg_test_mrr": "KG MRR test", "eval_accuracy": "LM acc. (table)",
           "eval_nokg_accuracy": "LM acc. (no table)", "eval_f1": "LM F1 (table)", "eval_nokg_f1": "LM F1 (no table)",
           "eval_exact_match": "LM EM (table)", "eval_nokg_exact_match": "LM EM (no table)", "probe_p1": "probe P@1 (table)",
           "probe_nokg_p1": "probe P@1 (no table)", "mined": "mined triples",
           "mined_precision_at_100_valid": "mined P@100 vs valid (last round)", "wall_s": "wall (s)"}


def cell(metrics: dict, d: str, k: str) -> str:
    med, lo, hi = (metrics.get(f"{d}.{k}.{s}") for s in ("median", "min", "max"))
    if med is None:
        return "-"
    if k.endswith(("_f1", "_exact_match")):  # SQuAD's F1 and EM are percentages
        return f"{med:.1f} [{lo:.1f}, {hi:.1f}]"
    if k in ("mined", "wall_s"):
        return f"{med:.0f} [{lo:.0f}, {hi:.0f}]"
    return f"{med:.3f} [{lo:.3f}, {hi:.3f}]"


def table(result: dict, skip: tuple[str, ...] = ()) -> str:
    m = result["metrics"]
    cols = [k for k in COLUMNS if k not in skip and any(f"{d}.{k}.median" in m for d in ROWS)]
    lines = ["| | " + " | ".join(COLUMNS[k] for k in cols) + " |", "|---|" + "---|" * len(cols)]
    for d, name in ROWS.items():
        if any(key.startswith(f"{d}.") for key in m):
            lines.append(f"| {name} | " + " | ".join(cell(m, d, k) for k in cols) + " |")
    details = result["details"]
    seeds = sorted({r["seed"] for runs in details["runs"].values() for r in runs})
    # runs kept from an interrupted invocation carry the commit they were made at
    made = sorted({r.get("commit", result["commit"])[:12] for runs in details["runs"].values() for r in runs})
    commits = f"commit `{result['commit']}`" if made == [result["commit"][:12]] else "runs made at commits " + ", ".join(
        f"`{c}` (seeds {', '.join(str(s) for s in sorted({r['seed'] for runs in details['runs'].values() for r in runs if r.get('commit', result['commit'])[:12] == c}))})"
        for c in made)
    partial = "" if details.get("complete", True) else f" Incomplete: {details['runs_done']} of {details['runs_planned']} runs."
    return "\n".join(lines) + (f"\n\nMedian [min, max] over seeds {', '.join(map(str, seeds))}; {commits}, "
                               f"{result['date'][:10]}, {result['machine']}.{partial}")


#: the columns of the paired table (what fusion and mining should move)
PAIRED = ("kg_valid_mrr", "kg_test_mrr", "eval_accuracy", "eval_nokg_accuracy", "eval_f1", "eval_nokg_f1",
          "probe_p1", "probe_nokg_p1")


def paired(result: dict) -> str:
    """Per metric: each direction minus plain, seed by seed (the runs share seeds), and their median."""
    runs = result["details"]["runs"]
    plain = {r["seed"]: r for r in runs.get("none", [])}
    lines = ["| difference to plain (same seed) | " + " | ".join(d for d in ("kg2lm", "both") if d in runs) + " |",
             "|---|" + "---|" * sum(d in runs for d in ("kg2lm", "both"))]
    for k in PAIRED:
        cells = []
        for d in ("kg2lm", "both"):
            if d not in runs:
                continue
            diffs = [r[k] - plain[r["seed"]][k] for r in runs[d] if r["seed"] in plain
                     and isinstance(r.get(k), (int, float)) and isinstance(plain[r["seed"]].get(k), (int, float))]
            if not diffs:
                cells.append("-")
                continue
            digits = 1 if k.endswith("_f1") else 3
            cells.append(f"{statistics.median(diffs):+.{digits}f} (" + " / ".join(f"{x:+.{digits}f}" for x in diffs) + ")")
        if any(c != "-" for c in cells):
            lines.append(f"| {COLUMNS.get(k, k)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nMedian of the per-seed differences (the differences per seed in brackets, seed order)."


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("result", type=Path)
    p.add_argument("--skip", nargs="*", default=[], help="columns to leave out (e.g. wall_s)")
    args = p.parse_args()
    result = json.loads(args.result.read_text())
    print(table(result, tuple(args.skip)) + "\n\n" + paired(result))


if __name__ == "__main__":
    main()
