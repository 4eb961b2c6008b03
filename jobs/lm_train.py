"""Fine-tune the knowledge-fused LM with Ray Train + DeepSpeed ZeRO, evaluate it and export it.

    python jobs/lm_train.py --config configs/lm_umls.yaml [--set deepspeed.zero_stage=3 --set train.steps=50 ...]

Default: triple classification on UMLS (embedded data) with the packaged MiniLM; the KG teacher is trained
in-process unless ``kg.export`` names a bikd.kge.export folder (e.g. runs/kge_umls/export from
jobs/kge_train.py). ``task.name=qa`` fine-tunes extractive QA on a by-article split of SQuAD v1.1 dev.
Joins the cluster at $RAY_ADDRESS, else starts a local Ray. Rank 0 logs every report as it happens; at the end
the job prints the history (total, task and KD losses; eval metrics), the final eval metric and the export
path, and writes <storage_path>/<name>/metrics.json. Running it again with the same ``name`` and
``storage_path`` resumes from the latest checkpoint (e.g. with a larger ``train.steps``) and keeps the whole
history; on a finished run with the same length it says so and changes nothing. The run folder records its
dataset, task and encoder and refuses a run with others (``--set name=...`` picks another folder).
"""

from __future__ import annotations

import json
import math
import os

import ray

from bikd.cli import job_parser, parse_job_config, run_main
from bikd.config import dump_yaml, to_dict
from bikd.ray.lm_train import LMJobConfig, run, validate
from bikd.runs import RunDir
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


def train(cfg: LMJobConfig) -> int:
    print(dump_yaml(cfg), flush=True)
    storage = Storage(cfg.storage_path, cfg.storage_options)
    folder = RunDir(storage.child(cfg.name), {"job": "lm_train", "dataset": cfg.data.name, "data": cfg.data.source,
                                              "task": cfg.task.name, "encoder": cfg.encoder.name_or_path},
                    choose="choose another run name with --set name=...")
    length = {"steps": cfg.train.steps, "epochs": cfg.train.epochs}
    done = folder.finished() if folder.check() else None  # another run's folder is refused before Ray starts
    if done and done.get("length") == length:
        print(f"{folder.url}: this run finished at step {done['step']}; its results are in "
              f"{storage.url_of(f'{cfg.name}/metrics.json')}. Nothing to do (raise train.steps to train on).")
        return 0
    folder.claim(to_dict(cfg))
    start_ray(cfg)
    try:
        result = run(cfg)
    finally:
        ray.shutdown()

    out, final = result.return_value, result.metrics
    if out["resumed_from_step"] is not None:
        print(f"resumed from the checkpoint of step {out['resumed_from_step']}")
    for row in out["history"]:
        print(line(row))
    if cfg.task.name == "triple_cls":
        print(f"eval (triple classification, {cfg.data.name} {cfg.task.eval_split} triples + as many corruptions, "
              f"{final['eval_num_examples']} rows): accuracy {final['eval_accuracy']:.4f}")
    else:
        print(f"eval (SQuAD v1.1 dev split by article, {final['eval_num_questions']} held-out questions): "
              f"exact_match {final['eval_exact_match']:.2f}  f1 {final['eval_f1']:.2f}")
    print(f"export: {out['export']}")
    storage.write_text(f"{cfg.name}/metrics.json", json.dumps({"config": to_dict(cfg), **out, "final": final}, indent=2))
    folder.mark_finished(step=final["step"], length=length)
    print(f"metrics: {storage.url_of(f'{cfg.name}/metrics.json')}")
    return 0


def main() -> None:
    parser = job_parser(__doc__)
    args, cfg = parse_job_config(parser, LMJobConfig, check=validate)
    run_main(lambda: train(cfg), args.debug)


if __name__ == "__main__":
    main()
