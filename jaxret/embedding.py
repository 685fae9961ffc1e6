"""A trained model as a function from images to embeddings: build it, restore it, run it over many images.

The trainer's evaluation, the catalogue (`jaxret.index`, `jaxret.search`) and the benchmarks all embed through
this module:

  model = model_from_config(config)
  variables = init_variables(model, config)                  # {"params", "batch_stats"}
  embeddings = embed_step(variables, pixels, model=model, image_size=64)   # uint8 [B, C, C, 3] -> [B, D]

  embedder = Embedder("/tmp/jaxret_demo")                    # latest checkpoint of a training run
  embeddings, index, source = embedder.embed_split("gallery")
"""

from collections.abc import Iterable, Iterator, Mapping, Sequence
import functools
import hashlib
import json
import os
from typing import Any

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from tqdm import auto as tqdm

from jaxret import augment
from jaxret import input_pipeline
from jaxret import metrics
from jaxret import models
from jaxret import preclassify
from jaxret import sharding
from jaxret.models import input_conventions

Variables = dict[str, Any]  # {"params": ..., "batch_stats": ...}


class RunError(ValueError):
  """A training run that cannot be embedded with (no config, no checkpoint, a mismatch); says what to do."""


def model_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The keyword arguments of the model: the fields of `config.model` that are set (not None), but `name` and
  `pretrained`."""
  kwargs = {k: v for k, v in config.model.items() if k not in models.NOT_MODEL_FIELDS and v is not None}
  if "dtype" in kwargs:
    kwargs["dtype"] = models.resolve_dtype(kwargs["dtype"])
  return kwargs


def model_from_config(config: ml_collections.ConfigDict):
  """The model `config.model.name` built with `model_options(config)`."""
  return models.get_model(config.model.name, **model_options(config))


def init_variables(model, config: ml_collections.ConfigDict, out_sharding=None) -> Variables:
  """Fresh `{"params", "batch_stats"}` of `model` for `config.input.image_size` inputs, seeded by `config.seed`.

  With `out_sharding` the variables are created directly with that sharding (no copy on one device first).
  """
  size = config.input.image_size

  def init():
    key = jax.random.key(config.seed)
    variables = model.init({"params": key, "dropout": jax.random.fold_in(key, 1)},
                           jnp.zeros((1, size, size, 3), jnp.float32), train=False,
                           category=jnp.zeros((1,), jnp.int32))  # Read only by label_leaky_eval models.
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}

  return jax.jit(init, out_shardings=out_sharding)()


def model_inputs(pixels: jax.Array, boxes: Mapping[str, jax.Array] | None, *, image_size: int,
                 convention: input_conventions.InputConvention, box_margin: float) -> jax.Array:
  """The model's evaluation inputs: each image (or its box, `boxes` `{"bbox", "has_bbox"}`) resized and
  normalised (`augment.eval_images`)."""
  if boxes is None:
    return augment.eval_images(pixels, image_size, convention)
  return augment.eval_images(pixels, image_size, convention, bbox=boxes["bbox"], has_bbox=boxes["has_bbox"],
                             box_margin=box_margin)


def embed_step(variables: Variables, pixels: jax.Array, category: jax.Array | None = None,
               boxes: Mapping[str, jax.Array] | None = None, *, model, image_size: int,
               convention: input_conventions.InputConvention = input_conventions.IMAGENET,
               box_margin: float = 0.0) -> jax.Array:
  """`[B, C, C, 3]` uint8 pixels to `[B, D]` float32 embeddings, inference mode.

  The pixels (a decoded cache's, or `input_pipeline.decode_pixels` of a file) are resized to `image_size` and
  normalised by the model's input `convention` here, on the device (`augment.eval_images`).
  `category` `[B]` is read only by models that mask with the ground-truth category at evaluation
  (`embedding="label_leaky_eval"`, the capsule papers' protocol); the others ignore it.
  `boxes` `{"bbox": [B, 4], "has_bbox": [B]}`, when given, crops each image to its box grown by `box_margin`
  (`config.input.crop_to_box`); without it the whole image is embedded.
  """
  images = model_inputs(pixels, boxes, image_size=image_size, convention=convention, box_margin=box_margin)
  embeddings, _ = model.apply(variables, images, train=False, category=category)
  return embeddings.astype(jnp.float32)


# The predictions of a model's task heads (`models.heads.TaskHeads`) that evaluation scores.
TASK_OUTPUTS = ("category_logits", "attribute_logits")


def predict_step(variables: Variables, pixels: jax.Array, boxes: Mapping[str, jax.Array] | None = None, *, model,
                 image_size: int, convention: input_conventions.InputConvention = input_conventions.IMAGENET,
                 box_margin: float = 0.0) -> dict[str, jax.Array]:
  """`[B, C, C, 3]` uint8 pixels to the model's task predictions (`TASK_OUTPUTS` it has, float32), inference
  mode, on the images `embed_step` embeds."""
  images = model_inputs(pixels, boxes, image_size=image_size, convention=convention, box_margin=box_margin)
  _, aux = model.apply(variables, images, train=False)
  return {key: aux[key].astype(jnp.float32) for key in TASK_OUTPUTS if key in aux}


def has_task_heads(model) -> bool:
  """Whether `model` carries task heads (`config.model.num_categories` / `num_attributes`)."""
  return getattr(model, "tasks", None) is not None


def jit_predict_step(model, mesh: jax.sharding.Mesh, config: ml_collections.ConfigDict):
  """`predict_step` of the config's model, jitted over `mesh` like `jit_embed_step`: call it as
  `predict(variables, pixels, boxes_or_None)`."""
  data = sharding.data_sharding(mesh)
  return jax.jit(functools.partial(predict_step, model=model, image_size=config.input.image_size,
                                   convention=models.INPUT_CONVENTIONS[config.model.name],
                                   box_margin=float(config.input.get("box_margin", 0.0))),
                 in_shardings=(sharding.replicated(mesh), data, data), out_shardings=data)


def embed_batches_on_device(embed, variables: Variables, batches: Iterable[dict[str, np.ndarray]],
                            mesh: jax.sharding.Mesh, *, total_batches: int | None = None,
                            desc: str = "embedding") -> jax.Array | None:
  """Embeds the process-local blocks of a stream of global batches; the result stays on the devices.

  Args:
    embed: the jitted `embed_step` (variables, images, category, boxes) -> embeddings, split over `mesh`.
    variables: the model's variables.
    batches: process-local blocks `{"image", "category"?, ...}` of global batches (`padded_batches` order).
    mesh: the data mesh.
    total_batches: for the progress bar.
    desc: progress bar label.

  Returns:
    `[N_padded, D]` embeddings in stream order, split over the devices; None for an empty stream.
  """
  outputs = list(_embed_stream(embed, variables, batches, mesh, total_batches=total_batches, desc=desc))
  if not outputs:
    return None
  return _concatenate(sharding.data_sharding(mesh))(outputs)


def _embed_stream(embed, variables: Variables, batches: Iterable[dict[str, np.ndarray]],
                  mesh: jax.sharding.Mesh, *, total_batches: int | None, desc: str) -> Iterator[jax.Array]:
  """The `[B, D]` embeddings of each global batch of a stream, split over the devices (dispatched, not awaited)."""
  data = sharding.data_sharding(mesh)
  progress = tqdm.tqdm(batches, total=total_batches, desc=desc, unit="batch", leave=False,
                       disable=jax.process_index() != 0 or total_batches == 0)
  for batch in progress:
    images = jax.make_array_from_process_local_data(data, batch["image"])
    category = (jax.make_array_from_process_local_data(data, batch["category"]) if "category" in batch
                else None)
    boxes = ({key: jax.make_array_from_process_local_data(data, batch[key]) for key in input_pipeline.BOX_FEATURES}
             if "bbox" in batch else None)
    yield embed(variables, images, category, boxes)


def process_rows(embeddings: jax.Array) -> np.ndarray:
  """This process's rows of a `[B, D]` array split over the data axis: `[B_local, D]`, in local-block order.

  `jax.make_array_from_process_local_data` puts a process's block on its devices in order, so these are the
  embeddings of the images this process fed, without any transfer between processes.
  """
  shards = sorted(embeddings.addressable_shards, key=lambda shard: shard.index[0].start or 0)
  return np.concatenate([np.asarray(shard.data) for shard in shards])


@functools.lru_cache(maxsize=8)
def _concatenate(data_sharding):
  return jax.jit(jnp.concatenate, out_shardings=data_sharding)


def jit_embed_step(model, mesh: jax.sharding.Mesh, config: ml_collections.ConfigDict):
  """`embed_step` of the config's model, input size, input convention (`models.INPUT_CONVENTIONS`) and box
  margin, jitted over `mesh`: variables replicated; pixels, category, boxes and embeddings split over the
  devices. Call it as `embed(variables, pixels, category_or_None, boxes_or_None)`."""
  data = sharding.data_sharding(mesh)
  return jax.jit(functools.partial(embed_step, model=model, image_size=config.input.image_size,
                                   convention=models.INPUT_CONVENTIONS[config.model.name],
                                   box_margin=float(config.input.get("box_margin", 0.0))),
                 in_shardings=(sharding.replicated(mesh), data, data, data), out_shardings=data)


def category_scores_step(variables: Variables, pixels: jax.Array, category: jax.Array | None = None,
                         boxes: Mapping[str, jax.Array] | None = None, *, model, image_size: int,
                         convention: input_conventions.InputConvention = input_conventions.IMAGENET,
                         box_margin: float = 0.0) -> jax.Array:
  """`[B, C, C, 3]` uint8 pixels to `[B, num_categories]` float32 category scores, inference mode.

  The same inputs as `embed_step`; the scores are `preclassify.category_scores` of the model's aux outputs (a
  category head's logits, else a capsule network's class-capsule lengths), for pre-classification search.
  Raises `preclassify.NoCategoryScoresError` (when traced) for a model that predicts no category.
  """
  images = model_inputs(pixels, boxes, image_size=image_size, convention=convention, box_margin=box_margin)
  _, aux = model.apply(variables, images, train=False, category=category)
  return preclassify.category_scores(aux)


def jit_category_scores_step(model, mesh: jax.sharding.Mesh, config: ml_collections.ConfigDict):
  """`category_scores_step` jitted over `mesh` as `jit_embed_step` jits `embed_step`; call it as
  `scores(variables, pixels, category_or_None, boxes_or_None)` (e.g. through `embed_batches_on_device`)."""
  data = sharding.data_sharding(mesh)
  return jax.jit(functools.partial(category_scores_step, model=model, image_size=config.input.image_size,
                                   convention=models.INPUT_CONVENTIONS[config.model.name],
                                   box_margin=float(config.input.get("box_margin", 0.0))),
                 in_shardings=(sharding.replicated(mesh), data, data, data), out_shardings=data)


def num_category_scores(model, config: ml_collections.ConfigDict) -> int:
  """How many categories `category_scores_step` scores for the config's model (traced only, nothing run).

  Raises:
    preclassify.NoCategoryScoresError: the model predicts no category (the message says what to configure).
  """
  size = config.input.image_size
  abstract = jax.eval_shape(lambda: init_variables(model, config))
  scores = jax.eval_shape(functools.partial(category_scores_step, model=model, image_size=size),
                          abstract, jax.ShapeDtypeStruct((1, size, size, 3), np.uint8))
  return int(scores.shape[1])


def _variables_fingerprint(config: ml_collections.ConfigDict, variables: Variables) -> str:
  """16 hex digits of SHA-256 over the model config, the input size, the metric and every weight."""
  digest = hashlib.sha256()
  digest.update(config.model.to_json(sort_keys=True).encode())
  digest.update(f"{config.input.image_size} {config.evals.metric}".encode())
  if input_pipeline.cache_size(config) != config.input.image_size:  # Resized twice: other embeddings.
    digest.update(f" decoded at {input_pipeline.cache_size(config)}".encode())
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    value = sharding.host_array(leaf)
    digest.update(f"{jax.tree_util.keystr(path)} {value.dtype} {value.shape}".encode())
    digest.update(np.ascontiguousarray(value).tobytes())
  return digest.hexdigest()[:16]


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The training config stored in a run's `config.json`."""
  config_path = os.path.join(workdir, "config.json")
  if not os.path.isfile(config_path):
    raise RunError(f"{workdir} is not a training run (no config.json). {_train_first(workdir)}")
  with open(config_path) as f:
    return ml_collections.ConfigDict(json.load(f))


def _train_first(workdir: str) -> str:
  return f"Train a model first, e.g.\n  python -m jaxret.train --config configs/demo.py --workdir {workdir}"


def latest_checkpoint(workdir: str) -> tuple[ocp.CheckpointManager, int]:
  """The checkpoint manager of a run and the step of its latest finished checkpoint; RunError if none."""
  checkpoint_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(checkpoint_dir):
    raise RunError(f"{workdir} has no checkpoints/ folder. {_train_first(workdir)}")
  manager = ocp.CheckpointManager(checkpoint_dir, options=ocp.CheckpointManagerOptions(create=False))
  step = manager.latest_step()
  if step is None:
    raise RunError(f"{checkpoint_dir} holds no finished checkpoint. {_train_first(workdir)}")
  return manager, int(step)


def restore_variables(workdir: str, config: ml_collections.ConfigDict, model,
                      mesh: jax.sharding.Mesh) -> tuple[int, Variables]:
  """The model's variables from the latest checkpoint of a run, replicated over `mesh`.

  Only `params` and `batch_stats` are read (a partial restore): the optimizer state and the loss's own
  parameters are not needed to embed.

  Returns:
    `(step, {"params", "batch_stats"})`.
  """
  manager, step = latest_checkpoint(workdir)
  checkpoint_dir = os.path.join(workdir, "checkpoints")
  replicated = sharding.replicated(mesh)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          jax.eval_shape(lambda: init_variables(model, config)))
  try:
    variables = manager.restore(step, args=ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True))
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise RunError(f"Could not restore the checkpoint of step {step} in {checkpoint_dir} into the model of "
                   f"its config.json ({config.model.name}): {e}") from e
  return step, {"params": variables["params"], "batch_stats": variables["batch_stats"]}


