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
  config = run_config.demo_config()  # configs/demo.py's data, batches, augmentation and schedule.
  config.model.name = "resnet18_tiny"  # Full ResNet-18 runs at about 2 s a step on a 2-core CPU.
  config.model.embedding_dim = 64
  config.loss.name = "triplet"
  config.loss.triplet.update(margin=0.2, mining="batch_all")
  config.total_steps = 1500
  return run_config.finalize(config, arg)
