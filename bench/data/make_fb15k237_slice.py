"""Build the embedded ``fb15k237_slice`` dataset (``bikd/kg/data/fb15k237_slice/``) from FB15k-237.

    python bench/data/make_fb15k237_slice.py [--src DIR] [--out DIR] [--num-entities N]

``--src``: the FB15k-237 folder of the benchmark data (default ``$BIKD_DATA_DIR/fb15k-237``, else
``../shared/data/fb15k-237`` beside the checkout); ``--out``: default the package folder above.

The slice is dense: the ``N`` entities (default 2000) of highest degree in FB15k-237's train split (ties by
MID), and every train/valid/test triple whose head and tail are both among them. Valid and test keep
FB15k-237's own split; a valid/test triple whose entity or relation never occurs in the sliced train is
dropped here, as ``bikd.kg.datasets.load_dataset`` would drop it. The text files (``entity2text.txt``:
``mid<TAB>Name -- description``; ``relation2text.txt``; ``entity2wikidata.json`` with the fields
``bikd.kg.text.load_wikidata`` reads, aliases included) cover exactly the entities and relations of the
sliced train. ``entity2name.txt`` is not shipped: ``load_text`` reads it only when ``entity2text.txt`` is
absent.

Every data file is xz-compressed (``<name>.xz``, LF line ends, sorted, no timestamps in the container), so
the output is byte-for-byte reproducible; ``README.md`` (sources, licences, this command, the counts) is
written beside them. The script prints sizes and counts and, if the folder would exceed ``MAX_BYTES``, exits
with status 1 before writing anything (lower ``--num-entities`` then; nothing is truncated). Standard
library only.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import lzma
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "bikd" / "kg" / "data" / "fb15k237_slice"
DEFAULT_NUM_ENTITIES = 2000
MAX_BYTES = 1_000_000  # the whole output folder, README included
SPLITS = ("train", "valid", "test")
# what load_wikidata reads (bikd/kg/text.py); anything else in a record is dropped
WIKIDATA_FIELDS = ("wikidata_id", "label", "alternatives", "description", "wikipedia")
XZ_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]

Triple = tuple[str, str, str]


def default_src() -> Path:
    data = os.environ.get("BIKD_DATA_DIR")
    return (Path(data) if data else ROOT.parent / "shared" / "data") / "fb15k-237"


def read_lines(path: Path) -> list[str]:
    """Lines without their CRLF/LF ends or a BOM; blank lines and ``#`` comments skipped."""
    out = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        for raw in f:
            line = raw.rstrip("\r\n")
            if line.strip() and not line.startswith("#"):
                out.append(line)
    return out


def read_triples(path: Path) -> list[Triple]:
    triples = []
    for lineno, line in enumerate(read_lines(path), start=1):
        cols = [c.strip() for c in line.split("\t")]
        if len(cols) != 3 or not all(cols):
            sys.exit(f"{path}: line {lineno}: expected head<TAB>relation<TAB>tail, got {line[:200]!r}")
        triples.append((cols[0], cols[1], cols[2]))
    return triples


def read_two_columns(path: Path) -> dict[str, str]:
    """``key<TAB>value`` -> {key: the whole line}, as ``bikd.kg.text`` keys it."""
    out = {}
    for line in read_lines(path):
        key, sep, _ = line.partition("\t")
        if not sep:
            sys.exit(f"{path}: expected 'id<TAB>text', got {line[:200]!r}")
        out[key.strip()] = line
    return out


def select_entities(train: list[Triple], num_entities: int) -> set[str]:
    degree: collections.Counter[str] = collections.Counter()
    for h, _, t in train:
        degree[h] += 1
        degree[t] += 1
    return set(sorted(degree, key=lambda e: (-degree[e], e))[:num_entities])


def slice_splits(raw: dict[str, list[Triple]], keep: set[str]) -> tuple[dict[str, list[Triple]], dict[str, int]]:
    """The triples among ``keep``, sorted and deduplicated; valid/test limited to the sliced train's ids.
    Also returns, per valid/test split, how many in-slice triples were dropped for that."""
    inside = {s: sorted({x for x in raw[s] if x[0] in keep and x[2] in keep}) for s in SPLITS}
    entities = {e for h, _, t in inside["train"] for e in (h, t)}
    relations = {r for _, r, _ in inside["train"]}
    out, dropped = {"train": inside["train"]}, {}
    for s in ("valid", "test"):
        out[s] = [x for x in inside[s] if x[0] in entities and x[2] in entities and x[1] in relations]
        dropped[s] = len(inside[s]) - len(out[s])
    return out, dropped


