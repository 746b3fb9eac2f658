"""Ray Train layer: run the ASPKD round loop on a TorchTrainer worker group.

One worker on a CPU machine, N GPU workers with DDP on a cluster: the same code. Rank 0 is
the only one that selects and buys (through the teacher service, by name); decisions are
broadcast so every rank trains the same student. After each round, rank 0 reports a Ray Train
checkpoint (student weights + attack state), so rerunning with the same output directory
resumes where it stopped, and every round's student stays available for evaluation.
"""

from __future__ import annotations

import logging
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from aspkd_ray.aspkd.rounds import AttackState, ProxyPool, RoundSettings, run_rounds
from aspkd_ray.config import Config
from aspkd_ray.runtime import plan_workers
from aspkd_ray.train.comm import TorchDistComm

log = logging.getLogger(__name__)

STATE_FILE = "attack_state.pkl"
STUDENT_FILE = "student.pt"


@dataclass
class AttackJob:
    """Everything a worker needs; arrays travel through the object store as refs."""

    cfg: Config
    settings: RoundSettings
    pool_ref: object             # ObjectRef of ProxyPool
    ids: list[str]               # train-pool sample ids (for the teacher's ledger)
    images_ref: object           # ObjectRef of the train pool's uint8 images (what is sent)
    num_classes: int
    budget_total: int
    ledger_uri: str
    val_labels: np.ndarray | None = None
    trial: str | None = None     # Tune trial name (per-trial cap), None when standalone


def _make_student(cfg: Config, num_classes: int, chans: int, size: int) -> torch.nn.Module:
    from aspkd_ray.models import create_model, load_weights

    torch.manual_seed(cfg.seed)  # same init on every rank and every rerun
    model = create_model(cfg.student.architecture, num_classes=num_classes, in_chans=chans,
                         image_size=size)
    if cfg.student.init_checkpoint:
        load_weights(model, cfg.student.init_checkpoint, strict=False)
    return model


def _save(state: AttackState, student: torch.nn.Module, folder: Path) -> None:
    net = getattr(student, "module", student)
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()},
               folder / STUDENT_FILE)
    (folder / STATE_FILE).write_bytes(pickle.dumps(state))


def load_round_checkpoint(folder: str | Path) -> tuple[AttackState, dict]:
    """(attack state, student state dict) from a round checkpoint folder."""
    folder = Path(folder)
    state = pickle.loads((folder / STATE_FILE).read_bytes())
    weights = torch.load(folder / STUDENT_FILE, map_location="cpu", weights_only=True)
    return state, weights


def attack_worker(config: dict) -> None:
    """Train loop of every Ray Train worker."""
    import ray
    import ray.train
    import ray.train.torch

    from aspkd_ray.teacher import connect_teacher_service

    job: AttackJob = config["job"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    pool: ProxyPool = ray.get(job.pool_ref)
    _, chans, size, _ = pool.x.shape
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
    pool.x, pool.x_val = pool.x.to(device), pool.x_val.to(device)

    buy = None
    if rank == 0 and not job.settings.prompt_only:  # the baseline never touches the teacher
        client = connect_teacher_service(job.cfg, job.num_classes, budget=job.budget_total,
                                         ledger_uri=job.ledger_uri, trial=job.trial)
        images = ray.get(job.images_ref)

        def buy(picks: np.ndarray) -> np.ndarray:
            return client.buy([job.ids[i] for i in picks], pool.classes[picks], images[picks])

    def on_round(st: AttackState, model: torch.nn.Module) -> None:
        metrics = {k: v for k, v in st.history[-1].items() if isinstance(v, (int, float))}
        metrics["round_done"] = st.round
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                _save(st, model, Path(tmp))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)

    run_rounds(student, pool, job.settings, buy, comm=TorchDistComm(rank, world), state=state,
               val_labels=job.val_labels, on_round=on_round)


def run_attack(job: AttackJob, storage: Path) -> list[tuple[Path, dict]]:
    """Run the attack on Ray Train; return every round's (checkpoint folder, metrics)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = job.cfg
    plan = plan_workers(requested=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                        cpus_per_worker=cfg.ray.cpus_per_worker, reserve_cpus=0.5)
    log.info("Ray Train: %d worker(s), %.2f CPU and %g GPU each", plan.num, plan.cpus,
             plan.gpus)
    trainer = TorchTrainer(
        attack_worker,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=plan.num, use_gpu=plan.use_gpu,
                                     resources_per_worker={"CPU": plan.cpus,
                                                           **({"GPU": plan.gpus}
                                                              if plan.use_gpu else {})}),
        run_config=RunConfig(name="attack", storage_path=str(storage.resolve()),
                             checkpoint_config=CheckpointConfig(num_to_keep=None),
                             failure_config=FailureConfig(max_failures=2)),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    rounds = []
    for ckpt, metrics in result.best_checkpoints:
        rounds.append((Path(ckpt.path), metrics))
    rounds.sort(key=lambda cm: cm[1].get("round_done", 0))
    return rounds
