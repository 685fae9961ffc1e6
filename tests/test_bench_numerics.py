"""Numerics behind the benchmarks: the bfloat16 step stays near the float32 one, the PyTorch twin computes the
JAX model's function, and the faiss check of bench/eval.py reads ranks as jaxret does."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxret import embedding
from jaxret import losses
from jaxret import metrics
from jaxret import trainer
from jaxret.models import routing

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_bench(name):
  """A module of bench/ by path (bench/ is scripts, not an installed package)."""
  spec = importlib.util.spec_from_file_location(f"bench_{name}_under_test", REPO / "bench" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


train_step_bench = load_bench("train_step")

# A small RCCapsNet (the real layers, few channels) that both frameworks build the same way.
SMALL = dict(stem_features=8, residual_features=(8, 16), primary_capsule_types=4, primary_capsule_dim=8)


def small_config(dtype="float32", dropout_rate=0.3):
  config = train_step_bench.bench_config(model="rccapsnet", image_size=32, batch_size=16, num_classes=5,
                                         loss="triplet", dtype=dtype)
  config.model.dropout_rate = dropout_rate
  for key, value in SMALL.items():
    config.model[key] = value
  return config


def loss_and_grads(config, params, batch_stats, batch):
  """Training-mode loss and parameter gradients of `config`'s model, as train_step computes them."""
  model = embedding.model_from_config(config)
  objective = losses.objective_from_config(config.loss)

  def loss_of(params):
    (embeddings, _), _ = model.apply({"params": params, "batch_stats": batch_stats}, batch["image"],
                                     train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(3)})
    return objective({}, {"embedding": embeddings}, batch)[0]

  return jax.jit(jax.value_and_grad(loss_of))(params)


def tree_get(tree, path):
  """The leaf of a nested dict at a `tree_leaves_with_path` path."""
  for key in path:
    tree = tree[key.key]
  return tree


@pytest.fixture(scope="module")
def float32_setup():
  config = small_config()
  model = embedding.model_from_config(config)
  objective = losses.objective_from_config(config.loss)
  context = losses.LossContext(num_classes=4, num_categories=5, embedding_dim=5 * 16)
  state = trainer.create_state(config, model, trainer.make_optimizer(config, objective), objective, context)
  batch = train_step_bench.synthetic_batch(config)
  return config, state, batch


def test_bfloat16_step_stays_near_float32(float32_setup):
  config, state, batch = float32_setup
  loss32, grads32 = loss_and_grads(config, state.params, state.batch_stats, batch)
  loss16, grads16 = loss_and_grads(small_config("bfloat16"), state.params, state.batch_stats, batch)
  assert loss16.dtype == jnp.float32
  np.testing.assert_allclose(loss16, loss32, rtol=0.03)
  # Every parameter's gradient points the same way (cosine) and has about the same size.
  compared = 0
  leaves = jax.tree_util.tree_leaves_with_path(grads32)
  for path, g32 in leaves:
    g16 = np.asarray(tree_get(grads16, path), np.float64).ravel()
    g32 = np.asarray(g32, np.float64).ravel()
    if np.linalg.norm(g32) < 1e-6 * max(1.0, float(np.abs(loss32))):
      continue  # Conv biases before BatchNorm: zero in exact arithmetic, rounding noise in both.
    cosine = g16 @ g32 / (np.linalg.norm(g16) * np.linalg.norm(g32))
    assert cosine > 0.98, (jax.tree_util.keystr(path), cosine)
    assert 0.9 < np.linalg.norm(g16) / np.linalg.norm(g32) < 1.1, jax.tree_util.keystr(path)
    compared += 1
  assert compared >= 0.7 * len(leaves)  # Only the conv biases that feed a BatchNorm are skipped.


def test_routing_bfloat16_near_float32():
  u_hat = jax.random.normal(jax.random.key(0), (4, 256, 23, 16)) * 0.2
  v32, c32 = routing.dynamic_routing(u_hat, 3, return_coupling=True)
  v16, c16 = routing.dynamic_routing(u_hat.astype(jnp.bfloat16), 3, return_coupling=True)
  assert v16.dtype == jnp.float32 and c16.dtype == jnp.float32
  np.testing.assert_allclose(v16, v32, atol=2e-2 * float(jnp.max(jnp.abs(v32))))
  np.testing.assert_allclose(c16, c32, atol=2e-3)


