"""Capsule layers and models: registry, shapes, embeddings, parameter counts, forward+backward."""

import functools

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxret import models
from jaxret.models import capsule_layers
from jaxret.models import routing


def key(seed):
  # XLA's RngBitGenerator keys: the default threefry keys take seconds to compile on CPU for every new
  # parameter shape, which would dominate these tests; where the random bits come from does not matter here.
  return jax.random.key(seed, impl="rbg")


def init(model, images, seed=0):
  rngs = {"params": key(seed), "dropout": key(seed + 1)}
  return jax.jit(functools.partial(model.init, train=False))(rngs, images)


def count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def random_images(batch, height, width, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, height, width, 3)), jnp.float32)


# --- Registry and options -----------------------------------------------------------------------------------


def test_registry_names_and_errors():
  # The capsule networks first; the pretrained backbones (tests/test_backbones.py) follow.
  assert models.MODEL_NAMES[:6] == ("sccapsnet", "rccapsnet", "qrccapsnet", "sccapsnet_tiny", "rccapsnet_tiny",
                                    "qrccapsnet_tiny")
  assert isinstance(models.get_model("qrccapsnet"), models.QRCCapsNet)
  assert isinstance(models.get_model("qrccapsnet"), models.RCCapsNet)  # same architecture
  assert isinstance(models.get_model("sccapsnet_tiny", num_classes=5), models.SCCapsNet)
  assert models.get_model("rccapsnet_tiny", primary_capsule_types=2).primary_capsule_types == 2
  assert models.get_model("sccapsnet").embedding_dim == 23 * 16
  with pytest.raises(ValueError, match="sccapsnet, rccapsnet, qrccapsnet"):
    models.get_model("capsnet")
  with pytest.raises(TypeError, match="num_capsules"):
    models.get_model("rccapsnet", num_capsules=23)
  with pytest.raises(ValueError, match="embedding"):
    models.get_model("rccapsnet", embedding="label_at_eval")
  with pytest.raises(ValueError, match="logit_update"):
    models.get_model("rccapsnet", logit_update="sum")


# --- Parameter counts against the published Keras layers ----------------------------------------------------


def keras_conv(k, c_in, c_out):
  return k * k * c_in * c_out + c_out  # kernel + bias (Keras Conv2D uses a bias even before BN)


def keras_residual_block(c_in, c_out):
  """Two 3x3 convs and a 1x1 projection, each with BatchNormalization; returns (params, bn statistics)."""
  convs = keras_conv(3, c_in, c_out) + keras_conv(3, c_out, c_out) + keras_conv(1, c_in, c_out)
  return convs + 3 * 2 * c_out, 3 * 2 * c_out


def keras_counts(model_type, num_classes=23, capsule_dim=16):
  """Counts of the published Keras model (blocks.py of birdortyedi/image-retrieval-with-capsules).

  Returns (trainable parameters, BatchNorm moving statistics); Keras' "Total params" is their sum.
  """
  fashion_caps = 16 * num_classes * capsule_dim  # shared kernel (1, 16, classes * dim), no bias
  if model_type == "rc":
    params, stats = keras_conv(7, 3, 64) + 2 * 64, 2 * 64
    for c_in, c_out in [(64, 128), (128, 256), (256, 512)]:
      block_params, block_stats = keras_residual_block(c_in, c_out)
      params, stats = params + block_params, stats + block_stats
  else:
    params = sum(keras_conv(7, c_in, c_out) + 2 * c_out for c_in, c_out in [(3, 64), (64, 128), (128, 64)])
    stats = 2 * (64 + 128 + 64)
    params += keras_conv(7, 64, 512)
  return params + fashion_caps, stats


@pytest.mark.parametrize("name,model_type,published_total", [("rccapsnet", "rc", 4.85e6),
                                                             ("qrccapsnet", "rc", 4.85e6),
                                                             ("sccapsnet", "sc", 2.43e6)])
def test_parameter_counts_match_published_code(name, model_type, published_total):
  model = models.get_model(name, num_classes=23, share_weights=True)
  shapes = jax.eval_shape(functools.partial(init, model), jnp.zeros((1, 256, 256, 3)))
  params, stats = count(shapes["params"]), count(shapes["batch_stats"])
  print(f"{name} at 256x256, 23 classes: {params:,} parameters + {stats:,} BatchNorm statistics = "
        f"{params + stats:,}")
  assert (params, stats) == keras_counts(model_type)
  assert abs(params + stats - published_total) / published_total < 0.01


