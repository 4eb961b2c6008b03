"""The bidirectional job: KG embeddings (sharded on Ray) and a fused LM (DeepSpeed under Ray Train) trained in
rounds that exchange embeddings (KG -> LM) and mined triples (LM -> KG), in one resumable run directory.

    python jobs/bikd_full.py                                   # the embedded default, a few rounds
    python jobs/bikd_full.py --directions kg2lm --set run_dir=runs/bikd_kg2lm
    python jobs/bikd_full.py --config my.yaml --set loop.rounds=10
    python jobs/bikd_full.py --preset fb15k237-squad           # the seed experiment: FB15k-237 + SQuAD, full size

``--directions none|kg2lm|both`` is the three-row ablation (each side alone / snapshots to the LM / both ways).
Rerunning with the same ``run_dir`` resumes after the last completed round; a finished run does nothing.
Per-round metrics go to ``<run_dir>/metrics.jsonl``. Joins the Ray cluster at $RAY_ADDRESS, else starts a
local one. See bikd/driver.py for one round's steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from pathlib import Path

import ray

from bikd.cli import job_parser, parse_job_config, run_main, set_num_threads
from bikd.config import dump_yaml
from bikd.driver import BikdConfig, Driver, required_cpus, validate

#: --preset NAME: a config file of the repository's configs/ folder
PRESETS = {"fb15k237-squad": Path(__file__).resolve().parents[1] / "configs" / "bikd_fb15k237_squad.yaml"}


def start_ray(cfg: BikdConfig) -> None:
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)
    else:  # every side's actors hold their CPUs for the whole run: reserve what they ask for
        need = math.ceil(sum(required_cpus(cfg).values()))
        ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=max(os.cpu_count() or 1, need))


def full(cfg: BikdConfig) -> int:
    print(dump_yaml(cfg))
    print(f"torch threads: {set_num_threads(cfg.num_threads)}")
    driver = Driver(cfg, log=lambda line: print(line, flush=True))  # the run directory, checked and claimed
    if (final := driver.finished) is not None:
        print(f"run {cfg.run_dir} finished after round {final['round']}; nothing to do")
    else:
        start_ray(cfg)
        try:
            validate(cfg)  # the resource split against the cluster, before any actor starts
            print("resources: " + ", ".join(f"{k} {v:g} CPUs" for k, v in required_cpus(cfg).items()), flush=True)
            final = driver.run()
        finally:
            ray.shutdown()
    test, lm_test = final.get("kg_test", {}), final.get("lm_test", {})
    print(f"done after round {final['round']} ({final['stopped_by']}); KG store version {final['kg_version']}; "
          f"KG test (filtered): " + ", ".join(f"{k} {v:.4f}" for k, v in test.items())
          + ("; LM test: " + ", ".join(f"{k} {v:.4f}" for k, v in lm_test.items() if isinstance(v, float)) if lm_test else ""))
    print(f"metrics: {cfg.run_dir}/metrics.jsonl")
    return 0


def main() -> None:
    parser = job_parser(__doc__)
    parser.add_argument("--directions", choices=("none", "kg2lm", "both"), help="which way knowledge flows")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a shipped config (instead of --config)")
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", choices=sorted(PRESETS))
    pre.add_argument("--config")
    known, _ = pre.parse_known_args()
    if known.preset and known.config:
        parser.error("--preset and --config: give one of them")
    if known.preset:
        parser.set_defaults(config=str(PRESETS[known.preset]))
    args, cfg = parse_job_config(parser, BikdConfig)
    if args.directions:
        cfg = dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, directions=args.directions))
    run_main(lambda: full(cfg), args.debug)


if __name__ == "__main__":
    main()
