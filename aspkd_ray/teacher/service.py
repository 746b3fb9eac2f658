"""The teacher service: one named Ray actor, the attack's only door to the victim.

Every driver, Ray task, Train worker and Tune trial reaches the same actor by name
(cfg.ray.teacher_service in cfg.ray.namespace). Requests are serialised by a lock, so the
budget cap is exact under any number of concurrent clients; status calls run alongside.
Each victim batch is reserved in the ledger (durably) before the call and recorded after it,
so a crash at any point leaves a ledger from which a restarted service (max_restarts=-1)
rebuilds the same budget: reserved-but-unanswered samples count as spent and are reported.
For a remote (HTTP) victim the reservation is durable before the request leaves. For an
in-process checkpoint the forward pass runs while the reservation is being synced (nothing
leaves the process during it), and its answer is used only once the reservation is durable,
discarded if the reservation fails: the same guarantee, without the fsync in the critical path.

`buy` is idempotent for a given list of ids (bought ids are free, unanswered ones are retried
at no charge), which is what makes Ray's automatic retry after a restart safe.

A local victim runs on the GPU when victim.device asks for it: the driver decides from the
cluster whether the actor asks Ray for one (`service_gpus`), the actor then puts the victim on
cuda when torch sees it (`victims.torch_device`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

import numpy as np

from aspkd_ray import storage
from aspkd_ray.config import Config, total_budget
from aspkd_ray.errors import UserError
from aspkd_ray.teacher import errors
from aspkd_ray.teacher.budget import plan_request
from aspkd_ray.teacher.checks import check_answer, check_request
from aspkd_ray.teacher.defences import defend, describe_defence, served_output
from aspkd_ray.teacher.errors import BudgetExhausted, LeaseLost, LedgerMismatch, VictimError
from aspkd_ray.teacher.lease import Lease, describe_holder
from aspkd_ray.teacher.ledger import Ledger, normalize_uri, read_meta

log = logging.getLogger(__name__)

ACTOR_CPUS = 0.25        # fractional: on 2 CPUs the service must not starve Train or Data
ACTOR_CONCURRENCY = 4    # status calls are answered while a buy waits on the victim
TASK_RETRIES = 3         # Ray resubmits a buy after a restart; buy is idempotent
PLACEMENT_TIMEOUT_S = 120.0  # an autoscaler may need a while; an impossible request fails
HEAD_RESOURCE = "node:__internal_head__"


class TeacherService:
    """The actor class (use connect_teacher_service, not this directly)."""

    def __init__(self, cfg: Config, num_classes: int, budget: int, ledger_uri: str,
                 gpus: int = 0) -> None:
        from aspkd_ray.teacher.victims import make_victim, torch_device, victim_name

        self.cfg = cfg
        self.started = time.time()
        self.counters = {"victim_samples_sent": 0, "victim_s": 0.0, "ledger_s": 0.0,
                         "ledger_wait_s": 0.0, "requests": 0}
        self.ledger_uri, self.budget, self.num_classes = ledger_uri, budget, num_classes
        # A service that cannot open its ledger stays up and refuses every call with the
        # reason (raising here would make Ray restart it forever, or hide the reason).
        self.refusal: tuple[str, str] | None = None
        self._closed_trials: set[str] = set()  # trials a sweep ended: no more sales
        name = victim_name(cfg)
        try:
            # Never create the ledger here: the driver did. A restarted service that finds
            # none (a local folder on a node that is gone) must not start again from 0 spent.
            self.ledger = Ledger(ledger_uri, budget=budget, output=served_output(cfg),
                                 num_classes=num_classes, create=False,
                                 writer=_actor_key(), lease_options=_lease_options())
        except FileNotFoundError:
            self.ledger = None
            self.refusal = ("LedgerUnavailable", (
                f"the teacher service cannot reach its ledger {ledger_uri} from host "
                f"{socket.gethostname()} (a local folder on another node, or storage down). "
                f"It refuses to answer rather than start again from 0 spent. Put the ledger "
                f"on shared storage (budget.ledger=s3://... or an NFS path)."))
            return
        except UserError as exc:  # busy, corrupt, mismatched
            self.ledger = None
            self.refusal = (type(exc).__name__, str(exc))
            return
        if self.ledger.meta.get("victim") not in (None, name):
            # Allowed (a moved checkpoint, a new URL for the same model), but worth saying.
            log.warning("ledger %s was started against victim %s, now %s", self.ledger.uri,
                        self.ledger.meta["victim"], name)
        # `gpus`: what this actor asked Ray for; a GPU it did not ask for is not its to use.
        # victim.defence wraps the victim here only, never in make_victim: the evaluation
        # oracle builds its victim there and must measure the undefended model.
        self.victim = defend(make_victim(cfg, num_classes,
                                         device=torch_device(gpus > 0, cfg.victim.device)),
                             cfg)
        self.batch_size = cfg.victim.batch_size
        self._buy_lock = threading.Lock()   # one request at a time: the cap stays exact
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="ledger")
        # This process's counters (not in the ledger): retries included, seconds spent;
        # ledger_wait_s is the part of the ledger writes a request waited for.
        s = self.ledger.status()
        if s["spent"] or s["reserved_unanswered"]:
            log.warning("teacher service rebuilt ledger %s: %d of %d spent, %d reserved but "
                        "unanswered", s["ledger"], s["spent"], s["budget"],
                        len(s["reserved_unanswered"]))

    def describe(self) -> dict:
        out = {"budget": self.budget, "output": served_output(self.cfg),
               "defence": describe_defence(self.cfg),
               "num_classes": self.num_classes, "ledger": self.ledger_uri, "pid": os.getpid(),
               "actor_id": _actor_key(), "started": self.started, "refusal": self.refusal}
        if self.ledger is not None:
            out.update({"budget": self.ledger.budget, "output": self.ledger.output,
                        "num_classes": self.ledger.num_classes, "ledger": self.ledger.uri,
                        "victim": self.ledger.meta.get("victim"),
                        "batch_size": self.batch_size, "torch_threads": _torch_threads(),
                        "victim_device": getattr(self.victim, "device", "remote")})
        return out

    def status(self) -> dict:
        if self.refusal is not None:
            return {"refusal": self.refusal}
        out = self.ledger.status()
        out["victim_samples_sent"] = self.counters["victim_samples_sent"]
        out["service"] = dict(self.counters)
        return out

    def close(self) -> None:
        """Release the ledger's lease (before the actor is stopped)."""
        if self.ledger is not None:
            self.ledger.close()
            self.refusal = ("LeaseLost", "the teacher service was closed; reconnect.")

    def close_trial(self, trial: str) -> None:
        """Sell nothing more to `trial` (a sweep's driver calls it when Tune ends a trial:
        a trial its scheduler stopped may still run until its process is killed)."""
        self._closed_trials.add(trial)

    def buy(self, ids: list[str], classes: np.ndarray, images: np.ndarray, trial: str | None,
            trial_cap: int | None) -> dict:
        if self.refusal is not None:
            return {"refusal": self.refusal}
        if trial in self._closed_trials:
            return {"refusal": ("TrialClosed", f"trial {trial} was ended by the sweep (its "
                                               f"scheduler stopped it, or it finished); it "
                                               f"buys nothing more.")}
        with self._buy_lock:
            self.counters["requests"] += 1
            try:
                ids, classes, images = check_request(ids, classes, images,
                                                     self.ledger.num_classes)
                order = self._check_classes(ids, classes)
            except (TypeError, ValueError) as exc:
                return {"input_error": f"{type(exc).__name__}: {exc}"}
            try:
                return self._buy(ids, classes, images, order, trial or "", trial_cap)
            except LeaseLost as exc:  # another service took the ledger: refuse from now on
                self.refusal = ("LeaseLost", str(exc))
                return {"refusal": self.refusal}

    def _check_classes(self, ids: list[str], classes: np.ndarray) -> dict[str, int]:
        """First position of each distinct id; its generation class must never change."""
        first: dict[str, int] = {}
        charged = self.ledger.state.charged
        for pos, (i, c) in enumerate(zip(ids, classes.tolist(), strict=True)):
            if i in first:
                if classes[first[i]] != c:
                    raise ValueError(f"sample {i!r} appears with classes {classes[first[i]]} "
                                     f"and {c} in one request.")
                continue
            if i in charged and charged[i] != c:
                raise ValueError(f"sample {i!r} was bought with generation class {charged[i]}"
                                 f", now asked with {c}: sample ids must be stable.")
            first[i] = pos
        return first

    def _buy(self, ids, classes, images, first, trial, trial_cap) -> dict:
        from aspkd_ray.teacher.victims import victim_input

        ledger = self.ledger
        plan = plan_request(list(first), ledger.state, ledger.budget, trial, trial_cap)
        # Free grants of already-answered samples to this trial: recorded, no victim call.
        free = [i for i in plan.granted if i in plan.new_grants and i not in plan.to_query]
        self._wait(self._reserve(free, classes, first, trial, plan.new_charges))
        error, failed = None, []
        remote = getattr(self.victim, "remote", True)
        for start in range(0, len(plan.to_query), self.batch_size):
            batch = plan.to_query[start:start + self.batch_size]
            x = victim_input(images[[first[i] for i in batch]], self.cfg)
            reservation = self._reserve(batch, classes, first, trial, plan.new_charges,
                                        background=not remote)
            if remote:
                self._wait(reservation)  # write-ahead: durable before the request is sent
            t = time.perf_counter()
            try:
                self.counters["victim_samples_sent"] += len(batch)
                raw = self.victim.predict(x)
                self.counters["victim_s"] += time.perf_counter() - t
                self._wait(reservation)  # no answer is used before its reservation is durable
                labels = check_answer(raw, len(batch), ledger.num_classes, ledger.output)
            except Exception as exc:  # noqa: BLE001 - any victim failure is recorded
                self._wait(reservation)  # a ledger failure propagates: nothing was charged
                from aspkd_ray.teacher.redact import redact  # no token reaches the ledger

                error = redact(f"{type(exc).__name__}: {exc}",
                               getattr(self.victim, "secrets", ()))
                self._wait(self._write(ledger.record_failure, batch, error))
                failed = batch
                break
            self._wait(self._write(ledger.record_answers, batch, labels))
        return self._result(ids, plan, error, failed)

    def _write(self, write, *args, background: bool = False) -> Future:
        """Run a ledger write, here or on the writer thread; a Future either way."""
        def timed() -> None:
            t = time.perf_counter()
            try:
                write(*args)
            finally:
                self.counters["ledger_s"] += time.perf_counter() - t
                if not background:  # the request waited for all of it
                    self.counters["ledger_wait_s"] += time.perf_counter() - t

        if background:
            return self._writer.submit(timed)
        done: Future = Future()
        try:
            timed()
            done.set_result(None)
        except Exception as exc:  # handed to whoever waits on it
            done.set_exception(exc)
        return done

    def _wait(self, future: Future) -> None:
        t = time.perf_counter()
        future.result()
        self.counters["ledger_wait_s"] += time.perf_counter() - t

    def _reserve(self, batch, classes, first, trial, new_charges,
                 background: bool = False) -> Future:
        grants = self.ledger.state.trial_grants.get(trial, set()) if trial else set()
        rows = [i for i in batch if i in new_charges or (trial and i not in grants)]
        if not rows:
            return self._write(lambda: None)
        return self._write(self.ledger.reserve, rows, [int(classes[first[i]]) for i in rows],
                           [trial] * len(rows), [i in new_charges for i in rows],
                           background=background)

    def _result(self, ids, plan, error, failed) -> dict:
        answers = self.ledger.state.answers
        granted = set(plan.granted)
        answered = [i for i in ids if i in granted and i in answers]
        if self.ledger.output == "soft":
            labels = (np.stack([answers[i] for i in answered]).astype(np.float32) if answered
                      else np.zeros((0, self.ledger.num_classes), np.float32))
        else:
            labels = np.asarray([answers[i] for i in answered], np.int64)
        unanswered = [i for i in plan.granted if i not in answers]
        return {"answered_ids": answered, "labels": labels, "refused_ids": plan.refused,
                "refused_by": plan.refused_by, "error": error, "failed_ids": failed,
                "unanswered_ids": unanswered,
                "charged_unanswered": [i for i in unanswered if i in self.ledger.state.charged]}


