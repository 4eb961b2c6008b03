"""One rank's fused-LM training as plain torch: build, step, evaluate (with the KG table and without it),
swap the table, export, state. The Ray Train worker (bikd.ray.lm_train) wraps the model in a DeepSpeed engine
and calls this; benchmarks, tests and sweeps use :class:`TorchEngine` in one process.

An *engine* is anything with DeepSpeed's training surface: ``engine(batch) -> outputs``, ``backward(loss)``,
``step()`` (optimizer + LR schedule + zero grads), ``get_lr()``, ``train()``/``eval()``. DeepSpeed's engine is
one; :class:`TorchEngine` is the single-process one (AdamW, the same warmup/decay schedule, clipping).

Reproducibility: the batch of step ``s`` is a function of (seed, epoch, s) and the dropout / KD sampling
streams are reseeded from (seed, rank, s) before it, so a run resumed at step s draws what an uninterrupted
one would have.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from bikd.kg.text import KGText
from bikd.kg.triples import KGSplits
from bikd.lm.kg_teacher import KGTable
from bikd.lm.model import FusedLM, LMConfig
from bikd.lm.train import TaskConfig, TaskData, build_linker, build_lm, build_task_data, evaluate_task

__all__ = ["LOSSES", "NO_KG", "TrainConfig", "TorchEngine", "LMTrainer", "LMParts", "build_parts", "lr_at"]

#: the loss terms every step reports, in this order
LOSSES = ("loss", "task_loss", "kd_entity_loss", "kd_relation_loss")
#: a batch's keys that carry the KG (entity ids per token, mention spans)
NO_KG = ("token_entity", "mention_spans")


@dataclass(kw_only=True, frozen=True)
class TrainConfig:
    """``batch_size`` per worker; ``steps`` (optimizer steps) or, when null, ``epochs`` over the train rows.
    AdamW with linear warmup over ``warmup_steps`` then linear decay to 0. ``eval_every``/``checkpoint_every``/
    ``log_every`` in steps (eval and checkpoint also after the last step; null eval_every: only then).
    ``schedule_steps``: the LR schedule's length when a run is continued in parts (the bidirectional driver
    trains ``steps`` = r x steps-per-round in round r, on one schedule); null: the run's own length."""

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
    schedule_steps: int | None = None

    def __post_init__(self):
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(f"train.lr must be > 0 and train.weight_decay >= 0, got {self.lr}, {self.weight_decay}")
        for key in ("batch_size", "eval_batch_size", "epochs", "checkpoint_every", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("steps", "eval_every", "schedule_steps"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"train.{key} must be >= 1 or null, got {getattr(self, key)}")
        if self.warmup_steps < 0:
            raise ValueError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """DeepSpeed's ``WarmupDecayLR`` (linear warmup from 0, linear decay to 0 at ``total_steps``) at ``step``."""
    warmup, total = max(1, cfg.warmup_steps), max(total_steps, 2)
    if step < warmup:
        return cfg.lr * step / warmup
    return cfg.lr * max(0.0, (total - step) / max(1.0, total - warmup))


class TorchEngine(nn.Module):
    """The single-process engine: AdamW over ``params`` (default: every trainable parameter), the schedule of
    :func:`lr_at`, global-norm clipping (``clip`` 0: off)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, total_steps: int, *, clip: float = 1.0,
                 params: list[nn.Parameter] | None = None):
        super().__init__()
        self.module, self.cfg, self.total_steps, self.clip = model, cfg, total_steps, clip
        params = [p for p in model.parameters() if p.requires_grad] if params is None else params
        self.optimizer = torch.optim.AdamW(params, lr=lr_at(0, cfg, total_steps), weight_decay=cfg.weight_decay)
        self.num_steps = 0

    def forward(self, batch):
        return self.module(batch)

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.num_steps += 1
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.num_steps, self.cfg, self.total_steps)

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self, *args, **kwargs) -> dict:  # noqa: ARG002 - the engine's state, not the module's
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(), "num_steps": self.num_steps}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:  # noqa: ARG002
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.num_steps = int(state["num_steps"])


@dataclass(frozen=True)
class LMParts:
    model: FusedLM
    tokenizer: Any
    train_data: TaskData
    eval_data: TaskData


def build_parts(lm_cfg: LMConfig, task: TaskConfig, kg: KGSplits, text: KGText | None, table: KGTable | None, *,
                seed: int, rank: int = 0, world_size: int = 1) -> LMParts:
    """Model (initial weights from ``seed``: identical on every rank) and this rank's view of the task data."""
    torch.manual_seed(seed)
    model, tokenizer = build_lm(lm_cfg, table)
    linker = build_linker(kg, text) if task.link else None
    train_data, eval_data = build_task_data(task, tokenizer, kg, linker, text=text, rank=rank, world_size=world_size)
    return LMParts(model, tokenizer, train_data, eval_data)


class LMTrainer:
    """The step loop of one rank. ``step`` counts optimizer steps done; :meth:`train_step` runs the next one.

    ``kg=False`` trains the plain LM (batches go in without their entity links). The KG table can change
    between steps (:meth:`swap_table`, every rank at the same step); ``state_dict``
    holds the step and the table version in use, and :meth:`load_state_dict` brings that same version back
    through ``table_for_version`` (a resumed run fuses what the interrupted one fused)."""

    def __init__(self, model: FusedLM, engine, train_data: TaskData, eval_data: TaskData, cfg: TrainConfig, *,
                 task: str, device: torch.device | str = "cpu", bf16: bool = False, kg: bool = True):
        self.model, self.engine, self.cfg, self.task, self.kg = model, engine, cfg, task, kg
        self.train_data, self.eval_data = train_data, eval_data
        self.device, self.bf16 = torch.device(device), bf16
        self.rank = train_data.rank
        self.per_epoch = train_data.num_batches(cfg.batch_size)
        self.total = cfg.steps or cfg.epochs * self.per_epoch
        self.step = 0
        self._batches: Iterator | None = None
        self._batches_at = -1  # the step the iterator's next batch belongs to

    @property
    def done(self) -> bool:
        return self.step >= self.total

    @property
    def table_version(self) -> int | None:
        return self.model.table_version

    def amp(self):
        """bf16 autocast when on (the KG table stays fp32)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def _next_batch(self) -> dict:
        if self._batches is None or self._batches_at != self.step:
            epoch, skip = divmod(self.step, self.per_epoch)
            self._batches = itertools.islice(self.train_data.batches(self.cfg.batch_size, epoch=epoch, seed=self.cfg.seed),
                                             skip, None)
        try:
            _, batch = next(self._batches)
        except StopIteration:  # an epoch ended: the next one's order
            self._batches = None
            self._batches_at = -1
            return self._next_batch()
        self._batches_at = self.step + 1
        return batch

    def train_step(self) -> Tensor:
        """One optimizer step; returns the float64 losses ``(len(LOSSES),)`` of this rank's batch."""
        assert not self.done, (self.step, self.total)
        batch = self._next_batch()
        torch.manual_seed(hash((self.cfg.seed, self.rank, self.step)) % (1 << 62))
        self.model.generator.manual_seed(hash((self.model.cfg.kd.seed, self.rank, self.step)) % (1 << 62))
        if not self.kg:  # the plain LM: no entity links, so no fusion and no KD term
            batch = {k: v for k, v in batch.items() if k not in NO_KG}
        with self.amp():
            out = self.engine({k: v.to(self.device) for k, v in batch.items()})
        self.engine.backward(out["loss"])
        self.engine.step()
        self.step += 1
        return torch.stack([out[k].detach().double().cpu() for k in LOSSES])

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def evaluate(self, *, kg: bool = True) -> dict[str, float]:
        """Task metrics over the whole eval set (a collective under data parallelism); ``kg=False`` withholds
        the table (fusion off): what the LM's own weights know."""
        with self.amp():
            return evaluate_task(self.engine, self.eval_data, self.task, self.cfg.eval_batch_size, self.device, kg=kg)

    def evaluate_both(self) -> dict[str, float]:
        """``eval_<metric>`` with the table and ``eval_nokg_<metric>`` without (the second only when a table is set)."""
        out = {f"eval_{k}": v for k, v in self.evaluate(kg=True).items()}
        if self.model.table is not None:
            out.update({f"eval_nokg_{k}": v for k, v in self.evaluate(kg=False).items() if k != "num_examples"})
        return out

    def swap_table(self, table: KGTable) -> bool:
        """Fuse ``table`` from the next step on; False (nothing done) when its version is already in use."""
        if self.model.table is not None and table.version == self.model.table_version:
            return False
        self.model.set_kg_table(table)
        return True

    def state_dict(self) -> dict[str, int | None]:
        """The loop's state (the engine checkpoints the weights and optimizer itself)."""
        return {"step": self.step, "table_version": self.table_version}

    def load_state_dict(self, state: dict, table_for_version: Callable[[int], KGTable] | None = None) -> None:
        self.step = int(state["step"])
        self._batches = None
        version = state.get("table_version")
        if version is not None and version != self.table_version:
            if table_for_version is None:
                raise ValueError(f"the checkpoint fused KG table version {version}, this run starts from version "
                                 f"{self.table_version} and has no way to read another")
            table = table_for_version(int(version))
            if table.version != version:
                raise ValueError(f"asked for KG table version {version}, got version {table.version}")
            self.model.set_kg_table(table)
