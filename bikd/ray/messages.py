"""Messages between the driver, trainers and embedding shards: small frozen dataclasses with a version.

Arrays travel as numpy, not torch: Ray hands numpy arrays through its object store without pickling their
contents (a 2 MB float32 table took 4.4 ms to ``ray.put`` as numpy and 13 ms as a torch tensor here).
``tensor`` turns a received array back into a torch tensor without a copy.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch


def array(x: torch.Tensor) -> np.ndarray:
    """A tensor as the numpy array a message carries (shares memory with a contiguous CPU tensor)."""
    return x.detach().contiguous().numpy()


def tensor(a: np.ndarray) -> torch.Tensor:
    """A received array as a tensor, without a copy. Arrays from Ray's object store are read-only; the
    receiving code only reads them (torch warns about that, once, for no reason here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


@dataclass(frozen=True, kw_only=True)
class PullRequest:
    version: int  # the requesting trainer's step, for tracing staleness
    ids: np.ndarray  # (n,) int64 global ids owned by the receiving shard


@dataclass(frozen=True, kw_only=True)
class Rows:
    version: int  # the shard's version (pushes applied) when the rows were read
    rows: np.ndarray  # (n, d) float32


@dataclass(frozen=True, kw_only=True)
class PushGrads:
    step: int  # the sending trainer's step
    source: int  # the sending trainer's partition
    ids: np.ndarray  # (n,) int64 global ids, owned by the receiving shard
    grads: np.ndarray  # (n, d) float32


def snapshot_prefix(version: int) -> str:
    """Where ``ShardedKGE.publish`` exports snapshot ``version`` under its storage."""
    return f"snapshots/v{version:06d}"


@dataclass(frozen=True, kw_only=True)
class Snapshot:
    version: int
    entity: torch.Tensor  # (num_entities, d_e)
    relation: torch.Tensor  # (num_relations, d_r)


class _Totals:
    """Running totals: subtract two for what happened in between."""

    def __sub__(self, other):
        return type(self)(**{k: getattr(self, k) - getattr(other, k) for k in self.__dataclass_fields__})


@dataclass(frozen=True, kw_only=True)
class Counters(_Totals):
    """A trainer's running totals (``KGETrainer.counters``)."""

    steps: int
    calls: int  # actor calls made for rows of other trainers, shards or nodes
    rows_pulled: int  # rows those calls pulled
    exchange_s: float = 0.0  # the trainer thread's time in the node exchange's methods (waits included)


@dataclass(frozen=True, kw_only=True)
class ServerCounters(_Totals):
    """A node server's running totals (``NodeServer.counters``): what serving the other nodes costs it."""

    calls: int  # pulls, pushes and exchanges (a push riding on a pull counts once)
    rows: int  # rows read and rows updated
    cpu_s: float  # its process's CPU time


@dataclass(frozen=True, kw_only=True)
class AddTriples:
    kg_version: int  # the KG store version the triples come from; increases with every addition
    triples: np.ndarray  # (n, 3) int64, checked by the driver; heads owned by the receiving trainer (n may be 0)
    weights: np.ndarray  # (n,) float32 per-triple loss weights (the miner's confidences)
    targets: np.ndarray | None  # (n, R) float32 LM relation distributions for the KD term, or None


@dataclass(frozen=True, kw_only=True)
class Peers:
    """Who holds which rows, sent to every trainer at the start and after each recovery."""

    version: int  # the connection's generation (the driver's recovery count)
    trainers: list  # every partition's trainer actor, in partition order
    layouts: tuple  # per partition (node id, SharedLayout or None): where its rows are in shared memory
    relation_layout: tuple  # the relation shard's (node id, SharedLayout or None)
    servers: dict | None = None  # node id -> that node's NodeServers, a tuple (rows of shared shards on other nodes)


@dataclass(frozen=True, kw_only=True)
class NodeShards:
    """What a node's server maps, sent at the start and after each recovery: that node's shards in shared memory."""

    version: int  # the connection's generation
    entity: tuple  # per partition on the node: (partition, (n,) int64 ids, SharedLayout)
    relation: object | None  # the relation shard's SharedLayout when it is on the node


#: bytes per piece of a node-server message's floats: Ray sends an argument or return value up to
#: ``max_direct_call_object_size`` (100 KiB by default) inside the call's RPC, larger ones through the object
#: store, which between 2 simulated nodes here took 7-9 ms for a 580-row pull against ~2 ms in pieces (a
#: microbenchmark when this was written; bench/kge_scaling.py times the whole step both ways: node servers
#: send pieces, ``cross_node_rows="trainer"`` one object)
PIECE_BYTES = 90_000
_PIECE_FLOATS = PIECE_BYTES // 4


def num_pieces(num_floats: int) -> int:
    """How many pieces :func:`pieces` cuts ``num_floats`` float32 values into (at least one)."""
    return max(1, -(-num_floats // _PIECE_FLOATS))


def pieces(*arrays: np.ndarray | None) -> list[np.ndarray]:
    """The arrays' float32 values, flattened and concatenated, cut into pieces Ray sends inline."""
    flat = np.concatenate([a.reshape(-1) for a in arrays if a is not None] or [np.empty(0, np.float32)])
    return [flat[i:i + _PIECE_FLOATS] for i in range(0, max(len(flat), 1), _PIECE_FLOATS)]


def unpiece(chunks, *shapes: tuple[int, int]) -> list[torch.Tensor]:
    """The tensors of the given (rows, width) shapes back from :func:`pieces`' output."""
    flat = tensor(np.concatenate(chunks)) if len(chunks) > 1 else tensor(chunks[0])
    sizes = [r * w for r, w in shapes]
    assert sum(sizes) == len(flat), (sizes, len(flat))
    return [part.view(shape) for part, shape in zip(flat.split(sizes), shapes)]


@dataclass(frozen=True, kw_only=True)
class NodePull:
    """One trainer step's rows from one other node, in one call: several partitions' and maybe the relations'.
    The server answers with the rows (entity rows, then relation rows, as float32) in ``num_pieces`` pieces."""

    version: int  # the requesting trainer's step
    parts: tuple[int, ...]  # the entity partitions asked, in order
    sizes: tuple[int, ...]  # ids asked of each
    ids: np.ndarray  # (sum(sizes),) int64 global entity ids, partition after partition
    relation_ids: np.ndarray | None  # (m,) int64, when the relation shard is on that node
    num_pieces: int  # pieces of the answer (the caller knows the rows' widths)


@dataclass(frozen=True, kw_only=True)
class NodePush:
    """The gradients of a :class:`NodePull`'s rows, after the step; the gradients themselves (entity rows', then
    relation rows', as :func:`pieces`) travel as the call's further arguments, so that each goes inline."""

    step: int
    source: int  # the sending trainer's partition
    parts: tuple[int, ...]
    sizes: tuple[int, ...]
    ids: np.ndarray  # (sum(sizes),) int64
    relation_ids: np.ndarray | None
