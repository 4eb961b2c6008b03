"""Shard tables in shared memory, so trainers on one machine read and update each other's rows in place
(DGL-KE keeps all of a machine's embeddings in shared memory the same way; only other machines' rows go
through messages).

The owner of a :class:`~bikd.kge.shard.ShardState` moves its table and optimiser state into one file under
``/dev/shm`` (:func:`share`) and hands the file's :class:`SharedLayout` to the other processes of its node,
which map it (:func:`attach`) and then pull and push that shard's rows with plain tensor ops, no message,
no copy of the table. Once every peer has mapped it the owner unlinks the file (:func:`unlink`): the memory
lives as long as some process maps it and goes away with the last one, so a killed run leaves nothing in
``/dev/shm``.

Updates from several processes to one row are not locked against each other (Hogwild, as DGL-KE and
PyTorch-BigGraph do within a machine); a caller that needs an order (sync mode) applies them one process at
a time, and then every update is the same arithmetic as a push through the owner. Pure torch and numpy.
"""

from __future__ import annotations

import errno
import os
import tempfile
import uuid
from dataclasses import dataclass

import numpy as np
import torch

from bikd.kge.interactions import Interaction
from bikd.kge.optim import SparseOptimConfig
from bikd.kge.shard import ShardState

__all__ = ["SharedLayout", "attach", "can_share", "share", "shm_root", "unlink"]

_ALIGN = 64  # bytes: every tensor starts on a cache line


def shm_root() -> str:
    """Where shared tables live: the RAM-backed ``/dev/shm`` on Linux, else the temp folder (page cache)."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


@dataclass(frozen=True)
class SharedLayout:
    """Where one shard's tensors are: ``path`` and per tensor (name, shape, dtype name, byte offset)."""

    path: str
    tensors: tuple[tuple[str, tuple[int, ...], str, int], ...]
    num_bytes: int


def can_share(optim: SparseOptimConfig) -> bool:
    """Whether a shard with this optimiser can be updated from several processes: all its state must be per
    row (Adam with global bias correction counts steps in a per-process scalar)."""
    return not (optim.name == "adam" and optim.bias_correction == "global")


def _state(shard: ShardState) -> dict[str, torch.Tensor]:
    return {"table": shard.table, **{name: getattr(shard.optimizer, name) for name in shard.optimizer._state_names}}


def _bind(shard: ShardState, name: str, tensor: torch.Tensor) -> None:
    if name == "table":
        shard.table = tensor
    else:
        setattr(shard.optimizer, name, tensor)


def _views(layout: SharedLayout, mode: str) -> dict[str, torch.Tensor]:
    buffer = np.memmap(layout.path, dtype=np.uint8, mode=mode, shape=(layout.num_bytes,))
    views = {}
    for name, shape, dtype, offset in layout.tensors:
        np_dtype = torch.empty(0, dtype=getattr(torch, dtype)).numpy().dtype
        count = int(np.prod(shape, dtype=np.int64))
        # the tensor keeps the memmap (and so the mapping) alive; the file may be unlinked meanwhile
        views[name] = torch.from_numpy(buffer[offset:offset + count * np_dtype.itemsize].view(np_dtype).reshape(shape))
    return views


def share(shard: ShardState, name: str, root: str | None = None) -> SharedLayout | None:
    """Move ``shard``'s table and optimiser state into a new file ``<root>/bikd-<name>-<random>`` (values
    kept; ``shard`` then works on the shared memory). None, with ``shard`` unchanged, when the file system
    has no room for it (a container's small ``/dev/shm``): the caller keeps using messages."""
    tensors, entries, offset = _state(shard), [], 0
    for key, t in tensors.items():
        entries.append((key, tuple(t.shape), str(t.dtype).removeprefix("torch."), offset))
        offset += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    path = os.path.join(root or shm_root(), f"bikd-{name}-{uuid.uuid4().hex[:12]}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        # reserve every page now: a full tmpfs then fails here, not as a SIGBUS on some later write
        os.posix_fallocate(fd, 0, max(offset, 1))
    except OSError as error:
        os.close(fd)
        os.unlink(path)
        if error.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
            return None
        raise
    os.close(fd)
    layout = SharedLayout(path=path, tensors=tuple(entries), num_bytes=max(offset, 1))
    for key, view in _views(layout, "r+").items():
        view.copy_(tensors[key])
        _bind(shard, key, view)
    return layout


def attach(layout: SharedLayout, ids: torch.Tensor, optim: SparseOptimConfig, interaction: Interaction,
           kind: str) -> ShardState:
    """A :class:`ShardState` over another process's shared shard (``ids`` its global ids, sorted): its
    ``pull``/``push`` read and update the owner's rows in place. The file must still exist."""
    views = _views(layout, "r+")
    shard = ShardState(ids, views["table"], optim, interaction, kind, copy=False)
    for key, view in views.items():
        _bind(shard, key, view)
    return shard


def unlink(layout: SharedLayout | None) -> None:
    """Remove the file's name (the mapped memory stays until its last process ends); idempotent."""
    if layout is not None:
        try:
            os.unlink(layout.path)
        except FileNotFoundError:
            pass
