"""Pre-classification search: each query searches only the gallery images of its top-k predicted categories.

A model with a category classifier (`config.model.num_categories`, aux `category_logits`) or a capsule network
(aux `capsule_lengths`, one class capsule per category) predicts the garment's category of a query photo; the
gallery is then restricted to the images whose category is among the query's k most likely ones (k = 1: the
predicted category; k = 2: the two most likely, which forgives most confusions between neighbouring
categories). The gallery's categories are its known labels (a shop knows what it sells) or, where they are
unknown, the model's own top-1 prediction of each gallery image.

The restricted ranking is the exact ranking of the allowed images: the distance to every image that is not
allowed is set to +inf (`restrict_distances`), and `metrics.first_hit_rank` then counts only allowed images
before the query's nearest allowed correct image (an image at +inf is never before a finite distance, and a
query whose correct images are all excluded is a miss). A search that skips the excluded images, as a catalogue
filtered by category does, finds the same ranks; what it saves is the fraction of the gallery not searched
(`searched_fraction`).

  scores = category_scores(aux)                                # [B, C]
  top = top_categories(scores, k=2)                            # [B, 2]
  ranks = preclassified_ranks(queries, query_labels, top, gallery, gallery_labels, gallery_categories)
  metrics.recall_from_ranks(ranks, ks)

References:
  Bao's thesis (issue 20): multi-task attribute and category classifiers trained beside a triplet network, whose
    predictions pre-classify the gallery to speed up the search.
  Liu, Luo, Qiu, Wang, Tang. DeepFashion: Powering Robust Clothes Recognition and Retrieval with Rich
    Annotations. CVPR 2016 (In-shop's 23 categories).
"""

from collections.abc import Mapping
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxret import metrics

# The aux outputs read as category scores, in order of preference: a trained classifier's logits, else the
# class-capsule lengths of a capsule network (its categories are its classes).
SCORE_KEYS = ("category_logits", "capsule_lengths")
# Where the gallery's categories come from: "known" labels of the gallery, or the model's "predicted" top-1.
GALLERY_CATEGORIES = ("known", "predicted")


class NoCategoryScoresError(ValueError):
  """The model predicts no category; the message says what to configure."""


def category_scores(aux: Mapping[str, jax.Array]) -> jax.Array:
  """The category scores in a model's aux outputs (larger is more likely): `[B, C]` float32.

  Args:
    aux: the model's second return value; `category_logits` `[B, C]` (a `models.heads.TaskHeads` category
      head) is preferred, else `capsule_lengths` `[B, num_classes]` (a capsule network).

  Returns:
    `[B, C]` float32 scores; only their order within a row matters.

  Raises:
    NoCategoryScoresError: the model has neither output.
  """
  for key in SCORE_KEYS:
    if key in aux:
      scores = jnp.asarray(aux[key])
      if scores.ndim != 2:
        raise ValueError(f"aux[{key!r}] must be [batch, categories]; got shape {scores.shape}.")
      return scores.astype(jnp.float32)
  raise NoCategoryScoresError(
      f"Pre-classification needs the model's category predictions ({' or '.join(SCORE_KEYS)} in its aux "
      "outputs), and this model has neither. Give it a category head (config.model.num_categories = the number "
      "of categories, e.g. 23 for In-shop) trained with the category loss (config.loss.name = "
      "\"triplet+category\"), or use a capsule network; or turn pre-classification off "
      "(config.evals.preclassify_top_k = 0).")


def top_categories(scores: jax.typing.ArrayLike, k: int) -> jax.Array:
  """The k most likely categories of each row, most likely first; ties go to the smaller category id.

  Args:
    scores: `[Q, C]` category scores (`category_scores`).
    k: how many categories, 1 <= k <= C.

  Returns:
    `[Q, k]` int32 category ids, distinct within a row.
  """
  scores = jnp.asarray(scores)
  if scores.ndim != 2:
    raise ValueError(f"scores must be [queries, categories]; got shape {scores.shape}.")
  if not 1 <= k <= scores.shape[1]:
    raise ValueError(f"k={k} categories must be between 1 and the model's {scores.shape[1]} categories.")
  _, indices = jax.lax.top_k(scores, k)
  return indices.astype(jnp.int32)


