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
`recall@K`, and `val/recall@K` with `config.input.validation_products`), `checkpoints/`, `config.json`,
`retrievals.png` and `curves.png`. The training images reach the step as uint8 pixels from the split's
decoded cache (`config.input.cache`: device, host or stream; see `jaxret.input_pipeline`) and are augmented
inside the step (`jaxret.augment`).
"""

from collections.abc import Mapping
import functools
import os
import signal
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
from jaxret import checkpointing
from jaxret import decoded_cache
from jaxret import embedding
from jaxret import evaluation
from jaxret import input_pipeline
from jaxret import landmark_augment
from jaxret import losses
from jaxret import models
from jaxret import pictures
from jaxret import run_config
from jaxret import samplers
from jaxret import samplers_htl
from jaxret import sharding
from jaxret import validation
from jaxret import workdir as run_dir
from jaxret.models import import_weights


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

  It updates `{"model": params, "loss": loss_params}` through `optax.multi_transform`, one AdamW per group of
  parameters, each at the schedule times a multiplier:
  - the parameters of each loss term at that term's `lr_multiplier` (e.g. x100 for Proxy-Anchor's proxies);
  - for the backbone models (parameters `{"backbone": ..., "head": ..., "tasks"?: ...}`), the embedding head
    and the task heads at `config.optim.head_lr_multiplier` (fine-tuning recipes train fresh heads faster than
    pretrained layers),
    and the backbone at 0 for the first `config.optim.head_only_steps` steps (only the head trains while it
    is random, so that its first gradients do not disturb the pretrained features).
  `steps_per_epoch` (training images // global batch) is needed only by the "exponential_per_epoch" schedule.
  """
  schedule = learning_rate_schedule(config, steps_per_epoch)
  head_only_steps = config.optim.get("head_only_steps") or 0

  def adamw(multiplier: float, frozen_steps: int = 0) -> optax.GradientTransformation:
    def rate(step):
      value = schedule(step) if multiplier == 1.0 else multiplier * schedule(step)
      return jnp.where(step < frozen_steps, 0.0, value) if frozen_steps else value
    return optax.adamw(rate, weight_decay=config.optim.weight_decay)

  multipliers = objective.lr_multipliers()
  transforms = {"model": adamw(1.0), "backbone": adamw(1.0, head_only_steps),
                "head": adamw(config.optim.get("head_lr_multiplier") or 1.0),
                **{f"loss/{name}": adamw(m) for name, m in multipliers.items()}}

  def model_labels(params):
    if "backbone" in params and "head" in params:  # Fresh parts (the head, task heads) train as the head.
      return {part: jax.tree.map(lambda _, p="backbone" if part == "backbone" else "head": p, params[part])
              for part in params}
    return jax.tree.map(lambda _: "model", params)

  def labels(tree):
    return {"model": model_labels(tree["model"]),
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
    The new state and `{"loss", "grad_norm", "finite", ...}` scalars (plus the objective's own metrics);
    `finite` is False when the loss, the gradients or the new parameters hold a NaN or an inf.
  """
  keys = augment.image_keys(seed, state.step, batch["image"].shape[0])
  images = augment.train_images(batch["image"], keys, augmentation, batch.get("bbox"), batch.get("has_bbox"))
  if "landmarks" in batch:  # Ground-truth landmarks follow each image's crop and flip (jaxret/landmark_augment.py).
    height, width = batch["image"].shape[1:3]
    batch = {**batch, "landmarks": landmark_augment.augmented_landmarks(
        batch["landmarks"], keys, augmentation, height, width, batch.get("bbox"), batch.get("has_bbox"))}
  # Dataset features the model reads in training (e.g. ground-truth landmarks); at evaluation it predicts them.
  model_inputs = {name: batch[name] for name in model_batch_inputs(model)}
  dropout_key = jax.random.fold_in(jax.random.key(seed), state.step)
  loss_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 3), state.step)
  loss_batch = {**batch, "rng": jax.random.key_data(loss_key)}

  def loss_of(trainable):
    (embeddings, aux), updates = model.apply(
        {"params": trainable["model"], "batch_stats": state.batch_stats}, images, train=True,
        category=batch["category"], mutable=["batch_stats"], rngs={"dropout": dropout_key}, **model_inputs)
    value, logged = objective(trainable["loss"], {"embedding": embeddings, **aux}, loss_batch)
    return value, (updates, logged)

  trainable = {"model": state.params, "loss": state.loss_params}
  (loss, (updates, logged)), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
  param_updates, opt_state = tx.update(grads, state.opt_state, trainable)
  trainable = optax.apply_updates(trainable, param_updates)
  new_state = state.replace(step=state.step + 1, params=trainable["model"], batch_stats=updates["batch_stats"],
                            loss_params=trainable["loss"], opt_state=opt_state)
  grad_norm = optax.tree.norm(grads)
  # One cheap reduction over the new parameters: the trainer never saves a state for which this is False.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(trainable))
  return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite, **logged}


def augmentation_from_config(config: ml_collections.ConfigDict) -> augment.Augmentation:
  """The training augmentation of `config.input`, normalised by the model's input convention."""
  return augment.Augmentation(image_size=config.input.image_size, crop_scale=tuple(config.input.crop_scale),
                              color_jitter=config.input.color_jitter,
                              convention=models.INPUT_CONVENTIONS[config.model.name],
                              crop_to_box=config.input.crop_to_box, box_margin=float(config.input.box_margin))


def model_batch_inputs(model) -> tuple[str, ...]:
  """Dataset features a model takes as keyword arguments in training (its `batch_inputs`, e.g. FashionNet's
  ground-truth landmarks); most models take none."""
  return tuple(getattr(model, "batch_inputs", ()))


def batch_feature_needs(config: ml_collections.ConfigDict, model,
                        objective: losses.objective.Objective) -> dict[str, str]:
  """`{dataset feature: what needs it}` for the features every training batch must carry besides the labels."""
  needs = {name: "config.input.crop_to_box" for name in input_pipeline.box_features(config)}
  for name in model_batch_inputs(model):
    needs.setdefault(name, f"config.model.name={config.model.name!r}")
  for term_name, term in objective.terms.items():
    for name in term.loss.batch_features:
      needs.setdefault(name, f"the {term_name} loss")
  return needs


def check_task_heads(model, index: decoded_cache.SplitIndex, num_categories: int, dataset: str) -> None:
  """Raises `run_config.ConfigError` when the model's task heads do not match the dataset's categories or
  attributes, with the value to set."""
  tasks = getattr(model, "tasks", None)
  if tasks is None:
    return
  problems = []
  if tasks.num_categories and tasks.num_categories != num_categories:
    problems.append(f"config.model.num_categories={tasks.num_categories}, but {dataset} has {num_categories} "
                    f"categories; set it to {num_categories}.")
  if tasks.num_attributes:
    attributes = index.features.get("attributes")
    if attributes is None or attributes.ndim != 2:
      problems.append(f"config.model.num_attributes={tasks.num_attributes}, but {dataset} has no attributes; "
                      "set it to 0.")
    elif attributes.shape[1] != tasks.num_attributes:
      problems.append(f"config.model.num_attributes={tasks.num_attributes}, but {dataset} has "
                      f"{attributes.shape[1]} attributes; set it to {attributes.shape[1]}.")
  if problems:
    raise run_config.ConfigError("\n".join(problems))


def check_batch_features(index: decoded_cache.SplitIndex, needs: Mapping[str, str], dataset: str) -> None:
  """Raises `input_pipeline.MissingFeatureError` naming each needed feature the dataset does not have."""
  missing = [f"{name!r} (for {who})" for name, who in needs.items()
             if name not in index.features
             and not (name.startswith("has_") and name[len("has_"):] in index.features)]
  if missing:
    raise input_pipeline.MissingFeatureError(
        f"Dataset {dataset} has no feature {', '.join(missing)}; its records have {sorted(index.features)}. "
        "Use a dataset with them (deepfashion_inshop and synthetic_inshop from version 2.0.0 have bbox, "
        "landmarks and attributes; deepfashion2 has bbox), or turn off what needs them.")


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
                                     jnp.zeros((1, size, size, 3)), train=False,
                                     category=jnp.zeros((1,), jnp.int32))[0][0])
  num_categories = builder.info.features["category"].num_classes
  return losses.LossContext(num_classes=len(np.unique(train_index.item_ids)), num_categories=num_categories,
                            embedding_dim=int(embedding_shape.shape[-1]))