def test_primary_capsule_grid_at_256():
  model = models.get_model("rccapsnet")
  shapes = jax.eval_shape(lambda x: init(model, x), jnp.zeros((1, 256, 256, 3)))
  assert shapes["params"]["class_capsules"]["kernel"].shape == (16, 23 * 16)
  (_, _), state = jax.eval_shape(
      lambda v, x: model.apply(v, x, mutable=["intermediates"]), shapes, jnp.zeros((1, 256, 256, 3)))
  coupling, = state["intermediates"]["coupling"]
  assert coupling.shape == (1, 16 * 16 * 32, 23)  # 8,192 primary capsules


# --- Forward and backward -----------------------------------------------------------------------------------


def forward_backward(model, images, variables, category=None):
  """One jitted value_and_grad of a loss that uses the embedding and the capsule lengths."""

  @jax.jit
  def step(params, batch_stats, images, dropout_key):
    def loss_fn(params):
      (embedding, aux), state = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                            train=True, category=category,
                                            mutable=["batch_stats", "intermediates"],
                                            rngs={"dropout": dropout_key})
      weights = jnp.cos(jnp.arange(embedding.shape[-1], dtype=jnp.float32))
      loss = jnp.mean(embedding @ weights) + jnp.mean(jnp.square(1.0 - aux["capsule_lengths"][:, 0]))
      return loss, (embedding, aux, state)

    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  (loss, (embedding, aux, state)), grads = step(variables["params"], variables["batch_stats"], images, key(7))
  return loss, embedding, aux, state, grads


def check_forward_backward(model, images, variables=None):
  """Checks shapes, dtypes and finite, non-zero gradients; returns the last routing's coupling."""
  batch = images.shape[0]
  variables = init(model, images) if variables is None else variables
  loss, embedding, aux, state, grads = forward_backward(model, images, variables)
  chex.assert_shape(embedding, (batch, model.num_classes * model.capsule_dim))
  chex.assert_shape(aux["class_capsules"], (batch, model.num_classes, model.capsule_dim))
  chex.assert_shape(aux["capsule_lengths"], (batch, model.num_classes))
  assert embedding.dtype == jnp.float32 and aux["capsule_lengths"].dtype == jnp.float32
  assert np.isfinite(loss)
  chex.assert_tree_all_finite(grads)
  flat_grads = flax.traverse_util.flatten_dict(grads)
  for path, grad in flat_grads.items():
    # Conv biases feeding a BatchNorm have a zero gradient by construction; every other leaf must learn.
    if path[-1] in ("kernel", "scale"):
      assert np.abs(grad).max() > 0, path
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), variables["batch_stats"], state["batch_stats"])
  assert max(jax.tree.leaves(moved)) > 0
  lengths = np.asarray(aux["capsule_lengths"])
  assert np.all((lengths >= 0) & (lengths < 1))
  coupling, = state["intermediates"]["coupling"]
  np.testing.assert_allclose(np.sum(coupling, axis=-1), 1.0, rtol=1e-5)
  return coupling


