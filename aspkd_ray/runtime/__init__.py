"""Ray connection and resource sizing (no algorithm code here)."""

from aspkd_ray.runtime.ray_connect import connect, describe, shutdown
from aspkd_ray.runtime.resources import WorkerPlan, plan_workers

__all__ = ["WorkerPlan", "connect", "describe", "plan_workers", "shutdown"]
