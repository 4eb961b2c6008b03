"""Fine-tune the knowledge-fused LM with Ray Train + DeepSpeed ZeRO, evaluate it and export it.

    python jobs/lm_train.py --config configs/lm_umls.yaml [--set deepspeed.zero_stage=3 --set train.steps=50 ...]

Default: triple classification on UMLS (embedded data) with the packaged MiniLM; the KG teacher is trained
in-process unless ``kg.export`` names a bikd.kge.export folder (e.g. runs/kge_umls/export from
jobs/kge_train.py). ``task.name=qa`` fine-tunes extractive QA on a by-article split of SQuAD v1.1 dev.
Joins the cluster at $RAY_ADDRESS, else starts a local Ray. Rank 0 logs every report as it happens; at the end
the job prints the history (total, task and KD losses; eval metrics), the final eval metric and the export
path, and writes <storage_path>/<name>/metrics.json. Running it again with the same ``name`` and
``storage_path`` resumes from the latest checkpoint (e.g. with a larger ``train.steps``).
"""

from __future__ import annotations

import argparse
import json
import math
import os

import ray

from bikd.config import add_config_args, config_from_args, dump_yaml, to_dict
from bikd.ray.lm_train import LMJobConfig, run, validate
from bikd.storage import Storage


def start_ray(cfg: LMJobConfig) -> None:
    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # joins that cluster, with its own resources
    else:
        # address="local": a new instance, never a cluster some earlier `ray start` left running here
        need = math.ceil(cfg.num_workers * cfg.cpus_per_worker)
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, need))


def line(row: dict) -> str:
    text = (f"step {row['step']:5d}  epoch {row['epoch']:5.2f}  loss {row['loss']:.4f}  task {row['task_loss']:.4f}  "
            f"kd_entity {row['kd_entity_loss']:.4f}  kd_relation {row['kd_relation_loss']:.4f}  lr {row['lr']:.2e}")
    evals = {k: v for k, v in row.items() if k.startswith("eval_") and not k.startswith("eval_num")}
    return text + "".join(f"  {k} {v:.4f}" for k, v in evals.items())


def main() -> None:
    parser = add_config_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    try:
        cfg = validate(config_from_args(LMJobConfig, parser.parse_args()))
    except (ValueError, FileNotFoundError) as e:  # before any work: no Ray, no run folder
        parser.error(str(e))
    print(dump_yaml(cfg), flush=True)
    start_ray(cfg)
    try:
        result = run(cfg)
    except ValueError as e:  # the cluster lacks the resources: still before any worker started
        parser.error(str(e))
    finally:
        ray.shutdown()

    out, final = result.return_value, result.metrics
    if out["resumed_from_step"] is not None:
        print(f"resumed from the checkpoint of step {out['resumed_from_step']}")
    for row in out["history"]:
        print(line(row))
    if cfg.task.name == "triple_cls":
        print(f"eval (triple classification, {cfg.data.dataset} {cfg.task.eval_split} triples + as many corruptions, "
              f"{final['eval_num_examples']} rows): accuracy {final['eval_accuracy']:.4f}")
    else:
        print(f"eval (SQuAD v1.1 dev split by article, {final['eval_num_questions']} held-out questions): "
              f"exact_match {final['eval_exact_match']:.2f}  f1 {final['eval_f1']:.2f}")
    print(f"export: {out['export']}")
    storage = Storage(cfg.storage_path, cfg.storage_options)
    storage.write_text(f"{cfg.name}/metrics.json", json.dumps({"config": to_dict(cfg), **out, "final": final}, indent=2))
    print(f"metrics: {storage.url_of(f'{cfg.name}/metrics.json')}")


if __name__ == "__main__":
    main()
