"""Reads PyTorch `.pth` state dicts and `.safetensors` files into NumPy arrays, without PyTorch.

A `.pth` file written by `torch.save` is a pickle whose tensors refer to raw storages. Unpickling runs any
function the file names, so `pickle.load` (and `torch.load` without `weights_only=True`) on a downloaded
file can run arbitrary code. `read_pth` uses a restricted unpickler instead: it accepts only the
functions that rebuild tensors (`torch._utils._rebuild_tensor_v2`, `_rebuild_parameter`), the storage
type markers (`torch.FloatStorage`, ...) and `collections.OrderedDict`, implemented here with NumPy;
any other global refuses the file. Storages are read with NumPy from the file:

  * zip format (PyTorch >= 1.6): `<archive>/data.pkl` and one record `<archive>/data/<key>` per storage,
    in the byte order of `<archive>/byteorder` (little when absent);
  * legacy format (older torchvision weights such as `densenet121-a639ec97.pth`): a magic-number pickle,
    protocol and system-info pickles, the object pickle, the list of storage keys, then each storage as an
    8-byte element count followed by its bytes.
"""

import collections
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

# Storage class name -> element type (torch/storage.py).
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # torch/serialization.py MAGIC_NUMBER
_LEGACY_PROTOCOL_VERSION = 1001


class CheckpointFormatError(ValueError):
  """A file that is not a state dict of tensors this reader accepts; the message says why."""


