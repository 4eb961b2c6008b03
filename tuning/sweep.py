"""A Ray Tune sweep over the fusion and exchange hyperparameters: every trial is one jobs/bikd_full.py run (the
driver, in-process in the trial), reporting every round; ASHA stops bad trials at round milestones, Optuna
proposes the next points.

    python tuning/sweep.py                                     # 16 trials of the "fusion" space, embedded default
    python tuning/sweep.py --set space=full --set num_samples=32 --set 'objective={kg_valid_mrr: 1, eval_accuracy: 1}'
    ray job submit --working-dir . -- python tuning/sweep.py --set storage_path=s3://bucket/sweeps

The experiment lives in ``<storage_path>/<name>`` (any fsspec URL): Ray Tune's state, each trial's run
directory ``runs/<trial_id>`` and, at the end, ``results.csv``/``results.md``, ``objective.png`` and
``best.yaml`` (a config ``jobs/bikd_full.py --config`` runs unchanged). Rerunning the same command restores
an interrupted sweep: finished trials stay, an unfinished trial resumes its own run after its last completed
round (its completed rounds are reported again first, so a fresh ASHA sees each round once).

Resources: a trial's driver, KGE trainers and mining actors are one placement-group bundle set
(``tune.with_resources``); its LM workers come from the cluster's free CPUs (Ray Train makes its own group),
so at most ``cluster CPUs // (bundles + LM workers)`` trials run at once (1 on 2 cores) unless
``max_concurrent_trials`` says fewer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python tuning/sweep.py` from a checkout

import fsspec  # noqa: E402
import ray  # noqa: E402
from ray import tune  # noqa: E402

from bikd.cli import job_parser, parse_job_config, run_main  # noqa: E402
from bikd.driver import BikdConfig, Driver, required_cpus, validate  # noqa: E402
from bikd.storage import Storage, join_url  # noqa: E402
from tuning.spaces import SPACES, check_space, trial_config  # noqa: E402

__all__ = ["ASHAConfig", "SweepConfig", "check", "trial_bundles", "run_sweep", "main"]

#: per-round metrics an objective may weigh (keys of a run's metrics.jsonl)
OBJECTIVE_KEYS = re.compile(r"^(kg_valid_mrr|probe_(nokg_)?p1|mined|mined_precision_at_\d+_valid|eval_(nokg_)?[a-z0-9_]+)$")


@dataclass(kw_only=True, frozen=True)
class ASHAConfig:
    """ASHA in rounds: a trial reaching round ``grace_period * reduction_factor**k`` continues only if its
    objective is in the top 1/``reduction_factor`` of the trials that reached that round; max_t is the
    trials' ``loop.rounds``."""

    grace_period: int = 1
    reduction_factor: int = 2

    def __post_init__(self):
        if self.grace_period < 1:
            raise ValueError(f"asha.grace_period must be >= 1 round, got {self.grace_period}")
        if self.reduction_factor < 2:
            raise ValueError(f"asha.reduction_factor must be >= 2, got {self.reduction_factor}")


@dataclass(kw_only=True, frozen=True)
class SweepDebugConfig:
    """Fault injection for tests: the first trial to complete round 1 while ``fail_once_marker`` (a local path)
    does not exist creates it and fails, before reporting that round (FailureConfig's retry then resumes it)."""

    fail_once_marker: str | None = None


