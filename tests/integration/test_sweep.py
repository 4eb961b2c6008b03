"""tuning/sweep.py end to end, with the experiment on S3 (a moto server): 4 trials of the bidirectional job on
a tiny KG with the tiny encoder (seeded Optuna, ASHA with grace period 1 and reduction factor 2). The sweep's
driver is killed (SIGKILL, with the local Ray it started) while a trial is between rounds; the same command
restores it to completion without running any trial again from scratch, a trial that fails once is retried
(resuming its run) without stopping the sweep, and the best trial's YAML runs through jobs/bikd_full.py."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bikd.storage import Storage
from tiny_bikd import TINY, write_kg

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def env() -> dict:
    e = {**os.environ, "HF_HUB_OFFLINE": "1"}
    e.pop("RAY_ADDRESS", None)
    return e


def progress(run: Storage) -> dict:
    try:
        return json.loads(run.read_text("progress.json"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def lines(run: Storage, name: str) -> list[dict]:
    return [json.loads(line) for line in run.read_text(name).splitlines()]


def kill_between_rounds(cmd: list[str], runs: Storage, log: Path) -> str:
    """Starts the sweep and kills it (its whole process group: the driver and its Ray) once a trial has
    completed round 1 and not yet finished; returns that trial's id."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            for name in runs.ls() if runs.exists() else ():
                p = progress(runs.child(name))
                if p.get("round", 0) >= 1 and not p.get("finished"):
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return name
            time.sleep(0.2)
        raise AssertionError(f"no trial between rounds to kill (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_killed_sweep_on_s3_is_restored_to_completion_with_asha_stops_retries_and_a_runnable_best(tmp_path, s3_url):
    kg = write_kg(tmp_path)
    exp = Storage(f"{s3_url}/sweeps/tiny")
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({
        "name": "tiny", "storage_path": f"{s3_url}/sweeps", "space": "full", "seed": 0, "num_samples": 4,
        "only": ["kge.optimizer.lr", "lm.kd.entity_weight"], "objective": {"kg_valid_mrr": 1.0},
        "asha": {"grace_period": 1, "reduction_factor": 2},
        "base_overrides": ["data.dataset=null", f"data.path={kg}", *TINY, "loop.directions=kg2lm"]}))
    cmd = [sys.executable, str(REPO / "tuning" / "sweep.py"), "--config", str(config)]

    killed = kill_between_rounds(cmd, exp.child("runs"), tmp_path / "first.log")
    marker = tmp_path / "failed_once"
    with open(tmp_path / "restore.log", "w") as log:  # a file, so that a timeout leaves what happened
        done = subprocess.run([*cmd, "--set", f"debug.fail_once_marker={marker}"], cwd=REPO, env=env(), stdout=log,
                              stderr=subprocess.STDOUT, text=True, timeout=600)
    out = (tmp_path / "restore.log").read_text()
    assert done.returncode == 0, out[-6000:]
    assert "restoring the sweep" in out and marker.exists()
    failed = marker.read_text().split()[1]

    rows = list(csv.DictReader(io.StringIO(exp.read_text("results.csv"))))
    assert len(rows) == 4 and {r["trial_id"] for r in rows} == set(exp.ls("runs")) and failed != killed
    status = [r["status"] for r in rows]
    assert "error" not in status and status.count("stopped early") >= 1 and status.count("completed") >= 1, rows
    for row in rows:  # every trial's rounds once each; the killed and the failed trial resumed after round 1
        run = exp.child(f"runs/{row['trial_id']}")
        assert [r["round"] for r in lines(run, "metrics.jsonl")] == list(range(1, int(row["rounds"]) + 1)), row
        starts = [s["after_round"] for s in lines(run, "trial_starts.jsonl")]
        assert starts == ([0, 1] if row["trial_id"] in (killed, failed) else [0]), (row["trial_id"], killed, failed, starts)
    assert exp.read_bytes("objective.png")[:4] == b"\x89PNG" and "stopped early" in exp.read_text("results.md")

    best = subprocess.run([sys.executable, str(REPO / "jobs" / "bikd_full.py"), "--config", exp.url_of("best.yaml"),
                           "--set", f"run_dir={tmp_path / 'best'}", "--set", "loop.rounds=1"],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert best.returncode == 0 and "done after round 1" in best.stdout, best.stdout[-3000:] + best.stderr[-3000:]
