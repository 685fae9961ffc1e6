"""The models of issue 16's methods (HDC's levels, ABE-M's attention ensemble, A-BIER's head): their contracts
with the losses that read them, their pretrained backbones, and a few steps of each in the real trainer."""

import doctest
import functools
import importlib.util
import json
import pathlib

import backbone_reference as reference  # tests/ is on sys.path under pytest.
import chex
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxret import input_pipeline
from jaxret import models
from jaxret import run_config
from jaxret import trainer
from jaxret.models import abe
from jaxret.models import hdc
from jaxret.models import import_weights

REPO = pathlib.Path(__file__).resolve().parents[1]
REFERENCE = reference.load_reference()


def rngs(seed=0):
  # XLA's RngBitGenerator keys compile much faster on CPU than threefry's; the bits do not matter here.
  return {"params": jax.random.key(seed, impl="rbg"), "dropout": jax.random.key(seed + 1, impl="rbg")}


def abstract_variables(model, shape=(1, 32, 32, 3)):
  return jax.eval_shape(lambda x: model.init(rngs(), x, train=False), jax.ShapeDtypeStruct(shape, jnp.float32))


def assert_backbone_is_the_plain_models(name, plain):
  """The model `name` has the plain backbone's module and variables (names, shapes, dtypes) under "backbone",
  everything else under "head", and is a backbone model (its weights import)."""
  variables = abstract_variables(models.get_model(name))
  plain_variables = abstract_variables(models.get_model(plain))
  assert set(variables["params"]) == {"backbone", "head"}
  for collection in ("params", "batch_stats"):
    chex.assert_trees_all_equal_shapes_and_dtypes(variables[collection]["backbone"],
                                                  plain_variables[collection]["backbone"])
  assert models.get_model(name).backbone == models.get_model(plain).backbone
  assert name in models.BACKBONE_NAMES


def import_tiny_weights(name, plain, tmp_path):
  """Imports the plain tiny backbone's reference weights into `name`: the backbone equals the plain model's
  import, the head is untouched."""
  layout = {k: tuple(v) for k, v in REFERENCE["tiny"][plain]["layout"].items()}
  file = tmp_path / f"{plain}.safetensors"
  save_file(reference.random_state_dict(layout), str(file))
  zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)
  fresh = zeros(abstract_variables(models.get_model(name)))
  loaded = import_weights.import_backbone(name, fresh, file)
  plain_loaded = import_weights.import_backbone(plain, zeros(abstract_variables(models.get_model(plain))), file)
  for collection in ("params", "batch_stats"):
    chex.assert_trees_all_equal(loaded[collection]["backbone"], plain_loaded[collection]["backbone"])
  chex.assert_trees_all_equal(loaded["params"]["head"], fresh["params"]["head"])
  return file, fresh, loaded


def tiny_variables(name, plain):
  """`(model, variables)` of the tiny model `name` with the backbone's variables only: the plain tiny model's
  reference weights converted with NumPy (no compilation, unlike `model.init`); each test adds a head."""
  model = models.get_model(name)
  layout = {k: tuple(v) for k, v in REFERENCE["tiny"][plain]["layout"].items()}
  backbone, _ = import_weights.convert_state_dict(name, reference.random_state_dict(layout),
                                                   import_weights.backbone_shapes(name))
  variables = {c: {"backbone": jax.tree.map(jnp.asarray, tree)} for c, tree in backbone.items()}
  return model, variables


# --- Running the real trainer ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tfds")
  input_pipeline.get_builder("synthetic_inshop/tiny", str(path))
  return str(path)


