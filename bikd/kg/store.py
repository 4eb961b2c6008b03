"""A versioned knowledge-graph store: immutable gold triples plus mined triples appended as versions.

Version 0 holds the gold splits and the entity/relation label lists (id = position in the list). Every
later version is a *mined* commit (a delta of triples with per-triple provenance) or a *rollback* (an
empty delta on top of an older version), so ``content(v) = content(base(v)) + delta(v)`` and nothing is
ever deleted: a bad mining round is undone by rolling back, and every old version stays readable.

Layout under the store's :class:`~bikd.storage.Storage` root::

    versions/000001/mined.jsonl     data files of version 1 (JSON Lines: robust to tabs/newlines/unicode)
    manifests/000001.json           written LAST; a version exists iff its manifest does

Commits are atomic because readers only look at manifests: data files of a commit that crashed before
its manifest are invisible and get overwritten by the next commit of that number. Each manifest records
the sha256 of its data files and readers verify them, so torn or tampered files fail loudly.

Mining adds facts, not entities: every label a mined triple names must already be in version 0's lists.

Single writer: one process (the driver or one actor) owns a store for writing; any number may read.
Manifests are written exclusively, so a second writer committing the same version number gets
FileExistsError; on local disks that is race-free, on S3 it is a check before the PUT, which is why
concurrent writers are unsupported rather than merely discouraged. Should two writers still race, the
loser's data files may replace the winner's, which the sha256 check then reports instead of serving
mixed data.
"""

from __future__ import annotations

import json
import numbers
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

import numpy as np

from bikd.manifest import read_listed, sha256_hex, write_manifested
from bikd.storage import Storage

FORMAT = 1
_MANIFEST_RE = re.compile(r"^(\d+)\.json$")
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_.-]+$")

Triple = tuple[str, str, str]


class IntegrityError(OSError):
    """Stored data does not match its manifest (corrupted, truncated or overwritten file)."""


@dataclass(frozen=True)
class Provenance:
    """Where a mined triple came from; validated on construction so bad records never reach storage.

    ``snapshot_id``: the model that judged the triple (the LM extractor's snapshot for a mined round);
    ``kg_snapshot_id``: the KG embeddings the round ran with (they proposed candidates). ``document`` and
    ``span`` locate the evidence: a passage id (``"desc:/m/02mjmr"``, ``"squad:Super_Bowl_50#3"``) and the
    ``(start_char, end_char_exclusive)`` of the pair's mentions in it; ``evidence`` is free text (e.g. the
    sentence). Versions written before these fields existed read back with the defaults.
    """

    source: str
    round: int
    confidence: float
    snapshot_id: str
    evidence: str = ""
    kg_snapshot_id: str = ""
    document: str = ""
    span: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise ValueError(f"provenance source must be a non-empty str, got {self.source!r}")
        for key in ("snapshot_id", "kg_snapshot_id", "document"):
            if not isinstance(getattr(self, key), str):
                raise ValueError(f"provenance {key} must be a str, got {getattr(self, key)!r}")
        if not isinstance(self.evidence, str):
            raise ValueError(f"provenance evidence must be a str, got {type(self.evidence).__name__}")
        if isinstance(self.round, bool) or not isinstance(self.round, numbers.Integral) or self.round < 0:
            raise ValueError(f"provenance round must be an int >= 0, got {self.round!r}")
        c = self.confidence
        if isinstance(c, bool) or not isinstance(c, numbers.Real) or not 0.0 <= float(c) <= 1.0:
            raise ValueError(f"provenance confidence must be a number in [0, 1], got {c!r}")
        if self.span is not None:
            span = tuple(self.span)
            if (len(span) != 2 or any(isinstance(x, bool) or not isinstance(x, numbers.Integral) for x in span)
                    or not 0 <= span[0] < span[1]):
                raise ValueError(f"provenance span must be None or (start, end) ints with 0 <= start < end, got {self.span!r}")
            object.__setattr__(self, "span", (int(span[0]), int(span[1])))
        # numpy scalars would not survive json.dumps; normalise them once here.
        object.__setattr__(self, "round", int(self.round))
        object.__setattr__(self, "confidence", float(c))

    @property
    def lm_snapshot_id(self) -> str:
        return self.snapshot_id

    def to_row(self) -> dict[str, Any]:
        return {"source": self.source, "round": self.round, "confidence": self.confidence,
                "snapshot_id": self.snapshot_id, "evidence": self.evidence, "kg_snapshot_id": self.kg_snapshot_id,
                "document": self.document, "span": list(self.span) if self.span is not None else None}

    @classmethod
    def from_row(cls, d: Mapping[str, Any]) -> "Provenance":
        """A stored record; keys added after format 1 was written default (old versions stay readable)."""
        span = d.get("span")
        return cls(d["source"], d["round"], d["confidence"], d["snapshot_id"], d.get("evidence", ""),
                   d.get("kg_snapshot_id", ""), d.get("document", ""), tuple(span) if span is not None else None)