class _StorageType:
  """What `torch.FloatStorage` and its siblings unpickle to: only their element type is used."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = _STORAGE_DTYPES[name]


class _Storage:
  """A flat storage: filled from the file after unpickling (legacy format) or before (zip format)."""

  def __init__(self, dtype: np.dtype, numel: int):
    self.dtype = dtype
    self.numel = numel
    self.array: np.ndarray | None = None


class _LazyTensor:
  """A tensor whose storage may not have been read yet; `materialize` returns the NumPy array."""

  def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
    if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride) or offset < 0:
      raise CheckpointFormatError(f"Bad tensor layout: size {size}, stride {stride}, offset {offset}.")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
    if last >= storage.numel:
      raise CheckpointFormatError(f"A tensor of size {size} reaches element {last} of a storage of "
                                  f"{storage.numel}; the file is corrupt.")
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

  def materialize(self) -> np.ndarray:
    array = self.storage.array
    if array is None:
      raise CheckpointFormatError("A tensor refers to a storage that is missing from the file.")
    itemsize = array.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(array[self.offset:], shape=self.size,
                                           strides=tuple(s * itemsize for s in self.stride), writeable=False)
    return np.array(view)  # a contiguous copy, independent of the storage


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
  del requires_grad, backward_hooks, metadata  # autograd state, irrelevant to the values
  if not isinstance(storage, _Storage):
    raise CheckpointFormatError("A tensor is built from something that is not a storage.")
  return _LazyTensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  del requires_grad, backward_hooks, state
  if not isinstance(data, _LazyTensor):
    raise CheckpointFormatError("A parameter is built from something that is not a tensor.")
  return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):

  def __init__(self, file, storages: dict, load_storage):
    super().__init__(file)
    self._storages = storages
    self._load_storage = load_storage

  def find_class(self, module, name):
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[(module, name)]
    raise CheckpointFormatError(
        f"The file refers to {module}.{name}, which a state dict of tensors does not need; jaxret does not "
        "unpickle it (it could run code). Save the weights with torch.save(model.state_dict(), path), or "
        "as .safetensors.")

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage"):
      raise CheckpointFormatError(f"Unsupported persistent object {pid!r:.80} in the pickle.")
    storage_type, key, _location, numel = pid[1:5]
    view_metadata = pid[5] if len(pid) > 5 else None
    if not isinstance(storage_type, _StorageType):
      raise CheckpointFormatError(f"Unsupported storage type {storage_type!r:.80}.")
    if view_metadata is not None:
      raise CheckpointFormatError("Storage views (PyTorch < 0.4 checkpoints) are not supported; re-save the "
                                  "file with a recent PyTorch.")
    key = str(key)
    if key not in self._storages:
      self._storages[key] = self._load_storage(key, storage_type.dtype, int(numel))
    return self._storages[key]


def _as_state_dict(obj, path) -> dict[str, _LazyTensor]:
  """The state dict inside what the pickle held: the object itself, or its "state_dict" or "model" entry."""
  if isinstance(obj, dict) and not all(isinstance(v, _LazyTensor) for v in obj.values()):
    for key in ("state_dict", "model"):
      if isinstance(obj.get(key), dict):
        obj = obj[key]
        break
  if not isinstance(obj, dict) or not all(isinstance(v, _LazyTensor) for v in obj.values()):
    keys = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointFormatError(f"{path} does not hold a state dict of tensors (found {keys}); save "
                                "model.state_dict() with torch.save.")
  for key in obj:
    if not isinstance(key, str):
      raise CheckpointFormatError(f"{path}: state dict key {key!r} is not a string.")
  return obj


def _read_zip(path) -> dict[str, np.ndarray]:
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise CheckpointFormatError(f"{path} is a zip file but not one written by torch.save (no data.pkl).")
    prefix = pickles[0][:-len("data.pkl")]
    names = set(archive.namelist())
    byteorder = "little"
    if prefix + "byteorder" in names:
      byteorder = archive.read(prefix + "byteorder").decode().strip()
    if byteorder not in ("little", "big"):
      raise CheckpointFormatError(f"{path}: unknown byte order {byteorder!r}.")

    def load_storage(key, dtype, numel):
      record = f"{prefix}data/{key}"
      if record not in names:
        raise CheckpointFormatError(f"{path}: storage {key} is missing.")
      data = archive.read(record)
      if len(data) < numel * dtype.itemsize:
        raise CheckpointFormatError(f"{path}: storage {key} holds {len(data)} bytes, {numel} elements of "
                                    f"{dtype} need {numel * dtype.itemsize}.")
      storage = _Storage(dtype, numel)
      storage.array = np.frombuffer(data, dtype.newbyteorder("<" if byteorder == "little" else ">"), numel)
      storage.array = storage.array.astype(dtype, copy=False)
      return storage

    with archive.open(pickles[0]) as f:
      obj = _RestrictedUnpickler(f, {}, load_storage).load()
  state = _as_state_dict(obj, path)
  return {k: v.materialize() for k, v in state.items()}


def _read_legacy(path) -> dict[str, np.ndarray]:
  with open(path, "rb") as f:
    header = _RestrictedUnpickler(f, {}, None)
    try:
      magic = header.load()
    except (pickle.UnpicklingError, EOFError) as e:
      raise CheckpointFormatError(f"{path} is neither a zip nor a legacy torch.save file: {e}") from e
    if magic != _LEGACY_MAGIC_NUMBER:
      raise CheckpointFormatError(f"{path} is not a file written by torch.save.")
    if _RestrictedUnpickler(f, {}, None).load() != _LEGACY_PROTOCOL_VERSION:
      raise CheckpointFormatError(f"{path}: unsupported legacy protocol version.")
    sys_info = _RestrictedUnpickler(f, {}, None).load()
    if not isinstance(sys_info, dict) or not sys_info.get("little_endian", True):
      raise CheckpointFormatError(f"{path} was written on a big-endian machine; re-save it as .safetensors.")
    storages = {}
    obj = _RestrictedUnpickler(f, storages, lambda key, dtype, numel: _Storage(dtype, numel)).load()
    keys = _RestrictedUnpickler(f, {}, None).load()
    if not isinstance(keys, list) or set(map(str, keys)) != set(storages):
      raise CheckpointFormatError(f"{path}: the storage list does not match the tensors; the file is corrupt.")
    for key in keys:
      storage = storages[str(key)]
      (numel,) = struct.unpack("<q", f.read(8))
      data = f.read(numel * storage.dtype.itemsize)
      if numel != storage.numel or len(data) != numel * storage.dtype.itemsize:
        raise CheckpointFormatError(f"{path}: storage {key} is truncated or has the wrong size.")
      storage.array = np.frombuffer(data, storage.dtype.newbyteorder("<"), numel).astype(storage.dtype,
                                                                                          copy=False)
  state = _as_state_dict(obj, path)
  return {k: v.materialize() for k, v in state.items()}


def read_pth(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The tensors of a `torch.save`d state dict, by name, as NumPy arrays (no PyTorch needed).

  Accepts the zip format and the legacy format, a state dict at the top or under "state_dict" or "model".

  Raises:
    CheckpointFormatError: the file names anything but tensors and OrderedDicts, or is corrupt.
    FileNotFoundError: no such file.
  """
  path = os.fspath(path)
  try:
    if zipfile.is_zipfile(path):
      return _read_zip(path)
    return _read_legacy(path)
  except CheckpointFormatError:
    raise
  except (pickle.UnpicklingError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError,
          struct.error, zipfile.BadZipFile) as e:
    raise CheckpointFormatError(f"{path} is not a readable torch.save file ({type(e).__name__}: {e}).") from e


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The tensors of a `.safetensors` file, by name, as NumPy arrays (the `safetensors` package, no torch)."""
  from safetensors import SafetensorError  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load as load_safetensors  # pylint: disable=g-import-not-at-top
  with open(path, "rb") as f:
    data = f.read()
  try:
    return load_safetensors(data)
  except KeyError as e:  # safetensors.numpy knows no dtype without a NumPy equivalent, e.g. BF16
    raise CheckpointFormatError(f"{path} holds {e} tensors, which the safetensors NumPy reader does not "
                                "support; convert the file to float32.") from e
  except (SafetensorError, ValueError, TypeError) as e:
    raise CheckpointFormatError(f"{path} is not a readable .safetensors file: {e}") from e


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """`read_safetensors` for `.safetensors` files, `read_pth` for anything else (`.pth`, `.pt`, `.bin`)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No weights file {path}.")
  if path.endswith(".safetensors"):
    return read_safetensors(path)
  return read_pth(path)


__all__ = ["CheckpointFormatError", "read_pth", "read_safetensors", "read_tensors"]