def smoke_config(data_dir, config_file, **changes):
  """`configs/<config_file>:smoke` (the tiny model on synthetic_inshop/tiny, 32x32), trained for 4 steps."""
  spec = importlib.util.spec_from_file_location("config_under_test", REPO / "configs" / config_file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("smoke")
  config.data_dir = data_dir
  config.total_steps, config.log_every, config.eval_every, config.checkpoint_every = 4, 2, 4, 4
  for field, value in changes.items():
    *parents, leaf = field.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def train(config, workdir):
  result = trainer.train_and_evaluate(config, str(workdir))
  with open(pathlib.Path(workdir) / "metrics.jsonl") as f:
    rows = [row for row in map(json.loads, f) if "loss" in row]
  assert [r["step"] for r in rows] == [2, 4]
  assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
  assert 0 <= result["recall@1"] <= 1
  return rows


# --- HDC ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size,output", [(14, 4), (5, 2), (4, 4), (2, 4), (7, 3), (1, 1)])
def test_adaptive_average_pool_against_python_loop(size, output):
  x = np.random.default_rng(size).normal(size=(2, size, size + 1, 3))
  want = np.zeros((2, output, output, 3))
  for i in range(output):
    for j in range(output):
      # PyTorch's adaptive pooling bins, written out: [floor(i n / s), ceil((i + 1) n / s)).
      r0, r1 = (i * size) // output, -((-(i + 1) * size) // output)
      c0, c1 = (j * (size + 1)) // output, -((-(j + 1) * (size + 1)) // output)
      want[:, i, j] = x[:, r0:r1, c0:c1].mean(axis=(1, 2))
  np.testing.assert_allclose(np.asarray(jax.jit(hdc.adaptive_average_pool, static_argnums=1)(x, output)), want,
                             rtol=1e-6, atol=1e-6)


def test_adaptive_average_pool_and_attend_gradients():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 5, 3, 2)))
  check_grads(lambda x: hdc.adaptive_average_pool(x, 2), (x,), order=1, modes=["rev"])
  masks = jnp.asarray(np.random.default_rng(1).uniform(size=(2, 1, 5, 3, 2)))
  check_grads(abe.attend, (x, masks), order=1, modes=["rev"])


def test_adaptive_average_pool_docstring_and_hand_value():
  result = doctest.testmod(hdc)
  assert result.attempted and not result.failed
  # torchvision's InceptionAux pools a 14x14 map to 4x4 with bins [0, 4), [3, 7), [7, 11), [10, 14).
  x = jnp.arange(14.0).reshape(1, 14, 1, 1) * jnp.ones((1, 1, 14, 1))
  np.testing.assert_allclose(hdc.adaptive_average_pool(x, 4)[0, :, 0, 0], [1.5, 4.5, 8.5, 11.5])
  with pytest.raises(ValueError, match="batch, height, width, channels"):
    hdc.adaptive_average_pool(jnp.zeros((3, 3, 3)), 2)


def test_hdc_levels_contract():
  images = jnp.asarray(reference.reference_images((4, 32, 32, 3)))
  model, variables = tiny_variables("resnet50_hdc_tiny", "resnet50_tiny")
  assert model.head.level_stages == hdc.RESNET_LEVELS and model.embedding_dim == 3 * 128
  stages = jax.eval_shape(lambda v, x: model.backbone.apply(v, x), {c: t["backbone"] for c, t in variables.items()},
                          images)["stages"]
  head_variables = jax.jit(model.head.init)(rngs(), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), stages))
  for collection, tree in head_variables.items():
    variables[collection]["head"] = tree
  assert set(variables["params"]["head"]) == {"level0", "level1", "level2"}

  dropout = {"dropout": jax.random.key(2, impl="rbg")}
  (embedding, aux), _ = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
      variables, images, rngs=dropout)
  chex.assert_shape(embedding, (4, 384))
  assert embedding.dtype == jnp.float32
  # Three unit-norm 128-D blocks: the consecutive `level_dims` that jaxret.losses.hdc reads.
  np.testing.assert_allclose(np.linalg.norm(np.asarray(embedding).reshape(4, 3, 128), axis=-1), 1.0, rtol=1e-5)

  # Each level reads its own stage: a level's output changes when (and only when) its own stage does.
  head = jax.jit(lambda maps: model.head.apply({c: t["head"] for c, t in variables.items()}, maps, train=True,
                                               mutable=["batch_stats"], rngs=dropout)[0][0])
  reference_output = np.asarray(head(aux["stages"])).reshape(4, 3, 128)
  for k, stage in enumerate(hdc.RESNET_LEVELS):
    bumped = np.asarray(head(dict(aux["stages"], **{stage: aux["stages"][stage] * 2.0 + 1.0}))).reshape(4, 3, 128)
    changed = [not np.allclose(bumped[:, j], reference_output[:, j], atol=1e-5) for j in range(3)]
    assert changed == [j == k for j in range(3)], stage


