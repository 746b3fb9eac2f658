"""The victim (teacher) model: where it lives and how it is trained for the scenarios."""

from aspkd_ray.victim.train import train_victim, victim_checkpoint_dir

__all__ = ["train_victim", "victim_checkpoint_dir"]
