"""Load YAML + `--set` overrides into a validated `Config`.

Errors name the dotted key, the value given and what is accepted, scikit-learn style.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from aspkd_ray.config.packaged import resolve_config_path
from aspkd_ray.config.schema import Config
from aspkd_ray.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration key or value is wrong; the message says which and how to fix it."""

    exit_code = 2


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (arg,) = typing.get_args(tp)
        return f"list of {_type_name(arg)}"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: got {value!r} ({type(value).__name__}); expected "
                          f"{_type_name(tp)}.")
    if origin is list:
        (arg,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: got {value!r}; expected a list of {_type_name(arg)}, "
                              f"e.g. [a, b].")
        return [_coerce(f"{key}[{i}]", v, arg) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: got {value!r}; expected true or false.")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: got {value!r}; expected an integer.")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            # PyYAML reads 6e-4 (no dot) as a string; accept what is plainly a number.
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None or not math.isfinite(number):
            raise ConfigError(f"{key}: got {value!r}; expected a finite number.")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: got {value!r} ({type(value).__name__}); expected a string.")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: got {value!r}; expected null.")
    if tp is dict:  # a free-form mapping (victim.defence); its owner checks the content
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{key}: got {value!r}; expected a mapping, e.g. {{name: ...}}.")
    raise ConfigError(f"{key}: unsupported type {tp!r}")  # schema bug, not user error


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: got {data!r}; expected a mapping "
                          f"of keys to values.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]!s}; accepted keys under "
                          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(fields))}.")
    kwargs = {}
    for name, value in data.items():
        key = prefix + name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value if value is not None else {}, key + ".")
            continue
        value = _coerce(key, value, tp)
        meta = fields[name].metadata
        choices = meta.get("choices")
        if choices is not None and value not in choices:
            shown = ", ".join("null" if c is None else str(c) for c in choices)
            raise ConfigError(f"{key}: got {value!r}; expected one of: {shown}.")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            lo, hi, gt = meta.get("min"), meta.get("max"), meta.get("gt")
            if lo is not None and value < lo:
                raise ConfigError(f"{key}: got {value!r}; expected a value >= {lo}.")
            if hi is not None and value > hi:
                raise ConfigError(f"{key}: got {value!r}; expected a value <= {hi}.")
            if gt is not None and value <= gt:
                raise ConfigError(f"{key}: got {value!r}; expected a value > {gt}.")
        kwargs[name] = value
    return cls(**kwargs)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if not all(part.strip() for part in parts):
        raise ConfigError(f"--set {dotted}=...: the key has an empty part; expected "
                          f"dotted.key=value, e.g. aspkd.sigma=17.")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            section = ".".join(parts[:i + 1])
            raise ConfigError(f"--set {dotted}: {section} is {child!r}, but it is a section; "
                              f"expected a mapping of keys to values there (in the config "
                              f"file or an earlier --set).")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse 'dotted.key=value'; the value is read as YAML (so 3, 0.1, true, [a, b] work)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected dotted.key=value, e.g. aspkd.sigma=17.")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: the key is empty; expected dotted.key=value.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        one_line = " ".join(str(exc).split())
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({one_line}).") from None
    return key, value


def _check_architectures(cfg: Config) -> None:
    """victim.architecture and student.architecture must be model zoo names."""
    from aspkd_ray.models.zoo import list_models

    names = list_models()
    for key, value in (("victim.architecture", cfg.victim.architecture),
                       ("student.architecture", cfg.student.architecture)):
        if value not in names:
            raise ConfigError(f"{key}: got {value!r}; expected a model zoo name: "
                              f"{', '.join(names)} (`aspkd info` lists them).")


def _check_endpoint_url(url: str) -> None:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise ConfigError(f"victim.endpoint: got {url!r}; expected an http:// or https:// URL "
                          f"with a host (and a port in 1..65535), e.g. http://127.0.0.1:5000.")


