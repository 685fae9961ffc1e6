"""Evaluation of a training state: query and gallery splits embedded across all devices, Recall@K exact.

The gallery stays split over the devices (`metrics.sharded_query_ranks`), so galleries larger than one
device's memory are evaluated the same way on one CPU, a GPU or a TPU slice.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxret import embedding
from jaxret import input_pipeline
from jaxret import metrics
from jaxret import rerank
from jaxret import sharding

SPLITS = ("query", "gallery")
# Below this `embedding_spread` the embeddings sit on one point (float32 distances are then rounding noise).
COLLAPSED_SPREAD = 1e-6


@jax.jit
def embedding_spread(embeddings: jax.Array) -> jax.Array:
  """How spread out `[N, D]` embeddings are: their total variance over their mean squared norm (scalar).

  About 1 for embeddings scattered around the origin, 0 when every embedding is the same point; scale-free,
  so it says "collapsed" for capsule embeddings far from the origin as well as for normalised ones.
  """
  embeddings = embeddings.astype(jnp.float32)
  variance = jnp.sum(jnp.var(embeddings, axis=0))
  return variance / (jnp.mean(jnp.sum(jnp.square(embeddings), axis=1)) + 1e-30)


class Evaluator:
  """Embeds the query and gallery splits of a dataset and ranks the gallery for every query.

  Everything that does not change between evaluations is made once: the jitted embedding step, the query
  slice, and the labels and padding mask of the padded gallery, already on the devices.
  """

  def __init__(self, config: ml_collections.ConfigDict, builder, model, mesh: jax.sharding.Mesh):
    self.config = config
    self.mesh = mesh
    self.sources = {split: input_pipeline.read_split(builder, split) for split in SPLITS}
    self.indexes = {split: input_pipeline.index_split(src, f"indexing {split}")
                    for split, src in self.sources.items()}
    self._embed = embedding.jit_embed_step(model, mesh)
    replicated = sharding.replicated(mesh)
    data = sharding.data_sharding(mesh)
    num_queries = len(self.indexes["query"])
    self._real_queries = jax.jit(lambda x: x[:num_queries], out_shardings=replicated)
    self.query_labels = sharding.global_from_host(self.indexes["query"].item_ids.astype(np.int32), replicated)
    num_gallery = len(self.indexes["gallery"])
    padded_gallery = -(-num_gallery // config.evals.batch_size) * config.evals.batch_size
    gallery_labels = np.full(padded_gallery, -1, np.int32)
    gallery_labels[:num_gallery] = self.indexes["gallery"].item_ids
    self.gallery_labels = sharding.global_from_host(gallery_labels, data)
    self.gallery_valid = sharding.global_from_host(np.arange(padded_gallery) < num_gallery, data)
    # The ranks that mAP@R, R-precision and precision@K need (fixed by the labels, so computed once).
    self.depth = metrics.ranking_depth(self.indexes["query"].item_ids, self.indexes["gallery"].item_ids,
                                       config.evals.ks)
    category = builder.info.features["category"]
    self.category_names = list(category.names) if hasattr(category, "names") else None

  def embed_split_on_device(self, variables: embedding.Variables, split: str) -> jax.Array:
    """`[N_padded, D]` embeddings of a split in record order, split over the devices; rows >= N are padding."""
    batches = input_pipeline.eval_batches(
        self.sources[split], self.indexes[split], image_size=self.config.input.image_size,
        global_batch=self.config.evals.batch_size, process_index=jax.process_index(),
        process_count=jax.process_count(), num_threads=self.config.input.num_threads)
    return embedding.embed_batches_on_device(self._embed, variables, batches, self.mesh,
                                             desc=f"embedding {split}")

  def _reranked(self, queries: jax.Array, padded_gallery: jax.Array) -> dict[str, float]:
    """The metrics after `config.evals.rerank`, as `rerank/<metric>` (one device: the gallery is gathered)."""
    gallery = sharding.host_array(padded_gallery)[:len(self.indexes["gallery"])]
    distances = rerank.reranked_distances(sharding.host_array(queries), gallery, self.config.evals.rerank,
                                          metric=self.config.evals.metric)
    found = metrics.retrieval_metrics_from_distances(
        distances, self.indexes["query"].item_ids.astype(np.int32),
        self.indexes["gallery"].item_ids.astype(np.int32), self.config.evals.ks)
    return {f"rerank/{key}": value for key, value in found.items()}

  def embed_split(self, variables: embedding.Variables, split: str) -> np.ndarray:
    """`[N, D]` embeddings of a whole split, in record order, on the host (every process)."""
    return sharding.host_array(self.embed_split_on_device(variables, split))[:len(self.indexes[split])]

  def __call__(self, variables: embedding.Variables
               ) -> tuple[dict[int, float], dict[str, jax.Array], float, dict[str, float]]:
    """Evaluates the model's variables.

    Returns:
      `(recalls, embeddings, spread, more)`: Recall@K by K; the padded query and gallery embeddings (device
      arrays); `embedding_spread` of the queries (below `COLLAPSED_SPREAD` the embedding has collapsed);
      `{"map@r", "r_precision", "precision@K", "category/<name>/recall@1"}` (docs/evaluation.md).
    """
    embeddings = {split: self.embed_split_on_device(variables, split) for split in SPLITS}
    queries = self._real_queries(embeddings["query"])
    relevance, num_positives = metrics.sharded_query_relevance(
        queries, self.query_labels, embeddings["gallery"], self.gallery_labels, self.gallery_valid,
        depth=self.depth, mesh=self.mesh, axis_name=sharding.DATA_AXIS, metric=self.config.evals.metric)
    found = metrics.metrics_from_relevance(
        np.asarray(relevance.addressable_data(0)), np.asarray(num_positives.addressable_data(0)),
        self.config.evals.ks, query_categories=self.indexes["query"].categories,
        category_names=self.category_names)
    recalls = {int(k): found[f"recall@{int(k)}"] for k in self.config.evals.ks}
    # Recall@1 per category only (every K for every category would bury the log), as `category/<name>/recall@1`
    # so that `recall@` keys are always the overall Recall@K.
    more = {key: value for key, value in found.items() if not key.startswith("recall@")}
    more.update({f"category/{key[len('recall@1/'):]}/recall@1": value for key, value in found.items()
                 if key.startswith("recall@1/")})
    if self.config.evals.get("rerank", "none") != "none":
      more.update(self._reranked(queries, embeddings["gallery"]))
    if self.config.evals.metric == "cosine":  # Only directions matter: a collapse is one direction for all.
      queries = queries / (jnp.linalg.norm(queries, axis=1, keepdims=True) + 1e-12)
    return recalls, embeddings, float(np.asarray(embedding_spread(queries).addressable_data(0))), more


def recall_table(recalls: Mapping[int, float], name: str) -> str:
  """Recall@K as the In-shop papers print it (percent)."""
  ks = sorted(recalls)
  header = "| Model | " + " | ".join(f"R@{k}" for k in ks) + " |"
  rule = "|---|" + "---|" * len(ks)
  row = f"| {name} | " + " | ".join(f"{100 * recalls[k]:.1f}" for k in ks) + " |"
  return "\n".join([header, rule, row])
