"""Demo: a small RCCapsNet on the synthetic In-shop dataset, a few minutes on a laptop CPU.

The dataset is generated on first use (no download). Run from the repository root:

  python -m jaxret.train --config configs/demo.py --workdir /tmp/jaxret_demo

`--config configs/demo.py:smoke` shrinks it to a run of seconds (used by the tests).
"""

from jaxret import run_config


def get_config(arg=None):
  config = run_config.demo_config()  # synthetic_inshop/small, 64x64, 8 products x 4 images, 3,000 steps.
  config.model.name = "rccapsnet_tiny"
  config.model.dropout_rate = 0.0  # A short run on small data gains nothing from dropout (measured).
  config.model.logit_update = "replace"  # As the published RCCapsNet code routes.
  # Batch-all triplets: from scratch, the batch-hard losses (triplet and quadruplet) collapse every embedding
  # onto one point in this short run; averaging over all active triplets does not (docs/benchmarks.md).
  config.loss.name = "triplet"
  config.loss.triplet.update(margin=0.2, mining="batch_all")
  return run_config.finalize(config, arg)