@pytest.mark.parametrize("name,plain", [("googlenet_hdc_tiny", "googlenet_tiny"),
                                        ("resnet50_hdc_tiny", "resnet50_tiny")])
def test_hdc_backbone_is_the_plain_backbone(name, plain, tmp_path):
  assert_backbone_is_the_plain_models(name, plain)
  import_tiny_weights(name, plain, tmp_path)
  embedding, _ = jax.eval_shape(models.get_model(name).apply, abstract_variables(models.get_model(name)),
                                jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
  assert embedding.shape == (2, 384)


def test_plain_backbones_converted_checkpoint_loads_into_a_method_model(tmp_path):
  file, fresh, loaded = import_tiny_weights("resnet50_hdc_tiny", "resnet50_tiny", tmp_path)
  out = tmp_path / "converted"  # `python -m jaxret.models.import_weights --model resnet50_tiny`, done once.
  assert import_weights.main(["--model", "resnet50_tiny", "--file", str(file), "--out", str(out)]) == 0
  chex.assert_trees_all_equal(import_weights.import_backbone("resnet50_hdc_tiny", fresh, out), loaded)
  with pytest.raises(import_weights.WeightImportError, match="holds the backbone of 'resnet50_tiny'"):
    import_weights.import_backbone("resnet18_tiny", abstract_variables(models.get_model("resnet18_tiny")), out)


def test_hdc_full_size_heads_and_options():
  model = models.get_model("googlenet_hdc")
  variables = abstract_variables(model, (1, 224, 224, 3))
  head = variables["params"]["head"]
  # The released model's loss1/loss2 branches: 1x1 conv to 128 on a 4x4 map, fc 2048 -> 1024 -> 128.
  assert head["level0"]["conv"]["conv"]["kernel"].shape == (1, 1, 512, 128)  # inception4a: 512 channels
  assert head["level1"]["conv"]["conv"]["kernel"].shape == (1, 1, 528, 128)  # inception4d: 528 channels
  assert head["level0"]["fc1"]["kernel"].shape == (2048, 1024)
  assert head["level1"]["fc2"]["kernel"].shape == (1024, 128)
  assert head["level2"]["projection"]["kernel"].shape == (1024, 128)  # pool5 -> 128
  assert models.get_model("resnet50_hdc").head.level_stages == ("layer2", "layer3", "layer4")
  assert import_weights.backbone_shapes("resnet50_hdc") == import_weights.backbone_shapes("resnet50")
  assert models.get_model("resnet50_hdc", level_dim=64, level_stages=("layer3", "layer4")).embedding_dim == 128
  with pytest.raises(ValueError, match="level_stages"):
    models.get_model("googlenet_hdc", level_stages="inception4a")
  with pytest.raises(ValueError, match="level_dim"):
    models.get_model("googlenet_hdc", level_dim=0)
  with pytest.raises(ValueError, match=r"\['layer9'\] are not stages of this backbone"):
    abstract_variables(models.get_model("resnet50_hdc_tiny", level_stages=("layer2", "layer9")))
  assert models.config_problems({"name": "googlenet_hdc", "embedding_dim": 128})  # Not an option of HDC.
  assert not models.config_problems({"name": "googlenet_hdc", "level_dim": 64, "freeze_batch_norm": True})


def test_hdc_trains_in_the_trainer(tmp_path, data_dir):
  config = smoke_config(data_dir, "inshop_hdc.py", **{"model.name": "resnet50_hdc_tiny"})
  rows = train(config, tmp_path)
  assert all(np.isfinite([r["hdc/level_0"], r["hdc/level_1"], r["hdc/level_2"]]).all() for r in rows)


# --- ABE-M ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("plain,split", [("resnet50_tiny", "layer2"), ("googlenet_tiny", "inception3b")])
def test_backbone_split_in_two_is_the_whole_backbone(plain, split):
  model, variables = tiny_variables(plain, plain)
  backbone, variables = model.backbone, {c: t["backbone"] for c, t in variables.items()}
  images = jnp.asarray(reference.reference_images((2, 32, 32, 3)))

  @jax.jit
  def whole_and_halves(variables, images):
    whole = backbone.apply(variables, images)
    lower = backbone.apply(variables, images, stop=split)
    upper = backbone.apply(variables, lower["feature_map"], start=split)
    return whole, lower, upper

  whole, lower, upper = whole_and_halves(variables, images)
  np.testing.assert_allclose(upper["feature_map"], whole["feature_map"], rtol=1e-5, atol=1e-6)
  assert list(lower["stages"]) + list(upper["stages"]) == list(whole["stages"])
  assert list(lower["stages"])[-1] == split
  with pytest.raises(ValueError, match="is not a stage of this backbone"):
    backbone.apply(variables, images, stop="inception9")
  last = list(whole["stages"])[-1]
  with pytest.raises(ValueError, match="must be a stage after"):
    backbone.apply(variables, images, start=last, stop=split)


def test_attend_against_python_loop():
  rng = np.random.default_rng(0)
  shared, masks = rng.normal(size=(3, 2, 2, 5)), rng.uniform(size=(4, 3, 2, 2, 5))
  got = np.asarray(abe.attend(shared, masks))
  for m in range(4):
    for b in range(3):
      np.testing.assert_allclose(got[m * 3 + b], masks[m, b] * shared[b], rtol=1e-6)
  with pytest.raises(ValueError, match="num_learners"):
    abe.attend(shared, masks[:, :2])


def test_abe_each_learner_is_its_mask_through_the_shared_rest():
  """Oracle: learner m's block is normalise(W_m pool(G(a_m * S(x))) + b_m), computed one learner at a time."""
  images = jnp.asarray(reference.reference_images((3, 32, 32, 3)))
  model, variables = tiny_variables("resnet50_abe_tiny", "resnet50_tiny")
  head_shapes = abstract_variables(model)["params"]["head"]
  # Random head parameters, biases included (a fresh head's are 0), scaled to keep the sigmoids unsaturated.
  leaves, treedef = jax.tree.flatten(head_shapes)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  variables["params"]["head"] = jax.tree.unflatten(
      treedef, [0.1 * jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)])
  num_learners, learner_dim = 8, 8
  backbone_variables = {c: t["backbone"] for c, t in variables.items()}
  head_variables = {"params": variables["params"]["head"]}

  @jax.jit
  def model_and_oracle(variables, images):
    embedding, aux = model.apply(variables, images)
    shared = model.backbone.apply(backbone_variables, images, stop="layer2")["feature_map"]
    masks = model.head.apply(head_variables, shared, method="masks")
    blocks = []
    for m in range(num_learners):
      upper = model.backbone.apply(backbone_variables, masks[m] * shared, start="layer2")["feature_map"]
      pooled = jnp.mean(upper, axis=(1, 2))
      kernel = head_variables["params"]["projection"]["kernel"][m]
      bias = head_variables["params"]["projection"]["bias"][m]
      x = pooled @ kernel + bias
      blocks.append(x / jnp.linalg.norm(x, axis=-1, keepdims=True))
    return embedding, aux, jnp.concatenate(blocks, axis=-1), masks

  embedding, aux, oracle, masks = model_and_oracle(variables, images)
  chex.assert_shape(embedding, (3, num_learners * learner_dim))
  np.testing.assert_allclose(embedding, oracle, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(embedding).reshape(3, 8, 8), axis=-1), 1.0, rtol=1e-5)
  assert float(masks.min()) >= 0 and float(masks.max()) <= 1
  assert not np.allclose(masks[0], masks[1])  # The learners attend differently.
  chex.assert_shape(aux["learner_features"], (3, num_learners, 256))
  chex.assert_shape(aux["attention_masks"], (3, num_learners, 4, 4, 64))