def xz(data: bytes) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, filters=XZ_FILTERS)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def readme(num_entities: int, counts: dict[str, int], dropped: dict[str, int], files: dict[str, tuple[int, int]],
           sources: dict[str, str]) -> str:
    data_bytes = sum(size for size, _ in files.values())
    file_rows = "\n".join(f"| `{name}` | {size:,} | {raw:,} |" for name, (size, raw) in files.items())
    source_rows = "\n".join(f"| `{name}` | `{digest}` |" for name, digest in sources.items())
    return f"""# fb15k237_slice: a dense slice of FB15k-237 with entity text

The embedded default KG with text: `load_dataset("fb15k237_slice")`, `load_text("fb15k237_slice")`,
`DataConfig(dataset="fb15k237_slice")`. It needs no external data. Built by
`bench/data/make_fb15k237_slice.py` from the FB15k-237 files of the benchmark data folder
(`../shared/data/fb15k-237`); do not edit these files by hand.

## How it was built

    python bench/data/make_fb15k237_slice.py --num-entities {num_entities}

(`--src` defaults to `$BIKD_DATA_DIR/fb15k-237`, else `../shared/data/fb15k-237` beside the checkout;
`--out` to this folder). The script is deterministic: rerunning it gives these files byte for byte.

- Entities: the {num_entities:,} entities of highest degree in FB15k-237's train split (ties broken by MID);
  those with no train triple to another of them drop out.
- Triples: every train/valid/test triple whose head and tail are both selected. Valid and test keep
  FB15k-237's own split; valid/test triples whose entity or relation never occurs in the sliced train
  are dropped here, as the loader would drop them ({dropped['valid']} valid, {dropped['test']} test).
- Text: exactly the sliced train's entities and relations. `entity2text.txt` (`mid<TAB>Name -- description`;
  every entity has a name, {counts['described']:,} have a description, as in the source),
  `relation2text.txt` (`relation<TAB>text`), `entity2wikidata.json` (mid -> `wikidata_id`, `label`,
  `alternatives` (aliases, for entity linking), `description`, `wikipedia`; {counts['wikidata']:,} of the
  {counts['entities']:,} entities have a Wikidata record). `entity2name.txt` is not shipped: the loader reads
  it only when `entity2text.txt` is absent.
- Format: the loader's formats, UTF-8, LF line ends, sorted, each file xz-compressed (`<name>.xz`).

## Counts

| what | count |
|---|---|
| entities | {counts['entities']:,} |
| relations | {counts['relations']:,} |
| train triples | {counts['train']:,} |
| valid triples | {counts['valid']:,} |
| test triples | {counts['test']:,} |
| entities with a description | {counts['described']:,} |
| entities with a Wikidata record | {counts['wikidata']:,} |
| compressed data bytes (this README excluded) | {data_bytes:,} |

| file | bytes | uncompressed bytes |
|---|---|---|
{file_rows}

## Sources and licences

- Triples: FB15k-237 (Toutanova & Chen, 2015), derived from Freebase (Freebase data: CC BY 2.5); the files
  of the ConvE repository (TimDettmers/ConvE, `FB15k-237.tar.gz`, MIT).
- Entity descriptions (`entity2text.txt`, after ` -- `): first sentences of the entities' Wikipedia
  articles (Wikipedia text, CC BY-SA), from the StAR_KGC repository
  (`StAR/data/FB15k-237/fb-entity2text-new.txt`).
- Entity names (`entity2text.txt`, before ` -- `; identical to kg-bert's `entity2name.txt`) and relation
  text (`relation2text.txt`): the kg-bert repository (Apache-2.0).
- Wikidata ids, labels, aliases and descriptions (`entity2wikidata.json`): Wikidata (CC0), via
  villmow/datasets_knowledge_embedding (MIT).

Source files read (SHA-256):

| file | sha256 |
|---|---|
{source_rows}
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", type=Path, default=None, help="FB15k-237 folder (default: $BIKD_DATA_DIR/fb15k-237 or ../shared/data/fb15k-237)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT.relative_to(ROOT)})")
    p.add_argument("--num-entities", type=int, default=DEFAULT_NUM_ENTITIES, help="entities to select by train degree")
    args = p.parse_args(argv)
    src: Path = args.src or default_src()
    if args.num_entities < 2:
        p.error("--num-entities must be at least 2")
    needed = [f"{s}.txt" for s in SPLITS] + ["entity2text.txt", "relation2text.txt", "entity2wikidata.json"]
    if missing := [n for n in needed if not (src / n).is_file()]:
        p.error(f"{src} lacks {', '.join(missing)} (pass --src or set BIKD_DATA_DIR)")

    raw = {s: read_triples(src / f"{s}.txt") for s in SPLITS}
    splits, dropped = slice_splits(raw, select_entities(raw["train"], args.num_entities))
    entities = sorted({e for h, _, t in splits["train"] for e in (h, t)})
    relations = sorted({r for _, r, _ in splits["train"]})

    entity_text = read_two_columns(src / "entity2text.txt")
    relation_text = read_two_columns(src / "relation2text.txt")
    if lacking := [e for e in entities if e not in entity_text]:
        sys.exit(f"{src / 'entity2text.txt'} has no line for {len(lacking)} slice entities, e.g. {lacking[:3]}")
    if lacking := [r for r in relations if r not in relation_text]:
        sys.exit(f"{src / 'relation2text.txt'} has no line for {len(lacking)} slice relations, e.g. {lacking[:3]}")
    wikidata_all = json.loads((src / "entity2wikidata.json").read_text(encoding="utf-8-sig"))
    wikidata = {e: {k: wikidata_all[e][k] for k in WIKIDATA_FIELDS if k in wikidata_all[e]}
                for e in entities if e in wikidata_all}

    contents = {f"{s}.txt": "".join("\t".join(x) + "\n" for x in splits[s]) for s in SPLITS}
    contents["entity2text.txt"] = "".join(entity_text[e] + "\n" for e in entities)
    contents["relation2text.txt"] = "".join(relation_text[r] + "\n" for r in relations)
    contents["entity2wikidata.json"] = json.dumps(wikidata, ensure_ascii=False, sort_keys=True, indent=0) + "\n"

    packed = {f"{name}.xz": xz(text.encode("utf-8")) for name, text in contents.items()}
    files = {name: (len(packed[name]), len(contents[name[:-3]].encode("utf-8"))) for name in packed}
    counts = {"entities": len(entities), "relations": len(relations), **{s: len(splits[s]) for s in SPLITS},
              "described": sum(" -- " in entity_text[e] and bool(entity_text[e].partition(" -- ")[2].strip())
                               for e in entities),
              "wikidata": len(wikidata)}
    sources = {n: sha256(src / n) for n in needed}
    packed["README.md"] = readme(args.num_entities, counts, dropped, files, sources).encode("utf-8")
    total = sum(len(b) for b in packed.values())

    out: Path = args.out
    print(f"{out}: {counts['entities']} entities, {counts['relations']} relations, train {counts['train']}, "
          f"valid {counts['valid']} (dropped {dropped['valid']} unknown to train), test {counts['test']} "
          f"(dropped {dropped['test']}), {counts['wikidata']} Wikidata records")
    for name, (size, raw_size) in files.items():
        print(f"  {name:28s} {size:>9,} bytes ({raw_size:,} uncompressed)")
    print(f"  {'README.md':28s} {len(packed['README.md']):>9,} bytes")
    print(f"  total {total:,} bytes (limit {MAX_BYTES:,})")
    # checked before anything is written, so a failed run leaves the folder as it was
    if total > MAX_BYTES:
        print(f"error: the slice would be {total:,} bytes, over the {MAX_BYTES:,} limit: lower --num-entities "
              f"(now {args.num_entities}) and its default; nothing written", file=sys.stderr)
        return 1
    stale = sorted(f.name for f in out.iterdir() if f.name not in packed) if out.is_dir() else []
    if stale:
        print(f"error: {out} holds files this script does not write: {', '.join(stale)}; remove them "
              "(nothing written)", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    for name, data in packed.items():
        (out / name).write_bytes(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
