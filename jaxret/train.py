"""Trains a retrieval embedder and evaluates Recall@K: `python -m jaxret.train --config CONFIG --workdir DIR`.

One pure `train_step(state, batch) -> (state, metrics)`, jitted once over a data-parallel `Mesh` of all
devices; the same code runs on one CPU, on fake CPU devices, on a GPU and on a TPU slice. Rerunning the same
command on the same workdir resumes from the latest checkpoint and gives the result of an uninterrupted run.

Outputs in the workdir: `metrics.jsonl` (one JSON object per line: `step`, `loss`, ...; evaluation lines have
`recall@K`), `checkpoints/`, `config.json`, `retrievals.png` and `curves.png`.
"""

from collections.abc import Callable, Mapping
import functools
import json
import os
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import flax
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from ml_collections import config_flags
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm import auto as tqdm

from jaxret import input_pipeline
from jaxret import losses
from jaxret import metrics
from jaxret import models
from jaxret import pictures
from jaxret import run_config

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file, e.g. configs/demo.py.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and pictures.")
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0 for a multi-process run (jax.distributed); without it, "
    "clusters that JAX detects (Cloud TPU VM slices, SLURM, Open MPI, Kubernetes) are initialised automatically.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout_seconds", 30, "A multi-process run stops with an error when a process has not been heard "
    "from for this long (so that one dead process does not leave the others hanging).")


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, as one pytree (checkpointed as a whole)."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam(W) with linear warm-up and cosine decay, gradient clipping by global norm."""
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.optim.learning_rate, warmup_steps=config.warmup_steps,
      decay_steps=max(config.total_steps, config.warmup_steps + 1), end_value=0.0)
  parts = []
  if config.optim.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.optim.grad_clip_norm))
  parts.append(optax.adamw(schedule, weight_decay=config.optim.weight_decay))
  return optax.chain(*parts)


def make_loss_fn(config: ml_collections.ConfigDict) -> Callable[[jax.Array, Mapping[str, jax.Array]], jax.Array]:
  """`loss(embeddings [B, D], batch) -> scalar`: the loss `config.loss.name` with its config section."""
  loss = losses.get_loss(config.loss.name)
  options = loss.options_from(config.loss[config.loss.name])
  return lambda emb, batch: loss({}, {"embedding": emb}, batch, options)[0]


def model_from_config(config: ml_collections.ConfigDict):
  """The model `config.model.name` with the fields of `config.model` that are set (not None)."""
  kwargs = {k: v for k, v in config.model.items() if k != "name" and v is not None}
  if "dtype" in kwargs:
    kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
  return models.get_model(config.model.name, **kwargs)


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *, model, tx, loss_fn, seed: int):
  """One optimisation step on a global P x K batch. Pure: the dropout key is derived from the step."""
  dropout_key = jax.random.fold_in(jax.random.key(seed), state.step)

  def loss_of(params):
    (embeddings, _), updates = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
        category=batch["category"], mutable=["batch_stats"], rngs={"dropout": dropout_key})
    return loss_fn(embeddings, batch), updates

  (loss, updates), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
  param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, param_updates),
                            batch_stats=updates["batch_stats"], opt_state=opt_state)
  step_metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
  return new_state, step_metrics


def embed_step(state: TrainState, images: jax.Array, *, model) -> jax.Array:
  """`[B, H, W, 3]` images to `[B, D]` float32 embeddings, inference mode."""
  embeddings, _ = model.apply({"params": state.params, "batch_stats": state.batch_stats}, images, train=False)
  return embeddings.astype(jnp.float32)


def create_state(config, model, tx, sample_images, state_sharding=None) -> TrainState:
  """Initialises parameters and optimizer state (directly with `state_sharding` when jitted with it)."""

  def init(images):
    key = jax.random.key(config.seed)
    variables = model.init({"params": key, "dropout": jax.random.fold_in(key, 1)}, images, train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))

  return jax.jit(init, out_shardings=state_sharding)(sample_images)