@pytest.mark.parametrize("name,plain", [("googlenet_abe_tiny", "googlenet_tiny"),
                                        ("resnet50_abe_tiny", "resnet50_tiny")])
def test_abe_backbone_is_the_plain_backbone(name, plain, tmp_path):
  assert_backbone_is_the_plain_models(name, plain)
  import_tiny_weights(name, plain, tmp_path)


@pytest.mark.parametrize("name", ["resnet50_hdc_tiny", "resnet50_abe_tiny", "resnet50_bier_tiny"])
def test_bfloat16_computation_float32_parameters_and_embedding(name):
  model = models.get_model(name, dtype=jnp.bfloat16)
  variables = abstract_variables(model)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  embedding, aux = jax.eval_shape(functools.partial(model.apply, train=False), variables,
                                  jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
  assert embedding.dtype == aux["features"].dtype == jnp.float32
  assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(aux["stages"]))


def test_abe_options():
  assert models.get_model("googlenet_abe").head.split_stage == "inception3b"
  assert models.get_model("resnet50_abe").head.split_stage == "layer2"
  assert models.get_model("googlenet_abe").embedding_dim == 512
  head = abstract_variables(models.get_model("googlenet_abe"), (1, 224, 224, 3))["params"]["head"]
  assert head["attention"]["masks"]["kernel"].shape == (1, 1, 512, 8 * 480)  # masks over inception3b's 480
  assert head["projection"]["kernel"].shape == (8, 1024, 64)  # 8 learners, pool5 -> 512 / 8
  with pytest.raises(ValueError, match="multiple of num_learners"):
    models.get_model("googlenet_abe", embedding_dim=100)
  with pytest.raises(ValueError, match="is not a stage of this backbone"):
    abstract_variables(models.get_model("resnet50_abe_tiny", split_stage="inception3b"))
  assert not models.config_problems({"name": "resnet50_abe", "num_learners": 4, "split_stage": "layer3"})


