"""Re-ranking and the full retrieval metrics at DeepFashion In-shop scale (14,218 queries x 12,612 gallery).

Run from the repository root:

  python -m bench.rerank                                  # D = 128 and 368, every method
  python -m bench.rerank --dims 128 --methods k_reciprocal --repeats 2

The embeddings are `bench.eval.clustered_embeddings` (3,985 products, Recall@1 near 0.8 before re-ranking).
For each method this times what an evaluation runs: `jaxret.rerank.reranked_distances` (the `[Q, G]`
re-ranked distances on device) and then `jaxret.metrics.retrieval_metrics_from_distances` (Recall@K,
precision@K, mAP@R, R-precision); the baseline row is `metrics.retrieval_metrics` on the embeddings, which
never forms the `[Q, G]` matrix. The first call of each includes compilation; with `--repeats` > 1 the later
calls are reported too (median). Peak memory is the process's maximum resident set size after the method
(it only grows, so read it as "at most this much up to here").

The metrics on these random clusters say nothing about real data (k-reciprocal's neighbourhoods of
neighbourhoods are what trained embeddings have and Gaussian clusters lack); they are printed only to show that
every method ran on the full matrix. The last line of stdout is JSON with every number.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import time

import jax

from bench.eval import clustered_embeddings, default_noise
from jaxret import metrics
from jaxret import rerank


def peak_memory_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def timed(fn, *args, **kwargs):
  start = time.perf_counter()
  result = jax.block_until_ready(fn(*args, **kwargs))
  return result, time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--dims", default="128,368", help="comma-separated embedding sizes")
  parser.add_argument("--methods", default=",".join(m for m in rerank.METHODS if m != "none"),
                      help=f"comma-separated, from {rerank.METHODS[1:]}")
  parser.add_argument("--repeats", type=int, default=1, help="calls per method; the first includes compilation")
  parser.add_argument("--num_neighbours", type=int, default=2, help="n of alpha-QE and DBA")
  parser.add_argument("--alpha", type=float, default=3.0)
  parser.add_argument("--chunk_size", type=int, default=256)
  args = parser.parse_args()
  ks = metrics.DEFAULT_KS
  results = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
             "device": str(jax.devices()[0]), "jax": jax.__version__, "runs": []}
  for dim in [int(d) for d in args.dims.split(",")]:
    query, query_labels, gallery, gallery_labels = clustered_embeddings(dim, default_noise(dim))
    times, baseline = [], None
    for _ in range(args.repeats):
      baseline, seconds = timed(metrics.retrieval_metrics, query, query_labels, gallery, gallery_labels, ks)
      times.append(seconds)
    run = {"dim": dim, "method": "none (metrics on embeddings)", "rerank_s": 0.0, "metrics_s": times,
           "peak_rss_gib": peak_memory_gib(), "metrics": baseline}
    results["runs"].append(run)
    print(json.dumps(run))
    for method in args.methods.split(","):
      rerank_times, metric_times = [], []
      for _ in range(args.repeats):
        distances, seconds = timed(rerank.reranked_distances, query, gallery, method,
                                   num_neighbours=args.num_neighbours, alpha=args.alpha, chunk_size=args.chunk_size)
        rerank_times.append(seconds)
        numbers, seconds = timed(metrics.retrieval_metrics_from_distances, distances, query_labels, gallery_labels,
                                 ks)
        metric_times.append(seconds)
        distances = None  # freed before the next call allocates its own
      run = {"dim": dim, "method": method, "rerank_s": rerank_times, "metrics_s": metric_times,
             "peak_rss_gib": peak_memory_gib(), "metrics": numbers}
      results["runs"].append(run)
      print(json.dumps(run))

  print("\n| D | method | re-rank, first call (s) | later calls (s) | metrics from distances (s) | R@1 | mAP@R |"
        " peak RSS (GiB) |")
  print("|---|---|---|---|---|---|---|---|")
  for run in results["runs"]:
    rerank_s = run["rerank_s"] if isinstance(run["rerank_s"], list) else [run["rerank_s"]]
    later = f"{statistics.median(rerank_s[1:]):.1f}" if len(rerank_s) > 1 else "-"
    print(f"| {run['dim']} | {run['method']} | {rerank_s[0]:.1f} | {later} | {run['metrics_s'][0]:.1f} | "
          f"{run['metrics']['recall@1']:.3f} | {run['metrics']['map@r']:.3f} | {run['peak_rss_gib']:.1f} |")
  print(json.dumps(results))


if __name__ == "__main__":
  main()
