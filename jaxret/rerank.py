"""Re-ranking of a query x gallery ranking: alpha-query expansion, database-side augmentation, k-reciprocal.

  distances = rerank.reranked_distances(query_emb, gallery_emb, "k_reciprocal")     # [Q, G]
  numbers = metrics.retrieval_metrics_from_distances(distances, query_labels, gallery_labels)

Everything runs on device a chunk of rows at a time, so the full In-shop test (14,218 queries x 12,612 gallery
images) needs the `[Q, G]` result (0.7 GB) and little more; docs/evaluation.md defines each method and
docs/benchmarks.md has their times.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxret import metrics

METHODS = ("none", "aqe", "dba", "dba+aqe", "k_reciprocal")

# As in `jaxret.distances`: exact for every non-zero vector, and a zero vector stays zero.
_NORM_EPS = 1e-12


def unit_rows(x: jax.typing.ArrayLike) -> jax.Array:
  """`[N, D]` rows scaled to unit L2 norm (a zero row stays zero)."""
  x = jnp.asarray(x, jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=1, keepdims=True), _NORM_EPS))


def _pad_rows(x: jax.Array, chunk_size: int) -> jax.Array:
  """`[N, ...]` -> `[num_chunks, chunk_size, ...]`, zero rows at the end."""
  num_chunks = -(-x.shape[0] // chunk_size)
  x = jnp.pad(x, [(0, num_chunks * chunk_size - x.shape[0])] + [(0, 0)] * (x.ndim - 1))
  return x.reshape((num_chunks, chunk_size) + x.shape[1:])


@functools.partial(jax.jit, static_argnames=("num_neighbours", "exclude_self", "chunk_size"))
def _weighted_neighbour_sum(points, database, alpha, *, num_neighbours, exclude_self, chunk_size):
  """Each unit point plus its `num_neighbours` most similar unit database rows weighted by max(sim, 0)^alpha,
  renormalised. With `exclude_self`, points are the database and row i skips database row i."""
  points, database = unit_rows(points), unit_rows(database)
  num_points = points.shape[0]
  columns = jnp.arange(database.shape[0])

  def expand_chunk(chunk):
    rows, index = chunk
    similarity = jnp.matmul(rows, database.T, precision=jax.lax.Precision.HIGHEST)
    if exclude_self:
      similarity = jnp.where(index[:, None] == columns[None, :], -jnp.inf, similarity)
    # Most similar first, ties to the lower index (the nearest in cosine distance, as metrics ranks them).
    neg_similarity, neighbours = metrics.nearest_first(-similarity, num_neighbours)
    weights = jnp.power(jnp.maximum(-neg_similarity, 0.0), alpha)
    expanded = rows + jnp.einsum("cn,cnd->cd", weights, database[neighbours],
                                 precision=jax.lax.Precision.HIGHEST)
    return unit_rows(expanded)

  chunks = (_pad_rows(points, chunk_size), _pad_rows(jnp.arange(num_points), chunk_size))
  return jax.lax.map(expand_chunk, chunks).reshape(-1, points.shape[1])[:num_points]


def _check_expansion(name, num_neighbours, available, alpha):
  if not 1 <= num_neighbours <= available:
    raise ValueError(f"{name}: num_neighbours must be between 1 and {available} (the images it can average "
                     f"over), got {num_neighbours}.")
  if not alpha >= 0:
    raise ValueError(f"{name}: alpha must be >= 0 (0 is plain average query expansion), got {alpha}.")


def alpha_query_expansion(queries: jax.typing.ArrayLike, gallery: jax.typing.ArrayLike, *, num_neighbours: int = 2,
                          alpha: float = 3.0, chunk_size: int = 1024) -> jax.Array:
  """alpha-QE: each query replaced by the weighted mean of itself and its nearest gallery images.

  q' = normalise(q + sum_{j=1..n} max(s_j, 0)^alpha g_j) with q and g L2-normalised, g_1..g_n the n gallery
  images most similar to q (ties to the lower index) and s_j = cos(q, g_j); alpha = 0 is average query
  expansion. The weight of a neighbour with negative similarity is 0 (the paper's s^alpha is undefined there
  for fractional alpha, and such a neighbour is no evidence for the query's product).

  Args:
    queries: `[Q, D]` embeddings.
    gallery: `[G, D]` embeddings (after `database_side_augmentation` for DBA + alpha-QE).
    num_neighbours: n, the gallery images averaged in (1 <= n <= G).
    alpha: the weight exponent (>= 0).
    chunk_size: queries per `[chunk, G]` similarity block.

  Returns:
    `[Q, D]` float32 unit-norm expanded queries; rank the gallery by cosine distance to them.

  Example:
    >>> import numpy as np
    >>> gallery = np.array([[1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    >>> q = alpha_query_expansion(np.array([[1.0, 0.0]]), gallery, num_neighbours=1, alpha=1.0)
    >>> np.round(np.asarray(q, np.float64), 4).tolist()  # (1, 0) + cos 45 deg * (0.7071, 0.7071), normalised
    [[0.9487, 0.3162]]

  References:
    Radenovic, Tolias, Chum. Fine-tuning CNN Image Retrieval with No Human Annotation. TPAMI 2018 (alpha-QE).
    Chum, Philbin, Sivic, Isard, Zisserman. Total Recall. ICCV 2007 (average query expansion).
  """
  queries, gallery = jnp.asarray(queries), jnp.asarray(gallery)
  _check_pair(queries, gallery)
  _check_expansion("alpha_query_expansion", num_neighbours, gallery.shape[0], alpha)
  return _weighted_neighbour_sum(queries, gallery, jnp.float32(alpha), num_neighbours=num_neighbours,
                                 exclude_self=False, chunk_size=max(1, min(chunk_size, queries.shape[0])))


def database_side_augmentation(gallery: jax.typing.ArrayLike, *, num_neighbours: int = 2, alpha: float = 3.0,
                               chunk_size: int = 1024) -> jax.Array:
  """DBA: each gallery image replaced by the weighted mean of itself and its nearest other gallery images.

  g' = normalise(g + sum_{j=1..n} max(s_j, 0)^alpha g_j) as in `alpha_query_expansion`, with g_1..g_n the n
  most similar gallery images other than g itself (an exact duplicate of g counts as a neighbour).

  Args:
    gallery: `[G, D]` embeddings.
    num_neighbours: n (1 <= n <= G - 1).
    alpha: the weight exponent (>= 0).
    chunk_size: gallery rows per `[chunk, G]` similarity block.

  Returns:
    `[G, D]` float32 unit-norm augmented gallery.

  References:
    Radenovic, Tolias, Chum. Fine-tuning CNN Image Retrieval with No Human Annotation. TPAMI 2018.
    Arandjelovic, Zisserman. Three things everyone should know to improve object retrieval. CVPR 2012.
  """
  gallery = jnp.asarray(gallery)
  _check_pair(gallery, gallery)
  _check_expansion("database_side_augmentation", num_neighbours, gallery.shape[0] - 1, alpha)
  return _weighted_neighbour_sum(gallery, gallery, jnp.float32(alpha), num_neighbours=num_neighbours,
                                 exclude_self=True, chunk_size=max(1, min(chunk_size, gallery.shape[0])))


# ----------------------------------------------------------------------------------------------------------
# k-reciprocal re-ranking. Notation of the paper: N(i, k) the k nearest of point i among queries and gallery
# (i itself included), R(i, k) = {j in N(i, k+1) : i in N(j, k+1)} the k-reciprocal set, R*(i) its expansion,
# V the sparse encoding of R*, and the Jaccard distance between encodings.
# ----------------------------------------------------------------------------------------------------------


def _original_distances(rows, points, metric, centre):
  """`[c, N]` distances the reference squares: squared Euclidean, or the square of the cosine distance."""
  d = metrics.retrieval_distances(rows, points, metric, centre)
  return d if metric == "euclidean" else jnp.square(d)


def _original_distances_to(rows, others, metric, centre):
  """`_original_distances` of each row to its own `[c, S, D]` others (the same formula, gathered)."""
  if metric == "euclidean":
    rows, others = rows - centre, others - centre
    dots = jnp.einsum("cd,csd->cs", rows, others, precision=jax.lax.Precision.HIGHEST)
    sq = jnp.sum(rows * rows, axis=1)[:, None] + jnp.sum(others * others, axis=2) - 2.0 * dots
    return jnp.maximum(sq, 0.0)
  unit = lambda v: v * jax.lax.rsqrt(jnp.maximum(jnp.sum(v * v, axis=-1, keepdims=True), _NORM_EPS))
  cos = jnp.einsum("cd,csd->cs", unit(rows), unit(others), precision=jax.lax.Precision.HIGHEST)
  return jnp.square(jnp.clip(1.0 - cos, 0.0, 2.0))


def _initial_ranking(points, centre, *, metric, width, chunk_size):
  """`[N, width]` nearest points of every point (itself included, ties to the lower index) and `[N]` the
  largest original distance of each row, which the reference divides the row by."""
  num_points = points.shape[0]

  def rank_chunk(rows):
    d = _original_distances(rows, points, metric, centre)
    row_max = jnp.max(d, axis=1)
    normalised = d / jnp.where(row_max > 0, row_max, 1.0)[:, None]
    # Ranked by the normalised distances, as the reference ranks them (dividing can round two apart to equal).
    return metrics.nearest_first(normalised, width)[1], row_max

  neighbours, row_max = jax.lax.map(rank_chunk, _pad_rows(points, chunk_size))
  return neighbours.reshape(-1, width)[:num_points], row_max.reshape(-1)[:num_points]


def _is_reciprocal(neighbours, k):
  """`[N, k+1]` bool: whether i is among the k+1 nearest of its j-th nearest, for j < k+1."""
  forward = neighbours[:, :k + 1]
  backward = neighbours[forward][:, :, :k + 1]
  return jnp.any(backward == jnp.arange(neighbours.shape[0])[:, None, None], axis=2)


def _reciprocal_encoding(points, centre, neighbours, row_max, *, metric, k1, chunk_size):
  """V as sparse rows: `[N, S]` column indices (ascending, then N for none) and `[N, S]` values.

  V[i, j] = exp(-d(i, j)) / sum_{j' in R*(i)} exp(-d(i, j')) for j in R*(i), with d the normalised original
  distance; R*(i) is R(i, k1) with R(j, k1/2) added for every j in R(i, k1) that shares more than 2/3 of
  R(j, k1/2) with R(i, k1). S = (k1 + 1) (k1/2 + 2) bounds the size of R*.
  """
  num_points = points.shape[0]
  half = int(np.around(k1 / 2))  # the reference's rounding (half to even)
  reciprocal = _is_reciprocal(neighbours, k1)  # [N, k1+1]
  reciprocal_half = _is_reciprocal(neighbours, half)  # [N, half+1]

  def encode_chunk(index):
    members = neighbours[index, :k1 + 1]  # [c, k1+1]
    is_member = reciprocal[index]
    candidates = neighbours[members, :half + 1]  # [c, k1+1, half+1]: R(j, k1/2) for every j of N(i, k1+1)
    is_candidate = reciprocal_half[members]
    in_r = jnp.any((candidates[..., None] == members[:, None, None, :]) & is_member[:, None, None, :], axis=-1)
    shared = jnp.sum(in_r & is_candidate, axis=-1)
    size = jnp.sum(is_candidate, axis=-1)
    # |R(j, k1/2) & R(i, k1)| > 2/3 |R(j, k1/2)| in integers: the reference's float64 test gives the same for
    # every size (checked up to 200).
    accepted = is_member & (3 * shared > 2 * size)
    none = jnp.int32(num_points)
    columns = jnp.concatenate(
        [jnp.where(is_member, members, none),
         jnp.where(accepted[..., None] & is_candidate, candidates, none).reshape(index.shape[0], -1)], axis=1)
    columns = jnp.sort(columns, axis=1)
    repeated = jnp.concatenate([jnp.zeros_like(columns[:, :1], bool), columns[:, 1:] == columns[:, :-1]], axis=1)
    columns = jnp.sort(jnp.where(repeated, none, columns), axis=1)
    valid = columns < num_points
    d = _original_distances_to(points[index], points[jnp.minimum(columns, num_points - 1)], metric, centre)
    d = d / jnp.where(row_max[index] > 0, row_max[index], 1.0)[:, None]
    weights = jnp.where(valid, jnp.exp(-d), 0.0)
    # An empty R* (never, since i is in R(i, k1), unless more than k1 duplicates of i) leaves a zero row.
    total = jnp.sum(weights, axis=1, keepdims=True)
    return columns, weights / jnp.where(total > 0, total, 1.0)

  index = _pad_rows(jnp.arange(num_points, dtype=jnp.int32), chunk_size)
  columns, values = jax.lax.map(encode_chunk, index)
  width = columns.shape[-1]
  return columns.reshape(-1, width)[:num_points], values.reshape(-1, width)[:num_points]


def _local_query_expansion(columns, values, neighbours, *, k2, chunk_size):
  """V_qe[i] = mean of V over the k2 nearest of i, as sparse rows of `k2 * S` (ascending, then N for none)."""
  num_points = columns.shape[0]

  def expand_chunk(index):
    nearest = neighbours[index, :k2]  # [c, k2]
    cols = columns[nearest].reshape(index.shape[0], -1)
    vals = values[nearest].reshape(index.shape[0], -1)
    cols, vals = jax.lax.sort((cols, vals), dimension=1, num_keys=1)
    starts = jnp.concatenate([jnp.ones_like(cols[:, :1], bool), cols[:, 1:] != cols[:, :-1]], axis=1)
    run = jnp.cumsum(starts, axis=1) - 1  # runs of one column, summed into the run's first slot
    row = jnp.arange(index.shape[0])[:, None]
    summed = jnp.zeros_like(vals).at[row, run].add(vals) / k2
    merged = jnp.full_like(cols, num_points).at[row, run].set(cols)
    return merged, summed

  index = _pad_rows(jnp.arange(num_points, dtype=jnp.int32), chunk_size)
  cols, vals = jax.lax.map(expand_chunk, index)
  width = cols.shape[-1]
  return cols.reshape(-1, width)[:num_points], vals.reshape(-1, width)[:num_points]


@functools.partial(jax.jit, static_argnames=("metric", "k1", "k2", "chunk_size"))
def _encoding(queries, gallery, *, metric, k1, k2, chunk_size):
  """Steps 1-2 of `k_reciprocal_distances`: the `[N, max(k1 + 1, k2)]` nearest of every point, V as sparse
  rows with the number of non-zeros of each, the centre, and each point's largest original distance."""
  points = jnp.concatenate([queries, gallery])
  centre = points[0]  # one data point for every block, as in metrics.retrieval_distances
  neighbours, row_max = _initial_ranking(points, centre, metric=metric, width=max(k1 + 1, k2),
                                         chunk_size=chunk_size)
  columns, values = _reciprocal_encoding(points, centre, neighbours, row_max, metric=metric, k1=k1,
                                         chunk_size=chunk_size)
  return neighbours, columns, values, jnp.sum(columns < points.shape[0], axis=1), centre, row_max


@functools.partial(jax.jit, static_argnames=("width", "k2", "chunk_size"))
def _expansion(columns, values, neighbours, *, width, k2, chunk_size):
  """Step 3: V cut to its widest row (usually far below the bound S, and the expansion's sort costs in
  proportion to the width), then averaged over the k2 nearest; and the non-zeros per row."""
  columns, values = _local_query_expansion(columns[:, :width], values[:, :width], neighbours, k2=k2,
                                           chunk_size=chunk_size)
  return columns, values, jnp.sum(columns < columns.shape[0], axis=1)


@functools.partial(jax.jit, static_argnames=("num_queries", "width"))
def _gallery_by_column(columns, values, *, num_queries, width):
  """Rows of V cut to `width` (non-zeros come first); the gallery rows by column (CSC: row and value of every
  entry sorted by column, `[N + 1]` start of each column and count per column, 0 for the "none" column N); and
  the number of (query entry, gallery entry) pairs of each query row."""
  num_points = columns.shape[0]
  columns, values = columns[:, :width], values[:, :width]
  query_cols, query_vals = columns[:num_queries], values[:num_queries]
  columns, values = columns[num_queries:], values[num_queries:]
  num_gallery = columns.shape[0]
  rows = jnp.broadcast_to(jnp.arange(num_gallery, dtype=jnp.int32)[:, None], columns.shape)
  sorted_cols, sorted_rows, sorted_vals = jax.lax.sort(
      (columns.reshape(-1), rows.reshape(-1), values.reshape(-1)), num_keys=1)
  boundaries = jnp.searchsorted(sorted_cols, jnp.arange(num_points + 1, dtype=columns.dtype), side="left")
  counts = jnp.concatenate([jnp.diff(boundaries), jnp.zeros((1,), boundaries.dtype)])
  pairs_per_row = jnp.sum(counts[query_cols], axis=1)
  return query_cols, query_vals, boundaries, counts, sorted_rows, sorted_vals, pairs_per_row


@functools.partial(jax.jit, static_argnames=("metric", "rows_per_chunk", "pair_budget"))
def _jaccard_blend(query_points, gallery_points, centre, row_max, query_cols, query_vals, boundaries, counts,
                   sorted_rows, sorted_vals, chunk_starts, chunk_ends, lambda_value, *, metric, rows_per_chunk,
                   pair_budget):
  """`[Q, G]` (1 - lambda) Jaccard(V_qe[q], V_qe[g]) + lambda d(q, g), a chunk of query rows at a time.

  sum_k min(V[q, k], V[g, k]) only has terms where both are non-zero: each non-zero V[q, k] is paired with
  the gallery entries of column k (at most `pair_budget` pairs per chunk, chunks cut on the host), and the
  minima are added into a `[rows_per_chunk, G]` block.
  """
  num_queries, num_gallery = query_points.shape[0], gallery_points.shape[0]
  width = query_cols.shape[1]
  none = boundaries.shape[0] - 1

  def blend_chunk(chunk, out):
    start, end = chunk_starts[chunk], chunk_ends[chunk]
    rows = start + jnp.arange(rows_per_chunk)
    row_ok = rows < end
    rows = jnp.minimum(rows, num_queries - 1)
    cols = query_cols[rows].reshape(-1)
    vals = query_vals[rows].reshape(-1)
    repeats = jnp.where(jnp.repeat(row_ok, width) & (cols < none), counts[cols], 0)
    offsets = jnp.cumsum(repeats) - repeats
    entry = jnp.repeat(jnp.arange(rows_per_chunk * width), repeats, total_repeat_length=pair_budget)
    pair = jnp.arange(pair_budget)
    pair_ok = pair < jnp.sum(repeats)
    position = jnp.where(pair_ok, boundaries[cols[entry]] + pair - offsets[entry], 0)
    minima = jnp.where(pair_ok, jnp.minimum(vals[entry], sorted_vals[position]), 0.0)
    shared = jnp.zeros((rows_per_chunk, num_gallery), jnp.float32).at[entry // width, sorted_rows[position]].add(
        minima)
    jaccard = 1.0 - shared / (2.0 - shared)
    original = _original_distances(query_points[rows], gallery_points, metric, centre)
    original = original / jnp.where(row_max[rows] > 0, row_max[rows], 1.0)[:, None]
    blended = (1.0 - lambda_value) * jaccard + lambda_value * original
    return out.at[jnp.where(row_ok, rows, num_queries)].set(blended, mode="drop")

  out = jnp.zeros((num_queries, num_gallery), jnp.float32)
  return jax.lax.fori_loop(0, chunk_starts.shape[0], blend_chunk, out)


def _cut_chunks(pairs_per_row: np.ndarray, rows_per_chunk: int, pair_budget: int) -> tuple[np.ndarray, np.ndarray]:
  """Consecutive row ranges of at most `rows_per_chunk` rows and `pair_budget` pairs (a heavier row alone)."""
  starts, ends = [], []
  start, pairs = 0, 0
  for row, row_pairs in enumerate(pairs_per_row.tolist()):
    if row > start and (row - start == rows_per_chunk or pairs + row_pairs > pair_budget):
      starts.append(start)
      ends.append(row)
      start, pairs = row, 0
    pairs += row_pairs
  starts.append(start)
  ends.append(len(pairs_per_row))
  return np.asarray(starts, np.int32), np.asarray(ends, np.int32)


def k_reciprocal_distances(queries: jax.typing.ArrayLike, gallery: jax.typing.ArrayLike, *, k1: int = 20,
                           k2: int = 6, lambda_value: float = 0.3, metric: str = "euclidean",
                           chunk_size: int = 256, pair_budget: int = 1 << 22) -> jax.Array:
  """k-reciprocal re-ranking: the original distance blended with a Jaccard distance of reciprocal neighbours.

  Queries and gallery are ranked together (N = Q + G points). With d(i, j) the original distance (squared
  Euclidean, or squared cosine distance) divided by the largest in row i, N(i, k) the k nearest of i (itself
  included), R(i, k) = {j in N(i, k+1) : i in N(j, k+1)}:
    1. R*(i) = R(i, k1) plus R(j, round(k1/2)) for each j in R(i, k1) whose set shares more than 2/3 of its
       elements with R(i, k1);
    2. V[i, j] = exp(-d(i, j)) / sum_{j' in R*(i)} exp(-d(i, j')) on R*(i), 0 elsewhere;
    3. with k2 > 1, V[i] is replaced by the mean of V over N(i, k2) (local query expansion);
    4. J(q, g) = 1 - sum_k min(V[q,k], V[g,k]) / (2 - sum_k min(V[q,k], V[g,k])), and the result is
       (1 - lambda) J(q, g) + lambda d(q, g).
  This follows the reference implementation (zhunzhong07/person-re-ranking, python-version), except that
  ties in the initial ranking go to the lower index (the reference's argsort is not stable).

  Memory: the `[Q, G]` result, `chunk_size * N` distances at a time, V as sparse rows (`N * k2 * S` entries,
  S = (k1 + 1)(k1/2 + 2)) and about `pair_budget` pairs of non-zeros at a time (a query row with more is a
  chunk of its own; the size is rounded up to a power of two). Three small host round trips size the sparse
  stages, so this is four jitted programs rather than one.

  Args:
    queries: `[Q, D]` embeddings.
    gallery: `[G, D]` embeddings.
    k1: size of the reciprocal neighbourhoods (>= 1, k1 + 1 <= Q + G).
    k2: size of the local query expansion (1 turns it off, k2 <= Q + G).
    lambda_value: weight of the original distance, in [0, 1].
    metric: "euclidean" or "cosine", the original distance.
    chunk_size: rows per dense `[chunk, Q + G]` distance block and per Jaccard block.
    pair_budget: non-zero pairs handled at once (about 40 bytes of memory each).

  Returns:
    `[Q, G]` float32 re-ranked distances, smaller is closer.

  References:
    Zhong, Zheng, Cao, Li. Re-ranking Person Re-identification with k-reciprocal Encoding. CVPR 2017.
  """
  queries, gallery = jnp.asarray(queries, jnp.float32), jnp.asarray(gallery, jnp.float32)
  _check_pair(queries, gallery)
  if metric not in metrics.METRICS:
    raise ValueError(f"Unknown metric {metric!r}; use one of {metrics.METRICS}.")
  num_queries, num_gallery = queries.shape[0], gallery.shape[0]
  num_points = num_queries + num_gallery
  if not 1 <= k1 < num_points or not 1 <= k2 <= num_points:
    raise ValueError(f"k_reciprocal needs 1 <= k1 < Q + G and 1 <= k2 <= Q + G (Q + G = {num_points}), got "
                     f"k1={k1}, k2={k2}.")
  if not 0.0 <= lambda_value <= 1.0:
    raise ValueError(f"lambda_value weighs the original distance and must be in [0, 1], got {lambda_value}.")
  if pair_budget < 1 or chunk_size < 1:
    raise ValueError(f"chunk_size and pair_budget must be positive, got {chunk_size} and {pair_budget}.")
  chunk_size = min(chunk_size, num_points)
  neighbours, columns, values, non_zeros, centre, row_max = _encoding(
      queries, gallery, metric=metric, k1=k1, k2=k2, chunk_size=chunk_size)
  if k2 > 1:
    columns, values, non_zeros = _expansion(columns, values, neighbours, width=max(1, int(jnp.max(non_zeros))),
                                            k2=k2, chunk_size=chunk_size)
  row_max = row_max[:num_queries]
  query_cols, query_vals, boundaries, counts, sorted_rows, sorted_vals, pairs_per_row = _gallery_by_column(
      columns, values, num_queries=num_queries, width=max(1, int(jnp.max(non_zeros))))
  pairs_per_row = np.asarray(pairs_per_row, np.int64)
  rows_per_chunk = min(chunk_size, num_queries)
  chunk_starts, chunk_ends = _cut_chunks(pairs_per_row, rows_per_chunk, pair_budget)
  largest = max(1, max(int(pairs_per_row[a:b].sum()) for a, b in zip(chunk_starts, chunk_ends)))
  # A power of two, so that runs on similar data share one compiled program.
  budget = 1 << (largest - 1).bit_length()
  return _jaccard_blend(queries, gallery, centre, row_max, query_cols, query_vals, boundaries, counts,
                        sorted_rows, sorted_vals, chunk_starts, chunk_ends, jnp.float32(lambda_value),
                        metric=metric, rows_per_chunk=rows_per_chunk, pair_budget=budget)


def _check_pair(queries: jax.Array, gallery: jax.Array):
  if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
    raise ValueError(f"Expected query [Q, D] and gallery [G, D] embeddings with the same D, got {queries.shape} "
                     f"and {gallery.shape}.")
  if queries.shape[0] == 0 or gallery.shape[0] == 0:
    raise ValueError("Re-ranking needs at least one query and one gallery image.")


def reranked_distances(query_emb: jax.typing.ArrayLike, gallery_emb: jax.typing.ArrayLike, method: str = "none", *,
                       metric: str = "euclidean", num_neighbours: int = 2, alpha: float = 3.0, k1: int = 20,
                       k2: int = 6, lambda_value: float = 0.3, chunk_size: int = 256) -> jax.Array:
  """`[Q, G]` distances after re-ranking, for `metrics.retrieval_metrics_from_distances` or a top-k.

  Methods:
    "none": `metrics.retrieval_distances` with `metric`;
    "aqe": cosine distances from `alpha_query_expansion` queries to the unit gallery;
    "dba": cosine distances from the unit queries to the `database_side_augmentation` gallery;
    "dba+aqe": DBA, then alpha-QE against the augmented gallery (the paper's combination);
    "k_reciprocal": `k_reciprocal_distances` with `metric`.
  alpha-QE and DBA work on L2-normalised embeddings, as in the paper, whatever `metric` is (on unit vectors
  Euclidean and cosine distances rank alike).

  Args:
    query_emb: `[Q, D]`; gallery_emb: `[G, D]`.
    method: one of METHODS.
    metric: "euclidean" or "cosine", for "none" and "k_reciprocal".
    num_neighbours, alpha: of alpha-QE and DBA.
    k1, k2, lambda_value: of k-reciprocal re-ranking.
    chunk_size: rows per block.

  Returns:
    `[Q, G]` float32 distances, smaller is closer.
  """
  if method not in METHODS:
    raise ValueError(f"Unknown re-ranking method {method!r}; use one of {METHODS}.")
  if metric not in metrics.METRICS:
    raise ValueError(f"Unknown metric {metric!r}; use one of {metrics.METRICS}.")
  queries, gallery = jnp.asarray(query_emb, jnp.float32), jnp.asarray(gallery_emb, jnp.float32)
  _check_pair(queries, gallery)
  if method == "k_reciprocal":
    return k_reciprocal_distances(queries, gallery, k1=k1, k2=k2, lambda_value=lambda_value, metric=metric,
                                  chunk_size=chunk_size)
  if method == "none":
    return metrics.retrieval_distances(queries, gallery, metric)
  if method in ("dba", "dba+aqe"):
    gallery = database_side_augmentation(gallery, num_neighbours=num_neighbours, alpha=alpha, chunk_size=chunk_size)
  if method in ("aqe", "dba+aqe"):
    queries = alpha_query_expansion(queries, gallery, num_neighbours=num_neighbours, alpha=alpha,
                                    chunk_size=chunk_size)
  return metrics.retrieval_distances(queries, unit_rows(gallery), "cosine")
