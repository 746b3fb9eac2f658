"""One way to reach Ray: the running cluster when there is one, else an embedded instance.

Order: an explicit address, then RAY_ADDRESS, then a `ray start --head` on this machine
(address "auto"), else an embedded `ray.init()` sized to the machine. Calling it again reuses
the connection, so a whole test session shares one Ray instance.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def connect(address: str | None = None, namespace: str = "aspkd",
            num_cpus: int | None = None) -> dict:
    """Connect (or reuse the connection) and return a short description of the cluster."""
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        mode = "cluster"
        if address:
            ray.init(address=address, namespace=namespace, log_to_driver=True)
        else:
            try:
                ray.init(address="auto", namespace=namespace, log_to_driver=True)
            except ConnectionError:
                mode = "embedded"
                ray.init(namespace=namespace, num_cpus=num_cpus, include_dashboard=False,
                         log_to_driver=True,
                         # Ray's own data context default (a progress bar per operator) is
                         # fine; but keep the object store modest on small machines.
                         object_store_memory=_object_store_bytes())
        log.info("Ray %s (%s)", mode, ray.get_runtime_context().gcs_address)
    return describe()


def _object_store_bytes() -> int:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return int(min(max(total * 0.15, 512 << 20), 8 << 30))


def describe() -> dict:
    import ray

    ctx = ray.get_runtime_context()
    return {
        "address": ctx.gcs_address,
        "namespace": ctx.namespace,
        "nodes": len([n for n in ray.nodes() if n.get("Alive")]),
        "resources": {k: v for k, v in ray.cluster_resources().items()
                      if not k.startswith("node:") and "memory" not in k},
        "available": {k: v for k, v in ray.available_resources().items()
                      if not k.startswith("node:") and "memory" not in k},
    }


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
