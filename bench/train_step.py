"""Images/s, FLOPs per image and MFU of jaxret's jitted training step, on synthetic P x K batches.

Run from the repository root (the same command on a CPU, a GPU or a TPU; all local devices are used, the
batch is split over them as in the trainer):

  python -m bench.train_step --model rccapsnet --image_size 64 --batch_size 32 --loss triplet --steps 10
  python -m bench.train_step --model rccapsnet --image_size 256 --batch_size 256 --dtype bfloat16 --parts

The step is `jaxret.trainer.make_train_step` itself, the step the trainer runs (the augmentation of the uint8
pixels on the device, AdamW, gradient clipping, BatchNorm statistics, spatial dropout, the configured loss), on
one batch of random pixels kept on the device, so the input pipeline is not part of the time (see
bench/input_pipeline.py and bench/train_e2e.py for that). After `--warmup` steps, the
time of `--repeats` windows of `--steps` steps each is taken, each window ending with a sync; `step_ms` is the
median window divided by its steps. FLOPs per step are counted from the step's jaxpr (`jaxret.flops`: the
same number on every backend, `"flop_source": "jaxpr"`); XLA's cost analysis of the compiled step is printed
beside it (`xla_flops_per_image`; on a GPU it leaves out the cuDNN convolutions). `mfu` = matmul and
convolution FLOPs (`matmul_flops_per_image`, 2 per multiply-add) per second / the devices' peak, when the
peak of the device kind is in `PEAK_TFLOPS` or given with `--peak_tflops` (null otherwise, e.g. on a CPU
without it), and `roofline_images_per_sec` the rate at that peak or at the memory bandwidth
(`PEAK_TBPS`) for XLA's "bytes accessed", whichever binds. `--parts` also times the convolutions, the routing
and the loss separately (each forward + backward, jitted alone). `--compile_only` prints FLOPs, bytes and
XLA's memory for a configuration without running it (e.g. to size a GPU batch on a CPU).

The last line of stdout is JSON with at least `images_per_sec`, `step_ms`, `flops_per_image` and `mfu`.
"""

import argparse
import dataclasses
import functools
import json
import os
import platform
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxret import embedding
from jaxret import flops
from jaxret import losses
from jaxret import run_config
from jaxret import sharding
from jaxret import trainer
from jaxret.models import capsnets
from jaxret.models import capsule_layers

MODELS = ("sccapsnet", "rccapsnet", "qrccapsnet")
LOSSES = ("triplet", "quadruplet", "category_quadruplet")
DTYPES = ("float32", "bfloat16")
IMAGES_PER_PRODUCT = 4  # K of the P x K batch, as in the configs.

# Dense peak TFLOP/s per chip by `jax.devices()[0].device_kind`, for (bfloat16, float32) computation.
# float32 on NVIDIA GPUs: JAX's default matmul/conv precision lets XLA use TF32 tensor cores, so the TF32 peak
# is the honest ceiling. TPUs compute float32 matmuls at default precision in bfloat16 passes: the bfloat16
# peak. Sources: NVIDIA H100/H200 datasheets (SXM: 989.4 bf16, 494.7 TF32; PCIe: 756 / 378; NVL: 835 / 418),
# Google Cloud TPU system architecture pages (v4 275, v5e 197, v5p 459, v6e 918 bf16).
PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": (989.4, 494.7),
    "NVIDIA H100 SXM5 80GB": (989.4, 494.7),
    "NVIDIA H100 PCIe": (756.0, 378.0),
    "NVIDIA H100 NVL": (835.0, 418.0),
    "NVIDIA H200": (989.4, 494.7),
    "NVIDIA H200 NVL": (835.0, 418.0),
    "TPU v4": (275.0, 275.0),
    "TPU v5 lite": (197.0, 197.0),
    "TPU v5e": (197.0, 197.0),
    "TPU v5": (459.0, 459.0),
    "TPU v5p": (459.0, 459.0),
    "TPU v6 lite": (918.0, 918.0),
}
# Memory bandwidth TB/s per chip, for the bytes-over-bandwidth bound of the routing.
PEAK_TBPS = {
    "NVIDIA H100 80GB HBM3": 3.35, "NVIDIA H100 SXM5 80GB": 3.35, "NVIDIA H100 PCIe": 2.0,
    "NVIDIA H100 NVL": 3.9, "NVIDIA H200": 4.8, "NVIDIA H200 NVL": 4.8, "TPU v4": 1.2, "TPU v5 lite": 0.82,
    "TPU v5e": 0.82, "TPU v5": 2.76, "TPU v5p": 2.76, "TPU v6 lite": 1.64,
}