def allowed_gallery(query_categories: jax.typing.ArrayLike, gallery_categories: jax.typing.ArrayLike
                    ) -> jax.Array:
  """Which gallery images each query may retrieve: those whose category is among the query's categories.

  Args:
    query_categories: `[Q, k]` int category ids of each query (`top_categories`).
    gallery_categories: `[G]` int category of each gallery image; a negative id (unknown) is never allowed.

  Returns:
    `[Q, G]` bool.

  Example:
    >>> import numpy as np
    >>> np.asarray(allowed_gallery(np.array([[2, 0], [1, 1]]), np.array([0, 1, 2, -1]))).tolist()
    [[True, False, True, False], [False, True, False, False]]
  """
  query_categories = jnp.asarray(query_categories)
  gallery_categories = jnp.asarray(gallery_categories)
  if query_categories.ndim != 2 or gallery_categories.ndim != 1:
    raise ValueError(f"Expected [Q, k] query categories and [G] gallery categories, got shapes "
                     f"{query_categories.shape} and {gallery_categories.shape}.")
  match = query_categories[:, :, None] == gallery_categories[None, None, :]
  return jnp.any(match, axis=1) & (gallery_categories >= 0)[None, :]


def restrict_distances(distances: jax.Array, allowed: jax.Array) -> jax.Array:
  """`[Q, G]` distances with every image a query may not retrieve moved to +inf (past every allowed one)."""
  return jnp.where(allowed, distances, jnp.asarray(jnp.inf, distances.dtype))


