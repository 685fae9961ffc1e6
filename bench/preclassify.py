"""Pre-classification search at DeepFashion In-shop scale: the Recall@K it keeps and the search it saves.

Run from the repository root:

  python -m bench.preclassify                        # 14,218 queries x 12,612 gallery, D = 128, 23 categories
  python -m bench.preclassify --categories skewed --accuracies 0.95,0.85,0.7 --top_ks 1,2,3 --repeats 3

Data. The query and gallery images of the synthetic dataset's `inshop` config, from its layout
(`data_prep.synthetic_inshop.split_layout`, no image rendered): In-shop's sizes (3,985 test products, 14,218
queries, 12,612 gallery images) and categories balanced over the 23 In-shop categories. `--categories skewed`
re-draws each product's category with weights 1/rank (a long tail, as shops have; not In-shop's own counts).
Embeddings are random but clustered like a trained model's (`bench.eval.clustered_embeddings`' recipe: the
product's centre plus noise, L2-normalised, Recall@1 near 0.8), with the products of a category clustered
around the category's centre (`--category_weight`), so that, as with a trained model, a query's nearest wrong
products are mostly of its own category (without that, pre-classification would look better than it is: it
would remove most of the near misses). Category predictions come from a simulated
classifier: scores = beta * one_hot(true category) + N(0, 1) noise over the 23 categories, with beta bisected so
that top-1 accuracy is each `--accuracies` target (its mistakes fall on random categories, where a real
classifier confuses neighbours: Tees with Blouses, so its top-2 recovers more than this one's).

For each accuracy and each k of `--top_ks`:
  * recall: exact Recall@K with every query restricted to the gallery images of its top-k predicted categories
    (`jaxret.preclassify.preclassified_ranks`, what `config.evals.preclassify_top_k = k` logs), with the
    gallery's known categories and with its predicted (top-1) ones (`config.evals.preclassify_gallery`);
  * fraction: the mean fraction of the gallery a query searches;
  * time (jaxret): a search that skips the excluded images, as a catalogue partitioned by category does: for every
    category, the queries that have it among their k find their 50 nearest among that category's gallery
    images only (one jitted distance block and top-k per category), and each query's k lists are merged;
    against the same code searching the whole gallery for every query. Medians of `--repeats` after an
    untimed warm-up (which compiles a program per category shape). The partitioned search's Recall@K is
    checked against the exact masked ranks (each partition measures distances from its own centre, so float32
    rounding may swap near-ties): the run fails if they differ by more than `TOLERANCE`;
  * time (Milvus): the catalogue search that `python -m jaxret.search --preclassify_top_k k` runs
    (`Catalog.search_embeddings` with each query's categories as a Milvus filter, Milvus Lite, FLAT index),
    over the first `--milvus_queries` queries with the last accuracy's predictions, against the unfiltered
    search of the same queries.

The last line of stdout is JSON with every number.
"""

import argparse
import functools
import json
import os
import platform
import statistics
import tempfile
import time
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data_prep import inshop_features
from data_prep.synthetic_inshop import synthetic_inshop
from jaxret import catalog
from jaxret import metrics
from jaxret import preclassify

NEAREST = 50  # Results per query: the largest K of In-shop's Recall@K.
PAD = 128  # Query and gallery blocks are padded to multiples of this, so that few shapes compile.
NOISE_128 = 1.15  # Noise that gives Recall@1 0.79 at D = 128 with category_weight 1 (bench.eval's 1.4: 0.46).
TOLERANCE = 1e-3  # Most Recall@K difference between two exact searches (float32 near-ties): 14 of 14,218 queries.


