"""Every loss of jaxret on one backbone (RCCapsNet) on DeepFashion In-shop, at the published recipes.

  python -m jaxret.experiments --suite configs/suites/methods_inshop.py --workdir ~/runs/methods_inshop

Needs the dataset prepared once (docs/deepfashion.md). configs/inshop_triplet.py (RCCapsNet at 256x256,
every class capsule as the embedding, 20,000 steps of 64 images) with each loss of `jaxret.losses.LOSSES` at
its published defaults (docs/losses.md), honest protocol; 400 training products held out as a validation
split, so the table also shows the step with the best validation Recall@1.

`:smoke` shrinks every run (used by tests/test_experiments.py for --print_commands only: it needs the data).
"""

from jaxret import experiments

CONFIG = "configs/inshop_triplet.py"

# name -> (method as the table shows it, loss overrides).
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
}


def get_suite(arg=None):
  if arg not in (None, "smoke"):
    raise ValueError(f"Unknown suite argument {arg!r}; use 'smoke'.")
  validation = {"input.validation_products": 4 if arg == "smoke" else 400}
  return {name: experiments.Run(config=CONFIG, arg=arg, method=method, overrides={**overrides, **validation})
          for name, (method, overrides) in LOSSES.items()}
