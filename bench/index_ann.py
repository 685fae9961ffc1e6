r"""Exact (FLAT) against approximate (HNSW, IVF_FLAT) Milvus indexes on a catalogue scaled up to 100k images.

Run from the repository root, after a demo training run (its embeddings are the starting point; the results
in docs/benchmarks.md use a run stopped at step 100, whose embeddings have not collapsed):

  python -m jaxret.train --config configs/demo.py --workdir /tmp/jaxret_demo100 --config.total_steps=100 \
      --config.eval_every=50 --config.checkpoint_every=50
  python -m bench.index_ann --workdir /tmp/jaxret_demo100     # 100k gallery vectors, 1000 queries

The real embeddings of the run's dataset (train, query and gallery splits) give the statistics of the
scaled-up catalogue: product centres are drawn from a Gaussian with the covariance of the real products'
mean embeddings, and images of a product add a residual drawn from a Gaussian with the real within-product
covariance (so the vectors have the run's dimension, scale and cluster structure). `--num_vectors` gallery
vectors (3 images per product) are upserted through `jaxret.catalog.Catalog` into a fresh Milvus Lite
database per index type, and `--num_queries` query vectors (new images of gallery products) are searched.

Reported per index and search setting: time to upsert, flush and build the index, median and 95th
percentile latency of one-query searches through `Catalog.search_embeddings` (`--latency_queries` of them),
queries/s of batched searches, neighbour recall@10 (the fraction of the exact 10 nearest vectors found,
exact = a float64 brute force) and product Recall@1/10 (the In-shop metric). A table goes to stdout;
the last line is JSON with every number.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

from jaxret import catalog

# (index type, build parameters, [search parameters ...]); builds use catalog.INDEX_BUILD_PARAMS.
SETTINGS = (
    ("FLAT", [{}]),
    ("HNSW", [{"ef": 16}, {"ef": 64}, {"ef": 256}]),
    ("IVF_FLAT", [{"nprobe": 8}, {"nprobe": 32}, {"nprobe": 128}]),
)
IMAGES_PER_PRODUCT = 3


def gaussian_like(rows: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
  """`[count, D]` zero-mean Gaussian samples with the covariance of the `[M, D]` centred `rows`."""
  weights = rng.standard_normal((count, len(rows))).astype(np.float32)
  return weights @ rows / np.sqrt(max(len(rows) - 1, 1))


def scaled_catalogue(embeddings: np.ndarray, item_ids: np.ndarray, num_vectors: int, num_queries: int,
                     seed: int = 0):
  """A larger catalogue with the cluster statistics of real embeddings.

  Args:
    embeddings: `[N, D]` real embeddings (query and gallery images).
    item_ids: `[N]` their products.
    num_vectors: gallery vectors to make (IMAGES_PER_PRODUCT per product).
    num_queries: query vectors to make, one new image each of a random gallery product.

  Returns:
    `(gallery [G, D], gallery_items [G], queries [Q, D], query_items [Q])`, float32 and int64.
  """
  rng = np.random.default_rng(seed)
  products, inverse = np.unique(item_ids, return_inverse=True)
  centres = np.stack([embeddings[inverse == p].mean(0) for p in range(len(products))])
  residuals = embeddings - centres[inverse]
  num_products = -(-num_vectors // IMAGES_PER_PRODUCT)
  new_centres = centres.mean(0) + gaussian_like(centres - centres.mean(0), num_products, rng)
  # Residual rows of products with one image are zero; the others carry n - 1 degrees of freedom each.
  scale = np.sqrt(len(residuals) / max(len(residuals) - len(products), 1))
  gallery_items = np.arange(num_vectors) // IMAGES_PER_PRODUCT
  gallery = new_centres[gallery_items] + scale * gaussian_like(residuals, num_vectors, rng)
  query_items = rng.choice(num_products, num_queries, replace=False)
  queries = new_centres[query_items] + scale * gaussian_like(residuals, num_queries, rng)
  return gallery.astype(np.float32), gallery_items.astype(np.int64), queries.astype(np.float32), query_items


def exact_neighbours(queries: np.ndarray, gallery: np.ndarray, k: int, metric: str) -> np.ndarray:
  """`[Q, k]` gallery indices of the exact k nearest, from float64 distances (chunks of queries).

  float64, not `metrics.retrieval_distances`: its float32 |q|^2 + |g|^2 - 2 q.g loses the order of near
  neighbours whose distances are below ~1e-5 of the squared norms, as in a model close to collapse.
  """
  gallery = gallery.astype(np.float64)
  if metric == "cosine":
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
  gallery_sq = np.sum(gallery * gallery, axis=1)
  nearest = []
  for start in range(0, len(queries), 100):
    chunk = queries[start:start + 100].astype(np.float64)
    if metric == "cosine":
      chunk /= np.linalg.norm(chunk, axis=1, keepdims=True)
    distances = gallery_sq[None, :] - 2.0 * chunk @ gallery.T  # + |q|^2, the same for a query's row
    nearest.append(np.argsort(distances, axis=1, kind="stable")[:, :k])
  return np.concatenate(nearest)


def recall_from_neighbours(neighbour_items: np.ndarray, query_items: np.ndarray,
                           ks=(1, 10)) -> dict[int, float]:
  """Product Recall@K from `[Q, >= max(ks)]` products of each query's nearest gallery images."""
  return {k: float(np.mean(np.any(neighbour_items[:, :k] == query_items[:, None], axis=1))) for k in ks}


def product_recall(results, query_items: np.ndarray, ks=(1, 10)) -> dict[int, float]:
  ranks = np.asarray([next((h.rank - 1 for h in hits if h.item_id == item), 1 << 30)
                      for hits, item in zip(results, query_items)])
  return {k: float(np.mean(ranks < k)) for k in ks}


