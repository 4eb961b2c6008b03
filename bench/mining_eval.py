"""The measuring half of ``bench/mining.py``: precision@k of mined triples against test, the KG-only
baseline, and the MRR effect of reverse distillation. Pure torch/numpy (no Ray).

Only these functions read the test split, and only to report: nothing here chooses a candidate, a
threshold or a model.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable, Sequence

import numpy as np
import torch

from bikd.eval import evaluate
from bikd.eval.ranking import EvalConfig
from bikd.kg.triples import KGSplits
from bikd.kge.losses import ReverseKDConfig
from bikd.kge.training import KGETrainConfig, LocalTrainer
from bikd.mining.candidates import CandidateConfig, TailScorer, kg_proposals
from bikd.mining.round import decide
from bikd.mining.thresholds import ThresholdConfig, above_thresholds, calibrate, top_k_per_relation

KS = (100, 1_000, 10_000)
Triple = tuple[int, int, int]


def as_set(triples: torch.Tensor | np.ndarray) -> set[Triple]:
    return {tuple(t) for t in np.asarray(triples, np.int64).reshape(-1, 3).tolist()}


def _in(triples: np.ndarray, known: set[Triple]) -> np.ndarray:
    return np.asarray([tuple(t) in known for t in triples.tolist()], bool)


def precision_at(hits: np.ndarray, k: int) -> float:
    """Share of test triples among the first ``min(k, n)`` ranked ones (NaN when none was ranked): when fewer
    than k triples were mined, the precision of all of them (``num_ranked`` says how many)."""
    return float(hits[:k].mean()) if len(hits) else float("nan")


def mined_arrays(result, candidates, probs: np.ndarray, kg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The round's mined triples as ids (n, 3), confidences (n,) and the LM's distribution over the R
    relations (n, R), renormalised without "no relation", of the candidate each came from."""
    R = kg.num_relations
    relations, confidences = decide(candidates, probs, R)
    where: dict[tuple, list[int]] = {}
    for i, c in enumerate(candidates):
        where.setdefault((c.h, int(relations[i]), c.t, c.doc_id), []).append(i)
    e2i, r2i = kg.entities.to_id, kg.relations.to_id
    rows = []
    for m in result.mined:
        key = (e2i[m.head], r2i[m.relation], e2i[m.tail], m.provenance.document)
        rows.append(max(where[key], key=lambda j: confidences[j]))
    rows = np.asarray(rows, np.int64)
    triples = np.asarray([(candidates[i].h, int(relations[i]), candidates[i].t) for i in rows], np.int64).reshape(-1, 3)
    dist = np.asarray(probs, np.float64)[rows, :R].reshape(-1, R)
    dist /= np.maximum(dist.sum(1, keepdims=True), 1e-12)
    return triples, confidences[rows], dist


def precision_report(triples: np.ndarray, confidences: np.ndarray, relation_labels: Sequence[str],
                     splits: dict[str, set[Triple]], ks: Sequence[int] = KS) -> dict:
    """Mined ``triples (n, 3)`` with ``confidences (n,)``: those in valid are set aside (valid chose the
    thresholds), the rest ranked by confidence (ties by position) and scored against test at each k,
    overall and per relation; and how many are in train (should be 0), valid, test, or no split (new)."""
    triples = np.asarray(triples, np.int64).reshape(-1, 3)
    in_split = {name: _in(triples, s) for name, s in splits.items()}
    ranked = np.flatnonzero(~in_split["valid"])
    ranked = ranked[np.argsort(-np.asarray(confidences)[ranked], kind="stable")]
    hits = in_split["test"][ranked]
    out = {f"precision_at_{k}": precision_at(hits, k) for k in ks}
    out.update(num_mined=len(triples), num_ranked=len(ranked), num_in_train=int(in_split["train"].sum()),
               num_in_valid=int(in_split["valid"].sum()), num_in_test=int(in_split["test"].sum()),
               num_new=int((~(in_split["train"] | in_split["valid"] | in_split["test"])).sum()))
    per_relation = {}
    rels = triples[ranked, 1]
    for r in np.unique(rels).tolist():
        h = hits[rels == r]
        per_relation[relation_labels[r]] = {"num_ranked": len(h), "num_in_test": int(h.sum()),
                                            **{f"precision_at_{k}": precision_at(h, k) for k in ks}}
    out["per_relation"] = dict(sorted(per_relation.items(), key=lambda kv: -kv[1]["num_ranked"]))
    return out


