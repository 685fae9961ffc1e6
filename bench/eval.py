"""Recall@K at full DeepFashion In-shop scale: jaxret's exact on-device evaluation vs. faiss exact search.

Run from the repository root (needs `faiss-cpu`, or `faiss-gpu` on a GPU machine, not a jaxret dependency):

  python -m bench.eval                          # D = 128 and 368, 14,218 queries x 12,612 gallery images
  python -m bench.eval --dims 368 --repeats 5 --chunk_sizes 128,256,1024

The embeddings are random but clustered like a trained model's: 3,985 products (In-shop's test split), every
image its product's centre plus Gaussian noise, L2-normalised; the noise grows with D (`default_noise`) so
that Recall@1 lands near 0.8 and Recall@50 near 0.98, about what the published models reach on In-shop.
jaxret's side is `jaxret.metrics.recall_at_k` (squared Euclidean distances, rank of the first correct
gallery image, chunks of queries; NumPy in, Python floats out, so the host-device copies are included). The
faiss side is what a PyTorch user would run: `IndexFlatL2` over the gallery, `search` for the `max(ks)`
nearest, Recall@K from the labels of those (index build, search and the label check are all timed). The two
take turns, after one untimed call each, `--repeats` times; times are medians.

Agreement is checked per query, not only per Recall@K: for every query the rank of the first correct
gallery image from jaxret must equal its position in faiss's list (or both must be >= max(ks)). A query on
which they differ is reported with its two distances; only exact float ties or differences at float32
rounding level (different summation orders) may differ, and the run fails otherwise.

The last line of stdout is JSON with every number.
"""

import argparse
import json
import os
import platform
import statistics
import time

import jax
import numpy as np

from jaxret import metrics

NUM_PRODUCTS = 3985  # In-shop's test split: 3,985 products,
NUM_QUERIES = 14218  # 14,218 query images
NUM_GALLERY = 12612  # and 12,612 gallery images.


def default_noise(dim: int) -> float:
  """Noise around the product centres that gives Recall@1 of about 0.8 at this D (calibrated at 128, 368)."""
  return 1.4 * (dim / 128) ** 0.33


