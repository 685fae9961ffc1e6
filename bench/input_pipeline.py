"""The training data path alone: batches made and put on the devices, no step, for each `config.input.cache` mode.

Run from the repository root:

  python -m bench.input_pipeline                      # 256x256 JPEGs -> 256x256 uint8 batches of 256
  python -m bench.input_pipeline --cores 1 --modes host,device
  python -m bench.input_pipeline --cores 2 --modes stream --workers 1,2

The data are a 256x256 `synthetic_inshop` variant made on first use in `--data_dir` (1,600 training images,
about a minute to render; In-shop's images are 256x256 JPEGs too, so decoding costs the same per image);
`--dataset` reads any prepared In-shop dataset instead, e.g. `deepfashion_inshop/default`.

What it measures, each the median of `--repeats` runs of `--steps` steps (after one untimed step that
compiles, uploads or starts workers):
  * `decode_per_core`: `jaxret.decoded_cache.decode_pixels` (JPEG -> uint8 at the cache size) in one thread.
  * `cache_build`: decoding the split into its memory-mapped cache with `--build_workers` processes (once).
  * for each mode, `jaxret.input_pipeline.train_batches` as the trainer runs it (P x K batches of
    `--batch_size`, 4 images per product), every batch waited for on the devices: images/s, and host CPU
    ms per image (this process's CPU, all threads; for `stream` plus its decoding worker processes').
`--cores N` pins the process (and so JAX's thread pools and the workers it starts) to N cores. The last line
of stdout is JSON with every number.
"""

import argparse
import hashlib
import json
import os
import platform
import statistics
import tempfile
import time

import jax
import numpy as np

from jaxret import decoded_cache
from jaxret import input_pipeline
from jaxret import samplers
from jaxret import sharding

BENCH_CONFIG_NAME = "bench256"


def bench_builder(data_dir: str):
  """A 256x256 synthetic In-shop with 200 training products (rendered into `data_dir` on first use)."""
  from data_prep import synthetic_inshop  # pylint: disable=g-import-not-at-top
  fields = dict(description="256x256, 200 train / 50 test products; for bench/input_pipeline.py.",
                image_size=256, supersample=1, num_train_items=200, num_test_items=50, num_train_images=1600,
                num_query_images=100, num_gallery_images=100, num_workers=0)
  # The folder is named after the settings (the renderer's defaults may change), so a stale one is never read.
  settings = synthetic_inshop.SyntheticInshopConfig(name=BENCH_CONFIG_NAME, **fields).settings()
  digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
  config = synthetic_inshop.SyntheticInshopConfig(name=f"{BENCH_CONFIG_NAME}_{digest}", **fields)
  builder = synthetic_inshop.SyntheticInshop(config=config, data_dir=data_dir)
  if not builder.is_prepared():
    start = time.perf_counter()
    print(f"Rendering synthetic_inshop/{config.name} into {data_dir} (once) ...", flush=True)
    builder.download_and_prepare()
    print(f"  done in {time.perf_counter() - start:.0f} s.", flush=True)
  return builder


