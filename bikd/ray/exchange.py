"""The KG -> LM exchange point: a named Ray actor holding the newest KG snapshots, and the LM ranks' side of
it. (LM -> KG goes through the KG store, which the driver commits to and the KGE side reads.)

    KGE side --offer_table(TableOffer)--> Exchange <--poll()-- LM rank 0 (every lm_poll_steps)
                                                   --table(version)--> every LM rank, then set_kg_table

A driver running the LM as one long fit cut into rounds (``bikd.ray.lm_train.RoundsConfig``) meets it here too:

    driver --allow_lm_round(k) / stop_lm()--> Exchange <--poll(): LMGate-- LM rank 0 (at polls and round ends)
    driver <--lm_round(k)-- Exchange <--post_lm_round(LMRound)-- LM rank 0, once round k's export and checkpoint are in

The actor holds references only (a snapshot lives in the object store, put by whoever published it); it
keeps the newest ``keep_tables``. A version it no longer holds (or one from before a driver restart, whose
objects died with it) is read from the snapshot exports under ``ExchangeConfig.snapshots``
(``snapshots/vNNNNNN/``, written by ``ShardedKGE.publish``), so a resumed LM worker always gets back the
table its checkpoint fused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import ray

from bikd.lm.kg_teacher import KGTable
from bikd.ray.messages import snapshot_prefix
from bikd.storage import Storage

__all__ = ["ExchangeConfig", "TableOffer", "LMGate", "LMRound", "Exchange", "TableFeed", "exchange_actor", "snapshot_prefix"]


@dataclass(kw_only=True, frozen=True)
class ExchangeConfig:
    """How the two sides meet. ``actor``: the named exchange actor (null: the LM's KG table stays fixed);
    ``snapshots``: URL under which snapshots are exported (a version the actor no longer holds is read there).
    ``lm_poll_steps``: LM steps between polls for a newer snapshot (a poll is one small actor call on rank 0
    and one broadcast: ~1 ms); ``kge_publish_epochs``: KGE epochs between published snapshots inside a KGE
    round (null: once, at the end of each round; the LM side exports once per round of its own, what the
    round's mining reads); ``keep_tables``: snapshots the actor keeps referenced."""

    actor: str | None = None
    namespace: str | None = None
    snapshots: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    lm_poll_steps: int = 20
    kge_publish_epochs: int | None = None
    keep_tables: int = 3

    def __post_init__(self):
        for key in ("lm_poll_steps", "keep_tables"):
            if getattr(self, key) < 1:
                raise ValueError(f"exchange.{key} must be >= 1, got {getattr(self, key)}")
        if self.kge_publish_epochs is not None and self.kge_publish_epochs < 1:
            raise ValueError(f"exchange.kge_publish_epochs must be >= 1 or null, got {self.kge_publish_epochs}")


@dataclass(frozen=True, kw_only=True)
class TableOffer:
    """A published KG snapshot. ``refs``: one ObjectRef of a ``bikd.ray.messages.Snapshot``, in a tuple so that
    Ray hands the reference (not the value) to the actor."""

    version: int
    refs: tuple
    epoch: int = 0


@dataclass(frozen=True, kw_only=True)
class LMGate:
    """What LM rank 0 learns at a poll: the newest snapshot version (None before the first), the last LM round
    the driver has allowed to start (gated rounds), and whether the driver asks the LM to stop."""

    newest: int | None
    allowed: int
    stop: bool


@dataclass(frozen=True, kw_only=True)
class LMRound:
    """LM round ``round`` is done: its export (complete) and checkpoint (committed) are in. ``metrics``: the
    round-end report (task metric with and without the table, losses, table version, throughput)."""

    round: int
    step: int
    export: str
    metrics: dict


@ray.remote(num_cpus=0)
class Exchange:
    def __init__(self, keep_tables: int = 3):
        self.keep = keep_tables
        self.tables: dict[int, TableOffer] = {}
        self.num_polls = 0
        self.last_polled: int | None = None
        self.lm_allowed, self.lm_stop = 0, False
        self.lm_rounds: dict[int, LMRound] = {}

    def offer_table(self, offer: TableOffer) -> int:
        newest = max(self.tables, default=0)
        if offer.version <= newest:
            raise ValueError(f"snapshot versions must increase: offered {offer.version} after {newest}")
        self.tables[offer.version] = offer
        for old in sorted(self.tables)[:-self.keep]:
            del self.tables[old]
        return offer.version

    def newest_table(self) -> TableOffer | None:
        """The newest snapshot (None before the first); counted as a poll."""
        self.num_polls += 1
        offer = self.tables[max(self.tables)] if self.tables else None
        self.last_polled = None if offer is None else offer.version
        return offer

    def table(self, version: int) -> TableOffer | None:
        return self.tables.get(version)

    def poll(self) -> LMGate:
        offer = self.newest_table()
        return LMGate(newest=None if offer is None else offer.version, allowed=self.lm_allowed, stop=self.lm_stop)

    def allow_lm_round(self, rnd: int) -> None:
        self.lm_allowed = max(self.lm_allowed, rnd)

    def stop_lm(self) -> None:
        self.lm_stop = True

    def post_lm_round(self, done: LMRound) -> None:
        self.lm_rounds[done.round] = done  # a round posted again after a resume is the same round

    def lm_round(self, rnd: int) -> LMRound | None:
        return self.lm_rounds.get(rnd)

    def stats(self) -> dict:
        return {"num_polls": self.num_polls, "last_polled": self.last_polled, "newest": max(self.tables, default=None),
                "held": sorted(self.tables)}


def exchange_actor(cfg: ExchangeConfig, *, create: bool = False):
    """The named actor (``create``: started when missing; it lives as long as the job that created it)."""
    assert cfg.actor, "exchange.actor is unset"
    if create:
        return Exchange.options(name=cfg.actor, namespace=cfg.namespace, get_if_exists=True).remote(cfg.keep_tables)
    return ray.get_actor(cfg.actor, namespace=cfg.namespace)


class TableFeed:
    """The LM ranks' view: :meth:`newest` asks on rank 0 and broadcasts (every rank gets the same answer, so
    every rank swaps at the same step); :meth:`table` turns a version into a KGTable like ``base`` (same
    interaction and labels), from the object store or, failing that, from the snapshot exports."""

    def __init__(self, cfg: ExchangeConfig, base: KGTable, rank: int = 0):
        self.cfg, self.base, self.rank = cfg, base, rank
        self.actor = exchange_actor(cfg)

    def poll(self, broadcast) -> LMGate:
        """Rank 0 asks, every rank gets the answer. ``broadcast(obj) -> obj`` sends rank 0's object to every
        rank (the identity for one rank)."""
        return broadcast(ray.get(self.actor.poll.remote()) if self.rank == 0 else None)

    def newest(self, broadcast) -> int | None:
        """The newest published version (None: none yet)."""
        return self.poll(broadcast).newest

    def wait_allowed(self, rnd: int, broadcast, interval_s: float = 0.2) -> bool:
        """Blocks until the driver allows LM round ``rnd`` (True) or asks the LM to stop (False)."""
        while True:
            gate = self.poll(broadcast)
            if gate.stop or gate.allowed >= rnd:
                return not gate.stop
            time.sleep(interval_s)

    def post(self, done: LMRound) -> None:
        if self.rank == 0:
            ray.get(self.actor.post_lm_round.remote(done))

    def table(self, version: int) -> KGTable:
        if version == self.base.version:
            return self.base
        offer = ray.get(self.actor.table.remote(version))
        if offer is not None:
            try:
                snap = ray.get(offer.refs[0])
                return self.base.with_tables(version=version, entity=snap.entity, relation=snap.relation)
            except ray.exceptions.ObjectLostError:  # its publisher is gone (a restarted driver): read the export
                pass
        if not self.cfg.snapshots:
            raise ValueError(f"KG snapshot version {version} is neither held by exchange actor {self.cfg.actor!r} "
                             f"nor readable (exchange.snapshots is unset)")
        table = KGTable.from_export(Storage(self.cfg.snapshots, self.cfg.storage_options), snapshot_prefix(version),
                                    version=version)
        return self.base.with_tables(version=version, entity=table.entity, relation=table.relation)
