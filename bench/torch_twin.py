"""A PyTorch twin of jaxret's RCCapsNet training step: what a user would run instead of jaxret.

Same layers as `jaxret.models.RCCapsNet` (conv 7x7/2 + BN + ReLU + spatial dropout, residual blocks with
LeakyReLU 0.3 and 1x1 projection shortcuts, each followed by spatial dropout, a residual block to the primary
capsules, squash), the same shared-weight prediction matrix and dynamic routing (Procedure 1 of Sabour et al.,
"accumulate" logits), the same "all" embedding (every class capsule L2-normalised) and batch-hard triplet loss
(Hermans et al. 2017) on the same safe Euclidean distances, and the same optimiser (AdamW with linear
warm-up and cosine decay, gradient clipping by global norm 1). Padding is TensorFlow's SAME (asymmetric
for strided convolutions), so that `load_flax_params` makes the twin compute exactly the JAX model's function:
tests/test_bench_numerics.py checks the loss and the gradients against the JAX step on the same weights.

The routing is written as a PyTorch user would write it well: `einsum`s over the `[B, in, out, dim]`
prediction tensor, no tiling and no Python loop over capsules.

Benchmark-only: needs `torch` (not a jaxret dependency); bench/train_step_vs_torch.py runs it side by side with
the JAX step.
"""

import math

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

KERAS_BN_EPSILON = 1e-3
SQUASH_EPS = 1e-7


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TensorFlow/Flax SAME padding (before, after) of one spatial axis: the extra pixel goes after."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
  """`nn.Conv2d` with TensorFlow's SAME padding (a copy through `F.pad` only when it is asymmetric)."""

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    (kh, kw), (sh, sw) = self.kernel_size, self.stride
    top, bottom = same_padding(x.shape[-2], kh, sh)
    left, right = same_padding(x.shape[-1], kw, sw)
    if top == bottom and left == right:
      return F.conv2d(x, self.weight, self.bias, self.stride, (top, left))
    return F.conv2d(F.pad(x, (left, right, top, bottom)), self.weight, self.bias, self.stride)


def batch_norm(features: int, momentum: float) -> nn.BatchNorm2d:
  # PyTorch's momentum weighs the new batch statistic: 1 - Keras' momentum.
  return nn.BatchNorm2d(features, eps=KERAS_BN_EPSILON, momentum=1.0 - momentum)


class ResidualBlock(nn.Module):
  """3x3/s conv, BN, LeakyReLU, 3x3 conv, BN, plus 1x1/s conv + BN shortcut, LeakyReLU."""

  def __init__(self, in_features: int, features: int, stride: int, slope: float, momentum: float):
    super().__init__()
    self.slope = slope
    self.conv1 = SameConv2d(in_features, features, 3, stride)
    self.bn1 = batch_norm(features, momentum)
    self.conv2 = SameConv2d(features, features, 3, 1)
    self.bn2 = batch_norm(features, momentum)
    self.shortcut_conv = SameConv2d(in_features, features, 1, stride)
    self.shortcut_bn = batch_norm(features, momentum)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.leaky_relu(self.bn1(self.conv1(x)), self.slope)
    y = self.bn2(self.conv2(y))
    return F.leaky_relu(y + self.shortcut_bn(self.shortcut_conv(x)), self.slope)


def squash(s: torch.Tensor) -> torch.Tensor:
  """|s|^2 / (1 + |s|^2) * s / sqrt(|s|^2 + eps) along the last axis."""
  squared_norm = torch.sum(s * s, dim=-1, keepdim=True)
  return squared_norm / (1.0 + squared_norm) * torch.rsqrt(squared_norm + SQUASH_EPS) * s


def dynamic_routing(u_hat: torch.Tensor, iterations: int) -> torch.Tensor:
  """`[B, in, out, dim]` predictions -> `[B, out, dim]` class capsules (b += <u_hat, v>)."""
  logits = torch.zeros(u_hat.shape[:3], dtype=u_hat.dtype, device=u_hat.device)
  for iteration in range(iterations):
    coupling = torch.softmax(logits, dim=-1)
    v = squash(torch.einsum("bij,bijd->bjd", coupling, u_hat))
    if iteration < iterations - 1:
      logits = logits + torch.einsum("bijd,bjd->bij", u_hat, v)
  return v


