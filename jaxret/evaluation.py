"""Evaluation of a training state: query and gallery splits embedded across all devices, Recall@K exact.

The images come from the splits' decoded caches (uint8, resized and normalised on the device by the
embedding step), so an evaluation decodes no JPEG.

The gallery stays split over the devices (`metrics.sharded_query_ranks`), so galleries larger than one
device's memory are evaluated the same way on one CPU, a GPU or a TPU slice.
"""

from collections.abc import Mapping

import jax
import ml_collections
import numpy as np

from jaxret import decoded_cache
from jaxret import embedding
from jaxret import input_pipeline
from jaxret import metrics
from jaxret import sharding

SPLITS = ("query", "gallery")


class Evaluator:
  """Embeds the query and gallery splits of a dataset and ranks the gallery for every query.

  Everything that does not change between evaluations is made once: the jitted embedding step, the query
  slice, and the labels and padding mask of the padded gallery, already on the devices.
  """

  def __init__(self, config: ml_collections.ConfigDict, builder, model, mesh: jax.sharding.Mesh,
               splits: Mapping[str, decoded_cache.DecodedSplit] | None = None):
    """Args: the run's config, its dataset's builder, the model, the data mesh, and the decoded query and
    gallery splits (opened, and built on first use, from the config when not given)."""
    self.config = config
    self.mesh = mesh
    self.sources = {split: input_pipeline.read_split(builder, split) for split in SPLITS}  # For pictures.
    self.splits = dict(splits) if splits else {
        split: input_pipeline.open_decoded_split(config, builder, split) for split in SPLITS}
    self.indexes = {split: self.splits[split].index for split in SPLITS}
    self._embed = embedding.jit_embed_step(model, mesh, config.input.image_size)
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

  def embed_split_on_device(self, variables: embedding.Variables, split: str) -> jax.Array:
    """`[N_padded, D]` embeddings of a split in record order, split over the devices; rows >= N are padding."""
    batches = input_pipeline.eval_batches(
        self.splits[split], global_batch=self.config.evals.batch_size, process_index=jax.process_index(),
        process_count=jax.process_count())
    return embedding.embed_batches_on_device(self._embed, variables, batches, self.mesh,
                                             desc=f"embedding {split}")

  def embed_split(self, variables: embedding.Variables, split: str) -> np.ndarray:
    """`[N, D]` embeddings of a whole split, in record order, on the host (every process)."""
    return sharding.host_array(self.embed_split_on_device(variables, split))[:len(self.indexes[split])]

  def __call__(self, variables: embedding.Variables) -> tuple[dict[int, float], dict[str, jax.Array]]:
    """Recall@K of the model's variables, and the padded query and gallery embeddings (device arrays)."""
    embeddings = {split: self.embed_split_on_device(variables, split) for split in SPLITS}
    ranks = metrics.sharded_query_ranks(
        self._real_queries(embeddings["query"]), self.query_labels, embeddings["gallery"],
        self.gallery_labels, self.gallery_valid, mesh=self.mesh, axis_name=sharding.DATA_AXIS,
        metric=self.config.evals.metric)
    recalls = metrics.recall_from_ranks(np.asarray(ranks.addressable_data(0)), self.config.evals.ks)
    return recalls, embeddings


def recall_table(recalls: Mapping[int, float], name: str) -> str:
  """Recall@K as the In-shop papers print it (percent)."""
  ks = sorted(recalls)
  header = "| Model | " + " | ".join(f"R@{k}" for k in ks) + " |"
  rule = "|---|" + "---|" * len(ks)
  row = f"| {name} | " + " | ".join(f"{100 * recalls[k]:.1f}" for k in ks) + " |"
  return "\n".join([header, rule, row])
