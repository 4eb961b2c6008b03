"""The driver: one run directory, the KGE side, the LM side and the mining pool, round by round (see
bikd.driver)."""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
import ray
import torch

from bikd.config import to_dict
from bikd.eval import evaluate
from bikd.kg.datasets import load_from_config, text_from_config
from bikd.kg.store import KGStore, KGVersion
from bikd.mining.candidates import generate
from bikd.mining.extract import encoder_from_export, fit_extractor
from bikd.mining.inputs import link_text
from bikd.mining.round import known_triples, run_round
from bikd.ray.exchange import LMRound, TableOffer, exchange_actor
from bikd.ray.sharded import ShardedKGE
from bikd.kge.export import load_embeddings
from bikd.ray.messages import Snapshot, snapshot_prefix
from bikd.ray.mining import ActorScorer, extractor_factory
from bikd.report import write_report, write_tensorboard
from bikd.runs import RunDir
from bikd.storage import Storage

from bikd.driver.config import BikdConfig, lm_side
from bikd.driver.sides import LMSide

__all__ = ["Driver", "precision_at"]


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
        self.on_round: Callable[[dict], None] = lambda row: None  # e.g. a Ray Tune trial reporting each round

    # ---- pieces ------------------------------------------------------------------------------------
    def _open_store(self) -> KGStore:
        storage = self.storage.child("kg")
        if storage.exists("manifests") and storage.ls("manifests"):
            return KGStore(storage)
        gold = {s: self.kg.label_triples(s) for s in ("train", "valid", "test")}
        return KGStore.create(storage, entities=self.kg.entities.labels, relations=self.kg.relations.labels, gold=gold)

    def _record_placement(self, **nodes) -> None:
        """placement.json: the Ray node of the driver and of each side's actors (for a look at a cluster run)."""
        old = json.loads(self.storage.read_text("placement.json")) if self.storage.exists("placement.json") else {}
        if any(old.get(k) != v for k, v in nodes.items()):
            self.storage.write_text("placement.json", json.dumps({**old, **nodes}, indent=1))

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

    @functools.cached_property
    def text(self):
        """The KG's entity and relation text (read once: every round's mining and probe use it)."""
        return text_from_config(self.cfg.data)

    @functools.cached_property
    def probe_facts(self) -> list:
        """The cloze facts of the valid sample every round's probe asks."""
        from bikd.lm.probe import cloze_facts
        from bikd.lm.triple_cls import TripleVerbaliser

        words = TripleVerbaliser.from_kg(self.kg, self.text)
        return cloze_facts(self.kg.valid, words.entity_names, words.relation_texts, self.kg.relations.labels,
                           limit=self.cfg.probe_limit)

    def _probe(self, export: str) -> dict:
        """The LM's cloze probe on valid triples, with the KG table and with it withheld."""
        from bikd.lm.probe import fused_lm_probe
        from bikd.lm.train import load_fused_and_tokenizer

        storage = Storage(export, self.cfg.storage_options)
        model, tokenizer = load_fused_and_tokenizer(storage)
        out = {}
        for key, kg in (("probe_p1", True), ("probe_nokg_p1", False)):
            try:
                out[key] = fused_lm_probe(model, tokenizer, self.probe_facts, kg=kg).p_at_1
            except ValueError:  # no relation with two candidates among the sampled facts
                out[key] = None
        return out

    def _add_mined(self, kge: ShardedKGE) -> int:
        """The store's mined triples the KGE side has not trained on yet (versions after ``kge.kg_version``):
        their confidences as loss weights and the extractor's relation distributions as the reverse-KD
        targets (a round whose targets file is missing, e.g. killed between its commit and that write,
        gives its triples a one-hot target on their own relation)."""
        head = self.store.head
        if head <= kge.kg_version:
            return 0
        before = {(m.head, m.relation, m.tail) for m in self.store.read(kge.kg_version).mined} if kge.kg_version else set()
        now = self.store.read(head)
        new = KGVersion(head, now.entities, now.relations, now.gold,
                        tuple(m for m in now.mined if (m.head, m.relation, m.tail) not in before))
        ids, conf = new.mined_arrays()
        targets = np.zeros((len(ids), len(now.relations)), np.float32)
        targets[np.arange(len(ids)), ids[:, 1]] = 1.0
        by_round: dict[int, dict] = {}
        for i, m in enumerate(new.mined):
            rnd = m.provenance.round
            if rnd not in by_round:
                by_round[rnd] = self._round_targets(rnd)
            row = by_round[rnd].get(tuple(ids[i].tolist()))
            if row is not None:
                targets[i] = row
        kge.add_triples(torch.from_numpy(ids), torch.from_numpy(conf).float(), torch.from_numpy(targets), kg_version=head)
        return len(ids)

    def _round_targets(self, rnd: int) -> dict[tuple, np.ndarray]:
        name = f"mining/round-{rnd:04d}/targets.npz"
        if not self.storage.exists(name):
            return {}
        data = np.load(io.BytesIO(self.storage.read_bytes(name)))
        return {tuple(t): p for t, p in zip(data["triples"].tolist(), data["targets"])}

    def _mine(self, rnd: int, export: str, kge: ShardedKGE, snapshot) -> dict:
        cfg, m = self.cfg, self.cfg.mine
        done = [v for v in self.store.versions() if v.meta.get("round_key", {}).get("round") == rnd]
        if done:  # committed before a restart: the round's result stands
            self.log(f"round {rnd}: mining was committed before the restart (KG version {done[-1].version})")
            return {"mined": done[-1].num_mined_added, "kg_version": done[-1].version}
        version = self.store.read()
        linked = link_text(version, self.text, m.corpus, descriptions=m.descriptions,
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
            self._record_placement(mining_actors=scorer.node_ids())
            start = time.perf_counter()
            result = run_round(self.store, version, cands.candidates, scorer, mining,
                               lm_snapshot_id=fitted.manifest["snapshot_id"], kg_snapshot_id=f"v{snapshot.version}",
                               counts={**linked.counts, **cands.counts})
            took = time.perf_counter() - start
        if result.mined:  # the soft labels of reverse distillation, by triple ids (the store's id order)
            ids = KGVersion(0, version.entities, version.relations, {}, tuple(result.mined)).mined_arrays()[0]
            buf = io.BytesIO()
            np.savez(buf, triples=ids, targets=result.targets)
            self.storage.write_bytes(f"mining/round-{rnd:04d}/targets.npz", buf.getvalue())
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

    # ---- one round of each side ----------------------------------------------------------------------
    def _kge_round(self, kge: ShardedKGE, exchange) -> tuple[dict, Any, str]:
        """Add the newly mined triples, train, publish (export + exchange), checkpoint, evaluate."""
        loop, t0 = self.cfg.loop, time.perf_counter()
        added = self._add_mined(kge) if loop.directions == "both" else 0
        every, losses = self.cfg.exchange.kge_publish_epochs, []
        for e in range(1, loop.kge_epochs_per_round + 1):
            losses.append(kge.train_epoch())
            if e < loop.kge_epochs_per_round and every is not None and e % every == 0 and exchange is not None:
                self._publish(kge, exchange)  # a snapshot inside the round, for an LM polling mid-round
        snapshot = self._publish(kge, exchange)
        name = kge.checkpoint(self.storage.child("kge/ckpt"))
        row = {"kge_added_triples": added, "kge_epoch": kge.epoch, "kge_loss": losses[-1]["loss"],
               "kge_triples_per_s": float(np.median([x["triples_per_s"] for x in losses])), "kge_seconds": time.perf_counter() - t0,
               "kg_snapshot_version": snapshot.version, "kg_valid_mrr": self._kg_valid_mrr(kge, snapshot)}
        self.log(f"KGE epoch {kge.epoch}: loss {row['kge_loss']:.4f}, snapshot {snapshot.version}, valid MRR {row['kg_valid_mrr']:.4f}")
        return row, snapshot, name

    def _publish(self, kge: ShardedKGE, exchange):
        """A snapshot, exported under kge/snapshots/ and offered to the exchange."""
        snapshot, ref = kge.publish(self.storage.child("kge"), list(self.kg.entities.labels), list(self.kg.relations.labels))
        if exchange is not None:
            ray.get(exchange.offer_table.remote(TableOffer(version=snapshot.version, refs=(ref,), epoch=kge.epoch)))
        return snapshot

    def _start_lm(self, cfg: BikdConfig, exchange) -> LMSide:
        """The LM side's one fit (once snapshot 1 is exported: its base table), resuming from its checkpoint."""
        return LMSide(lm_side(cfg, self.storage.url_of(f"kge/{snapshot_prefix(1)}")), exchange)

    def _lm_row(self, done: LMRound) -> tuple[dict, str]:
        """The row of a finished LM round, with the probe of its export. Returns (row, export)."""
        lm, t0 = done.metrics, time.perf_counter()
        if lm.get("worker_nodes"):
            self._record_placement(lm_workers=lm["worker_nodes"])
        row = {k: lm[k] for k in lm if k.startswith("eval_") or k in (
            "task_loss", "kd_entity_loss", "kd_relation_loss", "rows_per_s", "kg_table_version", "kg_versions_behind")}
        row.update(lm_step=done.step, **self._probe(done.export))
        row["lm_seconds"] = lm.get("round_seconds", 0.0) + time.perf_counter() - t0
        self.log(f"round {done.round}: LM step {row['lm_step']}, " + ", ".join(
            f"{k} {v:.4f}" for k, v in row.items() if (k.startswith(("eval_", "probe_"))) and isinstance(v, float)))
        return row, done.export

    def _close_round(self, row: dict, rows: list[dict], start: float, progress: dict) -> str | None:
        """Record the round (metrics, report, progress); the reason to stop, if any."""
        row["wall_s"] = time.monotonic() - start
        self._append_metrics(row)
        rows.append(row)
        self.rundir.save_progress({**progress, "round": row["round"], "kg_version": self.store.head})
        self.on_round(row)  # after the round is recorded: a hook that raises leaves a resumable run
        loop = self.cfg.loop
        if loop.time_budget_s is not None and time.monotonic() - start >= loop.time_budget_s:
            return f"time budget of {loop.time_budget_s:g} s"
        if self._plateaued(rows):
            return f"{loop.plateau_metric} plateaued over {loop.plateau_patience} rounds"
        return None

    # ---- the loop ----------------------------------------------------------------------------------
    @property
    def finished(self) -> dict | None:
        """The final summary of a finished run (nothing left to do), else None."""
        return self.rundir.finished()

    def completed_rounds(self) -> list[dict]:
        """The metrics rows of the rounds completed so far (a resumed run continues after the last)."""
        done = int((self.rundir.progress() or {"round": 0})["round"])
        return [row for row in self._metrics_lines() if row["round"] <= done]

    def run(self) -> dict:
        cfg, loop = self.cfg, self.cfg.loop
        if (finished := self.rundir.finished()) is not None:
            self.log(f"run {self.rundir.url} finished after round {finished['round']}; nothing to do")
            return finished
        progress = self.rundir.progress() or {"round": 0}
        start, done = time.monotonic(), int(progress["round"])
        kge = ShardedKGE(self.kg.train, self.kg.num_entities, self.kg.num_relations, cfg.kge, cfg.kge_dist)
        self._record_placement(driver=ray.get_runtime_context().get_node_id(), kge_trainers=kge.trainer_nodes())
        kge_ckpt = self.storage.child("kge/ckpt")
        if done or (loop.mode == "async" and ShardedKGE.latest_checkpoint(kge_ckpt)):
            # sync: the checkpoint of the last completed round; async: the KGE side's newest
            kge.restore(kge_ckpt, progress.get("kge_checkpoint") if loop.mode == "sync" else None)
            self.log(f"resuming {self.rundir.url} after round {done} (KGE epoch {kge.epoch}, snapshot {kge.snapshot_version}, "
                     f"KG version {self.store.head})")
        # the exchange carries the LM side's rounds in every mode; snapshots are offered to it unless directions=none
        xcfg = dataclasses.replace(cfg.exchange, actor=self.exchange_name, snapshots=self.storage.url_of("kge"),
                                   storage_options=cfg.storage_options)
        actor = exchange_actor(xcfg, create=True)
        cfg = dataclasses.replace(cfg, exchange=xcfg)
        offer = actor if loop.directions != "none" else None
        rows, sides = self._metrics_lines()[:done], {}
        try:
            run_rounds = self._sync if loop.mode == "sync" else self._async
            stop = run_rounds(cfg, kge, actor, offer, sides, done, rows, start)
            if "lm" in sides and stop is None:
                sides["lm"].finish()
            last = rows[-1]["round"] if rows else done
            final = {"round": last, "stopped_by": stop or f"{loop.rounds} rounds", "kg_version": self.store.head,
                     "kg_test": self._kg_test(kge), "lm_test": self._lm_test(last)}
            self._write_report(self._metrics_lines(), final)
            self.rundir.mark_finished(**final)
            return final
        finally:
            try:
                if "lm" in sides:
                    sides["lm"].close()
            finally:
                kge.shutdown()
                ray.kill(actor)

    def _sync(self, cfg: BikdConfig, kge: ShardedKGE, actor, offer, sides: dict, done: int, rows: list[dict],
              start: float) -> str | None:
        """Alternating rounds: KGE, then the LM's round on its snapshot, then mining on the LM's export."""
        for rnd in range(done + 1, cfg.loop.rounds + 1):
            kge_row, snapshot, name = self._kge_round(kge, offer)
            if "lm" not in sides:
                sides["lm"] = self._start_lm(cfg, actor)
            sides["lm"].allow(rnd)
            lm_row, export = self._lm_row(sides["lm"].result(rnd))
            row = {"round": rnd, **kge_row, **lm_row,
                   "kg_staleness": snapshot.version - (lm_row.get("kg_table_version") or 0) if offer else None}
            row.update(self._mining_row(rnd, export, kge, snapshot))
            if stop := self._close_round(row, rows, start, {"kge_checkpoint": name, "snapshot_version": snapshot.version}):
                self.log(f"stopping after round {rnd}: {stop}")
                return stop
        return None

    def _async(self, cfg: BikdConfig, kge: ShardedKGE, actor, offer, sides: dict, done: int, rows: list[dict],
               start: float) -> str | None:
        """Both sides at once, each at its own pace: the KGE side runs its rounds in a thread (publishing a
        snapshot after each, at most ``loop.max_kge_lead`` rounds ahead of the mining), the LM side its rounds
        in its fit without waiting (swapping in the newest snapshot every exchange.lm_poll_steps); each
        finished LM round is mined, on the newest snapshot, while both go on."""
        loop, lock, halt = cfg.loop, threading.Lock(), threading.Event()
        newest: dict[str, Any] = {}
        first = threading.Event()
        if kge.snapshot_version:  # resumed: the snapshot its checkpoint published is the newest (a new exchange)
            snapshot = self._published(kge.snapshot_version)
            newest.update(snapshot=snapshot.version, model=snapshot)
            if offer is not None:
                ray.get(offer.offer_table.remote(TableOffer(version=snapshot.version, refs=(ray.put(snapshot),))))
            first.set()

        mined = threading.Condition()
        progress = {"mined": done}  # mining rounds finished

        def kge_side() -> None:
            for k in range(kge.epoch // loop.kge_epochs_per_round + 1, loop.rounds + 1):
                # bounded lead: KGE round k starts once mining round k - 1 - max_kge_lead is in (so it trains
                # on what the LM mined instead of racing to its last epoch alone)
                with mined:
                    while progress["mined"] < min(k - 1 - loop.max_kge_lead, loop.rounds) and not halt.is_set():
                        mined.wait(1.0)
                if halt.is_set():
                    return
                row, snapshot, _ = self._kge_round(kge, offer)
                with lock:
                    newest.update(row=row, snapshot=snapshot.version, model=snapshot)
                first.set()

        def check() -> None:
            if side.done() and side.exception() is not None:
                raise side.exception()

        with ThreadPoolExecutor(1, thread_name_prefix="bikd-kge") as pool:
            side = pool.submit(kge_side)
            try:
                while not first.wait(1.0):  # the LM's base table is snapshot 1
                    check()
                sides["lm"] = self._start_lm(cfg, actor)
                for rnd in range(done + 1, loop.rounds + 1):
                    lm_row, export = self._lm_row(sides["lm"].result(rnd, check))
                    with lock:
                        kge_row, version, snapshot = dict(newest.get("row", {})), newest.get("snapshot"), newest.get("model")
                    row = {"round": rnd, **kge_row, **lm_row, "kg_snapshot_version": version,  # the newest, mined on
                           "kg_staleness": version - (lm_row.get("kg_table_version") or 0) if offer else None}
                    row.update(self._mining_row(rnd, export, kge, snapshot))
                    with mined:
                        progress["mined"] = rnd
                        mined.notify_all()
                    if stop := self._close_round(row, rows, start, {"snapshot_version": version}):
                        self.log(f"stopping after round {rnd}: {stop}")
                        return stop
            finally:
                halt.set()
                with mined:
                    mined.notify_all()
                side.result()  # an error of the KGE side surfaces here
        return None

    def _published(self, version: int) -> Snapshot:
        """Snapshot ``version`` as the KGE side exported it."""
        entity, relation, *_ = load_embeddings(self.storage.child("kge"), snapshot_prefix(version))
        return Snapshot(version=version, entity=torch.from_numpy(entity), relation=torch.from_numpy(relation))

    def _mining_row(self, rnd: int, export: str, kge: ShardedKGE, snapshot) -> dict:
        if self.cfg.loop.directions != "both":
            return {"kg_version": self.store.head}
        t0 = time.perf_counter()
        row = self._mine(rnd, export, kge, snapshot)
        row["mining_seconds"] = time.perf_counter() - t0
        self.log(f"round {rnd}: mined {row['mined']} triples -> KG version {row['kg_version']}")
        return row

    def _lm_test(self, rnd: int) -> dict:
        """The last round's LM on the **test** triples (triple classification), with the KG table and without
        it, read once. QA has no test split here: its per-round metric is on held-out articles already."""
        from bikd.lm.train import build_linker, build_task_data, evaluate_task, load_fused_and_tokenizer

        task = self.cfg.lm.task
        if task.name != "triple_cls" or rnd < 1:
            return {}
        # max_train=1: build_task_data also makes train rows, unused here (the test rows' sampling does not
        # depend on them)
        task = dataclasses.replace(task, eval_split="test", max_train=1, link=task.link and self.cfg.loop.directions != "none")
        model, tokenizer = load_fused_and_tokenizer(Storage(self.storage.url_of(f"lm/exports/round-{rnd:04d}"),
                                                            self.cfg.storage_options))
        linker = build_linker(self.kg, self.text) if task.link else None
        _, test = build_task_data(task, tokenizer, self.kg, linker, text=self.text)
        out = {}
        for prefix, kg in (("", True), ("nokg_", False)):
            for k, v in evaluate_task(model, test, task.name, self.cfg.lm.train.eval_batch_size, kg=kg).items():
                out[f"{prefix}{k}"] = v
        return out

    def _kg_test(self, kge: ShardedKGE) -> dict:
        """Filtered test ranking of the final KGE, read once."""
        model = kge.model(kge.snapshot())
        m = evaluate(model, self.kg.test, [self.kg.train, self.kg.valid], self.kg.num_relations, self.cfg.kg_eval).metrics()
        return {k: m[f"both.{k}"] for k in ("mrr", "hits_at_1", "hits_at_10")}