def kg_only_baseline(score_t: TailScorer, known: np.ndarray, heads: np.ndarray, num_entities: int,
                     num_relations: int, cand_cfg: CandidateConfig, tcfg: ThresholdConfig,
                     splits: dict[str, set[Triple]], num: int) -> dict:
    """The KG model's own most confident predictions, no LM: its top-k tails for (h, r), h mentioned in the
    corpus (the candidate rules of a round, bounded by ``max_candidates``), scored by the KG's softmax
    probability of the tail, accepted as a round's are by ``tcfg`` (per-relation thresholds for the target
    precision on valid; or top-k per relation); the ``num`` most confident accepted ones outside valid are
    scored against test (precision@k, k <= num; NaN when num is 0). Also without thresholds (``unthresholded``).
    No ``min_confidence`` floor: that is for the LM's probabilities, on another scale than the KG's."""
    props = kg_proposals(score_t, known, heads, num_entities, num_relations, cand_cfg)
    triples, scores = props.triples, props.scores
    positive = _in(triples, splits["valid"])
    if tcfg.mode == "precision":
        thresholds = calibrate(triples[:, 1], scores, positive, num_relations, tcfg)
        keep = above_thresholds(triples[:, 1], scores, thresholds)
    else:
        thresholds = np.full(num_relations, np.nan)
        keep = top_k_per_relation(triples[:, 1], scores, tcfg.top_k)

    def top(mask: np.ndarray) -> dict:
        idx = np.flatnonzero(mask & ~positive)[:num]  # proposals are sorted best first
        hits = _in(triples[idx], splits["test"])
        return {"num_ranked": len(idx), "num_in_test": int(hits.sum()),
                **{f"precision_at_{k}": precision_at(hits, min(k, num)) for k in KS}}

    return {"num_proposals": len(triples), "num_accepted": int(keep.sum()),
            "num_relations_accepting": int(np.isfinite(thresholds).sum()), "thresholded": top(keep),
            "unthresholded": top(np.ones(len(triples), bool))}


def split_mrr(model, test_mined: torch.Tensor, test_other: torch.Tensor, filters: Sequence[torch.Tensor],
              num_relations: int) -> dict:
    """Filtered MRR (both sides) on the test triples that were mined and on the others, and over both
    (the mean of reciprocal ranks, so the count-weighted mean of the two)."""
    cfg = EvalConfig(batch_size=256, compile="never")
    out, total = {}, 0.0
    for name, part in (("mined", test_mined), ("not_mined", test_other)):
        out[f"mrr_{name}"] = evaluate(model, part, filters, num_relations, cfg).mrr if len(part) else float("nan")
        out[f"num_{name}"] = len(part)
        total += len(part) * (out[f"mrr_{name}"] if len(part) else 0.0)
    out["mrr"] = total / max(len(test_mined) + len(test_other), 1)
    return out


def continued(kg: KGSplits, teacher_state: dict, cfg: KGETrainConfig, seed: int) -> LocalTrainer:
    """A trainer holding the teacher's tables and optimiser state, with batches and negatives drawn afresh
    from ``seed`` (loading the whole state would restore the teacher's sampler: every seed the same run)."""
    trainer = LocalTrainer(kg.train, kg.num_entities, kg.num_relations, dataclasses.replace(cfg, seed=seed))
    trainer.model.load_state_dict(teacher_state["model"])
    trainer.entity_opt.load_state_dict(teacher_state["entity_opt"])
    trainer.relation_opt.load_state_dict(teacher_state["relation_opt"])
    return trainer


