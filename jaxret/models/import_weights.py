"""Loads torchvision / timm weights from a local file into a backbone's Flax variables.

  variables = model.init(rngs, images, train=False)
  variables = import_weights.import_backbone("resnet50", variables, "~/jaxret_weights/resnet50-0676ba61.pth")

or convert once and load the Orbax checkpoint afterwards (same function, `path` a directory):

  python -m jaxret.models.import_weights --model resnet50 \
      --file ~/jaxret_weights/resnet50-0676ba61.pth --out ~/jaxret_weights/resnet50

The file is a torchvision `.pth` state dict, a timm `.safetensors` or `.pth` file, or such a directory.
Nothing is downloaded. Every backbone tensor is matched by name and shape: the Flax module names are
PyTorch's, with `_` before a block index (`layer1_0/conv1/kernel` is `layer1.0.conv1.weight`), and
  conv kernels `[O, I, kh, kw]` -> `[kh, kw, I, O]`, linear weights `[out, in]` -> `[in, out]`,
  BatchNorm / LayerNorm `weight` -> `scale`, `running_mean` / `running_var` -> batch_stats `mean` / `var`.
A missing, unexpected or mis-shaped tensor is an error that names it. The classifier (`fc.*`,
`classifier.*`, timm's `head.*`, GoogLeNet's `aux1.*` / `aux2.*`) is dropped with a note, and the
embedding head keeps its fresh initialisation. `.pth` files are read without PyTorch and without running
the pickle's code (`torch_checkpoint`).
"""

import argparse
from collections.abc import Callable, Mapping
import dataclasses
import os
import re
import sys
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from jaxret import models
from jaxret.models import densenet
from jaxret.models import googlenet
from jaxret.models import resnet
from jaxret.models import torch_checkpoint
from jaxret.models import vgg
from jaxret.models import vit

COLLECTIONS = ("params", "batch_stats")
_IGNORED_SUFFIXES = (".num_batches_tracked",)  # BatchNorm's step counter, not a weight
_MAX_LISTED = 12


class WeightImportError(ValueError):
  """The file does not fit the model; the message names every tensor that does not."""


def _densenet_legacy_key(key: str) -> str:
  # torchvision's own fix (densenet._load_state_dict): its DenseNet weights from 2017 name the layers of a
  # dense layer "norm.1", "conv.1", ..., which are "norm1", "conv1", ... since module names lost their dots.
  return re.sub(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$",
                r"\1\2", key)


@dataclasses.dataclass(frozen=True)
class CheckpointLayout:
  """Where a backbone's tensors are in its PyTorch state dict."""
  prefix: str = ""  # before every backbone key, e.g. torchvision DenseNet's "features."
  classifier: tuple[str, ...] = ()  # key prefixes of the classifier: dropped, with a note
  rename: Callable[[str], str] | None = None  # fixes old key names of published files


LAYOUTS = {
    resnet.ResNet: CheckpointLayout(classifier=("fc.",)),
    densenet.DenseNet: CheckpointLayout(prefix="features.", classifier=("classifier.",),
                                        rename=_densenet_legacy_key),
    googlenet.GoogLeNet: CheckpointLayout(classifier=("fc.", "aux1.", "aux2.")),
    vgg.VGG: CheckpointLayout(classifier=("classifier.",)),
    vit.VisionTransformer: CheckpointLayout(classifier=("head.",)),
}


def _layout(model_name: str) -> CheckpointLayout:
  if model_name not in models.BACKBONE_NAMES:
    raise ValueError(f"{model_name!r} has no pretrained-weight layout; use one of {', '.join(models.BACKBONE_NAMES)}.")
  return LAYOUTS[type(models.get_model(model_name).backbone)]


def torch_key(collection: str, path: tuple[str, ...], prefix: str = "") -> str:
  """The PyTorch state-dict key of the backbone variable `variables[collection]["backbone"][*path]`.

  >>> torch_key("params", ("layer1_0", "downsample_0", "kernel"))
  'layer1.0.downsample.0.weight'
  >>> torch_key("batch_stats", ("denseblock1", "denselayer2", "norm1", "var"), "features.")
  'features.denseblock1.denselayer2.norm1.running_var'
  """
  *modules, leaf = path
  if collection == "batch_stats":
    leaf = {"mean": "running_mean", "var": "running_var"}[leaf]
  else:
    leaf = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
  return prefix + ".".join([re.sub(r"_(\d+)$", r".\1", m) for m in modules] + [leaf])


