"""ResNet-50 (torchvision's ImageNet weights) fine-tuned on DeepFashion In-shop with the Multi-Similarity loss.

A standard metric-learning starting point (issue 15): the pretrained backbone, a GeM-pooled 512-d L2-normalised
head, Multi-Similarity on P x K batches, AdamW. Fine-tuning conventions of the published recipes: the head
learns 10x faster than the backbone, the backbone is frozen for the first epoch while the head is random, and
BatchNorm keeps its ImageNet statistics (batches of 16 products are too small to re-estimate them). These are
our starting values, not tuned on In-shop yet.

Put the weights file where docs/models.md says (jaxret never downloads anything), prepare the dataset once
(docs/deepfashion.md), then:

  python -m data_prep.deepfashion_inshop --manual_dir ~/deepfashion/inshop
  python -m jaxret.train --config configs/inshop_resnet50.py --workdir ~/runs/inshop_resnet50

`:smoke` trains `resnet50_tiny` from scratch on `synthetic_inshop/tiny` in seconds, without weights.
"""

from jaxret import run_config


def get_config(arg=None):
  config = run_config.inshop_config()
  config.input.image_size = 224  # ImageNet's size, which the weights were trained at.
  config.model.name = "resnet50"
  config.model.pretrained = "~/jaxret_weights/resnet50-0676ba61.pth"
  config.model.embedding_dim = 512
  config.model.pooling = "gem"
  config.model.freeze_batch_norm = True
  config.loss.name = "multi_similarity"
  config.optim.learning_rate = 1e-4
  config.optim.weight_decay = 1e-4
  config.optim.head_lr_multiplier = 10.0
  config.optim.head_only_steps = 404  # One epoch: 25,882 training images // 64.
  if run_config.SMOKE_ARG in run_config.parse_arg(arg):  # No weights, synthetic data.
    config.input.dataset = "synthetic_inshop/tiny"
    config.model.pretrained = None
    config.optim.head_only_steps = 2
  return run_config.finalize(config, arg)
