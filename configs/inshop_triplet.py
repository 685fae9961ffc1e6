"""RCCapsNet on DeepFashion In-shop with the batch-hard triplet loss (Kinli, Ozcan & Kirac 2019).

Needs the dataset prepared once (see docs/deepfashion.md):

  python -m data_prep.deepfashion_inshop --manual_dir ~/deepfashion/inshop
  python -m jaxret.train --config configs/inshop_triplet.py --workdir ~/runs/rccapsnet_triplet

SCCapsNet instead of RC: `--config.model.name=sccapsnet`.
"""

from jaxret import run_config


def get_config(arg=None):
  config = run_config.inshop_config()
  config.model.name = "rccapsnet"
  config.loss.name = "triplet"
  config.loss.triplet.update(margin=0.2, mining="batch_hard", squared=False)
  return run_config.finalize(config, arg)
