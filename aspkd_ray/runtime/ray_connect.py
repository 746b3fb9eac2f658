"""One way to reach Ray: the running cluster when there is one, else an embedded instance.

Order: an explicit address, then RAY_ADDRESS, then a Ray already running on this machine
(address "auto": a `ray start --head`), else an embedded `ray.init()` sized to the machine.
The address "local" always starts an embedded instance. Calling it again reuses
the connection, so a whole test session shares one Ray instance.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

from aspkd_ray import console

log = logging.getLogger(__name__)

# Every worker process of our jobs runs this first (ray.init's worker_process_setup_hook).
WORKER_SETUP_HOOK = "aspkd_ray.runtime.ray_connect.quiet_train_cleaner"
_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
_CALLBACK_LOGGER = "ray.train.v2._internal.callbacks.placement_group_callback"
# What those loggers say that is not about the run (a busy machine makes the second one time
# out while the controller stops; the cleaner then exits with the controller anyway).
_CLEANER_NOISE = ("Failed to query Ray Train Controller actor state",
                  "Failed to stop PlacementGroupCleaner gracefully")
_CLEANER_THREAD = "PlacementGroupCleanerMonitor"
# How this process's Ray was reached: "embedded" or "cluster" when connect() started it,
# "existing" when the process had already called ray.init (a test session, a script).
_MODE = ["existing"]


def connect(address: str | None = None, namespace: str = "aspkd",
            num_cpus: int | None = None) -> dict:
    """Connect (or reuse the connection) and return a short description of the cluster."""
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or local_head_address()
        if not address:
            # Said out loud: a user who meant to join a cluster sees why this one is new.
            log.info("no Ray address given (--address, ray.address or RAY_ADDRESS) and no "
                     "`ray start` head running on this machine: starting an embedded Ray")
            address = "local"
        mode = "embedded" if address == "local" else "cluster"
        sync_auth_mode()
        quiet_train_cleaner()
        # Unless --verbose: workers' output (Ray Train, Ray Data actors, the teacher service)
        # stays in the session's log files, and the driver's "ray" logger says only warnings.
        loud = console.verbose()
        common = {"namespace": namespace, "log_to_driver": loud,
                  "logging_level": logging.INFO if loud else logging.WARNING,
                  "runtime_env": {"worker_process_setup_hook": WORKER_SETUP_HOOK}}
        if mode == "embedded":
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                     object_store_memory=_object_store_bytes(), **common)
        else:
            ray.init(address=address, **common)
        _MODE[0] = mode
        logs = _session_logs()
        if logs is not None:
            console.log_to_folder(logs)
        quiet_ray_console()
        log.info("Ray %s (%s); logs in %s", mode, ray.get_runtime_context().gcs_address, logs)
    return {"mode": _MODE[0], **describe()}


def _session_logs() -> str | None:
    """This node's Ray session log folder (where Ray writes every process's logs)."""
    import ray

    try:  # private, but the only way to the folder; Ray Data and Train use it the same way
        return ray._private.worker._global_node.get_logs_dir_path()
    except AttributeError as exc:  # another Ray version, or no local node
        log.warning("cannot find Ray's session log folder (%s); the driver log stays in "
                    "memory and --verbose shows logs on the console", exc)
        return None


class _RayConsole(logging.Filter):
    """On Ray's own console handlers: unless --verbose, only warnings and errors, and not
    the ones that are about our settings rather than the run."""

    NOISE = ("Progress bars disabled",  # we turned them off (quiet_ray_console)
             *_CLEANER_NOISE)

    def filter(self, record: logging.LogRecord) -> bool:
        if console.verbose():
            return True
        return record.levelno >= logging.WARNING and \
            not any(n in record.getMessage() for n in self.NOISE)


def quiet_ray_console() -> None:
    """Ray's driver-side output follows the console level (aspkd_ray.console): Ray Data's
    progress bars and its progress dumps every few seconds (off a terminal) only with
    --verbose; Ray's and Ray Data's console handlers show warnings only. Their log files
    (the session's ray-data.log and the rest) keep everything. Idempotent; the filter reads
    the level when a record comes, so a later `console.configure` still applies."""
    import ray.data  # configures the "ray.data" logger (its handlers replace earlier ones)

    ray.data.DataContext.get_current().enable_progress_bars = console.verbose()
    for name in ("ray", "ray.data"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and \
                    not isinstance(handler, logging.FileHandler) and \
                    not any(isinstance(f, _RayConsole) for f in handler.filters):
                handler.addFilter(_RayConsole())


def local_head_address() -> str | None:
    """The address of a live `ray start` head on this machine, else None.

    Unlike address="auto", this never joins another driver's embedded instance, and never
    waits on a stale record left by a crashed head (measured: ray.init then retries forever).
    """
    try:
        from ray._private.services import find_gcs_addresses
        from ray._private.utils import read_ray_address
    except ImportError as exc:  # private Ray helpers moved in another Ray version
        log.warning("cannot look for a local Ray head (%s); starting an embedded Ray. Set "
                    "RAY_ADDRESS or --address to join a running one.", exc)
        return None
    # Only OSError means "cannot tell": anything else from these helpers is a bug or an
    # incompatible Ray, and must not quietly turn into an embedded Ray.
    try:
        recorded = read_ray_address()
        live = find_gcs_addresses() if recorded else frozenset()
    except OSError as exc:  # the record or /proc could not be read
        log.warning("cannot read the local Ray head's address (%s); starting an embedded "
                    "Ray. Set RAY_ADDRESS or --address to join a running one.", exc)
        return None
    if recorded and recorded not in live:
        log.info("a Ray head was recorded at %s but none is running there (stopped or "
                 "crashed); not joining it", recorded)
        return None
    return recorded or None


def use_local_token() -> None:
    """Send the local auth token when joining an existing cluster.

    `ray start --head` (Ray 2.59+) enables token auth and writes ~/.ray/auth_token, but a
    driver joining by address does not send it unless RAY_AUTH_MODE=token is set before ray
    is imported (measured with Ray 2.60: the GCS answers InvalidAuthToken). A token-mode
    client also joins clusters without auth, and new embedded clusters use tokens anyway.
    Called from aspkd_ray/__init__.py, usually before anything imports ray; when a script
    imported ray first, `sync_auth_mode` (called by `connect`) makes Ray see the mode.
    """
    if "RAY_AUTH_MODE" in os.environ:
        return
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH", os.path.expanduser("~/.ray/auth_token"))
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(token_file):
        os.environ["RAY_AUTH_MODE"] = "token"
        sync_auth_mode()


def sync_auth_mode() -> None:
    """Make an already imported Ray use the RAY_AUTH_MODE now in the environment.

    Ray reads RAY_AUTH_MODE into its cached config when `ray._raylet` is imported. If a
    script imported ray before aspkd_ray set the variable, the driver would start (or join)
    a token-mode cluster without sending the token: its processes inherit the variable, the
    driver does not (InvalidAuthToken). Ray re-reads it with `Config.initialize("")`, as Ray's
    own `ray.init` does when it turns token auth on.
    """
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is None or "ray._raylet" not in sys.modules:
        return  # not imported yet: Ray reads the variable at import
    try:
        from ray._raylet import AuthenticationMode, Config, get_authentication_mode

        if (get_authentication_mode() == AuthenticationMode.TOKEN) != (mode.lower() == "token"):
            Config.initialize("")
    except (ImportError, AttributeError) as exc:  # another Ray version
        log.warning("could not apply RAY_AUTH_MODE=%s to the already imported ray (%s); if "
                    "Ray answers InvalidAuthToken, import aspkd_ray before ray or set "
                    "RAY_AUTH_MODE before starting Python.", mode, exc)


class _DropCleanerNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(noise in record.getMessage() for noise in _CLEANER_NOISE)


def quiet_train_cleaner() -> None:
    """Silence Ray Train's placement-group cleaner where it cannot work (Ray 2.60).

    Ray Train starts a detached `PlacementGroupCleaner` actor that polls the State API every
    second. Without a dashboard (our embedded Ray has none) each poll logs a warning; on a
    busy machine stopping it at the end of the run times out with a logged traceback; and
    where several Ray instances run on one machine its poll raises ConnectionError ("Found
    multiple active Ray instances") and the monitor thread dies with a traceback, which
    log_to_driver prints into our logs. Both say nothing about the run. Installed in every
    worker process through `ray.init(runtime_env={"worker_process_setup_hook": ...})`; the
    filter and hook touch only that logger and that thread. Idempotent.
    """
    for name in (_CLEANER_LOGGER, _CALLBACK_LOGGER):
        noisy = logging.getLogger(name)
        if not any(isinstance(f, _DropCleanerNoise) for f in noisy.filters):
            noisy.addFilter(_DropCleanerNoise())
    logger = logging.getLogger(_CLEANER_LOGGER)
    previous = threading.excepthook
    if getattr(previous, "_aspkd_quiet", False):
        return

    def excepthook(args: threading.ExceptHookArgs) -> None:
        if args.thread is not None and args.thread.name == _CLEANER_THREAD:
            logger.debug("Ray Train's placement-group cleaner stopped polling: %s",
                         args.exc_value)
            return
        previous(args)

    excepthook._aspkd_quiet = True  # type: ignore[attr-defined]
    threading.excepthook = excepthook


def _object_store_bytes() -> int:
    """15% of memory, within [512 MiB, 8 GiB]: modest on small machines."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError) as exc:  # no sysconf (Windows) or no names
        total = 8 << 30
        log.info("cannot read this machine's memory size (%s); sizing Ray's object store "
                 "as for 8 GiB", exc)
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
