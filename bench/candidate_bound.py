"""What the per-round candidate bound costs (issue 12, item 2): on FB15k-237 with bench/mining.py's teacher
and text, the share of the triples the unbounded candidates could yield that the bounded ones still can,
for several bounds; written to ``bench/results/candidate_bound.json``.

Candidates are generated exactly as in bench/mining.py and jobs/mine.py (descriptions + SQuAD fine-tune
paragraphs, co-mentions and the TransE teacher's top-k proposals for mentioned heads; train is all they
read). The bound's cost is then *measured* against held-out gold (valid and test: read here only to report,
they choose nothing) and, as the proxy jobs/mine.py's ``measure_bound_recall`` prints, against train.
What a bound costs in time is the scoring round, linear in it: bench/results/mining.json's
``round_seconds`` for its 20,000 candidates.

    python bench/candidate_bound.py                     # ~5 min on 2 CPU cores once the teacher is cached
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import DATA_DIR, add_common_args, start_run  # noqa: E402
from bench.mining import load_passages, load_teacher, log, teacher_config  # noqa: E402
from bikd.kg.datasets import load_dataset, load_text  # noqa: E402
from bikd.kg.store import KGVersion  # noqa: E402
from bikd.lm import corpus  # noqa: E402
from bikd.lm.train import build_linker  # noqa: E402
from bikd.mining.candidates import bound_recall, generate  # noqa: E402
from bikd.mining.round import MiningConfig, known_triples  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(DATA_DIR))
    p.add_argument("--cache", default="/tmp/bikd_mining", help="teacher cache (shared with bench/mining.py)")
    p.add_argument("--kge-epochs", type=int, default=30)
    p.add_argument("--bounds", default="5000,10000,20000,40000,80000")
    p.add_argument("--max-passages", type=int, default=None)
    p.add_argument("--max-pairs-per-passage", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    add_common_args(p)
    args = p.parse_args()
    run = start_run("candidate_bound", args)
    torch.set_num_threads(args.threads)
    kg_dir = str(Path(args.data_dir) / "fb15k-237")
    kg, text = load_dataset("fb15k237", path=kg_dir), load_text("fb15k237", path=kg_dir)
    teacher, _ = load_teacher(kg, teacher_config(args), Path(args.cache))
    passages, passage_counts = load_passages(kg, text, args)
    pairs, _ = corpus.pair_candidates(passages, build_linker(kg, text), max_pairs_per_passage=args.max_pairs_per_passage)
    version = KGVersion.gold_only(kg)
    known = known_triples(version)
    base = MiningConfig().candidates
    default = base.max_candidates

    def candidates(bound: int | None):
        start = time.perf_counter()
        cfg = dataclasses.replace(base, max_candidates=bound or default)
        out = generate(pairs, passages, known, teacher.model.score_t, kg.num_entities, kg.num_relations, cfg,
                       bounded=bound is not None)
        return out, time.perf_counter() - start

    everything, seconds = candidates(None)
    log(f"unbounded: {len(everything.candidates)} candidates in {seconds:.0f} s: {everything.counts}")
    gold = {s: [tuple(x) for x in getattr(kg, s).tolist()] for s in ("train", "valid", "test")}
    rows = {}
    for bound in sorted({int(b) for b in args.bounds.split(",")} | {default}):  # the default is always measured
        bounded, seconds = candidates(bound)
        row = {"candidates": len(bounded.candidates), "seconds": round(seconds, 1), **bounded.counts}
        for split, triples in gold.items():
            row[f"recall_{split}"] = bound_recall(everything.candidates, bounded.candidates, triples)
        row["recall_held_out"] = bound_recall(everything.candidates, bounded.candidates, gold["valid"] + gold["test"])
        rows[bound] = row
        log(f"bound {bound}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k.startswith("recall")))
    at = rows[default]
    metrics = {"default_bound": default, "num_unbounded_candidates": len(everything.candidates),
               "recall_held_out_at_default": at["recall_held_out"], "recall_train_at_default": at["recall_train"]}
    for bound, row in rows.items():
        metrics[f"recall_held_out_at_{bound}"] = row["recall_held_out"]
    path = run.write(metrics, {"passages": passage_counts, "unbounded_counts": everything.counts, "bounds": rows,
                               "reach": "a co-mention candidate reaches every relation of its pair, a proposal only its "
                                        "own triple; recall = reached by the bounded set / by the unbounded set"},
                     out_dir=args.out)
    print(path)


if __name__ == "__main__":
    main()