def test_abe_trains_in_the_trainer(tmp_path, data_dir):
  config = smoke_config(data_dir, "inshop_abe.py", **{"model.name": "resnet50_abe_tiny"})
  rows = train(config, tmp_path)
  assert all(r["abe/divergence"] >= 0 and np.isfinite(r["abe/contrastive"]) for r in rows)


# --- A-BIER ---------------------------------------------------------------------------------------------------


def test_bier_head_outputs_what_a_bier_reads():
  """embedding = bier_test_embedding(f W + b); bier_regularizer = f W under stop-gradient; the kernel is W."""
  images = jnp.asarray(reference.reference_images((4, 32, 32, 3)))
  model, variables = tiny_variables("resnet50_bier_tiny", "resnet50_tiny")
  head_shapes = abstract_variables(model)["params"]["head"]
  assert jax.tree.map(lambda s: s.shape, head_shapes) == {"kernel": (256, 512), "bias": (512,)}
  variables["params"]["head"] = {"kernel": 0.1 * jax.random.normal(jax.random.key(0), (256, 512)),
                                 "bias": 0.1 * jax.random.normal(jax.random.key(1), (512,))}

  @jax.jit
  def outputs_and_gradients(variables, images):
    def regularizer_sum(params):
      return jnp.sum(model.apply({**variables, "params": params}, images)[1]["bier_regularizer"])

    return model.apply(variables, images), jax.grad(regularizer_sum)(variables["params"])

  (embedding, aux), gradients = outputs_and_gradients(variables, images)
  features = np.asarray(aux["features"], np.float64)
  kernel = np.asarray(variables["params"]["head"]["kernel"], np.float64)
  bias = np.asarray(variables["params"]["head"]["bias"], np.float64)
  np.testing.assert_allclose(aux["embedding_kernel"], kernel, rtol=0)
  np.testing.assert_allclose(aux["bier_regularizer"], features @ kernel, rtol=1e-4, atol=1e-5)
  raw = features @ kernel + bias
  want = np.concatenate([raw[:, a:b] / np.linalg.norm(raw[:, a:b], axis=1, keepdims=True) * (b - a) / 512
                         for a, b in ((0, 96), (96, 256), (256, 512))], axis=1)
  np.testing.assert_allclose(embedding, want, rtol=1e-4, atol=1e-6)
  # The regularizer trains the embedding kernel only: no gradient reaches the backbone or the bias.
  assert all(not np.any(g) for g in jax.tree.leaves(gradients["backbone"]))
  assert not np.any(gradients["head"]["bias"]) and np.any(gradients["head"]["kernel"])
  np.testing.assert_allclose(gradients["head"]["kernel"], np.repeat(features.sum(0)[:, None], 512, axis=1),
                             rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,plain", [("googlenet_bier_tiny", "googlenet_tiny"),
                                        ("resnet50_bier_tiny", "resnet50_tiny")])
