"""The README's first command, run for real (on a small budget): jobs/kg_demo.py end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bikd.kg.store import KGStore
from bikd.storage import Storage

REPO = Path(__file__).resolve().parents[2]


def run_demo(*overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, str(REPO / "jobs" / "kg_demo.py")]
    for o in overrides:
        args += ["--set", o]
    return subprocess.run(args, capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})}, timeout=300)


@pytest.mark.slow
def test_demo_trains_evaluates_and_versions_the_kg(tmp_path):
    run_dir = str(tmp_path / "run")
    first = run_demo("data.dataset=nations", "train.epochs=10", "train.model.dim=32", f"run_dir={run_dir}", "num_mined=5")
    assert first.returncode == 0, first.stderr
    assert "nations: 14 entities, 55 relations" in first.stdout
    assert "test (filtered, realistic): mrr" in first.stdout
    metrics = json.loads(Storage(run_dir).read_text("metrics-v1.json"))
    assert metrics["test"]["both.mrr"] > 0.4  # a random model on Nations scores about 0.29
    second = run_demo("data.dataset=nations", "train.epochs=1", "train.model.dim=32", f"run_dir={run_dir}", "num_mined=3")
    assert second.returncode == 0, second.stderr
    store = KGStore(Storage(run_dir).child("kg"))
    assert [v.kind for v in store.versions()] == ["gold", "mined", "mined"]
    v1, v2 = store.read(1), store.read(2)
    assert len(v1.mined) == 5 and len(v2.mined) == 8
    assert len({m.triple for m in v2.mined}) == 8  # the second run mines only triples not yet in the KG
    known = {t for split in v1.gold.values() for t in split}
    assert all(m.triple not in known and 0 < m.provenance.confidence <= 1 for m in v2.mined)


@pytest.mark.slow
def test_demo_on_s3(s3_url):
    result = run_demo("data.dataset=nations", "train.epochs=1", f"run_dir={s3_url}/demo", "num_mined=2")
    assert result.returncode == 0, result.stderr
    assert KGStore(Storage(f"{s3_url}/demo/kg")).head == 1


@pytest.mark.parametrize(
    "override, message",
    [("train.batch_size=0", "batch_size must be >= 1"), ("trian.epochs=3", "did you mean 'train'"),
     ("data.unknown=ignore", "data.unknown")],
)
def test_bad_config_fails_before_any_work(tmp_path, override, message):
    result = run_demo(override, f"run_dir={tmp_path / 'run'}")
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "run").exists()
