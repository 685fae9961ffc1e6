"""Demo: a small RCCapsNet on the synthetic In-shop dataset, a few minutes on a laptop CPU.

The dataset is generated on first use (no download). Run from the repository root:

  python -m jaxret.train --config configs/demo.py --workdir /tmp/jaxret_demo

`--config configs/demo.py:smoke` shrinks it to a run of seconds (used by the tests).
"""

from jaxret import run_config


def get_config(arg=None):
  config = run_config.base_config()
  config.input.dataset = "synthetic_inshop/small"
  config.input.image_size = 64
  config.input.batch_size = 32  # 8 products x 4 images.
  config.input.images_per_product = 4
  # The synthetic views already vary pose, zoom and light a lot; a light crop and jitter on top of them.
  config.input.crop_scale = (0.85, 1.0)
  config.input.color_jitter = 0.1
  config.model.name = "rccapsnet_tiny"
  config.model.dropout_rate = 0.0  # A short run on small data gains nothing from dropout (measured).
  config.model.logit_update = "replace"  # As the published RCCapsNet code routes.
  # Batch-all triplets: from scratch, the batch-hard losses (triplet and quadruplet) collapse every embedding
  # onto one point in this short run; averaging over all active triplets does not (docs/benchmarks.md).
  config.loss.name = "triplet"
  config.loss.triplet.update(margin=0.2, mining="batch_all")
  config.optim.learning_rate = 1e-3
  config.total_steps = 3000
  config.warmup_steps = 50
  config.log_every = 25
  config.eval_every = 500
  config.checkpoint_every = 500
  return run_config.finalize(config, arg)
