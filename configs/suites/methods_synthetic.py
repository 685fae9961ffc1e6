"""Every loss of jaxret on one backbone (RCCapsNet tiny) on synthetic In-shop, at the demo's budget.

  python -m jaxret.experiments --suite configs/suites/methods_synthetic.py --workdir /tmp/methods_synthetic

configs/demo.py (`synthetic_inshop/small`, 3,000 steps of 32 images at 64x64, `rccapsnet_tiny` with every
class capsule as the embedding) with each loss of `jaxret.losses.LOSSES` at its published defaults
(docs/losses.md), one run each, honest protocol. 40 of the 360 training products are held out as a
validation split, so the table also shows the step with the best validation Recall@1.

`:smoke` shrinks every run to seconds on `synthetic_inshop/tiny`.
"""

from jaxret import experiments

CONFIG = "configs/demo.py"

# name -> (method as the table shows it, loss overrides). The demo's own loss is batch-all triplets.
LOSSES = {
    "triplet_batch_hard": ("triplet, batch-hard (Hermans et al. 2017)", {"loss.triplet.mining": "batch_hard"}),
    "triplet_batch_all": ("triplet, batch-all (Hermans et al. 2017)", {"loss.triplet.mining": "batch_all"}),
    "triplet_semi_hard": ("triplet, semi-hard (Schroff et al. 2015)", {"loss.triplet.mining": "semi_hard"}),
    "quadruplet": ("quadruplet (Chen et al. 2017)", {"loss.name": "quadruplet"}),
    "quadruplet_adaptive": ("quadruplet, adaptive margins (Chen et al. 2017)",
                            {"loss.name": "quadruplet", "loss.quadruplet.adaptive_margin": True}),
    "category_quadruplet": ("category quadruplet (Khatami & Fadaeieslam 2022)",
                            {"loss.name": "category_quadruplet"}),
    "contrastive": ("contrastive (Hadsell et al. 2006)", {"loss.name": "contrastive"}),
    # The methods of issue 16 (docs/losses.md). The tiny RCCapsNet's embedding has 368 dimensions (23 class
    # capsules x 16): BIER's learners and HDC's levels are resized to add up to it, ABE-M's 8 learners take
    # 46 each. A-BIER is left out: it needs a model that returns its embedding layer's inputs and kernel, a
    # backbone here (googlenet_bier, configs/inshop_a_bier.py), not this suite's RCCapsNet.
    "multi_similarity": ("Multi-Similarity (Wang et al. 2019)", {"loss.name": "multi_similarity"}),
    "proxy_anchor": ("Proxy-Anchor (Kim et al. 2020)", {"loss.name": "proxy_anchor"}),
    "htl": ("HTL, tree rebuilt every epoch (Ge et al. 2018)", {"loss.name": "htl"}),
    "bier": ("BIER (Opitz et al. 2017)", {"loss.name": "bier", "loss.bier.learner_sizes": (64, 112, 192)}),
    "hdc": ("HDC (Yuan et al. 2017)", {"loss.name": "hdc", "loss.hdc.level_dims": (128, 128, 112)}),
    "abe": ("ABE-M loss (Kim et al. 2018)", {"loss.name": "abe"}),
    "grid": ("grid loss (Chopra et al. 2019)", {"loss.name": "grid"}),
    "capsule_margin": ("capsule margin + batch-all triplet", {"loss.name": "triplet+capsule_margin"}),
}


def get_suite(arg=None):
  if arg not in (None, "smoke"):
    raise ValueError(f"Unknown suite argument {arg!r}; use 'smoke'.")
  validation = {"input.validation_products": 4 if arg == "smoke" else 40}
  return {name: experiments.Run(config=CONFIG, arg=arg, method=method,
                                overrides={**overrides, **validation})
          for name, (method, overrides) in LOSSES.items()}
