"""Entity-linking precision on a hand-labelled sample: the FB15k-237 dictionary linker before and after
issue 12's precision rules (``LinkerConfig``'s defaults), in one run.

The sample (bench/data/linking_sample.jsonl, drawn by bench/linking_sample.py with the linker before the
rules) holds 300 random mentions, 150 from SQuAD v1.1 dev passages and 150 from FB15k-237 entity
descriptions, each labelled by reading it: "right" (the text refers to exactly the linked entity),
"wrong" (to another entity) or "not_entity" (a common word, no entity).

- ``precision_before``: right / 300 (the sample is the old linker's output; the run checks that the old
  linker still finds every sampled mention).
- ``precision_after``: the same 300 texts re-linked with the new linker; a sampled mention counts when the
  new linker links the same span to the same entity, and precision is right / those still linked (a
  mention it drops no longer counts; ``right_lost`` of the right ones are dropped: a recall proxy). A span
  the new linker gives another entity needs a ``label_after`` in the sample (the run stops otherwise).
- ``mentions_per_passage`` (after) and ``_before``: over all 2,067 SQuAD v1.1 dev passages; the same per
  description (without links to the described entity itself).
- One row per rule: the old linker plus that rule alone, to see what each rule buys and costs.

    python bench/linking_quality.py [--data-dir ../shared/data] [--sample bench/data/linking_sample.jsonl]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import DATA_DIR, add_common_args, start_run  # noqa: E402
from bench.linking_sample import build, descriptions, load, squad_passages  # noqa: E402
from bikd.lm.linking import EntityLinker, LinkerConfig  # noqa: E402

LABELS = ("right", "wrong", "not_entity")
RULES = ("lowercase_names_only", "acronyms_match_capitals", "skip_cut_initialisms", "skip_name_fragments",
         "skip_language_adjectives")


def read_sample(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{lineno}: not valid JSON: {e}") from None
            for key in ("label", "label_after"):
                if key in row and row[key] not in LABELS:
                    raise SystemExit(f"{path}:{lineno}: {key} {row[key]!r} is not one of {LABELS}")
            if "label" not in row:
                raise SystemExit(f"{path}:{lineno}: the mention has no label")
            rows.append(row)
    return rows


def relink(linker: EntityLinker, rows: list[dict]) -> dict:
    """Precision of ``linker`` over the sampled mentions it still links (same span)."""
    kept, changed, lost = [], [], []
    for row in rows:
        same = [m for m in linker.link(row["text"]) if (m.start_char, m.end_char) == (row["start"], row["end"])]
        if not same:
            lost.append(row)
        elif same[0].entity == row["entity_id"]:
            kept.append(row["label"])
        elif "label_after" in row:
            changed.append(row)
            kept.append(row["label_after"])
        else:
            raise SystemExit(f"mention {row['id']} ({row['surface']!r}) now links entity {same[0].entity}, not "
                             f"{row['entity_id']}: label it as 'label_after' in the sample")
    counts = collections.Counter(kept)
    return {
        "precision": counts["right"] / max(1, len(kept)),
        "num_still_linked": len(kept),
        "right_lost": sum(r["label"] == "right" for r in lost),
        "wrong_dropped": sum(r["label"] == "wrong" for r in lost),
        "not_entity_dropped": sum(r["label"] == "not_entity" for r in lost),
        "num_entity_changed": len(changed),
        "counts": dict(counts),
        "lost": [[r["id"], r["surface"], r["name"], r["label"]] for r in lost],
    }


def per_text(linker: EntityLinker, texts: list[str], own: list[int] | None = None) -> float:
    """Mentions per text, links to the text's own entity (``own[k]``, descriptions) not counted."""
    own = own or [-1] * len(texts)
    return sum(sum(m.entity != e for m in linker.link(t)) for t, e in zip(texts, own)) / len(texts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=str(DATA_DIR))
    p.add_argument("--sample", default=str(Path(__file__).parent / "data" / "linking_sample.jsonl"))
    add_common_args(p)
    args = p.parse_args()
    run = start_run("linking_quality", args)
    data = Path(args.data_dir)
    rows = read_sample(Path(args.sample))
    kg, text = load(data)
    before_cfg, after_cfg = LinkerConfig.before_issue_12(), LinkerConfig()
    before, after = build(kg, text, before_cfg), build(kg, text, after_cfg)

    check = relink(before, rows)
    if check["num_still_linked"] != len(rows) or check["num_entity_changed"]:
        raise SystemExit(f"the old linker no longer finds {len(rows) - check['num_still_linked']} sampled mentions: "
                         f"{check['lost'][:5]}; redraw the sample")
    labels = collections.Counter(r["label"] for r in rows)
    res = relink(after, rows)

    squad = squad_passages(data / "squad-v1.1" / "dev-v1.1.json")
    desc = descriptions(text, kg.entities.to_id)
    desc_texts, desc_own = [d for _, d in desc], [kg.entities.to_id[e] for e, _ in desc]
    metrics = {
        "precision_before": labels["right"] / len(rows),
        "precision_after": res["precision"],
        "mentions_per_passage": per_text(after, squad),
        "mentions_per_passage_before": per_text(before, squad),
        "mentions_per_description": per_text(after, desc_texts, desc_own),
        "mentions_per_description_before": per_text(before, desc_texts, desc_own),
        "num_labelled": len(rows),
        "num_still_linked": res["num_still_linked"],
        "right_lost": res["right_lost"],
        "wrong_dropped": res["wrong_dropped"],
        "not_entity_dropped": res["not_entity_dropped"],
        "num_right_before": labels["right"],
    }
    for source in ("squad", "description"):
        part = [r for r in rows if r["source"] == source]
        metrics[f"precision_before_{source}"] = sum(r["label"] == "right" for r in part) / len(part)
        metrics[f"precision_after_{source}"] = relink(after, part)["precision"]
    rules = {}
    for rule in RULES:  # the old linker with one rule switched on
        linker = build(kg, text, LinkerConfig.before_issue_12(**{rule: True}))
        r = relink(linker, rows)
        rules[rule] = {k: r[k] for k in ("precision", "num_still_linked", "right_lost", "wrong_dropped",
                                          "not_entity_dropped")}
        rules[rule]["mentions_per_passage"] = per_text(linker, squad)
    details = {
        "sample": str(Path(args.sample).resolve().relative_to(Path(__file__).resolve().parents[1])),
        "labels_before": dict(labels),
        "labels_after": res["counts"],
        "config_before": asdict(before_cfg),
        "config_after": asdict(after_cfg),
        "linker_stats_before": asdict(before.stats),
        "linker_stats_after": asdict(after.stats),
        "one_rule_at_a_time": rules,
        "dropped_mentions": res["lost"],
        "squad": f"SQuAD v1.1 dev, all {len(squad)} passages",
        "descriptions": f"{len(desc_texts)} entity2text.txt descriptions (text after 'Name -- '), "
                        "links to the described entity not counted",
    }
    path = run.write(metrics, details)
    for k, v in metrics.items():
        print(f"  {k:36s} {v:.4g}" if isinstance(v, float) else f"  {k:36s} {v}")
    for rule, r in rules.items():
        print(f"  +{rule:34s} {r}")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