def inshop_layout(categories: str, seed: int = 0):
  """`(query_labels [Q], query_categories [Q], gallery_labels [G], gallery_categories [G])` of the synthetic
  `inshop` config (balanced categories), or with each product's category re-drawn with weights 1/rank."""
  config = next(c for c in synthetic_inshop.BUILDER_CONFIGS if c.name == "inshop")
  layout = synthetic_inshop.split_layout(config)
  category_of = {item.item_id: item.category for item in layout["query"] + layout["gallery"]}
  if categories == "skewed":
    num_categories = len(inshop_features.CATEGORY_NAMES)
    rng = np.random.default_rng([seed, 1])
    weights = 1.0 / np.arange(1, num_categories + 1)
    drawn = rng.choice(num_categories, size=len(category_of), p=weights / weights.sum())
    category_of = dict(zip(sorted(category_of), drawn.tolist()))

  def images(split):
    labels = np.concatenate([np.full(item.num_views, item.item_id) for item in layout[split]])
    return labels.astype(np.int32), np.array([category_of[i] for i in labels], np.int32)

  return (*images("query"), *images("gallery"))


def embeddings_for(labels_q, categories_q, labels_g, categories_g, dim: int, noise: float,
                   category_weight: float, seed: int = 0):
  """Clustered L2-normalised embeddings of the given product labels (the recipe of `bench.eval`), each product's
  centre drawn around its category's centre (`category_weight` times a random direction; 0: no category
  structure, as in `bench.eval`)."""
  rng = np.random.default_rng(seed)
  products, first = np.unique(np.concatenate([labels_q, labels_g]), return_index=True)
  product_category = np.concatenate([categories_q, categories_g])[first]
  category_centres = rng.standard_normal((len(inshop_features.CATEGORY_NAMES), dim)).astype(np.float32)
  centres = category_weight * category_centres[product_category] + rng.standard_normal(
      (len(products), dim)).astype(np.float32)
  centres /= np.sqrt(1.0 + category_weight ** 2)  # The spread of `bench.eval`'s centres, so its noise applies.
  row = {p: i for i, p in enumerate(products.tolist())}

  def split(labels):
    x = centres[[row[p] for p in labels.tolist()]] + noise * rng.standard_normal((len(labels), dim)).astype(
        np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)

  return split(labels_q), split(labels_g)


def simulated_scores(true_categories: np.ndarray, beta: float, rng: np.random.Generator) -> np.ndarray:
  """`[N, C]` scores of a classifier: beta on the true category plus standard normal noise everywhere."""
  num_categories = len(inshop_features.CATEGORY_NAMES)
  scores = rng.standard_normal((len(true_categories), num_categories)).astype(np.float32)
  scores[np.arange(len(true_categories)), true_categories] += beta
  return scores


def beta_for_accuracy(accuracy: float, num_categories: int, samples: int = 200_000, seed: int = 0) -> float:
  """The beta whose top-1 accuracy is `accuracy` (bisection on a fixed sample)."""
  rng = np.random.default_rng(seed)
  noise = rng.standard_normal((samples, num_categories)).astype(np.float32)
  best_other = noise[:, 1:].max(axis=1)
  low, high = -5.0, 20.0
  for _ in range(50):
    mid = (low + high) / 2
    low, high = (mid, high) if np.mean(noise[:, 0] + mid > best_other) < accuracy else (low, mid)
  return (low + high) / 2


@functools.partial(jax.jit, static_argnames=("nearest",))
def nearest_in_block(queries: jax.Array, gallery: jax.Array, gallery_valid: jax.Array, *, nearest: int
                     ) -> tuple[jax.Array, jax.Array]:
  """`[q, D]` queries (q a multiple of PAD) against `[g, D]` gallery rows: `[q, nearest]` distances and row
  indices, nearest first; invalid rows (padding) never come before a valid one."""

  def chunk_nearest(chunk):
    distances = metrics.retrieval_distances(chunk, gallery)
    distances = jnp.where(gallery_valid[None, :], distances, jnp.inf)
    return metrics.nearest_first(distances, nearest)

  values, indices = jax.lax.map(chunk_nearest, queries.reshape(-1, PAD, queries.shape[1]))
  return values.reshape(-1, nearest), indices.reshape(-1, nearest)


