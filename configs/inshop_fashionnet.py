"""FashionNet (Liu et al., CVPR 2016) on DeepFashion In-shop: VGG-16 (torchvision's ImageNet weights) with global,
landmark and local branches, trained with triplet + category + attributes + landmarks losses.

The embedding is the fused global and local features (`jaxret/models/fashionnet.py`); the local branch pools
conv4_3 around the 8 In-shop landmarks, the ground-truth ones in training and the predicted ones at test. The
loss weights, the pooling window and the layer widths are our choices, not the paper's (it does not give them):
docs/models.md, "FashionNet".

Put the weights file where docs/models.md says (jaxret never downloads anything), prepare the dataset once
(docs/deepfashion.md; the build holds the landmarks and the 463 attributes), then:

  python -m data_prep.deepfashion_inshop --manual_dir ~/deepfashion/inshop
  python -m jaxret.train --config configs/inshop_fashionnet.py --workdir ~/runs/inshop_fashionnet

`:smoke` trains `fashionnet_tiny` from scratch on `synthetic_inshop/tiny` (40 attributes, true landmarks) in
seconds, without weights.
"""

from jaxret import run_config


def get_config(arg=None):
  config = run_config.inshop_config()
  config.input.image_size = 224  # ImageNet's size, which the VGG-16 weights were trained at: conv4_3 is 28x28.
  # The trainer maps the ground-truth landmarks through each image's crop and flip (jaxret/landmark_augment.py);
  # a milder crop than the default keeps most landmarks inside it.
  config.input.crop_scale = (0.8, 1.0)
  config.model.name = "fashionnet"
  config.model.pretrained = "~/jaxret_weights/vgg16-397923af.pth"
  config.model.embedding_dim = 512
  config.model.num_categories = 23  # The In-shop categories.
  config.model.num_attributes = 463  # The In-shop attributes (`attributes` of deepfashion_inshop).
  config.model.landmark_window = 3  # conv4_3 cells pooled around each landmark: 3x3 at stride 8 = 24x24 pixels.
  config.loss.name = "triplet+category+attributes+landmarks"
  config.loss.triplet.update(margin=0.2, mining="batch_all", squared=False, weight=1.0)
  config.loss.category.weight = 1.0
  config.loss.attributes.weight = 1.0
  # The location term is a squared distance in fractions of the image (0.01 for an error of a tenth of the
  # side), so it gets a larger weight; the visibility cross-entropy is scaled down beside it.
  config.loss.landmarks.update(weight=10.0, visibility_weight=0.1)
  config.optim.learning_rate = 1e-4
  config.optim.weight_decay = 1e-4
  config.optim.head_lr_multiplier = 10.0  # The three branches and the classifiers start from scratch.
  config.optim.head_only_steps = 404  # One epoch: 25,882 training images // 64.
  if run_config.SMOKE_ARG in run_config.parse_arg(arg):  # No weights, synthetic data.
    config.input.dataset = "synthetic_inshop/tiny"
    config.model.pretrained = None
    config.model.num_attributes = 40  # The synthetic data's attributes.
    config.optim.learning_rate = 1e-3
    config.optim.head_only_steps = 2
  return run_config.finalize(config, arg)
