"""The trainer as users run it, against its own step: loop images/s, bare-step images/s, their ratio, host CPU.

Run from the repository root (the same command on a CPU, a GPU or a TPU):

  python -m bench.train_e2e                                   # RCCapsNet 256x256, batch 256, bfloat16
  python -m bench.train_e2e --model rccapsnet_tiny --image_size 64 --batch_size 32 --dtype float32

For each `--modes` value of `config.input.cache` it runs `jaxret.trainer.train_and_evaluate` itself (the real
loop: decoded cache, input threads or workers, the jitted step, logging, a checkpoint and the evaluations at
the start and the end) on `--dataset` for `--warmup` + `--steps` steps in a fresh workdir, and reads from its
`metrics.jsonl` the images/s and `host_cpu_ms_per_image` (CPU time of the loop's thread and the input's
threads per image: the host's work outside XLA's computations; the `stream` mode's decoding workers are other
processes, see bench/input_pipeline.py) of every logged window after the warm-up. Then, in the same process,
`bench.train_step` times `trainer.make_train_step`'s step alone on a batch kept on the device. Printed side
by side: loop images/s (median over windows), bare-step images/s (median over windows), their ratio, and the
host CPU ms per image. The default dataset is `synthetic_inshop/small` (64x64 JPEGs, decoded to the cache at
`--image_size`), as in the issue that asked for this benchmark; the last line of stdout is JSON.
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import jax
import numpy as np

from bench import train_step as step_bench
from jaxret import run_config
from jaxret import trainer


def e2e_config(args, mode: str, data_dir: str):
  config = run_config.base_config()
  config.data_dir = data_dir
  config.input.dataset = args.dataset
  config.input.image_size = args.image_size
  config.input.batch_size = args.batch_size
  config.input.images_per_product = 4
  config.input.cache = mode
  if args.workers is not None:
    config.input.num_workers = args.workers
  config.model.name = args.model
  config.model.num_classes = 23
  config.model.dtype = args.dtype
  config.loss.name = "triplet"
  config.total_steps = args.warmup + args.steps
  config.warmup_steps = 1
  config.log_every = args.log_every
  config.eval_every = config.checkpoint_every = config.total_steps
  config.evals.batch_size = args.batch_size
  run_config.validate(config, device_count=jax.device_count())
  return config


def loop_numbers(config, workdir: str, warmup: int) -> dict[str, float]:
  """Runs the trainer; images/s and host CPU ms/image of its logged windows after `warmup` steps (medians)."""
  start = time.perf_counter()
  trainer.train_and_evaluate(config, workdir)
  wall = time.perf_counter() - start
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if "images_per_sec" in line]
  windows = [r for r in rows if r["step"] > warmup + config.log_every]  # Past the warm-up and its window.
  if not windows:
    raise ValueError("No logged window after the warm-up; use more --steps or a smaller --log_every.")
  return {"images_per_sec": statistics.median(r["images_per_sec"] for r in windows),
          "host_cpu_ms_per_image": statistics.median(r["host_cpu_ms_per_image"] for r in windows),
          "windows": len(windows), "wall_s": wall}


def bare_step_numbers(config, steps: int, repeats: int) -> dict[str, float]:
  """images/s of `trainer.make_train_step`'s step alone (batch on the device), median of `repeats` windows."""
  runner = step_bench.StepRunner(config)
  runner.run(2)
  windows = step_bench.time_windows(lambda: runner.run(steps), repeats)
  return {"images_per_sec": config.input.batch_size * steps / statistics.median(windows),
          "loss": float(runner.metrics["loss"])}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--dataset", default="synthetic_inshop/small")
  parser.add_argument("--data_dir", default=os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets"))
  parser.add_argument("--model", default="rccapsnet")
  parser.add_argument("--image_size", type=int, default=256)
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
  parser.add_argument("--modes", default="device,host,stream")
  parser.add_argument("--workers", type=int, default=None, help="config.input.num_workers (None: one per core)")
  parser.add_argument("--warmup", type=int, default=10, help="steps before the timed windows")
  parser.add_argument("--steps", type=int, default=60, help="timed steps of the loop")
  parser.add_argument("--log_every", type=int, default=10, help="steps per timed window")
  parser.add_argument("--bare_steps", type=int, default=10, help="steps per bare-step window")
  parser.add_argument("--bare_repeats", type=int, default=5)
  parser.add_argument("--workdir", default=None, help="where the runs go (default: a temporary folder)")
  args = parser.parse_args()
  load_at_start = os.getloadavg()[0]
  root = args.workdir or tempfile.mkdtemp(prefix="jaxret_e2e_")
  results = []
  for mode in args.modes.split(","):
    config = e2e_config(args, mode, args.data_dir)
    loop = loop_numbers(config, os.path.join(root, mode), args.warmup)
    bare = bare_step_numbers(config, args.bare_steps, args.bare_repeats)
    results.append({"mode": mode, "loop_images_per_sec": loop["images_per_sec"],
                    "bare_step_images_per_sec": bare["images_per_sec"],
                    "loop_over_bare": loop["images_per_sec"] / bare["images_per_sec"],
                    "host_cpu_ms_per_image": loop["host_cpu_ms_per_image"], "windows": loop["windows"],
                    "run_wall_s": loop["wall_s"]})
  device = jax.devices()[0]
  print(f"\n{args.model} {args.image_size}x{args.image_size}, batch {args.batch_size}, {args.dtype}, on "
        f"{jax.device_count()} x {device.device_kind}:")
  print("| cache | loop images/s | bare step images/s | loop / step | host CPU ms / image |")
  print("| --- | ---: | ---: | ---: | ---: |")
  for r in results:
    print(f"| {r['mode']} | {r['loop_images_per_sec']:.1f} | {r['bare_step_images_per_sec']:.1f} | "
          f"{r['loop_over_bare']:.3f} | {r['host_cpu_ms_per_image']:.3f} |")
  print(json.dumps({
      "benchmark": "train_e2e", "dataset": args.dataset, "model": args.model, "image_size": args.image_size,
      "batch_size": args.batch_size, "dtype": args.dtype, "warmup": args.warmup, "steps": args.steps,
      "log_every": args.log_every, "workers": args.workers, "results": results,
      "device": device.device_kind, "device_count": jax.device_count(), "platform": device.platform,
      "jax": jax.__version__, "python": platform.python_version(), "numpy": np.__version__,
      "cpu_count": os.cpu_count(), "load_average_start_end": [load_at_start, os.getloadavg()[0]],
      "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
  }))


if __name__ == "__main__":
  main()
