"""KG-side demo on embedded data: load a KG, version it, train TransE, evaluate, commit mined triples.

    python jobs/kg_demo.py [--config FILE] [--set train.epochs=5 --set data.dataset=nations ...]

The run directory (any fsspec URL) holds a versioned KG store: version 0 is the gold KG; each run
appends the model's most confident new link predictions (at least ``min_confidence``) as a *mined* version
with provenance. The directory records the dataset and model it was made with and refuses another
(``--set run_dir=...`` picks a new one). Ctrl-C or SIGTERM stops after the current step with a checkpoint;
the same command resumes from it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch

from bikd.cli import GracefulStop, job_parser, parse_job_config, run_main, set_num_threads
from bikd.config import dump_yaml, to_dict
from bikd.eval import EvalConfig, evaluate
from bikd.kg.datasets import DataConfig, load_from_config
from bikd.kg.store import KGStore, MinedTriple, Provenance
from bikd.kge.loop import LocalEpochs, LoopConfig, train_epochs
from bikd.kge.losses import LossConfig
from bikd.kge.models import ModelConfig
from bikd.kge.training import KGETrainConfig, LocalTrainer
from bikd.runs import RunDir
from bikd.storage import Storage


@dataclass(kw_only=True, frozen=True)
class DemoConfig:
    data: DataConfig = field(default_factory=DataConfig)
    # ComplEx with the self-adversarial loss: valid MRR about 0.9 on UMLS in a few seconds (configs/kge_umls.yaml)
    train: KGETrainConfig = field(default_factory=lambda: KGETrainConfig(
        model=ModelConfig(name="complex", dim=64), loss=LossConfig(name="self_adversarial", margin=0.0),
        batch_size=256, epochs=20))
    eval: EvalConfig = field(default_factory=EvalConfig)
    run_dir: str = "runs/kg_demo"
    num_mined: int = 20
    #: mined triples below this confidence (softmax probability of the tail) are never committed. On UMLS the
    #: 20-epoch default model's top 20 are 0.13-0.05, a 1-epoch model's best 0.048, an untrained one's 0.008
    min_confidence: float = 0.05
    #: torch threads; null: the CPUs this process may run on
    num_threads: int | None = None

    def __post_init__(self):
        if self.num_mined < 0:
            raise ValueError(f"num_mined must be >= 0, got {self.num_mined}")
        if not 0 < self.min_confidence <= 1:
            raise ValueError(f"min_confidence must be in (0, 1], got {self.min_confidence}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or null, got {self.num_threads}")


def mine(model, kg, known: set[tuple[int, int, int]], cfg: DemoConfig, top_k: int = 5) -> list[tuple[int, int, int, float]]:
    """The model's most confident new (h, r, t) among the top-k tails of each test query, none below
    ``cfg.min_confidence``; confidence is the softmax probability of t among all entities (a sigmoid of the
    score was no use: an undertrained model is the surer of the two). Triples already in the KG (gold or
    mined) and self-loops (TransE's trivial guess) are skipped."""
    h, r = kg.test[:, 0], kg.test[:, 1]
    with torch.no_grad():
        conf, tails = model.score_t(h, r).softmax(dim=1).topk(min(top_k, kg.num_entities), dim=1)
    found: dict[tuple[int, int, int], float] = {}
    for flat in conf.flatten().argsort(descending=True).tolist():
        q, k = divmod(flat, conf.shape[1])
        if conf[q, k] < cfg.min_confidence:
            break
        triple = (int(h[q]), int(r[q]), int(tails[q, k]))
        if triple[0] != triple[2] and triple not in known and triple not in found:
            found[triple] = float(conf[q, k])
            if len(found) == cfg.num_mined:
                break
    return [(*t, c) for t, c in found.items()]


def demo(cfg: DemoConfig) -> int:
    print(dump_yaml(cfg))
    storage = Storage(cfg.run_dir)
    run = RunDir(storage, {"job": "kg_demo", "dataset": cfg.data.name, "data": cfg.data.source,
                           "model": to_dict(cfg.train.model), "backend": "local"},
                 choose="choose another one with --set run_dir=...")
    run.check()  # another dataset's or model's directory is refused before any work
    print(f"torch threads: {set_num_threads(cfg.num_threads)}")
    kg = load_from_config(cfg.data)
    print(kg.summary())
    run.claim(to_dict(cfg))
    if storage.exists("kg/manifests"):
        store = KGStore(storage.child("kg"))
    else:
        gold = {s: kg.label_triples(s) for s in ("train", "valid", "test")}
        store = KGStore.create(storage.child("kg"), entities=kg.entities.labels, relations=kg.relations.labels, gold=gold)
    print(f"KG store at {storage.url_of('kg')}: head version {store.head}")

    trainer = LocalEpochs(LocalTrainer(kg.train, kg.num_entities, kg.num_relations, cfg.train))
    known = kg.all_triples()
    loop = LoopConfig(epochs=cfg.train.epochs, eval_every=5)
    with GracefulStop(trainer.unit) as stop:
        result = train_epochs(trainer, run, loop, lambda m: evaluate(m, kg.valid, [known], kg.num_relations, cfg.eval).mrr,
                              lambda: stop.signal, log=lambda line: print(line, flush=True))
    if result.stopped_by is not None:
        print("run the same command again to resume from it")
        return 128 + result.stopped_by
    model = trainer.model()
    metrics = evaluate(model, kg.test, [known], kg.num_relations, cfg.eval).metrics()
    print("test (filtered, realistic): " + "  ".join(f"{k} {metrics[f'both.{k}']:.4f}" for k in ("mrr", "hits_at_1", "hits_at_3", "hits_at_10")))

    snapshot = hashlib.sha256(model.entity.detach().numpy().tobytes()).hexdigest()[:16]
    e, rl = kg.entities.labels, kg.relations.labels
    ids, _ = store.read().mined_arrays(kg.entities.to_id, kg.relations.to_id)
    known_set = set(map(tuple, known.tolist())) | set(map(tuple, ids.tolist()))
    mined = [
        MinedTriple(e[h], rl[r], e[t], Provenance("kge-demo-link-prediction", store.head, conf, snapshot, f"{cfg.train.model.name} top-k tail for a test query"))
        for h, r, t, conf in mine(model, kg, known_set, cfg)
    ]
    if mined:
        version = store.commit(mined, message=f"demo run: {len(mined)} top-k link predictions of {cfg.train.model.name} {snapshot}")
    else:
        version = store.head
        print(f"nothing reached min_confidence {cfg.min_confidence}: no KG version committed")
    storage.write_text(f"metrics-v{version}.json", json.dumps({"test": metrics, "kg_version": version, "data": kg.load_counts(),
                                                               "epochs": result.history}, indent=2))
    run.clear_progress()  # this run is done and committed: the next one trains afresh and appends another version
    storage.delete("checkpoints", recursive=True)
    for v in store.versions():
        print(f"  KG v{v.version}: {v.kind:8s} +{v.num_mined_added:3d} mined (total {v.num_mined})  {v.message}")
    for m in mined[:3]:
        print(f"  mined: {m.head} --{m.relation}--> {m.tail}  confidence {m.provenance.confidence:.3f}")
    return 0


def main() -> None:
    parser = job_parser(__doc__)
    args, cfg = parse_job_config(parser, DemoConfig)
    run_main(lambda: demo(cfg), args.debug)


if __name__ == "__main__":
    main()
