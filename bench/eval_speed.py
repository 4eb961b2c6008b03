"""Full filtered evaluation of FB15k-237 test (head and tail side), PyKEEN's RankBasedEvaluator vs bikd's.

Both evaluate the same 200-dimensional TransE (L2), trained briefly with PyKEEN so that the ranks are not
those of a random model, on the same triples and filter (train + valid + test), in one process.
PyKEEN is given the fastest of a few batch sizes (calibrated on a slice of the test set) and timed once;
bikd is timed cold (first call, including the one-off torch.compile of the rank counter) and then warm
(median of three). The bound is the matrix-product arithmetic at this machine's measured GEMM rate.

    python bench/eval_speed.py [--data-dir ../shared/data/fb15k-237] [--limit N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import DATA_DIR, gemm_gflops, add_common_args, start_run  # noqa: E402
from bikd.eval import EvalConfig, evaluate  # noqa: E402
from bikd.kg.datasets import load_dataset  # noqa: E402
from bikd.kge.models import TransE  # noqa: E402


def train_pykeen_transe(d, dim: int, epochs: int, seed: int):
    from pykeen.models import TransE as PyKEENTransE
    from pykeen.training import SLCWATrainingLoop
    from pykeen.triples import TriplesFactory

    tf = TriplesFactory(d.train, entity_to_id=dict(d.entities.to_id), relation_to_id=dict(d.relations.to_id))
    model = PyKEENTransE(triples_factory=tf, embedding_dim=dim, scoring_fct_norm=2, random_seed=seed)
    if epochs:
        loop = SLCWATrainingLoop(model=model, triples_factory=tf, optimizer="Adam", optimizer_kwargs={"lr": 1e-3})
        loop.train(triples_factory=tf, num_epochs=epochs, batch_size=1024, use_tqdm=False)
    return model


def pykeen_eval(model, d, test, batch_size):
    from pykeen.evaluation import RankBasedEvaluator

    t = time.perf_counter()
    result = RankBasedEvaluator().evaluate(
        model, test, additional_filter_triples=[d.train, d.valid, d.test], batch_size=batch_size, use_tqdm=False
    )
    return time.perf_counter() - t, result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=str(DATA_DIR / "fb15k-237"))
    p.add_argument("--dim", type=int, default=200)
    p.add_argument("--train-epochs", type=int, default=2)
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N test triples (smoke run)")
    p.add_argument("--seed", type=int, default=0)
    add_common_args(p)
    args = p.parse_args()
    run = start_run("eval_speed", args)

    d = load_dataset("fb15k237", path=args.data_dir)
    test = d.test[: args.limit] if args.limit else d.test
    print(d.summary(), f"| evaluating {len(test)} test triples, both sides", flush=True)
    gflops = gemm_gflops()
    print(f"GEMM rate here: {gflops:.0f} GFLOP/s", flush=True)

    t = time.perf_counter()
    pk_model = train_pykeen_transe(d, args.dim, args.train_epochs, args.seed)
    print(f"trained PyKEEN TransE for {args.train_epochs} epochs in {time.perf_counter() - t:.0f} s", flush=True)

    calib = test[:256]
    calib_times = {bs: pykeen_eval(pk_model, d, calib, bs)[0] for bs in (8, 16, 32, 128)}
    pk_batch = min(calib_times, key=calib_times.get)
    print(f"PyKEEN calibration (256 triples): { {k: round(v, 2) for k, v in calib_times.items()} } -> batch {pk_batch}", flush=True)
    pk_seconds, pk_result = pykeen_eval(pk_model, d, test, pk_batch)
    print(f"PyKEEN RankBasedEvaluator: {pk_seconds:.1f} s", flush=True)

    model = TransE(d.num_entities, d.num_relations, args.dim, p=2)
    with torch.no_grad():
        model.entity.copy_(pk_model.entity_representations[0](indices=None))
        model.relation.copy_(pk_model.relation_representations[0](indices=None))
    cfg = EvalConfig()
    times, results = [], []
    for _ in range(4):
        t = time.perf_counter()
        results.append(evaluate(model, test, [d.train, d.valid, d.test], d.num_relations, cfg))
        times.append(time.perf_counter() - t)
    cold, warm = times[0], statistics.median(times[1:])
    ours = results[-1].metrics()
    print(f"bikd: cold {cold:.2f} s, warm median {warm:.2f} s ({[round(x, 2) for x in times[1:]]})", flush=True)

    diffs = {}
    for side in ("head", "tail", "both"):
        for ours_name, pk_name in (("mrr", "inverse_harmonic_mean_rank"), ("hits_at_10", "hits_at_10"), ("mean_rank", "arithmetic_mean_rank")):
            theirs = float(pk_result.get_metric(f"{side}.realistic.{pk_name}"))
            diffs[f"{side}.{ours_name}"] = (ours[f"{side}.{ours_name}"], theirs, abs(ours[f"{side}.{ours_name}"] - theirs))
    for k, (a, b, diff) in diffs.items():
        print(f"  {k:18s} bikd {a:.6f}  pykeen {b:.6f}  |diff| {diff:.2e}")

    flop = 2 * 2 * len(test) * d.num_entities * args.dim  # two sides, one multiply-add per entity and dim
    bound = flop / (gflops * 1e9)
    metrics = {
        "speedup_vs_pykeen": pk_seconds / warm,
        "speedup_vs_pykeen_cold": pk_seconds / cold,
        "mrr_abs_diff": diffs["both.mrr"][2],
        "hits_at_10_abs_diff": diffs["both.hits_at_10"][2],
        "mean_rank_abs_diff": diffs["both.mean_rank"][2],
        "bikd_seconds": warm,
        "bikd_seconds_cold": cold,
        "pykeen_seconds": pk_seconds,
        "mrr": ours["both.mrr"],
        "gemm_gflops": gflops,
        "matmul_bound_seconds": bound,
        "fraction_of_matmul_bound": bound / warm,
        "num_queries": 2 * len(test),
        "num_entities": d.num_entities,
    }
    details = {
        "pykeen_batch_size": pk_batch,
        "pykeen_calibration_seconds": calib_times,
        "bikd_batch_size": cfg.batch_size,
        "bikd_warm_seconds": times[1:],
        "model": f"TransE L2 dim {args.dim}, {args.train_epochs} PyKEEN sLCWA epochs, seed {args.seed}",
        "filter": "train + valid + test",
        "per_metric": {k: {"bikd": a, "pykeen": b} for k, (a, b, _) in diffs.items()},
    }
    path = run.write(metrics, details, suffix="" if not args.limit else "_smoke")
    print(f"speedup {metrics['speedup_vs_pykeen']:.1f}x (cold {metrics['speedup_vs_pykeen_cold']:.1f}x), "
          f"{100 * metrics['fraction_of_matmul_bound']:.0f}% of the GEMM bound -> {path}")


if __name__ == "__main__":
    main()
