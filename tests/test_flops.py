"""FLOPs from the jaxpr (`jaxret.flops`) against hand counts and XLA's CPU cost analysis."""

import functools
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxret import embedding
from jaxret import flops
from jaxret import losses
from jaxret import run_config
from jaxret import trainer

REPO = pathlib.Path(__file__).resolve().parents[1]
NHWC = ("NHWC", "HWIO", "NHWC")


def xla_cpu_flops(fn, *args, **compiler_options) -> float:
  """XLA's cost analysis of `jax.jit(fn)` compiled for the CPU."""
  analysis = jax.jit(fn).lower(*args).compile(compiler_options or None).cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis["flops"])


def valid_taps_loop(input_size, kernel_size, output_size, stride, padding_low, lhs_dilation, rhs_dilation):
  """Python loop over (output, tap): does the tap land on an input element of the dilated, padded input?"""
  count = 0
  for o in range(output_size):
    for k in range(kernel_size):
      position = o * stride - padding_low + k * rhs_dilation  # in the lhs-dilated, unpadded input
      if position % lhs_dilation == 0 and 0 <= position // lhs_dilation < input_size:
        count += 1
  return count


def same_conv_macs(size, kernel, stride, in_features, out_features):
  """Multiply-adds per image of a square SAME conv (TF/Flax padding: the extra row at the end), by loops."""
  out = -(-size // stride)
  pad_low = max((out - 1) * stride + kernel - size, 0) // 2
  taps = valid_taps_loop(size, kernel, out, stride, pad_low, 1, 1)
  return taps * taps * in_features * out_features


def rccapsnet_conv_macs(size, stem=64, residual=(128, 256, 512)):
  """(stem, all) conv multiply-adds per image of RCCapsNet's forward pass, layer by layer from its definition:
  stem 7x7/2, then per residual block 3x3/2, 3x3/1 and the 1x1/2 shortcut (the last block makes the capsules)."""
  stem_macs = same_conv_macs(size, 7, 2, 3, stem)
  total, size, features = stem_macs, -(-size // 2), stem
  for out_features in residual:
    total += same_conv_macs(size, 3, 2, features, out_features)
    size = -(-size // 2)
    total += same_conv_macs(size, 3, 1, out_features, out_features)
    total += same_conv_macs(size * 2, 1, 2, features, out_features)
    features = out_features
  return stem_macs, total


def routing_macs(in_caps, in_dim=16, out_caps=23, out_dim=16, iterations=3):
  """`dynamic_routing_shared` forward: 2r - 1 products with u ([in, in_dim] x [in, out]) and 2r - 1 with W."""
  return (2 * iterations - 2) * in_caps * in_dim * out_caps + (2 * iterations - 1) * out_caps * in_dim * out_dim


@pytest.mark.parametrize("args", [
    # input, kernel, output, stride, padding_low, lhs_dilation, rhs_dilation
    (8, 3, 8, 1, 1, 1, 1), (9, 3, 5, 2, 1, 1, 1), (256, 7, 128, 2, 2, 1, 1), (10, 1, 5, 2, 0, 1, 1),
    (4, 3, 8, 1, 2, 2, 1),   # input gradient of a stride-2 conv: holes between the inputs
    (9, 5, 3, 1, 0, 1, 2),   # kernel gradient of a stride-2 conv: a dilated "kernel"
    (7, 3, 6, 1, -1, 1, 1),  # negative padding crops
    (5, 4, 9, 2, 3, 3, 2),
])
def test_valid_taps_equal_a_loop_over_outputs_and_taps(args):
  input_size, kernel, output, stride, pad_low, lhs_dilation, rhs_dilation = args
  assert flops.conv_valid_taps(input_size, kernel, output, stride=stride, padding_low=pad_low,
                               lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation) == valid_taps_loop(*args)


def test_conv_layer_against_a_hand_count():
  x = jnp.zeros((2, 8, 8, 6))
  kernel = jnp.zeros((3, 3, 3, 4))  # 2 feature groups of 3 input channels

  def conv(x, kernel):
    return lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=NHWC, feature_group_count=2)

  # By hand: 3x3 SAME on 8x8 loses 2 taps per row at each border, 3 * 8 - 2 = 22 (output, tap) pairs per
  # dimension; 2 images, 4 output channels, 3 input channels per group; 2 FLOPs per multiply-add.
  assert flops.count_flops(conv, x, kernel).matmul_flops == 2 * 2 * 4 * 3 * 22 * 22
  # VALID, stride 2: the textbook 2 * B * H_out * W_out * C_out * C_in * k^2.
  valid = functools.partial(lax.conv_general_dilated, window_strides=(2, 2), padding="VALID",
                            dimension_numbers=NHWC)
  count = flops.count_flops(valid, jnp.zeros((2, 9, 9, 3)), jnp.zeros((3, 3, 3, 5)))
  assert count.matmul_flops == 2 * 2 * 4 * 4 * 5 * 3 * 9 and count.flops == count.matmul_flops


@pytest.mark.parametrize("stride,padding,groups", [(1, "SAME", 1), (2, "SAME", 1), (2, "SAME", 4),
                                                   (3, ((1, 2), (0, 3)), 2), (2, "VALID", 1)])
def test_conv_and_its_gradients_against_xla(stride, padding, groups):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 11, 10, 8)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((5, 3, 8 // groups, 8)), jnp.float32)

  def conv(x, kernel):
    return lax.conv_general_dilated(x, kernel, (stride, stride), padding, dimension_numbers=NHWC,
                                    feature_group_count=groups)

  cotangent = jnp.ones(jax.eval_shape(conv, x, kernel).shape)

  def forward_and_gradients(x, kernel, cotangent):
    out, vjp = jax.vjp(conv, x, kernel)
    return out, vjp(cotangent)

  forward = flops.count_flops(conv, x, kernel)
  assert forward.flops == xla_cpu_flops(conv, x, kernel)
  both = flops.count_flops(forward_and_gradients, x, kernel, cotangent)
  # The input gradient (lhs-dilated) and the kernel gradient (rhs-dilated, batch-grouped for groups > 1)
  # need exactly the forward's multiply-adds each.
  assert both.conv_flops == 3 * forward.conv_flops
  assert both.flops == xla_cpu_flops(forward_and_gradients, x, kernel, cotangent)


def test_matmul_against_xla():
  a, b = jnp.ones((3, 5, 7)), jnp.ones((3, 7, 4))
  count = flops.count_flops(jnp.matmul, a, b)
  assert count.matmul_flops == 2 * 3 * 5 * 4 * 7 == xla_cpu_flops(jnp.matmul, a, b)


def test_loops_and_branches_count_their_iterations():
  x, w = jnp.ones((4, 8)), jnp.ones((8, 8))
  one = 2 * 4 * 8 * 8  # one x @ w

  def scanned(x, w):
    return lax.scan(lambda c, _: (c @ w, None), x, None, length=5)[0]

  def counted_while(x, w):
    return lax.while_loop(lambda c: c[0] < 7, lambda c: (c[0] + 1, c[1] @ w), (2, x))[1]

  def dynamic_while(x, w, n):
    return lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, c[1] @ w), (0, x))[1]

  def branches(x, w):
    return lax.cond(x[0, 0] > 0, lambda: x @ w @ w, lambda: x @ w)

  assert flops.count_flops(scanned, x, w).matmul_flops == 5 * one
  assert flops.count_flops(lambda x, w: lax.fori_loop(0, 3, lambda i, c: c @ w, x), x, w).matmul_flops == 3 * one
  assert flops.count_flops(counted_while, x, w).matmul_flops == 5 * one
  with pytest.raises(ValueError, match="while_trip_count"):
    flops.count_flops(dynamic_while, x, w, 4)
  assert flops.count_flops(dynamic_while, x, w, 4, while_trip_count=6).matmul_flops == 6 * one
  assert flops.count_flops(branches, x, w).matmul_flops == 2 * one  # the more expensive branch
  assert flops.count_flops(jax.jit(jax.checkpoint(lambda x: jnp.tanh(x @ w))), x).matmul_flops == one


def test_what_is_counted_besides_matmuls():
  x = jnp.ones((3, 4))
  count = flops.count_flops(lambda x: jnp.sum(jnp.exp(x) * 2.0 + x ** 3), x)
  # mul, add: 12 each; x ** 3 is two multiplies; the sum folds 12 elements into 1: 11; exp is apart.
  assert count.elementwise_flops == 12 + 12 + 24 + 11 and count.transcendentals == 12
  assert count.matmul_flops == 0 and not count.uncounted
  # Integer work (indices, the PRNG) and dtype conversions are not FLOPs.
  ints = flops.count_flops(lambda k: jax.random.bits(k, (100,)).astype(jnp.float32), jax.random.key(0))
  assert ints.flops == 0 and not ints.uncounted
  assert "sort" in flops.count_flops(jnp.sort, x).uncounted  # not silently free


def tiny_config(image_size=32, batch_size=8, model="rccapsnet_tiny"):
  config = run_config.base_config()
  config.model.name = model
  config.input.image_size = image_size
  config.input.batch_size = batch_size
  return config


def abstract_step(config):
  """The trainer's jitted step and abstract (state, batch): nothing is initialised or compiled."""
  model = embedding.model_from_config(config)
  objective = losses.objective_from_config(config.loss)
  tx = trainer.make_optimizer(config, objective)
  batch_size, size = config.input.batch_size, config.input.image_size
  images = jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32)
  pixels = jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8)  # What the step gets: uint8 pixels.
  context = losses.LossContext(num_classes=batch_size, num_categories=23, embedding_dim=23 * 16)
  state = jax.eval_shape(lambda: trainer.create_state(config, model, tx, objective, context))
  labels = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
  batch = {"image": pixels, "item_id": labels, "category": labels, "class_index": labels}
  step = jax.jit(functools.partial(trainer.train_step, model=model, tx=tx, objective=objective, seed=0,
                                   augmentation=trainer.augmentation_from_config(config)))
  forward = jax.jit(lambda variables, images: model.apply(variables, images, train=False)[0])
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  return step, state, batch, forward, variables, images


