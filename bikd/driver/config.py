"""The bidirectional job's configuration: one dataclass per part composed into :class:`BikdConfig`, the
resource split, and the LM job each round runs (see bikd.driver for the loop)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import ray

from bikd.eval import EvalConfig
from bikd.kg.datasets import DataConfig
from bikd.kge.losses import LossConfig
from bikd.kge.models import ModelConfig
from bikd.kge.optim import SparseOptimConfig
from bikd.kge.sampling import NegativeSamplerConfig
from bikd.kge.training import KGETrainConfig
from bikd.lm.extractor import ExtractorConfig
from bikd.lm.fusion import FusionConfig
from bikd.lm.kd import KDConfig
from bikd.lm.train import TaskConfig
from bikd.lm.trainer import TrainConfig
from bikd.lm.triple_cls import TripleClsConfig
from bikd.mining.candidates import CandidateConfig
from bikd.mining.round import MiningConfig
from bikd.ray import require_resources
from bikd.ray.exchange import ExchangeConfig
from bikd.ray.kge import DistConfig
from bikd.ray.lm_train import LMJobConfig, RoundsConfig, validate as validate_lm
from bikd.ray.mining import ScoringConfig
from bikd.storage import join_url

__all__ = ["LoopConfig", "MineSideConfig", "BikdConfig", "required_cpus", "lm_side", "validate"]


@dataclass(kw_only=True, frozen=True)
class LoopConfig:
    mode: Literal["async", "sync"] = "async"
    directions: Literal["none", "kg2lm", "both"] = "both"
    rounds: int = 3
    kge_epochs_per_round: int = 5
    lm_steps_per_round: int = 40
    #: async: KGE rounds the KGE side may run ahead of the mining (0: KGE round k waits for mining round k - 1,
    #: so every KGE round but the first trains on what was mined; the LM side never waits)
    max_kge_lead: int = 0
    #: stop after the round during which this many seconds have passed (null: no budget)
    time_budget_s: float | None = None
    #: a per-round metric (a key of metrics.jsonl) that should rise; null patience: no plateau rule
    plateau_metric: str = "kg_valid_mrr"
    plateau_patience: int | None = None
    plateau_min_delta: float = 0.001

    def __post_init__(self):
        if self.mode not in ("async", "sync"):
            raise ValueError(f"loop.mode must be 'async' or 'sync', got {self.mode!r}")
        if self.directions not in ("none", "kg2lm", "both"):
            raise ValueError(f"loop.directions must be none, kg2lm or both, got {self.directions!r}")
        for key in ("rounds", "kge_epochs_per_round", "lm_steps_per_round"):
            if getattr(self, key) < 1:
                raise ValueError(f"loop.{key} must be >= 1, got {getattr(self, key)}")
        if self.max_kge_lead < 0:
            raise ValueError(f"loop.max_kge_lead must be >= 0, got {self.max_kge_lead}")
        if self.plateau_patience is not None and self.plateau_patience < 1:
            raise ValueError(f"loop.plateau_patience must be >= 1 or null, got {self.plateau_patience}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"loop.time_budget_s must be > 0 or null, got {self.time_budget_s}")


@dataclass(kw_only=True, frozen=True)
class MineSideConfig:
    """LM -> KG: passages (the KG's descriptions and ``corpus`` files), the extractor fine-tuned each round from
    the LM's encoder, candidates and thresholds (``mining``), the scoring pool (``scoring``)."""

    corpus: tuple[str, ...] = ()
    descriptions: bool = True
    max_pairs_per_passage: int | None = 20
    num_calib_pairs: int = 500
    extractor: ExtractorConfig = field(default_factory=ExtractorConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    #: precision@k of the round's mined triples (by confidence) against valid
    precision_at: int = 100


def _default_kge() -> KGETrainConfig:
    """TransE as tuned for FB15k-237 (configs/kge_fb15k237_transe.yaml), at dim 64 for the 2,000-entity slice."""
    return KGETrainConfig(model=ModelConfig(name="transe", dim=64, p=2, init_scale=0.125, normalize_entities=False),
                          sampler=NegativeSamplerConfig(num_negatives=128, chunk_size=128),
                          loss=LossConfig(name="self_adversarial", margin=6.0, adversarial_temperature=1.0),
                          optimizer=SparseOptimConfig(name="rowwise_adagrad", lr=0.2), batch_size=1024)


def _default_lm() -> LMJobConfig:
    """MiniLM with the KG fused after layer 3, KD on, triple classification of the slice; one worker
    with both cores (sync mode runs one side at a time)."""
    return LMJobConfig(
        fusion=FusionConfig(layers=(3,), gate_init=0.1), kd=KDConfig(entity_weight=0.1, relation_weight=0.1, num_sampled_candidates=64),
        task=TaskConfig(link=True, max_train=600, max_eval=200, triple_cls=TripleClsConfig(max_length=48)),
        train=TrainConfig(lr=1e-4, warmup_steps=10, batch_size=16, eval_batch_size=64, log_every=10),
        num_workers=1, cpus_per_worker=2.0)


def _default_mine() -> MineSideConfig:
    return MineSideConfig(extractor=ExtractorConfig(max_length=64, max_train_pairs=2000, batch_size=16),
                          num_calib_pairs=300, mining=MiningConfig(candidates=CandidateConfig(max_candidates=2000)),
                          scoring=ScoringConfig(num_actors=1, num_cpus=2.0))


@dataclass(kw_only=True, frozen=True)
class BikdConfig:
    """The defaults run the whole loop on the embedded FB15k-237 slice in a few minutes on 2 CPU cores."""

    data: DataConfig = field(default_factory=lambda: DataConfig(dataset="fb15k237_slice"))
    run_dir: str = "runs/bikd"
    storage_options: dict[str, Any] = field(default_factory=dict)
    loop: LoopConfig = field(default_factory=LoopConfig)
    kge: KGETrainConfig = field(default_factory=_default_kge)
    kge_dist: DistConfig = field(default_factory=lambda: DistConfig(num_parts=1, mode="sync"))
    kg_eval: EvalConfig = field(default_factory=EvalConfig)
    #: valid triples ranked per round (a seeded sample; null: all); test is ranked once, at the end
    valid_limit: int | None = 1000
    #: valid triples in the LM's cloze probe ("<head> <relation text> [MASK]."), per round
    probe_limit: int = 300
    lm: LMJobConfig = field(default_factory=_default_lm)
    mine: MineSideConfig = field(default_factory=_default_mine)
    exchange: ExchangeConfig = field(default_factory=ExchangeConfig)
    #: one seed for the training randomness of every side (KGE init and sampling, LM dropout/KD/order,
    #: extractor); null: each side's own. The data samples (task, probe, valid) stay fixed across seeds
    seed: int | None = None
    num_threads: int | None = None

    def __post_init__(self):
        if self.probe_limit < 1:
            raise ValueError(f"probe_limit must be >= 1, got {self.probe_limit}")
        if self.valid_limit is not None and self.valid_limit < 1:
            raise ValueError(f"valid_limit must be >= 1 or null, got {self.valid_limit}")
        if self.loop.mode == "sync" and self.kge_dist.mode != "sync":
            raise ValueError("loop.mode sync needs kge_dist.mode sync (async trainers are not reproducible)")
        if self.seed is not None:  # frozen: set once, here, so that the printed config shows what runs
            rep, s = dataclasses.replace, self.seed
            object.__setattr__(self, "kge", rep(self.kge, seed=s))
            object.__setattr__(self, "lm", rep(self.lm, train=rep(self.lm.train, seed=s), kd=rep(self.lm.kd, seed=s)))
            object.__setattr__(self, "mine", rep(self.mine, extractor=rep(self.mine.extractor, seed=s)))


def required_cpus(cfg: BikdConfig) -> dict[str, float]:
    """The CPU reservation of each side (its actors hold it while they live)."""
    return {"kge": cfg.kge_dist.num_parts * cfg.kge_dist.cpus_per_trainer,
            "lm": cfg.lm.num_workers * cfg.lm.cpus_per_worker,
            "mining": cfg.mine.scoring.num_actors * cfg.mine.scoring.num_cpus if cfg.loop.directions == "both" else 0.0}


def lm_side(cfg: BikdConfig, base_snapshot: str) -> LMJobConfig:
    """The LM side's one fit: ``rounds`` x ``lm_steps_per_round`` steps on one schedule, cut into rounds (each
    exported to lm/exports/round-NNNN, checkpointed and posted to the exchange actor ``cfg.exchange.actor``;
    sync: each round starts when the driver allows it). The KG table starts from the first snapshot and
    follows the exchange (none: no links, no KD, so never used)."""
    loop, lm = cfg.loop, cfg.lm
    steps = loop.rounds * loop.lm_steps_per_round
    train = dataclasses.replace(lm.train, steps=steps, schedule_steps=steps, checkpoint_every=loop.lm_steps_per_round,
                                eval_every=None)
    task, kd, exchange = lm.task, lm.kd, cfg.exchange
    if loop.directions == "none":  # the plain LM: no links, so no fusion and no KD
        task, kd = dataclasses.replace(task, link=False), dataclasses.replace(kd, entity_weight=0.0, relation_weight=0.0)
    elif loop.mode == "sync":  # polled at the round's first step: the snapshot of this round
        exchange = dataclasses.replace(exchange, lm_poll_steps=math.gcd(exchange.lm_poll_steps, loop.lm_steps_per_round))
    return dataclasses.replace(
        lm, data=cfg.data, train=train, task=task, kd=kd, exchange=exchange,
        rounds=RoundsConfig(steps=loop.lm_steps_per_round, gated=loop.mode == "sync"),
        kg=dataclasses.replace(lm.kg, export=base_snapshot), storage_path=join_url(cfg.run_dir, "lm"), name="ckpt",
        storage_options=cfg.storage_options, export_path=join_url(cfg.run_dir, "lm", "exports"))


def validate(cfg: BikdConfig) -> BikdConfig:
    """Everything checkable before an actor starts (ValueError): the LM side's files and layers, the resource
    split against the cluster (Ray initialised)."""
    need = required_cpus(cfg)
    # sync: one side runs at a time, but every side's actors hold their CPUs for the whole run
    have = ray.cluster_resources().get("CPU", 0) if ray.is_initialized() else math.inf
    if sum(need.values()) > have:
        raise ValueError("resource split " + ", ".join(f"{k} {v:g} CPUs" for k, v in need.items())
                         + f" needs {sum(need.values()):g} CPUs; the Ray cluster has {have:g}")
    if ray.is_initialized():  # the LM's are checked by validate_lm
        require_resources("kge_dist.resources_per_trainer", cfg.kge_dist.resources_per_trainer, cfg.kge_dist.num_parts)
        require_resources("mine.scoring.resources", cfg.mine.scoring.resources, cfg.mine.scoring.num_actors)
    validate_lm(dataclasses.replace(cfg.lm, data=cfg.data, exchange=dataclasses.replace(cfg.exchange, actor=None)))
    return cfg
