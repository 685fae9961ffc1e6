"""Dataset builds that never destroy a good dataset: build beside it, swap it in only when complete.

TFDS writes a build into `incomplete.*` and renames it when done, but with `--overwrite` it first deletes the
dataset that is there, so a build that fails half-way (a damaged image deep in the archive) leaves nothing.
`prepare_beside` builds into a staging data dir next to the real one and replaces the dataset's version
folder only after the new one is complete; the previous version is removed last. Leftovers of killed builds
(staging folders, TFDS `incomplete.*` folders) are removed at the start of the next build.
"""

from collections.abc import Callable
import glob
import os
import shutil

import tensorflow_datasets as tfds

_STAGING = ".staging-"
_REPLACED = ".replaced-"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def remove_leftovers(data_dir: str, version_dir: str) -> list[str]:
  """Removes what killed builds left: staging folders of dead processes, `incomplete.*` and replaced copies
  beside `version_dir`. Returns the removed paths."""
  removed = []
  for path in glob.glob(os.path.join(data_dir, _STAGING + "*")):
    pid = path.rsplit("-", 1)[-1]
    if not (pid.isdigit() and _alive(int(pid))):
      shutil.rmtree(path, ignore_errors=True)
      removed.append(path)
  parent = os.path.dirname(version_dir)
  for pattern in ("incomplete.*", os.path.basename(version_dir) + _REPLACED + "*"):
    for path in glob.glob(os.path.join(parent, pattern)):
      shutil.rmtree(path, ignore_errors=True)
      removed.append(path)
  return removed


def prepare_beside(make_builder: Callable[[str], tfds.core.DatasetBuilder], data_dir: str,
                   download_config: tfds.download.DownloadConfig) -> tfds.core.DatasetBuilder:
  """Builds the dataset of `make_builder(data_dir)` without touching an existing copy until it succeeds.

  Args:
    make_builder: data dir -> the builder (same name, config and version for any data dir).
    data_dir: the TFDS data dir the dataset belongs in.
    download_config: passed to `download_and_prepare` of the staged build.

  Returns:
    The builder of the finished dataset in `data_dir`. If the build raises, the exception propagates and
    `data_dir` holds exactly what it held before.
  """
  target = make_builder(data_dir).data_dir
  remove_leftovers(data_dir, target)
  staging = os.path.join(data_dir, f"{_STAGING}{os.getpid()}")
  try:
    staged = make_builder(staging)
    staged.download_and_prepare(download_config=download_config)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    replaced = None
    if os.path.exists(target):
      replaced = f"{target}{_REPLACED}{os.getpid()}"
      os.rename(target, replaced)
    os.rename(staged.data_dir, target)  # Same file system: atomic.
    if replaced:
      shutil.rmtree(replaced)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return make_builder(data_dir)