def test_rccapsnet_tiny_forward_and_train_step_against_xla():
  """Within 1% (forward) and 4% (training step) of XLA's CPU cost analysis, which counts the same matmuls
  and convolutions but also the integer work, dtype conversions and what its own rewrites add or remove."""
  step, state, batch, forward, variables, images = abstract_step(tiny_config())
  # Code generation at -O0 makes the compiles about twice as fast; the cost analysis reads the optimised
  # HLO, which the backend optimisation level does not change.
  fast = {"xla_backend_optimization_level": 0}
  forward_count = flops.count_flops(forward, variables, images)
  assert forward_count.flops == pytest.approx(xla_cpu_flops(forward, variables, images, **fast), rel=0.01)
  step_count = flops.count_flops(step, state, batch)
  assert not step_count.uncounted
  xla_step = xla_cpu_flops(step, state, batch, **fast)
  assert step_count.flops == pytest.approx(xla_step, rel=0.04)
  assert 0.85 * xla_step < step_count.matmul_flops < step_count.flops


def test_rccapsnet_256_matches_the_hand_count():
  """The issue's hand count: about 5.9 GFLOP per image forward (stem 0.31, each residual stage about 1.9),
  17.19 GFLOP per image for the training step from XLA's CPU cost analysis (bfloat16, batch 64)."""
  batch_size = 4
  step, state, batch, forward, variables, images = abstract_step(tiny_config(256, batch_size, "rccapsnet"))
  stem_macs, conv_macs = rccapsnet_conv_macs(256)
  in_caps = 16 * 16 * 32
  forward_count = flops.count_flops(forward, variables, images)
  assert forward_count.conv_flops == batch_size * 2 * conv_macs
  assert forward_count.by_primitive["dot_general"] == batch_size * 2 * routing_macs(in_caps)
  dense_macs = 128 ** 2 * 147 * 64 + 3 * (64 ** 2 * 9 * (64 * 128 + 128 * 128) + 64 ** 2 * 64 * 128)
  per_image = forward_count.matmul_flops / batch_size
  # Taps on the SAME padding are not multiply-adds: 3.7% fewer than the dense 5.94 GFLOP.
  assert 0.95 * 2 * dense_macs < per_image < 2 * dense_macs
  assert per_image == pytest.approx(5.75e9, rel=0.002)

  step_count = flops.count_flops(step, state, batch)
  # Backward: the input and the kernel gradient of every conv, but no input gradient for the stem.
  assert step_count.conv_flops == batch_size * 2 * (3 * conv_macs - stem_macs)
  assert step_count.flops / batch_size == pytest.approx(17.19e9, rel=0.01)


