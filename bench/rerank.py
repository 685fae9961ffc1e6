"""Re-ranking and the full retrieval metrics at DeepFashion In-shop scale (14,218 queries x 12,612 gallery).

Run from the repository root:

  python -m bench.rerank                                  # D = 128 and 368, every method
  python -m bench.rerank --dims 128 --methods k_reciprocal --repeats 2
  python -m bench.rerank --embeddings run.npz --k1 6 --k2 3   # a trained model's embeddings (see --embeddings)

The embeddings are `bench.eval.clustered_embeddings` (3,985 products, Recall@1 near 0.8 before re-ranking).
For each method this times what an evaluation runs: `jaxret.rerank.reranked_distances` (the `[Q, G]`
re-ranked distances on device) and then `jaxret.metrics.retrieval_metrics_from_distances` (Recall@K,
precision@K, mAP@R, R-precision); the baseline row is `metrics.retrieval_metrics` on the embeddings, which
never forms the `[Q, G]` matrix. The first call of each includes compilation; with `--repeats` > 1 the later
calls are reported too (median). Times are wall clock and, in brackets, the CPU time of the process (all
threads), which a machine shared with other jobs inflates less. Peak memory is the process's maximum
resident set size after the method (it only grows, so read it as "at most this much up to here").

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
import numpy as np

from bench.eval import clustered_embeddings
from bench.eval import default_noise
from jaxret import metrics
from jaxret import rerank


def peak_memory_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def timed(fn, *args, **kwargs):
  """`fn(...)`, its wall time and the CPU time of this process (all threads) in seconds."""
  start, start_cpu = time.perf_counter(), time.process_time()
  result = jax.block_until_ready(fn(*args, **kwargs))
  return result, (time.perf_counter() - start, time.process_time() - start_cpu)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--dims", default="128,368", help="comma-separated embedding sizes")
  parser.add_argument("--methods", default=",".join(m for m in rerank.METHODS if m != "none"),
                      help=f"comma-separated, from {rerank.METHODS[1:]}")
  parser.add_argument("--repeats", type=int, default=1, help="calls per method; the first includes compilation")
  parser.add_argument("--num_neighbours", type=int, default=2, help="n of alpha-QE and DBA")
  parser.add_argument("--alpha", type=float, default=3.0)
  parser.add_argument("--k1", type=int, default=20, help="of k-reciprocal re-ranking")
  parser.add_argument("--k2", type=int, default=6)
  parser.add_argument("--lambda_value", type=float, default=0.3)
  parser.add_argument("--metric", default="euclidean", help="the original distance (none, k_reciprocal)")
  parser.add_argument("--chunk_size", type=int, default=256)
  parser.add_argument("--embeddings", default=None,
                      help="an .npz with query, query_labels, gallery, gallery_labels (a trained model's "
                      "embeddings of a query/gallery split) instead of random clusters; --dims is then ignored")
  args = parser.parse_args()
  ks = metrics.DEFAULT_KS
  options = {"num_neighbours": args.num_neighbours, "alpha": args.alpha, "k1": args.k1, "k2": args.k2,
             "lambda_value": args.lambda_value, "metric": args.metric, "chunk_size": args.chunk_size}
  results = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
             "device": str(jax.devices()[0]), "jax": jax.__version__, "options": options,
             "embeddings": args.embeddings, "runs": []}
  if args.embeddings:
    with np.load(args.embeddings) as data:
      datasets = [tuple(data[key] for key in ("query", "query_labels", "gallery", "gallery_labels"))]
  else:
    datasets = (clustered_embeddings(int(dim), default_noise(int(dim))) for dim in args.dims.split(","))
  for query, query_labels, gallery, gallery_labels in datasets:
    dim = query.shape[1]
    times, baseline = [], None
    for _ in range(args.repeats):
      baseline, seconds = timed(metrics.retrieval_metrics, query, query_labels, gallery, gallery_labels, ks,
                                args.metric)
      times.append(seconds)
    run = {"dim": dim, "method": "none (metrics on embeddings)", "rerank_s": [], "metrics_s": times,
           "peak_rss_gib": peak_memory_gib(), "metrics": baseline}
    results["runs"].append(run)
    print(json.dumps(run))
    for method in args.methods.split(","):
      rerank_times, metric_times = [], []
      for _ in range(args.repeats):
        distances, seconds = timed(rerank.reranked_distances, query, gallery, method, **options)
        rerank_times.append(seconds)
        numbers, seconds = timed(metrics.retrieval_metrics_from_distances, distances, query_labels, gallery_labels,
                                 ks)
        metric_times.append(seconds)
        distances = None  # freed before the next call allocates its own
      run = {"dim": dim, "method": method, "rerank_s": rerank_times, "metrics_s": metric_times,
             "peak_rss_gib": peak_memory_gib(), "metrics": numbers}
      results["runs"].append(run)
      print(json.dumps(run))

  print("\n| D | method | re-rank, first call: wall (CPU) s | later calls: wall (CPU) s | metrics: wall (CPU) s |"
        " R@1 | mAP@R | peak RSS (GiB) |")
  print("|---|---|---|---|---|---|---|---|")
  seconds = lambda t: f"{t[0]:.1f} ({t[1]:.1f})"
  for run in results["runs"]:
    first = seconds(run["rerank_s"][0]) if run["rerank_s"] else "-"
    later = run["rerank_s"][1:]
    later = seconds([statistics.median(t[i] for t in later) for i in range(2)]) if later else "-"
    print(f"| {run['dim']} | {run['method']} | {first} | {later} | {seconds(run['metrics_s'][0])} | "
          f"{run['metrics']['recall@1']:.3f} | {run['metrics']['map@r']:.3f} | {run['peak_rss_gib']:.1f} |")
  print(json.dumps(results))


if __name__ == "__main__":
  main()
