"""Run directories (bikd.runs), the jobs' command-line helpers (bikd.cli) and the resumable epoch loop
(bikd.kge.loop): another run's directory refused, a stop between steps checkpointed and resumed exactly,
the thread count taken from the CPUs the process may use."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from pathlib import Path

import pytest
import torch

from bikd.cli import GracefulStop
from bikd.kg.datasets import load_dataset
from bikd.kge.loop import LocalEpochs, LoopConfig, train_epochs
from bikd.kge.models import ModelConfig
from bikd.kge.training import KGETrainConfig, LocalTrainer
from bikd.runs import RunDir, RunDirMismatch
from bikd.storage import Storage

IDENTITY = {"dataset": "umls", "model": {"name": "complex", "dim": 8}, "backend": "local"}


def test_a_run_directory_belongs_to_one_run(tmp_path):
    storage = Storage(str(tmp_path / "run"))
    assert RunDir(storage, IDENTITY, "choose another").claim({"x": 1}) is False
    assert RunDir(storage, IDENTITY, "choose another").claim({"x": 2}) is True  # a re-run of the same run
    other = RunDir(storage, {**IDENTITY, "dataset": "nations", "backend": "ray"}, "choose another with --set run_dir=...")
    with pytest.raises(RunDirMismatch) as err:
        other.check()
    message = str(err.value)
    assert "made with backend=local, dataset=umls" in message and "this run has backend=ray, dataset=nations" in message
    assert "choose another with --set run_dir=..." in message and "model" not in message
    assert RunDir(storage, IDENTITY, "").recorded()["config"] == {"x": 1}  # the first run's record stays


def test_the_record_names_the_code_and_the_interpreter_that_ran(tmp_path, monkeypatch):
    import subprocess
    import sys

    RunDir(Storage(str(tmp_path / "a")), IDENTITY, "").claim({})
    env = RunDir(Storage(str(tmp_path / "a")), IDENTITY, "").recorded()["environment"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True)
    if head.returncode == 0:  # a checkout: its commit, maybe marked dirty
        assert env["git_commit"].split("-")[0] == head.stdout.strip()
    assert env["python"] == sys.executable and env["versions"]["torch"].startswith("2.13.0") and env["versions"]["bikd"]
    monkeypatch.setenv("BIKD_COMMIT", "abc123")  # a copy without .git says which commit it is
    assert RunDir(Storage(str(tmp_path / "b")), IDENTITY, "").claim({}) is False
    assert RunDir(Storage(str(tmp_path / "b")), IDENTITY, "").recorded()["environment"]["git_commit"] == "abc123"


def test_a_folder_with_foreign_files_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirMismatch, match="holds files but no run.json"):
        RunDir(Storage(str(tmp_path / "run")), IDENTITY, "choose another").claim({})


def test_graceful_stop_first_signal_sets_a_flag_second_sigint_aborts():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)  # Ray Train may have left its own
    with GracefulStop() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # the previous handlers are back


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_thread_count_follows_the_affinity_mask():
    code = "import os; os.sched_setaffinity(0, {0}); from bikd.cli import set_num_threads; import torch; " \
           "print(set_num_threads(None), torch.get_num_threads())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1", "1"]  # torch alone would take every core of the machine


def small_trainer() -> LocalTrainer:
    kg = load_dataset("nations")
    cfg = KGETrainConfig(model=ModelConfig(name="distmult", dim=8), batch_size=256, epochs=3, seed=3)
    return LocalTrainer(kg.train, kg.num_entities, kg.num_relations, cfg)


def test_a_stop_between_steps_resumes_to_the_same_model(tmp_path):
    loop = LoopConfig(epochs=3, eval_every=2)
    reference = LocalEpochs(small_trainer())
    full = train_epochs(reference, RunDir(Storage(str(tmp_path / "a")), IDENTITY, ""), loop, lambda m: 0.5,
                        stop=lambda: None, log=lambda _: None)
    assert full.stopped_by is None and [row["epoch"] for row in full.history] == [1, 2, 3]

    run = RunDir(Storage(str(tmp_path / "b")), IDENTITY, "")
    calls = {"n": 0}

    def stop_at_step_9():  # asked once per step in epoch 2 of 7 steps (1,592 triples / 256)
        calls["n"] += 1
        return signal.SIGINT if calls["n"] >= 9 else None

    first = train_epochs(LocalEpochs(small_trainer()), run, loop, lambda m: 0.5, stop=stop_at_step_9, log=lambda _: None)
    assert first.stopped_by == signal.SIGINT and [row["epoch"] for row in first.history] == [1]
    progress = run.progress()
    assert progress["mid_epoch"] and progress["epochs_done"] == 1 and not progress["finished"]
    assert (tmp_path / "b" / "checkpoints" / progress["checkpoint"]).exists()

    resumed = LocalEpochs(small_trainer())
    second = train_epochs(resumed, run, loop, lambda m: 0.5, stop=lambda: None, log=lambda _: None)
    assert second.resumed_from == 1 and [row["epoch"] for row in second.history] == [1, 2, 3]
    assert torch.equal(resumed.model().entity, reference.model().entity)  # no step lost or trained twice
    assert torch.equal(resumed.model().relation, reference.model().relation)
    assert len(os.listdir(tmp_path / "b" / "checkpoints")) == 2  # older checkpoints are deleted
