"""The markdown table of an ablation result (bench/ablation.py): one row per directions, each cell the median
over seeds with the range [min, max]; docs/RESULTS.md pastes its output.

    python bench/ablation_table.py bench/results/ablation_default.json
"""

from __future__ import annotations

import argparse
import json
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


def table(result: dict) -> str:
    m = result["metrics"]
    cols = [k for k in COLUMNS if any(f"{d}.{k}.median" in m for d in ROWS)]
    lines = ["| | " + " | ".join(COLUMNS[k] for k in cols) + " |", "|---|" + "---|" * len(cols)]
    for d, name in ROWS.items():
        if any(key.startswith(f"{d}.") for key in m):
            lines.append(f"| {name} | " + " | ".join(cell(m, d, k) for k in cols) + " |")
    seeds = sorted({r["seed"] for runs in result["details"]["runs"].values() for r in runs})
    return "\n".join(lines) + (f"\n\nMedian [min, max] over seeds {', '.join(map(str, seeds))}; commit `{result['commit']}`, "
                               f"{result['date'][:10]}, {result['machine']}.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("result", type=Path)
    print(table(json.loads(p.parse_args().result.read_text())))


if __name__ == "__main__":
    main()
