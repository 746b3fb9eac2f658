"""Proxy data generation (Algorithm 1, steps 1-8): a diffusion model makes the proxy set.

registry.py     generator kinds by name (`generator.kind`): what each kind checks, prepares,
                builds and calls itself; `register_generator` adds one
plan.py         which image each sample is: ids, classes, prompts, seeds, splits
ddpm.py         the embedded scenarios' class-conditional DDPM (diffusers UNet2DModel)
train_ddpm.py   training it (`aspkd train-generator`), resumable, cached by its settings;
                the `ddpm` kind
text2image.py   any diffusers text-to-image pipeline by hub id or path (SD v2, SDXL, ...);
                the `diffusers` kind
plugin.py       any other generator by import path (the protocol is documented there); the
                `plugin` kind
backends.py     builds the configured generator; converts images to the victim's format
ray_generate.py Ray Data actors that write Parquet shards, resumable (`aspkd generate`)
store.py        the Parquet schema, the manifest, `load_proxy_set` (local path or URI)
grid.py         `aspkd show-proxy`
"""

from aspkd_ray.generation.grid import show_proxy_grid
from aspkd_ray.generation.plan import SamplePlan, generator_id, make_plan, sample_id
from aspkd_ray.generation.ray_generate import (
    GeneratorActor,
    generate_proxy,
    generate_proxy_at,
    plan_pool,
)
from aspkd_ray.generation.registry import list_generators, register_generator
from aspkd_ray.generation.store import SCHEMA, ProxySet, load_proxy_set, read_manifest
from aspkd_ray.generation.train_ddpm import ensure_generator, generator_dir, train_generator

__all__ = [
    "SCHEMA", "GeneratorActor", "ProxySet", "SamplePlan", "ensure_generator", "generate_proxy",
    "generate_proxy_at", "generator_dir", "generator_id", "list_generators", "load_proxy_set",
    "make_plan", "plan_pool", "read_manifest", "register_generator", "sample_id",
    "show_proxy_grid", "train_generator",
]