@pytest.mark.parametrize("name", ["sccapsnet", "rccapsnet", "qrccapsnet"])
def test_models_forward_backward_at_64_and_256(name):
  model = models.get_model(name)
  # With shared weights the parameters do not depend on the input size: one init serves both sizes.
  variables = init(model, random_images(1, 64, 64))
  for size in (64, 256):
    coupling = check_forward_backward(model, random_images(2, size, size), variables)
    chex.assert_shape(coupling, (2, (size // 16)**2 * 32, 23))


@pytest.mark.parametrize("name", ["sccapsnet_tiny", "rccapsnet_tiny", "qrccapsnet_tiny"])
def test_tiny_models_forward_backward(name):
  check_forward_backward(models.get_model(name), random_images(2, 64, 64))


def test_any_input_size_and_unshared_weights():
  model = models.get_model("sccapsnet_tiny", share_weights=False, num_classes=5, capsule_dim=4)
  images = random_images(2, 48, 80)
  variables = init(model, images)
  in_caps = 3 * 5 * 8  # ceil(48 / 16) x ceil(80 / 16) grid x 8 capsule types
  assert variables["params"]["class_capsules"]["kernel"].shape == (in_caps, 8, 5 * 4)
  coupling = check_forward_backward(model, images, variables)
  chex.assert_shape(coupling, (2, in_caps, 5))


def test_train_step_compiles_once_and_follows_the_dropout_key():
  model = models.get_model("sccapsnet_tiny")
  images = random_images(2, 32, 32)
  variables = init(model, images)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def train_embedding(variables, images, dropout_key):
    (embedding, _), _ = model.apply(variables, images, train=True, mutable=["batch_stats"],
                                    rngs={"dropout": dropout_key})
    return embedding

  first = train_embedding(variables, images, key(1))
  np.testing.assert_array_equal(train_embedding(variables, images, key(1)), first)
  assert np.abs(train_embedding(variables, images, key(2)) - first).max() > 1e-4
  train_embedding(variables, random_images(2, 32, 32, seed=1), key(3))



def test_inference_embeds_each_image_on_its_own():
  """In inference mode there is no dropout and BatchNorm uses its running statistics: an image's embedding
  does not depend on the key, on the other images of the batch, or on the batch size (the catalogue relies
  on this when it pads queries); in training mode it does."""
  model = models.get_model("sccapsnet_tiny", dropout_rate=0.5)
  images = random_images(4, 32, 32)
  variables = init(model, images)
  evaluate = jax.jit(lambda v, x: model.apply(v, x, train=False, rngs={"dropout": key(7)})[0])
  together = evaluate(variables, images)
  alone = jnp.concatenate([evaluate(variables, images[i:i + 1]) for i in range(4)])
  np.testing.assert_allclose(alone, together, rtol=1e-5, atol=1e-6)
  reordered = evaluate(variables, images[::-1])[::-1]
  np.testing.assert_allclose(reordered, together, rtol=1e-5, atol=1e-6)
  (trained, _), _ = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"],
                                                     rngs={"dropout": key(7)}))(variables, images)
  assert np.abs(trained - together).max() > 1e-3


# --- Embedding modes ----------------------------------------------------------------------------------------


def blocks(embedding, num_classes):
  return np.asarray(embedding).reshape(embedding.shape[0], num_classes, -1)


def test_embedding_modes():
  images = random_images(3, 32, 32)
  category = jnp.array([4, 0, 22])
  variables = init(models.get_model("sccapsnet_tiny"), images)

  def run(embedding, train=False, category=None):
    model = models.get_model("sccapsnet_tiny", embedding=embedding)
    if train:  # dropout off so that the modes see the same class capsules
      model = models.get_model("sccapsnet_tiny", embedding=embedding, dropout_rate=0.0)
      (out, aux), _ = model.apply(variables, images, train=True, category=category, mutable=["batch_stats"])
      return out, aux
    return model.apply(variables, images, train=False, category=category)

  emb_all, aux = run("all")
  capsules = np.asarray(aux["class_capsules"])
  normalised = capsules / np.linalg.norm(capsules, axis=-1, keepdims=True)
  np.testing.assert_allclose(blocks(emb_all, 23), normalised, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(blocks(emb_all, 23), axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(aux["capsule_lengths"], np.linalg.norm(capsules, axis=-1), rtol=1e-5)
  predicted = np.argmax(np.linalg.norm(capsules, axis=-1), axis=-1)
  np.testing.assert_array_equal(aux["predicted_class"], predicted)

  def expected_masked(classes):
    mask = np.eye(23)[classes][:, :, None]
    return normalised * mask

  emb_predicted, _ = run("predicted")
  np.testing.assert_allclose(blocks(emb_predicted, 23), expected_masked(predicted), rtol=1e-5, atol=1e-6)
  emb_label_eval, _ = run("label", category=category)  # category is not used at evaluation
  np.testing.assert_array_equal(emb_label_eval, emb_predicted)
  emb_leaky, _ = run("label_leaky_eval", category=category)
  np.testing.assert_allclose(blocks(emb_leaky, 23), expected_masked(np.asarray(category)), rtol=1e-5,
                             atol=1e-6)

  emb_label_train, aux_train = run("label", train=True, category=category)
  capsules_train = np.asarray(aux_train["class_capsules"])
  normalised_train = capsules_train / np.linalg.norm(capsules_train, axis=-1, keepdims=True)
  np.testing.assert_allclose(blocks(emb_label_train, 23), normalised_train * np.eye(23)[category][:, :, None],
                             rtol=1e-5, atol=1e-6)


def test_label_embedding_needs_category():
  images = random_images(2, 32, 32)
  model = models.get_model("sccapsnet_tiny", embedding="label")
  variables = init(model, images)
  with pytest.raises(ValueError, match="category"):
    model.apply(variables, images, train=True, mutable=["batch_stats"], rngs={"dropout": key(0)})
  with pytest.raises(ValueError, match="shape"):
    model.apply(variables, images, train=True, category=jnp.zeros((3,), jnp.int32), mutable=["batch_stats"],
                rngs={"dropout": key(0)})
  leaky = models.get_model("sccapsnet_tiny", embedding="label_leaky_eval")
  with pytest.raises(ValueError, match="category"):
    leaky.apply(variables, images, train=False)
  with pytest.raises(ValueError, match="batch, height, width, channels"):
    model.apply(variables, images[0], train=False)


def test_capsule_embedding_zero_capsule_is_finite():
  capsules = jnp.zeros((2, 3, 4)).at[0, 1].set(jnp.array([3.0, 0.0, 4.0, 0.0]))
  embedding = models.capsule_embedding(capsules)
  np.testing.assert_allclose(embedding[0, 4:8], [0.6, 0.0, 0.8, 0.0], rtol=1e-6)
  assert np.all(np.isfinite(jax.grad(lambda c: jnp.sum(models.capsule_embedding(c)))(capsules)))


# --- Precision ----------------------------------------------------------------------------------------------


def test_bfloat16_computation_keeps_float32_params_and_embedding():
  images = random_images(2, 64, 64)
  model32 = models.get_model("sccapsnet_tiny")
  model16 = models.get_model("sccapsnet_tiny", dtype=jnp.bfloat16)
  variables = init(model16, images)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  emb16, aux16 = jax.jit(model16.apply)(variables, images)
  emb32, _ = jax.jit(model32.apply)(variables, images)
  assert emb16.dtype == jnp.float32 and aux16["capsule_lengths"].dtype == jnp.float32
  cosine = np.sum(np.asarray(emb16) * np.asarray(emb32), -1) / (
      np.linalg.norm(emb16, axis=-1) * np.linalg.norm(emb32, axis=-1))
  assert np.all(cosine > 0.95)
  check_forward_backward(model16, images, variables)


# --- Layers against explicit loops --------------------------------------------------------------------------


@pytest.mark.parametrize("share_weights", [True, False])
def test_routed_capsules_predictions_match_loop(share_weights):
  batch, in_caps, in_dim, out_caps, out_dim = 2, 6, 4, 3, 5
  u = np.random.default_rng(0).normal(size=(batch, in_caps, in_dim)).astype(np.float32)
  layer = capsule_layers.RoutedCapsules(out_caps, out_dim, routing_iterations=3, share_weights=share_weights)
  params = layer.init(key(0), u)
  v, coupling = layer.apply(params, u)
  kernel = np.asarray(params["params"]["kernel"], np.float64)
  u_hat = np.zeros((batch, in_caps, out_caps, out_dim))
  for b in range(batch):
    for i in range(in_caps):
      w_i = kernel if share_weights else kernel[i]  # [in_dim, out_caps * out_dim]
      for j in range(out_caps):
        u_hat[b, i, j] = u[b, i] @ w_i[:, j * out_dim:(j + 1) * out_dim]
  v_ref, c_ref = routing.dynamic_routing(u_hat.astype(np.float32), 3, return_coupling=True)
  np.testing.assert_allclose(v, v_ref, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(coupling, c_ref, rtol=1e-5, atol=1e-7)


def test_primary_capsules_group_consecutive_channels():
  images = random_images(2, 8, 8)
  layer = capsule_layers.PrimaryCapsules(num_types=3, capsule_dim=4, block="conv", kernel_size=3)
  params = layer.init(key(0), images)
  capsules = np.asarray(layer.apply(params, images))
  conv = flax.linen.Conv(12, (3, 3), strides=2, padding="SAME")
  features = np.asarray(conv.apply({"params": params["params"]["conv"]}, images))  # [2, 4, 4, 12]
  chex.assert_shape(capsules, (2, 4 * 4 * 3, 4))
  for h in range(4):
    for w in range(4):
      for t in range(3):
        s = features[:, h, w, 4 * t:4 * (t + 1)].astype(np.float64)
        sq_norm = np.sum(s**2, axis=-1, keepdims=True)
        expected = sq_norm / (1 + sq_norm) * s / np.sqrt(sq_norm)
        np.testing.assert_allclose(capsules[:, (h * 4 + w) * 3 + t], expected, rtol=1e-4, atol=1e-6)


def test_auto_dtype_is_bfloat16_on_accelerators_only(monkeypatch):
  assert models.resolve_dtype("auto") == jnp.float32  # The tests run on CPU.
  for backend, want in (("gpu", jnp.bfloat16), ("tpu", jnp.bfloat16), ("cpu", jnp.float32)):
    monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
    assert models.resolve_dtype("auto") == want
  assert models.resolve_dtype("bfloat16") == jnp.bfloat16
  from jaxret import run_config  # pylint: disable=g-import-not-at-top
  assert run_config.inshop_config().model.dtype == "auto"  # The In-shop configs compute in bf16 on GPU/TPU.
