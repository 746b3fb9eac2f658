"""One prepared GPU check at small scale: text-to-image, DDP, kNN and the digits attack.

Parts (each guarded: a failure is recorded as an error string and the next part runs):

  text2image     A pipeline of Stable Diffusion v2's shape (UNet 320/640/1280/1280, cross
                 attention 1024, head dims 5/10/20/20, 64 x 64 latents, SD's VAE) with random
                 weights, built from configs (no hub), or --model PATH; 512 x 512, fp16.
                 Images/s through the product's Ray Data generation path (`generate_proxy`,
                 one actor on one GPU) against a plain diffusers loop in this process.
  ddp            A DDP training step of a zoo student (2 processes with 2 GPUs, else 1).
  knn            k = 5 nearest neighbours of 100k queries among 100k x 512 float32 latents
                 with the product's faiss search: CPU, GPU when faiss has GPU support, and
                 torch on the GPU for reference.
  digits_attack  `aspkd steal --config digits` with victim.device=cuda and ray.use_gpu=true
                 in a temporary output dir, through the CLI: agreement and wall time (see
                 `attack_runs` for one GPU).

The full run (about 8 minutes on an H200) writes benchmarks/gpu.json and benchmarks/gpu.md;
`--smoke` runs every part it can on a CPU at tiny scale (the parts that need CUDA are
recorded as skipped) and writes to a temporary folder, or --out. Results are written after
each part, so a run cut short keeps what it measured.

    .venv/bin/python scripts/gpu_check.py
    .venv/bin/python scripts/gpu_check.py --smoke --out /tmp/gpu-smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARTS = ("text2image", "ddp", "knn", "digits_attack")


@dataclasses.dataclass(frozen=True)
class Scale:
    resolution: int          # text-to-image output, pixels
    sd_shape: bool           # SD v2's UNet and VAE, else tiny ones
    images: int              # images per text-to-image path
    batch: int               # prompts per pipeline call
    steps: int               # denoising steps
    ddp_model: str           # zoo architecture
    ddp_image: int
    ddp_chans: int
    ddp_batch: int           # per process
    ddp_warmup: int
    ddp_steps: int
    knn_reference: int
    knn_queries: int
    knn_dim: int


FULL = Scale(resolution=512, sd_shape=True, images=64, batch=16, steps=20,
             ddp_model="resnet18", ddp_image=224, ddp_chans=3, ddp_batch=128, ddp_warmup=5,
             ddp_steps=20, knn_reference=100_000, knn_queries=100_000, knn_dim=512)
SMOKE = Scale(resolution=64, sd_shape=False, images=4, batch=2, steps=2,
              ddp_model="digits_cnn_small", ddp_image=28, ddp_chans=1, ddp_batch=32,
              ddp_warmup=1, ddp_steps=3, knn_reference=1000, knn_queries=1000, knn_dim=64)


class Skipped(Exception):
    """A part that cannot run here (the reason is recorded, not an error)."""


def cuda_ok() -> bool:
    import torch

    return torch.cuda.is_available()


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_cuda() -> None:
    """Give back what a part left on the GPU before the next one measures."""
    gc.collect()
    if cuda_ok():
        import torch

        torch.cuda.empty_cache()


# ---- text to image ------------------------------------------------------------------------

def _tokenizer(folder: Path, max_length: int):
    """A CLIP tokenizer over single characters (every prompt tokenizes; CLIP lower-cases)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                         pad_token="!", model_max_length=max_length)


