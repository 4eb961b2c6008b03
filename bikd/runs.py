"""A run directory that knows which run it belongs to, and where an interrupted run resumes.

The first run in a directory writes ``run.json``: what the run *is* (its identity: dataset, model, backend,
...), the config it was made with, and what ran it (:func:`environment`: the code's git commit, the
interpreter, the versions of the main packages). A later run in the same directory must have the same identity, else
it is refused before any work, naming both; it may differ in anything else (more epochs, another learning
rate) and then continues the earlier one. ``progress.json`` records where a run is (the last checkpoint,
the epochs done, the metric history) and is written after that checkpoint is complete, so what it names
always exists.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from bikd.storage import Storage

__all__ = ["RunDir", "RunDirMismatch", "environment"]

RUN_FILE, PROGRESS_FILE = "run.json", "progress.json"


class RunDirMismatch(ValueError):
    """The run directory was made by a run with another identity."""


def _git_commit() -> str | None:
    """The commit of the checkout bikd runs from (``-dirty`` with modified tracked files); $BIKD_COMMIT where
    set (a copy without .git, e.g. a ``ray job submit`` working directory); None when neither says."""
    if os.environ.get("BIKD_COMMIT"):
        return os.environ["BIKD_COMMIT"]
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return sha.stdout.strip() + ("-dirty" if dirty else "")


def environment() -> dict[str, Any]:
    """What runs this code: git commit, interpreter (path and version), host, versions of the main packages."""
    versions = {}
    for name in ("bikd", "torch", "ray", "deepspeed", "transformers", "pykeen", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"git_commit": _git_commit(), "python": sys.executable, "python_version": platform.python_version(),
            "host": platform.node(), "versions": versions}


def _show(identity: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v}" for k, v in identity.items())


class RunDir:
    """``identity``: the keys two runs must share to write one directory (plain JSON values).
    ``choose``: how a user points the job at another directory, for the error message."""

    def __init__(self, storage: Storage, identity: Mapping[str, Any], choose: str):
        self.storage, self.identity, self.choose = storage, json.loads(json.dumps(dict(identity))), choose

    @property
    def url(self) -> str:
        return self.storage.url

    def recorded(self) -> dict | None:
        """The ``run.json`` of the run that made this directory, or None for a new directory."""
        if not self.storage.exists(RUN_FILE):
            return None
        return json.loads(self.storage.read_text(RUN_FILE))

    def check(self) -> bool:
        """Raises RunDirMismatch when the directory belongs to another run; True when it is this run's
        (a re-run or a resume), False when it is new. Writes nothing."""
        recorded = self.recorded()
        if recorded is None:
            if self.storage.ls():
                raise RunDirMismatch(
                    f"run directory {self.url} holds files but no {RUN_FILE} (made by another program or an older bikd); "
                    f"{self.choose}, or delete that directory")
            return False
        theirs = recorded.get("identity", {})
        if theirs != self.identity:
            differ = [k for k in sorted(set(theirs) | set(self.identity)) if theirs.get(k) != self.identity.get(k)]
            raise RunDirMismatch(
                f"run directory {self.url} belongs to another run: it was made with {_show({k: theirs.get(k) for k in differ})}, "
                f"this run has {_show({k: self.identity.get(k) for k in differ})}; {self.choose}, or delete that directory")
        return True

    def claim(self, config: Mapping[str, Any]) -> bool:
        """``check``, then record this run in a new directory. Returns True when the directory was this run's."""
        if self.check():
            return True
        record = {"identity": self.identity, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  "config": dict(config), "environment": environment()}
        try:
            self.storage.write_text(RUN_FILE, json.dumps(record, indent=2), exclusive=True)
        except FileExistsError:  # another run claimed it between the check and now: same rule as above
            return self.check()
        return False

    def progress(self) -> dict | None:
        if not self.storage.exists(PROGRESS_FILE):
            return None
        return json.loads(self.storage.read_text(PROGRESS_FILE))

    def save_progress(self, progress: Mapping[str, Any]) -> None:
        self.storage.write_text(PROGRESS_FILE, json.dumps(dict(progress), indent=1))

    def mark_finished(self, **fields: Any) -> None:
        """Recorded once the run's results are written: a re-run with the same config then does nothing."""
        self.save_progress({**(self.progress() or {}), **fields, "finished": True})

    def finished(self) -> dict | None:
        """The progress of a finished run, else None."""
        progress = self.progress()
        return progress if progress and progress.get("finished") else None

    def clear_progress(self) -> None:
        self.storage.delete(PROGRESS_FILE)