class RCCapsNet(nn.Module):
  """The twin of `jaxret.models.RCCapsNet` (NCHW images in, `[B, num_classes * capsule_dim]` embedding out)."""

  def __init__(self, num_classes: int = 23, capsule_dim: int = 16, primary_capsule_types: int = 32,
               primary_capsule_dim: int = 16, routing_iterations: int = 3, stem_features: int = 64,
               residual_features: tuple[int, ...] = (128, 256), dropout_rate: float = 0.3,
               leaky_relu_slope: float = 0.3, batch_norm_momentum: float = 0.99, in_channels: int = 3):
    super().__init__()
    self.num_classes, self.capsule_dim = num_classes, capsule_dim
    self.primary_capsule_dim = primary_capsule_dim
    self.routing_iterations = routing_iterations
    self.dropout_rate = dropout_rate
    self.slope = leaky_relu_slope
    self.stem = SameConv2d(in_channels, stem_features, 7, 2)
    self.stem_bn = batch_norm(stem_features, batch_norm_momentum)
    features = [stem_features, *residual_features]
    self.residual_blocks = nn.ModuleList(
        ResidualBlock(a, b, 2, leaky_relu_slope, batch_norm_momentum) for a, b in zip(features, features[1:]))
    self.primary = ResidualBlock(features[-1], primary_capsule_types * primary_capsule_dim, 2, leaky_relu_slope,
                                 batch_norm_momentum)
    # Glorot-uniform as Keras; load_flax_params replaces it for the comparison.
    bound = math.sqrt(6.0 / (primary_capsule_dim + num_classes * capsule_dim))
    self.class_kernel = nn.Parameter(
        torch.empty(primary_capsule_dim, num_classes * capsule_dim).uniform_(-bound, bound))

  def forward(self, images: torch.Tensor) -> torch.Tensor:
    x = F.dropout2d(F.relu(self.stem_bn(self.stem(images))), self.dropout_rate, self.training)
    for block in self.residual_blocks:
      x = F.dropout2d(block(x), self.dropout_rate, self.training)
    x = self.primary(x)
    batch = x.shape[0]
    # Capsules are consecutive channels at each grid cell, in NHWC order as in the Keras/Flax model.
    u = squash(x.permute(0, 2, 3, 1).reshape(batch, -1, self.primary_capsule_dim))
    u_hat = (u @ self.class_kernel).view(batch, u.shape[1], self.num_classes, self.capsule_dim)
    v = dynamic_routing(u_hat, self.routing_iterations)
    v = v * torch.rsqrt(torch.clamp(torch.sum(v * v, dim=-1, keepdim=True), min=1e-24))
    return v.reshape(batch, -1)


def safe_sqrt(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
  positive = x > eps
  return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


def batch_hard_triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
  """Batch-hard triplet loss on Euclidean distances, mean over anchors with a positive and a negative."""
  sq_norms = torch.sum(embeddings * embeddings, dim=1)
  sq = torch.clamp(sq_norms[:, None] + sq_norms[None, :] - 2.0 * embeddings @ embeddings.T, min=0.0)
  eye = torch.eye(len(labels), dtype=torch.bool, device=embeddings.device)
  distances = safe_sqrt(torch.where(eye, torch.zeros_like(sq), sq))
  same = labels[:, None] == labels[None, :]
  positive, negative = same & ~eye, ~same
  finfo = torch.finfo(distances.dtype)
  hardest_positive = torch.where(positive, distances, finfo.min).amax(dim=1)
  hardest_negative = torch.where(negative, distances, finfo.max).amin(dim=1)
  valid = positive.any(dim=1) & negative.any(dim=1)
  losses = torch.clamp(hardest_positive - hardest_negative + margin, min=0.0)
  return torch.where(valid, losses, 0.0).sum() / torch.clamp(valid.sum(), min=1)


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int) -> float:
  """optax.warmup_cosine_decay_schedule(0, 1, warmup, decay_steps=max(total, warmup + 1), 0) at `step`."""
  decay_steps = max(total_steps, warmup_steps + 1)
  if step < warmup_steps:
    return step / warmup_steps
  progress = min(step - warmup_steps, decay_steps - warmup_steps) / (decay_steps - warmup_steps)
  return 0.5 * (1.0 + math.cos(math.pi * progress))