def clustered_embeddings(dim: int, noise: float, seed: int = 0, num_products: int = NUM_PRODUCTS,
                         num_queries: int = NUM_QUERIES, num_gallery: int = NUM_GALLERY):
  """Query and gallery embeddings around per-product centres; every product in both splits.

  Returns:
    `(query [Q, D] float32, query_labels [Q] int32, gallery [G, D] float32, gallery_labels [G] int32)`.
  """
  rng = np.random.default_rng(seed)
  centres = rng.standard_normal((num_products, dim)).astype(np.float32)

  def split(count):
    labels = np.concatenate([np.arange(num_products), rng.integers(0, num_products, count - num_products)])
    labels = rng.permutation(labels).astype(np.int32)
    x = centres[labels] + noise * rng.standard_normal((count, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), labels

  query, query_labels = split(num_queries)
  gallery, gallery_labels = split(num_gallery)
  return query, query_labels, gallery, gallery_labels


def faiss_first_hit(faiss, query, query_labels, gallery, gallery_labels, k: int):
  """faiss exact search: `[Q]` position of the first correct image among the k nearest (k when none)."""
  index = faiss.IndexFlatL2(gallery.shape[1])
  index.add(gallery)
  _, neighbours = index.search(query, k)
  hits = gallery_labels[neighbours] == query_labels[:, None]
  return np.where(hits.any(axis=1), hits.argmax(axis=1), k), neighbours


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--dims", default="128,368", help="comma-separated embedding sizes")
  parser.add_argument("--ks", default=",".join(map(str, metrics.DEFAULT_KS)))
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--chunk_sizes", default="128", help="jaxret query chunk sizes to time")
  parser.add_argument("--noise", type=float, default=None, help="noise around the product centres "
                      "(default: default_noise(D))")
  parser.add_argument("--faiss", choices=("on", "off"), default="on")
  args = parser.parse_args()
  ks = tuple(int(k) for k in args.ks.split(","))
  k_max = max(ks)
  chunk_sizes = [int(c) for c in args.chunk_sizes.split(",")]
  faiss = None
  if args.faiss == "on":
    import faiss  # pylint: disable=g-import-not-at-top
  load_at_start = os.getloadavg()[0]

  results = []
  for dim in (int(d) for d in args.dims.split(",")):
    noise = default_noise(dim) if args.noise is None else args.noise
    query, query_labels, gallery, gallery_labels = clustered_embeddings(dim, noise)
    contestants = {}
    for chunk in chunk_sizes:
      contestants[f"jaxret_chunk{chunk}"] = (
          lambda chunk=chunk: metrics.recall_at_k(query, query_labels, gallery, gallery_labels, ks,
                                                  chunk_size=chunk))
    if faiss is not None:
      def faiss_recall():
        first, _ = faiss_first_hit(faiss, query, query_labels, gallery, gallery_labels, k_max)
        return {k: float(np.mean(first < k)) for k in ks}
      contestants["faiss_flat_l2"] = faiss_recall
    recalls = {name: fn() for name, fn in contestants.items()}  # Warm-up (compiles jaxret's chunks).
    wall = {name: [] for name in contestants}
    cpu = {name: [] for name in contestants}
    names = list(contestants)
    for repeat in range(args.repeats):
      for name in (names if repeat % 2 == 0 else names[::-1]):
        start, start_cpu = time.perf_counter(), time.process_time()
        recalls[name] = contestants[name]()
        wall[name].append(time.perf_counter() - start)
        cpu[name].append(time.process_time() - start_cpu)
    row = {"dim": dim, "noise": noise, "recalls": recalls,
           "median_s": {n: statistics.median(w) for n, w in wall.items()},
           "cpu_s": {n: statistics.median(c) for n, c in cpu.items()}, "wall_s": wall}

    # Per-query agreement of jaxret's first-hit rank with faiss's list.
    if faiss is not None:
      ranks = np.asarray(metrics.query_ranks(query, query_labels, gallery, gallery_labels,
                                             chunk_size=chunk_sizes[0]))
      first, _ = faiss_first_hit(faiss, query, query_labels, gallery, gallery_labels, k_max)
      expected = np.minimum(ranks, k_max)
      differ = np.flatnonzero(expected != first)
      disagreements = []
      for q in differ[:20]:
        # Exact float64 distances of the two candidates for the first hit, to tell ties from errors.
        candidates = {"jaxret_rank": int(ranks[q]), "faiss_position": int(first[q])}
        exact = np.sum((gallery.astype(np.float64) - query[q].astype(np.float64)) ** 2, axis=1)
        order = np.argsort(exact, kind="stable")
        exact_first = int(np.flatnonzero(gallery_labels[order] == query_labels[q])[0])
        candidates["float64_rank"] = exact_first
        candidates["float64_gap_at_rank"] = float(
            abs(exact[order[min(exact_first, len(order) - 1)]] - exact[order[max(exact_first - 1, 0)]]))
        disagreements.append(candidates)
      row["queries_differing"] = int(len(differ))
      row["disagreements"] = disagreements
      row["recall_equal"] = all(recalls[n] == recalls["faiss_flat_l2"] for n in recalls)
      for name in names:
        if name != "faiss_flat_l2":
          row.setdefault("ratio_to_faiss", {})[name] = row["median_s"][name] / row["median_s"]["faiss_flat_l2"]
    results.append(row)
    print(f"D = {dim}: " + ", ".join(f"{n} {row['median_s'][n]:.3f} s (cpu {row['cpu_s'][n]:.2f} s)"
                                     for n in names))
    print(f"  Recall@K: {recalls[names[0]]}")
    if faiss is not None:
      print(f"  time / faiss: {row['ratio_to_faiss']}; Recall@K equal: {row['recall_equal']}; "
            f"queries whose first-hit rank differs: {row['queries_differing']}")

  info = {
      "benchmark": "eval", "queries": NUM_QUERIES, "gallery": NUM_GALLERY, "products": NUM_PRODUCTS,
      "ks": ks, "repeats": args.repeats, "results": results,
      "device": jax.devices()[0].device_kind, "jax": jax.__version__, "numpy": np.__version__,
      "faiss": None if faiss is None else faiss.__version__,
      "faiss_threads": None if faiss is None else faiss.omp_get_max_threads(),
      "python": platform.python_version(), "cpu_count": os.cpu_count(),
      "load_average_start_end": [load_at_start, os.getloadavg()[0]],
      "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
  }
  print(json.dumps(info))
  if faiss is not None and any(not r["recall_equal"] for r in results):
    raise SystemExit("Recall@K of jaxret and faiss differ; see 'disagreements' above.")


if __name__ == "__main__":
  main()