def build_pipeline(folder: Path, scale: Scale) -> dict:
    """Save a random-weight text-to-image pipeline to `folder` (diffusers format)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if scale.sd_shape:  # SD v2 (base): its UNet and VAE; a 2-layer text encoder of its width
        text_dim, max_len = 1024, 77
        unet_kw = dict(sample_size=scale.resolution // 8,
                       block_out_channels=(320, 640, 1280, 1280),
                       layers_per_block=2, cross_attention_dim=1024,
                       attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
                       down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                       up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        vae_kw = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                      down_block_types=("DownEncoderBlock2D",) * 4,
                      up_block_types=("UpDecoderBlock2D",) * 4, sample_size=scale.resolution)
        text_kw = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=2,
                       num_attention_heads=16)
    else:  # tiny: the smoke run on a CPU
        text_dim, max_len = 16, 16
        unet_kw = dict(sample_size=scale.resolution // 2, block_out_channels=(8, 16),
                       layers_per_block=1, cross_attention_dim=text_dim, attention_head_dim=4,
                       norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        vae_kw = dict(block_out_channels=(8, 16), norm_num_groups=4,
                      down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, sample_size=scale.resolution)
        text_kw = dict(hidden_size=text_dim, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2)
    device = "cuda" if cuda_ok() else "cpu"
    tokenizer = _tokenizer(folder, max_len)
    with torch.device(device):  # initialising ~1B parameters is much faster on a GPU
        text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer),
                                            max_position_embeddings=max_len, bos_token_id=0,
                                            eos_token_id=1, pad_token_id=2, **text_kw))
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, **unet_kw)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **vae_kw)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    if device == "cuda":
        pipe.to(torch.float16)  # half the bytes to write and read; loaded as fp16 anyway
    pipe.save_pretrained(folder / "pipeline")
    params = {name: sum(p.numel() for p in m.parameters())
              for name, m in (("unet", unet), ("vae", vae), ("text_encoder", text))}
    del pipe, unet, vae, text
    free_cuda()
    return {"path": str(folder / "pipeline"), "random_weights": True, "parameters": params,
            "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in unet_kw.items()}}


def _t2i_config(model: str, scale: Scale, out: Path, use_gpu: bool):
    from aspkd_ray.config import from_dict

    return from_dict({
        "seed": 0, "output_dir": str(out),
        "generator": {"kind": "diffusers", "model": model, "scheduler": "ddim",
                      "steps": scale.steps, "guidance_scale": 7.5,
                      "resolution": scale.resolution, "batch_size": scale.batch,
                      "dtype": "float16"},
        "proxy": {"per_class": None, "total": scale.images},
        # One actor: the product's path on one GPU, against the loop on one GPU.
        "ray": {"use_gpu": use_gpu, "generation_actors": 1},
    })


def part_text2image(args: argparse.Namespace, scale: Scale, work: Path) -> dict:
    import numpy as np
    import ray
    import torch
    from diffusers import DiffusionPipeline

    from aspkd_ray.generation import generate_proxy
    from aspkd_ray.generation.plan import class_names_for, make_plan
    from aspkd_ray.generation.text2image import dtype_kwarg, resolve_dtype, scheduler_class
    from aspkd_ray.runtime import connect

    out: dict = {"resolution": scale.resolution, "steps": scale.steps, "batch": scale.batch,
                 "guidance_scale": 7.5, "scheduler": "ddim"}
    if args.model:
        model = args.model
        out["model"] = {"path": model, "random_weights": False}
    else:
        t = time.perf_counter()
        out["model"] = build_pipeline(work / "t2i-model", scale)
        out["model"]["build_s"] = round(time.perf_counter() - t, 2)
        model = out["model"]["path"]
    use_gpu = cuda_ok()
    cfg = _t2i_config(model, scale, work / "t2i-run", use_gpu)

    # The product's path: Ray Data, one GeneratorActor, shards written as Parquet.
    out["ray_cluster"] = connect(cfg.ray.address, "aspkd-gpu-check")
    try:
        t = time.perf_counter()
        manifest = generate_proxy(cfg, work / "t2i-ray")
        ray_s = time.perf_counter() - t
    finally:
        ray.shutdown()  # its processes would compete with the loop and the next parts
    n = int(manifest["num_samples"])
    out["ray"] = {"images": n, "wall_s": round(ray_s, 2), "images_per_s": round(n / ray_s, 3),
                  "includes": "Ray Data start, actor start, model load, PNG + Parquet"}

    # A plain diffusers loop on the same prompts and seeds, in this process.
    plan = make_plan(cfg, class_names_for(cfg))
    rows = plan.rows(slice(0, len(plan)))
    prompts, seeds = rows["prompt"].tolist(), [int(s) for s in rows["seed"]]
    device = torch.device("cuda" if use_gpu else "cpu")
    dtype = resolve_dtype("float16", device)  # fp32 on a CPU, as the product does
    t = time.perf_counter()
    pipe = DiffusionPipeline.from_pretrained(model, **dtype_kwarg(dtype))
    pipe.scheduler = scheduler_class("ddim").from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    sync()
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    made = 0
    with torch.inference_mode():
        for start in range(0, len(prompts), scale.batch):
            part = slice(start, start + scale.batch)
            gens = [torch.Generator("cpu").manual_seed(s) for s in seeds[part]]
            images = pipe(prompt=prompts[part], num_inference_steps=scale.steps,
                          guidance_scale=7.5, height=scale.resolution, width=scale.resolution,
                          generator=gens, output_type="np").images
            made += len(images)
    sync()
    gen_s = time.perf_counter() - t
    finite = bool(np.isfinite(np.asarray(images)).all())
    del pipe
    free_cuda()
    out["loop"] = {"images": made, "load_s": round(load_s, 2), "generate_s": round(gen_s, 2),
                   "images_per_s": round(made / gen_s, 3),
                   "images_per_s_with_load": round(made / (load_s + gen_s), 3),
                   "last_batch_finite": finite}
    out["dtype"] = str(dtype).replace("torch.", "")
    out["device"] = _device_name()
    out["ray_over_loop_time"] = round(ray_s / (load_s + gen_s), 3)
    return out


# ---- DDP ----------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, scale: dict, result: str) -> None:
    """One DDP process: a zoo student, random data, timed optimizer steps."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from aspkd_ray.models import create_model

    s = Scale(**scale)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
        torch.manual_seed(rank)
        model = create_model(s.ddp_model, num_classes=10, in_chans=s.ddp_chans,
                             image_size=s.ddp_image).to(dev)
        ddp = DistributedDataParallel(model, device_ids=[rank] if cuda else None)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
        x = torch.rand(s.ddp_batch, s.ddp_chans, s.ddp_image, s.ddp_image, device=dev)
        y = torch.randint(0, 10, (s.ddp_batch,), device=dev)
        times = []
        for i in range(s.ddp_warmup + s.ddp_steps):
            sync()
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(ddp(x), y).backward()  # DDP all-reduces the gradients here
            opt.step()
            sync()
            if i >= s.ddp_warmup:
                times.append(time.perf_counter() - t)
        if rank == 0:
            times.sort()
            median = times[len(times) // 2]
            Path(result).write_text(json.dumps({
                "processes": world, "backend": backend, "device": _device_name(),
                "model": s.ddp_model, "image": [s.ddp_chans, s.ddp_image, s.ddp_image],
                "batch_per_process": s.ddp_batch, "steps_timed": len(times),
                "step_ms": {"median": round(1000 * median, 2),
                            "mean": round(1000 * sum(times) / len(times), 2),
                            "min": round(1000 * times[0], 2)},
                "images_per_s": round(world * s.ddp_batch / median, 1)}))
    finally:
        dist.destroy_process_group()


def part_ddp(args: argparse.Namespace, scale: Scale, work: Path) -> dict:
    import torch
    import torch.multiprocessing as mp

    world = min(2, torch.cuda.device_count()) if cuda_ok() else 1
    result = work / "ddp.json"
    mp.spawn(_ddp_worker, args=(world, _free_port(), dataclasses.asdict(scale), str(result)),
             nprocs=world, join=True)
    return json.loads(result.read_text())


# ---- kNN ----------------------------------------------------------------------------------

def _same_neighbours(a, b) -> float:
    """Share of queries whose k neighbours are the same set (float ties may reorder them)."""
    import numpy as np

    return round(float(np.mean([set(x) == set(y) for x, y in zip(a, b, strict=True)])), 4)


def part_knn(args: argparse.Namespace, scale: Scale, work: Path) -> dict:
    import numpy as np
    import torch

    # The product's module first: it picks the BLAS kernel faiss uses.
    from aspkd_ray.aspkd.pseudo_labels import knn_pseudo_labels, load_faiss

    faiss = load_faiss()

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((scale.knn_reference, scale.knn_dim), dtype=np.float32)
    query = rng.standard_normal((scale.knn_queries, scale.knn_dim), dtype=np.float32)
    labels = rng.dirichlet(np.ones(10), scale.knn_reference).astype(np.float32)
    k, distance = 5, "cosine"
    faiss_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    out: dict = {"reference": scale.knn_reference, "queries": scale.knn_queries,
                 "dim": scale.knn_dim, "k": k, "distance": distance,
                 "faiss": getattr(faiss, "__version__", "?"), "faiss_gpus": faiss_gpus,
                 "cpu_threads": faiss.omp_get_max_threads()}

    def run(use_gpu: bool):
        t = time.perf_counter()
        res = knn_pseudo_labels(query, ref, labels, k=k, distance=distance, num_classes=10,
                                filter_by_generation_class=False, use_gpu=use_gpu)
        return time.perf_counter() - t, res

    cpu_s, cpu = run(False)
    out["cpu"] = {"seconds": round(cpu_s, 3), "queries_per_s": round(scale.knn_queries / cpu_s)}
    if faiss_gpus > 0:
        gpu_s, gpu = run(True)
        out["faiss_gpu"] = {"seconds": round(gpu_s, 3), "speedup": round(cpu_s / gpu_s, 2),
                            "same_neighbours": _same_neighbours(cpu.neighbours, gpu.neighbours)}
    else:
        why = "no CUDA" if not cuda_ok() else "faiss has no GPU support here (a faiss-cpu build)"
        out["faiss_gpu"] = {"status": "skipped", "reason": why}
    if cuda_ok():  # brute force on the GPU: what a missing faiss-gpu leaves on the table
        import torch.nn.functional as F

        sync()
        t = time.perf_counter()
        r = F.normalize(torch.from_numpy(ref).cuda(), dim=1)
        found = []
        for start in range(0, len(query), 8192):
            q = F.normalize(torch.from_numpy(query[start:start + 8192]).cuda(), dim=1)
            found.append((q @ r.T).topk(k, dim=1).indices.cpu())
        sync()
        torch_s = time.perf_counter() - t
        ids = torch.cat(found).numpy()
        out["torch_cuda"] = {"seconds": round(torch_s, 3), "speedup": round(cpu_s / torch_s, 2),
                             "same_neighbours": _same_neighbours(cpu.neighbours, ids)}
        del r, found
        free_cuda()
    else:
        out["torch_cuda"] = {"status": "skipped", "reason": "no CUDA"}
    return out


# ---- the digits attack --------------------------------------------------------------------

def attack_runs(gpus: int) -> list[tuple[str, list[str], str, str | None]]:
    """(name, --set overrides, output folder, expected error) of each `aspkd steal` run.

    The teacher service holds a whole GPU while Ray Train plans one worker per GPU, so a GPU
    victim and GPU training run side by side only with 2+ GPUs (ray.num_workers = GPUs - 1).
    On one GPU that combination is refused up front by design; it is tried after the first
    run, whose cached victim and complete proxy set make the refusal come in seconds, and
    the two halves (victim on the GPU, training on the GPU) run separately.
    """
    asked = ["victim.device=cuda", "ray.use_gpu=true"]
    if gpus >= 2:
        return [("victim_cuda_train_gpu", asked + [f"ray.num_workers={gpus - 1}"], "a", None)]
    return [("victim_cuda_train_cpu", ["victim.device=cuda", "ray.use_gpu=false"], "a", None),
            ("victim_cuda_train_gpu_refused", asked, "a", "victim.device=cuda"),
            ("victim_auto_train_gpu", ["victim.device=auto", "ray.use_gpu=true"], "b", None)]


def _grep(pattern: str, text: str) -> str | None:
    found = re.findall(pattern, text)
    return found[-1] if found else None


def steal(sets: list[str], out: Path, cache: str | None, timeout_s: float) -> dict:
    """`aspkd steal --config digits` in a subprocess (its own process group, so a timeout
    stops its embedded Ray too)."""
    cmd = [sys.executable, "-m", "aspkd_ray.cli.main", "steal", "--config", "digits",
           "--output-dir", str(out)]
    for s in sets + ([f"cache_dir={cache}"] if cache else []):
        cmd += ["--set", s]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=timeout_s)
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                text, _ = proc.communicate(timeout=15)
                break
            except subprocess.TimeoutExpired:
                text = ""
        rc = None
    res: dict = {"cmd": " ".join(cmd[1:]), "rc": rc, "wall_s": round(time.perf_counter() - t, 1),
                 "timed_out": rc is None,
                 "victim_device": {
                     "service": _grep(r"teacher service: victim on (\w+)", text),
                     "oracle": _grep(r"evaluation oracle: victim on (\w+)", text)},
                 "train": _grep(r"Ray Train: ([^\n]*each)", text)}
    summary = out / "summary.json"
    if rc == 0 and summary.is_file():
        s = json.loads(summary.read_text())
        res.update(agreement=s.get("agreement"), calls_used=s.get("calls_used"),
                   agreement_by_round=s.get("agreement_by_round"))
    res["tail"] = text[-1500:]
    return res