def device_peak_flops(device_kind: str, dtype: str) -> float | None:
  """Dense peak FLOP/s of one device of this kind for `dtype` computation, or None when not known."""
  peaks = PEAK_TFLOPS.get(device_kind)
  if peaks is None:
    return None
  return 1e12 * peaks[0 if dtype == "bfloat16" else 1]


def bench_config(*, model: str, image_size: int, batch_size: int, num_classes: int, loss: str, dtype: str,
                 images_per_product: int = IMAGES_PER_PRODUCT, seed: int = 0) -> ml_collections.ConfigDict:
  """The trainer's base config with the benchmarked model, loss, sizes and dtype."""
  config = run_config.base_config()
  config.seed = seed
  config.model.name = model
  config.model.num_classes = num_classes
  config.model.dtype = dtype
  config.loss.name = loss
  config.input.image_size = image_size
  config.input.batch_size = batch_size
  config.input.images_per_product = images_per_product
  run_config.validate(config, device_count=jax.device_count())
  return config


def synthetic_batch(config: ml_collections.ConfigDict, seed: int = 0) -> dict[str, np.ndarray]:
  """A P x K batch of normal-noise images: `image` `[B, S, S, 3]` float32, `item_id`, `class_index`, `category` `[B]`."""
  rng = np.random.default_rng(seed)
  batch_size, size = config.input.batch_size, config.input.image_size
  products = batch_size // config.input.images_per_product
  item_id = np.repeat(np.arange(products, dtype=np.int32), config.input.images_per_product)
  category = (item_id % config.model.num_classes).astype(np.int32)
  image = rng.standard_normal((batch_size, size, size, 3), dtype=np.float32)
  return {"image": image, "item_id": item_id, "category": category, "class_index": item_id}


def synthetic_pixels(config: ml_collections.ConfigDict, seed: int = 0) -> np.ndarray:
  """`[B, C, C, 3]` uint8 noise at the decoded cache's size C: what the trainer's step receives."""
  size = config.input.cache_size or config.input.image_size
  return np.random.default_rng(seed).integers(0, 256, (config.input.batch_size, size, size, 3), np.uint8)


def build_train_step(config: ml_collections.ConfigDict):
  """The trainer's jitted step with its initial state and one batch (uint8 pixels) on the devices.

  Returns:
    `(step_fn, state, batch, model)`: `step_fn(state, batch) -> (state, metrics)` donates `state`.
  """
  mesh = sharding.data_mesh()
  model = embedding.model_from_config(config)
  objective = losses.objective_from_config(config.loss)
  tx = trainer.make_optimizer(config, objective)
  products = config.input.batch_size // config.input.images_per_product
  dim = jax.eval_shape(lambda: model.init_with_output(
      jax.random.key(0), jnp.zeros((1, config.input.image_size, config.input.image_size, 3)))[0][0]).shape[-1]
  context = losses.LossContext(num_classes=products, num_categories=config.model.num_classes, embedding_dim=dim)
  state = trainer.create_state(config, model, tx, objective, context, sharding.replicated(mesh))
  # uint8 pixels, as the trainer's input gives them: the step's own augmentation (crop, flip, jitter,
  # normalisation on the device) is part of the time.
  batch = {**synthetic_batch(config, config.seed), "image": synthetic_pixels(config, config.seed)}
  batch = jax.device_put(batch, sharding.data_sharding(mesh))
  # The trainer's own jitted step (`python -m jaxret.train` runs exactly this function).
  step_fn = trainer.make_train_step(config, mesh, model, tx, objective)
  return step_fn, state, batch, model


def xla_cost(compiled, key: str = "flops") -> float:
  """`key` ("flops", "bytes accessed") of one call of a compiled computation, from XLA's cost analysis."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Older jax: one dict per computation.
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get(key, 0.0))


def xla_flops(compiled) -> float:
  """FLOPs of one call of a compiled computation, from XLA's cost analysis (0 when it has none)."""
  return xla_cost(compiled, "flops")


def roofline_images_per_sec(flops_per_image: float, bytes_per_image: float, device_kind: str,
                            dtype: str) -> float | None:
  """The images/s one device could reach if it ran at its peak FLOP rate or its peak memory bandwidth,
  whichever binds (XLA's "bytes accessed" counts every fusion's operands and results once)."""
  peak = device_peak_flops(device_kind, dtype)
  bandwidth = PEAK_TBPS.get(device_kind)
  if peak is None or bandwidth is None:
    return None
  return 1.0 / max(flops_per_image / peak, bytes_per_image / (1e12 * bandwidth))