class TrainStep:
  """One optimisation step of the twin, as `jaxret.trainer.train_step` does it: forward, loss, backward,
  clip by global norm, AdamW, BatchNorm statistics updated (the model is in training mode).

  `compile=True` wraps the model in `torch.compile` (forward and backward; the optimiser stays eager).
  `autocast_dtype=torch.bfloat16` runs the model under `torch.autocast` (convolutions and the prediction and
  routing products in bfloat16, as `dtype=bfloat16` does in JAX); parameters and the loss stay float32.
  """

  def __init__(self, model: RCCapsNet, *, learning_rate: float = 1e-3, weight_decay: float = 0.0,
               grad_clip_norm: float = 1.0, warmup_steps: int = 50, total_steps: int = 1000,
               margin: float = 0.2, compile: bool = False,  # pylint: disable=redefined-builtin
               autocast_dtype: torch.dtype | None = None):
    self.model = model.train()
    self.forward = torch.compile(model) if compile else model
    self.autocast_dtype = autocast_dtype
    self.margin = margin
    self.grad_clip_norm = grad_clip_norm
    self.optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.9, 0.999), eps=1e-8,
                                       weight_decay=weight_decay)
    self.scheduler = torch.optim.lr_scheduler.LambdaLR(
        self.optimizer, lambda step: warmup_cosine(step, warmup_steps=warmup_steps, total_steps=total_steps))

  def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    self.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(images.device.type, dtype=self.autocast_dtype or torch.float32,
                        enabled=self.autocast_dtype is not None):
      embeddings = self.forward(images)
    loss = batch_hard_triplet_loss(embeddings.float(), labels, self.margin)
    loss.backward()
    if self.grad_clip_norm > 0:
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)
    self.optimizer.step()
    self.scheduler.step()
    return loss.detach()


def _tensor(x) -> torch.Tensor:
  """A float32 CPU tensor holding a copy of `x` (JAX arrays give read-only NumPy views)."""
  return torch.from_numpy(np.array(x, np.float32))


def _conv_weight(kernel) -> torch.Tensor:
  """Flax `[kh, kw, in, out]` -> PyTorch `[out, in, kh, kw]`."""
  return _tensor(np.transpose(np.asarray(kernel, np.float32), (3, 2, 0, 1)))


def _load_conv(conv: nn.Conv2d, params) -> None:
  conv.weight.data.copy_(_conv_weight(params["kernel"]))
  conv.bias.data.copy_(_tensor(params["bias"]))


def _load_bn(bn: nn.BatchNorm2d, params, stats) -> None:
  bn.weight.data.copy_(_tensor(params["scale"]))
  bn.bias.data.copy_(_tensor(params["bias"]))
  bn.running_mean.copy_(_tensor(stats["mean"]))
  bn.running_var.copy_(_tensor(stats["var"]))


def _load_residual(block: ResidualBlock, params, stats) -> None:
  for name in ("conv1", "conv2", "shortcut_conv"):
    _load_conv(getattr(block, name), params[name])
  for name in ("bn1", "bn2", "shortcut_bn"):
    _load_bn(getattr(block, name), params[name], stats[name])


@torch.no_grad()
def load_flax_params(model: RCCapsNet, params, batch_stats) -> RCCapsNet:
  """Copies the parameters and BatchNorm statistics of a `jaxret.models.RCCapsNet` into the twin."""
  _load_conv(model.stem, params["stem"]["conv"])
  _load_bn(model.stem_bn, params["stem"]["bn"], batch_stats["stem"]["bn"])
  for index, block in enumerate(model.residual_blocks):
    _load_residual(block, params[f"residual_block_{index}"], batch_stats[f"residual_block_{index}"])
  _load_residual(model.primary, params["primary_capsules"]["residual_block"],
                 batch_stats["primary_capsules"]["residual_block"])
  kernel = np.asarray(params["class_capsules"]["kernel"], np.float32)
  if kernel.shape != tuple(model.class_kernel.shape):
    raise ValueError(f"The class-capsule kernel has shape {kernel.shape}; the twin expects "
                     f"{tuple(model.class_kernel.shape)} (shared weights only).")
  model.class_kernel.copy_(_tensor(kernel))
  return model


def flax_grads_as_torch(grads) -> dict[str, np.ndarray]:
  """JAX gradients of an RCCapsNet, named and laid out as the twin's `named_parameters()`."""
  out = {"stem.weight": _conv_weight(grads["stem"]["conv"]["kernel"]).numpy(),
         "stem.bias": np.asarray(grads["stem"]["conv"]["bias"]),
         "stem_bn.weight": np.asarray(grads["stem"]["bn"]["scale"]),
         "stem_bn.bias": np.asarray(grads["stem"]["bn"]["bias"]),
         "class_kernel": np.asarray(grads["class_capsules"]["kernel"])}
  blocks = {f"residual_blocks.{i}": grads[f"residual_block_{i}"]
            for i in range(sum(k.startswith("residual_block_") for k in grads))}
  blocks["primary"] = grads["primary_capsules"]["residual_block"]
  for prefix, block in blocks.items():
    for name in ("conv1", "conv2", "shortcut_conv"):
      out[f"{prefix}.{name}.weight"] = _conv_weight(block[name]["kernel"]).numpy()
      out[f"{prefix}.{name}.bias"] = np.asarray(block[name]["bias"])
    for name in ("bn1", "bn2", "shortcut_bn"):
      out[f"{prefix}.{name}.weight"] = np.asarray(block[name]["scale"])
      out[f"{prefix}.{name}.bias"] = np.asarray(block[name]["bias"])
  return out