class MetricsLog:
  """`metrics.jsonl`, one JSON object per line; on resume, lines after the restored step are dropped."""

  def __init__(self, path: str, resume_step: int, enabled: bool):
    self.path = path
    self.enabled = enabled
    self.rows = []
    if os.path.exists(path):
      with open(path) as f:
        self.rows = [row for row in map(json.loads, filter(str.strip, f)) if row["step"] <= resume_step]
      if enabled:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
          f.writelines(json.dumps(row) + "\n" for row in self.rows)
        os.replace(tmp, path)

  def write(self, row: dict) -> None:
    row = {k: (float(v) if k != "step" else int(v)) for k, v in row.items()}
    self.rows.append(row)
    if self.enabled:
      with open(self.path, "a") as f:
        f.write(json.dumps(row) + "\n")


def host_array(x: jax.Array) -> np.ndarray:
  """A (possibly multi-process) sharded array as one NumPy array on every process."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class Evaluator:
  """Embeds query and gallery splits across all devices and computes Recall@K with the gallery sharded."""

  def __init__(self, config, builder, model, mesh: jax.sharding.Mesh):
    self.config = config
    self.mesh = mesh
    self.sources = {split: input_pipeline.read_split(builder, split) for split in ("query", "gallery")}
    self.indexes = {split: input_pipeline.index_split(src, f"indexing {split}")
                    for split, src in self.sources.items()}
    self.data_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    self.replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    self._embed = jax.jit(functools.partial(embed_step, model=model),
                          in_shardings=(self.replicated, self.data_sharding), out_shardings=self.data_sharding)
    self._concatenate = jax.jit(jnp.concatenate, out_shardings=self.data_sharding)
    # Everything that does not change between evaluations is made once: the query slice (compiled once)
    # and the labels and padding mask of the padded gallery, already on the devices.
    num_queries = len(self.indexes["query"])
    self._real_queries = jax.jit(lambda x: x[:num_queries], out_shardings=self.replicated)
    self.query_labels = self._global(self.indexes["query"].item_ids.astype(np.int32), self.replicated)
    num_gallery = len(self.indexes["gallery"])
    padded_gallery = -(-num_gallery // config.evals.batch_size) * config.evals.batch_size
    gallery_labels = np.full(padded_gallery, -1, np.int32)
    gallery_labels[:num_gallery] = self.indexes["gallery"].item_ids
    self.gallery_labels = self._global(gallery_labels, self.data_sharding)
    self.gallery_valid = self._global(np.arange(padded_gallery) < num_gallery, self.data_sharding)

  def embed_split_on_device(self, state, split: str) -> jax.Array:
    """`[N_padded, D]` embeddings of a split in record order, sharded over the devices; rows >= N are padding."""
    batches = input_pipeline.eval_batches(
        self.sources[split], self.indexes[split], image_size=self.config.input.image_size,
        global_batch=self.config.evals.batch_size, process_index=jax.process_index(),
        process_count=jax.process_count(), num_threads=self.config.input.num_threads)
    outputs = [self._embed(state, jax.make_array_from_process_local_data(self.data_sharding, batch["image"]))
               for batch in batches]
    return self._concatenate(outputs)

  def embed_split(self, state, split: str) -> np.ndarray:
    """`[N, D]` embeddings of a whole split, in record order, on the host (every process)."""
    return host_array(self.embed_split_on_device(state, split))[:len(self.indexes[split])]

  def _global(self, values: np.ndarray, sharding) -> jax.Array:
    """A host array that every process holds in full, as a global array with `sharding`."""
    return jax.make_array_from_callback(values.shape, sharding, lambda index: values[index])

  def __call__(self, state) -> tuple[dict[int, float], dict[str, jax.Array]]:
    """Recall@K of the state, and the padded query and gallery embeddings (device arrays)."""
    embeddings = {split: self.embed_split_on_device(state, split) for split in ("query", "gallery")}
    ranks = metrics.sharded_query_ranks(
        self._real_queries(embeddings["query"]), self.query_labels, embeddings["gallery"],
        self.gallery_labels, self.gallery_valid, mesh=self.mesh, metric=self.config.evals.metric)
    ranks = np.asarray(ranks.addressable_data(0))
    recalls = {int(k): float(np.mean(ranks < int(k))) for k in self.config.evals.ks}
    return recalls, embeddings


def recall_table(recalls: Mapping[int, float], name: str) -> str:
  """Recall@K as the In-shop papers print it (percent)."""
  ks = sorted(recalls)
  header = "| Model | " + " | ".join(f"R@{k}" for k in ks) + " |"
  rule = "|---|" + "---|" * len(ks)
  row = f"| {name} | " + " | ".join(f"{100 * recalls[k]:.1f}" for k in ks) + " |"
  return "\n".join([header, rule, row])


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or resumes) the configured model in `workdir` and evaluates it.

  Returns:
    The last evaluation: `{"recall@K": value, ..., "loss": last training loss}`.
  """
  device_count = jax.device_count()
  run_config.validate(config, device_count=device_count, process_count=jax.process_count(),
                      model_names=models.MODEL_NAMES, loss_names=tuple(losses.LOSSES))
  is_chief = jax.process_index() == 0
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  if is_chief:
    path = os.path.join(workdir, "config.json")
    with open(path + ".tmp", "w") as f:
      f.write(config.to_json(indent=2))
    os.replace(path + ".tmp", path)

  # Data. The chief generates a synthetic dataset on first use while the others wait; a process that still
  # does not see it then (a data dir on a disk of its own host) generates its own copy.
  builder = input_pipeline.get_builder(config.input.dataset, config.data_dir, prepare=is_chief)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("dataset prepared")
    builder = input_pipeline.get_builder(config.input.dataset, config.data_dir)
  train_source = input_pipeline.read_split(builder, "train")
  train_index = input_pipeline.index_split(train_source, "indexing train")
  images_per_product = config.input.images_per_product
  sampler = input_pipeline.PKSampler(train_index.item_ids, config.input.batch_size // images_per_product,
                                     images_per_product, config.seed)

  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  data_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  model = model_from_config(config)
  tx = make_optimizer(config)
  size = config.input.image_size
  state = create_state(config, model, tx, jnp.zeros((1, size, size, 3), jnp.float32), replicated)
  if is_chief:
    print(f"Model {config.model.name}: {sum(x.size for x in jax.tree.leaves(state.params)):,} parameters; "
          f"{device_count} device(s), global batch {config.input.batch_size}.")

  checkpoints = ocp.CheckpointManager(
      os.path.join(workdir, "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True))
  start_step = 0
  if checkpoints.latest_step() is not None:
    start_step = checkpoints.latest_step()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    state = checkpoints.restore(start_step, args=ocp.args.StandardRestore(abstract))
    if is_chief:
      print(f"Resumed from the checkpoint of step {start_step} in {workdir}.")
  log = MetricsLog(os.path.join(workdir, "metrics.jsonl"), start_step, enabled=is_chief)

  step_fn = jax.jit(
      functools.partial(train_step, model=model, tx=tx, loss_fn=make_loss_fn(config), seed=config.seed),
      in_shardings=(replicated, data_sharding), out_shardings=(replicated, replicated), donate_argnums=0)
  evaluator = Evaluator(config, builder, model, mesh)

  def evaluate(step: int) -> tuple[dict[int, float], dict[str, jax.Array]]:
    recalls, embeddings = evaluator(state)
    log.write({"step": step, **{f"recall@{k}": v for k, v in recalls.items()}})
    if is_chief:
      tqdm.tqdm.write(f"step {step}: " + ", ".join(f"R@{k} {100 * v:.1f}" for k, v in recalls.items()))
    return recalls, embeddings

  if start_step == 0:
    recalls, _ = evaluate(0)
    if is_chief:
      print(f"Untrained network: R@1 = {100 * recalls[min(recalls)]:.1f}%")

  batches = input_pipeline.train_batches(
      train_source, sampler, image_size=size, first_step=start_step, num_steps=config.total_steps,
      process_index=jax.process_index(), process_count=jax.process_count(),
      num_threads=config.input.num_threads,
      augment={"crop_scale": tuple(config.input.crop_scale), "color_jitter": config.input.color_jitter})
  progress = tqdm.tqdm(total=config.total_steps, initial=start_step, desc="train", unit="step",
                       disable=not is_chief, dynamic_ncols=True)
  recalls, embeddings = None, None
  window_start, window_steps = time.perf_counter(), 0
  for step in range(start_step + 1, config.total_steps + 1):
    local = next(batches)
    batch = {k: jax.make_array_from_process_local_data(data_sharding, v) for k, v in local.items()}
    state, step_metrics = step_fn(state, batch)
    window_steps += 1
    progress.update(1)
    if step == start_step + 1:  # Leave compilation out of the images/s of the first window.
      jax.block_until_ready(step_metrics)
      window_start, window_steps = time.perf_counter(), 0
    if step % config.log_every == 0 or step == config.total_steps:
      host_metrics = jax.device_get(step_metrics)  # The only sync with the device between evaluations.
      elapsed = time.perf_counter() - window_start
      images_per_sec = window_steps * config.input.batch_size / max(elapsed, 1e-9)
      last_loss = float(host_metrics["loss"])
      if not np.isfinite(last_loss):
        raise FloatingPointError(f"The loss became {last_loss} at step {step}; lower config.optim.learning_rate "
                                 f"or check the data. The last checkpoint is kept in {workdir}.")
      log.write({"step": step, **host_metrics, "images_per_sec": images_per_sec})
      progress.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{images_per_sec:.0f}")
      window_start, window_steps = time.perf_counter(), 0
    if step % config.checkpoint_every == 0 or step == config.total_steps:
      checkpoints.save(step, args=ocp.args.StandardSave(state))
    if step % config.eval_every == 0 or step == config.total_steps:
      recalls, embeddings = evaluate(step)
      window_start, window_steps = time.perf_counter(), 0
  progress.close()
  checkpoints.wait_until_finished()

  if recalls is None:  # Resumed a finished run: its evaluation is logged already; recompute it for the table.
    recalls, embeddings = evaluator(state)
  if is_chief:
    print(recall_table(recalls, f"{config.model.name} ({config.loss.name}, step {config.total_steps})"))
    pictures.plot_curves(log.rows, os.path.join(workdir, "curves.png"))
  host_embeddings = {split: host_array(x)[:len(evaluator.indexes[split])] for split, x in embeddings.items()}
  if is_chief:
    pictures.plot_retrievals(
        host_embeddings["query"], host_embeddings["gallery"], evaluator.indexes["query"],
        evaluator.indexes["gallery"],
        evaluator.sources["query"], evaluator.sources["gallery"], os.path.join(workdir, "retrievals.png"),
        num_queries=config.evals.num_pictures, metric=config.evals.metric)
  result = {f"recall@{k}": v for k, v in recalls.items()}
  loss_rows = [row for row in log.rows if "loss" in row]
  if loss_rows:
    result["loss"] = loss_rows[-1]["loss"]
  return result


def _cluster_detected() -> bool:
  """Whether JAX recognises a multi-process environment (TPU VM slice, SLURM, Open MPI, Kubernetes)."""
  try:
    from jax._src import clusters  # pylint: disable=g-import-not-at-top
    return any(not env.opt_in_only_method and env.is_env_present()
               for env in clusters.ClusterEnv._cluster_types)  # pylint: disable=protected-access
  except Exception:  # pylint: disable=broad-except
    return False  # A JAX without this detection: explicit flags still work.


def initialize_distributed() -> None:
  """Starts JAX's multi-controller runtime from the flags, or from a detected cluster; else does nothing."""
  explicit = (_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if any(v is not None for v in explicit) and any(v is None for v in explicit):
    raise app.UsageError("--coordinator_address, --num_processes and --process_id go together; e.g.\n"
                         "  --coordinator_address 127.0.0.1:12355 --num_processes 2 --process_id 0")
  if explicit[0] is None and not _cluster_detected():
    return
  # CPU processes exchange data over loopback or TCP with gloo; GPUs and TPUs use their own collectives.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(*explicit, heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax and TFDS log every step at INFO; --verbosity=0 shows it.
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError("Both --config and --workdir are required, e.g.\n"
                         "  python -m jaxret.train --config configs/demo.py --workdir /tmp/jaxret_demo")
  initialize_distributed()
  try:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (run_config.ConfigError, input_pipeline.DatasetNotPreparedError) as e:
    # Problems a user can fix (bad config, missing dataset): the message, not a traceback.
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  app.run(main)
