"""Backbones against torchvision and timm themselves; skipped where PyTorch is not installed (CI).

Regenerates the PyTorch side of tests/data/backbones/ and compares it with the stored files (so that they
stay what the current torchvision / timm compute), and compares every full-size backbone, loaded with
random weights through `import_weights`, with the PyTorch model at 64x64. Run it in a venv with
torch, torchvision and timm (docs/models.md):

  python -m pytest tests/test_backbones_torch.py -q
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("timm")

import backbone_reference as reference  # pylint: disable=g-import-not-at-top,wrong-import-position
import test_backbones  # pylint: disable=g-import-not-at-top,wrong-import-position

from jaxret import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxret.models import import_weights  # pylint: disable=g-import-not-at-top,wrong-import-position

REFERENCE = reference.load_reference()


@pytest.fixture(autouse=True, scope="module")
def _few_threads():
  threads = torch.get_num_threads()
  torch.set_num_threads(2)
  yield
  torch.set_num_threads(threads)


@pytest.mark.parametrize("name", reference.FULL_SIZE)
def test_stored_full_size_layout_and_count_are_torchs(name):
  model = reference.torch_model(name)
  stored = REFERENCE["full_size"][name]
  assert reference.torch_layout(model) == {k: (shape, dtype) for k, (shape, dtype) in stored["layout"].items()}
  assert sum(p.numel() for p in model.parameters()) == stored["parameters"]
  assert stored["parameters"] == test_backbones.TORCH_PARAMETERS[name][0]


@pytest.mark.parametrize("name", test_backbones.TINY)
def test_stored_tiny_outputs_are_torchs(name):
  model = reference.torch_model(name)
  reference.load_random_weights(model)
  expected = reference.load_expected(name)
  for case, shape in reference.image_shapes(name).items():
    for key, value in reference.torch_outputs(name, model, reference.reference_images(shape)).items():
      np.testing.assert_allclose(value, expected[f"{case}/{key}"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", reference.FULL_SIZE)
def test_full_size_backbone_equals_torch(name):
  torch_model = reference.torch_model(name)
  reference.load_random_weights(torch_model)
  state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  images = reference.reference_images(reference.FULL_SIZE_IMAGE_SHAPE)
  expected = reference.torch_outputs(name, torch_model, images)
  del torch_model

  model = models.get_model(name, embedding_dim=0)
  shapes = import_weights.backbone_shapes(name)
  backbone, _ = import_weights.convert_state_dict(name, state, shapes)
  _, aux = jax.jit(lambda v, x: model.apply(v, x, train=False))(
      {c: {"backbone": t} for c, t in backbone.items()}, jnp.asarray(images))
  test_backbones.assert_close(aux["features"], expected["features"])
  test_backbones.assert_close(aux["feature_map"], expected["feature_map"])
  for key, value in expected.items():
    if key.startswith("stage/"):
      test_backbones.assert_close(jnp.mean(aux["stages"][key[len("stage/"):]], axis=(1, 2)), value)
