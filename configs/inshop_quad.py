"""QRCCapsNet on DeepFashion In-shop: the category-aware quadruplet loss with a recipe that learns honestly.

The architecture and loss (Eq. 1) of Khatami & Fadaeieslam 2022, evaluated without the ground-truth category
(the embedding is every class capsule, `embedding="all"`). From scratch the paper's recipe (batch-hard or
random quadruplets in random batches, weight 0.9 on the category term) learns little or collapses here:
the sweep on the synthetic data in docs/benchmarks.md chose this one, which configs/demo_quad.py runs at
demo scale (tests/test_train.py checks that the two agree on loss, mining and sampler):
- category-balanced batches (C = 2 categories x P products x K = 4 images), so that every anchor has
  same-category negatives n1;
- every valid tuple averaged (batch-all mining), not the hardest;
- weight 0.9 on the instance term and 0.1 on the category term (the paper's 0.1 / 0.9 reversed), both
  margins 0.2 on plain (not squared) distances.
For the paper's own protocol, whose numbers are comparable to its tables, see configs/inshop_quad_paper.py.

Needs the dataset prepared once (see docs/deepfashion.md):

  python -m data_prep.deepfashion_inshop --manual_dir ~/deepfashion/inshop
  python -m jaxret.train --config configs/inshop_quad.py --workdir ~/runs/qrccapsnet

The paper trains WOMEN and MEN separately: `--config.input.dataset=deepfashion_inshop/women`.
SCCapsNet instead of RC: `--config.model.name=sccapsnet`.
"""

from jaxret import run_config


def get_config(arg=None):
  config = run_config.inshop_config()
  config.input.sampler = "category_balanced"  # 2 categories x 8 products x 4 images per batch of 64.
  config.input.categories_per_batch = 2
  config.model.name = "qrccapsnet"
  config.model.dropout_rate = 0.0
  config.model.logit_update = "replace"  # As the published code routes.
  config.loss.name = "category_quadruplet"
  config.loss.category_quadruplet.update(margin1=0.2, margin2=0.2, weight1=0.9, weight2=0.1, squared=False,
                                         mining="batch_all")
  return run_config.finalize(config, arg)
