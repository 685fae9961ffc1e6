"""RCCapsNet as published (Kinli, Ozcan & Kirac 2019): the paper's protocol, ground-truth category included.

Its numbers are comparable to the paper's tables, NOT to honest ones (configs/inshop_triplet.py): the
category of every image, query and gallery alike, masks the embedding at evaluation
(`embedding="label_leaky_eval"`), which a search for an unlabelled photo cannot do. docs/benchmarks.md shows
what that is worth on the synthetic data. Needs the dataset prepared once (see docs/deepfashion.md):

  python -m data_prep.deepfashion_inshop --manual_dir ~/deepfashion/inshop
  python -m jaxret.train --config configs/inshop_triplet_paper.py --workdir ~/runs/rccapsnet_paper

The same trained model evaluated honestly (the predicted category's capsule instead of the true one), on the
finished workdir (a finished run only evaluates):

  python -m jaxret.train --config configs/inshop_triplet_paper.py --workdir ~/runs/rccapsnet_paper \
      --config.model.embedding=label

From the published code (github.com/birdortyedi/image-retrieval-with-capsules):
- training masks every embedding with the ground-truth category capsule (`embedding="label"` in training);
- triplet loss on squared Euclidean distances with margin 2.0;
- random triplets, not mined: per anchor a random positive and a random negative. jaxret draws them within
  P x K batches (16 products x 2 images) with `mining="random"`; the published code draws 32 anchors and
  their triplets from the whole training set, 96 images per step;
- Adam, learning rate 1e-3 times 0.995 after every epoch (as issue 12 and the QRCCapsNet notebook give it;
  the repository's config.py default is 0.99), no warm-up, no gradient clipping, batch 32, 50 epochs;
- spatial dropout 0.3, routing logits replaced (not accumulated) every iteration, 3 iterations;
- augmentation: shifts of up to 25 %, horizontal flips, rotation up to 30 degrees. jaxret's nearest: random
  resized crops of 64-100 % of the area and flips, no colour jitter; it has no rotation.
"""

from jaxret import run_config


def get_config(arg=None):
  config = run_config.inshop_config()
  config.input.batch_size = 32  # 16 products x 2 images.
  config.input.images_per_product = 2
  config.input.crop_scale = (0.64, 1.0)
  config.input.color_jitter = 0.0
  config.model.name = "rccapsnet"
  config.model.embedding = "label_leaky_eval"  # Ground-truth category in training AND evaluation (leaks).
  config.model.dropout_rate = 0.3
  config.model.logit_update = "replace"
  config.loss.name = "triplet"
  config.loss.triplet.update(margin=2.0, squared=True, mining="random")
  config.optim.learning_rate = 1e-3
  config.optim.schedule = "exponential_per_epoch"  # x0.995 per pass over the 25,882 training images.
  config.optim.decay_per_epoch = 0.995
  config.optim.grad_clip_norm = 0.0
  config.warmup_steps = 0
  config.total_steps = 40_400  # 50 epochs of 808 steps (25,882 images // 32).
  config.eval_every = 4_040
  config.checkpoint_every = 2_020
  return run_config.finalize(config, arg)
