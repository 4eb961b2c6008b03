"""One mining round, pure: score candidates, choose a relation per pair, threshold, de-duplicate, commit.

    candidates --score--> (n, R + 1) p(r | h, t, passage) --decide--> (relation, confidence) per candidate
      --thresholds (calibrated on valid)--> accepted --drop train / earlier mined, keep the best copy-->
      one new KG store version with provenance

The scoring itself is any :data:`~bikd.lm.pairs.PairScorer` over the whole list (``bikd.ray.mining`` gives
one that scales out on an actor pool). The KG store version fixes what the miner knows: its **train**
split and its mined triples; valid is read for the thresholds only, test never.

A round commits once: a crash before the manifest leaves no visible version (the store's manifest-last
rule) and the rerun commits the round; a rerun after a finished commit reads the new HEAD, where every
triple it would add is known, and commits nothing. The commit's meta records a ``round_key`` (base
version, round, snapshots, a digest of the candidates) for tracing.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from bikd.kg.store import KGStore, KGVersion, MinedTriple, Provenance
from bikd.kge.export import ENTITY_FILE
from bikd.lm.pairs import PairCandidate
from bikd.mining.candidates import CandidateConfig
from bikd.mining.thresholds import ThresholdConfig, above_thresholds, calibrate, top_k_per_relation


@dataclass(kw_only=True, frozen=True)
class MiningConfig:
    candidates: CandidateConfig = field(default_factory=CandidateConfig)
    thresholds: ThresholdConfig = field(default_factory=ThresholdConfig)
    #: round number recorded in provenance; null: one more than the highest round in the store version
    round: int | None = None
    #: a floor under every threshold (calibrated or top-k): nothing less confident is ever committed, so an
    #: untrained extractor (near-uniform over R + 1 classes) cannot commit "mined" triples
    min_confidence: float = 0.05

    def __post_init__(self):
        if self.round is not None and self.round < 0:
            raise ValueError(f"mining.round must be >= 0 or null, got {self.round}")
        if not 0.0 < self.min_confidence <= 1.0:
            raise ValueError(f"mining.min_confidence must be in (0, 1], got {self.min_confidence}")


@dataclass(frozen=True)
class RoundResult:
    version: int | None  # the committed version (None: dry run, or nothing new)
    created: bool  # False when nothing was written (dry run, nothing new, or already committed)
    mined: list[MinedTriple]
    counts: dict[str, int]
    per_source: dict[str, int]
    per_relation: dict[str, int]
    thresholds: np.ndarray
    #: (len(mined), R) float32: the scorer's p(r | h, t, passage) of each mined triple over the R relations
    #: ("no relation" left out, renormalised): the soft labels of reverse distillation (add_triples' targets)
    targets: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))


def kg_snapshot_id(meta: dict[str, Any]) -> str:
    """The id of a KGE export: the one its trainer recorded, else the first 16 hex of its entity table's sha256."""
    return str((meta.get("extra") or {}).get("snapshot_id") or meta["sha256"][ENTITY_FILE][:16])


def check_id_maps(entities: Sequence[str], relations: Sequence[str], snapshot: str, version: KGVersion,
                  store_url: str) -> None:
    """A KG snapshot scores ids; they must mean the store version's labels, else every triple would be wrong."""
    for what, theirs, ours in (("entity", list(entities), list(version.entities)),
                               ("relation", list(relations), list(version.relations))):
        if theirs != ours:
            diff = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
            raise ValueError(
                f"KG snapshot {snapshot} does not match KG store version {version.version} ({store_url}): its {what} "
                f"id map has {len(theirs)} labels, the store's {len(ours)}, first difference at id {diff} "
                f"({theirs[diff] if diff < len(theirs) else None!r} vs {ours[diff] if diff < len(ours) else None!r})")


def check_relations(labels: Sequence[str], version: KGVersion) -> None:
    """The extractor's relation columns must be relations of the KG (in the KG's order)."""
    missing = [r for r in labels if r not in set(version.relations)]
    if missing:
        raise ValueError(f"the extractor predicts relation(s) the KG (store version {version.version}) lacks: "
                         f"{', '.join(map(repr, missing[:5]))}{' ...' if len(missing) > 5 else ''}")
    if list(labels) != list(version.relations):
        raise ValueError(f"the extractor's {len(labels)} relation columns are not the KG's {len(version.relations)} "
                         f"relations in id order (store version {version.version})")


