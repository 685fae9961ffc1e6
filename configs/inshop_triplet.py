"""RCCapsNet on DeepFashion In-shop with the batch-hard triplet loss (Kinli, Ozcan & Kirac 2019).

Needs the dataset prepared once (see docs/deepfashion.md):

  python -m data_prep.deepfashion_inshop --manual_dir ~/deepfashion/inshop
  python -m jaxret.train --config configs/inshop_triplet.py --workdir ~/runs/rccapsnet_triplet

SCCapsNet instead of RC: `--config.model.name=sccapsnet`.
"""

from jaxret import run_config


def get_config(arg=None):
  config = run_config.base_config()
  config.input.dataset = "deepfashion_inshop/all"
  config.input.image_size = 256  # The release's size; the models' strides assume it for 16x16 capsules.
  config.input.batch_size = 64
  config.input.images_per_product = 4
  config.input.num_threads = 16
  config.model.name = "rccapsnet"
  config.loss.name = "triplet"
  config.loss.triplet.update(margin=0.2, mining="batch_hard", squared=False)
  config.optim.learning_rate = 1e-3
  config.total_steps = 20_000  # About 50 epochs of the 25,882 training images.
  config.warmup_steps = 500
  config.log_every = 50
  config.eval_every = 2_000
  config.checkpoint_every = 1_000
  config.evals.batch_size = 256
  return run_config.finalize(config, arg)
