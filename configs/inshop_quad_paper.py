"""QRCCapsNet as published (Khatami & Fadaeieslam 2022): the paper's protocol, ground-truth category included.

Its numbers are comparable to the paper's tables, NOT to honest ones (configs/inshop_quad.py): the category
of every image, query and gallery alike, masks the embedding at evaluation (`embedding="label_leaky_eval"`),
which a search for an unlabelled photo cannot do. docs/benchmarks.md shows what that is worth on the
synthetic data. Needs the dataset prepared once (see docs/deepfashion.md):

  python -m data_prep.deepfashion_inshop --manual_dir ~/deepfashion/inshop
  python -m jaxret.train --config configs/inshop_quad_paper.py --workdir ~/runs/qrccapsnet_paper

The same trained model evaluated honestly (the predicted category's capsule instead of the true one), on the
finished workdir (a finished run only evaluates):

  python -m jaxret.train --config configs/inshop_quad_paper.py --workdir ~/runs/qrccapsnet_paper \
      --config.model.embedding=label

From the published notebook (github.com/MahdiyeKhatami/QRCCapsNet):
- training masks every embedding with the ground-truth category capsule (`embedding="label"` in training);
  the notebook masks all four images of a quadruplet with the anchor's category, jaxret masks each image
  with its own (so an other-category n2 is orthogonal to the anchor);
- Eq. 1 on squared distances: margin1 0.1, margin2 1.0, weight1 0.1, weight2 0.9;
- random quadruplets, not mined: per anchor a random positive, same-category negative and other-category
  negative. jaxret draws them within category-balanced batches (C = 4 categories x P = 4 products x K = 2
  images, so that every anchor has all three) with `mining="random"`; the notebook draws 32 anchors and
  their tuples from the whole training set, 128 images per step;
- Adam, learning rate 1e-3 times 0.995 after every epoch, no warm-up, no gradient clipping, batch 32; 50
  epochs as in RCCapsNet's published config (the notebook takes the number of epochs as an argument);
- spatial dropout 0.3, routing logits replaced (not accumulated) every iteration, 3 iterations;
- augmentation: shifts of up to 20 %, zoom 10 %, horizontal flips, brightness x[0.5, 1.5], rotation up to
  30 degrees, shear 0.1. jaxret's nearest: random resized crops of 64-100 % of the area, flips, brightness
  and contrast jitter 0.5; it has no rotation or shear.
"""

from jaxret import run_config


def get_config(arg=None):
  config = run_config.inshop_config()
  config.input.batch_size = 32  # 4 categories x 4 products x 2 images.
  config.input.images_per_product = 2
  config.input.sampler = "category_balanced"
  config.input.categories_per_batch = 4
  config.input.crop_scale = (0.64, 1.0)
  config.input.color_jitter = 0.5
  config.model.name = "qrccapsnet"
  config.model.embedding = "label_leaky_eval"  # Ground-truth category in training AND evaluation (leaks).
  config.model.dropout_rate = 0.3
  config.model.logit_update = "replace"
  config.loss.name = "category_quadruplet"
  config.loss.category_quadruplet.update(margin1=0.1, margin2=1.0, weight1=0.1, weight2=0.9, squared=True,
                                         mining="random")
  config.optim.learning_rate = 1e-3
  config.optim.schedule = "exponential_per_epoch"  # x0.995 per pass over the 25,882 training images.
  config.optim.decay_per_epoch = 0.995
  config.optim.grad_clip_norm = 0.0
  config.warmup_steps = 0
  config.total_steps = 40_400  # 50 epochs of 808 steps (25,882 images // 32).
  config.eval_every = 4_040
  config.checkpoint_every = 2_020
  return run_config.finalize(config, arg)