def _check_registered(cfg: Config) -> None:
    """aspkd.selection, aspkd.pseudo_labels, generator.kind and victim.protocol must name
    registered entries (their registries: aspkd/selection.py, aspkd/pseudo_labels.py,
    generation/registry.py, teacher/http_victim.py)."""
    from aspkd_ray.aspkd.pseudo_labels import list_pseudo_label_rules
    from aspkd_ray.aspkd.selection import list_selections
    from aspkd_ray.generation.registry import list_generators
    from aspkd_ray.teacher.http_victim import list_protocols

    for key, value, names in (("aspkd.selection", cfg.aspkd.selection, list_selections()),
                              ("aspkd.pseudo_labels", cfg.aspkd.pseudo_labels,
                               list_pseudo_label_rules()),
                              ("generator.kind", cfg.generator.kind, list_generators()),
                              ("victim.protocol", cfg.victim.protocol, list_protocols())):
        if value not in names:
            raise ConfigError(f"{key}: got {value!r}; expected one of: {', '.join(names)}.")


def _deprecated_aliases(cfg: Config) -> Config:
    """aspkd.active (a bool) became aspkd.selection (a strategy name)."""
    from dataclasses import replace

    active = cfg.aspkd.active
    if active is None:
        return cfg
    wanted = "paper" if active else "random"
    if cfg.aspkd.selection not in ("paper", wanted):
        raise ConfigError(f"aspkd.active={str(active).lower()} contradicts aspkd.selection="
                          f"{cfg.aspkd.selection}; drop aspkd.active (deprecated).")
    logging.getLogger(__name__).warning(
        "aspkd.active is deprecated; use aspkd.selection=%s", wanted)
    return replace(cfg, aspkd=replace(cfg.aspkd, selection=wanted, active=None))


def _cross_validate(cfg: Config) -> None:
    from aspkd_ray.generation.registry import get_generator
    from aspkd_ray.teacher.defences import configured_defence
    from aspkd_ray.teacher.http_victim import get_protocol

    _check_architectures(cfg)
    _check_registered(cfg)
    for i, tpl in enumerate(cfg.generator.templates):
        if "{class}" not in tpl:
            raise ConfigError(f"generator.templates[{i}]: got {tpl!r}; every template must "
                              f"contain '{{class}}', e.g. 'A photo of a {{class}}'.")
    if not cfg.generator.templates:
        raise ConfigError("generator.templates: got an empty list; give at least one template.")
    if cfg.proxy.per_class is None and cfg.proxy.total is None:
        raise ConfigError("proxy: set proxy.per_class or proxy.total (both are null).")
    if cfg.budget.calls_per_class is None and cfg.budget.total is None:
        raise ConfigError("budget: set budget.calls_per_class or budget.total (both are null).")
    # The named generator kind and victim protocol check the settings they need.
    get_generator(cfg.generator.kind).validate(cfg)
    if cfg.victim.endpoint:
        _check_endpoint_url(cfg.victim.endpoint)
    get_protocol(cfg.victim.protocol).validate(cfg)
    configured_defence(cfg)  # victim.defence: a registered name, its parameters in range
    if cfg.training.early_stopping == "bought_val" and cfg.training.bought_val_per_class < 1:
        raise ConfigError("training.bought_val_per_class: got 0 with early_stopping="
                          "bought_val; expected >= 1 (these calls are charged to the budget).")


def _absolute(path: str | None) -> str | None:
    if path is None or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def absolute_paths(cfg: Config) -> Config:
    """Relative paths made absolute against this process's working directory, so Ray
    workers (which run elsewhere) read and write the same files."""
    from dataclasses import replace

    model = cfg.generator.model
    if model and os.path.exists(os.path.expanduser(model)):  # a local folder, not a hub id
        model = _absolute(model)
    return replace(
        cfg, output_dir=_absolute(cfg.output_dir), cache_dir=_absolute(cfg.cache_dir),
        dataset=replace(cfg.dataset, root=_absolute(cfg.dataset.root)),
        victim=replace(cfg.victim, checkpoint=_absolute(cfg.victim.checkpoint)),
        generator=replace(cfg.generator, model=model),
        proxy=replace(cfg.proxy, dir=_absolute(cfg.proxy.dir)),
        student=replace(cfg.student, init_checkpoint=_absolute(cfg.student.init_checkpoint)),
        budget=replace(cfg.budget, ledger=_absolute(cfg.budget.ledger)),
        storage=replace(cfg.storage, root=_absolute(cfg.storage.root)))