class TeacherClient:
    """What attack code holds: buy labels, read the budget. Picklable (Ray tasks, trials)."""

    def __init__(self, handle, info: dict, trial: str | None, trial_cap: int | None,
                 connect_args: tuple) -> None:
        self._handle, self._info = handle, info
        self.trial, self.trial_cap = trial, trial_cap
        self._connect_args = connect_args

    @property
    def output(self) -> str:
        """'soft' (buy returns N x C probabilities) or 'hard' (N class ids)."""
        return self._info["output"]

    @property
    def budget(self) -> int:
        return self._info["budget"]

    @property
    def actor_id(self) -> str | None:
        """The Ray actor id of the service this client last reached (one per incarnation)."""
        return self._info.get("actor_id")

    @property
    def num_classes(self) -> int:
        return self._info["num_classes"]

    def buy(self, ids: list[str], classes: np.ndarray, images: np.ndarray) -> np.ndarray:
        """Labels for `ids` (aligned): soft float32 N x C, hard int64 N.

        Already-bought ids are free. Raises BudgetExhausted carrying the answers given when
        the request passes the cap, VictimError when the victim failed (its charged samples
        are retried at no charge on the next request).
        """
        ids, classes, images = check_request(ids, classes, images, self.num_classes)
        res = self._call("buy", ids, classes, images, self.trial, self.trial_cap)
        _raise_refusal(res)
        if "input_error" in res:
            raise ValueError(res["input_error"])
        if res["error"] is not None:
            raise VictimError(
                f"the victim failed: {res['error']}. {len(res['charged_unanswered'])} charged "
                f"samples are reserved but unanswered (reported in status()); asking for them "
                f"again retries the victim at no charge.", res["answered_ids"], res["labels"],
                res["unanswered_ids"])
        if res["refused_ids"]:
            raise BudgetExhausted(
                f"{res['refused_by']} exhausted: answered {len(res['answered_ids'])} of "
                f"{len(ids)} samples, refused {len(res['refused_ids'])} (budget "
                f"{self.budget}, trial cap {self.trial_cap}).", res["answered_ids"],
                res["labels"], res["refused_ids"])
        return res["labels"]

    def status(self) -> dict:
        """budget, spent, left, per_class, output, reserved_unanswered, trial_spent, ..."""
        return _raise_refusal(self._call("status"))

    def describe(self) -> dict:
        """The running service: budget, output, num_classes, ledger, victim, pid, started."""
        return self._call("describe")

    def close_trial(self, trial: str) -> None:
        """The service sells nothing more to `trial` (a sweep trial Tune ended)."""
        self._call("close_trial", trial)

    def shutdown(self) -> None:
        """Release the ledger's lease and stop the service actor (the ledger stays; the next
        connect rebuilds from it)."""
        import ray

        try:
            ray.get(self._handle.close.remote(), timeout=30)
        except (ray.exceptions.RayError, TimeoutError) as exc:  # its lease goes stale instead
            log.warning("teacher service did not release its lease: %s", exc)
        ray.kill(self._handle, no_restart=True)

    def _call(self, method: str, *args):
        import ray

        try:
            return ray.get(getattr(self._handle, method).remote(*args))
        except ray.exceptions.ActorDiedError:
            # Its owner (the driver or trial that created it) ended: create it again by name;
            # it rebuilds from the ledger, and buy is idempotent.
            self._handle, self._info = _get_or_create(*self._connect_args)
            return ray.get(getattr(self._handle, method).remote(*args))


