"""Draw the labelled sample of bench/linking_quality.py: 300 random mentions of the FB15k-237 dictionary
linker (the linker as ``build_linker`` builds it, ``LinkerConfig`` as given), half from SQuAD v1.1 dev
passages and half from FB15k-237 entity descriptions (entity2text.txt, the text after ``Name -- ``; mentions
of the described entity itself, usually its name repeated at the start, are not drawn).

Each row: ``id``, ``source`` ("squad" or "description"), ``doc`` (passage index / entity MID), ``text``
(the whole passage or description, so the sample can be re-linked), ``start``/``end`` (char span in
``text``), ``surface``, ``entity`` (MID), ``entity_id``, ``name``, ``wikidata_label``,
``wikidata_description`` and ``context`` (about 150 chars around, the mention in [[ ]]). ``label`` and
``reason`` are left empty here: they are written by a person reading each row ("right": the text refers to
exactly that entity; "wrong": to another entity; "not_entity": a common word, no entity).

    python bench/linking_sample.py [--data-dir ../shared/data] [--out bench/data/linking_sample.jsonl]

The draw is uniform over mentions (not passages): seed 12, one ``random.Random`` for both halves.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import DATA_DIR  # noqa: E402
from bikd.kg.datasets import load_dataset, load_text  # noqa: E402
from bikd.kg.text import KGText  # noqa: E402
from bikd.lm.linking import EntityLinker, LinkerConfig  # noqa: E402

SEED, NUM_PER_SOURCE, CONTEXT_CHARS = 12, 150, 75


def squad_passages(path: Path) -> list[str]:
    data = json.loads(path.read_text(encoding="utf-8"))["data"]
    return [p["context"] for article in data for p in article["paragraphs"]]


def descriptions(text: KGText, entity_to_id) -> list[tuple[str, str]]:
    """(MID, description) of every entity of the id map that has one, in MID order."""
    return sorted((e, t.description) for e, t in text.entities.items() if e in entity_to_id and t.description)


def load(data_dir: Path):
    text = load_text("fb15k237", path=str(data_dir / "fb15k-237"))
    kg = load_dataset("fb15k237", path=str(data_dir / "fb15k-237"))
    return kg, text


def build(kg, text: KGText, cfg: LinkerConfig) -> EntityLinker:
    """The linker of ``bikd.lm.train.build_linker`` with an explicit config."""
    import torch

    degree = torch.bincount(kg.train[:, [0, 2]].flatten(), minlength=kg.num_entities).tolist()
    return EntityLinker.from_kg_text(text, kg.entities.to_id, cfg, degree=degree)


def context(text: str, start: int, end: int, chars: int = CONTEXT_CHARS) -> str:
    left, right = max(0, start - chars), min(len(text), end + chars)
    return ("..." if left else "") + text[left:start] + "[[" + text[start:end] + "]]" + text[end:right] + (
        "..." if right < len(text) else "")


def draw(kg, text: KGText, linker: EntityLinker, data_dir: Path) -> list[dict]:
    rng = random.Random(SEED)
    rows = []
    sources = [("squad", list(enumerate(squad_passages(data_dir / "squad-v1.1" / "dev-v1.1.json")))),
               ("description", descriptions(text, kg.entities.to_id))]
    for source, docs in sources:
        # a description's links to the entity it describes (its name repeated: "Poland, officially the
        # Republic of Poland, is ...") are not counted: that entity is the implicit subject
        own = kg.entities.to_id if source == "description" else {}
        pool = [(doc, body, m) for doc, body in docs for m in linker.link(body) if own.get(doc, -1) != m.entity]
        for doc, body, m in rng.sample(pool, NUM_PER_SOURCE):
            mid = kg.entities.labels[m.entity]
            wd = text.wikidata.get(mid)
            rows.append({
                "id": len(rows), "source": source, "doc": doc, "start": m.start_char, "end": m.end_char,
                "surface": m.surface, "entity": mid, "entity_id": m.entity, "name": text.name(mid),
                "wikidata_label": wd.label if wd else "", "wikidata_description": wd.description if wd else "",
                "context": context(body, m.start_char, m.end_char), "label": "", "reason": "", "text": body,
            })
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=str(DATA_DIR))
    p.add_argument("--out", default=str(Path(__file__).parent / "data" / "linking_sample.jsonl"))
    args = p.parse_args()
    kg, text = load(Path(args.data_dir))
    # the linker before issue 12's fixes: the rules added since are switched off
    rows = draw(kg, text, build(kg, text, LinkerConfig.before_issue_12()), Path(args.data_dir))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{len(rows)} mentions -> {out}")


if __name__ == "__main__":
    main()