def _to_flax(path: tuple[str, ...], tensor: np.ndarray) -> np.ndarray:
  """PyTorch layout -> Flax layout (a view where possible)."""
  if path[-1] == "kernel" and tensor.ndim == 4:
    return tensor.transpose(2, 3, 1, 0)  # [O, I, kh, kw] -> [kh, kw, I, O]
  if path[-1] == "kernel" and tensor.ndim == 2:
    return tensor.T  # [out, in] -> [in, out]
  return tensor


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  """Flax shape -> the shape PyTorch stores (the inverse of `_to_flax`), for error messages."""
  if path[-1] == "kernel" and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if path[-1] == "kernel" and len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, prefix + (key,)))
    else:
      flat[prefix + (key,)] = value
  return flat


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
  tree = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def _listed(names) -> str:
  names = list(names)
  text = ", ".join(names[:_MAX_LISTED])
  return text + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def backbone_shapes(model_name: str) -> dict[str, dict]:
  """`{"params": tree, "batch_stats": tree}` of `jax.ShapeDtypeStruct`s of the backbone (nothing computed)."""
  model = models.get_model(model_name)
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)  # parameter shapes do not depend on the size
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  variables = jax.eval_shape(lambda x: model.init(rngs, x, train=False), images)
  return {c: variables[c]["backbone"] for c in COLLECTIONS if c in variables and "backbone" in variables[c]}


def convert_state_dict(model_name: str, state_dict: Mapping[str, np.ndarray], shapes: Mapping[str, Mapping],
                       source: str = "the file") -> tuple[dict[str, dict], list[str]]:
  """Matches a PyTorch state dict to a backbone's variables by name and shape, and converts the layout.

  Args:
    model_name: a name of `jaxret.models.BACKBONE_NAMES`.
    state_dict: PyTorch key -> array in PyTorch's layout (anything with `.shape` and NumPy conversion).
    shapes: `{"params": tree, "batch_stats": tree}` of the backbone (arrays or `jax.ShapeDtypeStruct`s),
      e.g. `backbone_shapes(model_name)`.
    source: how to call the state dict in messages.

  Returns:
    (the backbone variables `{"params": tree, "batch_stats": tree}` of NumPy arrays in the dtypes of
    `shapes`, the classifier keys that were dropped).

  Raises:
    WeightImportError: naming every missing, unexpected and mis-shaped tensor.
  """
  layout = _layout(model_name)
  tensors = dict(state_dict)
  if layout.rename is not None:
    tensors = {layout.rename(k): v for k, v in tensors.items()}
  converted, missing, wrong_shape, wrong_type = {}, [], [], []
  used = set()
  for collection in COLLECTIONS:
    for path, target in _flatten(shapes.get(collection, {})).items():
      key = torch_key(collection, path, layout.prefix)
      if key not in tensors:
        missing.append(key)
        continue
      used.add(key)
      tensor = np.asarray(tensors[key])
      expected = _torch_shape(path, target.shape)
      if tuple(tensor.shape) != expected:
        hint = ""
        if key == "pos_embed" and tensor.ndim == 3:
          grid = (tensor.shape[1] - 1) ** 0.5
          hint = (f" (position embeddings for a {grid:g}x{grid:g} patch grid: set "
                  f"config.model.pos_embed_grid={grid:g})") if grid == int(grid) else ""
        wrong_shape.append(f"{key}: file {tuple(tensor.shape)}, model {expected}{hint}")
        continue
      if not np.issubdtype(tensor.dtype, np.floating) and tensor.dtype.name != "bfloat16":
        wrong_type.append(f"{key}: {tensor.dtype}")
        continue
      converted[(collection,) + path] = _to_flax(path, tensor).astype(target.dtype, copy=False)
  ignored = {k for k in tensors if k.endswith(_IGNORED_SUFFIXES)}
  dropped = sorted(k for k in tensors if k not in used and k.startswith(layout.classifier))
  unexpected = sorted(set(tensors) - used - ignored - set(dropped))
  problems = []
  if missing:
    problems.append(f"missing from {source}: {_listed(missing)}")
  if wrong_shape:
    problems.append(f"wrong shape: {_listed(wrong_shape)}")
  if wrong_type:
    problems.append(f"not floating point: {_listed(wrong_type)}")
  if unexpected:
    problems.append(f"not in the model: {_listed(unexpected)}")
  if problems:
    raise WeightImportError(
        f"The weights in {source} do not fit {model_name} ({len(converted)} of "
        f"{sum(len(_flatten(t)) for t in shapes.values())} tensors match):\n  " + "\n  ".join(problems) +
        f"\nIs it a checkpoint of {model_name} (see docs/models.md for the expected files)?")
  return _unflatten(converted), dropped


