"""Training: one pytree of state, one pure jitted step, and the loop that trains, checkpoints and evaluates.

  state = create_state(config, model, tx, objective, context, replicated)
  step_fn = make_train_step(config, mesh, model, tx, objective)   # jitted once, state donated
  state, metrics = step_fn(state, batch)

`train_and_evaluate(config, workdir)` is the whole run (`python -m jaxret.train` calls it). One pure
`train_step(state, batch) -> (state, metrics)`, jitted once over a data-parallel `Mesh` of all devices; the
same code runs on one CPU, on fake CPU devices, on a GPU and on a TPU slice. Rerunning on the same workdir
resumes from the latest checkpoint and gives the result of an uninterrupted run.

Outputs in the workdir: `metrics.jsonl` (one JSON object per line: `step`, `loss`, ...; evaluation lines have
`recall@K`), `checkpoints/`, `config.json`, `retrievals.png` and `curves.png`.
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


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int | None = None) -> optax.Schedule:
  """The learning rate of every step, from `config.optim.schedule`.

  * "warmup_cosine": linear warm-up over `config.warmup_steps` to `config.optim.learning_rate`, then cosine
    decay to 0 at `config.total_steps`.
  * "exponential_per_epoch": linear warm-up (none when `config.warmup_steps` is 0), then the rate times
    `config.optim.decay_per_epoch` after every epoch of `steps_per_epoch` steps, as the published capsule
    retrieval code does (x0.995 per epoch, Keras' LearningRateScheduler).

  Raises:
    ValueError: "exponential_per_epoch" without `steps_per_epoch`, or an unknown schedule.
  """
  peak = config.optim.learning_rate
  if config.optim.schedule == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=config.warmup_steps,
        decay_steps=max(config.total_steps, config.warmup_steps + 1), end_value=0.0)
  if config.optim.schedule == "exponential_per_epoch":
    if not steps_per_epoch:
      raise ValueError("config.optim.schedule='exponential_per_epoch' needs steps_per_epoch (training images "
                       "// global batch size).")
    decay = optax.exponential_decay(peak, transition_steps=steps_per_epoch,
                                    decay_rate=config.optim.decay_per_epoch, staircase=True)
    if config.warmup_steps == 0:
      return decay
    # Epochs count from step 0; the warm-up only scales the first steps.
    return lambda step: decay(step) * jnp.minimum(1.0, step / config.warmup_steps)
  raise ValueError(f"config.optim.schedule={config.optim.schedule!r} must be one of {list(run_config.SCHEDULES)}.")


def make_optimizer(config: ml_collections.ConfigDict, objective: losses.objective.Objective,
                   steps_per_epoch: int | None = None) -> optax.GradientTransformation:
  """Adam(W) on `learning_rate_schedule(config, steps_per_epoch)`, gradient clipping by global norm.

  It updates `{"model": params, "loss": loss_params}`; the parameters of each loss term learn at the model's
  rate times that term's `lr_multiplier` (e.g. x100 for Proxy-Anchor's proxies), through
  `optax.multi_transform`. `steps_per_epoch` (training images // global batch) is needed only by the
  "exponential_per_epoch" schedule.
  """
  schedule = learning_rate_schedule(config, steps_per_epoch)

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
               objective: losses.objective.Objective, seed: int) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on a global batch. Pure: dropout and loss randomness are derived from the step.

  Args:
    state: the train state.
    batch: `{"image": [B, H, W, 3], "item_id": [B], "category": [B], "class_index": [B]}`.
    model, tx, objective: the model, the optimizer and the loss(es).
    seed: the run's seed.

  Returns:
    The new state and `{"loss", "grad_norm", ...}` scalars (plus the objective's own metrics).
  """
  dropout_key = jax.random.fold_in(jax.random.key(seed), state.step)
  loss_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 3), state.step)
  loss_batch = {**batch, "rng": jax.random.key_data(loss_key)}

  def loss_of(trainable):
    (embeddings, aux), updates = model.apply(
        {"params": trainable["model"], "batch_stats": state.batch_stats}, batch["image"], train=True,
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


def make_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, model,
                    tx: optax.GradientTransformation, objective: losses.objective.Objective):
  """`train_step` jitted once over `mesh`: state replicated and donated, the batch split over the devices."""
  replicated = sharding.replicated(mesh)
  return jax.jit(functools.partial(train_step, model=model, tx=tx, objective=objective, seed=config.seed),
                 in_shardings=(replicated, sharding.data_sharding(mesh)), out_shardings=(replicated, replicated),
                 donate_argnums=0)


def loss_context(config: ml_collections.ConfigDict, model, builder, train_index) -> losses.LossContext:
  """What the losses may size their parameters by: training products, categories, embedding size."""
  size = config.input.image_size
  embedding_shape = jax.eval_shape(
      lambda: model.init_with_output({"params": jax.random.key(0), "dropout": jax.random.key(0)},
                                     jnp.zeros((1, size, size, 3)), train=False,
                                     category=jnp.zeros((1,), jnp.int32))[0][0])
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
  train_source = input_pipeline.read_split(builder, "train")
  train_index = input_pipeline.index_split(train_source, "indexing train")
  sampler = samplers.sampler_from_config(config.input, train_index.item_ids, train_index.categories, config.seed)

  mesh = sharding.data_mesh()
  replicated = sharding.replicated(mesh)
  model = embedding.model_from_config(config)
  objective = losses.objective_from_config(config.loss)
  tx = make_optimizer(config, objective, steps_per_epoch=max(1, len(train_index) // config.input.batch_size))
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
  evaluator = evaluation.Evaluator(config, builder, model, mesh)

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

  batches = input_pipeline.train_batches(
      train_source, sampler, image_size=config.input.image_size, first_step=start_step,
      num_steps=config.total_steps, process_index=jax.process_index(), process_count=jax.process_count(),
      num_threads=config.input.num_threads,
      augment={"crop_scale": tuple(config.input.crop_scale), "color_jitter": config.input.color_jitter})
  progress = tqdm.tqdm(total=config.total_steps, initial=start_step, desc="train", unit="step",
                       disable=not is_chief, dynamic_ncols=True)
  recalls, embeddings = None, None
  window_start, window_steps = time.perf_counter(), 0
  for step in range(start_step + 1, config.total_steps + 1):
    state, step_metrics = step_fn(state, sharding.global_batch(next(batches), mesh))
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
