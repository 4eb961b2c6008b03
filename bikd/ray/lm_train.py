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
import itertools
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
from bikd.lm.train import (KGTableConfig, TaskConfig, build_linker, build_lm, build_task_data,
                           default_squad_path, encoder_num_layers, evaluate_task, export_fused, load_kg_table,
                           state_digest)
from bikd.storage import Storage, join_url, url_exists

__all__ = ["DeepSpeedConfig", "TrainConfig", "FaultConfig", "LMJobConfig", "lm_config", "deepspeed_config",
           "set_malloc_mmap_threshold",
           "ray_storage", "validate", "train_loop_per_worker", "run"]

LOSSES = ("loss", "task_loss", "kd_entity_loss", "kd_relation_loss")
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
class TrainConfig:
    """``batch_size`` per worker; ``steps`` (optimizer steps) or, when null, ``epochs`` over the train rows.
    AdamW with linear warmup over ``warmup_steps`` then linear decay to 0. ``eval_every``/``checkpoint_every``/
    ``log_every`` in steps (eval and checkpoint also after the last step; null eval_every: only then)."""

    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_steps: int = 0
    batch_size: int = 16
    eval_batch_size: int = 64
    steps: int | None = None
    epochs: int = 1
    eval_every: int | None = None
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0

    def __post_init__(self):
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(f"train.lr must be > 0 and train.weight_decay >= 0, got {self.lr}, {self.weight_decay}")
        for key in ("batch_size", "eval_batch_size", "epochs", "checkpoint_every", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("steps", "eval_every"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"train.{key} must be >= 1 or null, got {getattr(self, key)}")
        if self.warmup_steps < 0:
            raise ValueError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")


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
    #: checkpoints go to <storage_path>/<name>/; a new run with the same name resumes from the latest one
    storage_path: str = "runs"
    name: str = "lm_train"
    #: fsspec options for storage_path and export_path (e.g. {endpoint_url: ...} for S3); default: AWS env vars
    storage_options: dict[str, Any] = field(default_factory=dict)
    #: where the fused model is exported (null: <storage_path>/<name>/export)
    export_path: str | None = None
    max_failures: int = 1
    keep_checkpoints: int = 2
    debug: FaultConfig = field(default_factory=FaultConfig)

    def __post_init__(self):
        if self.num_workers < 1 or not self.cpus_per_worker > 0:
            raise ValueError(f"num_workers must be >= 1 and cpus_per_worker > 0, got {self.num_workers}, {self.cpus_per_worker}")
        if not self.name or "/" in self.name or not self.storage_path:
            raise ValueError(f"name must be a non-empty folder name without '/' and storage_path non-empty, got {self.name!r}")
        if self.max_failures < -1 or self.keep_checkpoints < 1:
            raise ValueError(f"max_failures must be >= -1 and keep_checkpoints >= 1, got {self.max_failures}, {self.keep_checkpoints}")
        if self.debug.fail_at_step is not None and not 0 <= self.debug.fail_rank < self.num_workers:
            raise ValueError(f"debug.fail_rank {self.debug.fail_rank} is not a rank of {self.num_workers} workers")


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
    if ray.is_initialized():
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


def _export(lm, cfg: LMJobConfig, table, rank: int, extra: dict) -> None:
    state = _full_state(lm)
    if rank == 0:
        fresh, tokenizer = build_lm(lm_config(cfg), table)
        missing, unexpected = fresh.load_state_dict(state, strict=False)
        assert not unexpected and set(missing) <= {n for n, _ in fresh.named_buffers()}, (missing, unexpected)
        export_fused(fresh, tokenizer, Storage(cfg.export_path, cfg.storage_options), extra=extra)


def _restore(engine, checkpoint, cfg: LMJobConfig, world: int) -> tuple[int, list[dict]]:
    """Loads the engine's state; returns the checkpoint's step and the report history up to it."""
    with checkpoint.as_directory() as d:
        meta = json.loads(Path(d, META).read_text())
        if (meta["world_size"], meta["zero_stage"]) != (world, cfg.deepspeed.zero_stage):
            raise ValueError(f"checkpoint {checkpoint.path} was written by {meta['world_size']} workers with ZeRO-"
                             f"{meta['zero_stage']}; this run has {world} with ZeRO-{cfg.deepspeed.zero_stage}")
        _, client = engine.load_checkpoint(d, tag=TAG)
    return int(client["step"]), list(meta.get("history", []))


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
    """One rank: build data and model, resume, train, report, export. Returns (rank 0) the history of reports."""
    import deepspeed

    cfg: LMJobConfig = config["cfg"]
    table = config["table"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    if device.type == "cpu":
        set_malloc_mmap_threshold(cfg.deepspeed.malloc_mmap_threshold)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank (ZeRO-3 partitions each rank's copy)
    lm, tokenizer = build_lm(lm_config(cfg), table)
    kg = load_from_config(cfg.data)
    text = text_from_config(cfg.data)
    linker = build_linker(kg, text) if cfg.task.link else None
    train_data, eval_data = build_task_data(cfg.task, tokenizer, kg, linker, text=text, rank=rank, world_size=world)
    per_epoch = train_data.num_batches(cfg.train.batch_size)
    total = cfg.train.steps or cfg.train.epochs * per_epoch
    bf16 = cfg.deepspeed.bf16 is True or (cfg.deepspeed.bf16 == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    ds = deepspeed_config(cfg, total_steps=total, bf16=bf16, persist_numel=max(p.numel() for p in lm.conditional_parameters()))
    engine, *_ = deepspeed.initialize(model=lm, model_parameters=[p for p in lm.parameters() if p.requires_grad], config=ds)
    amp = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731 (the KG table stays fp32)

    step, extra, history = 0, {"resumed_from_step": None, "bf16": bf16}, []
    if (checkpoint := ray.train.get_checkpoint()) is not None:
        # the history travels in the checkpoint: a resumed run reports every step since the first, not since the resume
        step, history = _restore(engine, checkpoint, cfg, world)
        extra["resumed_from_step"] = step
        if cfg.debug.param_digest:
            extra["resume_digest"] = state_digest(_full_state(lm))
    sums, count, clock = torch.zeros(len(LOSSES), dtype=torch.float64), 0, time.perf_counter()
    finished = False

    def report(final: bool) -> None:
        nonlocal sums, count, clock, finished
        finished = final
        t = cfg.train
        stats = torch.cat([sums, torch.tensor([count], dtype=torch.float64)]).to(device)
        dist.all_reduce(stats)  # sums over ranks: means of every rank's steps since the last report
        metrics = {"step": step, "epoch": step / per_epoch, "lr": engine.get_lr()[0], **extra,
                   **{k: float(v) / max(float(stats[-1]), 1.0) for k, v in zip(LOSSES, stats[:-1])},
                   "rows_per_s": float(stats[-1]) * t.batch_size / max(time.perf_counter() - clock, 1e-9)}
        if final or (t.eval_every and step % t.eval_every == 0):
            with amp():
                scores = evaluate_task(engine, eval_data, cfg.task.name, t.eval_batch_size, device)
            metrics.update({f"eval_{k}": v for k, v in scores.items()})
        if cfg.debug.param_digest:
            metrics["param_digest"] = state_digest(_full_state(lm))
        if final:
            metrics["export"] = cfg.export_path
            _export(lm, cfg, table, rank, {"step": step, "metrics": {k: v for k, v in metrics.items() if k != "export"}})
        if rank == 0 and float(stats[-1]) > 0:  # (Ray Train logs every report as it arrives; a report with no
            history.append(metrics)             # step since the last, after a resume from the last checkpoint, has no losses)
        if (final or step % t.checkpoint_every == 0) and step != extra["resumed_from_step"]:  # not over the one read
            with tempfile.TemporaryDirectory() as d:
                engine.save_checkpoint(d, tag=TAG, client_state={"step": step})
                if rank == 0:
                    Path(d, META).write_text(json.dumps({"step": step, "world_size": world, "zero_stage": cfg.deepspeed.zero_stage,
                                                         "history": history}))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=f"checkpoint_{step:09d}")
        else:
            ray.train.report(metrics)
        sums, count, clock = torch.zeros_like(sums), 0, time.perf_counter()

    engine.train()
    while step < total:
        epoch, skip = divmod(step, per_epoch)
        for _, batch in itertools.islice(train_data.batches(cfg.train.batch_size, epoch=epoch, seed=cfg.train.seed), skip, None):
            # RNG streams as a function of (seed, rank, step): a resumed run draws what the first would have
            torch.manual_seed(hash((cfg.train.seed, rank, step)) % (1 << 62))
            lm.generator.manual_seed(hash((cfg.kd.seed, rank, step)) % (1 << 62))
            with amp():
                out = engine({k: v.to(device) for k, v in batch.items()})
            engine.backward(out["loss"])
            engine.step()
            step, count = step + 1, count + 1
            sums += torch.stack([out[k].detach().double().cpu() for k in LOSSES])
            f = cfg.debug
            if step == f.fail_at_step and rank == f.fail_rank and not os.path.exists(f.marker):
                # the controller registers a reported checkpoint when it next polls the workers; a crash
                # within that window (ms here, one poll in a real run) resumes from the one before
                ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
                Path(f.marker).write_text(f"rank {rank} exited at step {step}\n")
                os._exit(1)  # a crash: no cleanup, no report
            t = cfg.train
            if step == total or step % t.log_every == 0 or step % t.checkpoint_every == 0 or (t.eval_every and step % t.eval_every == 0):
                report(final=step == total)
            if step == total:
                break
    if not finished:  # resumed from the final checkpoint: evaluate and export again
        report(final=True)
    return {"history": history, "export": cfg.export_path, **extra} if rank == 0 else None


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
                                     resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}),
        run_config=RunConfig(name=cfg.name, storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)))
    return trainer.fit()
