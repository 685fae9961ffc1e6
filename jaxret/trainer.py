"""Training: one pytree of state, one pure jitted step, and the loop that trains, checkpoints and evaluates.

  state = create_state(config, model, tx, objective, context, replicated)
  step_fn = make_train_step(config, mesh, model, tx, objective)   # jitted once, state donated
  state, metrics = step_fn(state, batch)

`train_and_evaluate(config, workdir)` is the whole run (`python -m jaxret.train` calls it). One pure
`train_step(state, batch) -> (state, metrics)`, jitted once over a data-parallel `Mesh` of all devices; the
same code runs on one CPU, on fake CPU devices, on a GPU and on a TPU slice. Rerunning on the same workdir
resumes from the latest checkpoint and gives the result of an uninterrupted run.

Outputs in the workdir: `metrics.jsonl` (one JSON object per line: `step`, `loss`, ..., `images_per_sec` and
`host_cpu_ms_per_image` (the host's CPU time outside XLA's computations, per image); evaluation lines have
`recall@K`), `checkpoints/`, `config.json`, `retrievals.png` and `curves.png`. The training images reach the
step as uint8 pixels from the split's decoded cache (`config.input.cache`: device, host or stream; see
`jaxret.input_pipeline`) and are augmented inside the step (`jaxret.augment`).
"""

from collections.abc import Mapping
import functools
import json
import os
import time
from typing import Any

import flax
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm import auto as tqdm

from jaxret import augment
from jaxret import embedding
from jaxret import evaluation
from jaxret import input_pipeline
from jaxret import losses
from jaxret import pictures
from jaxret import run_config
from jaxret import samplers
from jaxret import sharding


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, as one pytree (checkpointed as a whole).

  Attributes:
    step: the number of optimisation steps taken.
    params: the model's parameters.
    batch_stats: the model's BatchNorm statistics.
    loss_params: the loss's own parameters, `{term name: pytree}` (e.g. Proxy-Anchor's proxies; `{}` terms
      for losses without any).
    opt_state: the optimizer's state over `{"model": params, "loss": loss_params}`.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  loss_params: Any
  opt_state: Any

  @property
  def variables(self) -> embedding.Variables:
    """The model's variables, as `model.apply` and `embedding` take them."""
    return {"params": self.params, "batch_stats": self.batch_stats}


def make_optimizer(config: ml_collections.ConfigDict,
                   objective: losses.objective.Objective) -> optax.GradientTransformation:
  """Adam(W) with linear warm-up and cosine decay, gradient clipping by global norm.

  It updates `{"model": params, "loss": loss_params}`; the parameters of each loss term learn at the model's
  rate times that term's `lr_multiplier` (e.g. x100 for Proxy-Anchor's proxies), through
  `optax.multi_transform`.
  """
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.optim.learning_rate, warmup_steps=config.warmup_steps,
      decay_steps=max(config.total_steps, config.warmup_steps + 1), end_value=0.0)

  def adamw(multiplier: float) -> optax.GradientTransformation:
    rate = schedule if multiplier == 1.0 else (lambda step: multiplier * schedule(step))
    return optax.adamw(rate, weight_decay=config.optim.weight_decay)

  multipliers = objective.lr_multipliers()
  transforms = {"model": adamw(1.0), **{f"loss/{name}": adamw(m) for name, m in multipliers.items()}}

  def labels(tree):
    return {"model": jax.tree.map(lambda _: "model", tree["model"]),
            "loss": {name: jax.tree.map(lambda _, n=name: f"loss/{n}", sub) for name, sub in tree["loss"].items()}}

  parts = []
  if config.optim.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.optim.grad_clip_norm))
  parts.append(optax.multi_transform(transforms, labels))
  return optax.chain(*parts)


