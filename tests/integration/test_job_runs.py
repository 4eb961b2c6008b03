"""What a new user runs into with the jobs: which KG a run reads, run directories that belong to one run,
a clean stop at Ctrl-C that resumes, one-line errors, the thread count, untrained models that mine."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bikd.kg.datasets import dataset_dir
from bikd.kg.store import KGStore
from bikd.storage import Storage

REPO = Path(__file__).resolve().parents[2]


def job_args(job: str, *overrides: str, config: str | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    args = [sys.executable, str(REPO / "jobs" / job)] + (["--config", str(REPO / "configs" / config)] if config else [])
    for o in overrides:
        args += ["--set", o]
    return args + list(extra)


def job_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return env


def run(job: str, *overrides: str, config: str | None = None, extra: tuple[str, ...] = (), prefix: tuple[str, ...] = (),
        timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, *job_args(job, *overrides, config=config, extra=extra)], capture_output=True, text=True,
                          cwd=REPO, env=job_env(), timeout=timeout)


def kg_folder(root: Path, source: str = "nations", name: str = "my-kg") -> Path:
    folder = root / name
    folder.mkdir()
    for split in ("train", "valid", "test"):
        shutil.copy(Path(dataset_dir(source)) / f"{split}.txt", folder / f"{split}.txt")
    return folder


def one_line_error(result: subprocess.CompletedProcess, *expected: str) -> str:
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr[-3000:]
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


# ---- 1. which KG a run reads -----------------------------------------------------------------------------

def test_data_path_alone_trains_on_that_kg_and_labels_the_run_with_it(tmp_path):
    data, run_dir = kg_folder(tmp_path), tmp_path / "run"
    result = run("kg_demo.py", f"data.path={data}", "train.epochs=1", "train.model.dim=8", f"run_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "my-kg: 14 entities, 55 relations" in result.stdout and "umls" not in result.stdout.split("torch threads")[1]
    assert json.loads((run_dir / "run.json").read_text())["identity"]["dataset"] == "my-kg"


@pytest.mark.parametrize("job, config", [("kg_demo.py", None), ("kge_train.py", "kge_umls.yaml")])
def test_data_path_beside_an_embedded_dataset_is_refused(tmp_path, job, config):
    result = run(job, "data.dataset=umls", f"data.path={tmp_path}", f"run_dir={tmp_path / 'run'}", config=config)
    assert result.returncode == 2 and "would be ignored" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_every_count_the_loader_drops_or_merges_is_printed_and_recorded(tmp_path):
    data, run_dir = kg_folder(tmp_path), tmp_path / "run"
    train = data / "train.txt"
    lines = train.read_text().splitlines()
    h, r, t = lines[0].split("\t")
    # a BOM, the first triple again, and it once more with a padded head (merged into the same label)
    train.write_text("\ufeff" + "\n".join(lines + [lines[0], f" {h}\t{r}\t{t}"]) + "\n", encoding="utf-8")
    result = run("kge_train.py", "backend=local", "train.epochs=1", "data.dataset=null", f"data.path={data}",
                 f"run_dir={run_dir}", config="kge_umls.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "my-kg: 14 entities, 55 relations; train 1592 (stripped a UTF-8 BOM; stripped surrounding whitespace from " \
           "1 column; merged 1 label differing only by surrounding whitespace; dropped 2 duplicate triples)" in result.stdout
    counts = json.loads((run_dir / "metrics.json").read_text())["data"]
    assert (counts["train.bom_stripped"], counts["train.num_duplicates"], counts["train.num_labels_merged"]) == (1, 2, 1)
    assert counts["valid.num_duplicates"] == 0


# ---- 2. a run directory belongs to one run ---------------------------------------------------------------

def test_demo_refuses_another_datasets_run_directory_before_training(tmp_path):
    run_dir = tmp_path / "run"
    assert run("kg_demo.py", "train.epochs=1", "train.model.dim=8", f"run_dir={run_dir}").returncode == 0
    result = run("kg_demo.py", "data.dataset=nations", "train.epochs=1", f"run_dir={run_dir}")
    one_line_error(result, "belongs to another run", "made with data=umls, dataset=umls",
                   "this run has data=nations, dataset=nations", "--set run_dir=")
    assert "epoch " not in result.stdout
    assert KGStore(Storage(str(run_dir / "kg"))).read(0).entities[0] != "brazil"  # the UMLS store is untouched


def test_two_backends_do_not_share_a_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    first = run("kge_train.py", "backend=local", "train.epochs=1", f"run_dir={run_dir}", config="kge_umls.yaml")
    assert first.returncode == 0, first.stderr[-3000:]
    before = (run_dir / "metrics.json").read_text()
    result = run("kge_train.py", "backend=ray", "train.epochs=1", f"run_dir={run_dir}", config="kge_umls.yaml")
    one_line_error(result, "made with backend=local", "this run has backend=ray")
    assert "Ray" not in result.stdout and (run_dir / "metrics.json").read_text() == before


# ---- 3. untrained models, finished runs ------------------------------------------------------------------

def test_zero_epochs_is_rejected(tmp_path):
    result = run("kg_demo.py", "train.epochs=0", f"run_dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "epochs must be >= 1" in result.stderr
    assert not (tmp_path / "run").exists()


def test_demo_mines_nothing_itself_and_exports_for_the_mining_job(tmp_path):
    # the demo used to commit top-k tails of the *test* queries; mining is jobs/mine.py's (issue 12), whose
    # floor under every threshold is tests/unit/test_mining.py::test_no_round_commits_below_min_confidence
    run_dir = tmp_path / "run"
    result = run("kg_demo.py", "train.epochs=1", f"run_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert KGStore(Storage(str(run_dir / "kg"))).head == 0
    assert (run_dir / "export" / "model.json").exists() and "jobs/mine.py" in result.stdout


# ---- 4. Ctrl-C: stop cleanly, resume ---------------------------------------------------------------------

def interrupt(args: list[str], after: str, group: bool = True) -> subprocess.CompletedProcess:
    """Starts a job and sends SIGINT (to its whole process group, as a terminal's Ctrl-C does) once a
    stdout line starts with ``after``."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=job_env(),
                            start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(after):
            (os.killpg(proc.pid, signal.SIGINT) if group else proc.send_signal(signal.SIGINT))
            break
    out, err = proc.communicate(timeout=240)
    return subprocess.CompletedProcess(args, proc.returncode, "".join(seen) + out, err)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "ray"])
