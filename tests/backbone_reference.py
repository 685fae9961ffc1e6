"""Reference outputs of torchvision's and timm's backbones, for tests/test_backbones.py.

Weights are not stored: `random_state_dict(layout, seed)` regenerates them with NumPy from the state-dict
layout (names, shapes) and a seed, identically here and in the tests. What is stored, in
tests/data/backbones/:
  reference.json: for every full-size backbone, torchvision's / timm's state-dict layout and parameter
    counts; for every `_tiny` variant, the layout of the PyTorch model built with the same torchvision /
    timm code at the tiny widths, and the input shape and seeds;
  <name>.npz: for every `_tiny` variant, PyTorch's features `[B, F]`, last feature map `[B, h, w, F]` and
    the spatial mean `[B, C]` of every stage map, on the images `reference_images(shape, seed)`.

Regenerate (PyTorch, torchvision and timm in a separate venv; see docs/models.md):
  python tests/backbone_reference.py
The file imports torch only in the functions that need it, so the tests can import the NumPy part.
"""

import json
import os
import re

import numpy as np

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "backbones")
WEIGHT_SEED = 0
IMAGE_SEED = 1
TINY_IMAGE_SHAPE = (2, 67, 83, 3)  # odd sizes, so that padding and ceil-mode rounding matter
VIT_TINY_IMAGE_SHAPES = {"native": (2, 32, 32, 3), "resampled": (2, 48, 64, 3)}  # 2x2 and 3x4 patch grids
FULL_SIZE_IMAGE_SHAPE = (2, 64, 64, 3)  # for the full-size comparison (torch installed only)

FULL_SIZE = ("resnet18", "resnet50", "resnet101", "densenet121", "googlenet", "vgg16", "vgg16_bn", "vit_s16")


def random_state_dict(layout: dict[str, tuple[list[int], str]], seed: int = WEIGHT_SEED) -> dict[str, np.ndarray]:
  """Random weights for a state-dict layout `{key: (shape, dtype name)}`, the same on every machine.

  Conv and linear weights are He-normal (so that activations keep their scale through deep nets),
  BatchNorm statistics random but plausible (running_var in [0.5, 2], so that a swapped mean and variance
  shows), scales near 1, biases and embeddings small.
  """
  state = {}
  for index, key in enumerate(sorted(layout)):
    shape, dtype = tuple(layout[key][0]), layout[key][1]
    rng = np.random.default_rng([seed, index])
    if dtype == "int64":
      state[key] = np.zeros(shape, np.int64)  # num_batches_tracked
    elif key.endswith("running_var"):
      state[key] = rng.uniform(0.5, 2.0, shape)
    elif key.endswith("running_mean"):
      state[key] = rng.normal(0.0, 0.2, shape)
    elif key.endswith("weight") and len(shape) >= 2:
      state[key] = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[1:])), shape)
    elif key.endswith("weight"):
      state[key] = rng.uniform(0.5, 1.5, shape)
    elif key.endswith(("cls_token", "pos_embed")):
      state[key] = rng.normal(0.0, 0.5, shape)
    else:
      state[key] = rng.normal(0.0, 0.1, shape)
    state[key] = state[key].astype(dtype)
  return state


def reference_images(shape, seed: int = IMAGE_SEED) -> np.ndarray:
  """`[B, H, W, 3]` float32 standard-normal images (already "normalised")."""
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def load_reference() -> dict:
  with open(os.path.join(DATA_DIR, "reference.json")) as f:
    return json.load(f)


def load_expected(name: str) -> dict[str, np.ndarray]:
  with np.load(os.path.join(DATA_DIR, f"{name}.npz")) as data:
    return dict(data)


def image_shapes(name: str) -> dict[str, tuple[int, ...]]:
  """The inputs a `_tiny` variant is compared on, by case name."""
  return dict(VIT_TINY_IMAGE_SHAPES) if name.startswith("vit") else {"odd": TINY_IMAGE_SHAPE}


# --- PyTorch side -----------------------------------------------------------------------------------------


