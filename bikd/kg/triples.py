"""Triples from TSV files, id maps, and train/valid/test splits that share one id map.

Files are read through fsspec (local paths, ``file://``, ``s3://``), a ``.gz`` or ``.xz`` name decompressed
(:func:`open_data`). A line is ``head<TAB>relation<TAB>tail``;
CRLF line ends, blank lines, ``#`` comments, a UTF-8 byte-order mark and whitespace around a column are
tolerated, and everything the loader drops, strips or merges is counted (:meth:`KGSplits.load_counts`), so a
run's output says what it did to the file. Every problem is reported as a :class:`KGDataError` naming the
file, the line, the offending text and what was expected.
"""

from __future__ import annotations

import contextlib
import gzip
import lzma
import zlib
from dataclasses import dataclass, field
from typing import IO, Callable, Iterable, Iterator, Literal, Mapping, Sequence

import torch

from bikd.storage import open_url

UnknownPolicy = Literal["drop", "error"]
SPLITS = ("train", "valid", "test")


class KGDataError(ValueError):
    """Bad input data; ``str()`` reads ``file:line: problem (got 'text')``."""

    def __init__(self, url: str, line: int | None, problem: str, text: str | None = None):
        self.url, self.line, self.problem, self.text = url, line, problem, text
        where = f"{url}:{line}" if line else url
        got = f" (got {text!r})" if text is not None else ""
        super().__init__(f"{where}: {problem}{got}")


BOM = "\ufeff"
# Editors on Windows write a UTF-16 BOM; such a file fails UTF-8 decoding at byte 0, which alone says little.
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def strip_bom(line: str) -> tuple[str, bool]:
    """``line`` without a leading byte-order mark, and whether it had one. Not only the file's first line:
    files joined with ``cat`` carry their BOMs into the middle, and a kept BOM is an invisible extra label."""
    if line.startswith(BOM):
        return line[len(BOM):], True
    return line, False


