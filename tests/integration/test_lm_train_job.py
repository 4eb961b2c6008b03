"""jobs/lm_train.py end to end in a subprocess (its own local Ray, 2 workers, a tiny random BERT): triple
classification on UMLS under ZeRO-3, extractive QA on a small SQuAD-format file under ZeRO-2 (windows with and
without linked mentions on different ranks), bad configs, and the shipped config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bikd.lm.train import load_fused, load_fused_tokenizer

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "lm_umls.yaml"
TINY = ["encoder.name_or_path=tiny", "encoder.attn_implementation=eager", "fusion.layers=[1]", "kg.train.epochs=2",
        "kd.num_sampled_candidates=8", "train.batch_size=4", "train.eval_batch_size=16", "train.steps=4",
        "train.eval_every=2", "train.checkpoint_every=2", "train.log_every=1"]


def run_job(*overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    args = [sys.executable, str(REPO / "jobs" / "lm_train.py"), "--config", str(CONFIG)]
    for o in overrides:
        args += ["--set", o]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # always a private local Ray
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")  # no OpenMP threads spinning against the workers
    return subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)


def check_history(result: subprocess.CompletedProcess, steps: int, eval_every: int) -> list[str]:
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == steps, result.stdout[-3000:]
    for i, line in enumerate(lines, start=1):
        assert line.startswith(f"step {i:5d}  epoch ") and "  task " in line and "  kd_entity " in line and "  kd_relation " in line
        assert ("  eval_" in line) == (i % eval_every == 0 or i == steps), line
    return lines


def squad_file(path: Path) -> Path:
    """Nine one-paragraph articles; only the "virus" one names UMLS entities (linked by label), so some
    batches carry mentions on one rank and none on the other (the case FusedLM's anchor exists for)."""
    filler = "The study was repeated in a later year with the same careful methods and results. " * 2
    texts = [(f"A virus can infect a cell. {filler}", "What can infect a cell?", "A virus"),
             (f"{filler}The report was filed on time.", "What was filed?", "The report"),
             (f"Nothing of note happened here at all. {filler}", "What was repeated?", "The study")]
    arts = [{"title": f"article {i}", "paragraphs": [{"context": ctx, "qas": [
        {"id": f"q{i}", "question": q, "answers": [{"text": a, "answer_start": ctx.index(a)}]}]}]}
        for i, (ctx, q, a) in enumerate(texts[:1] + texts[1:] * 4)]
    path.write_text(json.dumps({"data": arts}))
    return path


@pytest.mark.slow
def test_extractive_qa_zero2(tmp_path):
    squad = squad_file(tmp_path / "squad.json")
    result = run_job(*TINY, "deepspeed.zero_stage=2", "task.name=qa", "task.link=true", f"task.squad_path={squad}",
                     "task.squad_eval_fraction=0.34", "task.qa.max_length=48", "task.qa.doc_stride=8",
                     "task.qa.max_query_length=12", f"storage_path={tmp_path}", "name=qa")
    check_history(result, steps=4, eval_every=2)
    assert "eval (SQuAD v1.1 dev split by article, 3 held-out questions): exact_match " in result.stdout
    metrics = json.loads((tmp_path / "qa" / "metrics.json").read_text())
    assert {"eval_exact_match", "eval_f1"} <= set(metrics["final"])
    assert load_fused(str(tmp_path / "qa" / "export")).cfg.task == "qa"


@pytest.mark.parametrize("override, message", [
    ("deepspeed.zero_stage=5", "zero_stage must be 0, 1, 2 or 3"),
    ("train.step=3", "unknown config key 'step' at 'train.step' (did you mean 'steps'?)"),
    ("task.name=ner", "expected one of 'triple_cls', 'qa'"),
    ("fusion.layers=[9]", "fusion.layers [9]: encoder 'minilm' has 6 layers"),
])
def test_bad_config_fails_before_any_worker(tmp_path, override, message):
    result = run_job(override, f"storage_path={tmp_path}", timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "lm_umls").exists() and "RayTrainWorker" not in result.stdout + result.stderr


def test_shipped_config_validates(monkeypatch):
    import importlib.util

    from bikd.config import load_config

    spec = importlib.util.spec_from_file_location("lm_train_job", REPO / "jobs" / "lm_train.py")
    job = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, job)  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(job)
    cfg = load_config(job.LMJobConfig, str(CONFIG))
    assert (cfg.task.name, cfg.data.dataset, cfg.encoder.name_or_path, cfg.num_workers) == ("triple_cls", "umls", "minilm", 2)
    assert cfg.deepspeed.zero_stage == 2 and cfg.deepspeed.bf16 == "auto" and cfg.kg.export is None


@pytest.mark.slow
def test_triple_classification_zero3_resumes_with_its_history_and_a_finished_run_changes_nothing(tmp_path):
    tiny = [o for o in TINY if not o.startswith("train.steps")] + ["deepspeed.zero_stage=3", "task.max_train=24",
                                                                   "task.max_eval=8", f"storage_path={tmp_path}", "name=umls"]
    check_history(run_job(*tiny, "train.steps=2"), steps=2, eval_every=2)
    result = run_job(*tiny, "train.steps=4")
    check_history(result, steps=4, eval_every=2)  # the whole history, the resumed steps' included
    assert "resumed from the checkpoint of step 2" in result.stdout
    assert "eval (triple classification, umls valid triples + as many corruptions, 16 rows): accuracy " in result.stdout
    assert f"export: {tmp_path}/umls/export" in result.stdout
    metrics = json.loads((tmp_path / "umls" / "metrics.json").read_text())
    assert [row["step"] for row in metrics["history"]] == [1, 2, 3, 4]  # not only the steps after the resume
    assert metrics["resumed_from_step"] == 2
    assert all(row["task_loss"] > 0 and row["kd_entity_loss"] > 0 for row in metrics["history"])
    assert metrics["config"]["deepspeed"]["zero_stage"] == 3 and metrics["final"]["step"] == 4
    model, tok = load_fused(str(tmp_path / "umls" / "export")), load_fused_tokenizer(str(tmp_path / "umls" / "export"))
    enc = tok(["virus [SEP] causes [SEP] disease or syndrome"], return_tensors="pt")
    with torch.no_grad():
        assert model(dict(enc))["logits"].shape == (1, 2)
    assert (tmp_path / "umls" / "checkpoint_000000004" / "bikd_checkpoint.json").exists()

    before = {p: p.read_bytes() for p in (tmp_path / "umls").rglob("*") if p.is_file()}
    again = run_job(*tiny, "train.steps=4")
    assert again.returncode == 0 and "this run finished at step 4" in again.stdout, again.stdout[-2000:]
    assert "RayTrainWorker" not in again.stdout + again.stderr
    assert {p: p.read_bytes() for p in (tmp_path / "umls").rglob("*") if p.is_file()} == before
    other = run_job(*tiny, "train.steps=4", "task.name=qa")
    assert other.returncode == 1 and "belongs to another run" in other.stderr and "Traceback" not in other.stderr
