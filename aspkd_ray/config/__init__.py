"""Typed, validated configuration: YAML files in tune_configs/ plus --set overrides."""

from aspkd_ray.config.loader import (
    ConfigError,
    config_hash,
    flatten,
    from_dict,
    load,
    parse_override,
    to_dict,
)
from aspkd_ray.config.schema import (
    ASPKDConfig,
    BudgetConfig,
    Config,
    DatasetConfig,
    GeneratorConfig,
    PoolConfig,
    ProxyConfig,
    RayConfig,
    StorageConfig,
    StudentConfig,
    TrackingConfig,
    TrainingConfig,
    VictimConfig,
)


def total_budget(cfg: Config, num_classes: int) -> int:
    """The global call budget n: budget.total, else calls_per_class x classes."""
    if cfg.budget.total is not None:
        return cfg.budget.total
    return cfg.budget.calls_per_class * num_classes


def num_rounds(cfg: Config, num_classes: int) -> int:
    """r: aspkd.rounds, else the paper's default (1 / 2 for 1 / 2 calls per class, else 3)."""
    if cfg.aspkd.rounds is not None:
        return cfg.aspkd.rounds
    per_class = total_budget(cfg, num_classes) // max(num_classes, 1)
    return max(1, min(3, per_class))


__all__ = [
    "ASPKDConfig", "BudgetConfig", "Config", "ConfigError", "DatasetConfig", "GeneratorConfig",
    "PoolConfig", "ProxyConfig", "RayConfig", "StorageConfig", "StudentConfig", "TrackingConfig", "TrainingConfig",
    "VictimConfig", "config_hash", "flatten", "from_dict", "load", "num_rounds",
    "parse_override", "to_dict", "total_budget",
]