def _read_orbax(model_name: str, directory: str, shapes: Mapping[str, Mapping]) -> dict[str, dict]:
  """Backbone variables from a directory written by `save_backbone`, checked by name and shape."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  checkpointer = ocp.StandardCheckpointer()
  try:
    metadata = checkpointer.metadata(directory)
  except (FileNotFoundError, ValueError, OSError) as e:
    raise WeightImportError(f"{directory} is not a checkpoint written by `python -m "
                            f"jaxret.models.import_weights`: {e}") from e
  saved_model = (metadata.custom_metadata or {}).get("model")
  # A method model (e.g. googlenet_hdc) has the plain model's backbone and takes its converted weights.
  same_backbone = (saved_model in models.BACKBONE_NAMES
                   and models.get_model(saved_model).backbone == models.get_model(model_name).backbone)
  if saved_model != model_name and not same_backbone:
    raise WeightImportError(f"{directory} holds the backbone of {saved_model!r}, not of {model_name!r}.")
  stored = _flatten(metadata.item_metadata.tree if hasattr(metadata.item_metadata, "tree")
                    else metadata.item_metadata)
  needed = {(c,) + p: v for c in COLLECTIONS for p, v in _flatten(shapes.get(c, {})).items()}
  missing = sorted("/".join(p) for p in needed.keys() - stored.keys())
  unexpected = sorted("/".join(p) for p in stored.keys() - needed.keys())
  wrong_shape = sorted(f"{'/'.join(p)}: checkpoint {tuple(stored[p].shape)}, model {tuple(needed[p].shape)}"
                       for p in needed.keys() & stored.keys() if tuple(stored[p].shape) != tuple(needed[p].shape))
  if missing or unexpected or wrong_shape:
    problems = [f"{what}: {_listed(names)}" for what, names in
                (("missing", missing), ("not in the model", unexpected), ("wrong shape", wrong_shape)) if names]
    raise WeightImportError(f"The checkpoint {directory} does not fit {model_name}:\n  " + "\n  ".join(problems))
  restored = checkpointer.restore(directory)
  return {c: jax.tree.map(lambda x, t: np.asarray(x).astype(t.dtype, copy=False), restored[c], shapes[c])
          for c in shapes}


def read_backbone(model_name: str, path: str | os.PathLike,
                  shapes: Mapping[str, Mapping] | None = None) -> tuple[dict[str, dict], list[str]]:
  """The backbone variables (NumPy) of `model_name` from a weights file or a converted directory.

  Returns (`{"params": tree, "batch_stats": tree}`, dropped classifier keys). Raises `WeightImportError`
  (a file that does not fit), `torch_checkpoint.CheckpointFormatError` (an unreadable file) or
  `FileNotFoundError`.
  """
  path = os.path.expanduser(os.fspath(path))
  shapes = backbone_shapes(model_name) if shapes is None else shapes
  if os.path.isdir(path):
    return _read_orbax(model_name, path, shapes), []
  return convert_state_dict(model_name, torch_checkpoint.read_tensors(path), shapes, source=path)


def import_backbone(model_name: str, variables: Mapping[str, Mapping], path: str | os.PathLike) -> dict:
  """Returns `variables` with the backbone's parameters and BatchNorm statistics read from `path`.

  Args:
    model_name: the model `variables` belong to (a name of `jaxret.models.BACKBONE_NAMES` or of
      `jaxret.models.WEIGHTS_BACKBONE`).
    variables: freshly initialised `{"params": ..., "batch_stats": ...}` of `get_model(model_name, ...)`.
    path: a torchvision `.pth`, a timm `.safetensors` / `.pth`, or a directory written by
      `python -m jaxret.models.import_weights`.

  Returns:
    A new dict of variables: the "backbone" subtrees replaced (same dtypes, and the same shardings where the
    fresh arrays have them), the embedding head ("head") and anything else unchanged.

  Raises:
    WeightImportError: a tensor is missing, unexpected or mis-shaped (all are named);
    torch_checkpoint.CheckpointFormatError: the file is not a state dict this reader accepts;
    FileNotFoundError: no such file.
  """
  # A model built on a backbone (FashionNet on VGG-16) reads that backbone's weights files.
  model_name = models.WEIGHTS_BACKBONE.get(model_name, model_name)
  shapes = {c: variables[c]["backbone"] for c in COLLECTIONS if c in variables and "backbone" in variables[c]}
  if not shapes:
    raise ValueError(f"variables have no 'backbone' subtree; are they variables of {model_name!r}?")
  backbone, dropped = read_backbone(model_name, path, shapes)
  if dropped:
    logging.info("Dropped the classifier of %s (the embedding head replaces it): %s", path, _listed(dropped))

  def place(new, old):
    new = np.asarray(new, dtype=old.dtype)
    return jax.device_put(new, old.sharding) if isinstance(old, jax.Array) else jnp.asarray(new)

  result = dict(variables)
  for collection, tree in backbone.items():
    result[collection] = {**variables[collection], "backbone": jax.tree.map(place, tree, shapes[collection])}
  return result


def save_backbone(model_name: str, file: str | os.PathLike, out: str | os.PathLike) -> tuple[int, list[str]]:
  """Converts `file` once and writes the backbone as an Orbax checkpoint to the new directory `out`.

  The directory appears complete or not at all (Orbax writes to a temporary name and renames it).
  Returns (number of tensors written, dropped classifier keys).
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  out = os.path.abspath(os.path.expanduser(os.fspath(out)))
  if os.path.exists(out):
    raise FileExistsError(f"{out} exists; choose a new directory (nothing was written).")
  file = os.path.expanduser(os.fspath(file))
  backbone, dropped = read_backbone(model_name, file)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(out, backbone, custom_metadata={"model": model_name, "source": os.path.basename(file)})
  checkpointer.wait_until_finished()
  return sum(len(_flatten(t)) for t in backbone.values()), dropped


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m jaxret.models.import_weights",
                                   description="Converts torchvision / timm weights to an Orbax checkpoint of "
                                   "a jaxret backbone, for config.model.pretrained.")
  parser.add_argument("--model", required=True, choices=list(models.BACKBONE_NAMES), metavar="MODEL",
                      help=f"Backbone: {', '.join(models.BACKBONE_NAMES)}.")
  parser.add_argument("--file", required=True, help="torchvision .pth or timm .safetensors / .pth file.")
  parser.add_argument("--out", required=True, help="New directory for the Orbax checkpoint.")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  logging.set_verbosity(logging.WARNING)  # Orbax logs at INFO.
  try:
    count, dropped = save_backbone(args.model, args.file, args.out)
  except (WeightImportError, torch_checkpoint.CheckpointFormatError, FileNotFoundError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"Wrote {count} tensors of the {args.model} backbone to {os.path.abspath(args.out)}.")
  if dropped:
    print(f"Dropped the classifier (the embedding head replaces it): {_listed(dropped)}.")
  convention = models.INPUT_CONVENTIONS[args.model]
  print(f"Set config.model.pretrained={os.path.abspath(args.out)}. Images must be normalised with mean "
        f"{convention.mean}, std {convention.std} ({convention.channels}) unless the weights say otherwise "
        "(docs/models.md).")
  return 0


if __name__ == "__main__":
  sys.exit(main())
