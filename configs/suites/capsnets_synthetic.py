"""SC-, RC- and QRCCapsNet (tiny) on synthetic In-shop, each trained once and reported under both protocols.

  python -m jaxret.experiments --suite configs/suites/capsnets_synthetic.py --workdir /tmp/capsnets_synthetic

Each model is trained at the demo's budget and recipe (configs/demo.py: `synthetic_inshop/small`, 3,000 steps
of 32 images at 64x64, batch-all triplets, routing logits replaced), QRCCapsNet with its paper's
category-aware quadruplet loss (Eq. 1, the paper's margins and weights). As in the published code, training
masks every embedding with its true category's capsule (`embedding="label"`). Each run is then reported
under both protocols:
- honest: evaluated with the predicted category's capsule (the trainer's own evaluation);
- leaky: the same last checkpoint evaluated with the true category's capsule (`label_leaky_eval`, the
  papers' protocol; `python -m jaxret.train ... --eval_only`).
40 of the 360 training products are held out as a validation split, so the table also shows the step with
the best validation Recall@1 (docs/experiments.md).

`:smoke` shrinks every run to seconds on `synthetic_inshop/tiny` (tests/test_experiments.py). `:short` is
this suite at a third of the budget (1,000 steps), for a machine shared with other jobs.
"""

from jaxret import experiments

CONFIG = "configs/demo.py"
SHORT_STEPS = 1000


def get_suite(arg=None):
  if arg not in (None, "smoke", "short"):
    raise ValueError(f"Unknown suite argument {arg!r}; use 'smoke' or 'short'.")
  common = {"model.embedding": "label"}
  if arg == "smoke":
    common["input.validation_products"] = 4  # Of the 24 training products of synthetic_inshop/tiny.
  else:
    common["input.validation_products"] = 40
  if arg == "short":
    common.update({"total_steps": SHORT_STEPS, "eval_every": 250, "checkpoint_every": 250})
  config_arg = "smoke" if arg == "smoke" else None
  protocols = ("honest", "leaky")
  return {
      "sccapsnet": experiments.Run(
          config=CONFIG, arg=config_arg, method="SCCapsNet, triplet (batch-all)", protocols=protocols,
          overrides={"model.name": "sccapsnet_tiny", **common}),
      "rccapsnet": experiments.Run(
          config=CONFIG, arg=config_arg, method="RCCapsNet, triplet (batch-all)", protocols=protocols,
          overrides={"model.name": "rccapsnet_tiny", **common}),
      "qrccapsnet": experiments.Run(
          config=CONFIG, arg=config_arg, method="QRCCapsNet, category quadruplet", protocols=protocols,
          overrides={"model.name": "qrccapsnet_tiny", "loss.name": "category_quadruplet", **common}),
  }