@dataclass(frozen=True)
class MinedTriple:
    head: str
    relation: str
    tail: str
    provenance: Provenance

    @property
    def triple(self) -> Triple:
        return (self.head, self.relation, self.tail)


@dataclass(frozen=True)
class VersionInfo:
    version: int
    base: int | None  # content(version) = content(base) + delta(version)
    parent: int | None  # HEAD when this version was committed (differs from base after a rollback)
    kind: str  # "gold" | "mined" | "rollback"
    message: str
    created: str  # UTC ISO 8601
    num_mined_added: int
    num_mined: int  # mined triples in the whole content of this version
    meta: Mapping[str, Any] = field(default_factory=dict)  # what the commit recorded about itself


@dataclass(frozen=True)
class KGVersion:
    version: int
    entities: tuple[str, ...]
    relations: tuple[str, ...]
    gold: dict[str, tuple[Triple, ...]]
    mined: tuple[MinedTriple, ...]

    @classmethod
    def gold_only(cls, kg) -> "KGVersion":
        """What version 0 of a store made from ``kg`` (a :class:`~bikd.kg.triples.KGSplits`) holds, in memory:
        its labels and its train/valid/test as gold, nothing mined (a dry run, a benchmark)."""
        return cls(0, tuple(kg.entities.labels), tuple(kg.relations.labels),
                   {s: tuple(kg.label_triples(s)) for s in ("train", "valid", "test")}, ())

    def gold_array(self, split: str) -> np.ndarray:
        """Gold split ``split`` as an int64 (n, 3) array of positions in ``entities``/``relations`` (n may be 0)."""
        e2i = {e: i for i, e in enumerate(self.entities)}
        r2i = {r: i for i, r in enumerate(self.relations)}
        return np.asarray([(e2i[h], r2i[r], e2i[t]) for h, r, t in self.gold.get(split, ())], np.int64).reshape(-1, 3)

    def mined_arrays(
        self, entity_to_id: Mapping[str, int] | None = None, relation_to_id: Mapping[str, int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Mined triples as an int64 (n, 3) id array and their float64 (n,) confidences.

        The maps default to positions in ``entities``/``relations``; pass the KGE model's own maps when
        its ids differ (e.g. a PyKEEN triples factory that sorted the labels).
        """
        e2i = entity_to_id if entity_to_id is not None else {e: i for i, e in enumerate(self.entities)}
        r2i = relation_to_id if relation_to_id is not None else {r: i for i, r in enumerate(self.relations)}
        try:
            ids = [(e2i[m.head], r2i[m.relation], e2i[m.tail]) for m in self.mined]
        except KeyError as e:
            raise KeyError(f"label {e.args[0]!r} of a mined triple is missing from the given id map") from e
        return (
            np.asarray(ids, dtype=np.int64).reshape(-1, 3),
            np.asarray([m.provenance.confidence for m in self.mined], dtype=np.float64),
        )


def _jsonl(rows: Sequence[Any]) -> bytes:
    # ensure_ascii keeps every line pure ASCII: no raw newlines inside a record, and lone surrogates survive.
    return "".join(json.dumps(r) + "\n" for r in rows).encode("ascii")


def _parse_jsonl(data: bytes) -> list[Any]:
    text = data.decode("ascii").strip()
    # One json.loads over the whole file is several times faster than one per line for 300k triples.
    return json.loads("[" + text.replace("\n", ",") + "]") if text else []


def _check_labels(labels: Sequence[str], what: str) -> tuple[str, ...]:
    out = tuple(labels)
    seen: set[str] = set()
    for label in out:
        if not isinstance(label, str) or not label:
            raise ValueError(f"{what} labels must be non-empty str, got {label!r}")
        if label in seen:
            raise ValueError(f"duplicate {what} label {label!r}: ids are list positions, labels must be unique")
        seen.add(label)
    return out


def _check_triple(triple: Sequence[str], entities: set[str], relations: set[str], where: str) -> Triple:
    if len(triple) != 3:
        raise ValueError(f"{where} {tuple(triple)!r}: expected (head, relation, tail)")
    h, r, t = triple
    for role, label, known in (("head", h, entities), ("relation", r, relations), ("tail", t, entities)):
        if label not in known:
            raise ValueError(f"{where} {(h, r, t)!r}: unknown {role} label {label!r}")
    return (h, r, t)


class KGStore:
    """Versioned KG on a :class:`Storage` root; see the module docstring for layout and guarantees."""

    def __init__(self, storage: Storage):
        self.storage = storage
        self._manifest_cache: dict[int, dict[str, Any]] = {}  # manifests are immutable once visible
        self._labels: tuple[set[str], set[str]] | None = None

    def __repr__(self) -> str:
        return f"KGStore({self.storage.url!r})"

    # ---- construction --------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        storage: Storage,
        *,
        entities: Sequence[str],
        relations: Sequence[str],
        gold: Mapping[str, Sequence[Sequence[str]]],
    ) -> "KGStore":
        store = cls(storage)
        if store._manifests():
            raise FileExistsError(f"{storage.url} already holds a KG store (HEAD {store.head}); open it instead")
        ents = _check_labels(entities, "entity")
        rels = _check_labels(relations, "relation")
        ent_set, rel_set = set(ents), set(rels)
        files = {"entities.jsonl": _jsonl(ents), "relations.jsonl": _jsonl(rels)}
        counts: dict[str, int] = {"entities": len(ents), "relations": len(rels)}
        for split, triples in gold.items():
            if not isinstance(split, str) or not _SPLIT_RE.match(split):
                raise ValueError(f"gold split name {split!r} must match {_SPLIT_RE.pattern}")
            checked = [_check_triple(t, ent_set, rel_set, f"gold {split} triple #{i}") for i, t in enumerate(triples)]
            files[f"gold-{split}.jsonl"] = _jsonl(checked)
            counts[f"gold_{split}"] = len(checked)
        counts.update(mined_added=0, mined_total=0)
        store._write_version(0, base=None, parent=None, kind="gold", message="gold", files=files,
                             counts=counts, extra={"splits": list(gold)})
        return store

    # ---- queries -------------------------------------------------------------------------------------
    def versions(self) -> list[VersionInfo]:
        return [self._info(m) for _, m in sorted(self._manifests().items())]

    @property
    def head(self) -> int:
        manifests = self._manifests()
        if not manifests:
            raise ValueError(f"KG store {self.storage.url} is empty: create it first")
        return max(manifests)

    def read(self, version: int | None = None) -> KGVersion:
        manifests = self._manifests()
        v = self.head if version is None else version
        if v not in manifests:
            raise KeyError(f"version {v} not in KG store {self.storage.url}; available: {sorted(manifests)}")
        chain = [manifests[v]]
        while chain[-1]["kind"] != "gold":
            base = chain[-1]["base"]
            if base not in manifests:
                raise IntegrityError(f"version {chain[-1]['version']} of {self.storage.url} has no base {base}")
            chain.append(manifests[base])
        gold_m = chain[-1]
        entities = tuple(self._load(gold_m, "entities.jsonl"))
        relations = tuple(self._load(gold_m, "relations.jsonl"))
        gold = {s: tuple(tuple(t) for t in self._load(gold_m, f"gold-{s}.jsonl")) for s in gold_m["splits"]}
        mined: list[MinedTriple] = []
        for m in reversed(chain[:-1]):
            if "mined.jsonl" in m["files"]:
                mined.extend(
                    MinedTriple(d["head"], d["relation"], d["tail"], Provenance.from_row(d))
                    for d in self._load(m, "mined.jsonl")
                )
        return KGVersion(v, entities, relations, gold, tuple(mined))

    # ---- writes --------------------------------------------------------------------------------------
    def commit(self, mined: Sequence[MinedTriple], *, message: str = "", meta: Mapping[str, Any] | None = None) -> int:
        """Append ``mined`` on top of HEAD as a new version; all triples are checked before anything is written.
        ``meta`` (plain JSON) is kept in the manifest and read back as ``VersionInfo.meta`` (a mining round
        records there what it ran on, so a rerun can tell it already committed)."""
        meta_json = json.loads(json.dumps(dict(meta or {})))  # not JSON: fails here, before any write
        parent = self.head
        ent_set, rel_set = self._label_sets()
        rows = []
        for i, m in enumerate(mined):
            if not isinstance(m, MinedTriple):
                raise ValueError(f"mined #{i} is a {type(m).__name__}, not a MinedTriple")
            h, r, t = _check_triple(m.triple, ent_set, rel_set, f"mined triple #{i}")
            rows.append({"head": h, "relation": r, "tail": t, **m.provenance.to_row()})
        total = self._manifests()[parent]["counts"]["mined_total"] + len(rows)
        return self._write_version(parent + 1, base=parent, parent=parent, kind="mined", message=message,
                                   files={"mined.jsonl": _jsonl(rows)},
                                   counts={"mined_added": len(rows), "mined_total": total},
                                   extra={"meta": meta_json} if meta_json else None)

    def rollback(self, version: int, *, message: str = "") -> int:
        """Make a new HEAD whose content equals ``version``; the versions in between stay readable."""
        manifests = self._manifests()
        if version not in manifests:
            raise KeyError(f"version {version} not in KG store {self.storage.url}; available: {sorted(manifests)}")
        parent = max(manifests)
        total = manifests[version]["counts"]["mined_total"]
        return self._write_version(parent + 1, base=version, parent=parent, kind="rollback",
                                   message=message or f"rollback to {version}", files={},
                                   counts={"mined_added": 0, "mined_total": total})

    # ---- internals -----------------------------------------------------------------------------------
    def _write_version(self, version: int, *, base: int | None, parent: int | None, kind: str, message: str,
                       files: dict[str, bytes], counts: dict[str, int], extra: dict[str, Any] | None = None) -> int:
        vdir = f"versions/{version:06d}"
        manifest = {
            "format": FORMAT, "version": version, "base": base, "parent": parent, "kind": kind,
            "message": message, "created": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "counts": counts, "files": {name: sha256_hex(data) for name, data in files.items()}, **(extra or {}),
        }
        write_manifested(self.storage, {f"{vdir}/{name}": data for name, data in files.items()},
                         f"manifests/{version:06d}.json", json.dumps(manifest, indent=1).encode("ascii"), exclusive=True)
        return version

    def _manifests(self) -> dict[int, dict[str, Any]]:
        for name in self.storage.ls("manifests"):
            match = _MANIFEST_RE.match(name)
            if match and int(match.group(1)) not in self._manifest_cache:
                v = int(match.group(1))
                self._manifest_cache[v] = self._parse_manifest(v, f"manifests/{name}")
        return self._manifest_cache

    def _parse_manifest(self, v: int, rel: str) -> dict[str, Any]:
        try:
            m = json.loads(self.storage.read_bytes(rel))
            ok = (m["format"] == FORMAT and m["version"] == v and m["kind"] in ("gold", "mined", "rollback")
                  and ((m["kind"] == "gold") == (m["base"] is None))
                  and (m["base"] is None or 0 <= m["base"] < v) and isinstance(m["files"], dict))
        except (ValueError, KeyError, TypeError) as e:
            raise IntegrityError(f"{self.storage.url_of(rel)}: unreadable manifest ({e})") from e
        if not ok:
            raise IntegrityError(f"{self.storage.url_of(rel)}: inconsistent manifest for version {v}")
        return m

    def _load(self, manifest: dict[str, Any], name: str) -> list[Any]:
        rel = f"versions/{manifest['version']:06d}/{name}"
        expected = manifest["files"].get(name)
        if expected is None:
            raise IntegrityError(f"manifest of version {manifest['version']} lists no file {name!r}")
        data = read_listed(self.storage, rel, expected, error=IntegrityError,
                           listed_in=self.storage.url_of(f"manifests/{manifest['version']:06d}.json"))
        return _parse_jsonl(data)

    def _label_sets(self) -> tuple[set[str], set[str]]:
        if self._labels is None:
            gold_m = self._manifests()[0]
            self._labels = (set(self._load(gold_m, "entities.jsonl")), set(self._load(gold_m, "relations.jsonl")))
        return self._labels

    def _info(self, m: dict[str, Any]) -> VersionInfo:
        return VersionInfo(m["version"], m["base"], m["parent"], m["kind"], m["message"], m["created"],
                           m["counts"]["mined_added"], m["counts"]["mined_total"], m.get("meta", {}))
