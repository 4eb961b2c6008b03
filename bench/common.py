"""What every benchmark writes: ``bench/results/<name>.json`` with benchmark, commit, machine, date, the
arguments, the load average at start and end, and a flat ``metrics`` object of name -> number (extra
context goes under ``details``).

The commit is taken when the run STARTS, from a clean tree: a result names the code that produced it,
not whatever was checked out when it finished. Each benchmark's ``main`` begins with

    p = argparse.ArgumentParser(...); ...; add_common_args(p)
    args = p.parse_args()
    run = start_run("kge_throughput", args)     # commit, date, load average; refuses a dirty tree
    ...
    run.write(metrics, details)                 # args, load average at the end, the JSON

A tree with modified tracked files is refused (SystemExit) unless ``--allow-dirty``: then the commit gets
``-dirty`` and ``"allow_dirty": true`` is recorded. $BIKD_COMMIT names the commit of a copy without .git
(another machine); it is taken as given.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DATA_DIR = Path(os.environ.get("BIKD_DATA_DIR", ROOT.parent / "shared" / "data"))


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments every benchmark takes (``--allow-dirty``)."""
    parser.add_argument("--allow-dirty", action="store_true",
                        help="run on a tree with uncommitted changes to tracked files (the result's commit gets "
                             "'-dirty' and the JSON records allow_dirty: true)")
    return parser


def _git(repo: Path, *args: str) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=repo)
    except OSError:  # no git on this machine
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def tree_state(repo: Path | None = None) -> tuple[str, bool]:
    """(commit, dirty) of the checkout at ``repo`` (default: this one): the short HEAD sha and whether
    tracked files differ from it (untracked files do not count). $BIKD_COMMIT, where set, is the commit
    of a copy without .git and is taken as clean. ("unknown", True) where neither says."""
    if os.environ.get("BIKD_COMMIT"):
        return os.environ["BIKD_COMMIT"], False
    repo = Path(repo or ROOT)
    sha = _git(repo, "rev-parse", "--short=12", "HEAD")
    if not sha:
        return "unknown", True
    return sha, bool(_git(repo, "status", "--porcelain", "--untracked-files=no"))


def commit(repo: Path | None = None) -> str:
    """The checkout's commit, with ``-dirty`` where tracked files are modified."""
    sha, dirty = tree_state(repo)
    return sha + ("-dirty" if dirty and sha != "unknown" else "")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), {gpu}"


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages (empty where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return []


def gemm_gflops(n: int = 4096, repeats: int = 3) -> float:
    """This machine's float32 matrix-product rate, best of a few square GEMMs: the roofline we quote."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def json_safe(value):
    """``value`` with paths, tuples and other objects turned into what JSON holds (str, number, list, dict)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Run:
    """One benchmark run, opened by ``start_run``: what was true when it started."""

    name: str
    args: dict
    commit: str
    allow_dirty: bool
    date: str
    loadavg_start: list[float]
    machine: str = field(default_factory=lambda: machine())  # at start: torch's thread count before the run sets its own
    started: float = field(default_factory=time.perf_counter)

    def write(self, metrics: dict[str, float], details: dict | None = None, suffix: str = "",
              out_dir: Path | str | None = None) -> Path:
        """Write ``<out_dir>/<name><suffix>.json`` (default ``bench/results``) and return its path."""
        assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values()), \
            "metrics must be a flat name -> number map"
        out_dir = Path(out_dir or RESULTS)
        out_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "benchmark": self.name,
            "commit": self.commit,
            "allow_dirty": self.allow_dirty,
            "machine": self.machine,
            "date": self.date,
            "date_end": _now(),
            "wall_seconds": round(time.perf_counter() - self.started, 1),
            "args": self.args,
            "loadavg_start": self.loadavg_start,
            "loadavg_end": loadavg(),
            "metrics": metrics,
            "details": json_safe(details or {}),
        }
        path = out_dir / f"{self.name}{suffix}.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        return path


def start_run(name: str, args: argparse.Namespace | dict | None = None, *, repo: Path | None = None) -> Run:
    """Open a run of benchmark ``name``: take the commit, date and load average now. Exits (SystemExit)
    on a tree with modified tracked files unless ``args.allow_dirty``."""
    arg_dict = dict(vars(args) if isinstance(args, argparse.Namespace) else (args or {}))
    allow_dirty = bool(arg_dict.get("allow_dirty", False))
    sha, dirty = tree_state(repo)
    if dirty and not allow_dirty:
        where = Path(repo or ROOT)
        reason = (f"no git checkout at {where} and no $BIKD_COMMIT" if sha == "unknown"
                  else f"{where} has uncommitted changes to tracked files (git status --porcelain --untracked-files=no)")
        raise SystemExit(f"{name}: refusing to run: {reason}; the result would not name the code that ran. "
                         "Commit (or run from a clean worktree of the commit), or pass --allow-dirty.")
    return Run(name=name, args=json_safe(arg_dict), commit=sha + ("-dirty" if dirty and sha != "unknown" else ""),
               allow_dirty=allow_dirty, date=_now(), loadavg_start=loadavg())


def run_bikd_full(overrides: list[str], run_dir: Path, config: str | None = None) -> tuple[float, list[dict], dict]:
    """``python jobs/bikd_full.py [--config config]`` in a fresh process (offline, local Ray) with ``run_dir``
    and ``--set`` ``overrides``: (wall seconds, the per-round metrics rows, the final progress record). Exits
    with the job's output tail when it fails."""
    import sys

    args = [sys.executable, str(ROOT / "jobs" / "bikd_full.py"), *(["--config", config] if config else []),
            "--set", f"run_dir={run_dir}"]
    for o in overrides:
        args += ["--set", o]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    start = time.perf_counter()
    out = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return wall, rows, json.loads((run_dir / "progress.json").read_text())

