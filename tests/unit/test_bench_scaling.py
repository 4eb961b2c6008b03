"""bench/kge_scaling.py's fit and model: docs/SCALING.md's figures follow from the committed JSON."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.kge_scaling import exchange_fit, fit, model, tables  # noqa: E402

RESULT = ROOT / "bench" / "results" / "kge_scaling.json"


def test_the_fit_recovers_known_costs_and_checks_each_run():
    runs = {f"run{i}": {"calls_per_step": calls, "rows_per_step": rows, "server_rows_per_call": 2 * rows / calls,
                        "exchange_ms_per_step": 0.3 + 0.6 * calls + 0.002 * rows,
                        "overhead_ms_per_step": 0.5 + 0.4 * calls + 0.004 * rows,
                        "server_cpu_ms_per_call": 1.4 + 0.002 * (2 * rows / calls)}
            for i, (calls, rows) in enumerate([(1.0, 450), (1.0, 80), (0.25, 380), (0.25, 60), (0.125, 330), (0.125, 55)])}
    out = exchange_fit(runs)
    assert out["exchange"] == pytest.approx([0.3, 0.6, 0.002])
    assert out["overhead"] == pytest.approx([0.5, 0.4, 0.004])
    assert out["server"] == pytest.approx([1.4, 0.002])
    assert all(r["exchange_predicted"] == pytest.approx(r["exchange_ms_per_step"]) for r in runs.values())
    assert fit([([1.0, 1.0], -1.0), ([1.0, 2.0], -2.0)]) == [0.0, 0.0]  # a cost is never negative


@pytest.mark.skipif(not RESULT.exists(), reason="no committed kge_scaling result")
def test_the_committed_model_follows_from_its_fit_and_counts():
    result = json.loads(RESULT.read_text())
    d, m = result["details"], result["metrics"]
    again = model(d["fitted"], d["counts"], m["local_ms_per_step_2thread"], SimpleNamespace(dim=result["args"]["dim"]))
    assert again.keys() == d["model"].keys()
    for key, row in again.items():
        assert row == pytest.approx(d["model"][key]), key
    # the metrics are there, and the tables the docs quote render from the file
    for name in ("overhead_ms_per_step_1node", "overhead_ms_per_step_2node", "remote_rows_per_step_2part",
                 "remote_rows_per_step_4part", "calls_per_step_4part", "ray_2trainers_vs_local"):
        assert isinstance(m[name], float | int), name
    text = tables(result)
    assert "| freebase | 16 | 4 | 4 | local |" in text and result["commit"] in text
