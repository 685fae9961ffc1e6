"""Retrieval metrics: Recall@K under the DeepFashion In-shop protocol, exact, on device, in chunks.

A query is a hit at K when any of its K nearest gallery images shows the same product (Liu et al., CVPR 2016,
"DeepFashion", In-shop Clothes Retrieval benchmark). Instead of sorting the gallery for every query we compute
the rank of the first correct gallery image: the query is a hit at K exactly when that rank is below K. This
needs one `[chunk, G]` distance block and two reductions per chunk, gives every K at once, and merges across
gallery shards by a min and a sum (see `first_hit_rank`).

Ties are broken by gallery index, as a stable sort of the distances would break them: gallery image g comes
before h when d(g) < d(h), or d(g) == d(h) and g < h.
"""

from collections.abc import Sequence
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
  ranks = np.asarray(query_ranks(query_emb, query_labels, gallery_emb, gallery_labels, metric=metric,
                                 chunk_size=chunk_size))
  return {int(k): float(np.mean(ranks < int(k))) for k in ks}
