"""Time and memory of every loss's value+grad on a P x K batch, as a function of the batch size B.

Run from the repository root:

  python -m bench.losses                                # B = 256, 1024, 4096, D = 128, all losses
  python -m bench.losses --batch_sizes=256 --losses=quadruplet

For each (loss, B) a fresh child process builds `jax.jit(jax.value_and_grad(loss))`, reports the compiled
executable's `memory_analysis()` (temp + argument + output bytes: what XLA allocates for one call), then
times it: 2 warm-up calls, then the median of `--repeats` calls (fewer at B = 4096). The child also reports
its peak-RSS growth (`ru_maxrss`) from after the inputs were built to after the timed calls, which includes
compilation. A table goes to stdout; the last line is JSON with every number.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

# (label, loss name in jaxret.losses.LOSSES, keyword arguments). Margins are typical values; they do not
# change the cost.
CONFIGS = {
    "triplet/batch_hard": ("triplet", dict(margin=0.2, mining="batch_hard")),
    "triplet/batch_all": ("triplet", dict(margin=0.2, mining="batch_all")),
    "triplet/semi_hard": ("triplet", dict(margin=0.2, mining="semi_hard")),
    "quadruplet": ("quadruplet", dict(margin1=0.3, margin2=0.15)),
    "quadruplet/adaptive": ("quadruplet", dict(margin1=0.3, margin2=0.15, adaptive_margin=True)),
    "category_quadruplet": ("category_quadruplet", {}),
    "contrastive": ("contrastive", dict(margin=1.0)),
}
IMAGES_PER_CLASS = 4  # K of the P x K batch.
NUM_CATEGORIES = 16


def _peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB.


def measure(config_name: str, batch_size: int, dim: int, repeats: int) -> dict:
  """One (loss, B) measurement in this process."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from jaxret import losses  # pylint: disable=g-import-not-at-top

  loss_name, kwargs = CONFIGS[config_name]
  rng = np.random.default_rng(0)
  num_classes = batch_size // IMAGES_PER_CLASS
  labels = rng.permutation(np.repeat(rng.choice(10**6, num_classes, replace=False), IMAGES_PER_CLASS))
  embeddings = rng.normal(size=(batch_size, dim)).astype(np.float32)
  batch = {"item_id": labels.astype(np.int32), "category": (labels % NUM_CATEGORIES).astype(np.int32)}
  args = [jax.device_put(embeddings), jax.device_put(batch)]
  loss = losses.get_loss(loss_name)
  options = loss.options_from(kwargs)
  # The trainer's call of every loss (see jaxret.losses.registry); no loss here owns parameters.
  step = jax.jit(jax.value_and_grad(lambda emb, labels: loss({}, {"embedding": emb}, labels, options)[0]))
  rss_before = _peak_rss_bytes()

  start = time.perf_counter()
  compiled = step.lower(*args).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  xla_bytes = memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes
  for _ in range(2):
    jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    value, grad = jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  if not (np.isfinite(value) and np.all(np.isfinite(grad))):
    raise FloatingPointError(f"{config_name} at B={batch_size}: non-finite value or gradient.")
  return {
      "loss": config_name,
      "batch_size": batch_size,
      "dim": dim,
      "median_ms": 1e3 * statistics.median(times),
      "min_ms": 1e3 * min(times),
      "repeats": repeats,
      "compile_s": compile_s,
      "xla_temp_bytes": memory.temp_size_in_bytes,
      "xla_total_bytes": xla_bytes,
      "peak_rss_growth_bytes": _peak_rss_bytes() - rss_before,
      "value": float(value),
  }


def _mib(num_bytes: float) -> str:
  return f"{num_bytes / 2**20:.1f}"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--batch_sizes", default="256,1024,4096", help="comma-separated batch sizes B")
  parser.add_argument("--dim", type=int, default=128, help="embedding size D")
  parser.add_argument("--losses", default=",".join(CONFIGS), help=f"comma-separated, from {list(CONFIGS)}")
  parser.add_argument("--repeats", type=int, default=10, help="timed calls (3 at B >= 4096)")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
  names = args.losses.split(",")
  unknown = [n for n in names if n not in CONFIGS]
  if unknown:
    parser.error(f"unknown losses {unknown}; use some of {list(CONFIGS)}")
  if args.child:
    print(json.dumps(measure(names[0], batch_sizes[0], args.dim, args.repeats)))
    return

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  load_at_start = os.getloadavg()[0]
  results = []
  header = (f"{'loss':<22} {'B':>5} {'median ms':>10} {'min ms':>9} {'XLA MiB':>8} {'temp MiB':>9} "
            f"{'RSS+ MiB':>9} {'compile s':>9}")
  print(header)
  print("-" * len(header))
  for name in names:
    for batch_size in batch_sizes:
      repeats = min(args.repeats, 3) if batch_size >= 4096 else args.repeats
      # A fresh process per row, so that peak RSS growth belongs to this row alone.
      out = subprocess.run([sys.executable, "-m", "bench.losses", "--child", f"--losses={name}",
                            f"--batch_sizes={batch_size}", f"--dim={args.dim}", f"--repeats={repeats}"],
                           check=True, capture_output=True, text=True).stdout
      row = json.loads(out.strip().splitlines()[-1])
      results.append(row)
      print(f"{name:<22} {batch_size:>5} {row['median_ms']:>10.1f} {row['min_ms']:>9.1f} "
            f"{_mib(row['xla_total_bytes']):>8} {_mib(row['xla_temp_bytes']):>9} "
            f"{_mib(row['peak_rss_growth_bytes']):>9} {row['compile_s']:>9.2f}", flush=True)
  print(json.dumps({
      "benchmark": "losses",
      "jax": jax.__version__,
      "numpy": np.__version__,
      "python": platform.python_version(),
      "device": str(jax.devices()[0].device_kind),
      "cpu_count": os.cpu_count(),
      # Other processes on the machine slow the timings (not the memory numbers): 1-minute load averages.
      "load_average_start_end": [load_at_start, os.getloadavg()[0]],
      "results": results,
  }))


if __name__ == "__main__":
  main()
