"""Backbones, the embedding head and weight import: equivalence with torchvision / timm, without PyTorch.

The `_tiny` variants, loaded with random weights through `import_weights`, must give the features that
torchvision's / timm's code gives at the same widths (tests/data/backbones/, written by
tests/backbone_reference.py). The full-size backbones are checked without computing anything: their
parameter counts against torchvision's / timm's, and every tensor of the reference state dicts by name
and shape. tests/test_backbones_torch.py redoes the comparison with PyTorch when it is installed.
"""

import doctest
import functools
import os
import pickle
import re
import subprocess
import zipfile

import backbone_reference as reference  # tests/ is on sys.path under pytest.
import chex
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxret import models
from jaxret.models import cnn_layers
from jaxret.models import googlenet
from jaxret.models import heads
from jaxret.models import import_weights
from jaxret.models import input_conventions
from jaxret.models import torch_checkpoint
from jaxret.models import vit

REFERENCE = reference.load_reference()
TINY = tuple(name + "_tiny" for name in reference.FULL_SIZE)
DATA = reference.DATA_DIR

# torchvision / timm parameter counts (`sum(p.numel() for p in model.parameters())`, torchvision 0.29.1,
# timm 1.0.31) and the classifier's share, which the embedding head replaces.
TORCH_PARAMETERS = {
    "resnet18": (11_689_512, 512 * 1000 + 1000),
    "resnet50": (25_557_032, 2048 * 1000 + 1000),
    "resnet101": (44_549_160, 2048 * 1000 + 1000),
    "densenet121": (7_978_856, 1024 * 1000 + 1000),
    "googlenet": (6_624_904, 1024 * 1000 + 1000),  # without the auxiliary classifiers
    "vgg16": (138_357_544, 25088 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 1000 + 1000),
    "vgg16_bn": (138_365_992, 25088 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 1000 + 1000),
    "vit_s16": (22_050_664, 384 * 1000 + 1000),
}


def count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def abstract_variables(model, shape=(1, 64, 64, 3)):
  """Shapes of `model`'s variables, without computing them."""
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  return jax.eval_shape(lambda x: model.init(rngs, x, train=False), jax.ShapeDtypeStruct(shape, jnp.float32))


def init(model, name):
  """Variables of the tiny model `name`: the backbone from `tiny_state_dict` (no compilation: converted with
  NumPy), the head freshly initialised (a small compilation, not the whole network's)."""
  backbone, _ = import_weights.convert_state_dict(name, tiny_state_dict(name), import_weights.backbone_shapes(name))
  feature_map = jnp.zeros((1, 1, 1, model.backbone.num_features))
  head = model.head.init(jax.random.key(0), feature_map, class_token=feature_map[:, 0, 0])
  variables = {c: {"backbone": jax.tree.map(jnp.asarray, t)} for c, t in backbone.items()}
  for collection, tree in head.items():
    variables.setdefault(collection, {})["head"] = tree
  return variables


def tiny_state_dict(name):
  layout = {k: tuple(v) for k, v in REFERENCE["tiny"][name]["layout"].items()}
  return reference.random_state_dict(layout)


@functools.cache
def full_size_shapes(name):
  return import_weights.backbone_shapes(name)


def assert_close(actual, expected):
  """1e-4 relative to the magnitude of the reference (float32 sums over thousands of terms)."""
  expected = np.asarray(expected)
  np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(expected).max()))


# --- Equivalence with torchvision / timm ---------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_imported_tiny_backbone_equals_reference(name, tmp_path):
  path = tmp_path / f"{name}.safetensors"
  save_file(tiny_state_dict(name), str(path))
  model = models.get_model(name, embedding_dim=0)  # the features only; the head is tested below
  variables = import_weights.import_backbone(name, abstract_variables(model), path)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  expected = reference.load_expected(name)
  for case, shape in REFERENCE["tiny"][name]["images"].items():
    _, aux = apply(variables, reference.reference_images(tuple(shape)))
    assert_close(aux["features"], expected[f"{case}/features"])
    assert_close(aux["feature_map"], expected[f"{case}/feature_map"])
    stages = {k.split("/")[-1] for k in expected if k.startswith(f"{case}/stage/")}
    if not name.startswith("vit"):
      assert stages == set(aux["stages"]), "stage names differ from the reference's"
    for stage in stages:
      assert_close(jnp.mean(aux["stages"][stage], axis=(1, 2)), expected[f"{case}/stage/{stage}"])


