"""The paper's Table 3 and budget curve on both embedded scenarios, with paired seeds and
bootstrap confidence intervals; cells run as Ray tasks and a rerun resumes.

    .venv/bin/python scripts/bench_quality.py           # → benchmarks/quality.{json,md,png}
    .venv/bin/python scripts/bench_quality.py --quick   # a small grid, a few minutes

See `aspkd_ray/quality/` for the methods, the statistics and the report.
"""

import sys

from aspkd_ray.quality.runner import main

if __name__ == "__main__":
    sys.exit(main())
