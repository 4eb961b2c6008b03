"""bench/ablation.py keeps the runs an interrupted invocation finished in its --work-dir (same config only)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.ablation import finished_run  # noqa: E402
from bikd.config import load_config, to_dict  # noqa: E402
from bikd.driver import BikdConfig  # noqa: E402

OVERRIDES = ["loop.mode=sync", "loop.directions=kg2lm", "seed=1"]


def make_run(run_dir: Path, overrides: list[str], finished: bool = True, drop: str | None = None) -> None:
    run_dir.mkdir(parents=True)
    config = json.loads(json.dumps(to_dict(load_config(BikdConfig, None, [f"run_dir={run_dir}", *overrides]))))
    if drop:  # a key this checkout has and the run's older checkout had not
        del config["kge_dist"][drop]
    (run_dir / "run.json").write_text(json.dumps({"config": config, "environment": {"git_commit": "abc123"}}))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"round": 1, "kg_valid_mrr": 0.3}) + "\n")
    (run_dir / "progress.json").write_text(json.dumps({"round": 1, "kg_test": {"mrr": 0.2}, "finished": finished}))


def test_a_finished_run_with_the_same_config_is_kept(tmp_path):
    make_run(tmp_path / "a", OVERRIDES, drop="prefetch")
    rows, final, commit, added = finished_run(tmp_path / "a", None, OVERRIDES)
    assert rows == [{"round": 1, "kg_valid_mrr": 0.3}] and final["kg_test"]["mrr"] == 0.2
    assert commit == "abc123" and added == ["kge_dist.prefetch"]


def test_an_unfinished_run_is_removed_and_another_config_refused(tmp_path):
    assert finished_run(tmp_path / "none", None, OVERRIDES) is None
    make_run(tmp_path / "b", OVERRIDES, finished=False)
    assert finished_run(tmp_path / "b", None, OVERRIDES) is None and not (tmp_path / "b").exists()  # rerun whole
    make_run(tmp_path / "c", OVERRIDES)
    with pytest.raises(SystemExit, match="another config.*loop.directions"):
        finished_run(tmp_path / "c", None, ["loop.mode=sync", "loop.directions=both", "seed=1"])
