"""Generator kinds by name: `generator.kind` names an entry of this registry.

A kind is a class (or an object) registered with `@register_generator("name")`. It answers
everything the rest of the code asks of a generator kind, so nothing outside its own module
branches on `generator.kind`:

    validate(cfg)   config load: settings this kind needs (no files, no model), ConfigError
    check(cfg)      before Ray starts: what it needs on disk or installed (no model loading)
    prepare(cfg)    before generation, in the driver: make what must exist first (the
                    embedded DDPM is trained here if missing); a no-op for most kinds
    resolve(cfg)    the config as actors on other nodes must see it (paths made absolute)
    identity(cfg)   the model part of the generator id (plan.generator_id): sample ids and
                    the manifest change when it does
    build(cfg, class_names, device) -> generator, called once per actor
    one_actor_per_cpu  plan_pool on CPUs: True for a small model (one single-threaded actor
                    per free CPU), False for a large one (one actor per node, all its threads)

`GeneratorKind` gives the defaults; a kind overrides what it needs. The built-in kinds live
next to their code: ddpm in train_ddpm.py, diffusers in text2image.py, plugin in plugin.py.
A new kind is one module with one `@register_generator` class, named in BUILTIN_MODULES so
that config validation (which may run in a fresh process) sees it. Outside code can still
bring any generator without a new kind: `generator.kind: plugin` (plugin.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from aspkd_ray.registry import Registry

if TYPE_CHECKING:
    from aspkd_ray.config import Config

# prompts, class ids, seeds -> one image per prompt (PIL or uint8 array); see plugin.py.
Generator = Callable[[list[str], list[int], list[int]], Sequence]

# Imported on the first lookup, not at import time: importing the registry stays cheap and
# free of cycles (these modules import the config, which validates against the registry).
BUILTIN_MODULES = ("aspkd_ray.generation.train_ddpm", "aspkd_ray.generation.text2image",
                   "aspkd_ray.generation.plugin")


class GeneratorKind:
    """The contract of a generator kind, with the defaults of a kind that needs nothing."""

    one_actor_per_cpu: bool = False

    def validate(self, cfg: Config) -> None:
        """Config-load checks of this kind's settings; raise ConfigError naming the key."""

    def check(self, cfg: Config) -> None:
        """Checks before Ray starts that need no model loading; raise ConfigError."""

    def prepare(self, cfg: Config) -> None:
        """Make what must exist before generation (in the driver, once)."""

    def resolve(self, cfg: Config) -> Config:
        """The config as generator actors, possibly on other nodes, must see it."""
        return cfg

    def identity(self, cfg: Config) -> str:
        """The model part of the generator id; must not depend on where the run happens."""
        raise NotImplementedError

    def build(self, cfg: Config, class_names: tuple[str, ...],
              device: str | None = None) -> Generator:
        """The generator, loaded and ready to sample (once per actor)."""
        raise NotImplementedError


KINDS: Registry[GeneratorKind] = Registry("generator.kind", instantiate=True,
                                          builtins=BUILTIN_MODULES)
register_generator = KINDS.register   # @register_generator("name") on a GeneratorKind class
list_generators = KINDS.names
get_generator = KINDS.get


def check_generator(cfg: Config) -> None:
    """The configured kind's checks that need no model loading (a bad plugin fails here,
    before Ray starts)."""
    get_generator(cfg.generator.kind).check(cfg)


def prepare_generator(cfg: Config) -> None:
    """What the configured kind needs before generation (trains the embedded DDPM if
    missing; nothing for the other built-in kinds)."""
    get_generator(cfg.generator.kind).prepare(cfg)
