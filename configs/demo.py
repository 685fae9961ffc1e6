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
  config.input.batch_size = 32
  config.input.images_per_product = 4
  config.model.name = "rccapsnet_tiny"
  config.loss.name = "quadruplet"
  config.loss.quadruplet.margin1 = 0.3
  config.loss.quadruplet.margin2 = 0.15
  config.optim.learning_rate = 1e-3
  config.total_steps = 600
  config.warmup_steps = 30
  config.eval_every = 200
  config.checkpoint_every = 200
  return run_config.finalize(config, arg)