def test_bench_prints_the_mfu_of_the_jaxpr_count():
  """`bench.train_step` on the CPU: FLOPs per image from the jaxpr equal the hand count, and its MFU is the
  hand count times images/s over the peak it is given."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",  # -O0 code generation: a faster compile, the same FLOPs
             XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0")
  completed = subprocess.run(
      [sys.executable, "-m", "bench.train_step", "--image_size", "32", "--batch_size", "8", "--steps", "1",
       "--repeats", "1", "--warmup", "0", "--peak_tflops", "0.05"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert completed.returncode == 0, completed.stderr[-3000:]
  result = json.loads(completed.stdout.strip().splitlines()[-1])
  stem_macs, conv_macs = rccapsnet_conv_macs(32)
  # The step's augmentation resizes each [32, 32, 3] crop to 32 x 32 by two contractions with [32, 32] filters
  # (jax.image.scale_and_translate): 2 x 2 * 32^3 * 3 FLOPs, counted as matmuls.
  resize = 2 * 2 * 32**3 * 3
  hand_count = 2 * (3 * conv_macs - stem_macs) + 3 * 2 * routing_macs(2 * 2 * 32) + resize
  assert result["flop_source"] == "jaxpr"
  # The rest of the matmul FLOPs: the loss's [8, 8] distance matrix and its gradient.
  assert result["matmul_flops_per_image"] == pytest.approx(hand_count, rel=1e-4)
  assert result["mfu"] == pytest.approx(
      result["matmul_flops_per_image"] * result["images_per_sec"] / 0.05e12, rel=1e-9)
  assert result["flops_per_image"] == pytest.approx(result["xla_flops_per_image"], rel=0.04)
  assert "MFU" in completed.stdout and "from the jaxpr" in completed.stdout
  assert math.isfinite(result["loss_value"])
