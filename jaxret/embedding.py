"""A trained model as a function from images to embeddings: build it, restore it, run it over many images.

The trainer's evaluation, the catalogue (`jaxret.index`, `jaxret.search`) and the benchmarks all embed through
this module:

  model = model_from_config(config)
  variables = init_variables(model, config)                  # {"params", "batch_stats"}
  embeddings = embed_step(variables, images, model=model)    # [B, D] float32, inference mode

  embedder = Embedder("/tmp/jaxret_demo")                    # latest checkpoint of a training run
  embeddings, index, source = embedder.embed_split("gallery")
"""

from collections.abc import Iterable, Sequence
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

from jaxret import input_pipeline
from jaxret import metrics
from jaxret import models
from jaxret import sharding

Variables = dict[str, Any]  # {"params": ..., "batch_stats": ...}


class RunError(ValueError):
  """A training run that cannot be embedded with (no config, no checkpoint, a mismatch); says what to do."""


def model_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The keyword arguments of the model: the fields of `config.model` that are set (not None), but `name`."""
  kwargs = {k: v for k, v in config.model.items() if k != "name" and v is not None}
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


def embed_step(variables: Variables, images: jax.Array, category: jax.Array | None = None, *,
               model) -> jax.Array:
  """`[B, H, W, 3]` images to `[B, D]` float32 embeddings, inference mode.

  `category` `[B]` is read only by models that mask with the ground-truth category at evaluation
  (`embedding="label_leaky_eval"`, the capsule papers' protocol); the others ignore it.
  """
  embeddings, _ = model.apply(variables, images, train=False, category=category)
  return embeddings.astype(jnp.float32)


def embed_batches_on_device(embed, variables: Variables, batches: Iterable[dict[str, np.ndarray]],
                            mesh: jax.sharding.Mesh, *, total_batches: int | None = None,
                            desc: str = "embedding") -> jax.Array | None:
  """Embeds the process-local blocks of a stream of global batches; the result stays on the devices.

  Args:
    embed: the jitted `embed_step` (variables, images, category) -> embeddings, split over `mesh`.
    variables: the model's variables.
    batches: process-local blocks `{"image", "category"?, ...}` of global batches (`padded_batches` order).
    mesh: the data mesh.
    total_batches: for the progress bar.
    desc: progress bar label.

  Returns:
    `[N_padded, D]` embeddings in stream order, split over the devices; None for an empty stream.
  """
  data = sharding.data_sharding(mesh)
  outputs = []
  progress = tqdm.tqdm(batches, total=total_batches, desc=desc, unit="batch", leave=False,
                       disable=jax.process_index() != 0 or total_batches == 0)
  for batch in progress:
    images = jax.make_array_from_process_local_data(data, batch["image"])
    category = (jax.make_array_from_process_local_data(data, batch["category"]) if "category" in batch
                else None)
    outputs.append(embed(variables, images, category))
  if not outputs:
    return None
  return _concatenate(data)(outputs)


@functools.lru_cache(maxsize=8)
def _concatenate(data_sharding):
  return jax.jit(jnp.concatenate, out_shardings=data_sharding)


def jit_embed_step(model, mesh: jax.sharding.Mesh):
  """`embed_step` jitted over `mesh`: variables replicated, images and embeddings split over the devices."""
  data = sharding.data_sharding(mesh)
  return jax.jit(functools.partial(embed_step, model=model),
                 in_shardings=(sharding.replicated(mesh), data, data), out_shardings=data)


def _variables_fingerprint(config: ml_collections.ConfigDict, variables: Variables) -> str:
  """16 hex digits of SHA-256 over the model config, the input size, the metric and every weight."""
  digest = hashlib.sha256()
  digest.update(config.model.to_json(sort_keys=True).encode())
  digest.update(f"{config.input.image_size} {config.evals.metric}".encode())
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
    self._embed = jit_embed_step(self.model, self.mesh)
    size = self.config.input.image_size
    sample = jax.ShapeDtypeStruct((self.num_devices, size, size, 3), np.float32)
    self.dim = int(jax.eval_shape(self._embed, self.variables, sample, None).shape[1])

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

  def embed_images(self, images: np.ndarray) -> np.ndarray:
    """`[N, S, S, 3]` preprocessed images to `[N, D]` float32 embeddings.

    Small N is padded to a power of two times the device count (a few compiled shapes, little wasted work).
    """
    images = np.asarray(images, np.float32)
    data = sharding.data_sharding(self.mesh)
    outputs = []
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size]
      padded = self.num_devices
      while padded < len(chunk):
        padded *= 2
      padded = min(padded, self.batch_size)
      padded_chunk = np.concatenate([chunk, np.zeros((padded - len(chunk), *chunk.shape[1:]), np.float32)])
      embeddings = self._embed(self.variables, jax.device_put(padded_chunk, data), None)
      outputs.append(sharding.host_array(embeddings)[:len(chunk)])
    if not outputs:
      return np.zeros((0, self.dim), np.float32)
    return np.concatenate(outputs)

  def embed_split(self, split: str, data_dir: str | None = None):
    """Embeds a split of the run's dataset, as the trainer's evaluation does.

    Returns:
      `(embeddings [N, D], SplitIndex, source)`, in record order.
    """
    builder = input_pipeline.get_builder(self.config.input.dataset, data_dir or self.config.data_dir)
    if split not in builder.info.splits:
      raise RunError(f"Dataset {self.config.input.dataset} has no split {split!r}; use one of "
                     f"{sorted(builder.info.splits)}.")
    source = input_pipeline.read_split(builder, split)
    index = input_pipeline.index_split(source, f"indexing {split}")
    batches = input_pipeline.eval_batches(
        source, index, image_size=self.config.input.image_size, global_batch=self.batch_size,
        process_index=jax.process_index(), process_count=jax.process_count(),
        num_threads=self.config.input.num_threads)
    return self.embed_batches(batches, len(index), f"embedding {split}"), index, source

  def embed_files(self, paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """`([N, D] embeddings, [N] bool readable)` of image files; unreadable files get a zero row."""
    batches = input_pipeline.file_batches(
        paths, image_size=self.config.input.image_size, global_batch=self.batch_size,
        process_index=jax.process_index(), process_count=jax.process_count(),
        num_threads=self.config.input.num_threads)
    valid = []

    def keep_valid(stream):
      for batch in stream:
        valid.append(batch.pop("valid"))
        yield batch

    embeddings = self.embed_batches(keep_valid(batches), len(paths), "embedding images")
    if jax.process_count() > 1:
      valid = [multihost_utils.process_allgather(v, tiled=True) for v in valid]
    readable = np.concatenate(valid)[:len(paths)] if valid else np.zeros((0,), bool)
    return embeddings, readable
