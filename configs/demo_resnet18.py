"""The demo with a ResNet-18 instead of the capsule network: the same data, batches, loss and schedule.

  python -m jaxret.train --config configs/demo_resnet18.py --workdir /tmp/jaxret_demo_resnet18

`resnet18_tiny` (ResNet-18's layout, one basic block per stage, 8 base channels: 95k parameters, about the
capsule network's 83k) from scratch, no weights: this compares architectures at the demo's budget, not
pretraining. Its average-pooled features projected to a 64-d L2-normalised embedding, on
`synthetic_inshop/small` at 64x64 with configs/demo.py's batch-all triplets (margin 0.2) and schedule, for
1,500 steps (half the demo's). The full `resnet18` (`--config.model.name=resnet18
--config.model.embedding_dim=512`) runs at about 2 s a step on a 2-core CPU. docs/benchmarks.md records
the run beside the capsule network.
"""

from jaxret import run_config


def get_config(arg=None):
  config = run_config.base_config()
  # configs/demo.py's data, batches, augmentation and schedule.
  config.input.dataset = "synthetic_inshop/small"
  config.input.image_size = 64
  config.input.batch_size = 32  # 8 products x 4 images.
  config.input.images_per_product = 4
  config.input.crop_scale = (0.85, 1.0)
  config.input.color_jitter = 0.1
  config.optim.learning_rate = 1e-3
  config.model.name = "resnet18_tiny"  # Full ResNet-18 runs at about 2 s a step on a 2-core CPU.
  config.model.embedding_dim = 64
  config.loss.name = "triplet"
  config.loss.triplet.update(margin=0.2, mining="batch_all")
  config.total_steps = 1500
  config.warmup_steps = 50
  config.log_every = 25
  config.eval_every = 500
  config.checkpoint_every = 500
  return run_config.finalize(config, arg)
