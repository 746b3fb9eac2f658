"""Ray Train layer: run the ASPKD round loop on a TorchTrainer worker group.

One worker on a CPU machine, N GPU workers with DDP on a cluster: the same code. The pool
reaches the workers in memory (an object store ref) or as a `StreamedPool` that reads its
shards on demand (pool.mode). Rank 0 is the only one that selects and buys (through the
teacher service, by name); decisions are broadcast so every rank trains the same student.
After each round, rank 0 reports a Ray Train checkpoint (student weights + attack state, as
data only: train/state_io.py), so rerunning with the same output directory resumes where it
stopped, and every round's student stays available for evaluation.

Retries: Ray Train restarts the worker group after a worker or node is lost (MAX_FAILURES),
but an exception raised by the attack code itself (a bad value, VictimError, BudgetExhausted)
would only fail again, after spending time and perhaps victim calls. So the worker records
such an exception with a small actor owned by `run_attack`, which raises it in the driver
after one attempt. (Ray Train 2.60 has no public hook to filter retried exceptions.)
"""

from __future__ import annotations

import logging
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from aspkd_ray import storage
from aspkd_ray.aspkd.rounds import AttackState, ProxyPool, RoundSettings, run_rounds
from aspkd_ray.config import Config
from aspkd_ray.pool import StreamedPool
from aspkd_ray.runtime import plan_workers
from aspkd_ray.runtime.resources import check_placeable
from aspkd_ray.train.comm import TorchDistComm
from aspkd_ray.train.state_io import load_state, load_weights_file, save_state, save_weights

log = logging.getLogger(__name__)

MAX_FAILURES = 2  # worker-group restarts after a lost worker or node (not attack errors)


@dataclass
class AttackJob:
    """Everything a worker needs; arrays travel through the object store as refs."""

    cfg: Config
    settings: RoundSettings
    pool: object                 # ObjectRef of a ProxyPool (memory), or a StreamedPool
    ids: list[str]               # sample id of every image of the set (the ledger's keys)
    classes: np.ndarray          # generation class of every image of the set
    train: np.ndarray            # positions of the train split (the pool's ids 0..N-1)
    val: np.ndarray              # positions of the validation split
    images_ref: object | None    # memory: ObjectRef of the set's uint8 images (what is
                                 # sent); stream: None, the pool's index reads the rows
    input_shape: tuple[int, int]  # (size, channels) of the student's input
    num_classes: int
    budget_total: int
    ledger_uri: str
    trial: str | None = None     # Tune trial name (per-trial cap), None when standalone
    objective: SharedValidation | None = None  # a sweep's shared bought validation labels


@dataclass
class SharedValidation:
    """Proxy validation images whose labels a sweep bought once for all its trials: every
    round's student is scored on them (`val_agreement`), the attacker's own objective."""

    images: np.ndarray           # uint8, as stored
    labels: np.ndarray           # the victim's class for each


def _make_student(cfg: Config, num_classes: int, chans: int, size: int) -> torch.nn.Module:
    from aspkd_ray.models import create_model, load_weights

    torch.manual_seed(cfg.seed)  # same init on every rank and every rerun
    model = create_model(cfg.student.architecture, num_classes=num_classes, in_chans=chans,
                         image_size=size)
    if cfg.student.init_checkpoint:
        load_weights(model, cfg.student.init_checkpoint, strict=False)
    return model


def _save(state: AttackState, student: torch.nn.Module, folder: Path) -> None:
    save_weights(student, folder)
    save_state(state, folder)


def load_round_checkpoint(folder: str | Path) -> tuple[AttackState, dict]:
    """(attack state, student state dict) from a round checkpoint folder.

    Data only (JSON, .npz without objects, safetensors): a file planted in a run folder cannot
    run code. Raises StateFileError (naming the file) when one is missing or malformed.
    """
    folder = Path(folder)
    return load_state(folder), load_weights_file(folder)


class AttackFailures:
    """Ray actor (one per `run_attack`): the first exception the attack code raised.

    Restarted worker groups ask it first and end at once when the attack already failed, so
    the attack code runs once; the driver takes the exception back and raises it.
    """

    def __init__(self) -> None:
        self._first: tuple | None = None

    def record(self, rank: int, error: BaseException, worker_traceback: str) -> None:
        if self._first is None:
            self._first = (rank, error, worker_traceback)

    def failed(self) -> bool:
        return self._first is not None

    def first(self) -> tuple | None:
        return self._first


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes, bytes; DDP wrapper removed):
    equal digests on every rank mean every rank holds the same student."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in getattr(model, "module", model).state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _retryable(exc: BaseException) -> bool:
    """Failures of the machinery (a lost peer, actor or object), which a restart can cure."""
    import ray.exceptions

    if isinstance(exc, getattr(torch.distributed, "DistError", ())):  # a peer went away
        return True
    # RayTaskError wraps an exception raised by remote code (the teacher service's): that
    # is the attack's error. Lost actors, objects, nodes and workers are the machinery's.
    return (isinstance(exc, ray.exceptions.RayError)
            and not isinstance(exc, ray.exceptions.RayTaskError))


