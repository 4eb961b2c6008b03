"""tuning/sweep.py end to end: 4 trials of the bidirectional job on a tiny KG with the tiny encoder (seeded
Optuna, ASHA with grace period 1 and reduction factor 2). The sweep's driver is killed (SIGKILL, with the
local Ray it started) while a trial is between rounds; the same command restores it to completion without
running any trial again from scratch, and the best trial's YAML runs through jobs/bikd_full.py."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tiny_bikd import TINY, write_kg

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def env() -> dict:
    e = {**os.environ, "HF_HUB_OFFLINE": "1"}
    e.pop("RAY_ADDRESS", None)
    return e


def progress(run: Path) -> dict:
    try:
        return json.loads((run / "progress.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def kill_between_rounds(cmd: list[str], runs: Path, log: Path) -> str:
    """Starts the sweep and kills it (its whole process group: the driver and its Ray) once a trial has
    completed round 1 and not yet finished; returns that trial's id."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            for run in runs.glob("*") if runs.exists() else ():
                p = progress(run)
                if p.get("round", 0) >= 1 and not p.get("finished"):
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return run.name
            time.sleep(0.2)
        raise AssertionError(f"no trial between rounds to kill (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_killed_sweep_is_restored_to_completion_with_asha_stops_and_a_runnable_best(tmp_path):
    kg = write_kg(tmp_path)
    exp = tmp_path / "exp" / "tiny"
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({
        "name": "tiny", "storage_path": str(tmp_path / "exp"), "space": "full", "seed": 0, "num_samples": 4,
        "only": ["kge.optimizer.lr", "lm.kd.entity_weight"], "objective": {"kg_valid_mrr": 1.0},
        "asha": {"grace_period": 1, "reduction_factor": 2},
        "base_overrides": ["data.dataset=null", f"data.path={kg}", *TINY, "loop.directions=kg2lm"]}))
    cmd = [sys.executable, str(REPO / "tuning" / "sweep.py"), "--config", str(config)]

    killed = kill_between_rounds(cmd, exp / "runs", tmp_path / "first.log")
    done = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "restoring the sweep" in done.stdout

    rows = list(csv.DictReader((exp / "results.csv").open()))
    assert len(rows) == 4 and {r["trial_id"] for r in rows} == {p.name for p in (exp / "runs").iterdir()}
    status = [r["status"] for r in rows]
    assert "error" not in status and status.count("stopped early") >= 1 and status.count("completed") >= 1, rows
    for row in rows:  # every trial's rounds once each, and only the killed one started twice (resuming)
        run = exp / "runs" / row["trial_id"]
        rounds = [json.loads(line)["round"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert rounds == list(range(1, int(row["rounds"]) + 1)), (row, rounds)
        starts = [json.loads(line)["after_round"] for line in (run / "trial_starts.jsonl").read_text().splitlines()]
        assert starts == ([0, 1] if row["trial_id"] == killed else [0]), (row["trial_id"], killed, starts)
    assert (exp / "objective.png").read_bytes()[:4] == b"\x89PNG" and "stopped early" in (exp / "results.md").read_text()

    best = subprocess.run([sys.executable, str(REPO / "jobs" / "bikd_full.py"), "--config", str(exp / "best.yaml"),
                           "--set", f"run_dir={tmp_path / 'best'}", "--set", "loop.rounds=1"],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert best.returncode == 0 and "done after round 1" in best.stdout, best.stdout[-3000:] + best.stderr[-3000:]
