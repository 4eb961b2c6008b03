"""jobs/kge_train.py end to end on UMLS with configs/kge_umls.yaml (few epochs): both backends, bad configs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bikd.kg.datasets import dataset_dir
from bikd.kge.export import load_embeddings
from bikd.storage import Storage

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "kge_umls.yaml"
RANDOM_MRR = 0.07  # an untrained ComplEx-64 on UMLS: test MRR 0.052-0.068 over seeds 0-2


def run_job(*overrides: str) -> subprocess.CompletedProcess:
    args = [sys.executable, str(REPO / "jobs" / "kge_train.py"), "--config", str(CONFIG)]
    for o in overrides:
        args += ["--set", o]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # always a private local Ray
    # one intra-op thread in the driver: on a shared 2-core box torch's OpenMP threads otherwise spin
    # against other processes and make the tiny UMLS steps 50x slower (the Ray actors set their own)
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env, timeout=240)


def check_run(result: subprocess.CompletedProcess, run_dir: Path, epochs: int, eval_every: int) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "135 entities, 46 relations; train 5216; valid 652; test 661" in out
    epoch_lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == epochs
    for i, line in enumerate(epoch_lines, start=1):
        assert f"epoch {i:3d}  loss " in line and " triples/s" in line
        assert ("valid MRR" in line) == (i % eval_every == 0 or i == epochs), line
    assert "test (filtered, realistic): mrr " in out and "hits_at_10" in out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["epochs"]] == list(range(1, epochs + 1))
    assert all(row["loss"] > 0 and row["triples_per_s"] > 0 for row in metrics["epochs"])
    assert metrics["test"]["both.mrr"] > RANDOM_MRR + 0.3, metrics["test"]
    assert {"both.hits_at_1", "both.hits_at_3", "both.hits_at_10"} <= set(metrics["test"])
    entity, relation, entity_labels, relation_labels, meta = load_embeddings(Storage(str(run_dir / "export")))
    assert entity.shape == (135, 128) and relation.shape == (46, 128)  # ComplEx dim 64: [re | im] halves
    assert len(entity_labels) == 135 and len(relation_labels) == 46 and meta["model"] == "complex"
    assert meta["extra"]["test"]["both.mrr"] == metrics["test"]["both.mrr"]
    assert (run_dir / "config.yaml").exists()
    return metrics


def test_local_backend_on_a_dataset_directory(tmp_path):
    data = tmp_path / "umls-copy"  # a directory URL rather than a name: the job takes either
    data.mkdir()
    for split in ("train", "valid", "test"):
        shutil.copy(Path(dataset_dir("umls")) / f"{split}.txt", data / f"{split}.txt")
    run_dir = tmp_path / "run"
    result = run_job("backend=local", "train.epochs=6", "eval_every=3", "data.dataset=null", f"data.path=file://{data}", f"run_dir={run_dir}")
    check_run(result, run_dir, epochs=6, eval_every=3)
    assert "Ray" not in result.stdout + result.stderr


@pytest.mark.slow
def test_ray_backend_two_partitions(tmp_path):
    run_dir = tmp_path / "run"
    result = run_job("backend=ray", "dist.num_parts=2", "train.epochs=5", "eval_every=2", "valid_limit=300", f"run_dir={run_dir}")
    check_run(result, run_dir, epochs=5, eval_every=2)
    assert "ray: 2 metis partitions (async)" in result.stdout
    assert "umls: 135 entities, 46 relations" in result.stdout


@pytest.mark.parametrize(
    "override, message",
    [("train.batch_size=0", "batch_size must be >= 1"),
     ("train.epoch=3", "unknown config key 'epoch' at 'train.epoch' (did you mean 'epochs'?)"),
     ("backend=spark", "expected one of 'ray', 'local'")],
)
def test_bad_config_fails_before_any_work(tmp_path, override, message):
    result = run_job(override, f"run_dir={tmp_path / 'run'}")
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "run").exists()
    assert "Ray" not in result.stdout + result.stderr and "epoch " not in result.stdout


@pytest.mark.parametrize("name", ["kge_umls.yaml", "kge_fb15k237_transe.yaml"])
def test_shipped_configs_validate(name, monkeypatch):
    import importlib.util

    from bikd.config import load_config

    spec = importlib.util.spec_from_file_location("kge_train_job", REPO / "jobs" / "kge_train.py")
    job = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, job)  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(job)
    cfg = load_config(job.KGEJobConfig, str(REPO / "configs" / name))
    assert cfg.backend == "ray" and cfg.dist.num_parts == 2
    if name.startswith("kge_fb15k237"):
        model, train = cfg.train.model, cfg.train
        assert (model.name, model.p, model.dim, train.batch_size, train.sampler.num_negatives) == ("transe", 2, 200, 1024, 256)
        assert train.loss.name == "self_adversarial" and train.optimizer.name == "rowwise_adagrad"
