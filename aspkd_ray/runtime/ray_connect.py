"""One way to reach Ray: the running cluster when there is one, else an embedded instance.

Order: an explicit address, then RAY_ADDRESS, then a Ray already running on this machine
(address "auto": a `ray start --head`), else an embedded `ray.init()` sized to the machine.
The address "local" always starts an embedded instance. Calling it again reuses
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
        address = address or os.environ.get("RAY_ADDRESS") or local_head_address() or "local"
        mode = "embedded" if address == "local" else "cluster"
        if mode == "embedded":
            ray.init(address="local", namespace=namespace, num_cpus=num_cpus,
                     include_dashboard=False, log_to_driver=True,
                     object_store_memory=_object_store_bytes())
        else:
            ray.init(address=address, namespace=namespace, log_to_driver=True)
        log.info("Ray %s (%s)", mode, ray.get_runtime_context().gcs_address)
    return describe()


def local_head_address() -> str | None:
    """The address of a live `ray start` head on this machine, else None.

    Unlike address="auto", this never joins another driver's embedded instance, and never
    waits on a stale record left by a crashed head (measured: ray.init then retries forever).
    """
    try:
        from ray._private.services import find_gcs_addresses
        from ray._private.utils import read_ray_address

        recorded = read_ray_address()
        return recorded if recorded and recorded in find_gcs_addresses() else None
    except Exception:  # private Ray helpers moved: fall back to an embedded instance
        return None


def use_local_token() -> None:
    """Send the local auth token when joining an existing cluster.

    `ray start --head` (Ray 2.59+) enables token auth and writes ~/.ray/auth_token, but a
    driver joining by address does not send it unless RAY_AUTH_MODE=token is set before ray
    is imported (measured with Ray 2.60: the GCS answers InvalidAuthToken). A token-mode
    client also joins clusters without auth, and new embedded clusters use tokens anyway.
    Called from aspkd_ray/__init__.py, i.e. before anything imports ray.
    """
    if "RAY_AUTH_MODE" in os.environ:
        return
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH", os.path.expanduser("~/.ray/auth_token"))
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(token_file):
        os.environ["RAY_AUTH_MODE"] = "token"


def _object_store_bytes() -> int:
    """15% of memory, within [512 MiB, 8 GiB]: modest on small machines."""
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