def children_cpu_seconds() -> dict[int, float]:
  """CPU seconds used so far by each live descendant process of this one (pid -> seconds), from /proc."""
  seconds, pending = {}, [os.getpid()]
  ticks = os.sysconf("SC_CLK_TCK")
  while pending:
    pid = pending.pop()
    try:
      for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
          children = [int(c) for c in f.read().split()]
        for child in children:
          if child in seconds:
            continue
          with open(f"/proc/{child}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
          seconds[child] = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
          pending.append(child)
    except (FileNotFoundError, ProcessLookupError):
      continue
  return seconds


def decode_rate(source, records: np.ndarray, size: int) -> float:
  """Images/s of one thread reading records and decoding them to `[size, size, 3]` uint8."""
  start = time.perf_counter()
  for index in records:
    pixels = decoded_cache.decode_pixels(source[int(index)]["image"], size)
  if pixels.shape != (size, size, 3):
    raise AssertionError(f"decode_pixels gave {pixels.shape}")
  return len(records) / (time.perf_counter() - start)


def data_path_rate(mode: str, split, source, sampler, mesh, *, size: int, steps: int, workers: int,
                   prefetch: int) -> dict[str, float]:
  """images/s and host CPU ms per image of `train_batches(mode)` alone, every batch waited for on the devices."""
  # More steps than timed, so that worker processes still run (and show their CPU time) at the end.
  batches = input_pipeline.train_batches(mode, split, sampler, mesh, first_step=0, num_steps=steps + 2 + prefetch,
                                         source=source, size=size, num_workers=workers, prefetch=prefetch)
  try:
    jax.block_until_ready(next(batches))  # Compiles the gather, uploads the split, or starts the workers.
    start, cpu, child_cpu = time.perf_counter(), time.process_time(), children_cpu_seconds()
    for _ in range(steps):
      jax.block_until_ready(next(batches))
    elapsed = time.perf_counter() - start
    child_end = children_cpu_seconds()
    cpu = time.process_time() - cpu + sum(child_end[pid] - child_cpu.get(pid, 0.0) for pid in child_end)
  finally:
    batches.close()
  images = steps * sampler.batch_size
  return {"images_per_sec": images / elapsed, "cpu_ms_per_image": 1e3 * cpu / images}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--data_dir", default=os.path.join(tempfile.gettempdir(), "jaxret_bench_data"))
  parser.add_argument("--dataset", default=None, help="a prepared TFDS In-shop dataset to read instead")
  parser.add_argument("--size", type=int, default=256, help="side of the decoded (cached) images")
  parser.add_argument("--batch_size", type=int, default=256, help="global batch (P x 4)")
  parser.add_argument("--modes", default="host,device,stream")
  parser.add_argument("--workers", default="1,2", help="comma-separated worker processes for stream")
  parser.add_argument("--build_workers", type=int, default=None, help="processes building the cache")
  parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--prefetch", type=int, default=2)
  parser.add_argument("--images", type=int, default=300, help="images of the single-thread decode run")
  parser.add_argument("--cores", type=int, default=0, help="pin the process to this many cores; 0: all")
  args = parser.parse_args()
  if args.cores:  # Before JAX starts its CPU backend: XLA sizes its thread pools by the CPUs it may use.
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.cores])
  load_at_start = os.getloadavg()[0]
  if args.dataset:
    builder = input_pipeline.get_builder(args.dataset, args.data_dir, prepare=False)
  else:
    builder = bench_builder(args.data_dir)
  source = input_pipeline.read_split(builder, "train")
  cache_dir = os.path.join(args.data_dir, "decoded_bench")
  start = time.perf_counter()
  split = decoded_cache.open_split(builder, "train", args.size, cache_dir=cache_dir, num_workers=args.build_workers)
  labels = decoded_cache.open_split(builder, "train", None, cache_dir=cache_dir, num_workers=args.build_workers)
  open_s = time.perf_counter() - start
  sampler = samplers.PKSampler(split.index.item_ids, args.batch_size // 4, 4, seed=0)
  mesh = sharding.data_mesh()
  records = np.random.default_rng(0).permutation(len(split))[:args.images]
  decode = statistics.median(decode_rate(source, records, args.size) for _ in range(args.repeats))
  print(f"decode_pixels to {args.size}x{args.size}: {decode:.0f} images/s on one thread; cache opened (or built) "
        f"in {open_s:.1f} s", flush=True)

  results = []
  for mode in args.modes.split(","):
    for workers in ([int(w) for w in args.workers.split(",")] if mode == "stream" else [0]):
      runs = [data_path_rate(mode, labels if mode == "stream" else split, source, sampler, mesh, size=args.size,
                             steps=args.steps, workers=workers, prefetch=args.prefetch) for _ in range(args.repeats)]
      row = {"mode": mode, "workers": workers if mode == "stream" else None,
             "images_per_sec": statistics.median(r["images_per_sec"] for r in runs),
             "cpu_ms_per_image": statistics.median(r["cpu_ms_per_image"] for r in runs),
             "runs": [r["images_per_sec"] for r in runs]}
      results.append(row)
      name = f"{mode} ({workers} worker{'s' if workers != 1 else ''})" if mode == "stream" else mode
      print(f"{name:<20} {row['images_per_sec']:>9.0f} images/s   {row['cpu_ms_per_image']:.3f} CPU ms/image",
            flush=True)
  stream = {r["workers"]: r["images_per_sec"] for r in results if r["mode"] == "stream"}
  scaling = {f"{w}_over_1": stream[w] / stream[1] for w in stream if w != 1 and 1 in stream}
  if scaling:
    print("stream scaling: " + ", ".join(f"{k.replace('_over_', ' over ')} workers {v:.2f}x"
                                         for k, v in scaling.items()))
  print(json.dumps({
      "benchmark": "input_pipeline",
      "dataset": args.dataset or f"synthetic_inshop/{builder.builder_config.name}", "size": args.size,
      "batch_size": args.batch_size, "steps": args.steps, "repeats": args.repeats, "prefetch": args.prefetch,
      "cores": len(os.sched_getaffinity(0)), "decode_per_core": decode, "cache_open_s": open_s,
      "results": results, "stream_scaling": scaling,
      "device": jax.devices()[0].device_kind, "device_count": jax.device_count(), "jax": jax.__version__,
      "python": platform.python_version(), "numpy": np.__version__, "cpu_count": os.cpu_count(),
      "load_average_start_end": [load_at_start, os.getloadavg()[0]],
      "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
  }))


if __name__ == "__main__":
  main()