@dataclass(kw_only=True, frozen=True)
class SweepConfig:
    name: str = "fusion"
    #: the experiment goes to <storage_path>/<name>: a local folder or any fsspec URL (s3://, gs://)
    storage_path: str = "runs/sweeps"
    storage_options: dict[str, Any] = field(default_factory=dict)
    #: a key of tuning.spaces.SPACES
    space: str = "fusion"
    #: sweep only these keys of the space (the rest keep the base config's values); empty: the whole space
    only: tuple[str, ...] = ()
    #: every trial's config: this YAML (null: the embedded default), these overrides, then the trial's values
    base_config: str | None = None
    base_overrides: tuple[str, ...] = ()
    #: maximised: the weighted sum of these per-round metrics (a missing value, e.g. the precision of a
    #: round that mined nothing, counts 0)
    objective: dict[str, float] = field(default_factory=lambda: {"eval_accuracy": 1.0})
    num_samples: int = 16
    #: null: as many as the cluster's CPUs hold at once
    max_concurrent_trials: int | None = None
    #: Optuna's sampler seed (the trials' own training seed is the config's ``seed``)
    seed: int = 0
    asha: ASHAConfig = field(default_factory=ASHAConfig)
    #: a failing trial is retried this many times; the sweep goes on either way
    max_failures: int = 1
    #: the trial's own process (the driver: evaluation, probes, the extractor's fit run there)
    driver_cpus: float = 0.25
    #: stop the sweep's Ray Tune loop after this long (null: when every trial is done)
    time_budget_s: float | None = None
    debug: SweepDebugConfig = field(default_factory=SweepDebugConfig)

    def __post_init__(self):
        if self.space not in SPACES:
            raise ValueError(f"space must be one of {sorted(SPACES)}, got {self.space!r}")
        sampled = [k for k, d in SPACES[self.space].items() if hasattr(d, "sample")]
        for key in self.only:
            if key not in sampled:
                raise ValueError(f"only: {key!r} is not a swept key of space {self.space!r} ({', '.join(sampled)})")
        if not self.objective:
            raise ValueError("objective: give at least one per-round metric and its weight")
        for key, weight in self.objective.items():
            if not OBJECTIVE_KEYS.match(key):
                raise ValueError(f"objective key {key!r} is not a per-round metric (kg_valid_mrr, eval_<task metric>, "
                                 f"eval_nokg_<task metric>, probe_p1, probe_nokg_p1, mined, mined_precision_at_<k>_valid)")
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight):
                raise ValueError(f"objective weight of {key!r} must be a number, got {weight!r}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            raise ValueError(f"max_concurrent_trials must be >= 1 or null, got {self.max_concurrent_trials}")
        if self.max_failures < 0:
            raise ValueError(f"max_failures must be >= 0, got {self.max_failures}")
        if not self.driver_cpus > 0:
            raise ValueError(f"driver_cpus must be > 0 (a placement-group bundle), got {self.driver_cpus}")

    def search_space(self) -> dict[str, Any]:
        """{dotted key: domain or constant}: the space, or its ``only`` keys (then without its constants)."""
        space = SPACES[self.space]
        return {k: space[k] for k in self.only} if self.only else dict(space)

    @property
    def url(self) -> str:
        """The experiment's folder."""
        return join_url(_absolute(self.storage_path), self.name)

    def base(self) -> BikdConfig:
        return trial_config({}, self.base_config, self.base_overrides)


def _absolute(url: str) -> str:
    """Local paths made absolute: a trial runs in its own working directory."""
    return os.path.abspath(url) if fsspec.core.split_protocol(url)[0] in (None, "file", "local") else url


def check(sweep: SweepConfig) -> SweepConfig:
    """Everything checkable before Ray starts: the base config and every key and value of the space."""
    base = sweep.base()
    if base.loop.rounds < sweep.asha.grace_period:
        raise ValueError(f"asha.grace_period {sweep.asha.grace_period} is past the trials' loop.rounds {base.loop.rounds}")
    check_space(sweep.search_space(), sweep.base_config, sweep.base_overrides)
    return dataclasses.replace(sweep, base_config=_absolute(sweep.base_config) if sweep.base_config else None)


def trial_bundles(cfg: BikdConfig, driver_cpus: float) -> list[dict[str, float]]:
    """One trial's reservation: its driver, then a bundle per KGE trainer and per mining actor (the LM workers
    are placed by Ray Train in a group of their own)."""
    dist, scoring = cfg.kge_dist, cfg.mine.scoring
    bundles = [{"CPU": driver_cpus}]
    bundles += [{"CPU": dist.cpus_per_trainer, **dist.resources_per_trainer} for _ in range(dist.num_parts)]
    if cfg.loop.directions == "both":
        gpus = {"GPU": scoring.num_gpus} if scoring.num_gpus else {}
        bundles += [{"CPU": scoring.num_cpus, **gpus, **scoring.resources} for _ in range(scoring.num_actors)]
    return bundles


def objective(row: dict, weights: dict[str, float]) -> float:
    return float(sum(w * (row.get(k) or 0.0) for k, w in weights.items()))


def _reported(row: dict, sweep: SweepConfig, resumed_after: int) -> dict:
    """A round's row as a Ray Tune result: its numbers, the objective, and where this start resumed."""
    missing = [k for k in sweep.objective if k not in row]
    if missing:
        raise ValueError(f"objective keys {missing} are not among this run's per-round metrics "
                         f"{sorted(k for k, v in row.items() if isinstance(v, (int, float)))}")
    flat = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {**flat, "objective": objective(row, sweep.objective), "resumed_after_round": resumed_after}


def run_trial(params: dict[str, Any], sweep: SweepConfig) -> None:
    """One trial: the driver of ``params``'s config in the trial's own run directory (from its trial id, so a
    restored sweep resumes it), each completed round reported to Ray Tune."""
    trial_id = tune.get_context().get_trial_id()
    run_dir = join_url(sweep.url, "runs", trial_id)
    extra = (f"run_dir={run_dir}",) + (("storage_options=" + json.dumps(sweep.storage_options),) if sweep.storage_options else ())
    cfg = trial_config(params, sweep.base_config, (*sweep.base_overrides, *extra))
    driver = Driver(cfg, log=lambda line: print(f"[{trial_id}] {line}", flush=True))
    done = driver.completed_rounds()
    starts = driver.storage.read_text("trial_starts.jsonl") if driver.storage.exists("trial_starts.jsonl") else ""
    driver.storage.write_text("trial_starts.jsonl", starts + json.dumps({"after_round": len(done), "time": time.time()}) + "\n")
    for row in done:  # a restored sweep's scheduler starts empty: it sees every completed round again, once
        tune.report(_reported(row, sweep, len(done)))
    if driver.finished is None:
        validate(cfg)
        last: list[dict] = []

        def on_round(row: dict) -> None:
            # the last round is reported once the run has finished (its test evaluation and report written):
            # ASHA stops a trial at max_t, and a stop ends the trial's process at once
            marker = sweep.debug.fail_once_marker
            if marker and row["round"] == 1 and not os.path.exists(marker):
                Path(marker).write_text(f"trial {trial_id} failed after round 1\n")
                raise RuntimeError(f"trial {trial_id}: the failure debug.fail_once_marker asked for")
            if row["round"] < cfg.loop.rounds:
                tune.report(_reported(row, sweep, len(done)))
            else:
                last.append(row)

        driver.on_round = on_round
        driver.run()
        for row in last:
            tune.report(_reported(row, sweep, len(done)))


def _start_ray(need: float) -> None:
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    elif not ray.is_initialized():
        from ray._private.services import find_gcs_addresses

        if others := find_gcs_addresses():
            raise ValueError(
                f"another Ray instance runs on this machine (GCS {', '.join(sorted(others))}): a sweep starting its own "
                "beside it would leave the CPUs of every trial ASHA stops held (Ray Train's cleanup of the trial's LM "
                "workers finds the cluster through the state API, which cannot tell two local instances apart); run "
                "the sweep on that cluster (RAY_ADDRESS=...) or stop it first")
        # the dashboard serves the state API through which Ray Train's cleaner finds the LM workers' placement
        # group of a trial that ASHA stopped (and removes it); without it those CPUs stay held
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1",
                 num_cpus=max(os.cpu_count() or 1, math.ceil(need)))


