"""Benchmark: kNN pseudo-labelling with batched faiss vs the authors' per-query Python loop.

Default workload: 100,000 unlabelled query latents x 10,000 teacher-labelled reference latents,
dimension 512 (random float32), soft labels over 10 classes, k = 5, cosine and Euclidean.

faiss labels all queries. The per-query loop on all 100k queries would take too long, so it runs
on a random subset of queries (--loop-queries) and its time is extrapolated per query to the
full set; on that subset the two label sets are compared. Each measurement is repeated
(--repeats), faiss and loop interleaved in the same process, and the median is reported.

    .venv/bin/python scripts/bench_knn.py            # writes scripts/results/knn.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Imported before faiss itself: the module picks the OpenBLAS kernel faiss will use.
from aspkd_ray.aspkd.pseudo_labels import (  # noqa: E402
    knn_pseudo_labels,
    knn_pseudo_labels_reference,
    load_faiss,
)

faiss = load_faiss()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=100_000)
    parser.add_argument("--reference", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--loop-queries", type=int, default=1000,
                        help="random queries the per-query loop labels (time extrapolated)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--distances", nargs="+", default=["cosine", "euclidean"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    return parser.parse_args()


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def compare(fast, slow, subset: np.ndarray) -> dict:
    """How the faiss labels of the subset's queries compare with the loop's."""
    labels_fast = fast.labels[subset]
    return {
        "queries_compared": int(subset.size),
        "same_neighbours": bool(np.array_equal(fast.neighbours[subset], slow.neighbours)),
        "same_classes": bool(np.array_equal(fast.classes[subset], slow.classes)),
        "labels_allclose": bool(np.allclose(labels_fast, slow.labels, rtol=1e-5, atol=1e-6)),
        "max_abs_label_diff": float(np.abs(labels_fast - slow.labels).max()),
        "rows_with_different_neighbours": int(
            (fast.neighbours[subset] != slow.neighbours).any(axis=1).sum()),
    }


def main() -> None:
    args = parse_args()
    rng = np.random.default_rng(args.seed)
    query = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    reference = rng.standard_normal((args.reference, args.dim), dtype=np.float32)
    soft = rng.dirichlet(np.full(args.classes, 0.5), args.reference).astype(np.float32)
    subset = np.sort(rng.choice(args.queries, size=args.loop_queries, replace=False))
    common = {"k": args.k, "mode": "soft", "num_classes": args.classes}

    load_before = os.getloadavg()
    results = {}
    for distance in args.distances:
        faiss_times, loop_times, checks = [], [], []
        for repeat in range(args.repeats):
            t_fast, fast = timed(lambda d=distance: knn_pseudo_labels(
                query, reference, soft, distance=d, use_gpu=False, **common))
            t_loop, slow = timed(lambda d=distance: knn_pseudo_labels_reference(
                query[subset], reference, soft, distance=d, **common))
            faiss_times.append(t_fast)
            loop_times.append(t_loop)
            checks.append(compare(fast, slow, subset))
            print(f"{distance} repeat {repeat + 1}: faiss {t_fast:.2f} s for {args.queries} "
                  f"queries, loop {t_loop:.2f} s for {args.loop_queries}", flush=True)

        faiss_s = statistics.median(faiss_times)
        loop_per_query_s = statistics.median(loop_times) / args.loop_queries
        loop_extrapolated_s = loop_per_query_s * args.queries
        results[distance] = {
            "faiss_seconds": faiss_times,
            "faiss_seconds_median": faiss_s,
            "faiss_ms_per_query": 1e3 * faiss_s / args.queries,
            "loop_seconds_on_subset": loop_times,
            "loop_ms_per_query": 1e3 * loop_per_query_s,
            "loop_seconds_extrapolated_to_all_queries": loop_extrapolated_s,
            "speedup": loop_extrapolated_s / faiss_s,
            "labels_check": checks[-1],
            "labels_identical_every_repeat": all(
                c["same_neighbours"] and c["same_classes"] and c["labels_allclose"]
                for c in checks),
        }
        print(f"{distance}: speedup {results[distance]['speedup']:.1f}x, "
              f"labels {results[distance]['labels_check']}", flush=True)

    report = {
        "workload": {"queries": args.queries, "reference": args.reference, "dim": args.dim,
                     "classes": args.classes, "k": args.k, "labels": "soft",
                     "data": "random float32 N(0,1) latents, Dirichlet(0.5) soft labels",
                     "loop_queries": args.loop_queries, "repeats": args.repeats,
                     "seed": args.seed},
        "method": ("faiss: knn_pseudo_labels (exact flat index, CPU, batched, vectorised "
                   "weighting) on all queries. loop: knn_pseudo_labels_reference (per query: "
                   "numpy distances to every reference, full sort, take k, weight) on a random "
                   "subset; its time is extrapolated per query to all queries. Medians of "
                   "the repeats; faiss and loop interleaved in one process."),
        "results": results,
        "machine": {"cpus": os.cpu_count(), "faiss_threads": faiss.omp_get_max_threads(),
                    "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "numpy": np.__version__,
                    "faiss": faiss.__version__,
                    "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
                    "load_average_1min_before_after": [load_before[0], os.getloadavg()[0]]},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "knn.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "knn.md").write_text(markdown(report))
    print(f"wrote {args.out / 'knn.json'} and {args.out / 'knn.md'}")


def markdown(report: dict) -> str:
    w = report["workload"]
    lines = [
        "# kNN pseudo-labelling: batched faiss vs per-query Python loop",
        "",
        f"{w['queries']:,} queries x {w['reference']:,} reference latents, dim {w['dim']}, "
        f"soft labels over {w['classes']} classes, k = {w['k']} ({w['data']}). "
        f"Median of {w['repeats']} repeats, faiss and loop interleaved in one run. "
        f"The loop ran on {w['loop_queries']:,} random queries; its time for all queries is "
        "extrapolated per query (measured, not run in full).",
        "",
        "| distance | faiss, all queries (s) | loop (ms/query) | loop, extrapolated (s) "
        "| speedup | labels on loop subset |",
        "|---|---|---|---|---|---|",
    ]
    for distance, r in report["results"].items():
        c = r["labels_check"]
        same = ("identical neighbours and classes, soft labels allclose "
                f"(max diff {c['max_abs_label_diff']:.1e})"
                if r["labels_identical_every_repeat"]
                else f"DIFFER in {c['rows_with_different_neighbours']} rows")
        lines.append(
            f"| {distance} | {r['faiss_seconds_median']:.2f} | {r['loop_ms_per_query']:.2f} "
            f"| {r['loop_seconds_extrapolated_to_all_queries']:.0f} | {r['speedup']:.0f}x "
            f"| {same} |")
    m = report["machine"]
    lines += ["", f"Machine: {m['cpus']} CPU cores (shared with other jobs; 1-min load "
              f"{m['load_average_1min_before_after'][0]:.1f} before, "
              f"{m['load_average_1min_before_after'][1]:.1f} after), faiss {m['faiss']} "
              f"({m['faiss_threads']} threads, OPENBLAS_CORETYPE={m['openblas_coretype']}), "
              f"numpy {m['numpy']}. No GPU.", "",
              "Command: `.venv/bin/python scripts/bench_knn.py`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
