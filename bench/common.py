"""What every benchmark writes: ``bench/results/<name>.json`` with benchmark, commit, machine, date and a
flat ``metrics`` object of name -> number (extra context goes under ``details``)."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
DATA_DIR = Path(os.environ.get("BIKD_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def commit() -> str:
    """The checkout's commit (``-dirty`` with uncommitted changes); $BIKD_COMMIT where there is no .git
    (a copy of the tree on another machine)."""
    if os.environ.get("BIKD_COMMIT"):
        return os.environ["BIKD_COMMIT"]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=RESULTS.parent).stdout.strip()

    sha = git("rev-parse", "--short=12", "HEAD") or "unknown"
    return sha + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


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


def write_result(name: str, metrics: dict[str, float], details: dict | None = None, suffix: str = "",
                 out_dir: Path | None = None) -> Path:
    assert all(isinstance(v, (int, float)) for v in metrics.values()), "metrics must be a flat name -> number map"
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "commit": commit(),
        "machine": machine(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "metrics": metrics,
        "details": details or {},
    }
    path = out_dir / f"{name}{suffix}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