@pytest.mark.parametrize("name, file", [("vit_s16_tiny", "vit_s16_tiny.pth"),
                                        ("densenet121_tiny", "densenet121_tiny_legacy.pth")])
def test_pth_files_written_by_torch_give_the_same_variables(name, file):
  # A zip-format timm file, and a legacy-format DenseNet file with the "norm.1" key names of torchvision's
  # densenet121-a639ec97.pth; both hold the random weights of `tiny_state_dict`, whose features
  # test_imported_tiny_backbone_equals_reference checks.
  shapes = import_weights.backbone_shapes(name)
  from_pth, dropped = import_weights.read_backbone(name, os.path.join(DATA, file), shapes)
  expected, _ = import_weights.convert_state_dict(name, tiny_state_dict(name), shapes)
  chex.assert_trees_all_equal(from_pth, expected)
  assert dropped == (["head.bias", "head.weight"] if name.startswith("vit") else
                     ["classifier.bias", "classifier.weight"])


@pytest.mark.parametrize("name", reference.FULL_SIZE)
def test_full_size_parameter_count_matches_reference(name):
  total, classifier = TORCH_PARAMETERS[name]
  assert REFERENCE["full_size"][name]["parameters"] == total
  assert count(full_size_shapes(name)["params"]) == total - classifier


@pytest.mark.parametrize("name", reference.FULL_SIZE)
def test_full_size_state_dict_matches_by_name_and_shape(name):
  layout = REFERENCE["full_size"][name]["layout"]
  if name == "densenet121":  # the key names of the published densenet121-a639ec97.pth ("norm.1", "conv.2")
    layout = {re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k): v for k, v in layout.items()}
    assert "features.denseblock4.denselayer16.conv.2.weight" in layout
  # Zero-stride arrays: the shapes of the real file, no memory.
  state = {k: np.broadcast_to(np.zeros((), dtype), shape) for k, (shape, dtype) in layout.items()}
  backbone, dropped = import_weights.convert_state_dict(name, state, full_size_shapes(name))
  fits = jax.tree.map(lambda a, s: a.shape == s.shape and a.dtype == s.dtype, backbone,
                      dict(full_size_shapes(name)))
  assert all(jax.tree.leaves(fits))
  classifier = import_weights.LAYOUTS[type(models.get_model(name).backbone)].classifier
  assert dropped == sorted(k for k in layout if k.startswith(classifier))
  assert dropped, "the reference's classifier tensors should be dropped"


# --- Refusal of checkpoints that do not fit ----------------------------------------------------------------


def test_refuses_missing_unexpected_and_misshaped_tensors_by_name():
  name = "resnet18_tiny"
  shapes = import_weights.backbone_shapes(name)
  state = tiny_state_dict(name)
  import_weights.convert_state_dict(name, state, shapes)  # the complete file fits

  missing = dict(state)
  del missing["layer2.0.downsample.1.running_var"]
  with pytest.raises(import_weights.WeightImportError, match=r"missing.*layer2\.0\.downsample\.1\.running_var"):
    import_weights.convert_state_dict(name, missing, shapes)

  misshaped = dict(state, **{"layer1.0.conv2.weight": np.zeros((8, 8, 5, 5), np.float32)})
  with pytest.raises(import_weights.WeightImportError,
                     match=r"layer1\.0\.conv2\.weight: file \(8, 8, 5, 5\), model \(8, 8, 3, 3\)"):
    import_weights.convert_state_dict(name, misshaped, shapes)

  extra = dict(state, **{"layer5.0.conv1.weight": np.zeros((1,), np.float32)})
  with pytest.raises(import_weights.WeightImportError, match=r"not in the model: layer5\.0\.conv1\.weight"):
    import_weights.convert_state_dict(name, extra, shapes)

  with pytest.raises(import_weights.WeightImportError, match="not floating point: conv1.weight"):
    import_weights.convert_state_dict(name, dict(state, **{"conv1.weight": state["conv1.weight"].astype(int)}),
                                      shapes)


