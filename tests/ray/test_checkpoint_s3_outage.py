"""The S3 endpoint going away in the middle of a sharded KGE checkpoint.

The checkpoint must fail with a StorageError in bounded time (not hang), leave no checkpoint that
``latest_checkpoint`` would resume from, and the next checkpoint must succeed once the endpoint is back.
The endpoint is this test's own moto server on a fixed port: moto keeps its buckets in-process, so a
server restarted on the same port still has the objects written before the outage.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid

import boto3
import pytest
import torch

from bikd.kg.datasets import load_dataset
from bikd.ray.kge import DistConfig
from bikd.ray.sharded import ShardedKGE
from bikd.storage import Storage, StorageError
from kge_configs import cfg

pytestmark = pytest.mark.slow

LIMIT_S = 90.0  # what a failing checkpoint may take: seconds with the limits below, never "forever"


class FlakyS3:
    """moto on a fixed port that can go down as "stopped" (connections refused) or "stalled" (something on
    the port accepts connections and never answers, as a hung server or a black-holing proxy does)."""

    def __init__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.moto = None
        self.silent: socket.socket | None = None
        self.accepted: list[socket.socket] = []

    def up(self):
        from moto.server import ThreadedMotoServer

        self._close_silent()
        with socket.socket() as probe:  # moto's start() waits forever when it cannot bind: fail here instead
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", self.port))
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.moto.start()

    def down(self, how: str):
        self.moto.stop()  # closes its listening socket: new connections are refused
        self.moto = None
        if how == "stalled":
            self.silent = socket.socket()
            self.silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.silent.bind(("127.0.0.1", self.port))
            self.silent.listen(128)
            threading.Thread(target=self._accept, args=(self.silent,), daemon=True).start()

    def _accept(self, sock):
        while True:
            try:
                self.accepted.append(sock.accept()[0])  # kept open, never answered
            except OSError:
                return

    def _close_silent(self):
        if self.silent is not None:
            # shutdown first: close() alone leaves the port listening while accept() blocks on it
            self.silent.shutdown(socket.SHUT_RDWR)
            self.silent.close()
            self.silent = None
        for conn in self.accepted:
            conn.close()
        self.accepted.clear()

    def close(self):
        if self.moto is not None:
            self.moto.stop()
        self._close_silent()


@pytest.fixture
def flaky_s3():
    endpoint = FlakyS3()
    endpoint.up()
    endpoint.bucket = f"ckpt-{uuid.uuid4().hex[:12]}"  # moto's state is per process, shared by every server
    boto3.client("s3", endpoint_url=endpoint.url, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=endpoint.bucket)
    yield endpoint
    endpoint.close()


class OutageBefore(Storage):
    """The real Storage, except that it takes the endpoint down right before writing a file whose name ends
    with ``last``. Only the driver's writes come through here (partition.pt, then MANIFEST.json): actors get
    plain Storage copies (``__reduce__``), so the shard files are written normally before the outage."""

    def __init__(self, url, storage_options, last: str, outage):
        super().__init__(url, storage_options)
        self.last, self.outage = last, outage

    def write_bytes(self, rel, data, *, exclusive=False):
        if rel.endswith(self.last) and self.outage is not None:
            self.outage()
            self.outage = None
        super().write_bytes(rel, data, exclusive=exclusive)


def within(fn, limit_s: float = LIMIT_S):
    """``(result or exception, seconds)``; fails the test instead of hanging when ``fn`` has no bound."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["value"] = e

    start = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit_s)
    if thread.is_alive():
        pytest.fail(f"still waiting after {limit_s:.0f} s for an endpoint that is down")
    return out["value"], time.monotonic() - start


@pytest.fixture(scope="module")
def nations():
    return load_dataset("nations")


@pytest.mark.parametrize("how,last", [("stopped", "partition.pt"), ("stalled", "MANIFEST.json")])
def test_outage_mid_checkpoint_leaves_no_checkpoint_and_next_one_succeeds(ray_local, nations, flaky_s3, how, last):
    # explicit options travel to the actors with the Storage (their environment is the cluster's)
    options = {"endpoint_url": flaky_s3.url, "key": "testing", "secret": "testing",
               "config_kwargs": {"connect_timeout": 2, "read_timeout": 2, "retries": {"total_max_attempts": 2}}}
    url = f"s3://{flaky_s3.bucket}/kge"
    storage = Storage(url, options)
    sharded = ShardedKGE(nations.train, nations.num_entities, nations.num_relations, cfg(), DistConfig(num_parts=2, mode="sync"))
    try:
        sharded.train_epoch()
        assert sharded.checkpoint(storage) == "epoch-000001"
        sharded.train_epoch()
        expected = sharded.snapshot()

        faulty = OutageBefore(storage.url, options, last, lambda: flaky_s3.down(how))
        value, waited = within(lambda: sharded.checkpoint(faulty))
        assert isinstance(value, StorageError), f"expected StorageError, got {value!r}"
        assert f"{url}/epoch-000002/{last}" in str(value) and "after " in str(value), str(value)
        assert waited < LIMIT_S
        value, _ = within(lambda: ShardedKGE.latest_checkpoint(storage))  # still down: fails, bounded
        assert isinstance(value, StorageError) and url in str(value), repr(value)

        flaky_s3.up()
        written = storage.ls("epoch-000002")
        assert "actor-000.pt" in written and "MANIFEST.json" not in written  # the outage hit mid-checkpoint
        assert ShardedKGE.latest_checkpoint(storage) == "epoch-000001"  # the half-written one is invisible

        value, _ = within(lambda: sharded.checkpoint(storage))
        assert value == "epoch-000002", repr(value)
        assert ShardedKGE.latest_checkpoint(storage) == "epoch-000002"
        sharded.train_epoch()
        assert sharded.restore(storage) == 2
        restored = sharded.snapshot()
        assert torch.equal(restored.entity, expected.entity) and torch.equal(restored.relation, expected.relation)
    finally:
        sharded.shutdown()
