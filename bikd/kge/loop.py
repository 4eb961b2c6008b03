"""The epoch loop of the KG-embedding jobs: train, log, validate, checkpoint, stop cleanly, resume.

It drives any :class:`EpochTrainer` (the in-process :class:`LocalEpochs` here; ``bikd.ray.sharded.ShardedEpochs``
on Ray) and records where it is in the run directory (:class:`bikd.runs.RunDir`): a checkpoint every
``checkpoint_every`` epochs and at a stop request, then ``progress.json`` naming it, the epochs done and the
history. Run again with the same directory, the loop restores that checkpoint and continues.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from bikd.kge.models import KGEModel
from bikd.kge.training import LocalTrainer
from bikd.runs import RunDir
from bikd.storage import Storage

__all__ = ["EpochTrainer", "LocalEpochs", "LoopConfig", "LoopResult", "train_epochs", "write_state", "read_state"]


def write_state(storage: Storage, rel: str, state: dict) -> None:
    """One torch state file, written atomically (a reader never sees part of it)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    storage.write_bytes(rel, buffer.getvalue())


def read_state(storage: Storage, rel: str) -> dict:
    return torch.load(io.BytesIO(storage.read_bytes(rel)), weights_only=True)


class EpochTrainer(Protocol):
    #: what a stop request waits for, for the message ("the current step", "the current epoch")
    unit: str

    def train_epoch(self, stop: Callable[[], bool]) -> dict:
        """The rest of the current epoch (``loss``, ``triples_per_s``); may end early when ``stop()``."""

    @property
    def mid_epoch(self) -> bool:
        """True after an epoch ended early."""

    def model(self) -> KGEModel: ...

    def checkpoint(self, storage: Storage, epochs_done: int) -> str:
        """Writes a complete checkpoint under ``storage`` and returns its name."""

    def restore(self, storage: Storage, name: str) -> None: ...

    def delete(self, storage: Storage, name: str) -> None: ...


class LocalEpochs:
    """:class:`LocalTrainer` as an EpochTrainer: stops between steps, checkpoints mid-epoch (the batch
    iterator's position is part of its state)."""

    unit = "the current step"

    def __init__(self, trainer: LocalTrainer):
        self.trainer = trainer

    def train_epoch(self, stop: Callable[[], bool]) -> dict:
        start, offset = time.perf_counter(), self.trainer.batches.offset
        loss = self.trainer.train_epoch(stop)
        done = (self.trainer.batches.offset or self.trainer.batches.num_triples) - offset
        return {"loss": loss, "triples_per_s": done / max(time.perf_counter() - start, 1e-9)}

    @property
    def mid_epoch(self) -> bool:
        return self.trainer.mid_epoch

    def model(self) -> KGEModel:
        return self.trainer.model

    def checkpoint(self, storage: Storage, epochs_done: int) -> str:
        name = f"local-{epochs_done:06d}-{self.trainer.batches.offset:09d}.pt"
        write_state(storage, name, self.trainer.state_dict())
        return name

    def restore(self, storage: Storage, name: str) -> None:
        self.trainer.load_state_dict(read_state(storage, name))

    def delete(self, storage: Storage, name: str) -> None:
        storage.delete(name)


@dataclass(kw_only=True, frozen=True)
class LoopConfig:
    epochs: int
    eval_every: int
    checkpoint_every: int = 1
    #: checkpoints kept (the newest); older ones are deleted once a newer one is recorded
    keep_checkpoints: int = 2


@dataclass
class LoopResult:
    history: list[dict]
    #: the signal that stopped the run early (None: it ran to the end)
    stopped_by: int | None
    resumed_from: int | None


def train_epochs(trainer: EpochTrainer, run: RunDir, cfg: LoopConfig, validate: Callable[[KGEModel], float],
                 stop: Callable[[], int | None], log: Callable[[str], None] = print) -> LoopResult:
    """Trains until ``cfg.epochs`` epochs are done or ``stop()`` returns a signal number; resumes from the
    run directory's progress. ``validate(model)`` gives the validation MRR every ``eval_every`` epochs."""
    checkpoints = run.storage.child("checkpoints")
    progress = run.progress()
    history, done, resumed_from, names = [], 0, None, []
    if progress is not None:
        trainer.restore(checkpoints, progress["checkpoint"])
        history, done, names = list(progress["history"]), int(progress["epochs_done"]), list(progress["checkpoints"])
        resumed_from = done
        where = " (mid-epoch)" if progress.get("mid_epoch") else ""
        log(f"resumed from {checkpoints.url_of(progress['checkpoint'])}: {done} epochs done{where}")

    def save(mid_epoch: bool) -> str:
        name = trainer.checkpoint(checkpoints, done)
        names.append(name)
        run.save_progress({"checkpoint": name, "epochs_done": done, "mid_epoch": mid_epoch, "history": history,
                           "checkpoints": names[-cfg.keep_checkpoints:], "finished": False})
        for old in names[:-cfg.keep_checkpoints]:
            trainer.delete(checkpoints, old)
        del names[:-cfg.keep_checkpoints]
        return name

    while done < cfg.epochs:
        stats = trainer.train_epoch(lambda: stop() is not None)
        if trainer.mid_epoch:  # stopped between steps: keep the partial epoch, it resumes where it ended
            name = save(mid_epoch=True)
            log(f"stopped in epoch {done + 1}; checkpoint {checkpoints.url_of(name)}")
            return LoopResult(history, stop(), resumed_from)
        done += 1
        row = {"epoch": done, "loss": stats["loss"], "triples_per_s": stats["triples_per_s"]}
        line = f"epoch {done:3d}  loss {row['loss']:.4f}  {row['triples_per_s']:,.0f} triples/s"
        if done % cfg.eval_every == 0 or done == cfg.epochs:
            row["valid_mrr"] = validate(trainer.model())
            line += f"  valid MRR {row['valid_mrr']:.4f}"
        history.append(row)
        log(line)
        if done % cfg.checkpoint_every == 0 or done == cfg.epochs or stop() is not None:
            name = save(mid_epoch=False)
            if stop() is not None and done < cfg.epochs:
                log(f"stopped after epoch {done}; checkpoint {checkpoints.url_of(name)}")
                return LoopResult(history, stop(), resumed_from)
    return LoopResult(history, None, resumed_from)