def test_refuses_another_models_file(tmp_path):
  path = tmp_path / "resnet.safetensors"
  save_file(tiny_state_dict("resnet18_tiny"), str(path))
  model = models.get_model("resnet50_tiny")
  with pytest.raises(import_weights.WeightImportError, match="do not fit resnet50_tiny"):
    import_weights.import_backbone("resnet50_tiny", abstract_variables(model), path)


def test_vit_position_embedding_grid_mismatch_says_what_to_set():
  state = tiny_state_dict("vit_s16_tiny")
  state["pos_embed"] = np.zeros((1, 1 + 3 * 3, 32), np.float32)
  with pytest.raises(import_weights.WeightImportError, match="pos_embed_grid=3"):
    import_weights.convert_state_dict("vit_s16_tiny", state, import_weights.backbone_shapes("vit_s16_tiny"))


# --- The import API: head untouched, Orbax round trip, command -----------------------------------------------


def test_import_backbone_keeps_head_and_round_trips_through_orbax(tmp_path):
  name = "resnet18_tiny"
  file = tmp_path / "weights.safetensors"
  save_file(tiny_state_dict(name), str(file))
  model = models.get_model(name, bn_neck=True)
  fresh = init(model, name)
  fresh = {c: {**t, "backbone": jax.tree.map(jnp.zeros_like, t["backbone"])} for c, t in fresh.items()}
  loaded = import_weights.import_backbone(name, fresh, file)
  chex.assert_trees_all_equal(loaded["params"]["head"], fresh["params"]["head"])
  chex.assert_trees_all_equal(loaded["batch_stats"]["head"], fresh["batch_stats"]["head"])
  chex.assert_trees_all_equal_shapes_and_dtypes(loaded, fresh)
  np.testing.assert_array_equal(loaded["params"]["backbone"]["conv1"]["kernel"],
                                tiny_state_dict(name)["conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(loaded["batch_stats"]["backbone"]["layer1_0"]["bn2"]["var"],
                                tiny_state_dict(name)["layer1.0.bn2.running_var"])

  out = tmp_path / "converted"
  assert import_weights.main(["--model", name, "--file", str(file), "--out", str(out)]) == 0
  from_orbax = import_weights.import_backbone(name, fresh, out)
  chex.assert_trees_all_equal(from_orbax, loaded)
  # Nothing is overwritten, and a checkpoint of one model does not load into another.
  assert import_weights.main(["--model", name, "--file", str(file), "--out", str(out)]) == 1
  with pytest.raises(import_weights.WeightImportError, match="holds the backbone of 'resnet18_tiny'"):
    import_weights.import_backbone("resnet50_tiny", abstract_variables(models.get_model("resnet50_tiny")), out)


def test_command_reports_errors_without_writing(tmp_path, capsys):
  file = tmp_path / "weights.safetensors"
  state = tiny_state_dict("resnet18_tiny")
  del state["bn1.bias"]
  save_file(state, str(file))
  out = tmp_path / "out"
  assert import_weights.main(["--model", "resnet18_tiny", "--file", str(file), "--out", str(out)]) == 1
  assert "bn1.bias" in capsys.readouterr().err
  assert not out.exists() and os.listdir(tmp_path) == ["weights.safetensors"]


# --- The .pth reader --------------------------------------------------------------------------------------


@pytest.mark.parametrize("file", ["tensors_zip.pth", "tensors_legacy.pth"])
def test_reads_pth_tensors_of_both_formats(file):
  tensors = torch_checkpoint.read_pth(os.path.join(DATA, file))
  expected = reference.reader_fixture_tensors()
  assert set(tensors) == set(expected) | {"parameter"}
  for key, value in expected.items():
    np.testing.assert_array_equal(np.asarray(tensors[key], np.float64), np.asarray(value, np.float64))
    assert tensors[key].shape == value.shape
  assert tensors["float16"].dtype == np.float16 and tensors["int64"].dtype == np.int64
  assert tensors["bfloat16"].dtype.name == "bfloat16"
  np.testing.assert_array_equal(tensors["parameter"], expected["float32"])


def test_pth_reader_refuses_code_and_runs_none(tmp_path):
  marker = tmp_path / "ran"

  class Payload:

    def __reduce__(self):
      return (subprocess.call, (["touch", str(marker)],))

  path = tmp_path / "evil.pth"
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("evil/data.pkl", pickle.dumps({"weight": Payload()}, protocol=2))
  with pytest.raises(torch_checkpoint.CheckpointFormatError, match="could run code"):
    torch_checkpoint.read_pth(path)
  path.write_bytes(pickle.dumps({"weight": Payload()}, protocol=2))
  with pytest.raises(torch_checkpoint.CheckpointFormatError):
    torch_checkpoint.read_pth(path)
  assert not marker.exists()


def test_pth_reader_refuses_non_state_dicts(tmp_path):
  path = tmp_path / "junk.pth"
  path.write_bytes(b"not a checkpoint")
  with pytest.raises(torch_checkpoint.CheckpointFormatError):
    torch_checkpoint.read_pth(path)
  with pytest.raises(FileNotFoundError):
    torch_checkpoint.read_tensors(tmp_path / "absent.pth")


# --- Model contract, dtypes, training mode ---------------------------------------------------------------------


def test_registry_and_keyword_routing():
  # The plain backbones, and the same backbones with the heads of issue 16's methods (test_method_models.py).
  assert set(models.BACKBONE_NAMES) == set(reference.FULL_SIZE) | set(TINY) | set(models.METHOD_BACKBONE_NAMES)
  assert set(models.BACKBONE_NAMES) <= set(models.MODEL_NAMES) <= set(models.INPUT_CONVENTIONS)
  model = models.get_model("resnet50", embedding_dim=128, pooling="gem", width=32, dtype=jnp.bfloat16)
  assert model.head.embedding_dim == 128 and model.head.pooling == "gem" and model.backbone.width == 32
  assert model.head.dtype == model.backbone.dtype == jnp.bfloat16
  assert models.get_model("vit_s16").head.pooling == "token"
  assert models.get_model("densenet121", embedding_dim=0).embedding_dim == 1024
  with pytest.raises(TypeError, match="num_capsules"):
    models.get_model("resnet50", num_capsules=3)
  with pytest.raises(ValueError, match="pooling"):
    models.get_model("resnet50", pooling="median")
  with pytest.raises(ValueError, match="channel_divisor"):
    models.get_model("googlenet", channel_divisor=3)


def test_contract_training_mode_and_bfloat16():
  images = reference.reference_images((4, 32, 32, 3))
  model = models.get_model("resnet18_tiny", dtype=jnp.bfloat16, bn_neck=True, embedding_dim=16)
  variables = init(model, "resnet18_tiny")
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  category = jnp.arange(4)
  (embedding, aux), updates = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
      variables, images, category=category, rngs={"dropout": jax.random.key(0, impl="rbg")})
  chex.assert_shape(embedding, (4, 16))
  assert embedding.dtype == aux["features"].dtype == jnp.float32
  assert aux["stages"]["layer1"].dtype == jnp.bfloat16
  np.testing.assert_allclose(jnp.linalg.norm(embedding, axis=-1), 1.0, rtol=1e-5)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), updates["batch_stats"], variables["batch_stats"])
  assert all(jax.tree.leaves(changed))

  frozen = models.get_model("resnet18_tiny", freeze_batch_norm=True, embedding_dim=16)
  variables = init(frozen, "resnet18_tiny")
  _, updates = jax.jit(functools.partial(frozen.apply, train=True, mutable=["batch_stats"]))(variables, images)
  chex.assert_trees_all_equal(updates["batch_stats"]["backbone"], variables["batch_stats"]["backbone"])


