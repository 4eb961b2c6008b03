"""Placement across nodes: the bidirectional job on three simulated nodes (ray.cluster_utils.Cluster: one for
the driver, one marked with the custom resource ``kge``, one with ``lm``) puts the KGE trainers on the KGE
node and the LM workers and the mining pool on the LM node, because the config's resources say so, and
finishes. Where each actor ran is read back from the run's placement.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_bikd import TINY, write_kg

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_each_side_runs_on_the_nodes_its_resources_name(tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the driver's node: no work of its own
    try:
        kge_node = cluster.add_node(num_cpus=1, resources={"kge": 1})
        lm_node = cluster.add_node(num_cpus=2, resources={"lm": 2})
        cluster.wait_for_nodes()
        kg, run_dir = write_kg(tmp_path), tmp_path / "run"
        args = [sys.executable, str(REPO / "jobs" / "bikd_full.py")]
        for o in ("data.dataset=null", f"data.path={kg}", f"run_dir={run_dir}", *TINY, "loop.rounds=1",
                  "kge_dist.resources_per_trainer={kge: 1}", "lm.resources_per_worker={lm: 1}",
                  "mine.scoring.resources={lm: 1}"):
            args += ["--set", o]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": cluster.address}
        out = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "done after round 1" in out.stdout
        placed = json.loads((run_dir / "placement.json").read_text())
        assert placed["driver"] == cluster.head_node.node_id
        assert placed["kge_trainers"] == [kge_node.node_id]
        assert placed["lm_workers"] == [lm_node.node_id]
        assert placed["mining_actors"] == [lm_node.node_id]

        # a resource no node offers fails before any actor starts, naming it
        bad = args + ["--set", f"run_dir={tmp_path / 'bad'}", "--set", "lm.resources_per_worker={gpu_node: 1}"]
        out = subprocess.run(bad, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
        assert out.returncode != 0 and "'gpu_node'" in out.stdout + out.stderr, out.stdout[-2000:] + out.stderr[-2000:]
    finally:
        cluster.shutdown()