def with_overrides(data: dict[str, Any] | None, overrides: list[str] | tuple[str, ...] = ()
                   ) -> dict[str, Any]:
    """A copy of a config's plain dict with `dotted.key=value` overrides applied."""
    # Deep copy as plain types; YAML dates and the like become strings, which the checks
    # then reject with the key's name (never a TypeError from json).
    data = json.loads(json.dumps(data or {}, default=str))
    parsed = [parse_override(text) for text in overrides]
    _apply_variant(data, parsed)
    for key, value in parsed:
        _set_dotted(data, key, value)
    return data


_MISSING = object()


def _get_dotted(data: dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _apply_variant(data: dict[str, Any], parsed: list[tuple[str, Any]]) -> None:
    """aspkd.variant's preset over the file's values (the --set overrides go on top). A file
    that names the variant itself must not contradict it."""
    from aspkd_ray.config.variants import get_variant, list_variants

    from_set = [value for key, value in parsed if key == "aspkd.variant"]
    name = from_set[-1] if from_set else _get_dotted(data, "aspkd.variant")
    if name is _MISSING or name is None:
        return
    if not isinstance(name, str) or name not in list_variants():
        raise ConfigError(f"aspkd.variant: got {name!r}; expected one of: "
                          f"{', '.join(list_variants())}, or null.")
    for key, value in get_variant(name):
        if not from_set and _get_dotted(data, key) not in (_MISSING, value):
            raise ConfigError(f"aspkd.variant={name} sets {key}={value!r}, but the config file "
                              f"sets {key}={_get_dotted(data, key)!r}; remove one of them (or "
                              f"change {key} with --set, which goes above the variant).")
        _set_dotted(data, key, value)


def from_dict(data: dict[str, Any] | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a validated Config from a plain dict and `dotted.key=value` overrides."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config: got a {_yaml_kind(data)} at the top level; expected a "
                          f"mapping of sections, e.g. 'dataset: {{name: digits}}'.")
    cfg = _deprecated_aliases(_build(Config, with_overrides(data, overrides), ""))
    _cross_validate(cfg)
    return absolute_paths(cfg)


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
         output_dir: str | None = None) -> Config:
    """Load a YAML config (or the defaults when `path` is None) with overrides applied."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path).expanduser()
        if p.is_dir():
            raise ConfigError(f"--config {path}: a folder, not a YAML file; give a file such "
                              f"as tune_configs/digits.yaml.")
        p = resolve_config_path(path)  # a file, or a packaged name such as 'digits'
        try:
            data = yaml.safe_load(p.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            one_line = " ".join(str(exc).split())
            raise ConfigError(f"--config {path}: not valid YAML ({one_line}).") from None
        except OSError as exc:
            raise ConfigError(f"--config {path}: cannot be read ({exc.strerror}).") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"--config {path}: the top level is a {_yaml_kind(data)}; "
                              f"expected a mapping of sections, e.g. 'dataset: {{name: "
                              f"digits}}' (see tune_configs/digits.yaml).")
    extra = list(overrides)
    if output_dir is not None:
        extra.append(f"output_dir={json.dumps(output_dir)}")
    return from_dict(data, extra)


def _yaml_kind(value: Any) -> str:
    if isinstance(value, list):
        return "list"
    if isinstance(value, str):
        return f"string ({value[:40]!r})"
    return f"{type(value).__name__} ({value!r})"


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_hash(section: Any) -> str:
    """Stable short hash of a config (section), e.g. to tie artifacts to their settings."""
    blob = json.dumps(dataclasses.asdict(section) if dataclasses.is_dataclass(section)
                      else section, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def flatten(cfg: Config) -> dict[str, Any]:
    """Dotted keys → values, for MLflow params."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[prefix + k] = v

    walk(to_dict(cfg), "")
    return out
