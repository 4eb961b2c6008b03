"""Shared fixtures: a real local S3 endpoint (moto server on 127.0.0.1) and the benchmark data folder."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("BIKD_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1; sets the AWS env vars so s3fs/botocore talk to it."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")}
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_ENDPOINT_URL=endpoint, AWS_DEFAULT_REGION="us-east-1"
    )
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_url(s3_endpoint) -> str:
    """A fresh, empty bucket on the moto server, as an ``s3://`` URL."""
    import boto3

    bucket = f"bikd-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}"


def _data_path(*parts: str) -> Path:
    path = DATA_DIR.joinpath(*parts)
    if not path.exists():
        if os.environ.get("BIKD_REQUIRE_DATA") == "1":
            pytest.fail(f"benchmark data not found at {path} (set BIKD_DATA_DIR)")
        pytest.skip(f"benchmark data not found at {path}")
    return path


@pytest.fixture(scope="session")
def data_file():
    """``data_file("squad-v1.1", "dev-v1.1.json")``: a path under ../shared/data (or $BIKD_DATA_DIR); skips
    when it is missing, except in CI, which sets BIKD_REQUIRE_DATA=1 so that its absence fails."""
    return _data_path


@pytest.fixture(scope="session")
def fb15k237_dir() -> Path:
    """The FB15k-237 folder of ../shared/data; CI sets BIKD_REQUIRE_DATA=1 so its absence fails there."""
    _data_path("fb15k-237", "train.txt")
    return DATA_DIR / "fb15k-237"
