"""A-BIER (Opitz et al., TPAMI 2018) on DeepFashion In-shop: GoogLeNet, three boosted learners, adversarial loss.

The model `googlenet_bier` (docs/models.md: pool5 -> one linear layer per learner, sizes 96, 160, 256, which
also returns the layer's output on the features under stop-gradient and its kernel) from torchvision's
ImageNet GoogLeNet, trained with `a_bier` (docs/losses.md: boosted binomial deviance over the learners plus
the adversarial regressors between them, lambda_div 5e-5 and lambda_weight 1e5 from the released run.sh).
The released code trains the embedding layer at 10x the backbone's rate (`head_lr_multiplier`). The
optimizer is jaxret's AdamW, not the released one; the learning rate is our starting value, not tuned on
In-shop yet.

  python -m jaxret.train --config configs/inshop_a_bier.py --workdir ~/runs/inshop_a_bier

`--config.loss.name=bier` trains BIER without the adversarial term. `:smoke` trains `googlenet_bier_tiny` from
scratch on `synthetic_inshop/tiny` in seconds, without weights.
"""

from jaxret import run_config


def get_config(arg=None):
  config = run_config.inshop_config()
  config.input.image_size = 224  # ImageNet's size, which the weights were trained at.
  config.model.name = "googlenet_bier"
  config.model.pretrained = "~/jaxret_weights/googlenet-1378be20.pth"
  config.model.learner_sizes = (96, 160, 256)  # config.loss.a_bier.learner_sizes must be the same.
  config.loss.name = "a_bier"
  config.loss.a_bier.learner_sizes = (96, 160, 256)
  config.optim.learning_rate = 1e-5  # The released LEARNING_RATE (with its optimizer, not AdamW).
  config.optim.weight_decay = 2e-4  # The released WEIGHT_DECAY.
  config.optim.head_lr_multiplier = 10.0
  if run_config.SMOKE_ARG in run_config.parse_arg(arg):  # No weights, synthetic data.
    config.input.dataset = "synthetic_inshop/tiny"
    config.model.pretrained = None
  return run_config.finalize(config, arg)
