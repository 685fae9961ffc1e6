"""Retrieval metrics: Recall@K under the DeepFashion In-shop protocol, mAP@R, R-precision, precision@K and
Recall@K per category; exact, on device, in chunks.

A query is a hit at K when any of its K nearest gallery images shows the same product (Liu et al., CVPR 2016,
"DeepFashion", In-shop Clothes Retrieval benchmark). Instead of sorting the gallery for every query we compute
the rank of the first correct gallery image: the query is a hit at K exactly when that rank is below K. This
needs one `[chunk, G]` distance block and two reductions per chunk, gives every K at once, and merges across
gallery shards by a min and a sum (see `first_hit_rank`).

mAP@R, R-precision and precision@K (Musgrave, Belongie & Lim, ECCV 2020) need the positions of more than the
first correct image: `ranked_relevance` reads the top `depth` of every ranking (see `ranking_depth`), and
`metrics_from_relevance` turns those into every number at once; `retrieval_metrics` does both.

Ties are broken by gallery index, as a stable sort of the distances would break them: gallery image g comes
before h when d(g) < d(h), or d(g) == d(h) and g < h.
"""

from collections.abc import Mapping, Sequence
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxret.distances import pairwise_distances

DEFAULT_KS = (1, 10, 20, 30, 40, 50)
METRICS = ("euclidean", "cosine")


def retrieval_distances(queries: jax.Array, gallery: jax.Array, metric: str = "euclidean",
                        centre: jax.Array | None = None) -> jax.Array:
  """Distances that rank the gallery for each query (smaller is closer).

  Args:
    queries: `[Q, D]` embeddings.
    gallery: `[G, D]` embeddings.
    metric: "euclidean" (squared Euclidean distance, which ranks like the Euclidean one and needs no sqrt)
      or "cosine" (1 - cosine similarity).
    centre: `[D]`, for "euclidean": the point both sides are measured from, for float32 accuracy (default
      `gallery[0]`: a data point, so exact ties of grid data stay exact). Pass the same one for every block
      of a gallery.

  Returns:
    `[Q, G]` float32 distances.
  """
  if metric not in METRICS:
    raise ValueError(f"Unknown metric {metric!r}; use one of {METRICS}.")
  queries = jnp.asarray(queries, jnp.float32)
  gallery = jnp.asarray(gallery, jnp.float32)
  if metric == "cosine":
    return pairwise_distances(queries, gallery, metric="cosine")
  return pairwise_distances(queries, gallery, squared=True, centre=gallery[0] if centre is None else centre)


def first_hit_rank(distances: jax.Array, query_labels: jax.Array, gallery_labels: jax.Array,
                   gallery_valid: jax.Array | None = None, *, gallery_offset: jax.Array | int = 0,
                   num_gallery: int | None = None, axis_name: str | None = None) -> jax.Array:
  """Rank (0-based) of the first gallery image with the query's label, ties broken by gallery index.

  With `axis_name`, `distances` is this device's block of gallery columns inside `shard_map` and the result
  is merged over the devices of that axis: the nearest positive is the min over the shards (then the smallest
  global index among equals), and the images ranked before it are summed over the shards.

  Args:
    distances: `[Q, G]` distances of each query to each gallery image (of this shard).
    query_labels: `[Q]` integer product ids.
    gallery_labels: `[G]` integer product ids.
    gallery_valid: optional `[G]` bool; False marks padding that must never be retrieved.
    gallery_offset: global index of this shard's first gallery image.
    num_gallery: size of the whole gallery (default G); the rank of a query with no correct image.
    axis_name: the mesh axis over which the gallery is sharded, or None.

  Returns:
    `[Q]` int32: the number of gallery images ranked before the query's first correct one, or `num_gallery`
    when the gallery holds no image of the query's product (never a hit).
  """
  local_gallery = distances.shape[1]
  num_gallery = local_gallery if num_gallery is None else num_gallery
  if gallery_valid is None:
    gallery_valid = jnp.ones((local_gallery,), bool)
  across = (lambda x, op: op(x, axis_name)) if axis_name else (lambda x, op: x)
  positive = (query_labels[:, None] == gallery_labels[None, :]) & gallery_valid[None, :]
  negative = (~positive) & gallery_valid[None, :]
  inf = jnp.asarray(jnp.inf, distances.dtype)
  nearest_positive = across(jnp.min(jnp.where(positive, distances, inf), axis=1, keepdims=True), jax.lax.pmin)
  index = gallery_offset + jnp.arange(local_gallery, dtype=jnp.int32)[None, :]
  # Smallest gallery index among the positives at the nearest positive distance.
  first_positive_index = across(jnp.min(
      jnp.where(positive & (distances == nearest_positive), index, num_gallery), axis=1, keepdims=True),
                                jax.lax.pmin)
  before = negative & ((distances < nearest_positive) |
                       ((distances == nearest_positive) & (index < first_positive_index)))
  rank = across(jnp.sum(before, axis=1, dtype=jnp.int32), jax.lax.psum)
  return jnp.where(nearest_positive[:, 0] < inf, rank, num_gallery)


