"""KG-side demo on embedded data: load a KG, version it, train TransE, evaluate, commit mined triples.

    python jobs/kg_demo.py [--config FILE] [--set train.epochs=5 --set data.dataset=nations ...]

The run directory (any fsspec URL) holds a versioned KG store: version 0 is the gold KG; each run
appends the model's most confident new link predictions as a *mined* version with provenance.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import dataclass, field

import torch

from bikd.config import add_config_args, config_from_args, dump_yaml
from bikd.eval import EvalConfig, evaluate
from bikd.kg.datasets import DataConfig, load_from_config
from bikd.kg.store import KGStore, MinedTriple, Provenance
from bikd.kge.losses import LossConfig
from bikd.kge.models import ModelConfig
from bikd.kge.training import KGETrainConfig, LocalTrainer
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

    def __post_init__(self):
        if self.num_mined < 0:
            raise ValueError(f"num_mined must be >= 0, got {self.num_mined}")


def mine(model, kg, known: set[tuple[int, int, int]], num: int, top_k: int = 5) -> list[tuple[int, int, int, float]]:
    """The model's most confident new (h, r, t) among the top-k tails of each test query, with the softmax
    probability of t among all entities as confidence; triples already in the KG (gold or mined) and
    self-loops (TransE's trivial guess) are skipped."""
    h, r = kg.test[:, 0], kg.test[:, 1]
    with torch.no_grad():
        conf, tails = model.score_t(h, r).softmax(dim=1).topk(min(top_k, kg.num_entities), dim=1)
    found: dict[tuple[int, int, int], float] = {}
    for flat in conf.flatten().argsort(descending=True).tolist():
        q, k = divmod(flat, conf.shape[1])
        triple = (int(h[q]), int(r[q]), int(tails[q, k]))
        if triple[0] != triple[2] and triple not in known and triple not in found:
            found[triple] = float(conf[q, k])
            if len(found) == num:
                break
    return [(*t, c) for t, c in found.items()]


def main() -> None:
    cfg = config_from_args(DemoConfig, add_config_args(argparse.ArgumentParser(description=__doc__)).parse_args())
    print(dump_yaml(cfg))
    kg = load_from_config(cfg.data)
    print(kg.summary())

    storage = Storage(cfg.run_dir)
    if storage.exists("kg/manifests"):
        store = KGStore(storage.child("kg"))
    else:
        gold = {s: kg.label_triples(s) for s in ("train", "valid", "test")}
        store = KGStore.create(storage.child("kg"), entities=kg.entities.labels, relations=kg.relations.labels, gold=gold)
    print(f"KG store at {storage.url_of('kg')}: head version {store.head}")

    trainer = LocalTrainer(kg.train, kg.num_entities, kg.num_relations, cfg.train)
    model = trainer.model
    known = kg.all_triples()
    for epoch in range(1, cfg.train.epochs + 1):
        start = time.perf_counter()
        loss = trainer.train_epoch()
        rate = len(kg.train) / (time.perf_counter() - start)
        line = f"epoch {epoch:3d}  loss {loss:.4f}  {rate:,.0f} triples/s"
        if epoch % 5 == 0 or epoch == cfg.train.epochs:
            line += f"  valid MRR {evaluate(model, kg.valid, [known], kg.num_relations, cfg.eval).mrr:.4f}"
        print(line, flush=True)

    metrics = evaluate(model, kg.test, [known], kg.num_relations, cfg.eval).metrics()
    print("test (filtered, realistic): " + "  ".join(f"{k} {metrics[f'both.{k}']:.4f}" for k in ("mrr", "hits_at_1", "hits_at_3", "hits_at_10")))

    snapshot = hashlib.sha256(model.entity.detach().numpy().tobytes()).hexdigest()[:16]
    e, rl = kg.entities.labels, kg.relations.labels
    ids, _ = store.read().mined_arrays(kg.entities.to_id, kg.relations.to_id)
    known_set = set(map(tuple, known.tolist())) | set(map(tuple, ids.tolist()))
    mined = [
        MinedTriple(e[h], rl[r], e[t], Provenance("kge-demo-link-prediction", store.head, conf, snapshot, f"{cfg.train.model.name} top-k tail for a test query"))
        for h, r, t, conf in mine(model, kg, known_set, cfg.num_mined)
    ]
    version = store.commit(mined, message=f"demo run: {len(mined)} top-k link predictions of {cfg.train.model.name} {snapshot}")
    storage.write_text(f"metrics-v{version}.json", json.dumps({"test": metrics, "kg_version": version}, indent=2))
    for v in store.versions():
        print(f"  KG v{v.version}: {v.kind:8s} +{v.num_mined_added:3d} mined (total {v.num_mined})  {v.message}")
    for m in mined[:3]:
        print(f"  mined: {m.head} --{m.relation}--> {m.tail}  confidence {m.provenance.confidence:.3f}")


if __name__ == "__main__":
    main()
