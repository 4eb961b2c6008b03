"""The small DistMult training config the Ray tests share (fast enough for several runs per test)."""

from __future__ import annotations

from bikd.kge.losses import LossConfig
from bikd.kge.models import ModelConfig
from bikd.kge.optim import SparseOptimConfig
from bikd.kge.sampling import NegativeSamplerConfig
from bikd.kge.training import KGETrainConfig


def cfg(**kw) -> KGETrainConfig:
    base = dict(model=ModelConfig(name="distmult", dim=16), loss=LossConfig(name="logistic"), batch_size=200,
                sampler=NegativeSamplerConfig(num_negatives=16, chunk_size=50), optimizer=SparseOptimConfig(lr=0.1))
    return KGETrainConfig(**{**base, **kw})