def torch_model(name: str):
  """The PyTorch model that `jaxret.models.get_model(name)`'s backbone must equal, in eval mode."""
  import importlib  # pylint: disable=g-import-not-at-top

  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  from torchvision.models import densenet  # pylint: disable=g-import-not-at-top
  from torchvision.models import resnet  # pylint: disable=g-import-not-at-top
  from torchvision.models import vgg  # pylint: disable=g-import-not-at-top
  googlenet = importlib.import_module("torchvision.models.googlenet")  # the module, not the builder

  class ScaledResNet(resnet.ResNet):
    """torchvision's ResNet with every stage's planes scaled by width / 64 (the stem stays 64)."""

    def __init__(self, block, layers, width):
      self._width = width
      super().__init__(block, layers)
      self.fc = torch.nn.Linear(8 * width * block.expansion, 10)  # its fc assumes the full width

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
      return super()._make_layer(block, planes * self._width // 64, blocks, stride, dilate)

  def scaled_googlenet(divisor):
    """torchvision's GoogLeNet with every width divided by `divisor` (its `blocks` hook)."""

    def conv_block(in_channels, out_channels, **kwargs):
      return googlenet.BasicConv2d(in_channels if in_channels == 3 else in_channels // divisor,
                                   out_channels // divisor, **kwargs)

    def inception_block(*channels):
      return googlenet.Inception(*(c // divisor for c in channels))

    model = googlenet.GoogLeNet(aux_logits=False, transform_input=True, init_weights=False,
                                blocks=[conv_block, inception_block, googlenet.InceptionAux])
    model.fc = torch.nn.Linear(1024 // divisor, 10)  # its fc assumes 1024 channels
    return model

  def small_classifier(model):
    # VGG's classifier (fc6-fc8) is built for 512 channels and 120M parameters; the tiny reference keeps
    # torchvision's `features` and a stub classifier, which the import drops like the real one.
    model.classifier = torch.nn.Sequential(torch.nn.Linear(32 * 7 * 7, 10))
    return model

  tiny_vgg = [v if v == "M" else v // 16 for v in vgg.cfgs["D"]]
  builders = {
      "resnet18": lambda: torchvision.models.resnet18(),
      "resnet50": lambda: torchvision.models.resnet50(),
      "resnet101": lambda: torchvision.models.resnet101(),
      "densenet121": lambda: torchvision.models.densenet121(),
      # What torchvision builds to load its ImageNet weights, without the auxiliary classifiers.
      "googlenet": lambda: torchvision.models.googlenet(aux_logits=False, transform_input=True,
                                                        init_weights=False),
      "vgg16": lambda: torchvision.models.vgg16(),
      "vgg16_bn": lambda: torchvision.models.vgg16_bn(),
      "vit_s16": lambda: timm.create_model("vit_small_patch16_224", dynamic_img_size=True),
      "resnet18_tiny": lambda: ScaledResNet(resnet.BasicBlock, [1, 1, 1, 1], 8),
      "resnet50_tiny": lambda: ScaledResNet(resnet.Bottleneck, [1, 2, 1, 1], 8),
      "resnet101_tiny": lambda: ScaledResNet(resnet.Bottleneck, [1, 1, 3, 1], 8),
      "densenet121_tiny": lambda: densenet.DenseNet(growth_rate=8, block_config=(2, 2, 2, 2),
                                                    num_init_features=16, bn_size=2, num_classes=10),
      "googlenet_tiny": lambda: scaled_googlenet(8),
      "vgg16_tiny": lambda: small_classifier(vgg.VGG(vgg.make_layers(tiny_vgg), init_weights=False)),
      "vgg16_bn_tiny": lambda: small_classifier(vgg.VGG(vgg.make_layers(tiny_vgg, batch_norm=True),
                                                        init_weights=False)),
      "vit_s16_tiny": lambda: timm.create_model("vit_small_patch16_224", img_size=32, embed_dim=32, depth=2,
                                                num_heads=2, num_classes=10, dynamic_img_size=True),
  }
  return builders[name]().eval()


def torch_layout(model) -> dict[str, tuple[list[int], str]]:
  return {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}


def load_random_weights(model, seed: int = WEIGHT_SEED) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  state = random_state_dict(torch_layout(model), seed)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})


def _stage_modules(name: str, model) -> dict:
  """Stage name -> the module whose output is that stage map (the names jaxret's backbones use)."""
  if name.startswith("resnet"):
    return {f"layer{i}": getattr(model, f"layer{i}") for i in range(1, 5)}
  if name.startswith("densenet"):
    return {f"denseblock{i}": getattr(model.features, f"denseblock{i}") for i in range(1, 5)}
  if name.startswith("googlenet"):
    return {n: getattr(model, n) for n in ("inception3a", "inception3b", "inception4a", "inception4b",
                                           "inception4c", "inception4d", "inception4e", "inception5a",
                                           "inception5b")}
  if name.startswith("vgg"):
    stages, block, conv, last_relu = {}, 1, 0, None
    for module in model.features:
      if module.__class__.__name__ == "Conv2d":
        conv += 1
      elif module.__class__.__name__ == "ReLU":
        last_relu = module
      elif module.__class__.__name__ == "MaxPool2d":
        stages[f"conv{block}_{conv}"] = last_relu
        block, conv = block + 1, 0
    return stages
  return {}


def torch_outputs(name: str, model, images_nhwc: np.ndarray) -> dict[str, np.ndarray]:
  """features `[B, F]`, feature_map `[B, h, w, F]` and stage means `stage/<name>` `[B, C]` (NHWC, float32)."""
  import torch  # pylint: disable=g-import-not-at-top
  x = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).contiguous()
  captured = {}
  hooks = [module.register_forward_hook(lambda m, i, o, stage=stage: captured.__setitem__(stage, o.clone()))
           for stage, module in _stage_modules(name, model).items()]
  with torch.no_grad():
    if name.startswith("vit"):
      tokens = model.forward_features(x)
      features = model.forward_head(tokens, pre_logits=True)
      grid = model.patch_embed.dynamic_feat_size(x.shape[-2:])
      feature_map = tokens[:, 1:].reshape(x.shape[0], *grid, -1).permute(0, 3, 1, 2)
    elif name.startswith("resnet"):
      y = model.maxpool(model.relu(model.bn1(model.conv1(x))))
      feature_map = model.layer4(model.layer3(model.layer2(model.layer1(y))))
    elif name.startswith("densenet"):
      feature_map = torch.nn.functional.relu(model.features(x))
    elif name.startswith("googlenet"):
      model(x)  # the full forward, so that transform_input is applied as torchvision does
      feature_map = captured["inception5b"]
    else:
      feature_map = model.features(x)
    if not name.startswith("vit"):
      features = feature_map.mean(dim=(2, 3))
  for hook in hooks:
    hook.remove()
  outputs = {"features": features.numpy(), "feature_map": feature_map.permute(0, 2, 3, 1).numpy()}
  for stage, value in captured.items():
    outputs[f"stage/{stage}"] = value.mean(dim=(2, 3)).numpy()
  return {k: np.ascontiguousarray(v, np.float32) for k, v in outputs.items()}


def reader_fixture_tensors() -> dict[str, np.ndarray]:
  """Tensors of tests/data/backbones/tensors_{zip,legacy}.pth, which exercise the `.pth` reader."""
  a = np.arange(12, dtype=np.float32).reshape(3, 4)
  return {"float32": a, "transposed": a.T, "row": a[1], "float16": np.arange(5, dtype=np.float16),
          "float64": np.linspace(0, 1, 3), "int64": np.array(7, np.int64),
          "bfloat16": np.array([1.5, -2.0], np.float32)}


def write_pth_fixtures() -> None:
  """Small `.pth` files in both formats: reader cases, and two tiny models' random weights."""
  import torch  # pylint: disable=g-import-not-at-top
  values = reader_fixture_tensors()
  a = torch.from_numpy(values["float32"])
  tensors = {"float32": a, "transposed": a.t(), "row": a[1], "float16": torch.from_numpy(values["float16"]),
             "float64": torch.from_numpy(values["float64"]), "int64": torch.tensor(7),
             "bfloat16": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
             "parameter": torch.nn.Parameter(a.clone())}
  torch.save(tensors, os.path.join(DATA_DIR, "tensors_zip.pth"))
  torch.save(tensors, os.path.join(DATA_DIR, "tensors_legacy.pth"), _use_new_zipfile_serialization=False)
  # timm's ViT in the zip format; DenseNet in the legacy format with the key names of torchvision's
  # densenet121-a639ec97.pth ("norm.1" for "norm1").
  vit = torch_model("vit_s16_tiny")
  load_random_weights(vit)
  torch.save(vit.state_dict(), os.path.join(DATA_DIR, "vit_s16_tiny.pth"))
  densenet = torch_model("densenet121_tiny")
  load_random_weights(densenet)
  legacy = {re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k): v
            for k, v in densenet.state_dict().items()}
  torch.save(legacy, os.path.join(DATA_DIR, "densenet121_tiny_legacy.pth"), _use_new_zipfile_serialization=False)


def main() -> None:
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(2)
  os.makedirs(DATA_DIR, exist_ok=True)
  reference = {"versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                            "timm": timm.__version__},
               "weight_seed": WEIGHT_SEED, "image_seed": IMAGE_SEED, "full_size": {}, "tiny": {}}
  for name in FULL_SIZE:
    model = torch_model(name)
    reference["full_size"][name] = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "layout": torch_layout(model),
    }
    print(name, reference["full_size"][name]["parameters"])
  for name in FULL_SIZE:
    tiny = name + "_tiny"
    model = torch_model(tiny)
    load_random_weights(model)
    expected = {}
    for case, shape in image_shapes(tiny).items():
      for key, value in torch_outputs(tiny, model, reference_images(shape)).items():
        expected[f"{case}/{key}"] = value
    np.savez_compressed(os.path.join(DATA_DIR, f"{tiny}.npz"), **expected)
    reference["tiny"][tiny] = {"layout": torch_layout(model), "images": image_shapes(tiny)}
    print(tiny, {k: v.shape for k, v in expected.items() if "stage" not in k})
  with open(os.path.join(DATA_DIR, "reference.json"), "w") as f:
    json.dump(reference, f, indent=0, sort_keys=True)
  write_pth_fixtures()


if __name__ == "__main__":
  main()
