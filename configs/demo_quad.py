"""Demo of QRCCapsNet's recipe: configs/inshop_quad.py's loss, mining and sampler on the synthetic data.

configs/demo.py's small network and data (`synthetic_inshop/small`, generated on first use; a few minutes on
a laptop CPU), trained with the category-aware quadruplet loss exactly as configs/inshop_quad.py trains
QRCCapsNet (tests/test_train.py checks that the two agree). Run from the repository root:

  python -m jaxret.train --config configs/demo_quad.py --workdir /tmp/jaxret_demo_quad

`--config configs/demo_quad.py:smoke` shrinks it to a run of seconds.
"""

from jaxret import run_config


def get_config(arg=None):
  config = run_config.demo_config()  # configs/demo.py's data and schedule; 2 categories x 4 products x 4 images.
  config.input.sampler = "category_balanced"
  config.input.categories_per_batch = 2
  config.model.name = "qrccapsnet_tiny"
  config.model.dropout_rate = 0.0
  config.model.logit_update = "replace"
  config.loss.name = "category_quadruplet"
  config.loss.category_quadruplet.update(margin1=0.2, margin2=0.2, weight1=0.9, weight2=0.1, squared=False,
                                         mining="batch_all")
  config.total_steps = 1500  # The length of the sweep's runs (docs/benchmarks.md).
  return run_config.finalize(config, arg)