def known_triples(version: KGVersion) -> np.ndarray:
    """(n, 3) int64 ids of what the miner knows: the train split plus every mined triple. Never valid/test."""
    return np.concatenate([version.gold_array("train"), version.mined_arrays()[0]])


def split_ids(version: KGVersion, split: str) -> set[tuple[int, int, int]]:
    return set(map(tuple, version.gold_array(split).tolist()))


def decide(candidates: Sequence[PairCandidate], probs: np.ndarray, num_relations: int) -> tuple[np.ndarray, np.ndarray]:
    """``probs (n, num_relations + 1)`` -> ``relations (n,)`` and ``confidences (n,)``: a KG proposal's own
    relation, else the most probable real relation (the last column, "no relation", is never chosen; it
    lowers the confidence of every real one instead)."""
    probs = np.asarray(probs, np.float64)
    if probs.shape != (len(candidates), num_relations + 1):
        raise ValueError(f"scorer returned shape {probs.shape}, expected ({len(candidates)}, {num_relations + 1}) "
                         f"for {len(candidates)} candidates over the KG's {num_relations} relations + no relation")
    asked = np.asarray([c.relation for c in candidates], np.int64)
    if len(asked) and asked.max(initial=-1) >= num_relations:
        raise ValueError(f"a KG proposal asks about relation id {asked.max()}, but the KG has {num_relations} relations")
    best = probs[:, :num_relations].argmax(axis=1) if len(probs) else asked
    relations = np.where(asked >= 0, asked, best)
    return relations, probs[np.arange(len(probs)), relations]


def dedupe(candidates: Sequence[PairCandidate], relations: np.ndarray, confidences: np.ndarray,
           keep: np.ndarray, known: set[tuple[int, int, int]]) -> tuple[list[int], int, int]:
    """Indices of the kept candidates, one per triple (the most confident copy; ties by doc id and spans),
    none already ``known``; also how many were dropped as known and as duplicates."""
    best: dict[tuple[int, int, int], int] = {}
    num_known = 0
    for i in np.flatnonzero(keep).tolist():
        c = candidates[i]
        triple = (c.h, int(relations[i]), c.t)
        if triple in known:
            num_known += 1
            continue
        j = best.get(triple)
        if j is None or (-confidences[i], c.doc_id, c.h_span, c.t_span) < (
                -confidences[j], candidates[j].doc_id, candidates[j].h_span, candidates[j].t_span):
            best[triple] = i
    kept = sorted(best.values(), key=lambda i: (-confidences[i], i))
    return kept, num_known, int(keep.sum()) - num_known - len(kept)


def round_key(base: int, rnd: int, lm_snapshot: str, kg_snapshot: str, candidates: Sequence[PairCandidate]) -> dict:
    digest = hashlib.sha256()
    for c in candidates:
        digest.update(json.dumps([c.doc_id, c.h, c.t, c.h_span, c.t_span, c.source, c.relation]).encode())
    return {"base": base, "round": rnd, "lm_snapshot_id": lm_snapshot, "kg_snapshot_id": kg_snapshot,
            "candidates_sha256": digest.hexdigest()}


