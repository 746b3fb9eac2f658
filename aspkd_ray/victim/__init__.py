"""The victim (teacher) model: how it is trained for the scenarios (where it lives: layout)."""

from aspkd_ray.layout import victim_checkpoint_dir
from aspkd_ray.victim.train import VictimMissing, train_victim, victim_ready

__all__ = ["VictimMissing", "train_victim", "victim_checkpoint_dir", "victim_ready"]
