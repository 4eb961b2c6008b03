"""Every filesystem bikd opens gives up on an endpoint that accepts connections and never answers.

The endpoint is a real listening socket on 127.0.0.1 that accepts and then says nothing (the accepted
sockets stay open, so the client sees a live, silent peer, not a reset). Each call runs in a thread with a
deadline, so a regression fails the test instead of hanging CI.
"""

from __future__ import annotations

import pickle
import socket
import threading
import time
from dataclasses import dataclass

import pytest

from bikd.storage import Storage, StorageError, open_url, url_exists

LIMIT_S = 30.0  # far above what the tight limits below need (~1-3 s), far below an unbounded wait


class SilentEndpoint:
    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed at teardown
                return
            self.accepted.append(conn)  # kept open and never read from nor written to

    def close(self):
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() below; close() alone would not
        self.sock.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture
def silent():
    endpoint = SilentEndpoint()
    yield endpoint
    endpoint.close()


@pytest.fixture
def tight(monkeypatch):
    """Tiny limits through the environment, as a job would set them."""
    monkeypatch.setenv("BIKD_STORAGE_CONNECT_TIMEOUT", "0.5")
    monkeypatch.setenv("BIKD_STORAGE_READ_TIMEOUT", "0.5")
    monkeypatch.setenv("BIKD_STORAGE_ATTEMPTS", "2")


@pytest.fixture
def silent_s3(silent, tight, monkeypatch):
    """The AWS variables pointing botocore at the silent endpoint; returns its URL."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", silent.url)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    return silent.url


def within(fn, limit_s: float = LIMIT_S):
    """``(result or exception, seconds)`` of ``fn()``; fails the test when it takes more than ``limit_s``."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["value"] = e

    start = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)  # a hung call must not keep pytest alive
    thread.start()
    thread.join(limit_s)
    if thread.is_alive():
        pytest.fail(f"still waiting after {limit_s:.0f} s: the call has no bound")
    return out["value"], time.monotonic() - start


def assert_storage_error(value, url: str, op: str):
    assert isinstance(value, StorageError), f"expected StorageError, got {value!r}"
    text = str(value)
    assert url in text and text.startswith(op), text
    assert "after " in text and "read timeout 0.5 s" in text and "attempts 2" in text, text
    assert "BIKD_STORAGE_READ_TIMEOUT" in text, text


