"""The README's first command, run for real (on a small budget): jobs/kg_demo.py end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bikd.kg.store import KGStore
from bikd.kge.export import load_embeddings
from bikd.storage import Storage

REPO = Path(__file__).resolve().parents[2]


def run_demo(*overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, str(REPO / "jobs" / "kg_demo.py")]
    for o in overrides:
        args += ["--set", o]
    return subprocess.run(args, capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})}, timeout=300)


@pytest.mark.slow
def test_demo_trains_evaluates_exports_and_mines_nothing(tmp_path):
    run_dir = str(tmp_path / "run")
    first = run_demo("data.dataset=nations", "train.epochs=10", "train.model.dim=32", f"run_dir={run_dir}")
    assert first.returncode == 0, first.stderr
    assert "nations: 14 entities, 55 relations" in first.stdout
    assert "test (filtered, realistic): mrr" in first.stdout
    assert "mining (LM -> KG) runs in jobs/mine.py" in first.stdout
    metrics = json.loads(Storage(run_dir).read_text("metrics.json"))
    assert metrics["test"]["both.mrr"] > 0.4 and metrics["kg_version"] == 0  # a random model scores about 0.29
    store = KGStore(Storage(run_dir).child("kg"))
    # the demo chooses nothing from valid or test (it used to mine the test queries' top tails): no mined version
    assert [v.kind for v in store.versions()] == ["gold"]
    entity, relation, entity_labels, relation_labels, meta = load_embeddings(Storage(run_dir), "export")
    v0 = store.read(0)
    assert tuple(entity_labels) == v0.entities and tuple(relation_labels) == v0.relations  # jobs/mine.py takes both
    assert entity.shape == (14, 64) and meta["extra"]["kg_version"] == 0
    second = run_demo("data.dataset=nations", "train.epochs=1", "train.model.dim=32", f"run_dir={run_dir}")
    assert second.returncode == 0, second.stderr
    assert [v.kind for v in KGStore(Storage(run_dir).child("kg")).versions()] == ["gold"]


def test_demo_has_no_mining_keys(tmp_path):
    result = run_demo("num_mined=3", f"run_dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "num_mined" in result.stderr and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_demo_on_s3(s3_url):
    result = run_demo("data.dataset=nations", "train.epochs=1", f"run_dir={s3_url}/demo")
    assert result.returncode == 0, result.stderr
    assert KGStore(Storage(f"{s3_url}/demo/kg")).head == 0
    assert Storage(f"{s3_url}/demo").exists("export/model.json")


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
