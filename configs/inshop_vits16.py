"""ViT-S/16 (DINO's self-supervised ImageNet weights) fine-tuned on DeepFashion In-shop with Proxy-Anchor.

The transformer baseline of issue 15: the class token as the 384-d embedding (no projection, L2-normalised),
Proxy-Anchor (proxies at 100x the rate, as its official code), AdamW at a small rate with weight decay, the
backbone frozen for the first epoch while the proxies settle. DINO's ViT-S/16 features are the strongest
starting point for retrieval among the backbones here (docs/models.md); these values are our starting point,
not tuned on In-shop yet.

Put the weights file where docs/models.md says (jaxret never downloads anything), prepare the dataset once
(docs/deepfashion.md), then:

  python -m data_prep.deepfashion_inshop --manual_dir ~/deepfashion/inshop
  python -m jaxret.train --config configs/inshop_vits16.py --workdir ~/runs/inshop_vits16

`:smoke` trains `vit_s16_tiny` from scratch on `synthetic_inshop/tiny` in seconds, without weights.
"""

from jaxret import run_config


def get_config(arg=None):
  config = run_config.inshop_config()
  config.input.image_size = 224  # 14 x 14 patches of 16, the weights' position-embedding grid.
  config.model.name = "vit_s16"
  config.model.pretrained = "~/jaxret_weights/dino_deitsmall16_pretrain.pth"
  config.model.pooling = "token"
  config.model.embedding_dim = 0  # The class token itself (384-d).
  config.loss.name = "proxy_anchor"
  config.optim.learning_rate = 3e-5
  config.optim.weight_decay = 0.05
  config.optim.head_only_steps = 404  # One epoch: 25,882 training images // 64.
  if run_config.SMOKE_ARG in run_config.parse_arg(arg):  # No weights, synthetic data.
    config.input.dataset = "synthetic_inshop/tiny"
    config.model.pretrained = None
    config.optim.head_only_steps = 2
  return run_config.finalize(config, arg)