def reverse_distillation(kg: KGSplits, teacher_state: dict, cfg: KGETrainConfig, mined: np.ndarray,
                         weights: np.ndarray, targets: np.ndarray, *, extra_epochs: int, seeds: Sequence[int],
                         kd: ReverseKDConfig, eval_limit: int | None = None,
                         log: Callable[[str], None] = print) -> dict:
    """Per seed, two runs from the teacher for ``extra_epochs`` epochs: on train only (``gold_only``), and
    on train + ``mined (n, 3)`` (``weights (n,)`` their confidences, ``targets (n, R)`` the LM's relation
    distributions for the KD term ``kd``). Filtered test MRR of the teacher (before) and of every run,
    split into test triples that were mined and the others. ``eval_limit``: evaluate the mined test triples
    and a seeded sample of at most this many others (smoke runs). ``mrr_gain``: median over seeds of
    (mined run - gold-only run) on the same seed."""
    filters = [kg.train, kg.valid, kg.test]
    mined_set = as_set(mined)
    is_mined = torch.tensor([tuple(t) in mined_set for t in kg.test.tolist()], dtype=torch.bool)
    test_mined, test_other = kg.test[is_mined], kg.test[~is_mined]
    if eval_limit is not None and len(test_other) > eval_limit:
        pick = torch.randperm(len(test_other), generator=torch.Generator().manual_seed(0))[:eval_limit]
        test_other = test_other[pick.sort().values]
    teacher = continued(kg, teacher_state, cfg, seed=0)
    before = split_mrr(teacher.model, test_mined, test_other, filters, kg.num_relations)
    log(f"reverse distillation: teacher test MRR {before['mrr']:.4f} (mined {before['mrr_mined']:.4f} on "
        f"{len(test_mined)}, others {before['mrr_not_mined']:.4f})")
    runs = []
    for seed in seeds:
        run = {"seed": seed}
        for arm in ("gold_only", "mined"):
            start = time.perf_counter()
            trainer = continued(kg, teacher_state, dataclasses.replace(
                cfg, reverse_kd=kd if arm == "mined" else ReverseKDConfig()), seed)
            if arm == "mined" and len(mined):
                trainer.add_triples(torch.as_tensor(mined, dtype=torch.long),
                                    torch.as_tensor(weights, dtype=torch.float32),
                                    torch.as_tensor(targets, dtype=torch.float32), kg_version=1)
            losses = [trainer.train_epoch() for _ in range(extra_epochs)]
            run[arm] = split_mrr(trainer.model, test_mined, test_other, filters, kg.num_relations)
            run[arm].update(losses=losses, seconds=round(time.perf_counter() - start, 1))
            log(f"  seed {seed} {arm:9s}: test MRR {run[arm]['mrr']:.4f} (mined {run[arm]['mrr_mined']:.4f}, "
                f"others {run[arm]['mrr_not_mined']:.4f}) in {run[arm]['seconds']} s")
        run["gain"] = run["mined"]["mrr"] - run["gold_only"]["mrr"]
        runs.append(run)
    med = lambda xs: statistics.median(xs) if xs else math.nan  # noqa: E731
    return {"mrr_before": before["mrr"], "mrr_after": med([r["mined"]["mrr"] for r in runs]),
            "mrr_gold_only": med([r["gold_only"]["mrr"] for r in runs]), "mrr_gain": med([r["gain"] for r in runs]),
            "mrr_gain_vs_before": med([r["mined"]["mrr"] - before["mrr"] for r in runs]),
            "before": before, "runs": runs, "num_test_mined": len(test_mined),
            "num_test_other_evaluated": len(test_other),
            "extra_epochs": extra_epochs, "reverse_kd": dataclasses.asdict(kd)}
