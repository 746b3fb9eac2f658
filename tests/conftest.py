"""Shared fixtures: one Ray instance for the whole session, small configs, a trained victim."""

from __future__ import annotations

import logging
import os
import socket
import uuid

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The tests' object store: an S3 API served by moto on 127.0.0.1 (s3_root below). Set before
# Ray starts so that every Ray worker reaches it too; fake credentials, so that no test can
# ever touch a real account, and no instance-metadata lookups.
S3_PORT = _free_port()
os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
                   "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"})
for _var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(_var, None)


def start_test_ray(**extra) -> None:
    """The tests' embedded Ray (2 CPUs, a small object store); `extra`: more ray.init
    arguments (a test that needs its own Ray restarts it with them, then without)."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", namespace="aspkd-tests", include_dashboard=False, num_cpus=2,
             object_store_memory=512 << 20, **extra)


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray for all tests (ray.init costs seconds). Ignores a running cluster."""
    import ray

    from aspkd_ray.runtime import connect

    if not ray.is_initialized():
        start_test_ray()
    info = connect()
    yield info
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible server (moto) on 127.0.0.1 for the whole session."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    yield os.environ["AWS_ENDPOINT_URL"]
    server.stop()


@pytest.fixture
def s3_root(s3_server) -> str:
    """A fresh bucket on the test S3 server; the storage root s3://<bucket>/run."""
    import boto3

    bucket = f"aspkd-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/run"


@pytest.fixture(scope="session")
def tiny_digits(tmp_path_factory):
    """A tiny digits scenario (a plugin generator, 20 proxy images a class, a 2-epoch victim)
    whose cache the quality and audit tests share: the victim and proxy set are made once."""
    from test_steal import PLUGIN  # the tests folder is on sys.path (pytest rootdir)

    root = tmp_path_factory.mktemp("tiny-digits")
    plugin = root / "digits_plugin.py"
    plugin.write_text(PLUGIN)
    return root, [f"cache_dir={root / 'cache'}", "generator.kind=plugin",
                  f"generator.plugin={plugin}:make", "generator.batch_size=50",
                  "proxy.per_class=20", "victim.training.max_epochs=2",
                  "training.batch_size=32"]


@pytest.fixture(scope="module")
def victim_ckpt(tmp_path_factory):
    """A small random-weight digits victim (seed 0): teacher-service, defence and GPU-path
    tests need answers, not a trained model."""
    import torch

    from aspkd_ray.models import create_model, save_checkpoint

    torch.manual_seed(0)
    model = create_model("digits_cnn", num_classes=10, in_chans=1, image_size=28)
    return str(save_checkpoint(model, tmp_path_factory.mktemp("victim") / "ck"))