class Embedder:
  """The latest checkpoint of a training run as images -> embeddings, jitted over a Mesh of all devices.

  Attributes:
    workdir: the run's folder (absolute).
    config: its training config (`config.json`).
    step: the restored checkpoint's step.
    metric: the run's evaluation metric (`config.evals.metric`).
    dim: embedding size D.
    fingerprint: identifies the model config, input size, metric and weights.
    input_size: side C of the uint8 pixels it embeds (`input_pipeline.cache_size` of the run's config).
  """

  def __init__(self, workdir: str):
    workdir = os.path.abspath(os.path.expanduser(workdir))
    self.config = load_run_config(workdir)
    latest_checkpoint(workdir)  # Before reading the config further: "train first" is the likely problem.
    self.workdir = workdir
    self.metric = self.config.evals.metric
    if self.metric not in metrics.METRICS:
      raise RunError(f"config.evals.metric={self.metric!r} in {workdir}/config.json; use one of "
                     f"{list(metrics.METRICS)}.")
    self.model = model_from_config(self.config)
    self.mesh = sharding.data_mesh()
    self.step, self.variables = restore_variables(workdir, self.config, self.model, self.mesh)
    self.fingerprint = _variables_fingerprint(self.config, self.variables)
    self._embed = jit_embed_step(self.model, self.mesh, self.config)
    self._scores_step = None  # `_category_scores_step`, made on first use.
    self.input_size = input_pipeline.cache_size(self.config)
    size = self.input_size
    sample = jax.ShapeDtypeStruct((self.num_devices, size, size, 3), np.uint8)
    self.dim = int(jax.eval_shape(self._embed, self.variables, sample, None, None).shape[1])

  @property
  def num_devices(self) -> int:
    return self.mesh.devices.size

  @property
  def batch_size(self) -> int:
    """Images per embedding step: `config.evals.batch_size` (as in evaluation), a multiple of the devices."""
    return -(-self.config.evals.batch_size // self.num_devices) * self.num_devices

  def embed_batches(self, batches: Iterable[dict[str, np.ndarray]], total: int, desc: str) -> np.ndarray:
    """`[total, D]` embeddings (host, every process) of process-local blocks of a padded global stream."""
    embeddings = embed_batches_on_device(self._embed, self.variables, batches, self.mesh,
                                         total_batches=-(-total // self.batch_size), desc=desc)
    if embeddings is None:
      return np.zeros((0, self.dim), np.float32)
    return sharding.host_array(embeddings)[:total]

  def embed_batches_local(self, batches: Iterable[dict[str, np.ndarray]], total: int,
                          desc: str) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """The rows this process embeds of a padded global stream of `total` items, nothing gathered.

    Every process feeds its block of each global batch (`input_pipeline.padded_batches`: process p holds
    items `b * G + p * G_local + j` of batch b) and keeps the embeddings of exactly those items, so the
    processes' rows are disjoint and together cover `0 .. total - 1` once.

    Returns:
      `(positions [n] int64, embeddings [n, D] float32, fields)`: the items' indices in the stream, their
      embeddings, and the other fields of the local batches (e.g. `valid`) at those positions; padding dropped.
    """
    local_batch = self.batch_size // jax.process_count()
    batch_fields = []

    def keep_fields(stream):
      for batch in stream:
        batch_fields.append({k: v for k, v in batch.items() if k != "image"})
        yield batch

    rows, pending = [], None
    stream = _embed_stream(self._embed, self.variables, keep_fields(batches), self.mesh,
                           total_batches=-(-total // self.batch_size), desc=desc)
    for embeddings in stream:
      if pending is not None:
        rows.append(process_rows(pending))  # Copies batch b - 1 to the host while batch b runs.
      pending = embeddings
    if pending is not None:
      rows.append(process_rows(pending))
    positions = np.concatenate([
        batch * self.batch_size + jax.process_index() * local_batch + np.arange(local_batch)
        for batch in range(len(rows))]) if rows else np.zeros((0,), np.int64)
    embeddings = np.concatenate(rows) if rows else np.zeros((0, self.dim), np.float32)
    real = positions < total
    fields = {k: np.concatenate([f[k] for f in batch_fields])[real] for k in (batch_fields[:1] or [{}])[0]}
    return positions[real], embeddings[real], fields

  def _apply_to_images(self, step, images: np.ndarray, width: int) -> np.ndarray:
    """`step(variables, pixels, None, None)` (an embedding or scores step) on `[N, C, C, 3]` uint8 pixels, in
    chunks of `batch_size`; `[N, width]` float32 on the host.

    Small N is padded to a power of two times the device count (a few compiled shapes, little wasted work).
    """
    images = np.asarray(images)
    if len(images) == 0:
      return np.zeros((0, width), np.float32)
    if images.ndim != 4 or images.shape[1:] != (self.input_size, self.input_size, 3) or images.dtype != np.uint8:
      raise ValueError(f"Expected [N, {self.input_size}, {self.input_size}, 3] uint8 pixels (decode_pixels at "
                       f"the run's cache size), got {images.dtype} {images.shape}.")
    data = sharding.data_sharding(self.mesh)
    outputs = []
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size]
      padded = self.num_devices
      while padded < len(chunk):
        padded *= 2
      padded = min(padded, self.batch_size)
      padded_chunk = np.concatenate([chunk, np.zeros((padded - len(chunk), *chunk.shape[1:]), np.uint8)])
      outputs.append(sharding.host_array(step(self.variables, jax.device_put(padded_chunk, data), None,
                                              None))[:len(chunk)])
    return np.concatenate(outputs)

  def embed_images(self, images: np.ndarray) -> np.ndarray:
    """`[N, C, C, 3]` uint8 pixels (C = `input_size`, from `input_pipeline.decode_pixels`) to `[N, D]` float32."""
    return self._apply_to_images(self._embed, images, self.dim)

  def category_scores_images(self, images: np.ndarray) -> np.ndarray:
    """`[N, C, C, 3]` uint8 pixels (as for `embed_images`) to `[N, num_categories]` float32 category scores.

    Raises:
      preclassify.NoCategoryScoresError: the run's model predicts no category.
    """
    scores_step = self._category_scores_step()
    return self._apply_to_images(scores_step, images, num_category_scores(self.model, self.config))

  def category_scores_split(self, split: str, data_dir: str | None = None) -> np.ndarray:
    """`[N, num_categories]` category scores of a split of the run's dataset, in record order (every process)."""
    batches, index, _ = self._split_batches(split, data_dir)
    scores = embed_batches_on_device(self._category_scores_step(), self.variables, batches, self.mesh,
                                     total_batches=-(-len(index) // self.batch_size),
                                     desc=f"classifying {split}")
    if scores is None:
      return np.zeros((0, num_category_scores(self.model, self.config)), np.float32)
    return sharding.host_array(scores)[:len(index)]

  def _category_scores_step(self):
    """The jitted `category_scores_step` of the run's model, made on first use (only pre-classification needs
    it); a `preclassify.NoCategoryScoresError` here names what the model lacks."""
    if self._scores_step is None:
      num_category_scores(self.model, self.config)
      self._scores_step = jit_category_scores_step(self.model, self.mesh, self.config)
    return self._scores_step

  def embed_split(self, split: str, data_dir: str | None = None):
    """Embeds a split of the run's dataset, as the trainer's evaluation does.

    Returns:
      `(embeddings [N, D], SplitIndex, source)`, in record order, on every process.
    """
    batches, index, source = self._split_batches(split, data_dir)
    return self.embed_batches(batches, len(index), f"embedding {split}"), index, source

  def embed_split_local(self, split: str, data_dir: str | None = None):
    """This process's share of a split (see `embed_batches_local`), nothing gathered between processes.

    Returns:
      `(records [n] int64, embeddings [n, D], SplitIndex)`: the record indices this process embedded.
    """
    batches, index, _ = self._split_batches(split, data_dir)
    records, embeddings, _ = self.embed_batches_local(batches, len(index), f"embedding {split}")
    return records, embeddings, index

  def _split_batches(self, split: str, data_dir: str | None):
    builder = input_pipeline.get_builder(self.config.input.dataset, data_dir or self.config.data_dir)
    if split not in builder.info.splits:
      raise RunError(f"Dataset {self.config.input.dataset} has no split {split!r}; use one of "
                     f"{sorted(builder.info.splits)}.")
    source = input_pipeline.read_split(builder, split)
    decoded = input_pipeline.open_decoded_split(self.config, builder, split)
    batches = input_pipeline.eval_batches(decoded, global_batch=self.batch_size,
                                          process_index=jax.process_index(), process_count=jax.process_count(),
                                          features=input_pipeline.box_features(self.config))
    return batches, decoded.index, source

  def embed_files(self, paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """`([N, D] embeddings, [N] bool readable)` of image files; unreadable files get a zero row."""
    valid = []

    def keep_valid(stream):
      for batch in stream:
        valid.append(batch.pop("valid"))
        yield batch

    embeddings = self.embed_batches(keep_valid(self._file_batches(paths)), len(paths), "embedding images")
    if jax.process_count() > 1:
      valid = [multihost_utils.process_allgather(v, tiled=True) for v in valid]
    readable = np.concatenate(valid)[:len(paths)] if valid else np.zeros((0,), bool)
    return embeddings, readable

  def embed_files_local(self, paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This process's share of image files (see `embed_batches_local`), nothing gathered between processes.

    Returns:
      `(positions [n] int64, embeddings [n, D], readable [n] bool)`: indices into `paths`; unreadable
      files have a zero row and `readable` False.
    """
    positions, embeddings, fields = self.embed_batches_local(self._file_batches(paths), len(paths),
                                                             "embedding images")
    return positions, embeddings, fields.get("valid", np.zeros((0,), bool)).astype(bool)

  def _file_batches(self, paths: Sequence[str]):
    return input_pipeline.file_batches(
        paths, size=self.input_size, global_batch=self.batch_size,
        process_index=jax.process_index(), process_count=jax.process_count(),
        num_threads=self.config.input.num_threads)
