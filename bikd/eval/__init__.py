"""Evaluation (pure torch): filtered rank-based link prediction."""

from bikd.eval.ranking import EvalConfig, FilterIndex, Ranks, RankResults, evaluate, rank_side

__all__ = ["EvalConfig", "FilterIndex", "Ranks", "RankResults", "evaluate", "rank_side"]
