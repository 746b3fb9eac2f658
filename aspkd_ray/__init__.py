"""aspkd-ray: few-call black-box model stealing (ASPKD) as a distributed Ray system."""

from aspkd_ray.runtime.ray_connect import use_local_token

use_local_token()  # must run before `import ray` (see its docstring)

__version__ = "0.1.0"
