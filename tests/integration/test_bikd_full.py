"""jobs/bikd_full.py end to end on a tiny KG with text (tiny encoder, 2 rounds). Sync mode: the driver killed
with SIGKILL mid-round and rerun ends in the same state as an uninterrupted run (KG store versions, KGE
snapshots, LM export, per-round metrics). Async mode (the default, snapshots published every
KGE epoch): killed after its first mined round and rerun, it finishes with every round mined exactly once. ``--directions none`` mines nothing and never fuses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from bikd.kg.store import KGStore
from bikd.storage import Storage
from tiny_bikd import TINY, write_kg

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

def command(kg: Path, run_dir: Path, *extra: str, flags: tuple[str, ...] = ()) -> list[str]:
    args = [sys.executable, str(REPO / "jobs" / "bikd_full.py"), *flags]
    for o in ("data.dataset=null", f"data.path={kg}", f"run_dir={run_dir}", *TINY, *extra):
        args += ["--set", o]
    return args


def env() -> dict:
    e = {**os.environ, "HF_HUB_OFFLINE": "1"}
    e.pop("RAY_ADDRESS", None)
    return e


def run(kg: Path, run_dir: Path, *extra: str, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    out = subprocess.run(command(kg, run_dir, *extra, flags=flags), capture_output=True, text=True, cwd=REPO, env=env(), timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def state(run_dir: Path) -> dict:
    """What a finished run leaves: KG versions and their mined triples, snapshot and LM export checksums,
    per-round metrics without timings."""
    store = KGStore(Storage(str(run_dir / "kg")))
    mined = sorted((m.head, m.relation, m.tail, round(m.provenance.confidence, 6)) for m in store.read().mined)
    snaps = {p.parent.name: json.loads(p.read_text())["sha256"] for p in sorted((run_dir / "kge" / "snapshots").glob("*/model.json"))}
    lm = {p.parent.name: json.loads(p.read_text())["sha256"] for p in sorted((run_dir / "lm" / "exports").glob("*/manifest.json"))}
    timing = ("seconds", "per_s", "wall_s")
    rows = [{k: v for k, v in json.loads(line).items() if not any(t in k for t in timing)}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    progress = json.loads((run_dir / "progress.json").read_text())
    return {"versions": [(v.version, v.kind, v.num_mined) for v in store.versions()], "mined": mined,
            "snapshots": snaps, "lm": lm, "metrics": rows, "final": {k: progress.get(k) for k in ("kg_test", "lm_test")}}


@pytest.fixture(scope="module")
def kg(tmp_path_factory) -> Path:
    return write_kg(tmp_path_factory.mktemp("bikd"))


def test_sync_run_killed_mid_round_resumes_to_the_uninterrupted_state(kg, tmp_path):
    killed = tmp_path / "killed"
    with ThreadPoolExecutor(1) as pool:  # the uninterrupted run meanwhile: both mostly wait on process starts
        uninterrupted = pool.submit(run, kg, tmp_path / "whole")
        kill_after_round_1(kg, killed)
        whole = uninterrupted.result()
    assert "round 2: mined" in whole.stdout and "done after round 2" in whole.stdout
    expected = state(tmp_path / "whole")
    assert [v[1] for v in expected["versions"]] == ["gold", "mined", "mined"], expected["versions"]
    assert expected["metrics"][1]["kge_added_triples"] > 0  # round 2's KGE trained on round 1's mined triples
    assert [r["kg_table_version"] for r in expected["metrics"]] == [1, 2]  # the LM fused each round's snapshot
    assert {"accuracy", "nokg_accuracy"} <= set(expected["final"]["lm_test"])  # the LM's test split, read once
    targets = np.load(tmp_path / "whole" / "mining" / "round-0001" / "targets.npz")  # reverse-KD soft labels
    assert targets["triples"].shape == (expected["versions"][1][2], 3) and np.allclose(targets["targets"].sum(1), 1.0)

    resumed = run(kg, killed)
    assert "resuming" in resumed.stdout and "after round 1" in resumed.stdout
    assert state(killed) == expected
    again = run(kg, killed)  # a finished run does nothing
    assert "nothing to do" in again.stdout and state(killed) == expected


def kill_after_round_1(kg: Path, run_dir: Path, *extra: str) -> None:
    proc = subprocess.Popen(command(kg, run_dir, *extra), cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (run_dir / "progress.json").exists():  # round 1 complete
        assert proc.poll() is None and time.monotonic() < deadline, "the driver ended before round 1 completed"
        time.sleep(0.2)
    time.sleep(3.0)  # into round 2
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray cluster it started, at once
    proc.wait()


def test_async_run_killed_after_a_round_resumes_and_mines_each_round_once(kg, tmp_path):
    run_dir = tmp_path / "async"
    extra = ("loop.mode=async", "exchange.lm_poll_steps=1", "loop.kge_epochs_per_round=2", "exchange.kge_publish_epochs=1")
    kill_after_round_1(kg, run_dir, *extra)
    resumed = run(kg, run_dir, *extra)
    assert "resuming" in resumed.stdout and "done after round 2" in resumed.stdout
    got = state(run_dir)
    assert [r["round"] for r in got["metrics"]] == [1, 2]
    store = KGStore(Storage(str(run_dir / "kg")))
    rounds = [v.meta["round_key"]["round"] for v in store.versions() if v.kind == "mined"]
    assert rounds == sorted(set(rounds)) and set(rounds) <= {1, 2}  # no round committed twice
    # the KGE side's 2 rounds of 2 epochs, published after every epoch, each version once
    assert set(got["snapshots"]) == {"v000001", "v000002", "v000003", "v000004"}
    assert [r["kg_snapshot_version"] for r in got["metrics"]] in ([2, 4], [4, 4])  # a round's newest when mined
    for row in got["metrics"]:
        assert row["kg_table_version"] >= 1 and row["kg_staleness"] >= 0 and "eval_nokg_accuracy" in row
    assert (run_dir / "report.md").exists() and list((run_dir / "tensorboard").iterdir())


def test_directions_none_mines_nothing_and_never_fuses(kg, tmp_path):
    out = run(kg, tmp_path / "none", flags=("--directions", "none"))
    got = state(tmp_path / "none")
    assert [v[1] for v in got["versions"]] == ["gold"] and not got["mined"]
    assert all(r["kg_table_version"] == 1 and r["kg_staleness"] is None for r in got["metrics"])
    assert "eval_nokg_accuracy" in got["metrics"][0] and "done after round 2" in out.stdout
    test = got["final"]["lm_test"]
    assert test["accuracy"] == test["nokg_accuracy"]  # nothing linked, nothing fused: the same predictions
