"""Distributed training of the fused LM: Ray Train's TorchTrainer runs one DeepSpeed engine per worker.

Ray Train creates the process group (gloo on CPU, nccl on GPU) and DeepSpeed adopts it. Every
``checkpoint_every`` steps each rank writes its DeepSpeed files (ZeRO-1/2: rank 0 the model states, every
rank its optimizer partition; ZeRO-3: every rank its model and optimizer partitions) into a local folder and
reports it; Ray Train merges the ranks' folders into one checkpoint folder under ``storage_path`` (any URL;
s3 through s3fs). A run resumes from its latest checkpoint after a worker failure (``max_failures``) and
when started again with the same ``name`` and ``storage_path``. At the end rank 0 exports the fused model
(fp32 master weights gathered from every rank) with :func:`bikd.lm.train.export_fused`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import fsspec
import ray
import ray.train
import torch
import torch.distributed as dist

from bikd.kg.datasets import DataConfig, load_from_config, text_from_config
from bikd.lm.encoder import EncoderConfig
from bikd.lm.fusion import FusionConfig
from bikd.lm.kd import KDConfig
from bikd.lm.model import LMConfig
from bikd.lm.train import (KGTableConfig, TaskConfig, build_lm, default_squad_path, encoder_num_layers, export_fused,
                           load_kg_table, state_digest)
from bikd.lm.trainer import LOSSES, LMTrainer, TrainConfig, build_parts
from bikd.ray import require_resources
from bikd.ray.exchange import ExchangeConfig, LMRound, TableFeed
from bikd.storage import Storage, join_url, url_exists

__all__ = ["DeepSpeedConfig", "TrainConfig", "FaultConfig", "RoundsConfig", "round_export", "LMJobConfig", "lm_config", "deepspeed_config",
           "set_malloc_mmap_threshold", "skip_shm_comm_build",
           "ray_storage", "validate", "train_loop_per_worker", "run"]

TAG, META = "deepspeed", "bikd_checkpoint.json"


@dataclass(kw_only=True, frozen=True)
class DeepSpeedConfig:
    """``zero_stage`` 0-3; ``bf16``: "auto" = on where the device has it (CUDA with bf16), off on CPU; true =
    on, CPU included (torch's CPU bf16 kernels: fast only on CPUs with AMX or AVX512-BF16);
    ``gradient_clipping``: max global grad norm (0 = off). No offload: the model fits each worker.
    ``bucket_numel``: elements per gradient reduce / all-gather bucket and per ZeRO-3 optimizer sub-group
    (DeepSpeed's defaults, 5e8 and 1e9, are 2-4 GB fp32 buffers: more than the partitioned state saves on a
    BERT-large; 2e7 rather than 5e7 takes another 0.26 GB off a BERT-large ZeRO-3 worker at no measurable
    step-time cost, bench/zero_memory.py); ``max_live_numel``
    (ZeRO-3): gathered parameters kept resident, and the reuse distance under which one is not released
    (DeepSpeed's default, 1e9, keeps a whole BERT-large gathered from forward to backward).
    ``malloc_mmap_threshold``: bytes from which a worker's CPU allocations are mmapped and so go back to the
    OS when freed (glibc ``mallopt``; 0 = glibc's adaptive default). ZeRO-3 gathers and frees every
    parameter each step; with the adaptive default glibc serves those from its heap and keeps them, and a
    BERT-large worker's RSS under ZeRO-3 grew past ZeRO-0's (8.3 vs 7.6 GB, bench/zero_memory.py)."""

    zero_stage: int = 2
    bf16: bool | Literal["auto"] = "auto"
    gradient_clipping: float = 1.0
    bucket_numel: int = 20_000_000
    max_live_numel: int = 50_000_000
    malloc_mmap_threshold: int = 1 << 20

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.bf16 not in (True, False, "auto"):
            raise ValueError(f"deepspeed.bf16 must be true, false or 'auto', got {self.bf16!r}")
        if not self.gradient_clipping >= 0:
            raise ValueError(f"deepspeed.gradient_clipping must be >= 0, got {self.gradient_clipping}")
        for name in ("bucket_numel", "max_live_numel"):
            if not getattr(self, name) > 0:
                raise ValueError(f"deepspeed.{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.malloc_mmap_threshold <= 1 << 25:  # glibc's ceiling (HEAP_MAX / 2 on 64-bit)
            raise ValueError(f"deepspeed.malloc_mmap_threshold must be in [0, 33554432] bytes, got {self.malloc_mmap_threshold}")


@dataclass(kw_only=True, frozen=True)
class FaultConfig:
    """For tests: worker ``fail_rank`` exits hard after step ``fail_at_step``, once (it first creates the file
    ``marker``). ``param_digest``: report the sha256 of the gathered weights (an all-gather per report)."""

    fail_at_step: int | None = None
    fail_rank: int = 1
    marker: str | None = None
    param_digest: bool = False

    def __post_init__(self):
        if self.fail_at_step is not None and (self.fail_at_step < 1 or not self.marker):
            raise ValueError("debug.fail_at_step must be >= 1 and needs debug.marker (so that it fails only once)")


@dataclass(kw_only=True, frozen=True)
class RoundsConfig:
    """For a driver running the LM as one fit cut into rounds (bikd.driver): null ``steps``: no rounds. At the
    end of round k (step k x ``steps``) the ranks evaluate (with and without the table), rank 0 exports to
    ``<export_path>/round-NNNN``, the checkpoint is written and committed, and then rank 0 posts an
    ``LMRound`` to the exchange actor. ``gated``: round k starts only once the driver has allowed it there
    (sync mode). The driver's stop ends the fit at the next poll or round end."""

    steps: int | None = None
    gated: bool = False

    def __post_init__(self):
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"rounds.steps must be >= 1 or null, got {self.steps}")


def round_export(export_path: str, rnd: int) -> str:
    """Where round ``rnd`` of a run in rounds exports."""
    return join_url(export_path, f"round-{rnd:04d}")


@dataclass(kw_only=True, frozen=True)
class LMJobConfig:
    data: DataConfig = field(default_factory=DataConfig)
    kg: KGTableConfig = field(default_factory=KGTableConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    #: custom Ray resources each worker needs: workers go only to nodes that have them (e.g. {lm: 1})
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    #: checkpoints go to <storage_path>/<name>/; a new run with the same name resumes from the latest one
    storage_path: str = "runs"
    name: str = "lm_train"
    #: fsspec options for storage_path and export_path (e.g. {endpoint_url: ...} for S3); default: AWS env vars
    storage_options: dict[str, Any] = field(default_factory=dict)
    #: where the fused model is exported (null: <storage_path>/<name>/export)
    export_path: str | None = None
    max_failures: int = 1
    keep_checkpoints: int = 2
    #: with ``exchange.actor`` set, the KG table follows the snapshots published there (every lm_poll_steps)
    exchange: ExchangeConfig = field(default_factory=ExchangeConfig)
    rounds: RoundsConfig = field(default_factory=RoundsConfig)
    debug: FaultConfig = field(default_factory=FaultConfig)

    def __post_init__(self):
        if any(not v > 0 for v in self.resources_per_worker.values()):
            raise ValueError(f"resources_per_worker must map resource names to amounts > 0, got {self.resources_per_worker}")
        if self.num_workers < 1 or not self.cpus_per_worker > 0:
            raise ValueError(f"num_workers must be >= 1 and cpus_per_worker > 0, got {self.num_workers}, {self.cpus_per_worker}")
        if not self.name or "/" in self.name or not self.storage_path:
            raise ValueError(f"name must be a non-empty folder name without '/' and storage_path non-empty, got {self.name!r}")
        if self.max_failures < -1 or self.keep_checkpoints < 1:
            raise ValueError(f"max_failures must be >= -1 and keep_checkpoints >= 1, got {self.max_failures}, {self.keep_checkpoints}")
        if self.debug.fail_at_step is not None and not 0 <= self.debug.fail_rank < self.num_workers:
            raise ValueError(f"debug.fail_rank {self.debug.fail_rank} is not a rank of {self.num_workers} workers")
        if self.rounds.steps is not None and not self.exchange.actor:
            raise ValueError("rounds.steps needs exchange.actor (the rounds are posted there)")


def lm_config(cfg: LMJobConfig) -> LMConfig:
    return LMConfig(task=cfg.task.name, num_labels=2, classifier_dropout=cfg.task.classifier_dropout,
                    encoder=cfg.encoder, fusion=cfg.fusion, kd=cfg.kd)


def deepspeed_config(cfg: LMJobConfig, *, total_steps: int, bf16: bool, persist_numel: int = 0) -> dict:
    """The DeepSpeed config dict. ZeRO-3 keeps parameters of up to ``persist_numel`` elements whole on every
    rank (FusedLM.conditional_parameters: an all-gather issued by one rank alone would deadlock) and
    does not prefetch (prefetching follows each rank's own trace of module calls, which may differ)."""
    t, ds = cfg.train, cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage in (1, 2, 3):
        zero.update(reduce_bucket_size=ds.bucket_numel, allgather_bucket_size=ds.bucket_numel)
    if ds.zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=max(int(1e5), persist_numel + 1), stage3_prefetch_bucket_size=0,
                    stage3_max_live_parameters=ds.max_live_numel, stage3_max_reuse_distance=ds.max_live_numel,
                    sub_group_size=ds.bucket_numel)
    return {
        "train_micro_batch_size_per_gpu": t.batch_size, "gradient_accumulation_steps": 1,
        # torch's AdamW: DeepSpeed's fused CPU Adam needs a compiled extension
        "optimizer": {"type": "AdamW", "params": {"lr": t.lr, "weight_decay": t.weight_decay, "torch_adam": True}},
        "scheduler": {"type": "WarmupDecayLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": t.lr, "warmup_num_steps": max(1, t.warmup_steps),
            "warmup_type": "linear", "total_num_steps": max(total_steps, 2)}},
        "gradient_clipping": ds.gradient_clipping, "bf16": {"enabled": bf16}, "zero_optimization": zero,
        "steps_per_print": 1 << 62, "wall_clock_breakdown": False,
    }


def ray_storage(url: str, storage_options: dict | None = None):
    """RunConfig's ``(storage_path, storage_filesystem)``: a local path made absolute (workers run in their
    own working directory), any other URL through its fsspec filesystem (s3fs: endpoint and credentials from
    ``storage_options`` or the AWS env vars) wrapped for pyarrow, without listing caches (a resumed run must
    see the checkpoints written since), with bikd's timeouts and attempts (see bikd.storage) so that a stalled
    endpoint fails the checkpoint with a StorageError instead of hanging the run."""
    from bikd.storage import pyarrow_filesystem

    protocol, path = fsspec.core.split_protocol(url)
    if protocol in (None, "file", "local"):
        return os.path.abspath(path), None
    return pyarrow_filesystem(url, storage_options, skip_instance_cache=True, use_listings_cache=False)


def _absolute(cfg: LMJobConfig) -> LMJobConfig:
    """Local paths as absolute paths (Ray Train workers chdir to their own folder); URLs unchanged."""
    def fix(p):
        return os.path.abspath(p) if p and fsspec.core.split_protocol(p)[0] is None else p
    rep = dataclasses.replace
    export = cfg.export_path or join_url(cfg.storage_path, cfg.name, "export")
    return rep(cfg, storage_path=fix(cfg.storage_path), export_path=fix(export), data=rep(cfg.data, path=fix(cfg.data.path)),
               task=rep(cfg.task, squad_path=fix(cfg.task.squad_path or (default_squad_path() if cfg.task.name == "qa" else None))),
               debug=rep(cfg.debug, marker=fix(cfg.debug.marker)))


def validate(cfg: LMJobConfig) -> LMJobConfig:
    """Checks that need files or the cluster (ValueError), before any worker starts; returns the config
    with absolute local paths."""
    layers = encoder_num_layers(cfg.encoder)
    if max(cfg.fusion.layers) >= layers:
        raise ValueError(f"fusion.layers {list(cfg.fusion.layers)}: encoder {cfg.encoder.name_or_path!r} has {layers} layers")
    cfg = _absolute(cfg)
    if cfg.task.name == "qa" and not url_exists(cfg.task.squad_path):
        raise ValueError(f"task.squad_path {cfg.task.squad_path}: no such file (SQuAD v1.1 dev JSON)")
    if ray.is_initialized() and cfg.exchange.actor:
        try:
            ray.get_actor(cfg.exchange.actor, namespace=cfg.exchange.namespace)
        except ValueError:
            raise ValueError(f"exchange.actor {cfg.exchange.actor!r}: no such actor in Ray namespace "
                             f"{cfg.exchange.namespace or '(the job default)'}; start the exchange first") from None
    if ray.is_initialized():
        require_resources("resources_per_worker", cfg.resources_per_worker, cfg.num_workers)
        need, have = cfg.num_workers * cfg.cpus_per_worker, ray.cluster_resources().get("CPU", 0)
        if need > have or (cfg.use_gpu and cfg.num_workers > ray.cluster_resources().get("GPU", 0)):
            raise ValueError(f"{cfg.num_workers} workers x {cfg.cpus_per_worker} CPUs (use_gpu={cfg.use_gpu}) do not fit "
                             f"the Ray cluster ({ray.cluster_resources()})")
    return cfg


# ---- the worker -------------------------------------------------------------------------------------

def _full_state(lm) -> dict[str, torch.Tensor]:
    """fp32 master weights by name, gathered from every rank (a collective: every rank calls it)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in lm.named_parameters():
        full = safe_get_full_fp32_param(p)  # None under ZeRO-0 in fp32: the parameter is its own master
        out[name] = (p.detach() if full is None else full).float().cpu().clone()
    return out


def _export(lm, cfg: LMJobConfig, table, rank: int, extra: dict, path: str) -> None:
    state = _full_state(lm)
    if rank == 0:
        fresh, tokenizer = build_lm(lm_config(cfg), table)
        missing, unexpected = fresh.load_state_dict(state, strict=False)
        assert not unexpected and set(missing) <= {n for n, _ in fresh.named_buffers()}, (missing, unexpected)
        export_fused(fresh, tokenizer, Storage(path, cfg.storage_options), extra=extra)


def _repost_rounds(cfg: LMJobConfig, feed: TableFeed, step: int) -> None:
    """After a resume at step ``step`` (rank 0): post every round up to it again from its export's manifest
    (the driver of a restarted run may not have recorded them; a round's export is complete before its
    checkpoint is written, so each is there)."""
    for rnd in range(1, step // cfg.rounds.steps + 1):
        path = round_export(cfg.export_path, rnd)
        storage = Storage(path, cfg.storage_options)
        if storage.exists("manifest.json"):
            extra = json.loads(storage.read_text("manifest.json"))["extra"]
            feed.post(LMRound(round=rnd, step=extra["step"], export=path, metrics={**extra["metrics"], "export": path}))


def _restore(engine, trainer: LMTrainer, checkpoint, cfg: LMJobConfig, world: int, feed: TableFeed | None) -> list[dict]:
    """Loads the engine's and the loop's state (the KG table version it fused included); returns the report
    history up to the checkpoint."""
    with checkpoint.as_directory() as d:
        meta = json.loads(Path(d, META).read_text())
        if (meta["world_size"], meta["zero_stage"]) != (world, cfg.deepspeed.zero_stage):
            raise ValueError(f"checkpoint {checkpoint.path} was written by {meta['world_size']} workers with ZeRO-"
                             f"{meta['zero_stage']}; this run has {world} with ZeRO-{cfg.deepspeed.zero_stage}")
        _, client = engine.load_checkpoint(d, tag=TAG)
    trainer.load_state_dict(client, None if feed is None else feed.table)
    return list(meta.get("history", []))


def _broadcast(obj):
    """Rank 0's ``obj`` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def skip_shm_comm_build() -> None:
    """Keeps DeepSpeed from building its shared-memory all-reduce when its comm backend starts: a C++ JIT
    compile (plus a compiler probe of every op) of ~100 s on 2 cores, once per machine and again whenever the
    Python prefix changes, for an op only ``inference_all_reduce`` uses; training reduces through the
    process group either way."""
    import importlib

    # by module name: the attribute deepspeed.comm.torch is the torch package, not DeepSpeed's module
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def set_malloc_mmap_threshold(num_bytes: int) -> bool:
    """glibc ``mallopt(M_MMAP_THRESHOLD, num_bytes)`` in this process (fixes the threshold: glibc stops
    adapting it); False where there is no glibc (macOS) or ``num_bytes`` is 0."""
    import ctypes
    import ctypes.util

    if not num_bytes:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, int(num_bytes)))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def train_loop_per_worker(config: dict) -> dict | None:
    """One rank: build data and model, resume, train (swapping in newer KG snapshots), report, export.
    Returns (rank 0) the history of reports."""
    import deepspeed

    skip_shm_comm_build()
    cfg: LMJobConfig = config["cfg"]
    table = config["table"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    if device.type == "cpu":
        set_malloc_mmap_threshold(cfg.deepspeed.malloc_mmap_threshold)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # identical initial weights on every rank (ZeRO-3 partitions each rank's copy)
    nodes = [None] * world  # where the ranks run (the driver records it)
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    parts = build_parts(lm_config(cfg), cfg.task, load_from_config(cfg.data), text_from_config(cfg.data), table,
                        seed=cfg.train.seed, rank=rank, world_size=world)
    lm = parts.model
    total = cfg.train.steps or cfg.train.epochs * parts.train_data.num_batches(cfg.train.batch_size)
    bf16 = cfg.deepspeed.bf16 is True or (cfg.deepspeed.bf16 == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    ds = deepspeed_config(cfg, total_steps=cfg.train.schedule_steps or total, bf16=bf16, persist_numel=max(p.numel() for p in lm.conditional_parameters()))
    engine, *_ = deepspeed.initialize(model=lm, model_parameters=[p for p in lm.parameters() if p.requires_grad], config=ds)
    trainer = LMTrainer(lm, engine, parts.train_data, parts.eval_data, cfg.train, task=cfg.task.name, device=device, bf16=bf16)
    feed = TableFeed(cfg.exchange, table, rank) if cfg.exchange.actor else None

    extra, history = {"resumed_from_step": None, "bf16": bf16, "worker_nodes": nodes}, []
    if (checkpoint := ray.train.get_checkpoint()) is not None:
        # the history travels in the checkpoint: a resumed run reports every step since the first, not since the resume
        history = _restore(engine, trainer, checkpoint, cfg, world, feed)
        extra.update(resumed_from_step=trainer.step, resumed_table_version=trainer.table_version)
        if cfg.debug.param_digest:
            extra["resume_digest"] = state_digest(_full_state(lm))
    per_round = cfg.rounds.steps
    sums, count, clock = torch.zeros(len(LOSSES), dtype=torch.float64), 0, time.perf_counter()
    behind, newest = 0, trainer.table_version  # staleness: versions behind the newest, at the polls of a window
    finished, stopped, round_clock = False, False, time.perf_counter()

    def poll() -> bool:
        """Swap in a newer snapshot (every rank, at the same step); False when the driver asks to stop."""
        nonlocal behind, newest
        gate = feed.poll(_broadcast)
        version = gate.newest
        if version is not None and (trainer.table_version is None or version > trainer.table_version):
            newest = version
            behind = max(behind, version - (trainer.table_version or 0))
            trainer.swap_table(feed.table(version))
        return not gate.stop

    def report(final: bool) -> None:
        nonlocal sums, count, clock, finished, behind, round_clock
        finished = final
        step, t = trainer.step, cfg.train
        rnd = step // per_round if per_round and step % per_round == 0 else None  # a round's end
        stats = torch.cat([sums, torch.tensor([count], dtype=torch.float64)]).to(device)
        dist.all_reduce(stats)  # sums over ranks: means of every rank's steps since the last report
        metrics = {"step": step, "epoch": step / trainer.per_epoch, "lr": trainer.lr(), **extra,
                   "kg_table_version": trainer.table_version, "kg_newest_version": newest, "kg_versions_behind": behind,
                   **{k: float(v) / max(float(stats[-1]), 1.0) for k, v in zip(LOSSES, stats[:-1])},
                   "rows_per_s": float(stats[-1]) * t.batch_size / max(time.perf_counter() - clock, 1e-9)}
        if rnd is not None:
            metrics.update(round=rnd, round_seconds=time.perf_counter() - round_clock)
        if final or rnd is not None or (t.eval_every and step % t.eval_every == 0):
            metrics.update(trainer.evaluate_both())
        if cfg.debug.param_digest:
            metrics["param_digest"] = state_digest(_full_state(lm))
        export = None
        if final or rnd is not None:
            export = cfg.export_path if rnd is None else round_export(cfg.export_path, rnd)
            metrics["export"] = export
            _export(lm, cfg, lm.table, rank, {"step": step, "metrics": {k: v for k, v in metrics.items() if k != "export"}}, export)
        if rank == 0 and float(stats[-1]) > 0:  # (Ray Train logs every report as it arrives; a report with no
            history.append(metrics)             # step since the last, after a resume from the last checkpoint, has no losses)
        if (final or rnd is not None or step % t.checkpoint_every == 0) and step != extra["resumed_from_step"]:  # not over the one read
            with tempfile.TemporaryDirectory() as d:
                engine.save_checkpoint(d, tag=TAG, client_state=trainer.state_dict())
                if rank == 0:
                    Path(d, META).write_text(json.dumps({"step": step, "world_size": world, "zero_stage": cfg.deepspeed.zero_stage,
                                                         "table_version": trainer.table_version, "history": history}))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=f"checkpoint_{step:09d}")
        else:
            ray.train.report(metrics)
        if rnd is not None and feed is not None:
            if rank == 0:  # the driver acts on a round once a restart cannot take it back
                ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
            feed.post(LMRound(round=rnd, step=step, export=export, metrics=metrics))
        sums, count, clock, behind = torch.zeros_like(sums), 0, time.perf_counter(), 0
        if rnd is not None:
            round_clock = time.perf_counter()

    if per_round and trainer.step and rank == 0:
        _repost_rounds(cfg, feed, trainer.step)
    finished = per_round is not None and trainer.done and trainer.step % per_round == 0  # resumed from the last round's end
    engine.train()
    while not trainer.done:
        if per_round and cfg.rounds.gated and trainer.step % per_round == 0:
            if not feed.wait_allowed(trainer.step // per_round + 1, _broadcast):
                stopped = True
                break
            clock = round_clock = time.perf_counter()  # waiting for the driver is not the LM's time
        if feed is not None and trainer.step % cfg.exchange.lm_poll_steps == 0 and not poll():
            stopped = True
            break
        sums += trainer.train_step()
        step, count = trainer.step, count + 1
        f = cfg.debug
        if step == f.fail_at_step and rank == f.fail_rank and not os.path.exists(f.marker):
            # the controller registers a reported checkpoint when it next polls the workers; a crash
            # within that window (ms here, one poll in a real run) resumes from the one before
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
            Path(f.marker).write_text(f"rank {rank} exited at step {step}\n")
            os._exit(1)  # a crash: no cleanup, no report
        t = cfg.train
        if (trainer.done or step % t.log_every == 0 or step % t.checkpoint_every == 0 or (t.eval_every and step % t.eval_every == 0)
                or (per_round and step % per_round == 0)):
            report(final=trainer.done)
    if not finished and not stopped:  # resumed from the final checkpoint: evaluate and export again
        report(final=True)
    return {"history": history, "export": cfg.export_path, "stopped": stopped, **extra} if rank == 0 else None


def run(cfg: LMJobConfig):
    """Validate, prepare the KG teacher (read or trained here, once), and train on Ray; ``ray.train.Result``
    (``return_value``: rank 0's report history and the export path). Ray must be initialised."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = validate(cfg)
    table = load_kg_table(cfg.kg, load_from_config(cfg.data), cfg.storage_options)
    path, fs = ray_storage(cfg.storage_path, cfg.storage_options)
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config={"cfg": cfg, "table": table},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {}),
                                                           **cfg.resources_per_worker}),
        run_config=RunConfig(name=cfg.name, storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)))
    return trainer.fit()
