"""Shard tables in shared memory (bikd.kge.shared): another process reads and updates the owner's rows in
place, with the same arithmetic as a push through the owner; the file can go while the memory stays."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from bikd.kge.models import ModelConfig, build_interaction
from bikd.kge.optim import SparseOptimConfig
from bikd.kge.shard import ShardState
from bikd.kge.shared import attach, can_share, share, unlink

MODEL = ModelConfig(name="transe", dim=4)


def shard(optim: SparseOptimConfig) -> ShardState:
    torch.manual_seed(0)
    return ShardState(torch.tensor([1, 4, 6, 9]), torch.randn(4, 4), optim, build_interaction(MODEL), "entity")


@pytest.mark.parametrize("optim", [SparseOptimConfig(name="rowwise_adagrad", lr=0.1),
                                   SparseOptimConfig(name="adam", lr=0.1, bias_correction="row")])
def test_attached_pushes_equal_owner_pushes_and_show_in_the_owner(optim, tmp_path):
    owner, reference = shard(optim), shard(optim)
    layout = share(owner, "test", root=str(tmp_path))
    assert layout is not None and torch.equal(owner.table, reference.table)  # the values moved over
    peer = attach(layout, owner.ids, optim, build_interaction(MODEL), "entity")
    ids, grads = torch.tensor([4, 9, 4]), torch.randn(3, 4)
    peer.push(ids, grads)
    reference.push(ids, grads)
    assert torch.equal(owner.table, reference.table)  # the peer's update is in the owner's rows, bit for bit
    owner.push(torch.tensor([1]), torch.ones(1, 4))
    reference.push(torch.tensor([1]), torch.ones(1, 4))
    assert torch.equal(peer.pull(torch.tensor([1, 4])), reference.pull(torch.tensor([1, 4])))
    mine, theirs = owner.state_dict()["optimizer"], reference.state_dict()["optimizer"]
    assert all(torch.equal(v, theirs[k]) for k, v in mine.items() if isinstance(v, torch.Tensor))  # optimiser state too
    unlink(layout)
    assert not os.path.exists(layout.path)  # the name is gone, the memory stays with its mappings
    peer.push(ids, grads)
    reference.push(ids, grads)
    assert torch.equal(owner.table, reference.table)
    unlink(layout)  # idempotent


CHILD = """
import json, sys, torch
from bikd.kge.models import ModelConfig, build_interaction
from bikd.kge.optim import SparseOptimConfig
from bikd.kge.shared import SharedLayout, attach
d = json.loads(sys.argv[1])
layout = SharedLayout(path=d["path"], tensors=tuple((n, tuple(s), t, o) for n, s, t, o in d["tensors"]), num_bytes=d["num_bytes"])
peer = attach(layout, torch.tensor([1, 4, 6, 9]), SparseOptimConfig(name="rowwise_adagrad", lr=0.1),
              build_interaction(ModelConfig(name="transe", dim=4)), "entity")
print(json.dumps(peer.pull(torch.tensor([6])).tolist()))
peer.push(torch.tensor([6]), torch.full((1, 4), 2.0))
"""


def test_another_process_reads_and_updates_the_rows(tmp_path):
    optim = SparseOptimConfig(name="rowwise_adagrad", lr=0.1)
    owner, reference = shard(optim), shard(optim)
    layout = share(owner, "test", root=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(asdict(layout))], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == reference.pull(torch.tensor([6])).tolist()  # it read the owner's row
    reference.push(torch.tensor([6]), torch.full((1, 4), 2.0))
    assert torch.equal(owner.table, reference.table)  # and its update landed in the owner's memory
    unlink(layout)


def test_a_full_file_system_leaves_the_shard_as_it_was(tmp_path, monkeypatch):
    """A container's small /dev/shm: no file is left behind and the caller falls back to messages."""
    owner, reference = shard(SparseOptimConfig()), shard(SparseOptimConfig())

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    assert share(owner, "test", root=str(tmp_path)) is None
    assert list(tmp_path.iterdir()) == []
    owner.push(torch.tensor([4]), torch.ones(1, 4))
    reference.push(torch.tensor([4]), torch.ones(1, 4))
    assert torch.equal(owner.table, reference.table)


def test_adam_with_global_bias_correction_is_not_shared():
    assert can_share(SparseOptimConfig(name="adam", bias_correction="row"))
    assert not can_share(SparseOptimConfig(name="adam", bias_correction="global"))  # a per-process step count
    assert can_share(SparseOptimConfig(name="rowwise_adagrad"))
