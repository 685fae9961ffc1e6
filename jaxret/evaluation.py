"""Evaluation of a training state: query and gallery splits embedded across all devices, Recall@K exact.

The images come from the splits' decoded caches (uint8, resized and normalised on the device by the
embedding step), so an evaluation decodes no JPEG.

The gallery stays split over the devices (`metrics.sharded_query_ranks`), so galleries larger than one
device's memory are evaluated the same way on one CPU, a GPU or a TPU slice.

`evaluate_run(config, workdir)` (`python -m jaxret.train ... --eval_only`) evaluates a stored run's latest
checkpoint without training, e.g. under the capsule papers' protocol (`--config.model.embedding=
label_leaky_eval`) for a run trained and evaluated honestly.
"""

from collections.abc import Mapping
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxret import decoded_cache
from jaxret import detections as detections_file
from jaxret import embedding
from jaxret import garment_evaluation
from jaxret import input_pipeline
from jaxret import metrics
from jaxret import preclassify
from jaxret import rerank
from jaxret import run_config
from jaxret import sharding
from jaxret import workdir as run_dir

SPLITS = ("query", "gallery")
# Below this `embedding_spread` the embeddings sit on one point (float32 distances are then rounding noise).
COLLAPSED_SPREAD = 1e-6
# Where `evaluate_run` appends its results, one JSON object per line, in the run's workdir.
EVAL_ONLY_FILE = "eval_only.jsonl"
# Fields that `evaluate_run` may change besides `jaxret.workdir.HARMLESS_FIELDS`: they change how a trained
# model embeds at evaluation, not what was trained (the model's variables are the same in every mode).
EVAL_ONLY_FIELDS = ("model.embedding",)


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

  def __init__(self, config: ml_collections.ConfigDict, builder, model, mesh: jax.sharding.Mesh,
               splits: Mapping[str, decoded_cache.DecodedSplit] | None = None, *, test_split: bool = True,
               detections: str | None = None):
    """Args: the run's config, its dataset's builder, the model, the data mesh, the decoded query and gallery
    splits (opened, and built on first use, from the config when not given), whether they are the
    dataset's query and gallery (False for e.g. the validation split of `jaxret.validation`): only then are
    their JPEG `sources` opened, for pictures; and a detections file (`--detections`) whose boxes are
    searched as well (DeepFashion2's metric with detections, `jaxret.garment_evaluation`).

    Raises:
      detections.DetectionsFileError: the detections file is unreadable, malformed, or names no photo of the
        query or gallery split.
    """
    self.config = config
    self.mesh = mesh
    self.sources = {split: input_pipeline.read_split(builder, split) for split in SPLITS} if test_split else None
    self.splits = dict(splits) if splits else {
        split: input_pipeline.open_decoded_split(config, builder, split) for split in SPLITS}
    self.indexes = {split: self.splits[split].index for split in SPLITS}
    self._embed = embedding.jit_embed_step(model, mesh, config)
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
    self._predict = embedding.jit_predict_step(model, mesh, config) if embedding.has_task_heads(model) else None
    self.deepfashion2 = garment_evaluation.logs_metric(config) and "bbox" in self.indexes["query"].features
    self.detection_crops = None
    if detections:
      self.detection_crops = self._load_detections(detections, num_categories=getattr(category, "num_classes", None))
    self._init_preclassify(model, padded_gallery)

  def _load_detections(self, path: str, num_categories: int | None
                       ) -> dict[str, garment_evaluation.DetectionCrops | None]:
    names = {split: set(np.asarray(self.indexes[split].image_names).astype(str)) for split in SPLITS}
    found = detections_file.load_detections(path, num_categories=num_categories,
                                            image_names=names["query"] | names["gallery"])
    sources = self.sources or {split: None for split in SPLITS}
    crops = {split: (garment_evaluation.DetectionCrops(found, self.indexes[split], sources[split])
                     if names[split] & set(found.image_names) else None) for split in SPLITS}
    if not any(crops.values()):
      raise detections_file.DetectionsFileError(
          f"{path} names no photo of the query or gallery split; use the dataset's image_name values as keys.")
    return crops

  def embed_split_on_device(self, variables: embedding.Variables, split: str) -> jax.Array:
    """`[N_padded, D]` embeddings of a split in record order, split over the devices; rows >= N are padding."""
    batches = input_pipeline.eval_batches(
        self.splits[split], global_batch=self.config.evals.batch_size, process_index=jax.process_index(),
        process_count=jax.process_count(), features=input_pipeline.box_features(self.config))
    return embedding.embed_batches_on_device(self._embed, variables, batches, self.mesh,
                                             desc=f"embedding {split}")

  def _detection_accuracy(self, variables: embedding.Variables, queries: np.ndarray,
                          gallery: np.ndarray) -> dict[str, float]:
    """`df2_detections/top@k`: the detected garments embedded and searched (see `garment_evaluation`)."""
    searched = {"query": queries, "gallery": gallery}
    for split, crops in self.detection_crops.items():
      if crops is not None and len(crops):
        batches = crops.batches(self.splits[split].images, global_batch=self.config.evals.batch_size,
                                process_index=jax.process_index(), process_count=jax.process_count())
        embedded = embedding.embed_batches_on_device(self._embed, variables, batches, self.mesh,
                                                     desc=f"embedding {split} detections")
        searched[split] = sharding.host_array(embedded)[:len(crops)]
      elif crops is not None:
        searched[split] = np.zeros((0, queries.shape[1]), np.float32)
    rankings = garment_evaluation.nearest_gallery(searched["query"], searched["gallery"],
                                                  metric=self.config.evals.metric)
    return garment_evaluation.accuracy_with_detections(rankings, self.detection_crops["query"],
                                                       self.detection_crops["gallery"], self.indexes["query"],
                                                       self.indexes["gallery"])

  def task_metrics(self, variables: embedding.Variables, split: str = "query") -> dict[str, float]:
    """The task heads' scores on a split: `task/category_accuracy` and `task/attribute_map` (mean average
    precision over the attributes, `metrics.attribute_map`), for the heads the model has."""
    data = sharding.data_sharding(self.mesh)
    index = self.indexes[split]
    outputs: dict[str, list[np.ndarray]] = {}
    batches = input_pipeline.eval_batches(
        self.splits[split], global_batch=self.config.evals.batch_size, process_index=jax.process_index(),
        process_count=jax.process_count(), features=input_pipeline.box_features(self.config))
    for batch in batches:
      images = jax.make_array_from_process_local_data(data, batch["image"])
      boxes = ({key: jax.make_array_from_process_local_data(data, batch[key])
                for key in input_pipeline.BOX_FEATURES} if "bbox" in batch else None)
      for key, value in self._predict(variables, images, boxes).items():
        outputs.setdefault(key, []).append(sharding.host_array(value))
    found = {}
    if "category_logits" in outputs:
      predicted = np.argmax(np.concatenate(outputs["category_logits"])[:len(index)], axis=1)
      found["task/category_accuracy"] = float(np.mean(predicted == index.categories))
    if "attribute_logits" in outputs and "attributes" in index.features:
      scores = np.concatenate(outputs["attribute_logits"])[:len(index)]
      has = index.features.get("has_attributes", np.ones(len(index), bool))
      found["task/attribute_map"] = metrics.attribute_map(scores, index.features["attributes"], has)
    return found

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
      `{"map@r", "r_precision", "precision@K", "category/<name>/recall@1"}`, and for models with task heads
      `task/category_accuracy`, `task/attribute_map` on the queries (docs/evaluation.md).
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
    if self._predict is not None:
      more.update(self.task_metrics(variables))
    if self.deepfashion2 or self.detection_crops:
      gallery = sharding.host_array(embeddings["gallery"])[:len(self.indexes["gallery"])]
      real_queries = sharding.host_array(queries)
      if self.deepfashion2:
        more.update(garment_evaluation.accuracy_ground_truth(
            real_queries, gallery, self.indexes["query"], self.indexes["gallery"], metric=self.config.evals.metric))
      if self.detection_crops:
        more.update(self._detection_accuracy(variables, real_queries, gallery))
    if self.preclassify_top_k:
      more.update(self._preclassified(variables, queries, embeddings["gallery"]))
    if self.config.evals.metric == "cosine":  # Only directions matter: a collapse is one direction for all.
      queries = queries / (jnp.linalg.norm(queries, axis=1, keepdims=True) + 1e-12)
    return recalls, embeddings, float(np.asarray(embedding_spread(queries).addressable_data(0))), more

  # Pre-classification search (config.evals.preclassify_top_k; jaxret/preclassify.py, docs/evaluation.md).
  def _init_preclassify(self, model, padded_gallery: int) -> None:
    """The category step and the padded gallery's known categories, when pre-classification is on; a
    ConfigError now (before training) when the model predicts no category or fewer than k."""
    self.preclassify_top_k = int(self.config.evals.get("preclassify_top_k", 0))
    if not self.preclassify_top_k:
      return
    try:
      num_categories = embedding.num_category_scores(model, self.config)
    except preclassify.NoCategoryScoresError as e:
      raise run_config.ConfigError(str(e)) from e
    if self.preclassify_top_k > num_categories:
      raise run_config.ConfigError(
          f"config.evals.preclassify_top_k={self.preclassify_top_k} asks for more categories than the "
          f"{num_categories} the model predicts.")
    self._category_scores = embedding.jit_category_scores_step(model, self.mesh, self.config)
    known = np.full(padded_gallery, -1, np.int32)  # Padding has no category (and is masked anyway).
    known[:len(self.indexes["gallery"])] = self.indexes["gallery"].categories
    self.gallery_categories = sharding.global_from_host(known, sharding.data_sharding(self.mesh))

  def _category_scores_of_split(self, variables: embedding.Variables, split: str) -> jax.Array:
    """`[N_padded, num_categories]` category scores of a split, split over the devices as its embeddings."""
    batches = input_pipeline.eval_batches(
        self.splits[split], global_batch=self.config.evals.batch_size, process_index=jax.process_index(),
        process_count=jax.process_count(), features=input_pipeline.box_features(self.config))
    return embedding.embed_batches_on_device(self._category_scores, variables, batches, self.mesh,
                                             desc=f"classifying {split}")

  def _preclassified(self, variables: embedding.Variables, queries: jax.Array,
                     padded_gallery: jax.Array) -> dict[str, float]:
    """Recall@K with each query searching only the gallery images of its top-k predicted categories, as
    `preclassify/recall@K`; the mean fraction of the gallery searched, `preclassify/gallery_fraction`; and how
    often the query's true category is among its k, `preclassify/category_accuracy`."""
    k = self.preclassify_top_k
    query_categories = preclassify.top_categories(
        self._real_queries(self._category_scores_of_split(variables, "query")), k)
    gallery_categories = self.gallery_categories
    if self.config.evals.get("preclassify_gallery", "known") == "predicted":
      gallery_categories = jnp.argmax(self._category_scores_of_split(variables, "gallery"), axis=1).astype(jnp.int32)
    ranks = preclassify.sharded_preclassified_ranks(
        queries, self.query_labels, query_categories, padded_gallery, self.gallery_labels, gallery_categories,
        self.gallery_valid, mesh=self.mesh, axis_name=sharding.DATA_AXIS, metric=self.config.evals.metric)
    query_categories = np.asarray(query_categories.addressable_data(0))
    ranks = np.asarray(ranks.addressable_data(0))
    # A query with no allowed correct image is ranked G; past every K also where K >= G (tiny galleries).
    ranks = np.where(ranks < len(self.indexes["gallery"]), ranks, np.iinfo(np.int32).max)
    found = {f"preclassify/recall@{key}": value
             for key, value in metrics.recall_from_ranks(ranks, self.config.evals.ks).items()}
    gallery_categories = sharding.host_array(gallery_categories)[:len(self.indexes["gallery"])]
    found["preclassify/gallery_fraction"] = float(np.mean(
        preclassify.searched_fraction(query_categories, gallery_categories)))
    found["preclassify/category_accuracy"] = preclassify.top_k_accuracy(query_categories,
                                                                        self.indexes["query"].categories)
    return found