def _pad_queries(query_emb, query_labels, chunk_size):
  """Pads the queries to whole chunks: `[num_chunks, chunk_size, D]`, `[num_chunks, chunk_size]`."""
  num_chunks = -(-query_emb.shape[0] // chunk_size)
  pad = num_chunks * chunk_size - query_emb.shape[0]
  query_emb = jnp.pad(query_emb, ((0, pad), (0, 0)))
  query_labels = jnp.pad(query_labels, (0, pad))
  return query_emb.reshape(num_chunks, chunk_size, -1), query_labels.reshape(num_chunks, chunk_size)


# query_ranks looks each query's positives up in a `[Q, POSITIVES_PER_QUERY]` table of gallery columns while
# no product has more gallery images than this; past it, it falls back to the masked passes of first_hit_rank.
POSITIVES_PER_QUERY = 64


def positive_columns(query_labels: jax.Array, gallery_labels: jax.Array,
                     max_positives: int = POSITIVES_PER_QUERY) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The gallery columns that hold each query's product, as a fixed-size table.

  Args:
    query_labels: `[Q]` integer product ids.
    gallery_labels: `[G]` integer product ids.
    max_positives: columns per query.

  Returns:
    `(columns [Q, max_positives] int32, valid [Q, max_positives] bool, overflow: bool scalar)`: row q lists
    the gallery indices with label `query_labels[q]` (ascending; invalid slots hold 0), and `overflow` is
    True when some label has more than `max_positives` gallery images, so that the table misses some.
  """
  num_gallery = gallery_labels.shape[0]
  order = jnp.argsort(gallery_labels, stable=True).astype(jnp.int32)
  sorted_labels = gallery_labels[order]
  start = jnp.searchsorted(sorted_labels, query_labels, side="left").astype(jnp.int32)
  end = jnp.searchsorted(sorted_labels, query_labels, side="right").astype(jnp.int32)
  slot = start[:, None] + jnp.arange(max_positives, dtype=jnp.int32)[None, :]
  valid = slot < end[:, None]
  columns = jnp.where(valid, order[jnp.minimum(slot, num_gallery - 1)], 0)
  label_start = jnp.searchsorted(sorted_labels, sorted_labels, side="left")
  overflow = jnp.any(jnp.arange(num_gallery) - label_start >= max_positives)
  return columns, valid, overflow


def first_hit_rank_of_columns(distances: jax.Array, columns: jax.Array, valid: jax.Array) -> jax.Array:
  """`first_hit_rank` (unsharded, no gallery padding) from the table of `positive_columns`, in one pass.

  The nearest positive and its gallery index come from the `[Q, P]` gathered distances, so the `[Q, G]`
  block is read once, to count the images ranked before (nearest distance, smallest index): no positive
  is ever before that pair, so the count needs no label mask. Same ranks as `first_hit_rank`.

  Args:
    distances: `[Q, G]` distances.
    columns, valid: `[Q, P]` from `positive_columns` (complete: no overflow).

  Returns:
    `[Q]` int32 ranks; G for a query without a correct gallery image.
  """
  num_gallery = distances.shape[1]
  inf = jnp.asarray(jnp.inf, distances.dtype)
  positive_distances = jnp.where(valid, jnp.take_along_axis(distances, columns, axis=1), inf)
  nearest_positive = jnp.min(positive_distances, axis=1, keepdims=True)
  first_positive_index = jnp.min(jnp.where(valid & (positive_distances == nearest_positive), columns, num_gallery),
                                 axis=1, keepdims=True)
  index = jnp.arange(num_gallery, dtype=jnp.int32)[None, :]
  before = (distances < nearest_positive) | ((distances == nearest_positive) & (index < first_positive_index))
  # A float32 sum of 0/1 is exact below 2^24 and runs as a vectorised reduction on XLA's CPU backend,
  # where an int32 one runs as a slower tree of reduce-windows.
  count_dtype = jnp.float32 if num_gallery < 2**24 else jnp.int32
  rank = jnp.sum(before, axis=1, dtype=count_dtype).astype(jnp.int32)
  return jnp.where(nearest_positive[:, 0] < inf, rank, num_gallery)


@functools.partial(jax.jit, static_argnames=("metric", "chunk_size"))
def query_ranks(query_emb: jax.Array, query_labels: jax.Array, gallery_emb: jax.Array,
                gallery_labels: jax.Array, *, metric: str = "euclidean", chunk_size: int = 128) -> jax.Array:
  """`first_hit_rank` for every query, a chunk of queries at a time (never the whole `[Q, G]` matrix).

  Args:
    query_emb: `[Q, D]`; query_labels: `[Q]`; gallery_emb: `[G, D]`; gallery_labels: `[G]`.
    metric: see `retrieval_distances`.
    chunk_size: queries per distance block; memory is `chunk_size * G` floats. The default keeps a block of
      In-shop's gallery (128 x 12,612 floats, 6.5 MB) in a CPU's last-level cache and far below glibc's
      32 MB mmap threshold, so it is neither streamed from DRAM nor page-faulted in at every call.

  Returns:
    `[Q]` int32 ranks of the first correct gallery image.
  """
  num_queries = query_emb.shape[0]
  queries, labels = _pad_queries(query_emb, query_labels, chunk_size)

  def ranks_of_chunk(chunk):
    emb, labels = chunk
    return first_hit_rank(retrieval_distances(emb, gallery_emb, metric), labels, gallery_labels)

  def ranks_of_chunk_from_columns(chunk):
    emb, columns, valid = chunk
    return first_hit_rank_of_columns(retrieval_distances(emb, gallery_emb, metric), columns, valid)

  # Usually every product has few gallery images: one pass over each `[chunk, G]` block instead of three
  # (see docs/benchmarks.md, "Recall@K at In-shop scale").
  columns, valid, overflow = positive_columns(query_labels, gallery_labels)
  columns = jnp.pad(columns, ((0, labels.size - num_queries), (0, 0))).reshape(*labels.shape, -1)
  valid = jnp.pad(valid, ((0, labels.size - num_queries), (0, 0))).reshape(*labels.shape, -1)
  ranks = jax.lax.cond(overflow, lambda: jax.lax.map(ranks_of_chunk, (queries, labels)),
                       lambda: jax.lax.map(ranks_of_chunk_from_columns, (queries, columns, valid)))
  return ranks.reshape(-1)[:num_queries]


def sharded_query_ranks(query_emb: jax.Array, query_labels: jax.Array, gallery_emb: jax.Array,
                        gallery_labels: jax.Array, gallery_valid: jax.Array, *, mesh: jax.sharding.Mesh,
                        axis_name: str = "data", metric: str = "euclidean", chunk_size: int = 1024) -> jax.Array:
  """`query_ranks` with the gallery sharded over the devices of `mesh` (galleries larger than one device).

  Every device ranks the queries against its block of the gallery; the per-shard nearest positives and
  counts are merged with a min and a sum over `axis_name` (see `first_hit_rank`). The queries are replicated.

  Args:
    query_emb: `[Q, D]`; query_labels: `[Q]`.
    gallery_emb: `[G, D]`, G divisible by the size of `axis_name`; gallery_labels, gallery_valid: `[G]`
      (False marks padding).
    mesh: the device mesh; axis_name: its axis over which the gallery is split.
    metric: see `retrieval_distances`; chunk_size: queries per distance block.

  Returns:
    `[Q]` int32 ranks of the first correct gallery image, replicated.
  """
  num_gallery = gallery_emb.shape[0]
  if num_gallery % mesh.shape[axis_name]:
    raise ValueError(f"The gallery ({num_gallery}) must be padded to a multiple of the {mesh.shape[axis_name]} "
                     "devices; pad it and mark the padding in gallery_valid.")
  chunk_size = max(1, min(chunk_size, query_emb.shape[0]))
  num_queries = query_emb.shape[0]
  ranks = _sharded_ranks_fn(mesh, axis_name, metric, num_gallery)(
      *_pad_queries(query_emb, query_labels, chunk_size), gallery_emb, gallery_labels, gallery_valid)
  return ranks.reshape(-1)[:num_queries]


@functools.lru_cache(maxsize=16)
def _sharded_ranks_fn(mesh: jax.sharding.Mesh, axis_name: str, metric: str, num_gallery: int):
  """The jitted `shard_map` of `sharded_query_ranks`, built once per mesh and gallery size."""
  P = jax.sharding.PartitionSpec  # pylint: disable=invalid-name

  def ranks_on_shard(queries, labels, gallery, gallery_labels, valid, centre):
    offset = jax.lax.axis_index(axis_name) * gallery.shape[0]

    def ranks_of_chunk(chunk):
      emb, chunk_labels = chunk
      return first_hit_rank(retrieval_distances(emb, gallery, metric, centre), chunk_labels, gallery_labels,
                            valid, gallery_offset=offset, num_gallery=num_gallery, axis_name=axis_name)

    return jax.lax.map(ranks_of_chunk, (queries, labels))

  sharded = jax.shard_map(ranks_on_shard, mesh=mesh,
                          in_specs=(P(), P(), P(axis_name), P(axis_name), P(axis_name), P()), out_specs=P())
  # One centre (the first gallery image) for all shards, so that every shard computes the same distances.
  return jax.jit(lambda queries, labels, gallery, gallery_labels, valid: sharded(
      queries, labels, gallery, gallery_labels, valid, gallery[0]))


def nearest_first(distances: jax.Array, depth: int) -> tuple[jax.Array, jax.Array]:
  """The `depth` smallest distances of each row and their column indices, ties broken by column index.

  Args:
    distances: `[Q, G]` distances.
    depth: how many to keep per row, at most G.

  Returns:
    `[Q, depth]` distances in increasing order and `[Q, depth]` int32 column indices.
  """
  keys = -distances
  # top_k orders -0.0 below +0.0 where a sort of the distances sees a tie (broken by index): make zeros one zero.
  keys = jnp.where(keys == 0, jnp.zeros_like(keys), keys)
  values, indices = jax.lax.top_k(keys, depth)
  return -values, indices


def ranked_relevance(distances: jax.Array, query_labels: jax.Array, gallery_labels: jax.Array,
                     gallery_valid: jax.Array | None = None, *, depth: int,
                     axis_name: str | None = None) -> tuple[jax.Array, jax.Array]:
  """Whether each of a query's `depth` nearest gallery images has its label, in rank order, and how many do.

  Ties are broken by gallery index. With `axis_name`, `distances` is this device's block of gallery columns
  inside `shard_map` (blocks in gallery order along the axis) and both results are for the whole gallery.

  Why a top-`depth` selection: mAP@R needs the positions of the first R correct images, precision@K and
  Recall@K those within the top K, and all of them lie in the top max(R, K). The whole gallery's top `depth` is
  inside the union of every shard's top `depth` (an image a shard drops has `depth` images of that shard, with
  smaller gallery indices among equals, ranked before it), so each shard selects `depth` candidates, the
  candidates are gathered (`[Q, shards * depth]`, small) and selected once more: exact, with only the
  candidates crossing devices. Counting the rank of every correct image as `first_hit_rank` counts the first
  would cost one `[Q, G]` comparison per correct image instead of one top-`depth` selection.

  Args:
    distances: `[Q, G]` distances of each query to each gallery image (of this shard).
    query_labels: `[Q]` integer product ids.
    gallery_labels: `[G]` integer product ids.
    gallery_valid: optional `[G]` bool; False marks padding that must never be retrieved.
    depth: how many ranks to report (`ranking_depth`).
    axis_name: the mesh axis over which the gallery is sharded, or None.

  Returns:
    `[Q, depth]` bool relevance of the images at ranks 0, 1, ... (False past the end of the gallery) and `[Q]`
    int32 R, the number of gallery images with the query's label.
  """
  local_gallery = distances.shape[1]
  if gallery_valid is None:
    gallery_valid = jnp.ones((local_gallery,), bool)
  positive = (query_labels[:, None] == gallery_labels[None, :]) & gallery_valid[None, :]
  num_positives = jnp.sum(positive, axis=1, dtype=jnp.int32)
  # Padding sorts after every real image (a real image at +inf distance is beyond repair anyway).
  distances = jnp.where(gallery_valid[None, :], distances, jnp.asarray(jnp.inf, distances.dtype))
  nearest, indices = nearest_first(distances, min(depth, local_gallery))
  relevance = jnp.take_along_axis(positive, indices, axis=1)
  if axis_name is not None:
    num_positives = jax.lax.psum(num_positives, axis_name)
    nearest = _gather_over(nearest, axis_name)
    relevance = _gather_over(relevance.astype(jnp.int32), axis_name) > 0
    _, picked = nearest_first(nearest, min(depth, nearest.shape[1]))
    relevance = jnp.take_along_axis(relevance, picked, axis=1)
  relevance = jnp.pad(relevance, ((0, 0), (0, depth - relevance.shape[1])))
  return relevance, num_positives


def _gather_over(x: jax.Array, axis_name: str) -> jax.Array:
  """`[Q, n]` blocks of the devices on `axis_name` side by side, `[Q, devices * n]`, in device order.

  Among equal distances a lower position is then a lower gallery index. Written as a sum of zero-padded
  blocks (adding zeros is exact) rather than `all_gather` so that the result is typed as the same on every
  device, which `shard_map` needs for a replicated output.
  """
  num_devices = jax.lax.psum(1, axis_name)
  slot = jax.lax.axis_index(axis_name)
  blocks = jnp.zeros((num_devices,) + x.shape, x.dtype).at[slot].set(x)
  return jnp.moveaxis(jax.lax.psum(blocks, axis_name), 0, 1).reshape(x.shape[0], num_devices * x.shape[1])


@functools.partial(jax.jit, static_argnames=("depth", "metric", "chunk_size"))
def query_relevance(query_emb: jax.Array, query_labels: jax.Array, gallery_emb: jax.Array,
                    gallery_labels: jax.Array, *, depth: int, metric: str = "euclidean",
                    chunk_size: int = 1024) -> tuple[jax.Array, jax.Array]:
  """`ranked_relevance` for every query, a chunk of queries at a time (never the whole `[Q, G]` matrix).

  Args:
    query_emb: `[Q, D]`; query_labels: `[Q]`; gallery_emb: `[G, D]`; gallery_labels: `[G]`.
    depth: ranks to report (`ranking_depth`).
    metric: see `retrieval_distances`.
    chunk_size: queries per distance block; memory is `chunk_size * G` floats.

  Returns:
    `[Q, depth]` bool relevance in rank order and `[Q]` int32 R.
  """
  num_queries = query_emb.shape[0]

  def relevance_of_chunk(chunk):
    emb, labels = chunk
    return ranked_relevance(retrieval_distances(emb, gallery_emb, metric), labels, gallery_labels, depth=depth)

  relevance, num_positives = jax.lax.map(relevance_of_chunk, _pad_queries(query_emb, query_labels, chunk_size))
  return relevance.reshape(-1, depth)[:num_queries], num_positives.reshape(-1)[:num_queries]


@functools.partial(jax.jit, static_argnames=("depth", "chunk_size"))
def distance_relevance(distances: jax.Array, query_labels: jax.Array, gallery_labels: jax.Array, *, depth: int,
                       chunk_size: int = 1024) -> tuple[jax.Array, jax.Array]:
  """`ranked_relevance` of a given `[Q, G]` distance matrix (re-ranked distances), a chunk of rows at a time.

  Args:
    distances: `[Q, G]` distances, smaller is closer (e.g. `jaxret.rerank.reranked_distances`).
    query_labels: `[Q]`; gallery_labels: `[G]`.
    depth: ranks to report (`ranking_depth`).
    chunk_size: rows per top-`depth` selection.

  Returns:
    `[Q, depth]` bool relevance in rank order and `[Q]` int32 R.
  """
  num_queries = distances.shape[0]
  chunk_size = max(1, min(chunk_size, num_queries))
  num_chunks = -(-num_queries // chunk_size)
  # The last chunk starts early enough to end at the last row (overlapping the one before it), so the matrix,
  # which can be most of the memory, is never padded into a copy.
  starts = jnp.minimum(jnp.arange(num_chunks) * chunk_size, num_queries - chunk_size)

  def relevance_of_chunk(start):
    rows = jax.lax.dynamic_slice_in_dim(distances, start, chunk_size)
    labels = jax.lax.dynamic_slice_in_dim(query_labels, start, chunk_size)
    return ranked_relevance(rows, labels, gallery_labels, depth=depth)

  relevance, num_positives = jax.lax.map(relevance_of_chunk, starts)
  row = jnp.arange(num_queries)
  chunk = jnp.minimum(row // chunk_size, num_chunks - 1)
  return relevance[chunk, row - starts[chunk]], num_positives[chunk, row - starts[chunk]]


def sharded_query_relevance(query_emb: jax.Array, query_labels: jax.Array, gallery_emb: jax.Array,
                            gallery_labels: jax.Array, gallery_valid: jax.Array, *, depth: int,
                            mesh: jax.sharding.Mesh, axis_name: str = "data", metric: str = "euclidean",
                            chunk_size: int = 1024) -> tuple[jax.Array, jax.Array]:
  """`query_relevance` with the gallery sharded over the devices of `mesh`, as in `sharded_query_ranks`.

  Args:
    query_emb: `[Q, D]`, query_labels: `[Q]`, replicated.
    gallery_emb: `[G, D]`, G divisible by the size of `axis_name`; gallery_labels, gallery_valid: `[G]`
      (False marks padding).
    depth: ranks to report (`ranking_depth`).
    mesh: the device mesh; axis_name: its axis over which the gallery is split.
    metric: see `retrieval_distances`; chunk_size: queries per distance block.

  Returns:
    `[Q, depth]` bool relevance in rank order and `[Q]` int32 R, replicated.
  """
  num_gallery = gallery_emb.shape[0]
  if num_gallery % mesh.shape[axis_name]:
    raise ValueError(f"The gallery ({num_gallery}) must be padded to a multiple of the {mesh.shape[axis_name]} "
                     "devices; pad it and mark the padding in gallery_valid.")
  chunk_size = max(1, min(chunk_size, query_emb.shape[0]))
  num_queries = query_emb.shape[0]
  relevance, num_positives = _sharded_relevance_fn(mesh, axis_name, metric, depth)(
      *_pad_queries(query_emb, query_labels, chunk_size), gallery_emb, gallery_labels, gallery_valid)
  return relevance.reshape(-1, depth)[:num_queries], num_positives.reshape(-1)[:num_queries]


@functools.lru_cache(maxsize=16)
def _sharded_relevance_fn(mesh: jax.sharding.Mesh, axis_name: str, metric: str, depth: int):
  """The jitted `shard_map` of `sharded_query_relevance`, built once per mesh and depth."""
  P = jax.sharding.PartitionSpec  # pylint: disable=invalid-name

  def relevance_on_shard(queries, labels, gallery, gallery_labels, valid, centre):

    def relevance_of_chunk(chunk):
      emb, chunk_labels = chunk
      return ranked_relevance(retrieval_distances(emb, gallery, metric, centre), chunk_labels, gallery_labels,
                              valid, depth=depth, axis_name=axis_name)

    return jax.lax.map(relevance_of_chunk, (queries, labels))

  sharded = jax.shard_map(relevance_on_shard, mesh=mesh,
                          in_specs=(P(), P(), P(axis_name), P(axis_name), P(axis_name), P()),
                          out_specs=(P(), P()))
  # One centre for all shards, as in `_sharded_ranks_fn`.
  return jax.jit(lambda queries, labels, gallery, gallery_labels, valid: sharded(
      queries, labels, gallery, gallery_labels, valid, gallery[0]))


def ranking_depth(query_labels: np.ndarray, gallery_labels: np.ndarray, ks: Sequence[int] = DEFAULT_KS,
                  gallery_valid: np.ndarray | None = None) -> int:
  """How many ranks `metrics_from_relevance` needs: the largest K, or the largest R of any query if larger.

  Computed once on the host from the labels (they do not change between evaluations), because it fixes the
  shape of the on-device selection.

  Args:
    query_labels: `[Q]` product ids; gallery_labels: `[G]`; gallery_valid: optional `[G]` bool.
    ks: the K values of Recall@K and precision@K.

  Returns:
    max(max(ks), max over queries of R), at least 1.
  """
  gallery_labels = np.asarray(gallery_labels)
  if gallery_valid is not None:
    gallery_labels = gallery_labels[np.asarray(gallery_valid, bool)]
  images_of = dict(zip(*(a.tolist() for a in np.unique(gallery_labels, return_counts=True))))
  largest_r = max((images_of.get(label, 0) for label in np.unique(query_labels).tolist()), default=0)
  return max(1, max(int(k) for k in ks), largest_r)


def metrics_from_relevance(relevance: np.ndarray, num_positives: np.ndarray, ks: Sequence[int] = DEFAULT_KS, *,
                           query_categories: np.ndarray | None = None,
                           category_names: Mapping[int, str] | Sequence[str] | None = None) -> dict[str, float]:
  """Recall@K, precision@K, mAP@R, R-precision and Recall@K per category from the top of every ranking.

  With rel_i (i = 1, 2, ...) the relevance of a query's i-th nearest gallery image, R the number of gallery
  images of its product and P@i = (1/i) sum_{j <= i} rel_j:
    - Recall@K = 1 if any rel_i = 1 for i <= K (the In-shop protocol);
    - precision@K = P@K;
    - R-precision = P@R;
    - mAP@R = (1/R) sum_{i <= R} rel_i P@i;
  each averaged over the queries. A query with R = 0 counts as 0 in every one (a miss, as in Recall@K).
  Recall@K per category averages Recall@K over the queries of each category.

  Args:
    relevance: `[Q, depth]` bool, rank order (`query_relevance`, `sharded_query_relevance`,
      `distance_relevance`); depth >= max(ks) and >= max R (`ranking_depth`).
    num_positives: `[Q]` R of each query.
    ks: the K values of Recall@K and precision@K.
    query_categories: optional `[Q]` integer category of each query, for Recall@K per category.
    category_names: optional names of the categories (indexed by category id); default the id.

  Returns:
    Python floats in [0, 1]: `recall@K` and `precision@K` for every K, `map@r`, `r_precision`, and with
    `query_categories` `recall@K/<category>` for every K and every category that has queries.

  References:
    Musgrave, Belongie, Lim. A Metric Learning Reality Check. ECCV 2020 (mAP@R, R-precision).
  """
  relevance = np.asarray(relevance, bool)
  num_positives = np.asarray(num_positives, np.int64)
  ks = [int(k) for k in ks]
  num_queries, depth = relevance.shape
  if num_positives.shape != (num_queries,):
    raise ValueError(f"Expected one R per query ({num_queries}), got shape {num_positives.shape}.")
  if not ks or min(ks) < 1:
    raise ValueError(f"ks must be positive integers, got {ks}.")
  if max(ks) > depth or (num_queries and num_positives.max() > depth):
    raise ValueError(f"The rankings were read to depth {depth}, but K up to {max(ks)} and R up to "
                     f"{num_positives.max(initial=0)} need more; get the depth from metrics.ranking_depth.")
  first_hit = np.where(relevance.any(axis=1), np.argmax(relevance, axis=1), depth)
  results = {f"recall@{k}": v for k, v in recall_from_ranks(first_hit, ks).items()}
  # hits[:, i] = number of relevant images among the i nearest.
  hits = np.concatenate([np.zeros((num_queries, 1), np.int64), np.cumsum(relevance, axis=1)], axis=1)
  for k in ks:
    results[f"precision@{k}"] = float(np.mean(hits[:, k] / k))
  has_positive = num_positives > 0
  r = np.maximum(num_positives, 1)
  precision_at = hits[:, 1:] / np.arange(1, depth + 1)
  within_r = np.arange(1, depth + 1)[None, :] <= num_positives[:, None]
  average_precision = np.sum(np.where(relevance & within_r, precision_at, 0.0), axis=1) / r
  results["map@r"] = float(np.mean(np.where(has_positive, average_precision, 0.0)))
  r_precision = hits[np.arange(num_queries), num_positives] / r
  results["r_precision"] = float(np.mean(np.where(has_positive, r_precision, 0.0)))
  if query_categories is not None:
    query_categories = np.asarray(query_categories)
    if query_categories.shape != (num_queries,):
      raise ValueError(f"Expected one category per query ({num_queries}), got shape {query_categories.shape}.")
    for category in np.unique(query_categories):
      name = str(category) if category_names is None else category_names[int(category)]
      for k, recall in recall_from_ranks(first_hit[query_categories == category], ks).items():
        results[f"recall@{k}/{name}"] = recall
  return results


def _check_retrieval_inputs(query_labels, gallery_labels, ks, *, num_gallery, query_emb=None, gallery_emb=None,
                            query_categories=None):
  """One ValueError per kind of bad input to `retrieval_metrics*`, saying what shape was expected."""
  if query_emb is not None and (query_emb.ndim != 2 or gallery_emb.ndim != 2 or
                                query_emb.shape[1] != gallery_emb.shape[1]):
    raise ValueError(f"Expected query [Q, D] and gallery [G, D] embeddings with the same D, got "
                     f"{query_emb.shape} and {gallery_emb.shape}.")
  if query_labels.ndim != 1 or gallery_labels.shape != (num_gallery,):
    raise ValueError(f"Expected one label per query and per gallery image, got {query_labels.shape} query "
                     f"labels and {gallery_labels.shape} gallery labels for a gallery of {num_gallery}.")
  if query_categories is not None and np.shape(query_categories) != query_labels.shape:
    raise ValueError(f"Expected one category per query, got {np.shape(query_categories)} for "
                     f"{query_labels.shape[0]} queries.")
  if not ks or any(int(k) < 1 for k in ks):
    raise ValueError(f"ks must be positive integers, got {ks}.")
  if query_labels.shape[0] == 0 or num_gallery == 0:
    raise ValueError("Retrieval metrics need at least one query and one gallery image.")


def retrieval_metrics(query_emb, query_labels, gallery_emb, gallery_labels, ks: Sequence[int] = DEFAULT_KS,
                      metric: str = "euclidean", *, query_categories=None,
                      category_names: Mapping[int, str] | Sequence[str] | None = None,
                      chunk_size: int = 1024) -> dict[str, float]:
  """Every retrieval metric the trainer logs, from one exact on-device ranking (see `metrics_from_relevance`).

  Args:
    query_emb: `[Q, D]` query embeddings; query_labels: `[Q]` integer product ids.
    gallery_emb: `[G, D]` gallery embeddings; gallery_labels: `[G]` integer product ids.
    ks: the K values of Recall@K and precision@K.
    metric: "euclidean" or "cosine".
    query_categories: optional `[Q]` integer categories, for Recall@K per category.
    category_names: optional names of the categories (indexed by category id).
    chunk_size: queries per distance block; memory is `chunk_size * G` floats.

  Returns:
    `{"recall@K", "precision@K", "map@r", "r_precision", "recall@K/<category>"}` as Python floats.

  Example:
    >>> import numpy as np
    >>> q = np.array([[0.0, 0.0], [5.0, 5.0]])
    >>> g = np.array([[0.1, 0.0], [5.0, 5.1], [0.0, 0.2]])
    >>> m = retrieval_metrics(q, np.array([1, 2]), g, np.array([1, 1, 2]), ks=(1, 2))
    >>> m["recall@1"], m["precision@2"], m["map@r"], m["r_precision"]
    (0.5, 0.5, 0.25, 0.25)

  References:
    Musgrave, Belongie, Lim. A Metric Learning Reality Check. ECCV 2020.
  """
  if metric not in METRICS:
    raise ValueError(f"Unknown metric {metric!r}; use one of {METRICS}.")
  query_emb, gallery_emb = jnp.asarray(query_emb), jnp.asarray(gallery_emb)
  query_labels, gallery_labels = np.asarray(query_labels), np.asarray(gallery_labels)
  _check_retrieval_inputs(query_labels, gallery_labels, ks, num_gallery=gallery_emb.shape[0], query_emb=query_emb,
                          gallery_emb=gallery_emb, query_categories=query_categories)
  if query_labels.shape[0] != query_emb.shape[0]:
    raise ValueError(f"Expected one label per query, got {query_labels.shape[0]} for {query_emb.shape[0]}.")
  depth = ranking_depth(query_labels, gallery_labels, ks)
  relevance, num_positives = query_relevance(
      query_emb, jnp.asarray(query_labels), gallery_emb, jnp.asarray(gallery_labels), depth=depth, metric=metric,
      chunk_size=max(1, min(chunk_size, query_emb.shape[0])))
  return metrics_from_relevance(np.asarray(relevance), np.asarray(num_positives), ks,
                                query_categories=query_categories, category_names=category_names)


def retrieval_metrics_from_distances(distances, query_labels, gallery_labels, ks: Sequence[int] = DEFAULT_KS, *,
                                     query_categories=None,
                                     category_names: Mapping[int, str] | Sequence[str] | None = None,
                                     chunk_size: int = 1024) -> dict[str, float]:
  """`retrieval_metrics` of a given `[Q, G]` distance matrix, e.g. re-ranked (`jaxret.rerank`).

  Args:
    distances: `[Q, G]`, smaller is closer.
    query_labels: `[Q]`; gallery_labels: `[G]`; ks, query_categories, category_names: see `retrieval_metrics`.
    chunk_size: rows per top-`depth` selection.

  Returns:
    The same dict as `retrieval_metrics`.
  """
  distances = jnp.asarray(distances)
  query_labels, gallery_labels = np.asarray(query_labels), np.asarray(gallery_labels)
  if distances.ndim != 2:
    raise ValueError(f"Expected a [Q, G] distance matrix, got shape {distances.shape}.")
  _check_retrieval_inputs(query_labels, gallery_labels, ks, num_gallery=distances.shape[1],
                          query_categories=query_categories)
  if query_labels.shape[0] != distances.shape[0]:
    raise ValueError(f"Expected one label per row of distances, got {query_labels.shape[0]} for "
                     f"{distances.shape[0]}.")
  depth = ranking_depth(query_labels, gallery_labels, ks)
  relevance, num_positives = distance_relevance(distances, jnp.asarray(query_labels), jnp.asarray(gallery_labels),
                                                depth=depth, chunk_size=chunk_size)
  return metrics_from_relevance(np.asarray(relevance), np.asarray(num_positives), ks,
                                query_categories=query_categories, category_names=category_names)


def recall_at_k(query_emb, query_labels, gallery_emb, gallery_labels, ks: Sequence[int] = DEFAULT_KS,
                metric: str = "euclidean", *, chunk_size: int = 128) -> dict[int, float]:
  """Recall@K of the In-shop protocol, exact, computed on device.

  A query is a hit at K when any of its K nearest gallery images has the query's label (product id).
  Recall@K is the fraction of queries that are hits at K; queries whose product has no gallery image count
  as misses.

  Args:
    query_emb: `[Q, D]` query embeddings.
    query_labels: `[Q]` integer product ids of the queries.
    gallery_emb: `[G, D]` gallery embeddings.
    gallery_labels: `[G]` integer product ids of the gallery.
    ks: the K values to report.
    metric: "euclidean" or "cosine".
    chunk_size: queries per distance block.

  Returns:
    `{k: recall}` with Python floats in [0, 1].

  Example:
    >>> import numpy as np
    >>> q = np.array([[0.0, 0.0], [5.0, 5.0]])
    >>> g = np.array([[0.1, 0.0], [5.0, 5.1], [0.0, 0.2]])
    >>> recall_at_k(q, np.array([1, 2]), g, np.array([1, 1, 2]), ks=(1, 2))
    {1: 0.5, 2: 1.0}

  References:
    Liu, Luo, Qiu, Wang, Tang. DeepFashion: Powering Robust Clothes Recognition and Retrieval with Rich
    Annotations. CVPR 2016.
  """
  query_emb = jnp.asarray(query_emb)
  gallery_emb = jnp.asarray(gallery_emb)
  query_labels = jnp.asarray(query_labels)
  gallery_labels = jnp.asarray(gallery_labels)
  if metric not in METRICS:
    raise ValueError(f"Unknown metric {metric!r}; use one of {METRICS}.")
  if query_emb.ndim != 2 or gallery_emb.ndim != 2 or query_emb.shape[1] != gallery_emb.shape[1]:
    raise ValueError(f"Expected query [Q, D] and gallery [G, D] embeddings with the same D, got "
                     f"{query_emb.shape} and {gallery_emb.shape}.")
  if query_labels.shape != query_emb.shape[:1] or gallery_labels.shape != gallery_emb.shape[:1]:
    raise ValueError(f"Expected one label per embedding, got {query_labels.shape} labels for "
                     f"{query_emb.shape[0]} queries and {gallery_labels.shape} for {gallery_emb.shape[0]} "
                     "gallery images.")
  if not ks or any(int(k) < 1 for k in ks):
    raise ValueError(f"ks must be positive integers, got {ks}.")
  if query_emb.shape[0] == 0 or gallery_emb.shape[0] == 0:
    raise ValueError("recall_at_k needs at least one query and one gallery image.")
  chunk_size = max(1, min(chunk_size, query_emb.shape[0]))
  ranks = query_ranks(query_emb, query_labels, gallery_emb, gallery_labels, metric=metric, chunk_size=chunk_size)
  return recall_from_ranks(ranks, ks)


def recall_from_ranks(ranks: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
  """Recall@K from the 0-based rank of each query's first correct gallery image: the fraction with rank < K.

  Args:
    ranks: `[Q]` ranks (`query_ranks`, `sharded_query_ranks`, or any search's first-hit positions); a query
      with no correct image anywhere has a rank >= every K.
    ks: the K values.

  Returns:
    `{k: recall}` with Python floats in [0, 1].
  """
  ranks = np.asarray(ranks)
  return {int(k): float(np.mean(ranks < int(k))) for k in ks}


def attribute_map(scores: np.ndarray, labels: np.ndarray, has_labels: np.ndarray | None = None) -> float:
  """Mean over attributes of the average precision of ranking the images by each attribute's score.

  Args:
    scores: `[N, A]` attribute scores (logits).
    labels: `[N, A]` labels in {1 has it, -1 has not, 0 unknown}; unknown labels are left out.
    has_labels: `[N]` bool; rows without annotations are left out (default: all annotated).

  Returns:
    The mean AP over attributes with at least one known positive and one known negative (NaN if none).
    AP is the mean over positives of the precision at the positive's rank (ties in the order of the rows).
  """
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels)
  known = labels != 0
  if has_labels is not None:
    known &= np.asarray(has_labels, bool)[:, None]
  aps = []
  for j in range(scores.shape[1]):
    rows = np.flatnonzero(known[:, j])
    positive = labels[rows, j] > 0
    if not positive.any() or positive.all():
      continue
    order = np.argsort(-scores[rows, j], kind="stable")
    hits = positive[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    aps.append(float(np.sum(precision[hits]) / hits.sum()))
  return float(np.mean(aps)) if aps else float("nan")
