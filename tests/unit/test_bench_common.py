"""bench/common.py: a result names the commit the run STARTED at, from a clean tree (or says it was dirty),
with the run's arguments and the load average at start and end."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import common  # noqa: E402
from bench.common import add_common_args, start_run  # noqa: E402


def git(repo: Path, *args: str) -> str:
    cmd = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "-c", "commit.gpgsign=false", *args]
    return subprocess.run(cmd, cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A git repository with one committed file; $BIKD_COMMIT unset."""
    monkeypatch.delenv("BIKD_COMMIT", raising=False)
    path = tmp_path / "repo"
    path.mkdir()
    git(path, "init", "-q")
    (path / "recipe.txt").write_text("transe lr 0.1\n")
    git(path, "add", "recipe.txt")
    git(path, "commit", "-q", "-m", "first")
    return path


def head(repo: Path) -> str:
    return git(repo, "rev-parse", "--short=12", "HEAD")


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path("/tmp/x"))
    add_common_args(p)
    return p.parse_args(list(argv))


def test_clean_tree_runs_and_untracked_files_do_not_count(repo, tmp_path):
    (repo / "scratch.log").write_text("untracked\n")
    run = start_run("demo", parse(), repo=repo)
    assert run.commit == head(repo) and not run.allow_dirty
    record = json.loads(run.write({"x": 1.0}, out_dir=tmp_path / "out").read_text())
    assert record["commit"] == head(repo) and record["allow_dirty"] is False
    for key in ("benchmark", "commit", "machine", "date", "args", "loadavg_start", "loadavg_end", "metrics"):
        assert key in record, key


def test_dirty_tree_is_refused(repo):
    (repo / "recipe.txt").write_text("transe lr 0.5\n")
    with pytest.raises(SystemExit, match="--allow-dirty") as exc:
        start_run("demo", parse(), repo=repo)
    assert "uncommitted changes" in str(exc.value)
    git(repo, "add", "recipe.txt")  # staged but not committed: still dirty
    with pytest.raises(SystemExit):
        start_run("demo", parse(), repo=repo)


def test_allow_dirty_is_recorded(repo, tmp_path):
    (repo / "recipe.txt").write_text("transe lr 0.5\n")
    run = start_run("demo", parse("--allow-dirty"), repo=repo)
    record = json.loads(run.write({"x": 1.0}, out_dir=tmp_path).read_text())
    assert record["commit"] == head(repo) + "-dirty"
    assert record["allow_dirty"] is True and record["args"]["allow_dirty"] is True


def test_commit_is_taken_at_start(repo, tmp_path):
    run = start_run("demo", parse(), repo=repo)
    first = head(repo)
    (repo / "recipe.txt").write_text("transe lr 0.5\n")  # the recipe changes while the benchmark runs
    git(repo, "commit", "-q", "-am", "second")
    assert head(repo) != first
    record = json.loads(run.write({"x": 1.0}, out_dir=tmp_path).read_text())
    assert record["commit"] == first


def test_args_and_load_average_are_recorded(repo, tmp_path, monkeypatch):
    loads = iter([(5.0, 4.0, 3.0), (7.5, 6.0, 4.25)])
    monkeypatch.setattr(common.os, "getloadavg", lambda: next(loads))
    run = start_run("demo", parse("--steps", "3"), repo=repo)
    path = run.write({"pos_per_s": 12.5, "n": 3}, {"note": (1, Path("/a"))}, suffix="_smoke", out_dir=tmp_path)
    assert path == tmp_path / "demo_smoke.json"
    record = json.loads(path.read_text())
    assert record["benchmark"] == "demo"
    assert record["args"] == {"steps": 3, "out": "/tmp/x", "allow_dirty": False}
    assert record["loadavg_start"] == [5.0, 4.0, 3.0] and record["loadavg_end"] == [7.5, 6.0, 4.25]
    assert record["metrics"] == {"pos_per_s": 12.5, "n": 3}
    assert record["details"] == {"note": [1, "/a"]}


def test_metrics_must_be_flat(repo, tmp_path):
    run = start_run("demo", parse(), repo=repo)
    with pytest.raises(AssertionError):
        run.write({"nested": {"a": 1.0}}, out_dir=tmp_path)


def test_bikd_commit_names_a_copy_without_git(tmp_path, monkeypatch):
    copy = tmp_path / "copy"
    copy.mkdir()
    monkeypatch.delenv("BIKD_COMMIT", raising=False)
    with pytest.raises(SystemExit, match="no git checkout"):
        start_run("demo", parse(), repo=copy)
    assert start_run("demo", parse("--allow-dirty"), repo=copy).commit == "unknown"
    monkeypatch.setenv("BIKD_COMMIT", "0123456789ab")
    run = start_run("demo", parse(), repo=copy)
    assert run.commit == "0123456789ab" and not run.allow_dirty


def test_machine_is_described_at_start(repo, tmp_path):
    import torch

    threads = torch.get_num_threads()
    run = start_run("demo", parse(), repo=repo)
    try:
        torch.set_num_threads(threads + 1)  # a benchmark sets its own thread counts as it goes
        record = json.loads(run.write({"x": 1.0}, out_dir=tmp_path).read_text())
    finally:
        torch.set_num_threads(threads)
    assert f"({threads} threads)" in record["machine"]
