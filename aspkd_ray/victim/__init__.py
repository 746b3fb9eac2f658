"""The victim (teacher) model: where it lives and how it is trained for the scenarios."""

from aspkd_ray.victim.train import VictimMissing, train_victim, victim_checkpoint_dir, victim_ready

__all__ = ["VictimMissing", "train_victim", "victim_checkpoint_dir", "victim_ready"]
