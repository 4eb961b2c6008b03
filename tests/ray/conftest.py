"""A real local Ray instance for the Ray tests (token authentication stays on, as Ray sets it up)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ray_local():
    import os

    import ray

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a leftover instance
    yield ray
    ray.shutdown()
