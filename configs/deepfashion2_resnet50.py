"""Consumer-to-shop retrieval on DeepFashion2 with garment box crops, on ResNet-50 (torchvision's weights).

Street photos (queries: the consumer garments of the validation set) against shop photos (gallery: its shop
garments), each garment cropped to its box (`config.input.crop_to_box`: training draws its random crop inside
the box grown by 10%, evaluation crops to that box exactly), as Match R-CNN's retrieval branch and Bao's
thesis retrieve on garment boxes. Evaluation logs DeepFashion2's own top-k accuracy (`df2/top@k`) beside
Recall@K. Our starting values, not tuned on DeepFashion2 yet: the In-shop ResNet-50 recipe
(configs/inshop_resnet50.py) with a larger decoded cache, so that a crop of a small garment keeps some pixels.

Put the weights file where docs/models.md says (jaxret never downloads anything), prepare the dataset once
(docs/deepfashion.md; the password of the zips is yours to pass, it is never stored), then:

  python -m data_prep.deepfashion2 --manual_dir ~/deepfashion2 --password ...
  python -m jaxret.train --config configs/deepfashion2_resnet50.py --workdir ~/runs/deepfashion2_resnet50

To evaluate on your detector's boxes instead of the ground truth (`--detections`, docs/deepfashion.md):

  python -m jaxret.train --config configs/deepfashion2_resnet50.py --workdir ~/runs/deepfashion2_resnet50 \
      --eval_only --detections detections.json

`:smoke` trains `resnet50_tiny` from scratch on the synthetic consumer-to-shop variant
(`synthetic_inshop/c2s_tiny`: small, off-centre, occluded garments on clutter in the queries, clean shop photos
in the gallery) in seconds, without weights.
"""

from jaxret import run_config


def get_config(arg=None):
  config = run_config.base_config()
  config.input.dataset = "deepfashion2"
  config.input.image_size = 224  # ImageNet's size, which the weights were trained at.
  config.input.cache_size = 288  # Decoded photos; the box crop is resampled from these to 224.
  config.input.crop_to_box = True
  config.input.box_margin = 0.1
  config.input.crop_scale = (0.6, 1.0)
  config.input.batch_size = 64
  config.input.images_per_product = 2  # A DeepFashion2 item has few photos (often one street, one shop).
  config.input.num_threads = 16
  config.model.name = "resnet50"
  config.model.dtype = "auto"  # bfloat16 on GPU and TPU, float32 on CPU.
  config.model.pretrained = "~/jaxret_weights/resnet50-0676ba61.pth"
  config.model.embedding_dim = 512
  config.model.pooling = "gem"
  config.model.freeze_batch_norm = True
  config.loss.name = "multi_similarity"
  config.optim.learning_rate = 1e-4
  config.optim.weight_decay = 1e-4
  config.optim.head_lr_multiplier = 10.0
  config.optim.head_only_steps = 1_000
  config.total_steps = 40_000
  config.warmup_steps = 1_000
  config.log_every = 100
  config.eval_every = 5_000
  config.checkpoint_every = 2_500
  config.evals.batch_size = 256
  if run_config.SMOKE_ARG in run_config.parse_arg(arg):  # No weights, synthetic consumer-to-shop data.
    config.input.dataset = "synthetic_inshop/c2s_tiny"
    config.input.cache_size = None
    config.model.pretrained = None
    config.optim.head_only_steps = 2
  return run_config.finalize(config, arg)