def part_digits_attack(args: argparse.Namespace, scale: Scale, work: Path,
                       deadline: float) -> dict:
    import torch

    if not cuda_ok():
        raise Skipped("no CUDA")
    gpus = torch.cuda.device_count()
    out: dict = {"gpus": gpus, "runs": {}}
    failed = []
    for name, sets, folder, expected in attack_runs(gpus):
        left = deadline - time.monotonic()
        if left < 60:
            out["runs"][name] = {"status": "skipped", "reason": "time budget (--budget-s)"}
            continue
        res = steal(sets, work / f"steal-{folder}", args.cache_dir, left)
        if expected is None:
            ok = res["rc"] == 0 and res.get("agreement") is not None
        else:  # refused up front, with the one-line error naming the key
            ok = res["rc"] not in (0, None) and expected in res["tail"]
            res["expected_error"] = expected
        res["status"] = "ok" if ok else "error"
        if ok and expected is None:
            res.pop("tail")
        else:
            failed.append(name)
        out["runs"][name] = res
    if failed:
        out["error"] = f"run(s) {', '.join(failed)} failed; see their tail"
        out["status"] = "error"
    return out


# ---- report -------------------------------------------------------------------------------

def _device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}"
    return "cpu"


def machine() -> dict:
    import torch

    info = {"host": platform.node(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "device": _device_name()}
    for mod in ("ray", "diffusers", "faiss"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001 - recorded, not fatal
            info[mod] = f"unavailable ({type(exc).__name__})"
    return info


def _summary(name: str, p: dict) -> str:
    if p["status"] == "skipped":
        return f"skipped: {p['reason']}"
    if p["status"] == "error" and name != "digits_attack":
        return f"error: {p['error'][:160]}"
    if name == "text2image":
        return (f"{p['resolution']} px, {p['steps']} steps, {p['dtype']}: Ray Data "
                f"{p['ray']['images_per_s']} img/s ({p['ray']['wall_s']} s with start-up) vs "
                f"loop {p['loop']['images_per_s']} img/s ({p['loop']['images_per_s_with_load']}"
                f" with load); Ray / loop time {p['ray_over_loop_time']}")
    if name == "ddp":
        return (f"{p['processes']} x {p['model']} ({p['backend']}), batch "
                f"{p['batch_per_process']}/process: {p['step_ms']['median']} ms/step, "
                f"{p['images_per_s']} img/s")
    if name == "knn":
        parts = [f"CPU {p['cpu']['seconds']} s"]
        for key, label in (("faiss_gpu", "faiss GPU"), ("torch_cuda", "torch GPU")):
            g = p[key]
            parts.append(f"{label} {g['seconds']} s (x{g['speedup']}, same "
                         f"{g['same_neighbours']})" if "seconds" in g
                         else f"{label} skipped ({g['reason']})")
        return f"{p['queries']} x {p['reference']} x {p['dim']}: " + "; ".join(parts)
    runs = []
    for run, r in p.get("runs", {}).items():
        if r.get("status") == "skipped":
            runs.append(f"{run}: skipped ({r['reason']})")
        elif r.get("expected_error"):
            runs.append(f"{run}: {'refused as designed' if r['status'] == 'ok' else 'NOT refused'}"
                        f" ({r['wall_s']} s)")
        else:
            runs.append(f"{run}: {r['status']}, agreement {r.get('agreement')}, "
                        f"{r['wall_s']} s, victim on {r['victim_device']['service']} / "
                        f"{r['victim_device']['oracle']}")
    return "; ".join(runs) or p.get("error", "")


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"# GPU check{' (smoke)' if results['smoke'] else ''}", "",
             f"{m['device']}, {m['cpus']} CPUs, torch {m['torch']} (CUDA {m['cuda']}), ray "
             f"{m['ray']}, diffusers {m['diffusers']}, faiss {m['faiss']}. Command: "
             f"`{results['command']}`; {results['wall_s']} s in all.", "",
             "| part | status | wall s | result |", "|---|---|---|---|"]
    for name in PARTS:
        p = results["parts"].get(name)
        if p is None:
            continue
        lines.append(f"| {name} | {p['status']} | {p.get('wall_s', '')} | "
                     f"{_summary(name, p).replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(results, indent=2))
    (out / "gpu.md").write_text(markdown(results))


def guarded(fn: Callable[[], dict]) -> dict:
    t = time.perf_counter()
    try:
        res = fn()
        res.setdefault("status", "ok")
    except Skipped as exc:
        res = {"status": "skipped", "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001 - recorded; the next part runs
        res = {"status": "error", "error": f"{type(exc).__name__}: {exc}",
               "traceback": traceback.format_exc()[-3000:]}
    res["wall_s"] = round(time.perf_counter() - t, 1)
    free_cuda()
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny scale on whatever is here (CPU); parts needing CUDA skip")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for gpu.json / gpu.md (default: benchmarks/, or a "
                             "temporary folder with --smoke)")
    parser.add_argument("--model", default=None,
                        help="a diffusers pipeline folder (or hub id) instead of the random "
                             "SD-v2-shaped one")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="the digits attack starts no run past this many seconds from "
                             "the start, and each run stops there")
    parser.add_argument("--cache-dir", default=None,
                        help="cache_dir for the attack (default: the config's, reused "
                             "across runs)")
    parser.add_argument("--work", type=Path, default=None,
                        help="scratch folder (default: a temporary one, removed at the end)")
    args = parser.parse_args(argv)

    t0 = time.monotonic()
    scale = SMOKE if args.smoke else FULL
    out = args.out or (Path(tempfile.mkdtemp(prefix="gpu-check-smoke-")) if args.smoke
                       else ROOT / "benchmarks")
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-check-work-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    results: dict = {"smoke": args.smoke, "command": " ".join([Path(sys.argv[0]).name]
                                                                + (argv or sys.argv[1:])),
                     "scale": dataclasses.asdict(scale), "machine": machine(), "parts": {},
                     "wall_s": 0.0}
    runners = {
        "text2image": lambda: part_text2image(args, scale, work),
        "ddp": lambda: part_ddp(args, scale, work),
        "knn": lambda: part_knn(args, scale, work),
        "digits_attack": lambda: part_digits_attack(args, scale, work,
                                                    t0 + args.budget_s),
    }
    try:
        for name in PARTS:
            if name in args.parts:
                print(f"[gpu_check] {name} ...", flush=True)
                results["parts"][name] = guarded(runners[name])
            else:
                results["parts"][name] = {"status": "skipped", "reason": "not in --parts"}
            results["wall_s"] = round(time.monotonic() - t0, 1)
            write(results, out)  # after each part: a run cut short keeps what it measured
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(markdown(results))
    print(f"written: {out / 'gpu.json'} and {out / 'gpu.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
