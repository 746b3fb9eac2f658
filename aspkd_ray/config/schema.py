"""The typed configuration of one aspkd-ray job.

Every section is a dataclass; `aspkd_ray.config.load` builds them from YAML plus
`--set dotted.key=value` overrides and validates every value up front, so a bad key or value
fails before any Ray work starts. Key names are part of the public contract (configs in
`tune_configs/`, Tune search spaces and checks rely on them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Field metadata keys understood by the loader.
#   choices: the accepted values
#   min / max: inclusive numeric bounds; gt: strict lower bound
CHOICES = "choices"


def _f(default: Any = None, *, choices: tuple | None = None, min: float | None = None,
       max: float | None = None, gt: float | None = None, doc: str = "") -> Any:
    meta = {"choices": choices, "min": min, "max": max, "gt": gt, "doc": doc}
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DatasetConfig:
    name: str = _f("digits", choices=("digits", "digits-xdomain", "sklearn-digits", "cifar10",
                                      "food101", "ferplus", "imagefolder"),
                   doc="the victim's data set; its test split measures agreement")
    root: str | None = _f(None, doc="folder with the data set files (real data sets)")
    image_size: int | None = _f(None, min=4, doc="victim input size; None = data set default")
    channels: int | None = _f(None, choices=(1, 3), doc="None = data set default")
    horizontal_flip: bool | None = _f(None, doc="flip images in training augmentation; None "
                                                "= data set default (never for digits)")
    download: bool = _f(False, doc="let torchvision download the data set when missing")


@dataclass
class TrainingConfig:
    optimizer: str = _f("adam", choices=("adam", "adamw", "sgd"))
    lr: float = _f(1e-3, gt=0.0)
    weight_decay: float = _f(0.0, min=0.0)
    step_size: int = _f(20, min=1, doc="StepLR step, in epochs")
    gamma: float = _f(0.95, gt=0.0, max=1.0, doc="StepLR decay")
    max_epochs: int = _f(100, min=1)
    patience: int = _f(10, min=1, doc="early stopping: epochs without improvement")
    batch_size: int = _f(64, min=1)
    augment: bool = _f(True, doc="data set specific augmentation (never flips digits)")
    early_stopping: str = _f("generation_val", choices=("generation_val", "bought_val", "none"),
                             doc="signal for early stopping: accuracy against generation "
                                 "classes on the proxy validation split, or agreement on a "
                                 "bought (counted) teacher-labelled validation subset")
    bought_val_per_class: int = _f(0, min=0, doc="calls per class spent on bought_val")
    ema: float | None = _f(None, gt=0.0, max=1.0,
                           doc="keep an exponential moving average of the weights with this "
                               "decay per step and end the fit on it (a steadier student "
                               "than the last step's); None = off")


@dataclass
class VictimConfig:
    architecture: str = _f("digits_cnn", doc="model zoo name (aspkd info lists them)")
    checkpoint: str | None = _f(None, doc="victim weights; None = <cache_dir>/<dataset>/victim")
    output: str = _f("soft", choices=("soft", "hard"), doc="what the black box returns")
    endpoint: str | None = _f(None, doc="HTTP URL of a served victim instead of a checkpoint")
    protocol: str = _f("mlflow", doc="a registered HTTP protocol (teacher/http_victim.py): "
                                     "mlflow (MLflow scoring), v2 (Open Inference Protocol "
                                     "v2), or any other registered one")
    model_name: str | None = _f(None, doc="model name for the v2 protocol")
    timeout_s: float = _f(30.0, gt=0.0)
    max_retries: int = _f(3, min=0)
    rate_limit_per_s: float | None = _f(None, gt=0.0, doc="max HTTP requests per second")
    auth_env: str | None = _f(None, doc="environment variable holding a bearer token")
    batch_size: int = _f(256, min=1, doc="samples per victim call")
    device: str = _f("cpu", choices=("cpu", "cuda", "auto"),
                     doc="where a local victim runs, in the teacher service and the "
                         "evaluation oracle: cuda asks Ray for one GPU each; auto = cuda "
                         "when the cluster has a GPU")
    defence: dict | None = _f(None, doc="an output defence applied by the teacher service "
                                        "only (the evaluation oracle sees the undefended "
                                        "victim), e.g. {name: rounding, decimals: 2}: a "
                                        "registered name (teacher/defences.py: top1, topk, "
                                        "rounding, gaussian_noise, reverse_sigmoid) and its "
                                        "parameters; top1 sells hard labels; None = "
                                        "undefended")
    training: TrainingConfig = field(default_factory=TrainingConfig)


@dataclass
class GeneratorTrainingConfig:
    steps: int = _f(1500, min=1)
    batch_size: int = _f(128, min=1)
    lr: float = _f(1e-3, gt=0.0)
    block_channels: list[int] = _f([32, 64, 64])
    checkpoint_every: int = _f(250, min=1)


@dataclass
class GeneratorConfig:
    kind: str = _f("ddpm", doc="a registered generator kind (generation/registry.py): ddpm "
                               "(small class-conditional model trained here), diffusers (any "
                               "text-to-image pipeline by hub id or path), plugin "
                               "(module:callable), or any other registered kind")
    model: str | None = _f(None, doc="hub id or local path; None for ddpm = "
                                     "<cache_dir>/<dataset>/generator")
    plugin: str | None = _f(None, doc="'package.module:factory' for kind=plugin")
    templates: list[str] = _f(["An image of a {class}", "A photo of a {class}"])
    scheduler: str = _f("ddim", choices=("ddim", "ddpm", "dpm", "euler", "default"))
    steps: int = _f(25, min=1)
    guidance_scale: float = _f(7.5, min=0.0)
    resolution: int = _f(16, min=4, doc="generation size; images are resized to the victim's")
    dtype: str = _f("float32", choices=("float32", "float16", "bfloat16"))
    batch_size: int = _f(64, min=1)
    training: GeneratorTrainingConfig = field(default_factory=GeneratorTrainingConfig)


@dataclass
class ProxyConfig:
    per_class: int | None = _f(300, min=1, doc="images per class (or set total)")
    total: int | None = _f(None, min=1)
    balanced: bool = _f(True, doc="exact per-class balance instead of uniform class draws")
    val_fraction: float = _f(0.15, min=0.0, max=0.9)
    frame: float | None = _f(None, gt=0.0, max=1.0,
                             doc="shrink each generated image to this share of the victim's "
                                 "input size, centred on a black frame, as the victim's own "
                                 "data is laid out (MNIST digits fill 20/28 of theirs); "
                                 "None = the whole frame")
    dir: str | None = _f(None, doc="folder holding (or to hold) proxy/; None = output_dir. "
                                   "Point runs and sweep trials at one to share a proxy set")


@dataclass
class StudentConfig:
    architecture: str = _f("digits_cnn_small")
    init_checkpoint: str | None = _f(None, doc="e.g. a Tiny ImageNet pre-trained student")
    pretrain: str = _f("none", choices=("none", "proxy_prompts"),
                       doc="Algorithm 1's init step: proxy_prompts pre-trains the student on "
                           "the proxy set with generation classes as labels (no calls)")


@dataclass
class BudgetConfig:
    calls_per_class: int | None = _f(8, min=0)
    total: int | None = _f(None, min=0, doc="total calls n; overrides calls_per_class")
    per_trial: int | None = _f(None, min=0, doc="optional cap per Tune trial")
    ledger: str | None = _f(None, doc="ledger folder or pyarrow URI; None = <output_dir>/ledger")


@dataclass
class ASPKDConfig:
    variant: str | None = _f(None, doc="a preset of the method's settings, applied above the "
                                       "config file and below --set: paper (Algorithm 1 as "
                                       "published) or aspkd_ray (this product's method); "
                                       "None = the keys as given (config/variants.py)")
    rounds: int | None = _f(None, min=1, doc="None = 3, or 1 / 2 for 1 / 2 calls per class")
    sigma: float = _f(17.0, gt=0.0)
    sigma_mode: str = _f("absolute", choices=("absolute", "median"),
                         doc="median: sigma is a multiple of the median latent distance")
    k: int = _f(5, min=1)
    distance: str | None = _f(None, choices=(None, "cosine", "euclidean"),
                              doc="kNN distance; None = cosine for soft, euclidean for hard")
    selection: str = _f("paper", doc="how a round picks the images to buy: paper (Eq. 2, "
                                     "active selection), random (Knockoff-style), or any "
                                     "registered strategy (aspkd/selection.py)")
    quotas: str = _f("equal", choices=("equal", "teacher_prior"),
                     doc="calls per generation class in a round: equal (the paper), or "
                         "teacher_prior: more where the teacher's labels so far are rare "
                         "classes, fewer where it answers its common class")
    active: bool | None = _f(None, doc="deprecated: true = selection paper, false = "
                                       "selection random")
    self_paced: bool = _f(True, doc="kNN pseudo-labels on the unlabelled pool")
    pseudo_labels: str = _f("paper", doc="the pseudo-label rule: paper (kNN, generation-class "
                                         "filter) or any registered rule "
                                         "(aspkd/pseudo_labels.py)")
    generation_class_filter: bool = _f(True)
    # The `confident` pseudo-label rule (aspkd/variants.py); the paper's rule ignores these.
    pl_temperature: float = _f(0.5, gt=0.0, doc="confident rule: soft pseudo-labels "
                                                "sharpened as p^(1/T); 1 = as averaged")
    pl_min_confidence: float = _f(0.5, min=0.0, max=1.0,
                                  doc="confident rule: drop pseudo-labels whose neighbours "
                                      "agree less (top averaged probability, or vote share)")
    pl_class_cap: float | None = _f(2.0, gt=0.0,
                                    doc="confident rule: a class keeps at most this many "
                                        "times the mean kept per class (the most confident); "
                                        "None = no cap")
    pl_student_agreement: bool = _f(False, doc="confident rule: keep only pseudo-labels the "
                                               "student's own prediction shares")
    prior_correction: bool = _f(False, doc="divide teacher soft labels by the teacher's class "
                                           "prior on the bought set (hard: class-weighted "
                                           "loss); for victims that see the proxy set as "
                                           "mostly one class")
    centroids: str = _f("generation", choices=("generation", "predicted"))
    baseline: str = _f("none", choices=("none", "prompt_only"),
                       doc="prompt_only: train on generation classes, no teacher calls")


@dataclass
class PoolConfig:
    mode: str = _f("auto", choices=("auto", "memory", "stream"),
                   doc="memory: every process of the attack holds the decoded proxy pool; "
                       "stream: the pool stays PNG in its Parquet shards, each process "
                       "decodes only what it works on (see memory_mb, embed_actors); "
                       "auto: memory when the decoded pool fits in memory_mb")
    memory_mb: int = _f(1024, min=1,
                        doc="the most decoded images one process of a streamed attack holds: "
                            "half for decoded images kept for reuse, half for the images a "
                            "fit or pass works on; auto mode holds the pool in memory when "
                            "its float32 images fit in it")
    latents: str = _f("float32", choices=("float32", "float16"),
                      doc="how the pool's latents are kept for selection and kNN")
    embed_actors: int | None = _f(None, min=0,
                                  doc="where a streamed pool's latents are computed: 0 = in "
                                      "the Ray Train worker; N = N Ray Data actors; None = "
                                      "in the worker when the pool's images fit in half of "
                                      "memory_mb, else one actor per GPU (per node without "
                                      "GPUs)")
    embed_gpus: float = _f(0.0, min=0.0, doc="GPUs per latent actor (stream mode)")
    embed_batch: int = _f(256, min=1, doc="images per latent batch")


@dataclass
class RayConfig:
    address: str | None = _f(None, doc="None: RAY_ADDRESS or a local head, else embedded")
    namespace: str = _f("aspkd")
    num_workers: int | None = _f(None, min=1, doc="Ray Train workers; None = from resources")
    use_gpu: bool | None = _f(None, doc="None = when the cluster has GPUs")
    cpus_per_worker: float | None = _f(None, gt=0.0)
    generation_actors: int | None = _f(None, min=1, doc="None = from resources")
    teacher_service: str = _f("aspkd-teacher", doc="named actor of the teacher service")
    teacher_node: str = _f("head", doc="where the teacher service runs: head (the head node, "
                                       "needing no CPU there), any (any node with 0.25 CPU "
                                       "free), or the name of a custom resource marking the "
                                       "nodes it may run on")
    autoscale: bool = _f(False, doc="the cluster adds nodes on demand (autoscaler, KubeRay): "
                                    "ask for the planned GPUs/CPUs and wait for nodes "
                                    "instead of failing when the current nodes cannot hold "
                                    "them")


@dataclass
class TrackingConfig:
    mlflow_uri: str | None = _f(None, doc="None = sqlite:///<output_dir>/mlflow.db")
    experiment: str = _f("aspkd")


@dataclass
class StorageConfig:
    root: str | None = _f(None, doc="where everything a run writes lives (proxy set, ledger, "
                                    "checkpoints, Tune results, summary, MLflow artifacts): a "
                                    "folder, an NFS mount or a pyarrow URI (s3://bucket/run); "
                                    "None = output_dir")


@dataclass
class AuditConfig:
    """`aspkd audit`: how many calls it takes to copy the victim, with and without defences."""

    calls_per_class: list[int] = _f([1, 4, 16, 64], doc="the budget ladder, calls per class")
    defences: list[dict] = _f([{"name": "top1"}, {"name": "rounding", "decimals": 1},
                               {"name": "reverse_sigmoid"}],
                              doc="each a victim.defence mapping; the audit also runs "
                                  "undefended")
    attacks: list[str] = _f(["default", "vanilla"],
                            doc="quality methods (aspkd_ray/quality/methods.py): default = "
                                "this config's ASPKD as it is, vanilla = random picks, "
                                "bought labels only (Knockoff-style)")
    seeds: list[int] = _f([0, 1, 2], doc="paired seeds per (defence, attack, budget)")
    max_epochs: int | None = _f(6, min=1, doc="student epochs per fit in the audit (None = "
                                              "training.max_epochs)")
    step_size: int | None = _f(2, min=1, doc="its learning-rate step (None = "
                                             "training.step_size)")
    levels: list[float] = _f([50.0, 80.0, 90.0],
                             doc="agreement levels, in %, whose calls the report gives")
    prada_delta: float = _f(0.9, gt=0.0, max=1.0, doc="PRADA flags a stream when its "
                                                      "Shapiro-Wilk W falls below this")
    prada_min_distances: int = _f(50, min=3, doc="PRADA tests once a stream has this many "
                                                 "distances")
    cpus_per_trial: float = _f(1.0, gt=0.0, doc="Ray CPUs per attack trial")


@dataclass
class Config:
    seed: int = _f(0, min=0)
    output_dir: str = _f("runs/default")
    cache_dir: str = _f(".aspkd_cache", doc="trained victims and generators, reused by demo")
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    victim: VictimConfig = field(default_factory=VictimConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    aspkd: ASPKDConfig = field(default_factory=ASPKDConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
