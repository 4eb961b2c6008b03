"""KG-side demo on embedded data: load a KG, version it, train ComplEx, evaluate, export the embeddings.

    python jobs/kg_demo.py [--config FILE] [--set train.epochs=5 --set data.dataset=nations ...]

The run directory (any fsspec URL) holds a versioned KG store (``kg/``, version 0 = the gold KG) and the
trained embeddings (``export/``, a bikd.kge.export folder over the store's id map). The demo mines nothing:
mining reads text with a relation extractor and runs in jobs/mine.py, which takes this store and export
(the KG model's own predictions were once committed here, chosen from the test queries: that read the
test split to choose what to add). The directory records the dataset and model it was made with and
refuses another (``--set run_dir=...`` picks a new one). Ctrl-C or SIGTERM stops after the current step
with a checkpoint; the same command resumes from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field


from bikd.cli import GracefulStop, job_parser, parse_job_config, run_main, set_num_threads
from bikd.config import dump_yaml, to_dict
from bikd.eval import EvalConfig, evaluate
from bikd.kg.datasets import DataConfig, load_from_config
from bikd.kg.store import KGStore
from bikd.kge.export import export_embeddings
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
    #: torch threads; null: the CPUs this process may run on
    num_threads: int | None = None

    def __post_init__(self):
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or null, got {self.num_threads}")


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

    version = store.head
    export_embeddings(storage, model.entity, model.relation, kg.entities.labels, kg.relations.labels, cfg.train.model,
                      prefix="export", extra={"dataset": kg.name, "kg_version": version, "test": metrics})
    storage.write_text("metrics.json", json.dumps({"test": metrics, "kg_version": version, "data": kg.load_counts(),
                                                   "epochs": result.history}, indent=2))
    run.clear_progress()  # this run is done: the next one trains afresh
    storage.delete("checkpoints", recursive=True)
    for v in store.versions():
        print(f"  KG v{v.version}: {v.kind:8s} +{v.num_mined_added:3d} mined (total {v.num_mined})  {v.message}")
    print(f"embeddings: {storage.url_of('export')}\n"
          f"mining (LM -> KG) runs in jobs/mine.py: --set store={storage.url_of('kg')} "
          f"--set kg_export={storage.url_of('export')} --set extractor=<an exported relation extractor>")
    return 0


def main() -> None:
    parser = job_parser(__doc__)
    args, cfg = parse_job_config(parser, DemoConfig)
    run_main(lambda: demo(cfg), args.debug)


if __name__ == "__main__":
    main()