def test_vit_drop_path_uses_dropout_rng():
  model = models.get_model("vit_s16_tiny", drop_path_rate=0.5)
  images = reference.reference_images((8, 32, 32, 3))
  apply = jax.jit(functools.partial(model.apply, train=True))
  variables = init(model, "vit_s16_tiny")
  a, _ = apply(variables, images, rngs={"dropout": jax.random.key(0, impl="rbg")})
  b, _ = apply(variables, images, rngs={"dropout": jax.random.key(1, impl="rbg")})
  assert not np.allclose(a, b)


# --- Head math against NumPy ------------------------------------------------------------------------------------


def test_pooling_functions_against_numpy():
  x = np.abs(np.random.default_rng(0).normal(size=(3, 4, 5, 6))) + 0.01
  np.testing.assert_allclose(heads.average_pool(x), x.mean(axis=(1, 2)), rtol=1e-6)
  np.testing.assert_allclose(heads.max_pool(x), x.max(axis=(1, 2)), rtol=1e-6)
  for p in (1.0, 2.5, 6.0):
    oracle = np.mean(x.astype(np.float64) ** p, axis=(1, 2)) ** (1 / p)
    np.testing.assert_allclose(jax.jit(heads.gem_pool)(x.astype(np.float32), p), oracle, rtol=1e-5)
  np.testing.assert_allclose(heads.gem_pool(x, 1.0), x.mean(axis=(1, 2)), rtol=1e-5)
  np.testing.assert_allclose(heads.gem_pool(x.astype(np.float32), 500.0), x.max(axis=(1, 2)), rtol=1e-2)
  big = np.full((1, 2, 2, 1), 1e4, np.float32)  # x^p overflows float32 here; the result must not
  np.testing.assert_allclose(heads.gem_pool(big, 12.0), [[1e4]], rtol=1e-5)
  v = np.array([[3.0, 4.0], [0.0, 0.0]])
  np.testing.assert_allclose(heads.l2_normalize(v), [[0.6, 0.8], [0.0, 0.0]], rtol=1e-6)