def decode_line(url: str, lineno: int, raw: bytes) -> str:
    """One line as text, or a KGDataError naming the byte that is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        hint = ": the file starts with a UTF-16 byte-order mark; save it as UTF-8" if lineno == 1 and raw.startswith(_UTF16_BOMS) else ""
        raise KGDataError(url, lineno, f"not valid UTF-8 at byte {e.start}{hint}", raw[:80].decode("utf-8", "replace")) from None


_COMPRESSED = {".gz": ("gzip", lambda f: gzip.GzipFile(fileobj=f, mode="rb")), ".xz": ("xz", lambda f: lzma.LZMAFile(f, "rb"))}


@contextlib.contextmanager
def open_data(url: str, storage_options: Mapping | None = None) -> Iterator[IO[bytes]]:
    """A data file opened for reading bytes; a name ending in ``.gz`` or ``.xz`` is decompressed on the fly
    (the embedded ``fb15k237_slice`` ships so), anything else is read as it is. A corrupt compressed file
    is a KGDataError naming it."""
    suffix = next((s for s in _COMPRESSED if url.endswith(s)), None)
    with open_url(url, "rb", dict(storage_options or {})) as f:
        if suffix is None:
            yield f
            return
        fmt, wrap = _COMPRESSED[suffix]
        try:
            with wrap(f) as g:
                yield g
        except (gzip.BadGzipFile, lzma.LZMAError, zlib.error, EOFError) as e:
            raise KGDataError(url, None, f"not a readable {fmt} file: {e}") from None


@dataclass(frozen=True)
class RawTriples:
    """Label triples of one file in file order, with the 1-based line number each came from.

    The counts after ``num_duplicates`` default to 0 so that callers building one by hand keep working.
    ``num_labels_merged`` counts the raw spellings (``' foo'``, ``'foo '``) that became a label another
    spelling in the file also produced, separately for entities and relations: ``'foo'`` with ``' foo'``
    is 1, ``' foo'`` with ``'foo '`` is 2; a lone ``' foo'`` is only stripped, not merged.
    """

    url: str
    triples: tuple[tuple[str, str, str], ...]
    lines: tuple[int, ...]
    num_duplicates: int
    bom_stripped: int = 0
    num_whitespace_stripped: int = 0
    num_labels_merged: int = 0
    merged_examples: tuple[str, ...] = ()


def read_triples(url: str, storage_options: Mapping | None = None) -> RawTriples:
    """Parse a triples TSV; duplicates are counted and dropped (first occurrence kept), a leading BOM is
    stripped, and columns are stripped of surrounding whitespace, counting the labels that merges."""
    seen: set[tuple[str, str, str]] = set()
    triples: list[tuple[str, str, str]] = []
    lines: list[int] = []
    num_duplicates = bom_stripped = num_whitespace_stripped = 0
    # per namespace (0: entities, 1: relations; an entity and a relation may share a label without merging):
    # labels some field spelled exactly, and label -> {padded spelling: first line} for the others
    exact: tuple[set[str], set[str]] = (set(), set())
    padded: tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]] = ({}, {})
    with open_data(url, storage_options) as f:
        for lineno, raw in enumerate(f, start=1):
            line, had_bom = strip_bom(decode_line(url, lineno, raw).rstrip("\r\n"))
            bom_stripped += had_bom
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            cols = line.split("\t")
            if len(cols) != 3:
                raise KGDataError(url, lineno, f"expected 3 tab-separated columns (head, relation, tail), found {len(cols)}", line[:200])
            h, r, t = (c.strip() for c in cols)
            for name, value in (("head", h), ("relation", r), ("tail", t)):
                if not value:
                    raise KGDataError(url, lineno, f"empty {name} column", line[:200])
            for ns, col, label in ((0, cols[0], h), (1, cols[1], r), (0, cols[2], t)):
                if col == label:
                    exact[ns].add(label)
                else:
                    num_whitespace_stripped += 1
                    padded[ns].setdefault(label, {}).setdefault(col, lineno)
            triple = (h, r, t)
            if triple in seen:
                num_duplicates += 1
                continue
            seen.add(triple)
            triples.append(triple)
            lines.append(lineno)
    if not triples:
        raise KGDataError(url, None, "holds no triples (empty, or only blank lines and comments)")
    merged: list[tuple[int, str]] = []
    for ns in (0, 1):
        for label, spellings in padded[ns].items():
            if len(spellings) + (label in exact[ns]) > 1:
                merged += [(ln, f"{url}:{ln}: {sp!r} merged into {label!r}") for sp, ln in spellings.items()]
    merged.sort()
    return RawTriples(url, tuple(triples), tuple(lines), num_duplicates, bom_stripped=bom_stripped,
                      num_whitespace_stripped=num_whitespace_stripped, num_labels_merged=len(merged),
                      merged_examples=tuple(m for _, m in merged[:5]))


@dataclass(frozen=True)
class IdMap:
    """Labels <-> contiguous integer ids; ids follow sorted label order, as PyKEEN's TriplesFactory does."""

    labels: tuple[str, ...]
    to_id: Mapping[str, int] = field(repr=False, compare=False)

    @classmethod
    def from_labels(cls, labels: Iterable[str]) -> "IdMap":
        ordered = tuple(sorted(set(labels)))
        return cls(ordered, {label: i for i, label in enumerate(ordered)})

    def __len__(self) -> int:
        return len(self.labels)

    def __contains__(self, label: object) -> bool:
        return label in self.to_id

    def state_dict(self) -> dict:
        return {"labels": list(self.labels)}

    @classmethod
    def from_state_dict(cls, state: Mapping) -> "IdMap":
        labels = tuple(state["labels"])
        if len(set(labels)) != len(labels):
            raise ValueError("id map holds duplicate labels")
        return cls(labels, {label: i for i, label in enumerate(labels)})


@dataclass(frozen=True)
class SplitReport:
    """What loading one split did to its file: the counts a user checks against the paper. The fields
    after ``dropped_examples`` came later and default to 0 so positional constructions keep working."""

    url: str
    num_triples: int
    num_duplicates: int
    num_dropped_unknown: int
    dropped_examples: tuple[str, ...] = ()
    bom_stripped: int = 0
    num_whitespace_stripped: int = 0
    num_labels_merged: int = 0
    merged_examples: tuple[str, ...] = ()


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# Every count the loader drops, strips or merges: the keys of load_counts() and, when nonzero, the words of
# summary(). One table so a new count cannot reach the metrics and miss the printed summary, or the reverse.
LOAD_COUNTS: tuple[tuple[str, Callable[[int], str]], ...] = (
    ("bom_stripped", lambda n: "stripped a UTF-8 BOM" if n == 1 else f"stripped {n} UTF-8 BOMs"),
    ("num_whitespace_stripped", lambda n: f"stripped surrounding whitespace from {_plural(n, 'column')}"),
    ("num_labels_merged", lambda n: f"merged {_plural(n, 'label')} differing only by surrounding whitespace"),
    ("num_duplicates", lambda n: f"dropped {_plural(n, 'duplicate triple')}"),
    ("num_dropped_unknown", lambda n: f"dropped {n} with unknown ids"),
)


