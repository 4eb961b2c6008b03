"""``ray job submit``, for real: a Ray head started here on 127.0.0.1 (``ray start --head --block``, token
authentication on, non-default ports, its own ``--temp-dir``, the dashboard on 127.0.0.1 only) runs
``jobs/bikd_full.py`` on a tiny KG, submitted with the command a user types; a submission without the token
is refused. The head is stopped by killing the process group this test started (never ``ray stop``, which
would end every Ray process on the machine)."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
import yaml

from bikd.config import apply_overrides
from tiny_bikd import TINY, write_kg

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the project's environment: `ray` and the job's `python` come from here
pytestmark = pytest.mark.slow


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture
def head(tmp_path):
    """A token-authenticated Ray head on 127.0.0.1; yields (dashboard URL, env holding the token)."""
    token_path = tmp_path / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
               HOME=str(tmp_path))  # no ~/.ray/auth_token of the user's sneaks in
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 characters
    gcs, dash, client, agent, metrics, lo = free_ports(6)
    log = open(tmp_path / "head.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}", f"--metrics-export-port={metrics}",
         f"--min-worker-port={lo}", f"--max-worker-port={lo + 200}", f"--temp-dir={temp_dir}", "--num-cpus=2"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:  # the job server answers (401 without the token) once the head is up
            assert proc.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the Ray head did not start in 120 s"
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                time.sleep(1.0)
        yield url, env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def upload_size(runtime_env: dict) -> tuple[int, list[str]]:
    """The zip Ray uploads for ``--working-dir .`` with these excludes (Ray's own packaging): bytes, names."""
    from ray._private.runtime_env.packaging import _zip_files

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "pkg.zip"
        _zip_files(str(REPO), runtime_env.get("excludes", []), str(path), include_gitignore=True)  # .gitignore too, as Ray does
        with zipfile.ZipFile(path) as z:
            return path.stat().st_size, z.namelist()


def test_ray_job_submit_runs_the_job_and_refuses_a_submission_without_the_token(head, tmp_path):
    url, env = head
    kg = write_kg(tmp_path)
    config = tmp_path / "tiny.yaml"
    overrides = ["data.dataset=null", f"data.path={kg}", f"run_dir={tmp_path / 'run'}", *TINY]
    config.write_text(yaml.safe_dump(apply_overrides({}, overrides)))  # the tiny job as a config file

    runtime_env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    size, names = upload_size(runtime_env)
    print(f"working-dir upload: {size / 1e6:.2f} MB, {len(names)} files")
    assert size < 5_000_000 and "jobs/bikd_full.py" in names
    assert not any(n.startswith((".venv/", ".git/", "runs/")) or "__pycache__" in n for n in names)

    submit = [str(BIN / "ray"), "job", "submit", "--address", url, "--runtime-env", "cluster/runtime_env.yaml",
              "--working-dir", ".", "--", "python", "jobs/bikd_full.py", "--config", str(config)]
    out = subprocess.run(submit, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0 and "done after round 2" in out.stdout, out.stdout[-4000:] + out.stderr[-3000:]  # streamed back
    job_id = re.search(r"raysubmit_\w+", out.stdout).group(0)
    ask = f"from ray.job_submission import JobSubmissionClient as C; print(C({url!r}).get_job_status({job_id!r}).value)"
    status = subprocess.run([sys.executable, "-c", ask], env=env, capture_output=True, text=True, timeout=120)
    assert status.stdout.strip() == "SUCCEEDED", status.stdout + status.stderr[-2000:]
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and json.loads((run / "progress.json").read_text())["finished"]
    record = json.loads((run / "run.json").read_text())["environment"]
    assert Path(record["python"]).parent == BIN  # the job's `python` was the project's environment

    anonymous = {**env, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "no_such_token")}
    refused = subprocess.run(submit, cwd=REPO, env=anonymous, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    said = (refused.stdout + refused.stderr).lower()
    assert "auth" in said or "401" in said or "token" in said, said[-2000:]
