"""Model zoo (teachers and students by name) and checkpoints."""

from aspkd_ray.models.checkpoint import (
    load_checkpoint,
    load_weights,
    read_state_dict,
    save_checkpoint,
)
from aspkd_ray.models.zoo import ZooModel, create_model, list_models, register

__all__ = [
    "ZooModel", "create_model", "list_models", "load_checkpoint", "load_weights",
    "read_state_dict", "register", "save_checkpoint",
]
