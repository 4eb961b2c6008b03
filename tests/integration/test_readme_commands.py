"""Every job command the README shows, run as written (plus a small budget: one epoch, a tiny encoder) one
after another in one project folder, after `make demo`, as a new user would paste them."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: what each job gets appended to the README's command so that the whole list runs in a few minutes
BUDGET = {
    "bikd_full.py": ["loop.rounds=1", "loop.kge_epochs_per_round=1", "loop.lm_steps_per_round=2", "valid_limit=100",
                     "probe_limit=40", "lm.encoder.name_or_path=tiny", "lm.encoder.attn_implementation=eager",
                     "lm.fusion.layers=[1]", "lm.kd.num_sampled_candidates=8", "lm.task.max_train=16", "lm.task.max_eval=8",
                     "lm.train.batch_size=4", "lm.train.eval_batch_size=16", "mine.extractor.max_length=32",
                     "mine.extractor.max_train_pairs=64", "mine.num_calib_pairs=32",
                     "mine.mining.candidates.max_candidates=200", "mine.scoring.num_cpus=0.5"],
    "kg_demo.py": ["train.epochs=1"],
    "kge_train.py": ["train.epochs=1", "eval_every=1", "valid_limit=200"],
    "lm_train.py": ["encoder.name_or_path=tiny", "encoder.attn_implementation=eager", "fusion.layers=[1]",
                    "kg.train.epochs=1", "kd.num_sampled_candidates=8", "task.max_train=16", "task.max_eval=8",
                    "train.batch_size=4", "train.eval_batch_size=16", "train.steps=2", "train.log_every=1"],
    "train_extractor.py": ["encoder.name_or_path=tiny", "extractor.max_length=32", "extractor.max_train_pairs=64",
                           "num_calib_pairs=32"],
    "mine.py": ["mining.candidates.max_candidates=200", "scoring.num_cpus=0.5"],
}


def readme_commands() -> list[str]:
    """`make demo ...` and `.venv/bin/python jobs/...` lines of the README's bash blocks, comments removed."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    inline = re.findall(r"`(make demo ARGS=\"[^`]*\")`", (REPO / "README.md").read_text().replace("\n", " "))
    return [line for line in lines if line.startswith(("make demo", ".venv/bin/python jobs/"))] + inline


def argv(command: str) -> list[str]:
    words = shlex.split(command)
    if words[:2] == ["make", "demo"]:
        extra = [w.split("=", 1)[1] for w in words[2:] if w.startswith("ARGS=")]
        return [sys.executable, "jobs/bikd_full.py", *(shlex.split(extra[0]) if extra else [])]
    assert words[0] == ".venv/bin/python", command
    return [sys.executable, *words[1:]]


def test_the_readme_shows_every_job():
    jobs = {Path(argv(c)[1]).name for c in readme_commands()}
    assert jobs == {"bikd_full.py", "kg_demo.py", "kge_train.py", "lm_train.py", "train_extractor.py", "mine.py"}, readme_commands()


@pytest.mark.slow
def test_every_readme_command_runs_as_written(tmp_path, fb15k237_dir):
    project = tmp_path / "project"
    project.mkdir()
    for name in ("jobs", "configs"):
        (project / name).symlink_to(REPO / name)
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(fb15k237_dir.parent)  # the README's ../shared/data
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "BIKD_DATA_DIR", "BIKD_FB15K237_DIR")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    commands = readme_commands()
    assert commands[0] == "make demo"
    for command in commands:
        args = argv(command)
        for override in BUDGET[Path(args[1]).name]:
            args += ["--set", override]
        result = subprocess.run(args, capture_output=True, text=True, cwd=project, env=env, timeout=600)
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    assert sorted(p.name for p in (project / "runs").iterdir()) == [
        "bikd", "extractor_fb15k237", "kg_demo", "kg_demo_nations", "kg_fb15k237", "kge_fb15k237_transe", "kge_umls",
        "kge_umls_local", "lm_umls", "lm_umls_z3"]
