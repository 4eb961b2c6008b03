"""One LM -> KG mining round: candidates from text and the KG model, scored by the relation extractor on a
pool of Ray actors, thresholded on valid, committed to the KG store as one new version with provenance.

    python jobs/mine.py --set store=runs/kg --set extractor=runs/extractor --set kg_export=runs/kge/export \\
        [--set data.dataset=fb15k237 --set corpus=[notes.jsonl] --set scoring.num_actors=2 ...] [--dry-run]

``store``: a KG store (bikd.kg.store); an empty location gets version 0 from ``data`` (train/valid/test as
gold). ``extractor``: an exported relation extractor (bikd.lm.extractor_io). ``kg_export``: the KG snapshot
(a bikd.kge.export folder: its ids must be the store's) that proposes candidates and, for a fusion-on
extractor, is fused; null: co-mention candidates only. Passages: the entity descriptions of ``data`` and
every file in ``corpus`` (plain text or JSONL). The miner knows the store's train split and mined triples;
valid sets the thresholds; test is never read. ``--dry-run`` scores and prints but writes nothing (and
may read an older store version, ``kg_version``).
Joins the Ray cluster at $RAY_ADDRESS, else starts a local one.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import ray
import torch

from bikd.cli import job_parser, parse_job_config, run_main, set_num_threads
from bikd.config import dump_yaml
from bikd.kg.datasets import DataConfig, load_from_config, text_from_config
from bikd.kg.store import KGStore, KGVersion
from bikd.kge.export import load_embeddings
from bikd.kge.models import KGEModel, ModelConfig, build_interaction
from bikd.lm.extractor_io import read_manifest
from bikd.mining.candidates import bound_recall, generate
from bikd.mining.inputs import link_text
from bikd.mining.round import MiningConfig, RoundResult, check_id_maps, kg_snapshot_id, known_triples, run_round, summary
from bikd.ray.mining import ActorScorer, ScoringConfig, extractor_factory
from bikd.storage import Storage


@dataclass(kw_only=True, frozen=True)
class MineJobConfig:
    data: DataConfig = field(default_factory=DataConfig)
    store: str = ""
    extractor: str = ""
    kg_export: str | None = None
    #: the store version the round reads; null: HEAD (a version below HEAD can only be mined with --dry-run)
    kg_version: int | None = None
    #: plain-text or JSONL corpora (one passage per line / object) besides the descriptions
    corpus: tuple[str, ...] = ()
    descriptions: bool = True
    #: linked pairs kept per passage (the subject's and the closest first); null: all
    max_pairs_per_passage: int | None = 20
    mining: MiningConfig = field(default_factory=MiningConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    #: also generate the unbounded candidates and print the share of the train triples they reach that the
    #: bounded ones still reach (what ``mining.candidates.max_candidates`` costs)
    measure_bound_recall: bool = False
    num_threads: int | None = None

    def __post_init__(self):
        for key in ("store", "extractor"):
            if not getattr(self, key):
                raise ValueError(f"{key} is required (--set {key}=URL)")
        if self.max_pairs_per_passage is not None and self.max_pairs_per_passage < 1:
            raise ValueError(f"max_pairs_per_passage must be >= 1 or null, got {self.max_pairs_per_passage}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or null, got {self.num_threads}")


def open_store(cfg: MineJobConfig, dry_run: bool) -> tuple[KGStore | None, KGVersion]:
    storage = Storage(cfg.store)
    if storage.exists("manifests") and storage.ls("manifests"):
        store = KGStore(storage)
        if cfg.kg_version is not None and cfg.kg_version != store.head and not dry_run:
            raise ValueError(f"kg_version {cfg.kg_version} is not HEAD ({store.head}) of {storage.url}: a round commits on "
                             f"HEAD; mine an older version with --dry-run, or roll the store back to it first")
        return store, store.read(cfg.kg_version)
    kg = load_from_config(cfg.data)
    if dry_run:  # the version 0 a real run would create, in memory only
        return None, KGVersion.gold_only(kg)
    gold = {s: kg.label_triples(s) for s in ("train", "valid", "test")}
    store = KGStore.create(storage, entities=kg.entities.labels, relations=kg.relations.labels, gold=gold)
    print(f"new KG store at {storage.url}: version 0 from {cfg.data.name}")
    return store, store.read()


def load_kg_model(url: str, version: KGVersion, store_url: str) -> tuple[KGEModel, str]:
    entity, relation, ent_labels, rel_labels, meta = load_embeddings(Storage(url))
    snapshot = kg_snapshot_id(meta)
    check_id_maps(ent_labels, rel_labels, snapshot, version, store_url)
    mcfg = ModelConfig(**{k: v for k, v in meta["config"].items() if k in ("name", "dim", "p", "init_scale")})
    model = KGEModel(build_interaction(mcfg), len(ent_labels), len(rel_labels), mcfg.dim)
    model.entity.data.copy_(torch.from_numpy(entity))
    model.relation.data.copy_(torch.from_numpy(relation))
    return model.eval(), snapshot


def mine(cfg: MineJobConfig, dry_run: bool) -> int:
    print(dump_yaml(cfg))
    print(f"torch threads: {set_num_threads(cfg.num_threads)}")
    manifest = read_manifest(cfg.extractor)  # a missing or incomplete extractor fails before any work
    store, version = open_store(cfg, dry_run)
    if manifest["num_relations"] != len(version.relations):
        raise ValueError(f"the extractor at {cfg.extractor} predicts {manifest['num_relations']} relations, the KG "
                         f"(store version {version.version}) has {len(version.relations)}")
    labels = manifest.get("relation_labels")  # absent from extractors saved without them
    if labels is not None and list(labels) != list(version.relations):
        i = next(i for i, (a, b) in enumerate(zip(labels, version.relations)) if a != b)
        raise ValueError(f"the extractor at {cfg.extractor} was trained on other relations than the KG's (store "
                         f"version {version.version}): column {i} is {labels[i]!r}, the KG's relation {i} {version.relations[i]!r}")
    if manifest.get("requires_kg_table") and cfg.kg_export is None:
        raise ValueError(f"the extractor at {cfg.extractor} fuses KG embeddings: give it the KG snapshot (--set kg_export=URL)")
    model, kg_snap = (None, "none") if cfg.kg_export is None else load_kg_model(cfg.kg_export, version, cfg.store)
    linked = link_text(version, text_from_config(cfg.data), cfg.corpus, descriptions=cfg.descriptions,
                       max_pairs_per_passage=cfg.max_pairs_per_passage)  # linked as the extractor's training text
    passages, pairs, skips = linked.passages, linked.pairs, linked.counts
    print("passages: " + ", ".join(f"{k} {v}" for k, v in skips.items()))
    n_e, n_r = len(version.entities), len(version.relations)
    cands = generate(pairs, passages, known_triples(version), None if model is None else model.score_t, n_e, n_r,
                     cfg.mining.candidates)
    print("candidates: " + ", ".join(f"{k} {v}" for k, v in cands.counts.items()), flush=True)
    if cfg.measure_bound_recall:
        everything = generate(pairs, passages, known_triples(version), None if model is None else model.score_t,
                              n_e, n_r, cfg.mining.candidates, bounded=False)
        train = known_triples(version)[: len(version.gold.get("train", ()))].tolist()
        recall = bound_recall(everything.candidates, cands.candidates, map(tuple, train))
        print(f"bound: {len(cands.candidates)} of {len(everything.candidates)} candidates, reaching {recall:.1%} of "
              f"the train triples the unbounded ones reach", flush=True)

    def round_with(scorer) -> RoundResult:
        return run_round(store, version, cands.candidates, scorer, cfg.mining, lm_snapshot_id=manifest["snapshot_id"],
                         kg_snapshot_id=kg_snap, dry_run=dry_run or store is None, counts={**skips, **cands.counts})

    if not cands.candidates:  # nothing to score: no actors to start
        result = round_with(None)
    else:
        if os.environ.get("RAY_ADDRESS"):
            ray.init()
        else:
            ray.init(address="local", include_dashboard=False,
                     num_cpus=max(os.cpu_count() or 1, math.ceil(cfg.scoring.num_actors * cfg.scoring.num_cpus)))
        try:
            factory = extractor_factory(cfg.extractor, kg_export=cfg.kg_export)
            with ActorScorer(factory, cfg.scoring, version=version.version) as scorer:
                start = time.perf_counter()
                result = round_with(scorer)
                took = time.perf_counter() - start
            print(f"scored {len(cands.candidates)} candidates in {took:.1f} s ({len(cands.candidates) / took:.1f}/s) "
                  f"on {cfg.scoring.num_actors} actors")
        finally:
            ray.shutdown()
    print(summary(result))
    if dry_run:
        print(f"dry run: {len(result.mined)} new triples not written")
    elif result.created:
        print(f"KG store {cfg.store}: version {result.version} ({len(result.mined)} mined triples)")
    else:
        print(f"nothing new: KG store {cfg.store} stays at version {version.version}")
    return 0


def main() -> None:
    parser = job_parser(__doc__)
    parser.add_argument("--dry-run", action="store_true", help="score and print, write nothing")
    args, cfg = parse_job_config(parser, MineJobConfig)
    run_main(lambda: mine(cfg, args.dry_run), args.debug)


if __name__ == "__main__":
    main()