def test_gem_gradients():
  with jax.enable_x64():
    x = jnp.asarray(np.abs(np.random.default_rng(1).normal(size=(2, 3, 3, 4))) + 0.1)
    check_grads(jax.jit(heads.gem_pool), (x, jnp.float64(3.0)), order=1, modes=["rev"])
    grads = jax.grad(lambda x, p: heads.gem_pool(x, p).sum(), argnums=(0, 1))(jnp.zeros((1, 2, 2, 1)), 3.0)
    assert all(np.isfinite(g).all() for g in grads)  # all-zero maps (after ReLU) are clamped, not NaN


def test_head_options():
  features = np.random.default_rng(2).normal(size=(4, 3, 3, 8)).astype(np.float32)
  token = features[:, 0, 0]
  for kwargs, dim in [(dict(embedding_dim=0), 8), (dict(embedding_dim=5), 5), (dict(pooling="gem"), 512),
                      (dict(pooling="token", embedding_dim=0), 8)]:
    head = heads.EmbeddingHead(**kwargs)
    variables = head.init(jax.random.key(0), features, class_token=token)
    embedding, _ = head.apply(variables, features, class_token=token)
    chex.assert_shape(embedding, (4, dim))
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=-1), 1.0, rtol=1e-5)
  head = heads.EmbeddingHead(embedding_dim=0, l2_normalize=False, pooling="max")
  embedding, _ = head.apply({}, features)
  np.testing.assert_allclose(embedding, features.max(axis=(1, 2)))
  assert "gem_p" in heads.EmbeddingHead(pooling="gem").init(jax.random.key(0), features)["params"]
  assert not heads.EmbeddingHead(pooling="gem", gem_learnable_p=False, embedding_dim=0).init(
      jax.random.key(0), features)
  with pytest.raises(ValueError, match="class token"):
    heads.EmbeddingHead(pooling="token").init(jax.random.key(0), features)


# --- Layers against PyTorch's definitions ------------------------------------------------------------------------