def padded(x: np.ndarray, multiple: int, at_least: int = 0) -> np.ndarray:
  size = max(at_least, -(-len(x) // multiple) * multiple)
  return np.concatenate([x, np.zeros((size - len(x), *x.shape[1:]), x.dtype)])


def partitioned_search(query, gallery, query_categories, gallery_categories) -> np.ndarray:
  """Each query's `NEAREST` nearest gallery images among its categories only, searched category by category.

  Args:
    query: `[Q, D]`; gallery: `[G, D]`.
    query_categories: `[Q, k]` each query's categories, or None: search the whole gallery.
    gallery_categories: `[G]`.

  Returns:
    `[Q, NEAREST]` gallery indices, nearest first (-1 where fewer images are allowed).
  """
  num_queries = len(query)
  if query_categories is None:  # The baseline: one block, the whole gallery.
    q = jnp.asarray(padded(query, PAD))
    g = jnp.asarray(padded(gallery, PAD, NEAREST))
    valid = jnp.asarray(np.arange(len(g)) < len(gallery))
    _, indices = nearest_in_block(q, g, valid, nearest=NEAREST)
    return np.asarray(indices)[:num_queries]
  k = query_categories.shape[1]
  lists_distance = np.full((num_queries, k, NEAREST), np.inf, np.float32)
  lists_index = np.full((num_queries, k, NEAREST), -1, np.int64)
  pending = []
  for category in np.unique(query_categories):
    rows, slots = np.nonzero(query_categories == category)
    members = np.flatnonzero(gallery_categories == category)
    if not len(members):
      continue
    g = padded(gallery[members], PAD, NEAREST)
    valid = np.arange(len(g)) < len(members)
    # Dispatched without waiting: the host gathers the next block while the device works.
    pending.append((rows, slots, members, nearest_in_block(jnp.asarray(padded(query[rows], PAD)), jnp.asarray(g),
                                                           jnp.asarray(valid), nearest=NEAREST)))
  for rows, slots, members, (values, indices) in pending:
    values, indices = np.asarray(values)[:len(rows)], np.asarray(indices)[:len(rows)]
    real = indices < len(members)
    lists_distance[rows, slots] = np.where(real, values, np.inf)
    lists_index[rows, slots] = np.where(real, members[np.minimum(indices, len(members) - 1)], -1)
  # Merge each query's k lists: by distance, then gallery index (a stable sort of the whole gallery's order).
  flat_distance = lists_distance.reshape(num_queries, -1)
  flat_index = lists_index.reshape(num_queries, -1)
  tie_break = np.where(flat_index < 0, np.iinfo(np.int64).max, flat_index)
  order = np.lexsort((tie_break, flat_distance), axis=1)[:, :NEAREST]
  return np.take_along_axis(flat_index, order, axis=1)


def recall_of_lists(indices: np.ndarray, query_labels, gallery_labels, ks) -> dict[int, float]:
  """Recall@K from each query's ranked list of gallery indices (-1: none)."""
  hits = (indices >= 0) & (gallery_labels[np.maximum(indices, 0)] == query_labels[:, None])
  ranks = np.where(hits.any(axis=1), hits.argmax(axis=1), np.iinfo(np.int32).max)
  return metrics.recall_from_ranks(ranks, ks)


def exact_recall(query, query_labels, top, gallery, gallery_labels, gallery_categories, ks) -> dict[int, float]:
  ranks = np.asarray(preclassify.preclassified_ranks(query, query_labels, top, gallery, gallery_labels,
                                                     gallery_categories))
  return metrics.recall_from_ranks(np.where(ranks < len(gallery), ranks, np.iinfo(np.int32).max), ks)


def milvus_times(query, gallery, gallery_labels, gallery_categories, tops: dict, num_queries: int,
                 repeats: int) -> dict:
  """Seconds of `Catalog.search_embeddings` (Milvus Lite, FLAT, the top 50) over the first `num_queries`
  queries: the whole catalogue, and each query's categories of `tops[name]` (a filter per set of categories);
  the median of `repeats` calls after one untimed call.

  The catalogue is the real `jaxret.catalog.Catalog` (what `python -m jaxret.search --preclassify_top_k`
  runs), with a stand-in for the trained run that would embed the images: the vectors are given.
  """
  config = ml_collections.ConfigDict({"model": {"name": "random_embeddings"}, "evals": {"ks": [NEAREST]},
                                      "input": {"dataset": "synthetic_inshop/inshop", "image_size": 0}})
  run = types.SimpleNamespace(dim=gallery.shape[1], metric="euclidean", fingerprint="bench.preclassify", step=0,
                              workdir="bench.preclassify", config=config)
  queries = query[:num_queries]
  times = {}
  with tempfile.TemporaryDirectory() as folder, \
      catalog.Catalog(run.workdir, os.path.join(folder, "bench.db"), embedder=run) as shop:
    shop.upsert(gallery, gallery_labels, gallery_categories, [str(i) for i in range(len(gallery))], "bench")
    # Wall time: Milvus Lite searches in a server process of its own, which this process's CPU time misses.
    times["off"] = timed(lambda: shop.search_embeddings(queries, NEAREST), repeats)[0]["wall"]
    for name, top in tops.items():
      times[name] = timed(lambda top=top: shop.search_embeddings(queries, NEAREST, categories=top[:num_queries]),
                          repeats)[0]["wall"]
  return times


def check_agree(searched: dict[int, float], exact: dict[int, float]) -> None:
  worst = max(abs(searched[k] - exact[k]) for k in exact)
  if worst > TOLERANCE:
    raise AssertionError(f"The search's Recall@K {searched} differs from the exact one {exact} by {worst}.")


def timed(fn, repeats: int) -> tuple[dict[str, float], object]:
  """`({"wall": s, "cpu": s}, result)`: medians over `repeats` calls after an untimed one (which compiles).

  The CPU seconds are this process's (all its threads): on a machine shared with other jobs they move less
  than the wall time, so the speed-ups are read from them.
  """
  result = fn()
  wall, cpu = [], []
  for _ in range(repeats):
    start, start_cpu = time.perf_counter(), time.process_time()
    result = fn()
    wall.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
  return {"wall": statistics.median(wall), "cpu": statistics.median(cpu)}, result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--categories", choices=("balanced", "skewed"), default="balanced")
  parser.add_argument("--accuracies", default="1.0,0.9,0.75", help="top-1 accuracies of the simulated classifier")
  parser.add_argument("--top_ks", default="1,2,3")
  parser.add_argument("--ks", default="1,10,20,50")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--category_weight", type=float, default=1.0,
                      help="how far products of a category cluster together (0: not at all, as bench.eval)")
  parser.add_argument("--milvus_queries", type=int, default=300,
                      help="queries searched through the Milvus Lite catalogue, the last accuracy's sets (0: skip; "
                           "Milvus Lite's FLAT search is slow: about 0.07 s a query over the whole gallery here)")
  parser.add_argument("--noise", type=float, default=NOISE_128, help="noise around the product centres "
                      "(default: Recall@1 near 0.8 at D = 128 and category_weight 1; measure again for others)")
  args = parser.parse_args()
  ks = tuple(int(k) for k in args.ks.split(","))
  if max(ks) > NEAREST:
    parser.error(f"--ks up to {NEAREST}.")
  load_at_start = os.getloadavg()[0]
  query_labels, query_true, gallery_labels, gallery_true = inshop_layout(args.categories)
  query, gallery = embeddings_for(query_labels, query_true, gallery_labels, gallery_true, args.dim,
                                  args.noise, args.category_weight)
  num_categories = len(inshop_features.CATEGORY_NAMES)
  print(f"{len(query)} queries x {len(gallery)} gallery images, D = {args.dim}, {num_categories} categories "
        f"({args.categories}, weight {args.category_weight}), jax {jax.__version__} on "
        f"{jax.devices()[0].platform}, load {load_at_start:.1f}")

  full_time, full_lists = timed(lambda: partitioned_search(query, gallery, None, gallery_true), args.repeats)
  full_recall = recall_of_lists(full_lists, query_labels, gallery_labels, ks)
  exact_full = metrics.recall_at_k(query, query_labels, gallery, gallery_labels, ks)
  check_agree(full_recall, exact_full)
  rows = [{"accuracy": None, "top_k": 0, "fraction": 1.0, "seconds": full_time, "speedup": 1.0,
           "recall_known": full_recall, "recall_predicted": full_recall}]
  print(f"whole gallery: {full_time['wall']:.2f} s ({full_time['cpu']:.2f} CPU s), R@1 {full_recall[1]:.3f}")
  rng = np.random.default_rng(1)
  for accuracy in (float(a) for a in args.accuracies.split(",")):
    beta = beta_for_accuracy(accuracy, num_categories)
    query_scores = simulated_scores(query_true, beta, rng)
    gallery_predicted = np.argmax(simulated_scores(gallery_true, beta, rng), axis=1).astype(np.int32)
    for k in (int(k) for k in args.top_ks.split(",")):
      top = np.asarray(preclassify.top_categories(query_scores, k))
      seconds, lists = timed(lambda top=top: partitioned_search(query, gallery, top, gallery_true), args.repeats)
      recall_known = exact_recall(query, query_labels, top, gallery, gallery_labels, gallery_true, ks)
      through_partitions = recall_of_lists(lists, query_labels, gallery_labels, ks)
      check_agree(through_partitions, recall_known)
      row = {"accuracy": accuracy, "measured_top1": float(np.mean(np.argmax(query_scores, axis=1) == query_true)),
             "top_k": k, "top_k_accuracy": preclassify.top_k_accuracy(top, query_true),
             "fraction": float(np.mean(preclassify.searched_fraction(top, gallery_true))),
             "seconds": seconds, "speedup": full_time["cpu"] / seconds["cpu"], "recall_known": recall_known,
             "recall_predicted": exact_recall(query, query_labels, top, gallery, gallery_labels, gallery_predicted,
                                              ks)}
      rows.append({**row, "top": top})
      print(f"accuracy {accuracy:.2f} top-{k}: in top-k {row['top_k_accuracy']:.3f}, searched "
            f"{100 * row['fraction']:.1f}%, {seconds['wall']:.2f} s ({seconds['cpu']:.2f} CPU s, "
            f"{row['speedup']:.1f}x), R@1 {recall_known[1]:.3f} "
            f"(gallery predicted {row['recall_predicted'][1]:.3f})")

  milvus = {}
  if args.milvus_queries:
    last = rows[-len(args.top_ks.split(",")):]  # The last accuracy's top-k sets.
    tops = {f"top-{row['top_k']}": row.pop("top") for row in last}
    milvus = milvus_times(query, gallery, gallery_labels, gallery_true, tops, args.milvus_queries, repeats=1)
    print(f"Milvus Lite FLAT catalogue, {args.milvus_queries} queries, top {NEAREST}: " + ", ".join(
        f"{name} {seconds:.2f} s ({milvus['off'] / seconds:.1f}x)" for name, seconds in milvus.items()))
  for row in rows:
    row.pop("top", None)

  print("\n| classifier top-1 | k | query's category in top-k | gallery searched | search: wall (CPU) s | "
        "speed-up (CPU) | "
        + " | ".join(f"R@{k} (known / predicted gallery)" for k in ks) + " |")
  print("|---|---|---|---|---|---|" + "---|" * len(ks))
  for row in rows:
    name = "off" if row["accuracy"] is None else f"{100 * row['accuracy']:.0f}%"
    in_top = "-" if row["accuracy"] is None else f"{100 * row['top_k_accuracy']:.1f}%"
    print(f"| {name} | {row['top_k'] or '-'} | {in_top} | {100 * row['fraction']:.1f}% | "
          f"{row['seconds']['wall']:.2f} ({row['seconds']['cpu']:.2f}) | "
          f"{row['speedup']:.1f}x | " + " | ".join(
              f"{100 * row['recall_known'][k]:.1f} / {100 * row['recall_predicted'][k]:.1f}" for k in ks) + " |")
  print(json.dumps({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "load_at_start": load_at_start, "load_at_end": os.getloadavg()[0], "dim": args.dim,
                    "categories": args.categories, "category_weight": args.category_weight,
                    "queries": len(query), "gallery": len(gallery),
                    "milvus_queries": args.milvus_queries, "milvus_seconds": milvus,
                    "rows": [{**r, "recall_known": {str(k): v for k, v in r["recall_known"].items()},
                              "recall_predicted": {str(k): v for k, v in r["recall_predicted"].items()}}
                             for r in rows]}))


if __name__ == "__main__":
  main()