def test_bier_backbone_is_the_plain_backbone(name, plain, tmp_path):
  assert_backbone_is_the_plain_models(name, plain)
  import_tiny_weights(name, plain, tmp_path)


def test_bier_options():
  assert models.get_model("googlenet_bier").embedding_dim == 512
  assert models.get_model("resnet50_bier", learner_sizes=(64, 64)).embedding_dim == 128
  with pytest.raises(ValueError, match="learner_sizes"):
    models.get_model("googlenet_bier", learner_sizes=(96, 0))
  with pytest.raises(ValueError, match="pooling"):
    models.get_model("googlenet_bier", pooling="token")
  assert not models.config_problems({"name": "googlenet_bier", "learner_sizes": (64, 64), "pooling": "gem"})


def test_a_bier_trains_in_the_trainer(tmp_path, data_dir):
  config = smoke_config(data_dir, "inshop_a_bier.py", **{"model.name": "resnet50_bier_tiny"})
  rows = train(config, tmp_path)
  for row in rows:
    assert np.isfinite([row["a_bier/correlation"], row["a_bier/kernel_penalty"], row["a_bier/discriminative"]]).all()
    assert row["a_bier/correlation"] < 0  # -mean((f_i g(f_j))^2) of the model's regularizer outputs.


# --- The model's blocks and the loss's, checked before anything runs -------------------------------------------


@pytest.mark.parametrize("config_file,field,value,message", [
    ("inshop_hdc.py", "loss.hdc.level_dims", (128, 128), r"level_dims=\(128, 128\) must be the levels"),
    ("inshop_hdc.py", "model.level_dim", 64, r"must be the levels of model googlenet_hdc_tiny, \(64, 64, 64\)"),
    ("inshop_abe.py", "loss.abe.num_learners", 4, "num_learners=4 must be model googlenet_abe_tiny's"),
    ("inshop_a_bier.py", "loss.a_bier.learner_sizes", (256, 160, 96), r"learner_sizes=\(256, 160, 96\) must be"),
    ("inshop_a_bier.py", "model.learner_sizes", (64, 64), r"config.model.learner_sizes=\(64, 64\)"),
])
def test_validate_refuses_a_loss_that_reads_other_blocks(config_file, field, value, message):
  config = smoke_config("/nonexistent", config_file, **{field: value})
  with pytest.raises(run_config.ConfigError, match=message):
    run_config.validate(config, device_count=1)
  run_config.validate(smoke_config("/nonexistent", config_file), device_count=1)  # As the file sets it: fine.
