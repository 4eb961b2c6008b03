"""The bidirectional loop: the KGE side (ShardedKGE on Ray actors), the LM side (DeepSpeed under Ray Train) and
the mining pool, meeting at a named Exchange actor and in one run directory.

One round, ``sync`` mode (alternating, reproducible on CPU):

    KGE   add the KG store's newly mined triples (weights: the miner's confidences), train
          ``kge_epochs_per_round`` epochs, publish snapshot r (object store + run_dir/kge/snapshots/v..r),
          checkpoint, evaluate (filtered MRR on valid)
    LM    train ``lm_steps_per_round`` more steps; at its first step it polls the exchange and swaps in
          snapshot r; checkpoint + export (run_dir/lm/exports/round-r); task metric with and without the table
    LM->KG  (directions=both) an extractor fine-tuned from the LM export's encoder scores the round's
          candidates on the mining pool; the accepted triples are committed as one KG store version
    record  metrics.jsonl, progress.json (the last completed round), report

``--directions``: ``none`` (each side alone: the LM never sees the KG, nothing is mined), ``kg2lm`` (snapshots
flow to the LM), ``both``. Stopping: ``loop.rounds``, ``loop.time_budget_s``, or a plateau of
``loop.plateau_metric`` (no gain of ``plateau_min_delta`` in ``plateau_patience`` rounds).

Resume: a rerun with the same run_dir continues after the last completed round: the KGE side restores the
checkpoint that round wrote and re-adds the store's later mined triples, the LM side resumes from its
checkpoint (fusing the snapshot version it recorded), and a round whose mining commit landed before the
kill is not mined twice. Every file appears atomically (manifest last), so no KG version is lost or doubled.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np
import ray
import torch

from bikd.config import to_dict
from bikd.eval import EvalConfig, evaluate
from bikd.kg.datasets import DataConfig, load_from_config, text_from_config
from bikd.kg.store import KGStore, KGVersion
from bikd.kge.training import KGETrainConfig
from bikd.lm.extractor import ExtractorConfig
from bikd.mining.candidates import generate
from bikd.mining.extract import encoder_from_export, fit_extractor
from bikd.mining.inputs import link_text
from bikd.mining.round import MiningConfig, known_triples, run_round
from bikd.ray.exchange import ExchangeConfig, TableOffer, exchange_actor
from bikd.ray.kge import DistConfig, ShardedKGE
from bikd.ray.lm_train import LMJobConfig, run as run_lm, validate as validate_lm
from bikd.ray.mining import ActorScorer, ScoringConfig, extractor_factory
from bikd.report import write_report, write_tensorboard
from bikd.runs import RunDir
from bikd.storage import Storage, join_url

__all__ = ["LoopConfig", "MineSideConfig", "BikdConfig", "validate", "required_cpus", "Driver"]


@dataclass(kw_only=True, frozen=True)
class LoopConfig:
    mode: Literal["sync"] = "sync"
    directions: Literal["none", "kg2lm", "both"] = "both"
    rounds: int = 3
    kge_epochs_per_round: int = 2
    lm_steps_per_round: int = 40
    #: stop after the round during which this many seconds have passed (null: no budget)
    time_budget_s: float | None = None
    #: a per-round metric (a key of metrics.jsonl) that should rise; null patience: no plateau rule
    plateau_metric: str = "kg_valid_mrr"
    plateau_patience: int | None = None
    plateau_min_delta: float = 0.001

    def __post_init__(self):
        if self.mode not in ("sync",):
            raise ValueError(f"loop.mode must be 'sync' (async is not built yet), got {self.mode!r}")
        if self.directions not in ("none", "kg2lm", "both"):
            raise ValueError(f"loop.directions must be none, kg2lm or both, got {self.directions!r}")
        for key in ("rounds", "kge_epochs_per_round", "lm_steps_per_round"):
            if getattr(self, key) < 1:
                raise ValueError(f"loop.{key} must be >= 1, got {getattr(self, key)}")
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


@dataclass(kw_only=True, frozen=True)
class BikdConfig:
    data: DataConfig = field(default_factory=DataConfig)
    run_dir: str = "runs/bikd"
    storage_options: dict[str, Any] = field(default_factory=dict)
    loop: LoopConfig = field(default_factory=LoopConfig)
    kge: KGETrainConfig = field(default_factory=KGETrainConfig)
    kge_dist: DistConfig = field(default_factory=lambda: DistConfig(num_parts=1, mode="sync"))
    kg_eval: EvalConfig = field(default_factory=EvalConfig)
    #: valid triples ranked per round (a seeded sample; null: all); test is ranked once, at the end
    valid_limit: int | None = 1000
    #: valid triples in the LM's cloze probe ("<head> <relation text> [MASK]."), per round
    probe_limit: int = 300
    lm: LMJobConfig = field(default_factory=LMJobConfig)
    mine: MineSideConfig = field(default_factory=MineSideConfig)
    exchange: ExchangeConfig = field(default_factory=ExchangeConfig)
    num_threads: int | None = None

    def __post_init__(self):
        if self.probe_limit < 1:
            raise ValueError(f"probe_limit must be >= 1, got {self.probe_limit}")
        if self.valid_limit is not None and self.valid_limit < 1:
            raise ValueError(f"valid_limit must be >= 1 or null, got {self.valid_limit}")
        if self.loop.mode == "sync" and self.kge_dist.mode != "sync":
            raise ValueError("loop.mode sync needs kge_dist.mode sync (async trainers are not reproducible)")


def required_cpus(cfg: BikdConfig) -> dict[str, float]:
    """The CPU reservation of each side (its actors hold it while they live)."""
    return {"kge": cfg.kge_dist.num_parts * cfg.kge_dist.cpus_per_trainer,
            "lm": cfg.lm.num_workers * cfg.lm.cpus_per_worker,
            "mining": cfg.mine.scoring.num_actors * cfg.mine.scoring.num_cpus if cfg.loop.directions == "both" else 0.0}


def lm_side(cfg: BikdConfig, rnd: int, base_snapshot: str) -> LMJobConfig:
    """The LM job of round ``rnd``: ``rnd`` x steps-per-round steps on one schedule, resuming from the round
    before; the KG table starts from the first snapshot and follows the exchange (none: never used)."""
    loop, lm = cfg.loop, cfg.lm
    steps = rnd * loop.lm_steps_per_round
    train = dataclasses.replace(lm.train, steps=steps, schedule_steps=loop.rounds * loop.lm_steps_per_round,
                                checkpoint_every=loop.lm_steps_per_round, eval_every=None)
    task, kd = lm.task, lm.kd
    exchange = dataclasses.replace(cfg.exchange, actor=None)
    if loop.directions == "none":  # the plain LM: no links, so no fusion and no KD
        task, kd = dataclasses.replace(task, link=False), dataclasses.replace(kd, entity_weight=0.0, relation_weight=0.0)
    else:  # polled at the round's first step: the snapshot of this round
        exchange = dataclasses.replace(cfg.exchange, lm_poll_steps=math.gcd(cfg.exchange.lm_poll_steps, loop.lm_steps_per_round))
    return dataclasses.replace(
        lm, data=cfg.data, train=train, task=task, kd=kd, exchange=exchange,
        kg=dataclasses.replace(lm.kg, export=base_snapshot), storage_path=join_url(cfg.run_dir, "lm"), name="ckpt",
        storage_options=cfg.storage_options, export_path=join_url(cfg.run_dir, "lm", "exports", f"round-{rnd:04d}"))


def validate(cfg: BikdConfig) -> BikdConfig:
    """Everything checkable before an actor starts (ValueError): the LM side's files and layers, the resource
    split against the cluster (Ray initialised)."""
    validate_lm(dataclasses.replace(cfg.lm, data=cfg.data, exchange=dataclasses.replace(cfg.exchange, actor=None)))
    need = required_cpus(cfg)
    # sync: one side runs at a time, but every side's actors hold their CPUs for the whole run
    have = ray.cluster_resources().get("CPU", 0) if ray.is_initialized() else math.inf
    if sum(need.values()) > have:
        raise ValueError("resource split " + ", ".join(f"{k} {v:g} CPUs" for k, v in need.items())
                         + f" needs {sum(need.values()):g} CPUs; the Ray cluster has {have:g}")
    return cfg


def precision_at(mined: list, valid: set, k: int) -> float | None:
    top = sorted(mined, key=lambda m: -m.provenance.confidence)[:k]
    return None if not top else sum((m.head, m.relation, m.tail) in valid for m in top) / len(top)


class Driver:
    """Runs the loop of ``cfg`` in its run directory (Ray initialised). ``log``: one line per call."""

    def __init__(self, cfg: BikdConfig, log: Callable[[str], None] = print):
        self.cfg, self.log = cfg, log
        self.storage = Storage(cfg.run_dir, cfg.storage_options)
        identity = {"dataset": cfg.data.name, "directions": cfg.loop.directions, "mode": cfg.loop.mode,
                    "kge_model": cfg.kge.model.name, "encoder": cfg.lm.encoder.name_or_path}
        self.rundir = RunDir(self.storage, identity, "choose another --set run_dir=...")
        self.resumed = self.rundir.claim(to_dict(cfg))
        self.kg = load_from_config(cfg.data)
        self.store = self._open_store()
        self.exchange_name = f"bikd-exchange-{os.getpid()}"

    # ---- pieces ------------------------------------------------------------------------------------
    def _open_store(self) -> KGStore:
        storage = self.storage.child("kg")
        if storage.exists("manifests") and storage.ls("manifests"):
            return KGStore(storage)
        gold = {s: self.kg.label_triples(s) for s in ("train", "valid", "test")}
        return KGStore.create(storage, entities=self.kg.entities.labels, relations=self.kg.relations.labels, gold=gold)

    def _metrics_lines(self) -> list[dict]:
        if not self.storage.exists("metrics.jsonl"):
            return []
        return [json.loads(line) for line in self.storage.read_text("metrics.jsonl").splitlines() if line.strip()]

    def _append_metrics(self, row: dict) -> None:
        rows = [r for r in self._metrics_lines() if r["round"] < row["round"]] + [row]  # a redone round replaces its line
        self.storage.write_text("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        self._write_report(rows)

    def _write_report(self, rows: list[dict], final: dict | None = None) -> None:
        loop = self.cfg.loop
        title = f"bikd run {self.rundir.url}: {self.cfg.data.name}, directions {loop.directions}, {loop.mode} mode"
        write_report(self.storage, rows, title=title, final=final)
        write_tensorboard(self.storage, rows)

    def _kg_valid_mrr(self, kge: ShardedKGE, snapshot) -> float:
        valid = self.kg.valid
        if self.cfg.valid_limit is not None and len(valid) > self.cfg.valid_limit:
            valid = valid[torch.randperm(len(valid), generator=torch.Generator().manual_seed(0))[: self.cfg.valid_limit]]
        return evaluate(kge.model(snapshot), valid, [self.kg.train, self.kg.valid, self.kg.test], self.kg.num_relations,
                        self.cfg.kg_eval).mrr

    def _probe(self, export: str) -> dict:
        """The LM's cloze probe on valid triples, with the KG table and with it withheld."""
        from bikd.lm.probe import cloze_facts, fused_lm_probe
        from bikd.lm.train import load_fused, load_fused_tokenizer
        from bikd.lm.triple_cls import TripleVerbaliser

        storage = Storage(export, self.cfg.storage_options)
        model, tokenizer = load_fused(storage), load_fused_tokenizer(storage)
        words = TripleVerbaliser.from_kg(self.kg, text_from_config(self.cfg.data))
        facts = cloze_facts(self.kg.valid, words.entity_names, words.relation_texts, self.kg.relations.labels,
                            limit=self.cfg.probe_limit)
        out = {}
        for key, kg in (("probe_p1", True), ("probe_nokg_p1", False)):
            try:
                out[key] = fused_lm_probe(model, tokenizer, facts, kg=kg).p_at_1
            except ValueError:  # no relation with two candidates among the sampled facts
                out[key] = None
        return out

    def _add_mined(self, kge: ShardedKGE) -> int:
        """The store's mined triples the KGE side has not trained on yet (versions after ``kge.kg_version``)."""
        head = self.store.head
        if head <= kge.kg_version:
            return 0
        before = {(m.head, m.relation, m.tail) for m in self.store.read(kge.kg_version).mined} if kge.kg_version else set()
        now = self.store.read(head)
        new = KGVersion(head, now.entities, now.relations, now.gold,
                        tuple(m for m in now.mined if (m.head, m.relation, m.tail) not in before))
        ids, conf = new.mined_arrays()
        kge.add_triples(torch.from_numpy(ids), torch.from_numpy(conf).float(), kg_version=head)
        return len(ids)

    def _mine(self, rnd: int, export: str, kge: ShardedKGE, snapshot) -> dict:
        cfg, m = self.cfg, self.cfg.mine
        done = [v for v in self.store.versions() if v.meta.get("round_key", {}).get("round") == rnd]
        if done:  # committed before a restart: the round's result stands
            self.log(f"round {rnd}: mining was committed before the restart (KG version {done[-1].version})")
            return {"mined": done[-1].num_mined_added, "kg_version": done[-1].version}
        version = self.store.read()
        linked = link_text(version, text_from_config(cfg.data), m.corpus, descriptions=m.descriptions,
                           max_pairs_per_passage=m.max_pairs_per_passage)
        out = self.storage.child(f"mining/round-{rnd:04d}/extractor")
        with tempfile.TemporaryDirectory() as tmp:
            encoder = encoder_from_export(export, tmp, cfg.storage_options)
            out.delete("", recursive=True)  # a half-written extractor of a killed round
            fitted = fit_extractor(version, linked, out, encoder=encoder, extractor=m.extractor,
                                   num_calib_pairs=m.num_calib_pairs, kg_snapshot_id=f"v{snapshot.version}",
                                   log=lambda line: self.log(f"  extractor: {line}"))
        model = kge.model(snapshot).eval()
        n_e, n_r = len(version.entities), len(version.relations)
        cands = generate(linked.pairs, linked.passages, known_triples(version), model.score_t, n_e, n_r,
                         m.mining.candidates)
        mining = dataclasses.replace(m.mining, round=rnd)
        with ActorScorer(extractor_factory(out.url, kg_export=None), m.scoring, version=version.version) as scorer:
            start = time.perf_counter()
            result = run_round(self.store, version, cands.candidates, scorer, mining,
                               lm_snapshot_id=fitted.manifest["snapshot_id"], kg_snapshot_id=f"v{snapshot.version}",
                               counts={**linked.counts, **cands.counts})
            took = time.perf_counter() - start
        valid = set(version.gold.get("valid", ()))
        return {"mined": len(result.mined), "kg_version": self.store.head, "mining_candidates": len(cands.candidates),
                "mining_candidates_per_s": len(cands.candidates) / max(took, 1e-9),
                f"mined_precision_at_{m.precision_at}_valid": precision_at(result.mined, valid, m.precision_at),
                "mined_sample": [{"triple": [t.head, t.relation, t.tail], "confidence": round(t.provenance.confidence, 4),
                                  "evidence": t.provenance.evidence} for t in result.mined[:5]]}

    def _plateaued(self, rows: list[dict]) -> bool:
        loop = self.cfg.loop
        if loop.plateau_patience is None or len(rows) <= loop.plateau_patience:
            return False
        values = [r.get(loop.plateau_metric) for r in rows]
        if any(v is None for v in values):
            raise ValueError(f"loop.plateau_metric {loop.plateau_metric!r} is not a per-round metric; have "
                             f"{sorted(k for k in rows[-1] if not isinstance(rows[-1][k], (list, dict)))}")
        best_before = max(values[: -loop.plateau_patience])
        return max(values[-loop.plateau_patience:]) < best_before + loop.plateau_min_delta

    # ---- the loop ----------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, loop = self.cfg, self.cfg.loop
        if (finished := self.rundir.finished()) is not None:
            self.log(f"run {self.rundir.url} finished after round {finished['round']}; nothing to do")
            return finished
        progress = self.rundir.progress() or {"round": 0}
        start, done = time.monotonic(), int(progress["round"])
        kge = ShardedKGE(self.kg.train, self.kg.num_entities, self.kg.num_relations, cfg.kge, cfg.kge_dist)
        kge_ckpt, snaps = self.storage.child("kge/ckpt"), self.storage.child("kge")
        if done:
            kge.restore(kge_ckpt, progress["kge_checkpoint"])
            self.log(f"resuming {self.rundir.url} after round {done} (KGE epoch {kge.epoch}, snapshot {kge.snapshot_version}, "
                     f"KG version {self.store.head})")
        exchange = None
        if loop.directions != "none":
            xcfg = dataclasses.replace(cfg.exchange, actor=self.exchange_name, snapshots=snaps.url,
                                       storage_options=cfg.storage_options)
            exchange = exchange_actor(xcfg, create=True)
            cfg = dataclasses.replace(cfg, exchange=xcfg)
        labels = (list(self.kg.entities.labels), list(self.kg.relations.labels))
        rows = self._metrics_lines()[:done]
        stop = None
        try:
            for rnd in range(done + 1, loop.rounds + 1):
                row: dict[str, Any] = {"round": rnd}
                t0 = time.perf_counter()
                row["kge_added_triples"] = self._add_mined(kge) if loop.directions == "both" else 0
                losses = [kge.train_epoch() for _ in range(loop.kge_epochs_per_round)]
                snapshot, ref = kge.publish(snaps, *labels)
                name = kge.checkpoint(kge_ckpt)
                kge_s = time.perf_counter() - t0
                if exchange is not None:
                    ray.get(exchange.offer_table.remote(TableOffer(version=snapshot.version, refs=(ref,), epoch=kge.epoch)))
                row.update(kge_epoch=kge.epoch, kge_loss=losses[-1]["loss"], kge_triples_per_s=float(np.median(
                    [x["triples_per_s"] for x in losses])), kg_snapshot_version=snapshot.version,
                    kg_valid_mrr=self._kg_valid_mrr(kge, snapshot), kge_seconds=kge_s)
                self.log(f"round {rnd}: KGE epoch {kge.epoch}, loss {row['kge_loss']:.4f}, valid MRR {row['kg_valid_mrr']:.4f}")

                t0 = time.perf_counter()
                lm_cfg = lm_side(cfg, rnd, snaps.url_of(f"snapshots/v{1:06d}"))
                result = run_lm(lm_cfg)
                lm = result.metrics
                row.update({k: lm[k] for k in lm if k.startswith("eval_") or k in (
                    "step", "task_loss", "kd_entity_loss", "kd_relation_loss", "rows_per_s", "kg_table_version",
                    "kg_versions_behind")})
                row["lm_step"], row["lm_seconds"] = row.pop("step"), time.perf_counter() - t0
                row.update(self._probe(lm["export"]))
                row["kg_staleness"] = snapshot.version - (lm.get("kg_table_version") or 0) if exchange else None
                self.log(f"round {rnd}: LM step {row['lm_step']}, " + ", ".join(
                    f"{k} {v:.4f}" for k, v in row.items() if k.startswith("eval_") and isinstance(v, float)))

                if loop.directions == "both":
                    t0 = time.perf_counter()
                    row.update(self._mine(rnd, lm["export"], kge, snapshot))
                    row["mining_seconds"] = time.perf_counter() - t0
                    self.log(f"round {rnd}: mined {row['mined']} triples -> KG version {row['kg_version']}")
                else:
                    row["kg_version"] = self.store.head
                row["wall_s"] = time.monotonic() - start
                self._append_metrics(row)
                rows.append(row)
                self.rundir.save_progress({"round": rnd, "kge_checkpoint": name, "kg_version": self.store.head,
                                        "snapshot_version": snapshot.version})
                if loop.time_budget_s is not None and time.monotonic() - start >= loop.time_budget_s:
                    stop = f"time budget of {loop.time_budget_s:g} s"
                elif self._plateaued(rows):
                    stop = f"{loop.plateau_metric} plateaued over {loop.plateau_patience} rounds"
                if stop:
                    self.log(f"stopping after round {rnd}: {stop}")
                    break
            last = rows[-1]["round"] if rows else done
            final = {"round": last, "stopped_by": stop or f"{loop.rounds} rounds", "kg_version": self.store.head,
                     "kg_test": self._kg_test(kge)}
            self._write_report(self._metrics_lines(), final)
            self.rundir.mark_finished(**final)
            return final
        finally:
            kge.shutdown()
            if exchange is not None:
                ray.kill(exchange)

    def _kg_test(self, kge: ShardedKGE) -> dict:
        """Filtered test ranking of the final KGE, read once."""
        model = kge.model(kge.snapshot())
        m = evaluate(model, self.kg.test, [self.kg.train, self.kg.valid], self.kg.num_relations, self.cfg.kg_eval).metrics()
        return {k: m[f"both.{k}"] for k in ("mrr", "hits_at_1", "hits_at_10")}