OPS = {
    "read_text": ("reading", "run/config.yaml", lambda s: s.read_text("config.yaml")),
    "exists": ("checking", "run/config.yaml", lambda s: s.exists("config.yaml")),
    "write_text": ("writing", "run/out.json", lambda s: s.write_text("out.json", "{}")),
    "ls": ("listing", "run", lambda s: s.ls("")),
    "iter_lines": ("opening", "run/lines.txt", lambda s: list(s.iter_lines("lines.txt"))),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_storage_gives_up_on_silent_s3(silent_s3, name):
    op, rel, call = OPS[name]
    storage = Storage("s3://bucket/run")
    value, waited = within(lambda: call(storage))
    assert_storage_error(value, f"s3://bucket/{rel}", op)
    assert waited < LIMIT_S


def test_large_write_to_peer_that_stops_reading(silent_s3):
    """A body larger than the socket buffers: the peer's window closes while the PUT is being sent,
    before any read timeout starts."""
    if not hasattr(socket, "TCP_USER_TIMEOUT"):
        pytest.skip("needs TCP_USER_TIMEOUT (Linux)")
    storage = Storage("s3://bucket/run")
    value, _ = within(lambda: storage.write_bytes("shard.pt", b"\0" * (24 << 20)))
    assert_storage_error(value, "s3://bucket/run/shard.pt", "writing")


def test_open_url_and_url_exists_give_up(silent_s3):
    value, _ = within(lambda: open_url("s3://bucket/data/train.txt").read())
    assert_storage_error(value, "s3://bucket/data/train.txt", "opening")
    value, _ = within(lambda: url_exists("s3://bucket/data/train.txt"))
    assert_storage_error(value, "s3://bucket/data/train.txt", "checking")


def test_http_urls_give_up(silent, tight):
    url = f"{silent.url}/squad/dev-v1.1.json"
    value, _ = within(lambda: open_url(url).read())
    assert isinstance(value, StorageError) and url in str(value) and "read timeout 0.5 s" in str(value), repr(value)
    # fsspec's HTTP exists answers False to any aiohttp error; a stalled endpoint is not a missing file
    value, _ = within(lambda: url_exists(url))
    assert isinstance(value, StorageError) and url in str(value), repr(value)


@dataclass(kw_only=True, frozen=True)
class _Job:
    name: str = "x"
    epochs: int = 1


def test_load_config_gives_up_on_silent_s3(silent_s3):
    from bikd.config import load_config

    value, _ = within(lambda: load_config(_Job, "s3://bucket/jobs/x.yaml"))
    assert_storage_error(value, "s3://bucket/jobs/x.yaml", "reading")


def test_ray_storage_filesystem_gives_up(silent_s3):
    """The pyarrow filesystem Ray Train checkpoints through, also after pickling (Ray ships it to workers)."""
    from bikd.ray.lm_train import ray_storage

    path, fs = ray_storage("s3://bucket/runs")
    assert path == "bucket/runs"
    for pafs in (fs, pickle.loads(pickle.dumps(fs))):
        value, _ = within(lambda: pafs.get_file_info(f"{path}/exp/checkpoint_000001"))
        assert_storage_error(value, "s3://bucket/runs/exp/checkpoint_000001", "checking")
        # fsspec's isfile turns any error into "not a file": must not come out as FileNotFoundError
        value, _ = within(lambda: pafs.open_input_stream(f"{path}/exp/state.pkl"))
        assert_storage_error(value, "s3://bucket/runs/exp/state.pkl", "opening")


def test_healthy_filesystem_is_not_reused_for_a_new_endpoint(s3_url, silent, tight, monkeypatch):
    """fsspec caches filesystems by their options, and botocore takes the endpoint from the environment
    behind that key: an instance made for the earlier (healthy) endpoint must not answer for the new one."""
    Storage(f"{s3_url}/run").write_text("config.yaml", "epochs: 1\n")  # against moto, cached
    monkeypatch.setenv("AWS_ENDPOINT_URL", silent.url)
    value, _ = within(lambda: Storage(f"{s3_url}/run").read_text("config.yaml"))
    assert_storage_error(value, f"{s3_url}/run/config.yaml", "reading")


def test_limits_defaults_env_and_user_options(monkeypatch):
    from bikd.storage import with_limits

    for name in ("BIKD_STORAGE_CONNECT_TIMEOUT", "BIKD_STORAGE_READ_TIMEOUT", "BIKD_STORAGE_ATTEMPTS", "AWS_MAX_ATTEMPTS",
                 "AWS_RETRY_MODE"):
        monkeypatch.delenv(name, raising=False)
    config = with_limits("s3", {})["config_kwargs"]
    assert (config["connect_timeout"], config["read_timeout"]) == (10.0, 60.0)
    assert config["retries"] == {"total_max_attempts": 3, "mode": "standard"}
    monkeypatch.setenv("BIKD_STORAGE_READ_TIMEOUT", "7")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "5")
    config = with_limits("s3", {"config_kwargs": {"connect_timeout": 2}})["config_kwargs"]
    assert (config["connect_timeout"], config["read_timeout"], config["retries"]["total_max_attempts"]) == (2, 7.0, 5)
    mine = {"config_kwargs": {"read_timeout": 300, "retries": {"max_attempts": 9}}}
    assert with_limits("s3", mine)["config_kwargs"]["retries"] == {"max_attempts": 9}
    assert mine == {"config_kwargs": {"read_timeout": 300, "retries": {"max_attempts": 9}}}  # not mutated
    assert with_limits("http", {})["client_kwargs"]["timeout"].sock_read == 7.0
    assert with_limits("file", {"auto_mkdir": True}) == {"auto_mkdir": True}
    monkeypatch.setenv("BIKD_STORAGE_ATTEMPTS", "0")
    with pytest.raises(ValueError, match="BIKD_STORAGE_ATTEMPTS"):
        with_limits("s3", {})