def _cause(exc: BaseException) -> BaseException:
    """The exception raised by remote code, without Ray's RayTaskError wrapper."""
    import ray.exceptions

    while isinstance(exc, ray.exceptions.RayTaskError) and isinstance(exc.cause, BaseException):
        exc = exc.cause
    return exc


def _stand_in(exc: BaseException, rank: int) -> RuntimeError:
    """Used when the exception itself cannot cross processes."""
    return RuntimeError(f"the attack failed in Ray Train worker rank {rank} with "
                        f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}")


def _record_failure(failures, rank: int, exc: BaseException) -> None:
    import ray

    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    error = _cause(exc)
    try:
        ray.get(failures.record.remote(rank, error, tb))
    except Exception:  # noqa: BLE001 - not serialisable: send a description instead
        ray.get(failures.record.remote(rank, _stand_in(error, rank), tb))


def attack_worker(config: dict) -> None:
    """Train loop of every Ray Train worker."""
    import ray
    import ray.train

    failures = config["failures"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if ray.get(failures.failed.remote()):
        return  # an earlier attempt failed in the attack code: run_attack raises that error
    try:
        _attack(config["job"], rank, world)
    except Exception as exc:
        if _retryable(exc):
            raise  # Ray Train restarts the worker group (up to MAX_FAILURES times)
        _record_failure(failures, rank, exc)
        log.info("the attack failed on rank %d (%s); not retried", rank, type(exc).__name__)
        if world > 1:
            # Peers may be waiting in a collective for this rank: failing the worker group
            # makes Ray Train stop them; the restarted group sees the record and ends.
            raise


def _attack(job: AttackJob, rank: int, world: int) -> None:
    import ray
    import ray.train
    import ray.train.torch

    from aspkd_ray.teacher import connect_teacher_service

    pool = job.pool if isinstance(job.pool, StreamedPool) else ray.get(job.pool)
    size, chans = job.input_shape
    student = _make_student(job.cfg, job.num_classes, chans, size)
    state = None
    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as d:
            state, weights = load_round_checkpoint(d)
        student.load_state_dict(weights)
        log.info("resuming the attack after round %d", state.round)
    student = ray.train.torch.prepare_model(student)
    device = next(student.parameters()).device
    if isinstance(pool, ProxyPool):
        pool.x, pool.x_val = pool.x.to(device), pool.x_val.to(device)

    buy, client = None, None
    if rank == 0 and not job.settings.prompt_only:  # the baseline never touches the teacher
        client = connect_teacher_service(job.cfg, job.num_classes, budget=job.budget_total,
                                         ledger_uri=job.ledger_uri, trial=job.trial)
        images = None if job.images_ref is None else ray.get(job.images_ref)
        read = pool.index.read_images if images is None else images.__getitem__

        def buy(idx: np.ndarray, split: str = "train") -> np.ndarray:
            rows = (job.train if split == "train" else job.val)[idx]
            return client.buy([job.ids[r] for r in rows], job.classes[rows], read(rows))

    node = ray.get_runtime_context().get_node_id()
    score = _objective_scorer(job) if rank == 0 else None

    def on_round(st: AttackState, model: torch.nn.Module) -> None:
        metrics = {k: v for k, v in st.history[-1].items() if isinstance(v, (int, float))}
        metrics["round_done"] = st.round
        metrics["calls_used"] = int(len(st.bought_idx)) + (
            0 if st.bought_val is None else len(st.bought_val["idx"]))
        if score is not None:
            metrics["val_agreement"] = score(model)
        if client is not None:  # which service incarnation answered (a sweep shares one)
            metrics["teacher_actor"] = client.actor_id
        # Where each rank ran and what it holds, in rank 0's metrics (the ones Ray Train
        # keeps with the checkpoint): ranks that drifted apart are a bug, seen here first.
        me = {"rank": rank, "node_id": node, "weights_sha256": weights_digest(model)}
        workers = [me]
        if world > 1:
            workers = [None] * world
            torch.distributed.all_gather_object(workers, me)
        metrics["workers"] = workers
        if len({w["weights_sha256"] for w in workers}) > 1:
            log.warning("round %d: the ranks' students differ: %s", st.round, workers)
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                _save(st, model, Path(tmp))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)

    run_rounds(student, pool, job.settings, buy, comm=TorchDistComm(rank, world), state=state,
               on_round=on_round)


def _objective_scorer(job: AttackJob):
    """model -> % agreement with the shared validation labels (None without them)."""
    from aspkd_ray.aspkd.distill import accuracy
    from aspkd_ray.datasets import to_tensor

    if job.objective is None:
        return None
    size, chans = job.input_shape
    x = to_tensor(job.objective.images, size, chans)  # predict_logits moves each batch
    y = torch.as_tensor(job.objective.labels, dtype=torch.long)
    return lambda model: accuracy(getattr(model, "module", model), x, y)


