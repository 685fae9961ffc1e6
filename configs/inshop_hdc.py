"""HDC (Yuan et al., ICCV 2017) on DeepFashion In-shop: GoogLeNet with heads on three depths, the HDC loss.

The model `googlenet_hdc` (docs/models.md: 128-D heads on inception_4a, inception_4d and pool5, each
L2-normalised, concatenated) from torchvision's ImageNet GoogLeNet, trained with `hdc` (docs/losses.md: a
contrastive loss per level on all positive pairs and the hardest 100% / 50% / 20% of the negative pairs).
Batches as the released In-shop setting: 2 categories x 10 products x 5 images. The optimizer is jaxret's
AdamW, not the released SGD; learning rates are our starting values, not tuned on In-shop yet.

  python -m jaxret.train --config configs/inshop_hdc.py --workdir ~/runs/inshop_hdc

`--config.model.name=resnet50_hdc --config.model.pretrained=~/jaxret_weights/resnet50-0676ba61.pth` puts the
heads on ResNet-50's layer2, layer3 and layer4. `:smoke` trains `googlenet_hdc_tiny` from scratch on
`synthetic_inshop/tiny` in seconds, without weights.
"""

from jaxret import run_config


def get_config(arg=None):
  config = run_config.inshop_config()
  config.input.image_size = 224  # ImageNet's size, and the released code's crop.
  config.input.sampler = "category_balanced"
  config.input.categories_per_batch = 2
  config.input.images_per_product = 5
  config.input.batch_size = 100
  config.model.name = "googlenet_hdc"
  config.model.pretrained = "~/jaxret_weights/googlenet-1378be20.pth"
  config.loss.name = "hdc"
  config.optim.learning_rate = 1e-4
  config.optim.weight_decay = 2e-4  # The released solver's.
  config.optim.head_lr_multiplier = 10.0  # The released prototxt's lr_mult on the embedding layers.
  if run_config.SMOKE_ARG in run_config.parse_arg(arg):  # No weights, synthetic data.
    config.input.dataset = "synthetic_inshop/tiny"
    config.model.pretrained = None
  return run_config.finalize(config, arg)
