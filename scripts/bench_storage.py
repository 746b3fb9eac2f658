"""Benchmark: one digits attack with its storage root on a local folder vs on object storage.

The same attack (plugin proxy generator serving real digits, 8 calls per class, 3 rounds), run
in this process on one embedded Ray, alternating local and S3 for each repeat, each time into a
fresh folder / bucket (so the proxy set is generated every time). The S3 API is moto's server
on 127.0.0.1 (the one the tests use): it measures the product's object-storage path (pyarrow
S3 filesystem, Ray Train and Tune storage, MLflow artifacts over boto3), not a cloud's
network. Per stage: the median over repeats, and the S3 / local ratio.

    .venv/bin/python scripts/bench_storage.py     # writes scripts/results/storage.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def _moto() -> object:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                       "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"})
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "scripts/results/storage"))
    args = p.parse_args()
    server = _moto()  # before Ray starts: its workers inherit the endpoint
    import boto3
    from check_faults import settings

    import aspkd_ray  # noqa: F401 - sets Ray's auth mode before ray is imported
    from aspkd_ray.config import load
    from aspkd_ray.jobs.steal import run_steal

    work = Path(tempfile.mkdtemp(prefix="aspkd-bench-storage-"))
    sets = settings(work)
    overrides = [sets[i + 1] for i in range(len(sets)) if sets[i] == "--set"]
    runs: dict[str, list[dict]] = {"local": [], "s3": []}
    for rep in range(args.repeats + 1):  # repeat 0 warms up (victim training, imports)
        for kind in ("local", "s3"):
            name = f"{kind}-{rep}-{uuid.uuid4().hex[:6]}"
            extra = [f"output_dir={work / name}", f"ray.teacher_service=bench-{name}"]
            if kind == "s3":
                boto3.client("s3").create_bucket(Bucket=name)
                extra.append(f"storage.root=s3://{name}/run")
            t = time.time()
            summary = run_steal(load("digits", overrides + extra))
            row = {**summary["wall_time_s"], "wall": round(time.time() - t, 1),
                   "agreement": summary["agreement"], "calls_used": summary["calls_used"]}
            print(kind, rep, row, flush=True)
            if rep:
                runs[kind].append(row)
    server.stop()
    stages = [k for k in runs["local"][0] if k not in ("agreement", "calls_used")]
    med = {kind: {s: statistics.median(r[s] for r in rows) for s in stages}
           for kind, rows in runs.items()}
    result = {"repeats": args.repeats, "runs": runs, "median_s": med,
              "ratio_s3_over_local": {s: round(med["s3"][s] / med["local"][s], 3)
                                      if med["local"][s] else None for s in stages},
              "agreement_equal": [a["agreement"] == b["agreement"]
                                  for a, b in zip(runs["local"], runs["s3"], strict=True)]}
    Path(args.out + ".json").write_text(json.dumps(result, indent=2))
    lines = ["# Storage root: local folder vs S3 (moto on 127.0.0.1)", "",
             f"`.venv/bin/python scripts/bench_storage.py --repeats {args.repeats}` on a "
             f"2-core machine without a GPU; one warm-up pair not counted; medians in seconds.",
             "", "| stage | local | S3 | S3 / local |", "|---|---|---|---|"]
    for s in stages:
        ratio = result["ratio_s3_over_local"][s]
        lines.append(f"| {s} | {med['local'][s]:.1f} | {med['s3'][s]:.1f} | "
                     f"{'-' if ratio is None else f'{ratio:.2f}'} |")
    lines += ["", f"Agreement equal in each pair: {result['agreement_equal']} "
              f"(local {[r['agreement'] for r in runs['local']]}, "
              f"S3 {[r['agreement'] for r in runs['s3']]})."]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
