"""Candidates of a mining round: co-mentioned entity pairs, and the KG model's own proposals checked on text.

Two sources (``PairCandidate.source``):

- **co-mention**: an ordered pair of entities linked in one passage (the extractor chooses the relation);
- **KG proposal**: for each entity h mentioned in the corpus and each relation r (those h already heads in
  the known triples, or all), the KG model's top-k tails t outside the known triples; each is checked on a
  passage that mentions both h and t, else on the two entities' descriptions joined into one text.

Only what the miner knows goes in: the KG's **train** triples and earlier mined ones (``known``). Nothing
here takes valid or test, so they stay held-out gold the round is measured against.

A round is bounded by ``max_candidates`` (what the scorer costs is linear in it). The bound is
deterministic: co-mention pairs by how many passages mention them, proposals by the KG's probability of the
tail; ``bound_recall`` says what the bound costs.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Literal, Mapping, Sequence

import numpy as np
import torch

from bikd.lm.pairs import CO_MENTION, KG_PROPOSAL, PairCandidate, Passage

#: ``score_t(h, r) -> (B, num_entities)`` higher-is-better tail scores (``KGEModel.score_t``)
TailScorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(kw_only=True, frozen=True)
class CandidateConfig:
    #: scored candidates per round (both sources together). Sized from measured speeds on 2 shared cores
    #: (load ~2): the MiniLM extractor (max_length 128) scored 73 FB15k-237 description pairs/s (85/s in
    #: jobs/mine.py on 2 one-CPU actors, a 1,000-candidate round of 40 s end to end), and the
    #: candidates of an FB15k-237 round (14,480 descriptions linked: 135,838 pairs; 93,248 (h, r) queries of
    #: a dim-200 TransE) took 15-35 s, so 20,000 candidates score in ~4.6 min and the round stays under 10
    #: min with room for Ray start-up, longer passages and a fused extractor. The bound's cost on FB15k-237
    #: descriptions (untrained TransE): the 20,000 kept of 391,472 unbounded candidates reach 17.2% of the
    #: train triples the unbounded ones reach, 19.7-20.0% of valid/test (``bound_recall``); 5.4% of train
    #: when co-mentions were ordered by count alone
    max_candidates: int = 20_000
    #: share of ``max_candidates`` reserved for KG proposals; what one source leaves unused goes to the other
    kg_share: float = 0.5
    #: KG proposals: tails per (h, r) query
    top_k: int = 3
    #: "seen": the relations h is already a head of in the known triples (the KG's domain constraint: FB15k-237
    #: has 237 relations, most of which make no sense for a given h); "all": every relation
    relations: Literal["seen", "all"] = "seen"
    #: co-mention pairs: at most this many passages (candidates) per ordered pair
    max_passages_per_pair: int = 2
    #: (h, r) queries scored per KG model call
    query_batch: int = 512

    def __post_init__(self):
        for key in ("max_candidates", "top_k", "max_passages_per_pair", "query_batch"):
            if getattr(self, key) < 1:
                raise ValueError(f"candidates.{key} must be >= 1, got {getattr(self, key)}")
        if not 0.0 <= self.kg_share <= 1.0:
            raise ValueError(f"candidates.kg_share must be in [0, 1], got {self.kg_share}")
        if self.relations not in ("seen", "all"):
            raise ValueError(f"candidates.relations must be 'seen' or 'all', got {self.relations!r}")


@dataclass(frozen=True)
class Proposals:
    """KG proposals before the text check: ``triples`` (n, 3) int64 (h, r, t), ``scores`` (n,) the softmax
    probability of t among all entities for (h, r), sorted best first (ties by h, r, t)."""

    triples: np.ndarray
    scores: np.ndarray


@dataclass(frozen=True)
class CandidateSet:
    candidates: list[PairCandidate]
    counts: dict[str, int]


def mentioned_entities(pairs: Sequence[PairCandidate], passages: Sequence[Passage] = ()) -> np.ndarray:
    """Sorted ids of the entities the corpus mentions: both ends of every linked pair, and the subject of
    every description (it mentions its own entity)."""
    ids = {c.h for c in pairs} | {c.t for c in pairs} | {p.subject for p in passages if p.subject is not None}
    return np.asarray(sorted(ids), dtype=np.int64)


def _co_mention_rank(c: PairCandidate, count: int) -> tuple:
    """Head at the start of the passage (a description's subject, or a sentence's) first, then pairs mentioned
    in more passages, then mentions closer together. On FB15k-237's descriptions the 10,000 first pairs hold
    17.4% of the train-related co-mentioned pairs in this order, 10.2% by count alone (36% vs 21% of them related)."""
    gap = max(c.h_span[0], c.t_span[0]) - min(c.h_span[1], c.t_span[1])
    return (c.h_span[0] != 0, -count, gap, c.h, c.t, c.doc_id, c.h_span, c.t_span)


def co_mentions(pairs: Sequence[PairCandidate], max_passages_per_pair: int) -> tuple[list[PairCandidate], Counter]:
    """Co-mention candidates in a deterministic order (:func:`_co_mention_rank`), at most
    ``max_passages_per_pair`` per ordered pair; and the number of passages per pair."""
    counts = Counter((c.h, c.t) for c in pairs if c.source == CO_MENTION)
    ordered = sorted((c for c in pairs if c.source == CO_MENTION), key=lambda c: _co_mention_rank(c, counts[c.h, c.t]))
    out, taken = [], Counter()
    for c in ordered:
        if taken[c.h, c.t] < max_passages_per_pair:
            taken[c.h, c.t] += 1
            out.append(c)
    return out, counts


def _queries(known: np.ndarray, heads: np.ndarray, num_relations: int, mode: str) -> np.ndarray:
    if mode == "all":
        return np.stack([np.repeat(heads, num_relations), np.tile(np.arange(num_relations), len(heads))], 1)
    hr = np.unique(known[:, :2], axis=0) if len(known) else np.zeros((0, 2), np.int64)
    return hr[np.isin(hr[:, 0], heads)]


def kg_proposals(score_t: TailScorer, known: np.ndarray, heads: np.ndarray, num_entities: int, num_relations: int,
                 cfg: CandidateConfig) -> Proposals:
    """The top ``cfg.top_k`` tails of every (h, r) query, h in ``heads``, that are neither h itself nor a
    tail of a ``known`` (train + mined, (n, 3) ids) triple; at most ``cfg.max_candidates`` best of them."""
    known = np.asarray(known, dtype=np.int64).reshape(-1, 3)
    queries = _queries(known, np.asarray(heads, dtype=np.int64), num_relations, cfg.relations)
    # known tails of each query as a CSR over the sorted (h, r) keys, so one batch masks them in one scatter
    key = known[:, 0] * num_relations + known[:, 1]
    order = np.argsort(key, kind="stable")
    sorted_key, sorted_tail = key[order], known[order, 2]
    k = min(cfg.top_k, num_entities)
    out_t, out_s = [], []
    with torch.no_grad():
        for start in range(0, len(queries), cfg.query_batch):
            q = queries[start:start + cfg.query_batch]
            probs = score_t(torch.from_numpy(q[:, 0]), torch.from_numpy(q[:, 1])).float().softmax(dim=1)
            qk = q[:, 0] * num_relations + q[:, 1]
            lo, hi = np.searchsorted(sorted_key, qk, "left"), np.searchsorted(sorted_key, qk, "right")
            rows = np.repeat(np.arange(len(q)), hi - lo)
            cols = sorted_tail[np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)])] if len(rows) else rows
            probs[torch.from_numpy(rows), torch.from_numpy(cols)] = -1.0
            probs[torch.arange(len(q)), torch.from_numpy(q[:, 0])] = -1.0
            s, t = probs.topk(k, dim=1)
            ok = (s >= 0).numpy()
            rep = np.repeat(q[:, None, :], k, axis=1)
            out_t.append(np.concatenate([rep[..., :1], rep[..., 1:], t.numpy()[..., None]], axis=2)[ok])
            out_s.append(s.numpy()[ok].astype(np.float64))
    triples = np.concatenate(out_t) if out_t else np.zeros((0, 3), np.int64)
    scores = np.concatenate(out_s) if out_s else np.zeros(0)
    # best first; ties broken by the triple so that the bound below never depends on batch order
    order = np.lexsort((triples[:, 2], triples[:, 1], triples[:, 0], -scores))[: cfg.max_candidates]
    return Proposals(triples[order].astype(np.int64), scores[order])


def _joined_descriptions(h: Passage, t: Passage, r: int) -> PairCandidate:
    """One text of both descriptions; the mentions are the two names at the start of each."""
    sep = "\n"
    offset = len(h.text) + len(sep)
    return PairCandidate(f"{h.doc_id}+{t.doc_id}", h.text + sep + t.text, h.subject, t.subject,
                         (0, h.subject_end), (offset, offset + t.subject_end), KG_PROPOSAL, r)


def check_on_text(proposals: Proposals, pairs: Sequence[PairCandidate],
                  descriptions: Mapping[int, Passage]) -> tuple[list[PairCandidate], list[float], dict[str, int]]:
    """A candidate per proposal: on the first passage (in a deterministic order) mentioning both entities,
    else on their two descriptions; proposals with neither are counted as ``kg_no_text``."""
    first: dict[tuple[int, int], PairCandidate] = {}
    for c in sorted(pairs, key=lambda c: (c.doc_id, c.h_span, c.t_span, c.h, c.t)):
        first.setdefault((min(c.h, c.t), max(c.h, c.t)), c)
    out, scores = [], []
    counts = {"kg_on_passage": 0, "kg_on_descriptions": 0, "kg_no_text": 0}
    for (h, r, t), s in zip(proposals.triples.tolist(), proposals.scores.tolist()):
        c = first.get((min(h, t), max(h, t)))
        if c is not None:
            h_span, t_span = (c.h_span, c.t_span) if c.h == h else (c.t_span, c.h_span)
            out.append(PairCandidate(c.doc_id, c.text, h, t, h_span, t_span, KG_PROPOSAL, r))
            counts["kg_on_passage"] += 1
        elif h in descriptions and t in descriptions and descriptions[h].subject_end and descriptions[t].subject_end:
            out.append(_joined_descriptions(descriptions[h], descriptions[t], r))
            counts["kg_on_descriptions"] += 1
        else:
            counts["kg_no_text"] += 1
            continue
        scores.append(s)
    return out, scores, counts


def description_index(passages: Iterable[Passage]) -> dict[int, Passage]:
    """Entity id -> its description passage (the first one, in doc_id order)."""
    out: dict[int, Passage] = {}
    for p in sorted((p for p in passages if p.subject is not None), key=lambda p: p.doc_id):
        out.setdefault(p.subject, p)
    return out


def generate(pairs: Sequence[PairCandidate], passages: Sequence[Passage], known: np.ndarray,
             score_t: TailScorer | None, num_entities: int, num_relations: int, cfg: CandidateConfig,
             bounded: bool = True) -> CandidateSet:
    """Both sources, bounded to ``cfg.max_candidates`` (``bounded=False``: everything, for ``bound_recall``).

    ``pairs``: linked mention pairs of the corpus (``corpus.pair_candidates``); ``passages``: the corpus
    (descriptions among them); ``known``: (n, 3) train + mined ids, the only triples used; ``score_t``: the KG
    model's tail scorer, None for co-mentions only."""
    limit = cfg.max_candidates if bounded else None
    co, pair_counts = co_mentions(pairs, cfg.max_passages_per_pair)
    props: list[PairCandidate] = []
    counts = {"co_mention_pairs": len(pair_counts), "co_mention_found": len(co), "kg_queries": 0, "kg_proposals": 0,
              "kg_on_passage": 0, "kg_on_descriptions": 0, "kg_no_text": 0}
    if score_t is not None:
        heads = mentioned_entities(pairs, passages)
        big = cfg if limit is not None else replace(cfg, max_candidates=1 << 62)
        found = kg_proposals(score_t, known, heads, num_entities, num_relations, big)
        props, _, check = check_on_text(found, pairs, description_index(passages))
        counts.update(check, kg_queries=len(_queries(np.asarray(known, np.int64).reshape(-1, 3), heads, num_relations,
                                                     cfg.relations)), kg_proposals=len(found.triples))
    counts["kg_found"] = len(props)
    if limit is not None:
        n_kg = min(len(props), round(limit * cfg.kg_share))
        n_co = min(len(co), limit - n_kg)
        n_kg = min(len(props), limit - n_co)
        co, props = co[:n_co], props[:n_kg]
    counts.update(co_mention_candidates=len(co), kg_candidates=len(props))
    return CandidateSet(co + props, counts)


def bound_recall(unbounded: Sequence[PairCandidate], bounded: Sequence[PairCandidate],
                 triples: Iterable[tuple[int, int, int]]) -> float:
    """Of the ``triples`` (e.g. the accepted triples of a round run without the bound, or the train triples
    between co-mentioned pairs) that some unbounded candidate could yield, the fraction a bounded candidate
    still can: a co-mention candidate yields any relation of its pair, a proposal only its own. NaN if none."""

    def reach(cands: Sequence[PairCandidate]) -> tuple[set, set]:
        return ({(c.h, c.t) for c in cands if c.relation < 0}, {(c.h, c.relation, c.t) for c in cands if c.relation >= 0})

    (all_pairs, all_props), (kept_pairs, kept_props) = reach(unbounded), reach(bounded)
    hits = total = 0
    for h, r, t in triples:
        if (h, t) in all_pairs or (h, r, t) in all_props:
            total += 1
            hits += (h, t) in kept_pairs or (h, r, t) in kept_props
    return hits / total if total else float("nan")