def _get_or_create(cfg: Config, num_classes: int, budget: int, ledger_uri: str,
                   gpus: int = 0):
    import ray

    opts = service_options(cfg, gpus, _head_gpus() if gpus else 0.0)
    actor = ray.remote(TeacherService).options(**opts)
    handle = actor.remote(cfg, num_classes, budget, ledger_uri, gpus)
    try:
        info = ray.get(handle.describe.remote(), timeout=PLACEMENT_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        ray.kill(handle, no_restart=True)
        asked = {k: opts[k] for k in ("num_cpus", "num_gpus", "resources") if k in opts}
        raise UserError(f"the teacher service could not be placed within "
                        f"{PLACEMENT_TIMEOUT_S:.0f} s (ray.teacher_node="
                        f"{cfg.ray.teacher_node!r}, victim.device={cfg.victim.device!r}, "
                        f"asking {asked}); the cluster has {ray.cluster_resources()}. Set "
                        f"ray.teacher_node to head, any, or a custom resource some node has"
                        f"{', or victim.device=cpu' if gpus else ''}.") from None
    except ray.exceptions.RayActorError as exc:
        raise RuntimeError(f"the teacher service {cfg.ray.teacher_service!r} could not start: "
                           f"{exc}") from exc
    if info.get("refusal"):
        ray.kill(handle, no_restart=True)  # frees the name; the next connect tries afresh
        _raise_refusal(info)
    _check_running(cfg, info, budget, num_classes, ledger_uri)
    return handle, info


def service_options(cfg: Config, gpus: int = 0, head_gpus: float = 0.0) -> dict:
    """The actor's Ray options: its name, restarts, concurrency and placement."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return dict(
        name=cfg.ray.teacher_service, namespace=cfg.ray.namespace, get_if_exists=True,
        max_restarts=-1, max_task_retries=TASK_RETRIES, max_concurrency=ACTOR_CONCURRENCY,
        **placement(cfg.ray.teacher_node, gpus, head_gpus),
        # Shared by every trial: never placed inside the calling Tune trial's placement group.
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))


def placement(teacher_node: str, gpus: int = 0, head_gpus: float = 0.0) -> dict:
    """The service's resource request: on the head node by default (it outlives worker
    nodes, and needs no CPU there, so a head with num-cpus 0 still takes it).

    With `gpus` (a local victim on cuda) it also asks for them; ray.teacher_node=head then
    means the head when it has `head_gpus` to give, else any GPU node (heads often have no
    GPU, and the victim needs one more than the head's longer life).
    """
    if teacher_node == "head" and gpus and head_gpus < gpus:
        opts: dict = {"num_cpus": 0}
    elif teacher_node == "head":
        opts = {"num_cpus": 0, "resources": {HEAD_RESOURCE: 0.001}}
    elif teacher_node == "any":
        opts = {"num_cpus": ACTOR_CPUS}
    else:
        opts = {"num_cpus": 0, "resources": {teacher_node: 0.001}}
    if gpus:
        opts["num_gpus"] = gpus
    return opts


def service_gpus(cfg: Config) -> int:
    """GPUs the teacher service asks Ray for (0 or 1), decided in the driver: victim.device
    against the connected cluster's GPUs, leaving Ray Train the GPUs it will plan for the
    attack (both run at once). Raises ConfigError for victim.device=cuda on a cluster with no
    GPU (or none left beside Ray Train's). 0 for an HTTP victim."""
    if cfg.victim.endpoint or cfg.victim.device == "cpu":
        return 0
    from aspkd_ray.teacher.victims import cluster_resources, gpu_request

    return gpu_request(cfg.victim.device, cluster_resources(), train_gpus=_train_gpus(cfg),
                       autoscale=cfg.ray.autoscale)


def _train_gpus(cfg: Config) -> float:
    """The GPUs Ray Train will ask for (train/attack.py plans the same way)."""
    from aspkd_ray.runtime.resources import ResourceError, plan_workers

    try:
        plan = plan_workers(requested=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                            cpus_per_worker=cfg.ray.cpus_per_worker, reserve_cpus=0.5,
                            autoscale=cfg.ray.autoscale)
    except ResourceError:  # Ray Train names the problem when the attack starts
        return 0.0
    return plan.num * plan.gpus


def _head_gpus() -> float:
    """The head node's GPUs (0 when none is found)."""
    import ray

    for node in ray.nodes():
        res = node.get("Resources") or {}
        if node.get("Alive") and HEAD_RESOURCE in res:
            return float(res.get("GPU", 0.0))
    return 0.0


def _check_device(cfg: Config, gpus: int, info: dict) -> None:
    """Say where the victim runs, and warn when it is not where victim.device asked."""
    where = info.get("victim_device")
    log.info("teacher service: victim on %s (victim.device=%s)", where, cfg.victim.device)
    if gpus and where != "cuda":
        log.warning("victim.device=%s: the teacher service runs its victim on %s (a service "
                    "already running keeps its device: stop it to change that; else its "
                    "torch sees no GPU)", cfg.victim.device, where)


def _check_running(cfg: Config, info: dict, budget: int, num_classes: int,
                   ledger_uri: str) -> None:
    asked = {"budget": budget, "output": served_output(cfg), "num_classes": num_classes,
             "defence": describe_defence(cfg),
             "ledger": ledger_uri}
    wrong = {k: (info.get(k), v) for k, v in asked.items() if info.get(k) != v}
    if wrong:
        what = "; ".join(f"{k} is {old!r}, asked {new!r}" for k, (old, new) in wrong.items())
        raise LedgerMismatch(
            f"a teacher service named {cfg.ray.teacher_service!r} (namespace "
            f"{cfg.ray.namespace!r}) is already running with other settings: {what}. Use "
            f"another ray.teacher_service name, or stop it (TeacherClient.shutdown()).")


def _running_info(cfg: Config) -> dict | None:
    """describe() of the service already running under the configured name, if any."""
    import ray

    try:
        handle = ray.get_actor(cfg.ray.teacher_service, namespace=cfg.ray.namespace)
        info = ray.get(handle.describe.remote(), timeout=60)
    except (ValueError, ray.exceptions.RayError):
        return None  # none, or it is dying: _get_or_create sorts it out
    return None if info.get("refusal") else info


def connect_teacher_service(cfg: Config, num_classes: int, budget: int | None = None,
                            ledger_uri: str | None = None,
                            trial: str | None = None) -> TeacherClient:
    """Get or create the named teacher service and return a client for it.

    budget defaults to total_budget(cfg, num_classes); the ledger to budget.ledger, else
    <storage root>/ledger. `trial` names a Tune trial, capped by budget.per_trial. Raises
    LedgerMismatch when the running service or the ledger has another budget / output mode,
    LedgerCorrupt when the ledger fails its checks, LedgerBusy when another service (of
    another Ray cluster) writes it, and UserError for a local ledger on a multi-node cluster.
    """
    import ray

    from aspkd_ray.runtime import connect

    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
    budget = total_budget(cfg, num_classes) if budget is None else int(budget)
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}.")
    if trial is not None and (not isinstance(trial, str) or not trial):
        raise ValueError(f"trial must be a non-empty string or None, got {trial!r}.")
    from aspkd_ray.layout import run_layout

    uri = normalize_uri(ledger_uri or run_layout(cfg).ledger)
    cfg = _resolved(cfg)
    connect(cfg.ray.address, cfg.ray.namespace)
    gpus = service_gpus(cfg)  # before the ledger: victim.device=cuda without a GPU fails here
    nodes = len([n for n in ray.nodes() if n.get("Alive")])
    check_ledger_reachable(uri, nodes)
    running = _running_info(cfg)
    if running is not None:
        # It holds the ledger and checked it when it opened it: no need to replay it here
        # (every Train worker and sweep trial connects), only to compare the settings.
        _check_running(cfg, running, budget, num_classes, uri)
    else:
        _prepare_ledger(cfg, uri, budget, num_classes)
    handle, info = _get_or_create(cfg, num_classes, budget, uri, gpus)
    if not cfg.victim.endpoint:
        _check_device(cfg, gpus, info)
    return TeacherClient(handle, info, trial, cfg.budget.per_trial,
                         (cfg, num_classes, budget, uri, gpus))


def _prepare_ledger(cfg: Config, uri: str, budget: int, num_classes: int) -> None:
    """Create the ledger (the service never does) and check it, so a mismatch, a corrupt
    file or another Ray cluster's writer fails clearly here, before an actor is created."""
    import ray

    victim = None
    if read_meta(uri) is None:
        from aspkd_ray.teacher.victims import victim_name

        victim = victim_name(cfg)
    ledger = Ledger(uri, budget=budget, output=served_output(cfg), num_classes=num_classes,
                    victim=victim)
    holder = ledger.holder()
    gcs = ray.get_runtime_context().gcs_address
    if holder is not None and holder.get("ray") != gcs and Lease(ledger.fs, ledger.root) \
            .is_live(holder):
        raise errors.LedgerBusy(
            f"the ledger {uri} is written by a teacher service of another Ray cluster "
            f"({describe_holder(holder)}). One service writes a ledger at a time: wait for "
            f"that run to end, connect to its cluster (ray.address), or use another output "
            f"folder / budget.ledger.")


def check_ledger_reachable(uri: str, nodes: int) -> None:
    """A ledger on one node's local disk cannot serve a multi-node cluster: if the service
    restarts on another node, that node has no such folder. Refuse up front."""
    if nodes > 1 and not storage.is_shared(uri):
        raise UserError(
            f"the ledger {uri} is on this node's local disk, but the Ray cluster has {nodes} "
            f"nodes: a teacher service restarted on another node could not reach it. Put it "
            f"on storage every node reaches: budget.ledger=s3://bucket/run/ledger (any pyarrow "
            f"URI) or a folder on an NFS mount.")


def _raise_refusal(res: dict) -> dict:
    """Raise the typed error a refusing service sent back (its reason in one line)."""
    refusal = res.get("refusal") if isinstance(res, dict) else None
    if refusal:
        kind, message = refusal
        raise getattr(errors, kind, UserError)(message)
    return res


def _actor_key() -> str:
    """This service's identity across Ray restarts (the actor id), for the ledger's lease."""
    import ray

    if not ray.is_initialized():  # direct use, outside Ray (tests)
        return f"pid-{os.getpid()}"
    return ray.get_runtime_context().get_actor_id() or f"pid-{os.getpid()}"


def _lease_options() -> dict:
    import ray

    if not ray.is_initialized():
        return {}
    gcs = ray.get_runtime_context().gcs_address
    return {"info": {"ray": gcs}, "gone": lambda rec: _dead_actor_here(rec, gcs)}


def _dead_actor_here(rec: dict, gcs: str) -> bool:
    """The lease holder is a service actor of this Ray cluster that Ray reports DEAD (a
    sweep's earlier incarnation, a killed service): no need to wait for its heartbeat."""
    if rec.get("ray") != gcs or not str(rec.get("key", "")).strip():
        return False
    from ray._private import state  # the GCS actor table; no public API reads one actor

    try:
        return state.actors(actor_id=rec["key"]).get("State") == "DEAD"
    except Exception as exc:  # noqa: BLE001 - not an actor id, or GCS busy: wait instead
        log.debug("could not look up lease holder %s: %s", rec.get("key"), exc)
        return False


def _resolved(cfg: Config) -> Config:
    """Absolute victim path, checked here: the actor may run in another directory."""
    if cfg.victim.endpoint:
        return cfg
    from aspkd_ray import cache, storage
    from aspkd_ray.layout import victim_location

    location = victim_location(cfg)
    # A URI stays a URI: the actor, on whatever node, downloads its own copy (cache.local_copy).
    ckpt = location if storage.is_uri(location) else os.path.realpath(location)
    if not cache.exists(ckpt, "model.json"):
        raise FileNotFoundError(f"victim checkpoint {ckpt} not found; train it with `aspkd "
                                f"train-teacher` (same config) or set victim.checkpoint or "
                                f"victim.endpoint.")
    return replace(cfg, victim=replace(cfg.victim, checkpoint=ckpt))


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()
