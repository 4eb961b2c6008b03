"""Scoring a mining round's candidates as batch inference on a pool of Ray actors (CPU or GPU).

Each :class:`PairScorerActor` builds its scorer once (``factory()``: e.g. load the exported extractor) and
then scores batches; the driver cuts the candidates into batches of ``batch_size`` and hands them to a
``ray.util.ActorPool``, which keeps every actor busy and returns the results in order. The driver never
loops over single candidates; adding actors (or nodes) scales the round out.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import ray
from ray.util import ActorPool

from bikd.lm.pairs import PairCandidate, PairScorer


@dataclass(kw_only=True, frozen=True)
class ScoringConfig:
    num_actors: int = 2
    #: candidates per call of an actor (the scorer batches further inside)
    batch_size: int = 256
    #: CPUs per actor (its torch threads); num_gpus > 0 places each actor on a GPU share
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    #: custom Ray resources each actor needs (e.g. {lm: 0.01}: only on nodes started with that resource)
    resources: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if any(not v > 0 for v in self.resources.values()):
            raise ValueError(f"scoring.resources must map resource names to amounts > 0, got {self.resources}")
        if self.num_actors < 1:
            raise ValueError(f"scoring.num_actors must be >= 1, got {self.num_actors}")
        if self.batch_size < 1:
            raise ValueError(f"scoring.batch_size must be >= 1, got {self.batch_size}")
        if not self.num_cpus > 0:
            raise ValueError(f"scoring.num_cpus must be > 0, got {self.num_cpus}")
        if not self.num_gpus >= 0:
            raise ValueError(f"scoring.num_gpus must be >= 0, got {self.num_gpus}")


@dataclass(frozen=True, kw_only=True)
class ScoreBatch:
    version: int  # the mining round the batch belongs to
    index: int  # position of the batch in the round
    candidates: tuple[PairCandidate, ...]


@dataclass(frozen=True, kw_only=True)
class ScoredBatch:
    version: int
    index: int
    probs: np.ndarray  # (len(candidates), R + 1) float32


@ray.remote
class PairScorerActor:
    """Thin actor around a :data:`PairScorer`: loads it once, then each call unpacks a batch and scores it."""

    def __init__(self, factory: Callable[[], PairScorer]):
        import torch

        threads = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(threads)))
        self.scorer = factory()

    def score(self, msg: ScoreBatch) -> ScoredBatch:
        probs = np.asarray(self.scorer(list(msg.candidates)), dtype=np.float32)
        return ScoredBatch(version=msg.version, index=msg.index, probs=probs)

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


class ActorScorer:
    """A :data:`PairScorer` over a pool of ``cfg.num_actors`` scorer actors; ``close()`` ends them."""

    def __init__(self, factory: Callable[[], PairScorer], cfg: ScoringConfig, version: int = 0):
        self.cfg, self.version = cfg, version
        options = {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus, "resources": dict(cfg.resources)}
        self.actors = [PairScorerActor.options(**options).remote(factory) for _ in range(cfg.num_actors)]
        ray.get([a.pid.remote() for a in self.actors])  # a factory that fails, fails here with its own error
        self.pool = ActorPool(self.actors)

    def __call__(self, candidates: Sequence[PairCandidate]) -> np.ndarray:
        n, b = len(candidates), self.cfg.batch_size
        batches = [ScoreBatch(version=self.version, index=i, candidates=tuple(candidates[s:s + b]))
                   for i, s in enumerate(range(0, n, b))]
        from tqdm.auto import tqdm  # a progress bar on a terminal (disable=None: silent in logs and pipes)

        results = list(tqdm(self.pool.map(lambda actor, msg: actor.score.remote(msg), batches), total=len(batches),
                            desc=f"scoring {n} candidates", unit="batch", disable=None, leave=False))
        assert [r.index for r in results] == list(range(len(batches))), "ActorPool.map returns results in order"
        if not results:
            return np.zeros((0, 0), np.float32)
        return np.concatenate([r.probs for r in results])

    def pids(self) -> list[int]:
        return ray.get([a.pid.remote() for a in self.actors])

    def node_ids(self) -> list[str]:
        """The Ray node each actor runs on."""
        return ray.get([a.node_id.remote() for a in self.actors])

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []

    def __enter__(self) -> "ActorScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def extractor_factory(source: str, batch_size: int = 64, kg_export: str | None = None) -> Callable[[], PairScorer]:
    """A picklable factory that loads the exported extractor at ``source`` inside an actor; a fusion-on
    extractor fuses the KG embeddings exported at ``kg_export`` (a :mod:`bikd.kge.export` folder)."""
    return functools.partial(_load_scorer, source, batch_size, kg_export)


def _load_scorer(source: str, batch_size: int, kg_export: str | None) -> PairScorer:
    from bikd.lm.extractor import load_extractor, make_scorer
    from bikd.lm.extractor_io import read_manifest
    from bikd.lm.kg_teacher import KGTable
    from bikd.storage import Storage

    table = None
    if read_manifest(source).get("requires_kg_table"):
        if kg_export is None:
            raise ValueError(f"the extractor at {source} fuses KG embeddings: give it a KG snapshot (a KGE export)")
        table = KGTable.from_export(Storage(kg_export))
    # an actor placed with num_gpus > 0 sees its GPU(s) and scores there; else the CPU
    device = "cuda" if ray.get_gpu_ids() else "cpu"
    model, tokenizer = load_extractor(source, table=table, device=device)
    return make_scorer(model, tokenizer, batch_size)
