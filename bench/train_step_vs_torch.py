"""RCCapsNet training step, JAX (jaxret) vs. its PyTorch twin (eager and torch.compile), side by side.

Run from the repository root (needs `torch`; on a GPU machine both frameworks use the GPU):

  python -m bench.train_step_vs_torch --image_size 64 --batch_size 32 --rounds 7 --steps 3
  python -m bench.train_step_vs_torch --threads 1      # one core each: robust on a busy machine
  python -m bench.train_step_vs_torch --image_size 256 --batch_size 128 --dtype bfloat16 --rounds 9 --steps 10

Both sides start from the same weights (the JAX initialisation copied into the twin, bench/torch_twin.py) and
train on the same P x K batch of random images with the batch-hard triplet loss, AdamW and gradient clipping.
After warm-up (and compilation) the contestants take turns in one process, `--steps` steps each per round, the
order reversed every round so that neither always runs right after the other; each contestant's images/s is
the median over `--rounds` rounds, and the ratios are JAX images/s over each PyTorch variant's. bfloat16 means
`dtype=bfloat16` in the JAX model and `torch.autocast(bfloat16)` around the twin's forward pass (parameters
and loss float32 in both; the loss outside autocast, as jaxret computes distances in float32).

`--threads N` confines the process to N cores (`os.sched_setaffinity`, which also sizes XLA's thread pools) and
gives PyTorch N threads (for N = 1 also XLA's `--xla_cpu_multi_thread_eigen=false`). `--threads 1` is the
robust comparison on a machine shared with other jobs: OpenMP's spinning threads make a multi-threaded PyTorch
step several times slower whenever one of its cores is taken, while a single thread only loses its share.
Besides wall-clock images/s, the CPU time of each window (all threads of the process) is recorded.

The last line of stdout is JSON with every number.
"""

import argparse
import json
import os
import platform
import statistics
import time

import jax
import numpy as np
import torch

from bench import torch_twin
from bench import train_step as jax_bench


def torch_device() -> torch.device:
  """The GPU when JAX runs on one and PyTorch sees it, else the CPU (both sides on the same device)."""
  if jax.default_backend() == "gpu" and torch.cuda.is_available():
    return torch.device("cuda")
  return torch.device("cpu")