@dataclass(frozen=True)
class KGSplits:
    """Train/valid/test as id tensors of shape (n, 3) over one shared entity and relation id map."""

    name: str
    entities: IdMap
    relations: IdMap
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    reports: Mapping[str, SplitReport]

    @property
    def num_entities(self) -> int:
        return len(self.entities)

    @property
    def num_relations(self) -> int:
        return len(self.relations)

    def split(self, name: str) -> torch.Tensor:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)

    def all_triples(self) -> torch.Tensor:
        """train + valid + test, the standard filter set of filtered ranking."""
        return torch.cat([self.train, self.valid, self.test])

    def label_triples(self, split: str) -> list[tuple[str, str, str]]:
        e, r = self.entities.labels, self.relations.labels
        return [(e[h], r[rel], e[t]) for h, rel, t in self.split(split).tolist()]

    def load_counts(self) -> dict[str, int]:
        """Flat counts for a job's metrics: sizes, and per split every count of :data:`LOAD_COUNTS`, zeros
        included so that the keys are the same for every dataset (``train.num_duplicates``, ...)."""
        out = {"num_entities": self.num_entities, "num_relations": self.num_relations}
        for s in SPLITS:
            rep = self.reports[s]
            out[f"{s}.num_triples"] = int(rep.num_triples)
            out.update({f"{s}.{key}": int(getattr(rep, key)) for key, _ in LOAD_COUNTS})
        return out

    def summary(self) -> str:
        """One line: sizes, and per split every nonzero count of what loading dropped, stripped or merged."""
        parts = [f"{self.name}: {self.num_entities} entities, {self.num_relations} relations"]
        for s in SPLITS:
            rep = self.reports[s]
            done = [words(n) for key, words in LOAD_COUNTS if (n := int(getattr(rep, key)))]
            parts.append(f"{s} {rep.num_triples}" + (f" ({'; '.join(done)})" if done else ""))
        return "; ".join(parts)


def map_triples(
    raw: RawTriples, entities: IdMap, relations: IdMap, unknown: UnknownPolicy
) -> tuple[torch.Tensor, SplitReport]:
    """Map label triples to ids; triples with unknown labels are dropped and counted, or raise."""
    if unknown not in ("drop", "error"):
        raise ValueError(f"unknown-entity policy must be 'drop' or 'error', got {unknown!r}")
    ids: list[tuple[int, int, int]] = []
    dropped: list[str] = []
    for (h, r, t), lineno in zip(raw.triples, raw.lines):
        missing = [x for x, m in ((h, entities), (r, relations), (t, entities)) if x not in m]
        if missing:
            if unknown == "error":
                raise KGDataError(raw.url, lineno, f"{', '.join(map(repr, missing))} not in the training id map", f"{h}\t{r}\t{t}")
            dropped.append(f"{raw.url}:{lineno}: {h}\t{r}\t{t}")
            continue
        ids.append((entities.to_id[h], relations.to_id[r], entities.to_id[t]))
    tensor = torch.tensor(ids, dtype=torch.long).reshape(-1, 3)
    report = SplitReport(raw.url, len(ids), raw.num_duplicates, len(dropped), tuple(dropped[:5]),
                         bom_stripped=raw.bom_stripped, num_whitespace_stripped=raw.num_whitespace_stripped,
                         num_labels_merged=raw.num_labels_merged, merged_examples=raw.merged_examples)
    return tensor, report


def build_splits(
    name: str,
    raw: Mapping[str, RawTriples],
    *,
    unknown: UnknownPolicy = "drop",
    id_map_from: Literal["train", "all"] = "train",
) -> KGSplits:
    """Shared id maps from train (PyKEEN's convention) or from all splits, then map every split."""
    missing = [s for s in SPLITS if s not in raw]
    if missing:
        raise ValueError(f"dataset {name!r} lacks split(s) {missing}")
    if id_map_from not in ("train", "all"):
        raise ValueError(f"id_map_from must be 'train' or 'all', got {id_map_from!r}")
    sources: Sequence[RawTriples] = [raw["train"]] if id_map_from == "train" else [raw[s] for s in SPLITS]
    entities = IdMap.from_labels(x for src in sources for h, _, t in src.triples for x in (h, t))
    relations = IdMap.from_labels(r for src in sources for _, r, _ in src.triples)
    mapped, reports = {}, {}
    for s in SPLITS:
        mapped[s], reports[s] = map_triples(raw[s], entities, relations, "error" if s == "train" else unknown)
    return KGSplits(name, entities, relations, mapped["train"], mapped["valid"], mapped["test"], reports)