def _chunked(query_emb, query_labels, query_categories, chunk_size):
  """Queries, labels and categories padded to whole chunks: `[num_chunks, chunk_size, ...]`."""
  num_chunks = -(-query_emb.shape[0] // chunk_size)
  pad = num_chunks * chunk_size - query_emb.shape[0]

  def blocks(x):
    return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(num_chunks, chunk_size, *x.shape[1:])

  return blocks(query_emb), blocks(query_labels), blocks(query_categories)


@functools.partial(jax.jit, static_argnames=("metric", "chunk_size"))
def preclassified_ranks(query_emb: jax.Array, query_labels: jax.Array, query_categories: jax.Array,
                        gallery_emb: jax.Array, gallery_labels: jax.Array, gallery_categories: jax.Array, *,
                        metric: str = "euclidean", chunk_size: int = 128) -> jax.Array:
  """Rank of each query's first correct image among the gallery images of its categories (one device).

  Args:
    query_emb: `[Q, D]`; query_labels: `[Q]` product ids; query_categories: `[Q, k]` (`top_categories`).
    gallery_emb: `[G, D]`; gallery_labels: `[G]` product ids; gallery_categories: `[G]` (negative: unknown,
      never searched).
    metric: see `metrics.retrieval_distances`.
    chunk_size: queries per distance block; memory is `chunk_size * G` floats.

  Returns:
    `[Q]` int32: the number of allowed gallery images ranked before the query's first allowed correct one
    (ties by gallery index), or G when no correct image is allowed (a miss at every K).
  """
  num_queries = query_emb.shape[0]
  chunk_size = max(1, min(chunk_size, num_queries))

  def ranks_of_chunk(chunk):
    emb, labels, categories = chunk
    distances = restrict_distances(metrics.retrieval_distances(emb, gallery_emb, metric),
                                   allowed_gallery(categories, gallery_categories))
    return metrics.first_hit_rank(distances, labels, gallery_labels)

  ranks = jax.lax.map(ranks_of_chunk, _chunked(query_emb, query_labels, query_categories, chunk_size))
  return ranks.reshape(-1)[:num_queries]


def sharded_preclassified_ranks(query_emb: jax.Array, query_labels: jax.Array, query_categories: jax.Array,
                                gallery_emb: jax.Array, gallery_labels: jax.Array, gallery_categories: jax.Array,
                                gallery_valid: jax.Array, *, mesh: jax.sharding.Mesh, axis_name: str = "data",
                                metric: str = "euclidean", chunk_size: int = 1024) -> jax.Array:
  """`preclassified_ranks` with the gallery split over the devices of `mesh` (as `metrics.sharded_query_ranks`).

  Args:
    query_emb: `[Q, D]`, query_labels: `[Q]`, query_categories: `[Q, k]`, replicated.
    gallery_emb: `[G, D]`, G divisible by the size of `axis_name`; gallery_labels, gallery_categories,
      gallery_valid: `[G]` (False marks padding).
    mesh: the device mesh; axis_name: its axis over which the gallery is split.
    metric: see `metrics.retrieval_distances`; chunk_size: queries per distance block.

  Returns:
    `[Q]` int32 ranks, replicated; G (the padded size) for a query without an allowed correct image.
  """
  num_gallery = gallery_emb.shape[0]
  if num_gallery % mesh.shape[axis_name]:
    raise ValueError(f"The gallery ({num_gallery}) must be padded to a multiple of the {mesh.shape[axis_name]} "
                     "devices; pad it and mark the padding in gallery_valid.")
  num_queries = query_emb.shape[0]
  chunk_size = max(1, min(chunk_size, num_queries))
  ranks = _sharded_ranks_fn(mesh, axis_name, metric, num_gallery)(
      *_chunked(query_emb, query_labels, query_categories, chunk_size), gallery_emb, gallery_labels,
      gallery_categories, gallery_valid)
  return ranks.reshape(-1)[:num_queries]


@functools.lru_cache(maxsize=16)
def _sharded_ranks_fn(mesh: jax.sharding.Mesh, axis_name: str, metric: str, num_gallery: int):
  """The jitted `shard_map` of `sharded_preclassified_ranks`, built once per mesh and gallery size."""
  P = jax.sharding.PartitionSpec  # pylint: disable=invalid-name

  def ranks_on_shard(queries, labels, categories, gallery, gallery_labels, gallery_categories, valid, centre):
    offset = jax.lax.axis_index(axis_name) * gallery.shape[0]

    def ranks_of_chunk(chunk):
      emb, chunk_labels, chunk_categories = chunk
      distances = restrict_distances(metrics.retrieval_distances(emb, gallery, metric, centre),
                                     allowed_gallery(chunk_categories, gallery_categories))
      return metrics.first_hit_rank(distances, chunk_labels, gallery_labels, valid, gallery_offset=offset,
                                    num_gallery=num_gallery, axis_name=axis_name)

    return jax.lax.map(ranks_of_chunk, (queries, labels, categories))

  sharded = jax.shard_map(ranks_on_shard, mesh=mesh,
                          in_specs=(P(), P(), P(), P(axis_name), P(axis_name), P(axis_name), P(axis_name), P()),
                          out_specs=P())
  # One centre (the first gallery image) for all shards, as in `metrics.sharded_query_ranks`.
  return jax.jit(lambda queries, labels, categories, gallery, gallery_labels, gallery_categories, valid: sharded(
      queries, labels, categories, gallery, gallery_labels, gallery_categories, valid, gallery[0]))


def searched_fraction(query_categories: np.ndarray, gallery_categories: np.ndarray) -> np.ndarray:
  """The fraction of the gallery each query searches: its allowed images over all G.

  Args:
    query_categories: `[Q, k]` distinct category ids per row (`top_categories`).
    gallery_categories: `[G]` category ids (negative: unknown, never searched).

  Returns:
    `[Q]` float64 in [0, 1].
  """
  query_categories = np.asarray(query_categories)
  gallery_categories = np.asarray(gallery_categories)
  if query_categories.ndim != 2 or gallery_categories.ndim != 1 or not len(gallery_categories):
    raise ValueError(f"Expected [Q, k] query categories and a non-empty [G] gallery, got shapes "
                     f"{query_categories.shape} and {gallery_categories.shape}.")
  known = gallery_categories[gallery_categories >= 0]
  size = max(int(known.max(initial=-1)), int(query_categories.max(initial=-1))) + 1
  images_of = np.bincount(known, minlength=size)
  allowed = np.where(query_categories >= 0, images_of[np.maximum(query_categories, 0)], 0).sum(axis=1)
  return allowed / len(gallery_categories)


def top_k_accuracy(query_categories: np.ndarray, true_categories: np.ndarray) -> float:
  """The fraction of queries whose true category is among their `[Q, k]` predicted ones. With the gallery's
  known categories this bounds the Recall@K that pre-classification can keep: a query outside it has no correct
  image left to find (its product's images share its category)."""
  query_categories = np.asarray(query_categories)
  true_categories = np.asarray(true_categories)
  if query_categories.ndim != 2 or true_categories.shape != query_categories.shape[:1]:
    raise ValueError(f"Expected [Q, k] predicted and [Q] true categories, got shapes {query_categories.shape} "
                     f"and {true_categories.shape}.")
  return float(np.mean(np.any(query_categories == true_categories[:, None], axis=1)))