def create_state(config: ml_collections.ConfigDict, model, tx: optax.GradientTransformation,
                 objective: losses.objective.Objective, context: losses.LossContext,
                 state_sharding=None) -> TrainState:
  """Fresh parameters (model and loss, seeded by `config.seed`) and optimizer state, made with `state_sharding`."""

  def init():
    variables = embedding.init_variables(model, config)
    loss_params = objective.init_params(jax.random.fold_in(jax.random.key(config.seed), 2), context)
    trainable = {"model": variables["params"], "loss": loss_params}
    return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                      batch_stats=variables["batch_stats"], loss_params=loss_params, opt_state=tx.init(trainable))

  return jax.jit(init, out_shardings=state_sharding)()


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *, model, tx: optax.GradientTransformation,
               objective: losses.objective.Objective, seed: int,
               augmentation: augment.Augmentation) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on a global batch. Pure: augmentation, dropout and loss randomness derive from the step.

  Args:
    state: the train state.
    batch: `{"image": [B, C, C, 3] uint8, "item_id": [B], "category": [B], "class_index": [B]}`; the pixels
      are augmented here (`augment.train_images`, image b with the key of (seed, step, b)).
    model, tx, objective: the model, the optimizer and the loss(es).
    seed: the run's seed.
    augmentation: what is done to the pixels before the model sees them.

  Returns:
    The new state and `{"loss", "grad_norm", ...}` scalars (plus the objective's own metrics).
  """
  images = augment.train_images(batch["image"], augment.image_keys(seed, state.step, batch["image"].shape[0]),
                                augmentation)
  dropout_key = jax.random.fold_in(jax.random.key(seed), state.step)
  loss_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 3), state.step)
  loss_batch = {**batch, "rng": jax.random.key_data(loss_key)}

  def loss_of(trainable):
    (embeddings, aux), updates = model.apply(
        {"params": trainable["model"], "batch_stats": state.batch_stats}, images, train=True,
        category=batch["category"], mutable=["batch_stats"], rngs={"dropout": dropout_key})
    value, logged = objective(trainable["loss"], {"embedding": embeddings, **aux}, loss_batch)
    return value, (updates, logged)

  trainable = {"model": state.params, "loss": state.loss_params}
  (loss, (updates, logged)), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
  param_updates, opt_state = tx.update(grads, state.opt_state, trainable)
  trainable = optax.apply_updates(trainable, param_updates)
  new_state = state.replace(step=state.step + 1, params=trainable["model"], batch_stats=updates["batch_stats"],
                            loss_params=trainable["loss"], opt_state=opt_state)
  return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), **logged}


def augmentation_from_config(config: ml_collections.ConfigDict) -> augment.Augmentation:
  """The training augmentation of `config.input` (ImageNet normalisation)."""
  return augment.Augmentation(image_size=config.input.image_size, crop_scale=tuple(config.input.crop_scale),
                              color_jitter=config.input.color_jitter)


def make_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, model,
                    tx: optax.GradientTransformation, objective: losses.objective.Objective):
  """`train_step` jitted once over `mesh`: state replicated and donated, the batch split over the devices."""
  replicated = sharding.replicated(mesh)
  return jax.jit(functools.partial(train_step, model=model, tx=tx, objective=objective, seed=config.seed,
                                   augmentation=augmentation_from_config(config)),
                 in_shardings=(replicated, sharding.data_sharding(mesh)), out_shardings=(replicated, replicated),
                 donate_argnums=0)


def loss_context(config: ml_collections.ConfigDict, model, builder, train_index) -> losses.LossContext:
  """What the losses may size their parameters by: training products, categories, embedding size."""
  size = config.input.image_size
  embedding_shape = jax.eval_shape(
      lambda: model.init_with_output({"params": jax.random.key(0), "dropout": jax.random.key(0)},
                                     jnp.zeros((1, size, size, 3)), train=False)[0][0])
  num_categories = builder.info.features["category"].num_classes
  return losses.LossContext(num_classes=len(np.unique(train_index.item_ids)), num_categories=num_categories,
                            embedding_dim=int(embedding_shape.shape[-1]))


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or resumes) the configured model in `workdir` and evaluates it.

  Returns:
    The last evaluation: `{"recall@K": value, ..., "loss": last training loss}`.
  """
  device_count = jax.device_count()
  run_config.validate(config, device_count=device_count, process_count=jax.process_count())
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
  mode, why = input_pipeline.choose_cache(
      config.input.cache, num_records=builder.info.splits["train"].num_examples,
      size=input_pipeline.cache_size(config), memory_fraction=config.input.cache_memory_fraction,
      devices=jax.local_devices())
  if jax.process_count() > 1:  # Every process must feed the same way ("device" gathers in a global program).
    mode = input_pipeline.CACHE_MODES[int(multihost_utils.broadcast_one_to_all(
        np.int32(input_pipeline.CACHE_MODES.index(mode))))]
  if is_chief:
    print(f"Training images: cache={mode} ({why}).", flush=True)

  def open_splits():
    return {"train": input_pipeline.open_decoded_split(config, builder, "train", pixels=mode != "stream"),
            **{split: input_pipeline.open_decoded_split(config, builder, split) for split in evaluation.SPLITS}}

  # Decoded caches, made on first use: by the chief while the others wait, as for the dataset.
  splits = open_splits() if is_chief else None
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("decoded caches ready")
    splits = splits or open_splits()
  train_index = splits["train"].index
  images_per_product = config.input.images_per_product
  sampler = samplers.PKSampler(train_index.item_ids, config.input.batch_size // images_per_product,
                               images_per_product, config.seed)

  mesh = sharding.data_mesh()
  replicated = sharding.replicated(mesh)
  model = embedding.model_from_config(config)
  objective = losses.objective_from_config(config.loss)
  tx = make_optimizer(config, objective)
  state = create_state(config, model, tx, objective, loss_context(config, model, builder, train_index), replicated)
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

  step_fn = make_train_step(config, mesh, model, tx, objective)
  evaluator = evaluation.Evaluator(config, builder, model, mesh, {split: splits[split] for split in evaluation.SPLITS})

  def evaluate(step: int) -> tuple[dict[int, float], dict[str, jax.Array]]:
    recalls, embeddings = evaluator(state.variables)
    log.write({"step": step, **{f"recall@{k}": v for k, v in recalls.items()}})
    if is_chief:
      tqdm.tqdm.write(f"step {step}: " + ", ".join(f"R@{k} {100 * v:.1f}" for k, v in recalls.items()))
    return recalls, embeddings

  if start_step == 0:
    recalls, _ = evaluate(0)
    if is_chief:
      print(f"Untrained network: R@1 = {100 * recalls[min(recalls)]:.1f}%")

  batches = input_pipeline.train_batches_from_config(
      config, mode, splits["train"], sampler, mesh, first_step=start_step,
      source=input_pipeline.read_split(builder, "train") if mode == "stream" else None)
  progress = tqdm.tqdm(total=config.total_steps, initial=start_step, desc="train", unit="step",
                       disable=not is_chief, dynamic_ncols=True)
  recalls, embeddings = None, None

  def host_cpu_seconds() -> float:
    """CPU time of this loop's thread and the input's threads: the host's work outside XLA's computations."""
    return time.thread_time() + batches.cpu_seconds()

  window_start, window_cpu, window_steps = time.perf_counter(), host_cpu_seconds(), 0
  try:
    for step in range(start_step + 1, config.total_steps + 1):
      state, step_metrics = step_fn(state, next(batches))
      window_steps += 1
      progress.update(1)
      if step == start_step + 1:  # Leave compilation out of the images/s of the first window.
        jax.block_until_ready(step_metrics)
        window_start, window_cpu, window_steps = time.perf_counter(), host_cpu_seconds(), 0
      if step % config.log_every == 0 or step == config.total_steps:
        host_metrics = jax.device_get(step_metrics)  # The only sync with the device between evaluations.
        elapsed = time.perf_counter() - window_start
        images = max(window_steps * config.input.batch_size, 1)
        images_per_sec = images / max(elapsed, 1e-9)
        host_cpu_ms_per_image = 1e3 * (host_cpu_seconds() - window_cpu) / images
        last_loss = float(host_metrics["loss"])
        if not np.isfinite(last_loss):
          raise FloatingPointError(f"The loss became {last_loss} at step {step}; lower config.optim.learning_rate "
                                   f"or check the data. The last checkpoint is kept in {workdir}.")
        log.write({"step": step, **host_metrics, "images_per_sec": images_per_sec,
                   "host_cpu_ms_per_image": host_cpu_ms_per_image})
        progress.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{images_per_sec:.0f}")
        window_start, window_cpu, window_steps = time.perf_counter(), host_cpu_seconds(), 0
      if step % config.checkpoint_every == 0 or step == config.total_steps:
        checkpoints.save(step, args=ocp.args.StandardSave(state))
      if step % config.eval_every == 0 or step == config.total_steps:
        recalls, embeddings = evaluate(step)
        window_start, window_cpu, window_steps = time.perf_counter(), host_cpu_seconds(), 0
  finally:
    batches.close()
  progress.close()
  checkpoints.wait_until_finished()

  if recalls is None:  # Resumed a finished run: its evaluation is logged already; recompute it for the table.
    recalls, embeddings = evaluator(state.variables)
  if is_chief:
    print(evaluation.recall_table(recalls, f"{config.model.name} ({config.loss.name}, step {config.total_steps})"))
    pictures.plot_curves(log.rows, os.path.join(workdir, "curves.png"))
  host_embeddings = {split: sharding.host_array(x)[:len(evaluator.indexes[split])] for split, x in embeddings.items()}
  if is_chief:
    pictures.plot_retrievals(
        host_embeddings["query"], host_embeddings["gallery"], evaluator.indexes["query"],
        evaluator.indexes["gallery"], evaluator.sources["query"], evaluator.sources["gallery"],
        os.path.join(workdir, "retrievals.png"), num_queries=config.evals.num_pictures,
        metric=config.evals.metric)
  result = {f"recall@{k}": v for k, v in recalls.items()}
  loss_rows = [row for row in log.rows if "loss" in row]
  if loss_rows:
    result["loss"] = loss_rows[-1]["loss"]
  return result
