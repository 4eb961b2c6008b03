"""Triples from TSV files, id maps, and train/valid/test splits that share one id map.

Files are read through fsspec (local paths, ``file://``, ``s3://``). A line is ``head<TAB>relation<TAB>tail``;
CRLF line ends, blank lines and ``#`` comments are tolerated. Every problem is reported as a
:class:`KGDataError` naming the file, the line, the offending text and what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Literal, Mapping, Sequence

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


@dataclass(frozen=True)
class RawTriples:
    """Label triples of one file in file order, with the 1-based line number each came from."""

    url: str
    triples: tuple[tuple[str, str, str], ...]
    lines: tuple[int, ...]
    num_duplicates: int


def read_triples(url: str, storage_options: Mapping | None = None) -> RawTriples:
    """Parse a triples TSV; duplicates are counted and dropped (first occurrence kept)."""
    seen: set[tuple[str, str, str]] = set()
    triples: list[tuple[str, str, str]] = []
    lines: list[int] = []
    num_duplicates = 0
    with open_url(url, "rb", dict(storage_options or {})) as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise KGDataError(url, lineno, f"not valid UTF-8 at byte {e.start}", raw[:80].decode("utf-8", "replace")) from None
            line = line.rstrip("\r\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            cols = line.split("\t")
            if len(cols) != 3:
                raise KGDataError(url, lineno, f"expected 3 tab-separated columns (head, relation, tail), found {len(cols)}", line[:200])
            h, r, t = (c.strip() for c in cols)
            for name, value in (("head", h), ("relation", r), ("tail", t)):
                if not value:
                    raise KGDataError(url, lineno, f"empty {name} column", line[:200])
            triple = (h, r, t)
            if triple in seen:
                num_duplicates += 1
                continue
            seen.add(triple)
            triples.append(triple)
            lines.append(lineno)
    if not triples:
        raise KGDataError(url, None, "holds no triples (empty, or only blank lines and comments)")
    return RawTriples(url, tuple(triples), tuple(lines), num_duplicates)


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
    """What loading one split did to its file: the counts a user checks against the paper."""

    url: str
    num_triples: int
    num_duplicates: int
    num_dropped_unknown: int
    dropped_examples: tuple[str, ...] = ()


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

    def summary(self) -> str:
        parts = [f"{self.name}: {self.num_entities} entities, {self.num_relations} relations"]
        for s in SPLITS:
            rep = self.reports[s]
            parts.append(f"{s} {rep.num_triples}" + (f" (dropped {rep.num_dropped_unknown} with unknown ids)" if rep.num_dropped_unknown else ""))
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
    report = SplitReport(raw.url, len(ids), raw.num_duplicates, len(dropped), tuple(dropped[:5]))
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
