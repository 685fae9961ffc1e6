"""QRCCapsNet on DeepFashion In-shop: RCCapsNet trained with the category-aware quadruplet loss.

Khatami & Fadaeieslam 2022 (QRCCapsNet). Needs the dataset prepared once (see docs/deepfashion.md):

  python -m data_prep.deepfashion_inshop --manual_dir ~/deepfashion/inshop
  python -m jaxret.train --config configs/inshop_quad.py --workdir ~/runs/qrccapsnet

The paper trains WOMEN and MEN separately: `--config.input.dataset=deepfashion_inshop/women`.
SCCapsNet instead of RC: `--config.model.name=sccapsnet`.
"""

from jaxret import run_config


def get_config(arg=None):
  config = run_config.inshop_config()
  config.model.name = "qrccapsnet"
  config.loss.name = "category_quadruplet"
  # Eq. 1 of the paper: margin1 for same-category negatives, margin2 for other-category ones.
  config.loss.category_quadruplet.update(margin1=0.1, margin2=1.0, weight1=0.1, weight2=0.9, squared=True)
  return run_config.finalize(config, arg)