def make_loss_rebuilder(config: ml_collections.ConfigDict, objective: losses.objective.Objective,
                        context: losses.LossContext, model, mesh: jax.sharding.Mesh,
                        training: decoded_cache.DecodedSplit, class_index: np.ndarray, steps_per_epoch: int):
  """`rebuild(state, step) -> state` for the loss terms whose parameters are rebuilt from the training split
  (e.g. HTL's class tree), or None when no term has such parameters.

  At each step that is a multiple of a term's interval (`rebuild_every`, else the sampler's epoch), the
  current model embeds every training record (inference mode, as evaluation embeds) and the term's
  `rebuild` replaces its parameters, replicated like the rest of the state: the checkpoint of that step holds
  them, so a resumed run continues with the same ones.

  Args:
    training: the records training draws from (their pixels, or their JPEGs decoded when read).
    class_index: `[len(training)]` the sampler's class index of each of those records.
  """
  intervals = objective.rebuild_intervals(steps_per_epoch)
  if not intervals:
    return None
  embed = embedding.jit_embed_step(model, mesh, config)
  replicated = sharding.replicated(mesh)
  class_index = sharding.global_from_host(np.asarray(class_index, np.int32), replicated)
  rebuilds = {name: jax.jit(functools.partial(objective.terms[name].loss.rebuild_params, context=context,
                                              options=objective.terms[name].options),
                            out_shardings=replicated) for name in intervals}
  real = jax.jit(lambda x: x[:len(training)], out_shardings=replicated)

  def rebuild(state: TrainState, step: int) -> TrainState:
    due = [name for name, every in intervals.items() if step % every == 0]
    if not due:
      return state
    batches = input_pipeline.eval_batches(training, global_batch=config.evals.batch_size,
                                          process_index=jax.process_index(), process_count=jax.process_count(),
                                          features=input_pipeline.box_features(config))
    embeddings = real(embedding.embed_batches_on_device(
        embed, state.variables, batches, mesh, total_batches=-(-len(training) // config.evals.batch_size),
        desc=f"embedding the training split for {', '.join(due)}"))
    loss_params = dict(state.loss_params)
    for name in due:
      loss_params[name] = rebuilds[name](embeddings, class_index)
    return state.replace(loss_params=loss_params)

  return rebuild


class NonFiniteError(FloatingPointError):
  """A step made the parameters, the gradients or the loss non-finite; nothing of it was saved."""


def _first_non_finite(pending: list[tuple[int, dict[str, jax.Array]]]) -> tuple[int, dict[str, float]] | None:
  """The first `(step, metrics)` of `pending` whose step was not finite (one transfer for all of them)."""
  host = jax.device_get([metrics["finite"] for _, metrics in pending])
  for (step, metrics), finite in zip(pending, host):
    if not finite:
      return step, {k: float(v) for k, v in jax.device_get(metrics).items() if k != "finite"}
  return None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, extend_total_steps: bool = False,
                       detections: str | None = None) -> dict[str, float]:
  """Trains (or resumes) the configured model in `workdir` and evaluates it.

  Args:
    config: the run's config.
    workdir: the run's folder; rerunning on it resumes the run stored there (a config that would change that
      run is refused, see `jaxret.workdir`).
    extend_total_steps: accept a larger `config.total_steps` than the stored run's (the schedule stretches).
    detections: a detections file (`--detections`) whose garments every evaluation also searches.

  Returns:
    The last evaluation: `{"recall@K": value, ..., "loss": last training loss}`.

  Raises:
    run_config.ConfigError, workdir.WorkdirError, checkpointing.CheckpointError, NonFiniteError,
    input_pipeline.DatasetNotPreparedError: problems the user can fix, each with what to do; nothing is
    written before the config and the workdir have been checked.
  """
  device_count = jax.device_count()
  run_config.validate(config, device_count=device_count, process_count=jax.process_count())
  is_chief = jax.process_index() == 0
  workdir = os.path.abspath(os.path.expanduser(workdir))
  run_dir.check_writable(workdir)
  if checkpointing.has_checkpoints(workdir) and os.path.exists(os.path.join(workdir, run_dir.CONFIG_FILE)):
    for note in run_dir.check_resume(workdir, config, extend_total_steps=extend_total_steps):
      if is_chief:
        print(f"note: resuming with a changed {note}")
  if jax.process_count() > 1:  # Every process has checked the workdir before the chief writes to it.
    multihost_utils.sync_global_devices("workdir checked")
  if is_chief:
    run_dir.write_config(workdir, config)

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
  train_source = input_pipeline.read_split(builder, "train") if mode == "stream" else None  # JPEGs, for stream.
  images_per_product = config.input.images_per_product
  products_per_batch = config.input.batch_size // images_per_product
  # Products held out for model selection (config.input.validation_products) are never drawn for training.
  held_out = None
  if config.input.validation_products:
    held_out = validation.hold_out_products(train_index.item_ids, config.input.validation_products, config.seed,
                                            products_per_batch=products_per_batch)
  training_index = (train_index if held_out is None
                    else validation.subset_index(train_index, held_out.train_records))
  sampler = samplers.sampler_from_config(config.input, training_index.item_ids, training_index.categories,
                                        config.seed)
  if held_out is not None:
    sampler = validation.SubsetSampler(sampler, held_out.train_records, train_index.item_ids)

  mesh = sharding.data_mesh()
  replicated = sharding.replicated(mesh)
  model = embedding.model_from_config(config)
  objective = losses.objective_from_config(config.loss)
  feature_needs = batch_feature_needs(config, model, objective)
  check_batch_features(train_index, feature_needs, config.input.dataset)
  tx = make_optimizer(config, objective, steps_per_epoch=max(1, len(training_index) // config.input.batch_size))
  context = loss_context(config, model, builder, training_index)
  check_task_heads(model, train_index, context.num_categories, config.input.dataset)
  state = create_state(config, model, tx, objective, context, replicated)
  if is_chief:
    print(f"Model {config.model.name}: {sum(x.size for x in jax.tree.leaves(state.params)):,} parameters; "
          f"{device_count} device(s), global batch {config.input.batch_size}.")

  checkpoints = checkpointing.Checkpoints(workdir, keep=config.keep_checkpoints)
  restored, start_step = checkpoints.restore_latest(jax.tree.map(ocp.utils.to_shape_dtype_struct, state),
                                                    is_chief=is_chief)
  if restored is not None:
    state = restored
    if is_chief:
      print(f"Resumed from the checkpoint of step {start_step} in {workdir}.")
  elif config.model.get("pretrained"):
    variables = import_weights.import_backbone(config.model.name, state.variables,
                                               os.path.expanduser(config.model.pretrained))
    state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"])
    if is_chief:
      print(f"Backbone weights of {config.model.name} from {config.model.pretrained}; the head starts fresh.")
  log = run_dir.MetricsLog(workdir, start_step, enabled=is_chief)

  step_fn = make_train_step(config, mesh, model, tx, objective)
  training_records = np.arange(len(train_index)) if held_out is None else held_out.train_records
  rebuild_loss_params = make_loss_rebuilder(
      config, objective, context, model, mesh,
      validation.record_split(splits["train"], training_records, source=train_source,
                              size=input_pipeline.cache_size(config)),
      sampler.class_indices[training_records], steps_per_epoch=sampler.steps_per_epoch)
  evaluator = evaluation.Evaluator(config, builder, model, mesh, {split: splits[split] for split in evaluation.SPLITS},
                                   detections=detections)
  validator = None
  if held_out is not None:
    validator = evaluation.Evaluator(
        config, builder, model, mesh, test_split=False,
        splits=validation.evaluation_splits(
            splits["train"], held_out, size=input_pipeline.cache_size(config),
            source=train_source))
    if is_chief:
      print(f"Validation split: {len(held_out.products)} training products held out "
            f"({len(held_out.query_records)} queries, {len(held_out.gallery_records)} gallery images).")
  untrained = next((row["recall@1"] for row in log.evaluations() if row["step"] == 0 and "recall@1" in row), None)

  def evaluate(step: int) -> tuple[dict[int, float], dict[str, jax.Array]]:
    recalls, embeddings, spread, more = evaluator(state.variables)
    row = {"step": step, **{f"recall@{k}": v for k, v in recalls.items()}, **more, "embedding_spread": spread}
    if validator is not None:
      val_recalls, _, _, val_more = validator(state.variables)
      row.update({f"val/recall@{k}": v for k, v in val_recalls.items()})
      row.update({f"val/{k}": v for k, v in val_more.items() if not k.startswith("category/")})
    log.write(row)
    if is_chief:
      tqdm.tqdm.write(f"step {step}: " + ", ".join(f"R@{k} {100 * v:.1f}" for k, v in recalls.items())
                      + (f"; validation R@1 {100 * row['val/recall@1']:.1f}" if "val/recall@1" in row else ""))
      if step > 0 and spread < evaluation.COLLAPSED_SPREAD:
        tqdm.tqdm.write(f"warning: at step {step} the embeddings have collapsed onto one point (their spread is "
                        f"{spread:.1e} of their size): distances between them mean nothing. Lower "
                        f"config.optim.learning_rate (now {config.optim.learning_rate}) or change the loss.")
      elif step > 0 and untrained is not None and min(recalls) == 1 and recalls[1] < untrained:
        tqdm.tqdm.write(f"warning: at step {step} R@1 = {100 * recalls[1]:.1f}% is below the untrained "
                        f"network's {100 * untrained:.1f}%: training is making the embedding worse.")
    return recalls, embeddings

  if start_step == 0:
    recalls, _ = evaluate(0)
    untrained = recalls.get(1)
    if is_chief:
      print(f"Untrained network: R@1 = {100 * recalls[min(recalls)]:.1f}%")

  # HTL's anchor-neighbour batches come from the current class tree: the sampler changes after each rebuild
  # (and a resumed run starts from the tree of its checkpoint), and the batches are made again from there.
  htl_sampling = config.input.sampler == "htl_anchor_neighbour"
  pk_sampler = sampler.inner if held_out is not None else sampler
  htl_every = objective.rebuild_intervals(sampler.steps_per_epoch).get("htl") if htl_sampling else None

  def sampler_of(tree):
    if tree is None or not samplers_htl.tree_is_built(tree):
      return sampler
    inner = samplers_htl.sampler_from_tree(pk_sampler, jax.device_get(tree), batch_size=config.input.batch_size,
                                           classes_per_anchor=config.input.classes_per_anchor)
    return inner if held_out is None else validation.SubsetSampler(inner, held_out.train_records,
                                                                   train_index.item_ids)

  def train_batches(first_step: int, tree=None):
    return input_pipeline.train_batches_from_config(
        config, mode, splits["train"], sampler_of(tree), mesh, first_step=first_step, source=train_source,
        features=tuple(feature_needs))

  batches = train_batches(start_step, state.loss_params.get("htl") if htl_sampling else None)
  progress = tqdm.tqdm(total=config.total_steps, initial=start_step, desc="train", unit="step",
                       disable=not is_chief, dynamic_ncols=True)
  recalls, embeddings = None, None
  pending = []  # (step, metrics) not yet checked for non-finite values: checked before every log and save.

  def check_finite() -> None:
    bad = _first_non_finite(pending) if pending else None
    pending.clear()
    if bad is not None:
      step, values = bad
      log.write({"step": step, **values, "note": "non-finite parameters, gradients or loss; not saved"})
      checkpoints.wait()
      progress.close()
      last = checkpoints.last_saved
      raise NonFiniteError(
          f"Step {step} made the parameters, gradients or loss non-finite (loss {values.get('loss')}, "
          f"grad_norm {values.get('grad_norm')}); lower config.optim.learning_rate (now "
          f"{config.optim.learning_rate}) or check the data. Nothing of that step was saved"
          + (f"; the last checkpoint (step {last}) in {checkpoints.directory} is finite." if last is not None
             else "."))

  def host_cpu_seconds() -> float:
    """CPU time of this loop's thread and the input's threads: the host's work outside XLA's computations."""
    return time.thread_time() + batches.cpu_seconds()

  window_start, window_cpu, window_steps = time.perf_counter(), host_cpu_seconds(), 0
  try:
    with checkpointing.StopSignals() as stop:
      for step in range(start_step + 1, config.total_steps + 1):
        state, step_metrics = step_fn(state, next(batches))
        pending.append((step, step_metrics))
        window_steps += 1
        progress.update(1)
        if step == start_step + 1:  # Leave compilation out of the images/s of the first window.
          jax.block_until_ready(step_metrics)
          window_start, window_cpu, window_steps = time.perf_counter(), host_cpu_seconds(), 0
        if rebuild_loss_params is not None:
          state = rebuild_loss_params(state, step)  # Before the save: the checkpoint of `step` holds the result.
          if htl_every and step % htl_every == 0 and step < config.total_steps:
            batches.close()
            batches = train_batches(step, state.loss_params["htl"])
            window_start, window_cpu, window_steps = time.perf_counter(), host_cpu_seconds(), 0
        log_now = step % config.log_every == 0 or step == config.total_steps
        save_now = step % config.checkpoint_every == 0 or step == config.total_steps
        # In a multi-process run the processes agree on a stop at log steps (a collective), or through JAX's
        # preemption service; alone, a signal is honoured after the step it arrived in.
        stop_now = ((jax.process_count() == 1 or log_now) and stop.agreed_stop()) or checkpoints.reached_preemption(step)
        if log_now or save_now or stop_now:
          check_finite()  # The only sync with the device between evaluations, with the metrics below.
        if log_now:
          host_metrics = {k: v for k, v in jax.device_get(step_metrics).items() if k != "finite"}
          elapsed = time.perf_counter() - window_start
          images = max(window_steps * config.input.batch_size, 1)
          images_per_sec = images / max(elapsed, 1e-9)
          host_cpu_ms_per_image = 1e3 * (host_cpu_seconds() - window_cpu) / images
          log.write({"step": step, **host_metrics, "images_per_sec": images_per_sec,
                     "host_cpu_ms_per_image": host_cpu_ms_per_image})
          progress.set_postfix(loss=f"{float(host_metrics['loss']):.4f}", img_s=f"{images_per_sec:.0f}")
          window_start, window_cpu, window_steps = time.perf_counter(), host_cpu_seconds(), 0
        if save_now or stop_now:
          checkpoints.save(step, state)
        if stop_now:
          checkpoints.wait()
          progress.close()
          what = stop.name or "a preemption notice"
          if is_chief:
            print(f"Stopped by {what} after step {step}; its checkpoint is saved in {checkpoints.directory}. "
                  "Rerun the same command to resume.")
          raise SystemExit(128 + (stop.signal_number or signal.SIGTERM))
        if step % config.eval_every == 0 or step == config.total_steps:
          recalls, embeddings = evaluate(step)
          window_start, window_cpu, window_steps = time.perf_counter(), host_cpu_seconds(), 0
      progress.close()
      checkpoints.wait()
  finally:
    batches.close()

  if recalls is None:  # Resumed a finished run: its evaluation is logged already; recompute it for the table.
    recalls, embeddings, _, _ = evaluator(state.variables)
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
  loss_rows = [row for row in log.rows if row.get("loss") is not None]
  if loss_rows:
    result["loss"] = loss_rows[-1]["loss"]
  return result