def run_round(store: KGStore, version: KGVersion, candidates: Sequence[PairCandidate],
              score: Callable[[Sequence[PairCandidate]], np.ndarray], cfg: MiningConfig, *, lm_snapshot_id: str,
              kg_snapshot_id: str, dry_run: bool = False, counts: dict[str, int] | None = None) -> RoundResult:
    """Score ``candidates`` (made from ``version``'s train + mined triples) in one ``score`` call, accept by
    the thresholds, and commit the new triples on top of ``version`` (which must be HEAD) as one version."""
    if not dry_run and version.version != store.head:
        raise ValueError(f"the round read KG store version {version.version}, but HEAD of {store.storage.url} is now "
                         f"{store.head}: rerun it on HEAD")
    num_relations = len(version.relations)
    rnd = cfg.round if cfg.round is not None else 1 + max((m.provenance.round for m in version.mined), default=0)
    key = round_key(version.version, rnd, lm_snapshot_id, kg_snapshot_id, candidates)
    counts = dict(counts or {}, candidates=len(candidates))
    probs = score(candidates) if candidates else np.zeros((0, num_relations + 1))
    relations, confidences = decide(candidates, probs, num_relations)

    known = {tuple(t) for t in known_triples(version).tolist()}
    valid = split_ids(version, "valid")
    triples = [(c.h, int(r), c.t) for c, r in zip(candidates, relations)]
    if cfg.thresholds.mode == "precision":
        # calibrate on triples the KG does not hold as train: a train triple says nothing about new ones. Mined
        # ones stay in (their label still comes from valid), so a rerun keeps its thresholds
        train = split_ids(version, "train")
        fresh = np.asarray([t not in train for t in triples], bool)
        positive = np.asarray([t in valid for t in triples], bool)
        thresholds = calibrate(relations[fresh], confidences[fresh], positive[fresh], num_relations, cfg.thresholds)
        keep = above_thresholds(relations, confidences, thresholds)
    else:
        thresholds = np.full(num_relations, np.nan)
        keep = top_k_per_relation(relations, confidences, cfg.thresholds.top_k)
    below = keep & (confidences < cfg.min_confidence)
    keep &= ~below
    counts["dropped_below_min_confidence"] = int(below.sum())
    kept, num_known, num_dup = dedupe(candidates, relations, confidences, keep, known)
    counts.update(accepted=int(keep.sum()), dropped_known=num_known, dropped_duplicate=num_dup, new=len(kept))

    ents, rels = version.entities, version.relations
    mined = []
    for i in kept:
        c = candidates[i]
        start, end = min(c.h_span[0], c.t_span[0]), max(c.h_span[1], c.t_span[1])
        prov = Provenance(c.source, rnd, float(np.clip(confidences[i], 0.0, 1.0)), lm_snapshot_id,
                          c.text[start:end], kg_snapshot_id=kg_snapshot_id, document=c.doc_id, span=(start, end))
        mined.append(MinedTriple(ents[c.h], rels[int(relations[i])], ents[c.t], prov))
    per_source = dict(Counter(m.provenance.source for m in mined))
    per_relation = dict(Counter(m.relation for m in mined).most_common())
    created, committed = False, None
    if not dry_run and mined:
        committed = store.commit(mined, message=f"mining round {rnd}: {len(mined)} triples "
                                                f"({', '.join(f'{k} {v}' for k, v in sorted(per_source.items()))})",
                                 meta={"round_key": key, "counts": counts})
        created = True
    rel = probs[kept, :num_relations].astype(np.float64).reshape(len(kept), num_relations)
    targets = (rel / np.clip(rel.sum(axis=1, keepdims=True), 1e-12, None)).astype(np.float32)
    return RoundResult(committed, created, mined, counts, per_source, per_relation, thresholds, targets)


def summary(result: RoundResult, top: int = 10) -> str:
    c = result.counts
    lines = [f"candidates {c.get('candidates', 0)}: accepted {c.get('accepted', 0)}, already known "
             f"{c.get('dropped_known', 0)}, duplicates {c.get('dropped_duplicate', 0)}, new {c.get('new', 0)}",
             "per source: " + (", ".join(f"{k} {v}" for k, v in sorted(result.per_source.items())) or "none"),
             "per relation: " + (", ".join(f"{k} {v}" for k, v in list(result.per_relation.items())[:top]) or "none")
             + (f" (+{len(result.per_relation) - top} more)" if len(result.per_relation) > top else "")]
    if c.get("dropped_below_min_confidence"):
        lines.append(f"below min_confidence (never committed): {c['dropped_below_min_confidence']}")
    finite = np.isfinite(result.thresholds)
    if not np.isnan(result.thresholds).all():
        lines.append(f"thresholds: {int(finite.sum())} of {len(finite)} relations can accept (the rest reach the "
                     f"target precision on valid at no threshold)")
    return "\n".join(lines)


__all__ = ["MiningConfig", "RoundResult", "run_round", "decide", "dedupe", "known_triples", "check_id_maps",
           "check_relations", "kg_snapshot_id", "summary"]