def test_pooled_size_hand_listed_pytorch_cases():
  # (size, window, stride, padding, ceil_mode) -> torch.nn.functional.max_pool2d output size.
  cases = {(112, 3, 2, 0, True): 56, (112, 3, 2, 0, False): 55, (18, 3, 2, 0, True): 9, (18, 3, 2, 0, False): 8,
           (7, 2, 2, 0, True): 4, (7, 2, 2, 0, False): 3, (5, 3, 2, 1, True): 3, (6, 3, 2, 1, True): 4,
           (4, 2, 2, 1, True): 3, (9, 3, 1, 1, True): 9}
  for (size, window, stride, padding, ceil_mode), out in cases.items():
    assert cnn_layers.pooled_size(size, window, stride, padding, ceil_mode) == out, (size, window, stride)


@pytest.mark.parametrize("window, stride, padding, ceil_mode", [(3, 2, 0, True), (3, 2, 1, False), (2, 2, 0, True),
                                                                (3, 1, 1, True), (3, 2, 1, True)])
def test_max_pool_against_python_loop(window, stride, padding, ceil_mode):
  x = np.random.default_rng(3).normal(size=(2, 7, 10, 3)).astype(np.float32)
  got = np.asarray(cnn_layers.max_pool(x, window, stride, padding, ceil_mode))
  out_h = cnn_layers.pooled_size(7, window, stride, padding, ceil_mode)
  out_w = cnn_layers.pooled_size(10, window, stride, padding, ceil_mode)
  assert got.shape == (2, out_h, out_w, 3)
  for i in range(out_h):
    for j in range(out_w):
      rows = slice(max(i * stride - padding, 0), i * stride - padding + window)
      cols = slice(max(j * stride - padding, 0), j * stride - padding + window)
      np.testing.assert_array_equal(got[:, i, j], x[:, rows, cols].max(axis=(1, 2)))


def test_googlenet_transform_input_is_torchvisions_formula():
  x = np.random.default_rng(4).normal(size=(2, 3, 3, 3)).astype(np.float32)
  expected = np.stack([x[..., 0] * (0.229 / 0.5) + (0.485 - 0.5) / 0.5,
                       x[..., 1] * (0.224 / 0.5) + (0.456 - 0.5) / 0.5,
                       x[..., 2] * (0.225 / 0.5) + (0.406 - 0.5) / 0.5], axis=-1)
  np.testing.assert_allclose(googlenet.transform_input(x), expected, rtol=1e-6, atol=1e-7)


def test_position_embedding_resampling():
  pos = np.random.default_rng(5).normal(size=(1, 1 + 4 * 4, 3)).astype(np.float32)
  np.testing.assert_array_equal(vit.resample_position_embedding(pos, (4, 4)), pos)
  resized = vit.resample_position_embedding(pos, (6, 2))
  chex.assert_shape(resized, (1, 1 + 12, 3))
  np.testing.assert_array_equal(resized[:, 0], pos[:, 0])  # the class token has no position
  constant = np.ones((1, 1 + 9, 2), np.float32)
  np.testing.assert_allclose(vit.resample_position_embedding(constant, (5, 7)), 1.0, rtol=1e-6)


def test_input_conventions():
  pixels = np.array([[0.2, 0.5, 0.9]], np.float32)
  np.testing.assert_allclose(input_conventions.IMAGENET.normalize(pixels),
                             (pixels - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225], rtol=1e-6)
  caffe = input_conventions.InputConvention(mean=(104 / 255, 117 / 255, 123 / 255), std=(1 / 255,) * 3,
                                            channels="BGR")
  np.testing.assert_allclose(caffe.normalize(pixels), [[0.9 * 255 - 104, 0.5 * 255 - 117, 0.2 * 255 - 123]],
                             rtol=1e-5)
  with pytest.raises(ValueError, match="channel order"):
    input_conventions.InputConvention((0, 0, 0), (1, 1, 1), channels="GBR")



def test_docstring_examples():
  for module in (heads, import_weights):
    result = doctest.testmod(module)
    assert result.attempted and not result.failed, module.__name__
