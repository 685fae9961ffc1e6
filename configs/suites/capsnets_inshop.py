"""SC-, RC- and QRCCapsNet on DeepFashion In-shop WOMEN, MEN and ALL, under both protocols, beside the papers.

  python -m jaxret.experiments --suite configs/suites/capsnets_inshop.py --workdir ~/runs/capsnets_inshop
  python -m jaxret.experiments --suite configs/suites/capsnets_inshop.py --workdir ~/runs/capsnets_inshop \
      --print_commands     # one line per run, for a SLURM array or a TPU queue; then --report_only

Needs the dataset prepared once (docs/deepfashion.md). SC and RC train with configs/inshop_triplet.py,
QRC with configs/inshop_quad.py (its category-aware quadruplet loss), each with the embedding masked by the
true category's capsule in training as the published code does (`embedding="label"`). Each run is reported
- honest: evaluated with the predicted category's capsule (the trainer's own evaluation);
- leaky: its last checkpoint evaluated with the true category's capsule (`label_leaky_eval`), the protocol
  of both papers: their evaluation models take the true category as a second input (RCCapsNet:
  `eval_model = Model([x1, y1], ...)` in models.py and `model.predict([xs, ys])` in utils.py of
  github.com/birdortyedi/image-retrieval-with-capsules; QRCCapsNet: the same in the notebook QRCCapsNet.ipynb
  of github.com/MahdiyeKhatami/QRCCapsNet, cells `FashionQuadrupletCapsNet` and `extract_embeddings`).
Each run holds out 400 of its training products as a validation split (the step with the best validation
Recall@1 is reported beside the last one).

The papers' numbers are Recall@K in percent, read from the sources named in PUBLISHED below. Where none is
given (SCCapsNet on WOMEN and MEN, QRCCapsNet on ALL) neither paper reports one. The papers' training recipes
differ from these configs (random tuples, 50 or 1 epochs, other augmentation: see the docstrings of the
configs); the `*_paper` configs, once merged, reproduce them.

`:smoke` shrinks every run (used by tests/test_experiments.py for --print_commands only: it needs the data).
"""

from jaxret import experiments

KINLI = ("Kinli, Ozcan & Kirac, Fashion Image Retrieval with Capsule Networks, ICCV Workshops 2019: the "
         "results table as reproduced in the README of github.com/birdortyedi/image-retrieval-with-capsules "
         "(In-shop, both genders, 50 epochs). R@1/20/50 of RCCapsNet also in Kinli's MSc thesis abstract "
         "(Ozyegin University, 2019), which gives SCCapsNet R@50 = 90.0 where the README gives 90.9.")
KHATAMI = ("Khatami & Fadaeieslam, Fashion Image Retrieval With Quadruplet Capsule Networks, 1st Conference on "
           "AI and Smart Computing, Semnan, 2022 (the PDF in github.com/MahdiyeKhatami/QRCCapsNet): Table 2 "
           "(WOMEN) and Table 3 (MEN), each model trained for one epoch on Google Colab (Sec. 2-2); the "
           "tables also give R@5, not shown here.")

# (model, data) -> Recall@K in percent, as published.
PUBLISHED = {
    ("sccapsnet", "all"): (KINLI, {1: 32.1, 10: 72.4, 20: 81.8, 30: 86.3, 40: 89.2, 50: 90.9}),
    ("rccapsnet", "all"): (KINLI, {1: 33.9, 10: 75.2, 20: 84.6, 30: 88.6, 40: 91.0, 50: 92.6}),
    ("rccapsnet", "women"): (KHATAMI, {1: 3.83, 10: 16.81, 20: 25.19, 30: 31.34, 40: 36.53, 50: 40.85}),
    ("qrccapsnet", "women"): (KHATAMI, {1: 6.59, 10: 24.59, 20: 34.4, 30: 41.56, 40: 46.78, 50: 51.08}),
    ("rccapsnet", "men"): (KHATAMI, {1: 11.77, 10: 40.75, 20: 56.0, 30: 64.87, 40: 70.0, 50: 74.59}),
    ("qrccapsnet", "men"): (KHATAMI, {1: 14.85, 10: 49.75, 20: 63.49, 30: 71.6, 40: 76.77, 50: 81.19}),
}
MODELS = {
    "sccapsnet": ("SCCapsNet, triplet", "configs/inshop_triplet.py"),
    "rccapsnet": ("RCCapsNet, triplet", "configs/inshop_triplet.py"),
    "qrccapsnet": ("QRCCapsNet, category quadruplet", "configs/inshop_quad.py"),
}


def get_suite(arg=None):
  if arg not in (None, "smoke"):
    raise ValueError(f"Unknown suite argument {arg!r}; use 'smoke'.")
  suite = {}
  for data in ("women", "men", "all"):
    for model, (method, config) in MODELS.items():
      published = ()
      if (model, data) in PUBLISHED:
        source, recalls = PUBLISHED[model, data]
        published = (experiments.Published(source=source, recall_percent=recalls, protocol="leaky"),)
      overrides = {"input.dataset": f"deepfashion_inshop/{data}", "model.embedding": "label",
                   "input.validation_products": 4 if arg == "smoke" else 400}
      overrides["model.name"] = f"{model}_tiny" if arg == "smoke" else model
      suite[f"{model}_{data}"] = experiments.Run(
          config=config, arg=arg, method=method, overrides=overrides, protocols=("honest", "leaky"),
          published=published)
  return suite
