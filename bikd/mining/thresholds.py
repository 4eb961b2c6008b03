"""Which scored candidates a round accepts: per-relation thresholds for a target precision, or top-k.

Thresholds are calibrated on the round's own candidates labelled by the **valid** split (a candidate whose
triple is in valid is a positive, any other a negative): valid chooses the thresholds and so never counts
in the precision a round is measured with. Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np


@dataclass(kw_only=True, frozen=True)
class ThresholdConfig:
    #: "precision": per-relation thresholds reaching ``target_precision`` on valid-labelled candidates;
    #: "top_k": the ``top_k`` most confident candidates of each relation
    mode: Literal["precision", "top_k"] = "precision"
    target_precision: float = 0.5
    top_k: int = 100
    #: a relation with fewer valid positives among the candidates takes the threshold pooled over all relations
    min_positives: int = 1

    def __post_init__(self):
        if self.mode not in ("precision", "top_k"):
            raise ValueError(f"thresholds.mode must be 'precision' or 'top_k', got {self.mode!r}")
        if not 0.0 < self.target_precision <= 1.0:
            raise ValueError(f"thresholds.target_precision must be in (0, 1], got {self.target_precision}")
        if self.top_k < 1:
            raise ValueError(f"thresholds.top_k must be >= 1, got {self.top_k}")
        if self.min_positives < 1:
            raise ValueError(f"thresholds.min_positives must be >= 1, got {self.min_positives}")


def precision_threshold(scores: np.ndarray, positive: np.ndarray, target: float) -> float:
    """The lowest ``s`` such that the items scoring ``>= s`` have precision ``>= target``; ``inf`` (accept
    nothing) when no cut reaches it. Cuts are only taken between distinct scores, so tied items are
    accepted or rejected together."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    if len(scores) == 0:
        return float("inf")
    order = np.argsort(-scores, kind="stable")
    s, hits = scores[order], np.cumsum(positive[order])
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    precision = hits / np.arange(1, len(s) + 1)
    ok = np.flatnonzero(last_of_tie & (precision >= target))
    return float(s[ok[-1]]) if len(ok) else float("inf")


def calibrate(relations: np.ndarray, confidences: np.ndarray, positive: np.ndarray, num_relations: int,
              cfg: ThresholdConfig) -> np.ndarray:
    """Per-relation thresholds ``(num_relations,)`` float64 from candidates ``relations`` (n,) int,
    ``confidences`` (n,) and ``positive`` (n,) bool (their triple is in valid). Relations with fewer than
    ``cfg.min_positives`` positives get the threshold of all candidates pooled."""
    relations = np.asarray(relations, np.int64)
    confidences, positive = np.asarray(confidences, np.float64), np.asarray(positive, bool)
    pooled = precision_threshold(confidences, positive, cfg.target_precision)
    out = np.full(num_relations, pooled)
    for r in np.unique(relations):
        mask = relations == r
        if positive[mask].sum() >= cfg.min_positives:
            out[r] = precision_threshold(confidences[mask], positive[mask], cfg.target_precision)
    return out


def above_thresholds(relations: np.ndarray, confidences: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(n,) bool: confidence >= its relation's threshold."""
    return np.asarray(confidences) >= np.asarray(thresholds)[np.asarray(relations, np.int64)]


def top_k_per_relation(relations: np.ndarray, confidences: np.ndarray, k: int) -> np.ndarray:
    """(n,) bool: the ``k`` most confident items of each relation (ties by position)."""
    relations, confidences = np.asarray(relations, np.int64), np.asarray(confidences, np.float64)
    order = np.lexsort((np.arange(len(relations)), -confidences, relations))
    r_sorted = relations[order]
    start = np.r_[0, np.flatnonzero(r_sorted[1:] != r_sorted[:-1]) + 1]
    rank = np.arange(len(order)) - np.repeat(start, np.diff(np.r_[start, len(order)]))
    out = np.zeros(len(relations), bool)
    out[order[rank < k]] = True
    return out