class TorchRunner:
  """The twin's training step on the benchmark batch, run `steps` at a time."""

  def __init__(self, config, params, batch_stats, batch, *,
               compile: bool,  # pylint: disable=redefined-builtin
               channels_last: bool, dtype: str, device: torch.device):
    self.device = device
    model = torch_twin.RCCapsNet(num_classes=config.model.num_classes)
    torch_twin.load_flax_params(model, params, batch_stats)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format)
    self.step = torch_twin.TrainStep(
        model, learning_rate=config.optim.learning_rate, weight_decay=config.optim.weight_decay,
        grad_clip_norm=config.optim.grad_clip_norm, warmup_steps=config.warmup_steps,
        total_steps=config.total_steps, margin=config.loss.triplet["margin"], compile=compile,
        autocast_dtype=torch.bfloat16 if dtype == "bfloat16" else None)
    images = torch.from_numpy(np.array(batch["image"])).permute(0, 3, 1, 2)
    self.images = images.to(device=device).contiguous(memory_format=memory_format)
    self.labels = torch.from_numpy(np.asarray(batch["item_id"]).astype(np.int64)).to(device)
    self.loss = None

  def run(self, steps: int) -> None:
    for _ in range(steps):
      self.loss = self.step(self.images, self.labels)
    if self.device.type == "cuda":
      torch.cuda.synchronize()
    self.loss = float(self.loss)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--batch_size", type=int, default=32, help="P x K with K = 4")
  parser.add_argument("--num_classes", type=int, default=23)
  parser.add_argument("--dtype", choices=jax_bench.DTYPES, default="float32")
  parser.add_argument("--steps", type=int, default=3, help="steps per contestant per round")
  parser.add_argument("--rounds", type=int, default=7, help="alternating rounds; medians are reported")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps per contestant after compiling")
  parser.add_argument("--compile", choices=("on", "off"), default="on", help="also time torch.compile")
  parser.add_argument("--channels_last", choices=("auto", "on", "off"), default="auto",
                      help="PyTorch NHWC memory format; auto: on for a GPU (cuDNN), off for the CPU (measured)")
  parser.add_argument("--threads", type=int, default=0,
                      help="CPU cores for the process and threads for PyTorch; 0: all")
  args = parser.parse_args()
  if args.threads:
    # Before JAX starts its CPU backend (the first jax call below): XLA sizes its thread pools by the CPUs this
    # process may run on, and XLA_FLAGS are read then.
    available = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, available[:args.threads])
    torch.set_num_threads(args.threads)
    if args.threads == 1:
      os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
  load_at_start = os.getloadavg()[0]
  config = jax_bench.bench_config(model="rccapsnet", image_size=args.image_size, batch_size=args.batch_size,
                                  num_classes=args.num_classes, loss="triplet", dtype=args.dtype)
  device = torch_device()
  channels_last = args.channels_last == "on" or (args.channels_last == "auto" and device.type == "cuda")

  contestants = {}
  setup_s = {}
  start = time.perf_counter()
  contestants["jax"] = jax_runner = jax_bench.StepRunner(config)
  jax_runner.run(args.warmup)
  setup_s["jax"] = time.perf_counter() - start
  # Same initial weights and batch on both sides (copied before JAX's first step would not matter for speed).
  params = jax.device_get(jax_runner.state.params)
  batch_stats = jax.device_get(jax_runner.state.batch_stats)
  # The twin takes normalised float images (the JAX step gets uint8 pixels and augments them on the device,
  # a few percent of its time at most; see docs/benchmarks.md).
  host_batch = {**jax.device_get(jax_runner.batch), "image": jax_bench.synthetic_batch(config, config.seed)["image"]}
  variants = {"torch_eager": False}
  if args.compile == "on":
    variants["torch_compile"] = True
  errors = {}
  for name, compiled in variants.items():
    start = time.perf_counter()
    try:
      runner = TorchRunner(config, params, batch_stats, host_batch, compile=compiled,
                           channels_last=channels_last, dtype=args.dtype, device=device)
      runner.run(args.warmup)
    except Exception as e:  # pylint: disable=broad-except
      if not compiled:
        raise
      errors[name] = f"{type(e).__name__}: {str(e)[:500]}"  # torch.compile may lack a compiler here.
      print(f"{name} failed, left out: {errors[name]}")
      continue
    contestants[name] = runner
    setup_s[name] = time.perf_counter() - start

  names = list(contestants)
  windows = {name: [] for name in names}
  cpu_windows = {name: [] for name in names}
  for round_index in range(args.rounds):
    order = names if round_index % 2 == 0 else names[::-1]
    for name in order:
      start, start_cpu = time.perf_counter(), time.process_time()
      contestants[name].run(args.steps)
      windows[name].append(time.perf_counter() - start)
      cpu_windows[name].append(time.process_time() - start_cpu)

  images_per_sec = {name: args.batch_size * args.steps / statistics.median(w) for name, w in windows.items()}
  ratios = {f"jax_over_{name}": images_per_sec["jax"] / images_per_sec[name] for name in names if name != "jax"}
  cpu_ms_per_step = {name: 1e3 * statistics.median(w) / args.steps for name, w in cpu_windows.items()}
  cpu_ratios = {f"jax_over_{name}": cpu_ms_per_step[name] / cpu_ms_per_step["jax"]
                for name in names if name != "jax"}
  print(f"RCCapsNet {args.image_size}x{args.image_size}, batch {args.batch_size}, {args.dtype}, triplet loss, "
        f"on {jax.devices()[0].device_kind} / torch {device}:")
  for name in names:
    runs = ", ".join(f"{args.batch_size * args.steps / w:.1f}" for w in windows[name])
    print(f"  {name:<14} {images_per_sec[name]:8.1f} images/s (median; rounds: {runs}); "
          f"CPU {cpu_ms_per_step[name]:.0f} ms/step")
  for name, ratio in ratios.items():
    print(f"  {name}: {ratio:.3f} (images/s), {cpu_ratios[name]:.3f} (by CPU time per step)")
  print(json.dumps({
      "benchmark": "train_step_vs_torch",
      "image_size": args.image_size, "batch_size": args.batch_size, "num_classes": args.num_classes,
      "dtype": args.dtype, "steps": args.steps, "rounds": args.rounds,
      "channels_last": channels_last, "threads": args.threads,
      "images_per_sec": images_per_sec, "ratios": ratios,
      "cpu_ms_per_step": cpu_ms_per_step, "cpu_time_ratios": cpu_ratios,
      "window_s": windows, "setup_s": setup_s, "errors": errors,
      "losses": {name: float(c.metrics["loss"]) if name == "jax" else c.loss
                 for name, c in contestants.items()},
      "flop_source": "jaxpr", "flops_per_image": jax_runner.flops_per_step / args.batch_size,
      "device": jax.devices()[0].device_kind, "torch_device": str(device),
      "jax": jax.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
      "python": platform.python_version(), "cpu_count": os.cpu_count(),
      "load_average_start_end": [load_at_start, os.getloadavg()[0]],
      "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
  }))


if __name__ == "__main__":
  main()