def test_torch_twin_computes_the_jax_loss_and_gradients(float32_setup):
  torch = pytest.importorskip("torch")
  torch_twin = load_bench("torch_twin")
  _, state, batch = float32_setup
  config = small_config(dropout_rate=0.0)  # Dropout masks come from different random streams.
  loss, grads = loss_and_grads(config, state.params, state.batch_stats, batch)

  twin = torch_twin.RCCapsNet(num_classes=5, dropout_rate=0.0, **SMALL)
  torch_twin.load_flax_params(twin, state.params, state.batch_stats)
  twin.train()
  images = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous()
  twin_loss = torch_twin.batch_hard_triplet_loss(twin(images), torch.from_numpy(batch["item_id"]).long(),
                                                 margin=config.loss.triplet["margin"])
  twin_loss.backward()

  np.testing.assert_allclose(twin_loss.item(), float(loss), rtol=1e-5)
  expected = torch_twin.flax_grads_as_torch(grads)
  named = dict(twin.named_parameters())
  assert set(named) == set(expected)
  scale = max(float(np.max(np.abs(g))) for g in expected.values())
  for name, parameter in named.items():
    np.testing.assert_allclose(parameter.grad.numpy(), expected[name], atol=1e-5 * scale, rtol=1e-3,
                               err_msg=name)


def test_torch_twin_same_padding_matches_tensorflow():
  pytest.importorskip("torch")
  torch_twin = load_bench("torch_twin")
  # (size, kernel, stride) -> (before, after): the extra pixel goes after, as in TensorFlow and Flax.
  assert torch_twin.same_padding(64, 7, 2) == (2, 3)
  assert torch_twin.same_padding(64, 3, 2) == (0, 1)
  assert torch_twin.same_padding(63, 3, 2) == (1, 1)
  assert torch_twin.same_padding(16, 3, 1) == (1, 1)
  assert torch_twin.same_padding(32, 1, 2) == (0, 0)


def test_faiss_first_hit_agrees_with_query_ranks():
  faiss = pytest.importorskip("faiss")
  eval_bench = load_bench("eval")
  query, query_labels, gallery, gallery_labels = eval_bench.clustered_embeddings(
      16, eval_bench.default_noise(16), num_products=40, num_queries=200, num_gallery=150)
  assert set(query_labels) == set(gallery_labels) == set(range(40))
  first, _ = eval_bench.faiss_first_hit(faiss, query, query_labels, gallery, gallery_labels, k=10)
  ranks = np.asarray(metrics.query_ranks(query, query_labels, gallery, gallery_labels, chunk_size=64))
  assert 0 < np.sum(ranks < 10) < len(ranks)  # Some hits and some misses within the 10 nearest.
  np.testing.assert_array_equal(np.minimum(ranks, 10), first)


# A second source for the peak table: units x clock x dense FLOPs per unit per clock, from the chips'
# architecture documents. Hopper SMs do 1024 dense bf16 FMAs per clock (2048 FLOPs) per tensor-core quad x 2,
# i.e. 4096 FLOPs/clock/SM in bf16 and half that in TF32; a TPU MXU of 128 x 128 does 2 x 16384 FLOPs/clock.
HAND_COUNTED_PEAKS = {
    # device kind: (units, GHz, bf16 FLOPs per unit per clock, TF32/bf16 ratio)
    "NVIDIA H100 80GB HBM3": (132, 1.830, 4096, 0.5),  # 132 SMs at 1830 MHz boost.
    "NVIDIA H200": (132, 1.830, 4096, 0.5),  # Same GH100 die and clock as the H100 SXM.
    "TPU v4": (2 * 4, 1.050, 2 * 128 * 128, 1.0),  # 2 TensorCores x 4 MXUs at 1050 MHz.
    "TPU v5p": (2 * 4, 1.750, 2 * 128 * 128, 1.0),  # 2 TensorCores x 4 MXUs at 1750 MHz.
    "TPU v5 lite": (4, 1.500, 2 * 128 * 128, 1.0),  # 1 TensorCore x 4 MXUs at 1500 MHz.
}


@pytest.mark.parametrize("device_kind", sorted(HAND_COUNTED_PEAKS))
def test_device_peak_table_matches_a_hand_count(device_kind):
  units, ghz, flops_per_clock, float32_ratio = HAND_COUNTED_PEAKS[device_kind]
  bfloat16 = units * ghz * 1e9 * flops_per_clock
  assert train_step_bench.device_peak_flops(device_kind, "bfloat16") == pytest.approx(bfloat16, rel=0.005)
  assert train_step_bench.device_peak_flops(device_kind, "float32") == pytest.approx(float32_ratio * bfloat16,
                                                                                    rel=0.005)


def test_unknown_device_has_no_peak():
  assert train_step_bench.device_peak_flops("cpu", "float32") is None
