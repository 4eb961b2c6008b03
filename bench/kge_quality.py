"""Link-prediction quality on FB15k-237 (filtered test MRR / Hits@k, 3 seeds) and time to TransE MRR 0.30.

Two parts, run on whatever machine is at hand and merged into ``bench/results/kge_quality.json``:

- ``--part quality``: for each model, the candidate recipes below are trained on seed 0 and the one with
  the best *validation* MRR is then trained on the other seeds. On a GPU: Lacroix et al. 2018's 1vsAll +
  reciprocal relations + N3 + Adagrad (and, for the distance models, a logit scale or negative
  sampling); on CPU cores, where 1vsAll takes minutes an epoch, negative sampling only. Every run trains until ``--max-epochs``, ``--run-seconds`` of training or ``--patience``
  validations without improvement, validating every ``--eval-every`` epochs on a fixed 2,000-triple
  subset of the validation set, and the best-validation state is evaluated once on the full test set.
  The test set chooses nothing. Meant for a GPU (1vsAll over 14,505 entities is ~10 TFLOP per epoch).
- ``--part time``: TransE on this machine's CPU cores with the negative-sampling recipe: the training
  minutes (validation time excluded) until the validation-subset MRR first reaches 0.30, and the test
  MRR of that state.

    python bench/kge_quality.py --part quality --device cuda --out-dir /tmp/out   # then --merge
    python bench/kge_quality.py --part time
    python bench/kge_quality.py --merge bench/results/kge_quality_quality.json bench/results/kge_quality_time.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import DATA_DIR, add_common_args, start_run  # noqa: E402
from bikd.eval import evaluate  # noqa: E402
from bikd.eval.ranking import EvalConfig  # noqa: E402
from bikd.kg.datasets import load_dataset  # noqa: E402
from bikd.kge.losses import LossConfig, RegularizerConfig  # noqa: E402
from bikd.kge.models import ModelConfig  # noqa: E402
from bikd.kge.one_vs_all import OneVsAllConfig, OneVsAllTrainer  # noqa: E402
from bikd.kge.optim import SparseOptimConfig  # noqa: E402
from bikd.kge.sampling import NegativeSamplerConfig  # noqa: E402
from bikd.kge.training import KGETrainConfig, LocalTrainer  # noqa: E402


def n3(weight: float, is_complex: bool = False) -> RegularizerConfig:
    return RegularizerConfig(name="n3", weight=weight, is_complex=is_complex)


def neg_sampling(name: str, dim: int, gamma: float, lr: float, reg: RegularizerConfig | None = None,
                 **model: object) -> KGETrainConfig:
    """DGL-KE / RotatE-style training: 256 shared uniform negatives per chunk of 256 positives, self-adversarial
    loss (alpha 1), row-wise Adagrad, batches of 1024."""
    return KGETrainConfig(model=ModelConfig(name=name, dim=dim, p=2, **model),
                          sampler=NegativeSamplerConfig(num_negatives=256, chunk_size=256),
                          loss=LossConfig(name="self_adversarial", margin=gamma, adversarial_temperature=1.0),
                          regularizer=reg or RegularizerConfig(),
                          optimizer=SparseOptimConfig(name="rowwise_adagrad", lr=lr), batch_size=1024, epochs=1000)


#: model -> candidate recipes (name -> config), for a GPU: 1vsAll over all entities (~10 TFLOP an epoch)
RECIPES_GPU: dict[str, dict[str, OneVsAllConfig | KGETrainConfig]] = {
    "transe": {
        "1vsall_d200_s10": OneVsAllConfig(model=ModelConfig(name="transe", dim=200, p=2), lr=0.1, batch_size=500, logit_scale=10.0),
        "negsamp_d200_free_g6": neg_sampling("transe", 200, 6.0, 0.2, normalize_entities=False, init_scale=0.04),
    },
    "distmult": {
        "1vsall_d500_n3_5e-2": OneVsAllConfig(model=ModelConfig(name="distmult", dim=500), lr=0.1, batch_size=500, regularizer=n3(5e-2)),
        "1vsall_d500_n3_1e-2": OneVsAllConfig(model=ModelConfig(name="distmult", dim=500), lr=0.1, batch_size=500, regularizer=n3(1e-2)),
    },
    "complex": {
        "1vsall_d500_n3_5e-2": OneVsAllConfig(model=ModelConfig(name="complex", dim=500), lr=0.1, batch_size=500, regularizer=n3(5e-2, True)),
        "1vsall_d500_n3_1e-2": OneVsAllConfig(model=ModelConfig(name="complex", dim=500), lr=0.1, batch_size=500, regularizer=n3(1e-2, True)),
    },
    "rotate": {
        "1vsall_d500_s1": OneVsAllConfig(model=ModelConfig(name="rotate", dim=500), lr=0.1, batch_size=500, logit_scale=1.0),
        "1vsall_d500_s5": OneVsAllConfig(model=ModelConfig(name="rotate", dim=500), lr=0.1, batch_size=500, logit_scale=5.0),
    },
}
#: for 2 CPU cores: negative sampling, 200 real coordinates per entity for every model. Picked from
#: 4-12-epoch runs scored on 1,000 validation triples (gamma 0-12, lr 0.03-0.2, Adagrad/Adam, N3 or none;
#: TransE with unit-norm entities plateaued at valid MRR 0.20 whatever the settings, with free entity
#: norms and DGL-KE's init (+-(gamma + 2) / d) it passed 0.30)
RECIPES_CPU: dict[str, dict[str, KGETrainConfig]] = {
    "transe": {"negsamp_d200_free_g6": neg_sampling("transe", 200, 6.0, 0.2, normalize_entities=False, init_scale=0.04)},
    "distmult": {"negsamp_d200_n3": neg_sampling("distmult", 200, 0.0, 0.1, n3(1e-3))},
    "complex": {"negsamp_d100_n3": neg_sampling("complex", 100, 0.0, 0.1, n3(1e-3, True))},
    "rotate": {"negsamp_d100_g6": neg_sampling("rotate", 100, 6.0, 0.1)},
}
#: the CPU timing recipe
TIME_RECIPE = RECIPES_CPU["transe"]["negsamp_d200_free_g6"]


class Run:
    """One trainer behind a common face: ``epoch()`` trains one epoch, ``model()`` is what the evaluator takes."""

    def __init__(self, kg, cfg, seed: int, device: str):
        cfg = dataclasses.replace(cfg, seed=seed)
        if isinstance(cfg, OneVsAllConfig):
            self.trainer = OneVsAllTrainer(kg.train, kg.num_entities, kg.num_relations, cfg, device)
            self.model = self.trainer.eval_model
            self.epoch = self.trainer.train_epoch
        else:
            self.trainer = LocalTrainer(kg.train, kg.num_entities, kg.num_relations, cfg, device)
            self.model = lambda: self.trainer.model
            self.epoch = self.trainer.train_epoch

    def tables(self) -> dict:
        return {k: v.detach().clone() for k, v in self.trainer.model.state_dict().items()}

    def load(self, tables: dict) -> None:
        self.trainer.model.load_state_dict(tables)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_to_best(kg, valid, cfg, seed: int, args, target: float | None = None) -> dict:
    """Train one run; returns its validation curve, the best state's test metrics and, with ``target``,
    the training seconds until the validation MRR first reached it (and the test metrics of that state)."""
    run = Run(kg, cfg, seed, args.device)
    known = [kg.all_triples()]
    ecfg = EvalConfig(batch_size=args.eval_batch_size, compile="never")
    curve, best, best_tables, train_s, waited, reached = [], -1.0, None, 0.0, 0, None
    for epoch in range(1, args.max_epochs + 1):
        sync(args.device)
        t = time.perf_counter()
        run.epoch()
        sync(args.device)
        train_s += time.perf_counter() - t
        if epoch % args.eval_every and train_s < args.run_seconds and epoch < args.max_epochs:
            continue
        mrr = evaluate(run.model(), valid, known, kg.num_relations, ecfg).mrr
        curve.append({"epoch": epoch, "train_seconds": round(train_s, 2), "valid_mrr": round(mrr, 4)})
        print(f"  seed {seed} epoch {epoch:3d}  train {train_s:7.1f} s  valid MRR {mrr:.4f}", flush=True)
        if target is not None and reached is None and mrr >= target:
            test = evaluate(run.model(), kg.test, known, kg.num_relations, ecfg).metrics()
            reached = {"train_seconds": train_s, "epoch": epoch, "valid_mrr": mrr, "test_mrr": test["both.mrr"]}
            break
        if mrr > best:
            best, best_tables, waited = mrr, run.tables(), 0
        else:
            waited += 1
        if waited >= args.patience or train_s >= args.run_seconds:
            break
    out = {"seed": seed, "curve": curve, "train_seconds": train_s, "reached": reached}
    if target is None:
        run.load(best_tables)
        test = evaluate(run.model(), kg.test, known, kg.num_relations, ecfg).metrics()
        out.update(best_valid_mrr=best, test={k.removeprefix("both."): v for k, v in test.items() if k.startswith("both.")})
    return out


def valid_subset(kg, n: int = 2000) -> torch.Tensor:
    pick = torch.randperm(len(kg.valid), generator=torch.Generator().manual_seed(0))[:n]
    return kg.valid[pick.sort().values]


def part_quality(kg, args) -> tuple[dict, dict]:
    torch.set_num_threads(args.threads)
    valid, metrics, details = valid_subset(kg), {}, {}
    recipes = RECIPES_GPU if args.device.startswith("cuda") else RECIPES_CPU
    for name in args.models.split(","):
        print(f"{name}:", flush=True)
        trials = {}
        for recipe, cfg in recipes[name].items():
            print(f" recipe {recipe}", flush=True)
            try:
                trials[recipe] = train_to_best(kg, valid, cfg, 0, args)
            except Exception as e:  # a recipe that fails is reported, not fatal to the others
                print(f"  recipe {recipe} failed: {e!r}", flush=True)
                trials[recipe] = {"error": repr(e), "best_valid_mrr": -1.0}
        chosen = max(trials, key=lambda r: trials[r]["best_valid_mrr"])
        runs = [trials[chosen]] + [train_to_best(kg, valid, recipes[name][chosen], s, args) for s in args.seeds[1:]]
        mrrs = [r["test"]["mrr"] for r in runs]
        metrics[f"mrr_{name}"] = statistics.mean(mrrs)
        metrics[f"mrr_{name}_std"] = statistics.stdev(mrrs) if len(mrrs) > 1 else 0.0
        for k in ("hits_at_1", "hits_at_3", "hits_at_10"):
            metrics[f"{k}_{name}"] = statistics.mean(r["test"][k] for r in runs)
        details[name] = {"chosen_recipe": chosen, "recipe": repr(recipes[name][chosen]),
                         "seed0_valid_mrr_by_recipe": {r: t["best_valid_mrr"] for r, t in trials.items()},
                         "runs": runs, "rejected": {r: t for r, t in trials.items() if r != chosen}}
        print(f"{name}: recipe {chosen}, test MRR {mrrs}", flush=True)
    return metrics, details


def part_time(kg, args) -> tuple[dict, dict]:
    torch.set_num_threads(args.threads)
    run = train_to_best(kg, valid_subset(kg), TIME_RECIPE, 0, args, target=0.30)
    reached = run["reached"]
    metrics = {"minutes_to_transe_mrr_030": reached["train_seconds"] / 60 if reached else float("inf"),
               "transe_test_mrr_at_030": reached["test_mrr"] if reached else float("nan")}
    return metrics, {"recipe": repr(TIME_RECIPE), "threads": args.threads, "run": run}


def merge(run, paths: list[str]) -> Path:
    """One JSON from part JSONs. Its commit is the parts' commit (the code that produced the numbers) when
    they all ran at one; else this merge's own, and each part's stays in its ``details`` entry."""
    records = [json.loads(Path(p).read_text()) for p in paths]
    metrics = {k: v for r in records for k, v in r["metrics"].items()}
    keep = ("machine", "commit", "allow_dirty", "date", "date_end", "args", "loadavg_start", "loadavg_end")
    details = {r["details"].get("part", str(i)): {k: r[k] for k in keep if k in r} | r["details"]
               for i, r in enumerate(records)}
    commits = {r["commit"] for r in records}
    if len(commits) == 1:
        run.commit = commits.pop()
    else:
        print(f"parts ran at different commits {sorted(commits)}: the merged result names this merge's "
              f"{run.commit}", flush=True)
    return run.write(metrics, details)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["quality", "time"])
    p.add_argument("--merge", nargs="+", help="combine part results into bench/results/kge_quality.json")
    p.add_argument("--data-dir", default=str(DATA_DIR / "fb15k-237"))
    p.add_argument("--dataset", default="fb15k237", help="a dataset name (e.g. umls for a smoke run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default="transe,distmult,complex,rotate")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--max-epochs", type=int, default=200)
    p.add_argument("--run-seconds", type=float, default=100.0, help="training time box of one run")
    p.add_argument("--eval-every", type=int, default=2)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--eval-batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 where other work shares the cores: "
                   "OpenMP threads that wait on a busy core slow down many-fold)")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--tag", default="", help="added to the result file's name (parallel runs of parts)")
    add_common_args(p)
    args = p.parse_args()
    run = start_run("kge_quality", args)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if args.merge:
        print(merge(run, args.merge))
        return
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # the GEMMs of 1vsAll; evaluation ranks are unaffected in practice
    kg = load_dataset(args.dataset, path=args.data_dir if args.dataset == "fb15k237" else None)
    start = time.time()
    metrics, details = (part_quality if args.part == "quality" else part_time)(kg, args)
    details.update(part=args.part + (f"_{args.tag}" if args.tag else ""), device=args.device, wall_seconds=time.time() - start)
    print(run.write(metrics, details, suffix=f"_{args.part}" + (f"_{args.tag}" if args.tag else ""), out_dir=args.out_dir))
    print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