def run_attack(job: AttackJob, location: str | Path,
               callbacks: tuple | list = ()) -> list[tuple[object, dict]]:
    """Run the attack on Ray Train; return every round's (ray.train.Checkpoint, metrics).

    `location`: where Ray Train keeps its checkpoints, a local folder or a storage URI
    (s3://…): workers on any node write there, and the driver reads every round from there
    (`load_round`), never from a worker's disk. `callbacks`: Ray Train callbacks, e.g. a
    sweep's per-round reports to Tune.

    An exception raised by the attack code is raised here, the same type and message, after
    one attempt (a stand-in RuntimeError naming its type if it cannot cross processes); a
    lost worker or node is retried up to MAX_FAILURES times from the last round checkpoint.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cfg = job.cfg
    fs, path = storage.resolve(str(location))
    if storage.is_local(fs):
        fs = None  # Ray Train's own handling of local folders (and its sync to them)
    # Sized from each node (a worker lives on one), and refused at once when the nodes can
    # never hold the group: Ray Train would wait for them forever.
    plan = plan_workers(requested=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                        cpus_per_worker=cfg.ray.cpus_per_worker, reserve_cpus=0.5,
                        autoscale=cfg.ray.autoscale)
    check_placeable(plan, autoscale=cfg.ray.autoscale)
    log.info("Ray Train: %d worker(s), %.2f CPU and %g GPU each", plan.num, plan.cpus,
             plan.gpus)
    # No CPU, pinned to this driver's node (it lives as long as the driver, whichever worker
    # node is lost; a soft affinity lets Ray place it elsewhere when that node has 0 CPUs),
    # outside any Tune trial's placement group: it never waits for resources.
    failures = ray.remote(AttackFailures).options(
        num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
            node_id=ray.get_runtime_context().get_node_id(), soft=False)).remote()
    trainer = TorchTrainer(
        attack_worker,
        train_loop_config={"job": job, "failures": failures},
        scaling_config=ScalingConfig(num_workers=plan.num, use_gpu=plan.use_gpu,
                                     resources_per_worker={"CPU": plan.cpus,
                                                           **({"GPU": plan.gpus}
                                                              if plan.use_gpu else {})}),
        run_config=RunConfig(name="attack", storage_path=path, storage_filesystem=fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=None),
                             callbacks=list(callbacks),
                             failure_config=FailureConfig(max_failures=MAX_FAILURES)),
    )
    try:
        try:
            result = trainer.fit()
            error = None
        except Exception as exc:  # noqa: BLE001 - the attack's own error, if any, wins
            result, error = None, exc
        first = ray.get(failures.first.remote())
    finally:
        ray.kill(failures)
    if first is not None:
        rank, attack_error, worker_tb = first
        if hasattr(attack_error, "add_note"):  # Python 3.11+: the worker's traceback
            attack_error.add_note(f"raised in Ray Train worker rank {rank}:\n{worker_tb}")
        raise attack_error
    if error is not None:
        raise error
    if result.error:
        raise result.error
    rounds = list(result.best_checkpoints)
    rounds.sort(key=lambda cm: cm[1].get("round_done", 0))
    return rounds


def load_round(checkpoint) -> tuple[AttackState, dict]:
    """(attack state, student weights) of a round's ray.train.Checkpoint, wherever it is
    stored (a local folder, or downloaded from object storage to a temporary folder)."""
    with checkpoint.as_directory() as folder:
        return load_round_checkpoint(folder)


def stored_rounds(location: str) -> list[tuple[object, dict]]:
    """Every round checkpoint an attack left at `location` (its Ray Train storage, as given
    to `run_attack`), as (ray.train.Checkpoint, that round's metrics), in round order; read
    from storage alone, for attacks whose `run_attack` result is gone (sweep trials, a
    trial stopped by its scheduler)."""
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    fs, path = storage.resolve(str(location))
    folder = f"{path.rstrip('/')}/attack"
    try:
        entries = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    except OSError:
        return []
    by_round: dict[int, tuple[str, object, dict]] = {}
    for entry in entries:
        if entry.type != pafs.FileType.Directory or not entry.base_name.startswith("checkpoint_"):
            continue
        checkpoint = Checkpoint(entry.path, filesystem=None if storage.is_local(fs) else fs)
        try:
            state, _ = load_round(checkpoint)
        except Exception as exc:  # noqa: BLE001 - a round cut short while being written
            log.warning("skipping unreadable round checkpoint %s: %s", entry.path, exc)
            continue
        metrics = {**(state.history[-1] if state.history else {}), "round_done": state.round}
        # A worker group restarted mid-round may write one round twice: the later one counts.
        if state.round not in by_round or entry.base_name > by_round[state.round][0]:
            by_round[state.round] = (entry.base_name, checkpoint, metrics)
    return [(c, m) for _, c, m in (by_round[r] for r in sorted(by_round))]