def wait_for_background_index_build(uri: str) -> None:
  """Waits until Milvus Lite has built the indexes of flushed segments (it does so in a background thread).

  Milvus Lite exposes no call for this, so this reaches into its in-process server (benchmark only).
  """
  from milvus_lite.server_manager import server_manager_instance  # pylint: disable=g-import-not-at-top
  _, database, _ = server_manager_instance._servers[os.path.abspath(uri)]  # pylint: disable=protected-access
  for collection in list(database._collections.values()):  # pylint: disable=protected-access
    collection._wait_for_bg()  # pylint: disable=protected-access


def measure(embedder, index_type: str, search_settings, gallery, gallery_items, queries, query_items,
            exact_ids, args) -> list[dict]:
  """Builds one index over the gallery in a fresh database and measures each search setting on it."""
  rows = []
  with tempfile.TemporaryDirectory(prefix="ann") as folder:
    uri = os.path.join(folder, "bench.db")
    with catalog.Catalog(embedder.workdir, uri, index_type=index_type, embedder=embedder) as shop:
      start = time.perf_counter()
      names = [f"synthetic/{i}" for i in range(len(gallery))]
      shop.upsert(gallery, gallery_items, np.full(len(gallery), -1), names, "bench")
      wait_for_background_index_build(uri)
      build_s = time.perf_counter() - start
      assert shop.count() == len(gallery)
    for params in search_settings:
      with catalog.Catalog(embedder.workdir, uri, embedder=embedder, search_params=params or None,
                           create=False) as shop:
        shop.search_embeddings(queries[:1], args.k)  # Warm-up (loads the index).
        latencies = []
        for i in range(args.latency_queries):
          start = time.perf_counter()
          shop.search_embeddings(queries[i:i + 1], args.k)
          latencies.append(time.perf_counter() - start)
        start = time.perf_counter()
        results = shop.search_embeddings(queries, args.k)
        batched_s = time.perf_counter() - start
      found = np.asarray([[int(h.image.split("/")[1]) for h in hits] for hits in results])
      overlap = np.mean([len(set(f) & set(e)) / args.k for f, e in zip(found, exact_ids)])
      recall = product_recall(results, query_items)
      rows.append({
          "index": index_type, "search_params": params, "build_s": build_s,
          "median_ms": 1e3 * statistics.median(latencies),
          "p95_ms": 1e3 * float(np.percentile(latencies, 95)),
          "queries_per_s": len(queries) / batched_s,
          "neighbour_recall@10": float(overlap),
          "recall@1": recall[1], "recall@10": recall[10]})
      print(format_row(rows[-1]), flush=True)
  return rows


def format_row(row: dict) -> str:
  params = ", ".join(f"{k}={v}" for k, v in row["search_params"].items()) or "-"
  return (f"| {row['index']} | {params} | {row['build_s']:.1f} | {row['median_ms']:.1f} | "
          f"{row['p95_ms']:.1f} | "
          f"{row['queries_per_s']:.0f} | {row['neighbour_recall@10']:.3f} | {100 * row['recall@1']:.1f} | "
          f"{100 * row['recall@10']:.1f} |")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="A training run (e.g. the demo's).")
  parser.add_argument("--data_dir", default=None)
  parser.add_argument("--num_vectors", type=int, default=100_000)
  parser.add_argument("--num_queries", type=int, default=1000)
  parser.add_argument("--latency_queries", type=int, default=100)
  parser.add_argument("--k", type=int, default=10)
  parser.add_argument("--indexes", default="FLAT,HNSW,IVF_FLAT")
  args = parser.parse_args(argv)

  embedder = catalog.Embedder(args.workdir)
  real = [embedder.embed_split(split, args.data_dir) for split in ("train", "query", "gallery")]
  embeddings = np.concatenate([r[0] for r in real])
  # Products are told apart by split: a split's product ids are its own.
  item_ids = np.concatenate([r[1].item_ids * 3 + i for i, r in enumerate(real)])
  gallery, gallery_items, queries, query_items = scaled_catalogue(
      embeddings, item_ids, args.num_vectors, args.num_queries)
  start = time.perf_counter()
  exact_ids = exact_neighbours(queries, gallery, args.k, embedder.metric)
  exact_s = time.perf_counter() - start
  exact_recall = recall_from_neighbours(gallery_items[exact_ids], query_items)
  print(f"{len(gallery):,} gallery and {len(queries):,} query vectors, D = {gallery.shape[1]}, metric "
        f"{embedder.metric}, from {len(embeddings)} real embeddings of {embedder.config.model.name} step "
        f"{embedder.step}; exact Recall@1/10 {100 * exact_recall[1]:.1f} / {100 * exact_recall[10]:.1f} "
        f"(float64 brute force, {exact_s:.1f} s).")
  print("| index | search params | upsert+build s | median ms | p95 ms | queries/s (batched) | "
        "neighbour recall@10 | R@1 | R@10 |")
  print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
  wanted = args.indexes.split(",")
  rows = []
  for index_type, search_settings in SETTINGS:
    if index_type in wanted:
      rows += measure(embedder, index_type, search_settings, gallery, gallery_items, queries, query_items,
                      exact_ids, args)
  print(json.dumps({"rows": rows, "num_vectors": len(gallery), "num_queries": len(queries),
                    "dim": int(gallery.shape[1]), "metric": embedder.metric, "exact_recall": exact_recall,
                    "exact_topk_s": exact_s, "python": sys.version.split()[0], "jax": jax.__version__,
                    "machine": platform.machine(), "cpus": os.cpu_count()}))


if __name__ == "__main__":
  main()
