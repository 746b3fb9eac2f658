"""The configs of `tune_configs/`, found by name from an installed package or a checkout.

A wheel carries them as `aspkd_ray/tune_configs/` (see pyproject.toml); an editable install or
a plain checkout reads the repository's own `tune_configs/` beside `aspkd_ray/`. So
`--config digits` or `--config paper/cifar10-halfalexnet-sd2` works in a container image
where only the package is installed, and a real path still works everywhere.
"""

from __future__ import annotations

from pathlib import Path

import aspkd_ray

_PACKAGE_DIR = Path(aspkd_ray.__file__).resolve().parent
SUFFIX = ".yaml"


def config_root() -> Path | None:
    """The folder holding the packaged configs: inside the installed package first (a wheel),
    else the checkout's tune_configs/ (editable install, or running from the repository)."""
    for candidate in (_PACKAGE_DIR / "tune_configs", _PACKAGE_DIR.parent / "tune_configs"):
        if candidate.is_dir():
            return candidate
    return None


def packaged_config_names() -> list[str]:
    """Names accepted by `resolve_config_path`, e.g. 'digits', 'paper/cifar10-resnet18-sd2'."""
    root = config_root()
    if root is None:
        return []
    return sorted(p.relative_to(root).with_suffix("").as_posix()
                  for p in root.rglob(f"*{SUFFIX}") if p.is_file())


def resolve_config_path(name_or_path: str | Path, option: str = "--config") -> Path:
    """A config file from a path or a packaged config name.

    An existing file wins (so a local copy shadows a packaged config of the same name); else
    the packaged config of that name, with or without '.yaml'; else a ConfigError listing the
    packaged names. `option` names the flag in that message (e.g. '--sweep').
    """
    given = Path(name_or_path).expanduser()
    if given.is_file():
        return given
    root = config_root()
    if root is not None:
        name = str(name_or_path).strip().replace("\\", "/").strip("/")
        if not name.endswith(SUFFIX):
            name += SUFFIX
        candidate = (root / name).resolve()
        # Names stay inside the config folder: '../x' is not a packaged config.
        if candidate.is_file() and candidate.is_relative_to(root.resolve()):
            return candidate
    # Imported here: loader.py imports this module, so a top-level import would be circular.
    from aspkd_ray.config.loader import ConfigError

    names = packaged_config_names()
    shown = ", ".join(names) if names else "none (tune_configs/ is not installed)"
    raise ConfigError(f"{option} {name_or_path}: no such file and no packaged config of that "
                      f"name; give a path to a YAML file or one of: {shown}.")
