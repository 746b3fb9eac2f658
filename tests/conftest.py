"""Shared fixtures: one Ray instance for the whole session, small configs, a trained victim."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray for all tests (ray.init costs seconds). Ignores a running cluster."""
    import ray

    from aspkd_ray.runtime import connect

    if not ray.is_initialized():
        os.environ.pop("RAY_ADDRESS", None)
        ray.init(address="local", namespace="aspkd-tests", include_dashboard=False, num_cpus=2,
                 object_store_memory=512 << 20)
    info = connect()
    yield info
    ray.shutdown()
