"""DenseNet121+OS+IS (Park et al., CVPRW 2019) on DeepFashion In-shop, from torchvision's ImageNet weights.

Two loss paths on one DenseNet-121 (issue 15 item 5):
- IS, instance similarity: a triplet loss (batch-hard, margin 0.2) on the 512-d L2-normalised embedding
  (average-pooled last dense block, linear projection);
- OS, object-category similarity: softmax cross-entropy over In-shop's 23 categories from a classifier behind
  the feature relaxation module (1x1 conv -> ReLU -> dropout -> 1x1 conv, then average pooling), which sits
  between the backbone's last map and the classifier so that classification does not pull directly on the
  features the embedding is pooled from.
The paper gives neither its loss weights nor the module's sizes; we use IS 1.0 and OS 0.5 (the category
labels are coarse: 23 classes against 3,997 training products; at equal weight the classifier's gradients
would dominate the first epoch's), 512 relaxation channels and dropout 0.5. docs/models.md says what is ours.

Put the weights file where docs/models.md says (jaxret never downloads anything), prepare the dataset once
(docs/deepfashion.md), then:

  python -m data_prep.deepfashion_inshop --manual_dir ~/deepfashion/inshop
  python -m jaxret.train --config configs/inshop_densenet121_os_is.py --workdir ~/runs/inshop_densenet121_os_is

Evaluation logs the category classifier's accuracy on the queries (`task/category_accuracy`) beside Recall@K.
`:smoke` trains `densenet121_tiny` from scratch on `synthetic_inshop/tiny` in seconds, without weights.
"""

from jaxret import run_config


def get_config(arg=None):
  config = run_config.inshop_config()
  config.input.image_size = 224  # ImageNet's size, which the weights were trained at.
  config.model.name = "densenet121"
  config.model.pretrained = "~/jaxret_weights/densenet121-a639ec97.pth"
  config.model.embedding_dim = 512
  config.model.pooling = "avg"
  config.model.num_categories = 23  # In-shop's categories (data_prep/inshop_features.py).
  config.model.feature_relaxation = True
  config.model.relaxation_features = 512
  config.model.relaxation_dropout = 0.5
  config.loss.name = "triplet+category"
  config.loss.triplet.mining = "batch_hard"
  config.loss.triplet.margin = 0.2
  config.loss.triplet.weight = 1.0  # IS
  config.loss.category.weight = 0.5  # OS
  config.optim.learning_rate = 1e-4
  config.optim.weight_decay = 1e-4
  config.optim.head_lr_multiplier = 10.0  # The projection, the relaxation module and the classifier.
  config.optim.head_only_steps = 404  # One epoch: 25,882 training images // 64.
  if run_config.SMOKE_ARG in run_config.parse_arg(arg):  # No weights, synthetic data.
    config.input.dataset = "synthetic_inshop/tiny"
    config.model.pretrained = None
    config.model.relaxation_features = 16
    config.optim.head_only_steps = 2
  return run_config.finalize(config, arg)