def time_windows(run_window, repeats: int) -> list[float]:
  """Seconds of `repeats` calls of `run_window()` (which must block until its work is done)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run_window()
    times.append(time.perf_counter() - start)
  return times


class StepRunner:
  """The jitted step and its (donated) state, run `steps` at a time; used here and by the torch comparison."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    step_fn, self.state, self.batch, self.model = build_train_step(config)
    self.step_fn = step_fn  # for counting FLOPs from its jaxpr
    start = time.perf_counter()
    self.compiled = step_fn.lower(self.state, self.batch).compile()
    self.compile_s = time.perf_counter() - start
    self.metrics = None

  def run(self, steps: int) -> None:
    for _ in range(steps):
      self.state, self.metrics = self.compiled(self.state, self.batch)
    jax.block_until_ready((self.state, self.metrics))

  @functools.cached_property
  def flop_count(self) -> flops.FlopCount:
    """FLOPs of one step (the global batch) counted from its jaxpr: the same on every backend."""
    return flops.count_flops(self.step_fn, self.state, self.batch)

  @property
  def flops_per_step(self) -> float:
    return float(self.flop_count.flops)

  @property
  def xla_flops_per_step(self) -> float:
    """XLA's cost analysis, which counts one device's partition of the step: times the devices."""
    return xla_flops(self.compiled) * jax.device_count()

  @property
  def bytes_accessed_per_step(self) -> float:
    return xla_cost(self.compiled, "bytes accessed")

  @property
  def memory_bytes(self) -> int:
    """XLA's temp + argument + output bytes for one step (what one step needs on the device)."""
    memory = self.compiled.memory_analysis()
    if memory is None:
      return 0
    return memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes


def _median_ms(fn, args, warmup: int, repeats: int) -> tuple[float, float]:
  """Median wall-clock and CPU (all threads of the process) milliseconds of one call."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  wall, cpu = [], []
  for _ in range(repeats):
    start, start_cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    wall.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
  return 1e3 * statistics.median(wall), 1e3 * statistics.median(cpu)


def time_parts(config: ml_collections.ConfigDict, state, batch, *, warmup: int = 2,
               repeats: int = 5) -> dict[str, dict[str, float]]:
  """Forward + backward time and FLOPs of the model's parts, each jitted alone, on the step's batch.

  Parts: "convolutions" (images -> primary capsules, with BatchNorm and dropout as in training),
  "routing" (primary capsules -> class capsules: the prediction einsum and the routing iterations), "loss"
  (class capsules -> embedding -> loss) and "optimizer" (the AdamW update from a gradient). Each part's
  backward gets a random cotangent (the loss part differentiates its scalar), so its time is that of its share
  of the training step, up to what XLA fuses across the borders in the whole step.

  Returns:
    `{part: {"ms": median wall-clock ms, "cpu_ms": median CPU ms of the process, "flops": FLOPs from the
    jaxpr, "xla_flops": XLA's cost analysis}}`
    (CPU time is the robust number on a busy CPU machine; on a GPU only `ms` means anything).
  """
  model = embedding.model_from_config(config)
  variables = state.variables
  images, category = batch["image"], batch["category"]
  dropout_key = jax.random.key(1)

  class ConvolutionsOnly(type(model)):
    """The model cut after its primary capsules (same parameter names)."""

    @nn.compact
    def __call__(self, images, train=False, category=None):
      return self.primary_capsules(images, train)

  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
            if f.name not in ("parent", "name")}
  conv_model = ConvolutionsOnly(**fields)

  def convolutions(params, images):
    out, _ = conv_model.apply({"params": params, "batch_stats": state.batch_stats}, images, train=True,
                              mutable=["batch_stats"], rngs={"dropout": dropout_key})
    return out

  def fwd_bwd(fn, *args):
    """The value of `fn(*args)` and its VJP w.r.t. every argument, for a fixed random cotangent."""
    out, vjp = jax.vjp(fn, *args)
    cotangent = jax.random.normal(jax.random.key(2), out.shape, out.dtype)
    return out, vjp(cotangent)

  conv_params = {k: v for k, v in variables["params"].items() if k != "class_capsules"}
  # Gradients w.r.t. the parameters only: the step needs none w.r.t. the images.
  conv_fn = jax.jit(lambda p, x: fwd_bwd(lambda p: convolutions(p, x), p))
  primary = jax.jit(convolutions)(conv_params, images)

  routed = capsule_layers.RoutedCapsules(
      model.num_classes, model.capsule_dim, routing_iterations=model.routing_iterations,
      logit_update=model.logit_update, share_weights=model.share_weights,
      stop_gradient_inner=model.stop_gradient_inner, dtype=model.dtype, param_dtype=model.param_dtype)
  routing_params = {"params": variables["params"]["class_capsules"]}
  routing_fn = jax.jit(lambda p, u: fwd_bwd(lambda p, u: routed.apply(p, u)[0], p, u))
  class_capsules = jax.jit(lambda p, u: routed.apply(p, u)[0])(routing_params, primary)

  objective = losses.objective_from_config(config.loss)

  def loss_of_capsules(v):
    mask = None
    if model.embedding != "all":  # The benchmark uses "all"; other modes mask by the category.
      mask = jax.nn.one_hot(category, model.num_classes, dtype=jnp.float32)
    return objective(state.loss_params, {"embedding": capsnets.capsule_embedding(v, mask)}, batch)[0]

  loss_grad_fn = jax.jit(jax.value_and_grad(loss_of_capsules))

  tx = trainer.make_optimizer(config, objective)
  trainable = {"model": state.params, "loss": state.loss_params}
  grads = jax.tree.map(jnp.ones_like, trainable)
  update_fn = jax.jit(lambda g, o, p: tx.update(g, o, p))

  parts = {
      "convolutions": (conv_fn, (conv_params, images)),
      "routing": (routing_fn, (routing_params, primary)),
      "loss": (loss_grad_fn, (class_capsules.astype(jnp.float32),)),
      "optimizer": (update_fn, (grads, state.opt_state, trainable)),
  }
  results = {}
  for name, (fn, args) in parts.items():
    xla_part_flops = xla_flops(fn.lower(*args).compile())
    wall_ms, cpu_ms = _median_ms(fn, args, warmup, repeats)
    results[name] = {"ms": wall_ms, "cpu_ms": cpu_ms, "flops": float(flops.count_flops(fn, *args).flops),
                     "xla_flops": xla_part_flops}
  return results


def routing_bytes_per_image(config: ml_collections.ConfigDict, model) -> dict[str, float]:
  """Lower bounds of the bytes the routing moves per image (fwd + bwd), with and without the prediction tensor.

  Through u_hat (`[in, out, dim]` in the computation dtype; unshared weights, or any port that builds it):
  the einsum writes it once, r iterations read it 2r - 1 times (r weighted sums, r - 1 agreements), and the
  backward pass reads it again for each of those products, writes its gradient once and reads that once:
  4r + 1 passes. Shared weights (`routing.dynamic_routing_shared`, jaxret's default): per iteration about two
  reads of u (`[in, in_dim]`) and three passes over the float32 `[in, out]` logits / coupling forward, twice
  that backward. Everything else (`[out, dim]` capsules, the kernel) is negligible.
  """
  grid = -(-config.input.image_size // 16)
  in_caps = grid * grid * model.primary_capsule_types
  itemsize = jnp.dtype(model.dtype).itemsize
  r = model.routing_iterations
  u_hat_bytes = in_caps * model.num_classes * model.capsule_dim * itemsize
  u_bytes = in_caps * model.primary_capsule_dim * itemsize
  logits_bytes = in_caps * model.num_classes * 4
  return {"in_caps": float(in_caps), "u_hat_bytes": float(u_hat_bytes),
          "via_u_hat_bytes": float(u_hat_bytes * (4 * r + 1)),
          "shared_bytes": float(3 * r * (2 * u_bytes + 3 * logits_bytes))}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--model", choices=MODELS, default="rccapsnet")
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--batch_size", type=int, default=32, help="global batch, P x K with K = 4")
  parser.add_argument("--num_classes", type=int, default=23, help="class capsules")
  parser.add_argument("--loss", choices=LOSSES, default="triplet")
  parser.add_argument("--steps", type=int, default=10, help="steps per timed window")
  parser.add_argument("--repeats", type=int, default=5, help="timed windows; the median is reported")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  parser.add_argument("--dtype", choices=DTYPES, default="float32", help="computation dtype (params float32)")
  parser.add_argument("--parts", action="store_true", help="also time convolutions, routing, loss alone")
  parser.add_argument("--compile_only", action="store_true", help="only FLOPs and XLA memory, no timing")
  parser.add_argument("--peak_tflops", type=float, default=None,
                      help="dense peak TFLOP/s of one device for the MFU (default: PEAK_TFLOPS by device kind; "
                      "needed on a CPU)")
  args = parser.parse_args()
  if min(args.steps, args.repeats, args.image_size, args.batch_size) < 1:
    parser.error("--steps, --repeats, --image_size and --batch_size must be positive.")
  try:
    config = bench_config(model=args.model, image_size=args.image_size, batch_size=args.batch_size,
                          num_classes=args.num_classes, loss=args.loss, dtype=args.dtype)
  except run_config.ConfigError as e:
    parser.error(str(e))

  load_at_start = os.getloadavg()[0]
  runner = StepRunner(config)
  if args.compile_only:  # FLOPs and memory of a configuration, e.g. a GPU batch size, without running it.
    print(json.dumps({"benchmark": "train_step_compile_only", "model": args.model,
                      "image_size": args.image_size,
                      "batch_size": args.batch_size, "dtype": args.dtype, "loss": args.loss,
                      "flop_source": "jaxpr",
                      "flops_per_image": runner.flops_per_step / args.batch_size,
                      "matmul_flops_per_image": runner.flop_count.matmul_flops / args.batch_size,
                      "xla_flops_per_image": runner.xla_flops_per_step / args.batch_size,
                      "bytes_accessed_per_image": runner.bytes_accessed_per_step / args.batch_size,
                      "xla_memory_bytes": runner.memory_bytes, "compile_s": runner.compile_s,
                      "routing": routing_bytes_per_image(config, runner.model),
                      "device": jax.devices()[0].device_kind, "jax": jax.__version__}))
    return
  runner.run(args.warmup)
  windows = time_windows(lambda: runner.run(args.steps), args.repeats)
  step_s = statistics.median(windows) / args.steps
  device = jax.devices()[0]
  flops_per_step = runner.flops_per_step
  matmul_flops_per_step = float(runner.flop_count.matmul_flops)
  peak = device_peak_flops(device.device_kind, args.dtype) if args.peak_tflops is None else 1e12 * args.peak_tflops
  mfu = None if peak is None else matmul_flops_per_step / step_s / (peak * jax.device_count())
  result = {
      "benchmark": "train_step",
      "model": args.model, "image_size": args.image_size, "batch_size": args.batch_size,
      "num_classes": args.num_classes, "loss": args.loss, "dtype": args.dtype,
      "images_per_sec": args.batch_size / step_s,
      "step_ms": 1e3 * step_s,
      "step_ms_min": 1e3 * min(windows) / args.steps,
      "flop_source": "jaxpr",
      "flops_per_image": flops_per_step / args.batch_size,
      "matmul_flops_per_image": matmul_flops_per_step / args.batch_size,
      "xla_flops_per_image": runner.xla_flops_per_step / args.batch_size,
      "mfu": mfu,
      "peak_flops_per_device": peak,
      "bytes_accessed_per_image": runner.bytes_accessed_per_step / args.batch_size,
      "roofline_images_per_sec": roofline_images_per_sec(
          matmul_flops_per_step / args.batch_size, runner.bytes_accessed_per_step / args.batch_size,
          device.device_kind, args.dtype),
      "xla_memory_bytes": runner.memory_bytes,
      "compile_s": runner.compile_s,
      "loss_value": float(runner.metrics["loss"]),
      "steps": args.steps, "repeats": args.repeats,
      "routing": routing_bytes_per_image(config, runner.model),
      "device": device.device_kind, "device_count": jax.device_count(), "platform": device.platform,
      "jax": jax.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
      "load_average_start_end": [load_at_start, os.getloadavg()[0]],
      "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
  }
  if not np.isfinite(result["loss_value"]):
    raise FloatingPointError(f"The benchmarked step gave loss {result['loss_value']}.")
  if args.parts:
    result["parts"] = time_parts(config, runner.state, runner.batch, repeats=args.repeats)
    print("part           median ms    CPU ms   GFLOP  XLA GFLOP")
    for name, part in result["parts"].items():
      print(f"{name:<14} {part['ms']:>9.2f} {part['cpu_ms']:>9.2f} {part['flops'] / 1e9:>7.2f} "
            f"{part['xla_flops'] / 1e9:>10.2f}")
  print(f"{args.model} {args.image_size}x{args.image_size} batch {args.batch_size} {args.dtype} {args.loss} on "
        f"{jax.device_count()} x {device.device_kind}: {result['images_per_sec']:.1f} images/s, "
        f"{result['step_ms']:.1f} ms/step, {result['flops_per_image'] / 1e9:.2f} GFLOP/image from the jaxpr "
        f"({result['matmul_flops_per_image'] / 1e9:.2f} in matmuls and convolutions; XLA's cost analysis: "
        f"{result['xla_flops_per_image'] / 1e9:.2f})" + ("" if mfu is None else f", MFU {100 * mfu:.1f}%"))
  print(json.dumps(result))


if __name__ == "__main__":
  main()
