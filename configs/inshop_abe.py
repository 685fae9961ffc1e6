"""ABE-8 (Kim et al., ECCV 2018) on DeepFashion In-shop: GoogLeNet with an 8-way attention-based ensemble.

The model `googlenet_abe` (docs/models.md: shared features up to inception_3b, 8 attention masks over them,
the rest of GoogLeNet run on each masked map, 8 learners of 64 dimensions, each L2-normalised, side by side)
from torchvision's ImageNet GoogLeNet, trained with `abe` (docs/losses.md: a contrastive loss per learner
plus the divergence loss between learners). No official code exists; the attention modules and every
number here are our reading and starting values, not tuned on In-shop yet.

  python -m jaxret.train --config configs/inshop_abe.py --workdir ~/runs/inshop_abe

`--config.model.name=resnet50_abe --config.model.pretrained=~/jaxret_weights/resnet50-0676ba61.pth` splits
ResNet-50 after layer2 instead. `:smoke` trains `googlenet_abe_tiny` (8 learners of 8 dimensions) from
scratch on `synthetic_inshop/tiny` in seconds, without weights.
"""

from jaxret import run_config


def get_config(arg=None):
  config = run_config.inshop_config()
  config.input.image_size = 224  # ImageNet's size, which the weights were trained at.
  config.model.name = "googlenet_abe"
  config.model.pretrained = "~/jaxret_weights/googlenet-1378be20.pth"
  config.model.num_learners = 8  # ABE-8; config.loss.abe.num_learners must be the same.
  config.model.embedding_dim = 512
  config.loss.name = "abe"
  config.loss.abe.num_learners = 8
  config.optim.learning_rate = 1e-4
  config.optim.head_lr_multiplier = 10.0  # The attention modules and projections start fresh.
  if run_config.SMOKE_ARG in run_config.parse_arg(arg):  # No weights, synthetic data.
    config.input.dataset = "synthetic_inshop/tiny"
    config.model.pretrained = None
    config.model.embedding_dim = 64
  return run_config.finalize(config, arg)