def run_sweep(sweep: SweepConfig) -> tune.ResultGrid:
    """Runs (or restores and finishes) the sweep; Ray initialised here unless it is already."""
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from bikd.ray.lm_train import ray_storage

    base = sweep.base()
    bundles = trial_bundles(base, sweep.driver_cpus)
    per_trial = sum(b["CPU"] for b in bundles) + required_cpus(base)["lm"]
    _start_ray(per_trial)
    fits = int(ray.cluster_resources().get("CPU", 0) // per_trial)
    if fits < 1:
        raise ValueError(f"one trial needs {per_trial:g} CPUs (bundles {bundles} and the LM's workers); the Ray cluster "
                         f"has {ray.cluster_resources().get('CPU', 0):g}")
    concurrent = min(fits, sweep.max_concurrent_trials or fits)
    trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=sweep),
                                    tune.PlacementGroupFactory(bundles, strategy="PACK"))
    path, fs = ray_storage(sweep.storage_path, sweep.storage_options)
    experiment = path.rstrip("/") + "/" + sweep.name
    # Optuna keeps the space in memory: list-valued choices (fusion layers) are fine there
    warnings.filterwarnings("ignore", message="Choices for a categorical distribution should be")
    if tune.Tuner.can_restore(experiment, storage_filesystem=fs):
        print(f"restoring the sweep in {sweep.url}", flush=True)
        tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=fs)
    else:
        scheduler = ASHAScheduler(time_attr="round", max_t=base.loop.rounds, grace_period=sweep.asha.grace_period,
                                  reduction_factor=sweep.asha.reduction_factor)
        tuner = tune.Tuner(
            trainable, param_space=sweep.search_space(),
            tune_config=tune.TuneConfig(metric="objective", mode="max", scheduler=scheduler,
                                        search_alg=OptunaSearch(seed=sweep.seed), num_samples=sweep.num_samples,
                                        max_concurrent_trials=concurrent, trial_dirname_creator=lambda t: t.trial_id,
                                        time_budget_s=sweep.time_budget_s),
            run_config=tune.RunConfig(name=sweep.name, storage_path=path, storage_filesystem=fs,
                                      failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                                      verbose=1))
    print(f"sweep {sweep.url}: {sweep.num_samples} trials of space {sweep.space!r}, {concurrent} at a time, "
          f"each reserving {bundles} + LM {required_cpus(base)['lm']:g} CPUs", flush=True)
    return tuner.fit()


def full(sweep: SweepConfig) -> int:
    from tuning.results import write_results

    try:
        grid = run_sweep(sweep)
    finally:
        ray.shutdown()
    out = write_results(grid, sweep, Storage(sweep.url, sweep.storage_options))
    print(out["markdown"])
    print(f"best: trial {out['best_trial']} objective {out['best_objective']:.4f}; config {sweep.url}/best.yaml "
          f"(python jobs/bikd_full.py --config {sweep.url}/best.yaml)")
    return 0


def main() -> None:
    args, sweep = parse_job_config(job_parser(__doc__), SweepConfig, check=check)
    run_main(lambda: full(sweep), args.debug)


if __name__ == "__main__":
    main()