def recall_table(recalls: Mapping[int, float], name: str) -> str:
  """Recall@K as the In-shop papers print it (percent)."""
  ks = sorted(recalls)
  header = "| Model | " + " | ".join(f"R@{k}" for k in ks) + " |"
  rule = "|---|" + "---|" * len(ks)
  row = f"| {name} | " + " | ".join(f"{100 * recalls[k]:.1f}" for k in ks) + " |"
  return "\n".join([header, rule, row])


def evaluate_run(config: ml_collections.ConfigDict, workdir: str, *, detections: str | None = None) -> dict[str, Any]:
  """Evaluates the latest checkpoint of the run in `workdir` under `config`, without training.

  `config` must be the run's own config but for fields that change only the evaluation: those of
  `jaxret.workdir.HARMLESS_FIELDS` and `EVAL_ONLY_FIELDS`. The use it exists for: a capsule network trained
  with `embedding="label"` (masked with the true category in training, the predicted one at evaluation:
  honest) evaluated again with `embedding="label_leaky_eval"`, the published papers' protocol, which masks
  query and gallery with their true categories; or the other way round.

  Args:
    config: the run's config with the evaluation changed.
    workdir: the run's folder.
    detections: a detections file whose garments are searched too (`df2_detections/top@k`).

  Returns:
    `{"step", "model.embedding", "evals.metric", "recall@K", ..., "embedding_spread"}`, also appended as one
    line to `workdir/eval_only.jsonl` (by process 0).

  Raises:
    embedding.RunError: `workdir` holds no run or no finished checkpoint.
    workdir.WorkdirError: `config` changes what the stored run trained (listing each field).
    run_config.ConfigError: a bad config value.
  """
  workdir = os.path.abspath(os.path.expanduser(workdir))
  stored = embedding.load_run_config(workdir)
  changing, _ = run_dir.config_changes(stored.to_dict(), json.loads(config.to_json()))
  changing = [line for line in changing if line.split(":")[0] not in EVAL_ONLY_FIELDS]
  if changing:
    raise run_dir.WorkdirError(
        f"--eval_only evaluates the run stored in {workdir}, but this config would train another one:\n  "
        + "\n  ".join(changing) + f"\nOnly evaluation fields ({', '.join(EVAL_ONLY_FIELDS)}, evals.*) may "
        f"differ from its {run_dir.CONFIG_FILE}.")
  run_config.validate(config, device_count=jax.device_count(), process_count=jax.process_count())
  mesh = sharding.data_mesh()
  model = embedding.model_from_config(config)
  step, variables = embedding.restore_variables(workdir, config, model, mesh)
  builder = input_pipeline.get_builder(config.input.dataset, config.data_dir)
  recalls, _, spread, more = Evaluator(config, builder, model, mesh, detections=detections)(variables)
  row = {"step": step, "model.embedding": config.model.embedding, "evals.metric": config.evals.metric,
         **({f"evals.{field}": config.evals[field] for field in ("preclassify_top_k", "preclassify_gallery")}
            if config.evals.get("preclassify_top_k", 0) else {}),
         **{f"recall@{k}": v for k, v in recalls.items()}, **more,
         "embedding_spread": spread if math.isfinite(spread) else None}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, EVAL_ONLY_FILE), "a") as f:
      f.write(json.dumps(row, allow_nan=False) + "\n")
  return row
