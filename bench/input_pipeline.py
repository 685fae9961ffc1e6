"""Decoded, augmented training images per second per CPU core, read from ArrayRecord as the trainer reads them.

Run from the repository root:

  python -m bench.input_pipeline                        # 256x256 JPEGs (In-shop's size), 256x256 output
  python -m bench.input_pipeline --output_size 64 --threads 1,2

The data are a 256x256 `synthetic_inshop` variant made on first use in `--data_dir` (1,600 training images,
about a minute to render; In-shop's images are 256x256 JPEGs too, so decoding costs the same per image);
`--dataset` reads any prepared In-shop dataset instead, e.g. `deepfashion_inshop/default`.

Three numbers per output size, each the median of `--repeats` runs:
  * `decode_augment_per_core`: one thread reading records from the ArrayRecord source and running
    `jaxret.input_pipeline.decode_image` with the trainer's augmentation (random resized crop, flip,
    brightness and contrast jitter, normalisation): images/s of one core.
  * `decode_eval_per_core`: the same without augmentation (the evaluation path).
  * `train_batches`: the trainer's own grain pipeline (`input_pipeline.train_batches`, P x K batches of 32)
    with `--threads` decoding threads: images/s, and images/s per thread.
The last line of stdout is JSON with every number.
"""

import argparse
import hashlib
import io
import json
import os
import platform
import statistics
import time

import numpy as np
from PIL import Image

from jaxret import input_pipeline
from jaxret import samplers

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


def decode_rate(source, records: np.ndarray, output_size: int, augment: bool, seed: int = 0) -> float:
  """Images/s of one thread: read each record and decode it (with the trainer's augmentation if `augment`)."""
  rng = np.random.default_rng(seed)
  start = time.perf_counter()
  for index in records:
    record = source[int(index)]
    image = input_pipeline.decode_image(record["image"], output_size, rng if augment else None)
  if image.shape != (output_size, output_size, 3):
    raise AssertionError(f"decode_image gave {image.shape}")
  return len(records) / (time.perf_counter() - start)


def pipeline_rate(source, sampler, output_size: int, threads: int, steps: int) -> float:
  """Images/s of `input_pipeline.train_batches` with `threads` decoding threads (after its first batch)."""
  batches = input_pipeline.train_batches(source, sampler, image_size=output_size, first_step=0,
                                         num_steps=steps + 1, num_threads=threads,
                                         augment={"crop_scale": (0.6, 1.0), "color_jitter": 0.2})
  next(batches)  # Thread start-up and the first prefetch are not part of the rate.
  start = time.perf_counter()
  count = sum(len(batch["image"]) for batch in batches)
  return count / (time.perf_counter() - start)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--data_dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "jaxret_bench_data"))
  parser.add_argument("--dataset", default=None, help="a prepared TFDS In-shop dataset to read instead")
  parser.add_argument("--output_sizes", default="256,64", help="comma-separated output image sizes")
  parser.add_argument("--images", type=int, default=400, help="images per single-thread run")
  parser.add_argument("--threads", default="1,2", help="comma-separated grain thread counts")
  parser.add_argument("--steps", type=int, default=12, help="batches of 32 per train_batches run")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  load_at_start = os.getloadavg()[0]
  if args.dataset:
    builder = input_pipeline.get_builder(args.dataset, args.data_dir, prepare=False)
  else:
    builder = bench_builder(args.data_dir)
  source = input_pipeline.read_split(builder, "train")
  index = input_pipeline.index_split(source)
  sampler = samplers.PKSampler(index.item_ids, 8, 4, seed=0)
  records = np.random.default_rng(0).permutation(len(index))[:args.images]
  jpeg_bytes = float(np.mean([len(source[int(i)]["image"]) for i in records[:100]]))
  input_size = Image.open(io.BytesIO(source[int(records[0])]["image"])).size

  results = []
  for size in (int(s) for s in args.output_sizes.split(",")):
    augment = [decode_rate(source, records, size, True, seed=r) for r in range(args.repeats)]
    plain = [decode_rate(source, records, size, False) for _ in range(args.repeats)]
    row = {"output_size": size, "decode_augment_per_core": statistics.median(augment),
           "decode_eval_per_core": statistics.median(plain), "train_batches": {}}
    for threads in (int(t) for t in args.threads.split(",")):
      rate = statistics.median(pipeline_rate(source, sampler, size, threads, args.steps)
                               for _ in range(args.repeats))
      row["train_batches"][threads] = {"images_per_sec": rate, "per_thread": rate / threads}
    results.append(row)
    print(f"{size}x{size} output: decode+augment {row['decode_augment_per_core']:.0f} images/s per core, "
          f"decode only {row['decode_eval_per_core']:.0f}; train_batches: "
          + ", ".join(f"{t} thread(s) {v['images_per_sec']:.0f}" for t, v in row["train_batches"].items()))
  print(json.dumps({
      "benchmark": "input_pipeline",
      "dataset": args.dataset or f"synthetic_inshop/{builder.builder_config.name}",
      "input_size": list(input_size), "mean_jpeg_bytes": jpeg_bytes, "images": len(records),
      "repeats": args.repeats, "results": results,
      "python": platform.python_version(), "numpy": np.__version__, "cpu_count": os.cpu_count(),
      "load_average_start_end": [load_at_start, os.getloadavg()[0]],
      "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
  }))


if __name__ == "__main__":
  main()