def test_ctrl_c_checkpoints_and_the_same_command_resumes(tmp_path, backend):
    run_dir = tmp_path / "run"
    overrides = (f"backend={backend}", "train.epochs=60", "eval_every=100", f"run_dir={run_dir}")
    stopped = interrupt(job_args("kge_train.py", *overrides, config="kge_umls.yaml"), after="epoch   2")
    assert stopped.returncode == 128 + signal.SIGINT, stopped.stderr[-3000:]
    assert "SIGINT: stopping after the current" in stopped.stderr and "Traceback" not in stopped.stderr
    assert "run the same command again to resume from it" in stopped.stdout
    progress = json.loads((run_dir / "progress.json").read_text())
    done = progress["epochs_done"]
    assert done >= 2 and not progress["finished"] and not (run_dir / "metrics.json").exists()

    resumed = run("kge_train.py", *overrides[:1], "train.epochs=" + str(done + 2), *overrides[2:], config="kge_umls.yaml")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from " in resumed.stdout
    assert ("(mid-epoch)" in resumed.stdout) == progress["mid_epoch"]
    # only what was left: a partial epoch (the signal landed inside epoch done + 1) is finished, not redone
    epochs = [line.split()[1] for line in resumed.stdout.splitlines() if line.startswith("epoch ")]
    assert epochs == [str(done + 1), str(done + 2)], resumed.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["epochs"]] == list(range(1, done + 3))  # the whole history
    assert metrics["resumed_from_epoch"] == done


def test_a_finished_run_says_so_and_changes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    overrides = ("backend=local", "train.epochs=2", f"run_dir={run_dir}")
    assert run("kge_train.py", *overrides, config="kge_umls.yaml").returncode == 0
    files = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    again = run("kge_train.py", *overrides, config="kge_umls.yaml")
    assert again.returncode == 0 and "this run finished (2 epochs)" in again.stdout and "epoch " not in again.stdout
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == files


# ---- 5. errors a user makes ------------------------------------------------------------------------------

@pytest.mark.parametrize("job, config", [("kg_demo.py", None), ("kge_train.py", "kge_umls.yaml"), ("lm_train.py", "lm_umls.yaml")])
def test_a_missing_data_folder_is_one_line(tmp_path, job, config):
    missing = tmp_path / "nowhere"
    where = f"storage_path={tmp_path}" if job == "lm_train.py" else f"run_dir={tmp_path / 'run'}"
    result = run(job, "data.dataset=null", f"data.path={missing}", where, config=config)
    one_line_error(result, f"{missing}: does not exist; expected a folder holding train.txt")
    debug = run(job, "data.dataset=null", f"data.path={missing}", where, config=config, extra=("--debug",))
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_a_bad_demo_value_is_one_line(tmp_path):
    result = run("kg_demo.py", "train.batch_size=0", f"run_dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 3, result.stderr  # usage + the error line


# ---- 9. threads ------------------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset")
def test_local_backend_uses_the_cpus_it_may_run_on(tmp_path):
    result = run("kge_train.py", "backend=local", "train.epochs=1", f"run_dir={tmp_path / 'run'}", config="kge_umls.yaml",
                 prefix=("taskset", "-c", "0"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch threads: 1" in result.stdout
    pinned = run("kge_train.py", "backend=local", "train.epochs=1", "num_threads=2", f"run_dir={tmp_path / 'run2'}",
                 config="kge_umls.yaml")
    assert "torch threads: 2" in pinned.stdout
