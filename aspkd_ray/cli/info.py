"""`aspkd info`: versions, Ray cluster resources, devices, faiss GPUs."""

from __future__ import annotations

import argparse
import json

from aspkd_ray import console


def register(sub) -> None:
    p = sub.add_parser("info", help="versions, Ray cluster resources, devices, faiss GPUs",
                       description="Print versions, the Ray cluster's resources (a running "
                                   "cluster if there is one, else an embedded instance), "
                                   "torch devices and whether faiss sees GPUs.")
    p.add_argument("--address", default=None, help="Ray address, or 'local' for an embedded "
                                                   "instance (default: RAY_ADDRESS, a running "
                                                   "local Ray, else embedded)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def collect(address: str | None = None) -> dict:
    import importlib.metadata as md

    import faiss
    import torch

    from aspkd_ray.models import list_models
    from aspkd_ray.runtime import connect

    versions = {}
    for pkg in ("aspkd-ray", "ray", "torch", "torchvision", "diffusers", "timm", "faiss-cpu",
                "faiss-gpu", "mlflow", "numpy", "pyarrow"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    devices = {"cuda": torch.cuda.is_available(), "cuda_devices": torch.cuda.device_count(),
               "names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    faiss_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    ray_info = connect(address)
    return {"versions": versions, "ray": ray_info, "torch_devices": devices,
            "faiss_gpus": faiss_gpus, "models": {"teachers": list_models("teacher"),
                                                 "students": list_models("student")}}


def run(args: argparse.Namespace) -> int:
    info = collect(args.address)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print("versions:  " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    r = info["ray"]
    mode = f" ({r['mode']})" if r.get("mode") else ""
    print(f"ray:       {r['address']}{mode} namespace={r['namespace']} nodes={r['nodes']}")
    if console.log_folder():  # Ray's session logs, where Ray's output goes unless -v
        print(f"logs:      {console.log_folder()}")
    print("resources: " + ", ".join(f"{k}={v:g}" for k, v in sorted(r["resources"].items())))
    d = info["torch_devices"]
    print(f"torch:     cuda={d['cuda']} devices={d['cuda_devices']} {d['names']}")
    print(f"faiss:     GPUs visible={info['faiss_gpus']}")
    print(f"teachers:  {', '.join(info['models']['teachers'])}")
    print(f"students:  {', '.join(info['models']['students'])}")
    return 0
