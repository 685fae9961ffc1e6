"""HTL's anchor-neighbour batches (Ge et al., ECCV 2018, Sec. 3.2): a pure function of (seed, step, tree).

A batch holds l' anchor classes, each with its m - 1 nearest classes in the current class tree, and t
images of every class: l' * m * t images. Anchors are visited in a fresh random order every epoch (each
class at most once per epoch as an anchor, as `PKSampler` visits products); a neighbour already in the
batch is skipped for the next nearest, and when the list runs out random unused classes fill the group,
so no class appears twice in a batch. Classes with fewer than 2 images are never sampled. The images of a
class are drawn without replacement when it has at least t, else with replacement.
"""

import dataclasses
import functools

import numpy as np

from jaxret import run_config
from jaxret.losses import htl


# eq=False keeps identity hashing, which the per-step caches below need (the fields hold arrays).
@dataclasses.dataclass(frozen=True, eq=False)
class AnchorNeighbourSampler:
  """Anchor-neighbour batches for HTL, with the `PKSampler` interface (`batch_size`, `batch_records`).

  Attributes:
    class_index: `[N]` training class of every record of the training split, in `[0, C)`.
    nearest_classes: `[C, k]` the classes nearest to each class in the tree, nearest first
      (`jaxret.losses.htl.nearest_classes(params, k)`, as a NumPy array); k >= m - 1 lets the sampler
      skip classes already in the batch.
    anchors_per_batch: l'.
    classes_per_anchor: m (the anchor and its m - 1 neighbours).
    images_per_class: t.
    seed: the run's data seed.
    item_ids: `[N]` product id of every record, or None (read by `validation.SubsetSampler` only).
  """
  class_index: np.ndarray
  nearest_classes: np.ndarray
  anchors_per_batch: int
  classes_per_anchor: int
  images_per_class: int
  seed: int
  item_ids: np.ndarray | None = None

  @property
  def class_indices(self) -> np.ndarray:
    """`[N]` int32 class of every record, as `PKSampler.class_indices` (the input pipeline's `class_index`)."""
    return np.asarray(self.class_index, np.int32)

  def __post_init__(self):
    class_index = np.asarray(self.class_index)
    nearest = np.asarray(self.nearest_classes)
    if nearest.ndim != 2:
      raise ValueError(f"nearest_classes must be [num_classes, k]; got shape {nearest.shape}.")
    num_classes = nearest.shape[0]
    if class_index.size and (class_index.min() < 0 or class_index.max() >= num_classes):
      raise ValueError(f"class_index must lie in [0, {num_classes}) to match nearest_classes.")
    for name in ("anchors_per_batch", "classes_per_anchor", "images_per_class"):
      if getattr(self, name) < 1:
        raise run_config.ConfigError(f"The HTL sampler's {name} must be >= 1; got {getattr(self, name)}.")
    order = np.argsort(class_index, kind="stable")
    counts = np.bincount(class_index, minlength=num_classes)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    usable = np.flatnonzero(counts >= 2)
    classes_needed = self.anchors_per_batch * self.classes_per_anchor
    if len(usable) < classes_needed:
      raise run_config.ConfigError(
          f"An HTL batch of {self.anchors_per_batch} anchors x {self.classes_per_anchor} classes needs "
          f"{classes_needed} classes with at least 2 images; the training split has {len(usable)}. Use "
          "fewer anchors or classes per anchor.")
    is_usable = np.zeros(num_classes, bool)
    is_usable[usable] = True
    object.__setattr__(self, "_records_by_class", order)
    object.__setattr__(self, "_starts", starts)
    object.__setattr__(self, "_counts", counts)
    object.__setattr__(self, "_usable", usable)
    object.__setattr__(self, "_is_usable", is_usable)
    object.__setattr__(self, "_nearest", nearest)

  @property
  def batch_size(self) -> int:
    return self.anchors_per_batch * self.classes_per_anchor * self.images_per_class

  @property
  def steps_per_epoch(self) -> int:
    return len(self._usable) // self.anchors_per_batch

  @functools.lru_cache(maxsize=64)
  def _epoch_order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, 0, epoch]).permutation(self._usable)

  @functools.lru_cache(maxsize=256)
  def batch_classes(self, step: int) -> np.ndarray:
    """`[l', m]` classes of the batch of `step`: row i is anchor i followed by its neighbours."""
    epoch, chunk = divmod(step, self.steps_per_epoch)
    anchors = self._epoch_order(epoch)[chunk * self.anchors_per_batch:(chunk + 1) * self.anchors_per_batch]
    # Anchors are reserved first so that no anchor is taken as another anchor's neighbour.
    taken = set(int(a) for a in anchors)
    groups = []
    for anchor in anchors:
      group = [int(anchor)]
      for neighbour in self._nearest[anchor]:
        if len(group) == self.classes_per_anchor:
          break
        neighbour = int(neighbour)
        if self._is_usable[neighbour] and neighbour not in taken:
          group.append(neighbour)
          taken.add(neighbour)
      if len(group) < self.classes_per_anchor:
        fill_order = np.random.default_rng([self.seed, 2, step, int(anchor)]).permutation(self._usable)
        for candidate in fill_order:
          if len(group) == self.classes_per_anchor:
            break
          if int(candidate) not in taken:
            group.append(int(candidate))
            taken.add(int(candidate))
      groups.append(group)
    return np.asarray(groups, np.int64)

  @functools.lru_cache(maxsize=256)
  def batch_records(self, step: int) -> np.ndarray:
    """`[l' * m * t]` record indices of the global batch of `step`, class by class."""
    records = []
    for cls in self.batch_classes(step).reshape(-1):
      rng = np.random.default_rng([self.seed, 1, step, int(cls)])
      count = self._counts[cls]
      picks = rng.choice(count, self.images_per_class, replace=count < self.images_per_class)
      records.append(self._records_by_class[self._starts[cls] + picks])
    return np.concatenate(records)


def tree_is_built(tree) -> bool:
  """Whether HTL's class tree has been built (`htl.empty_tree` has no class with images)."""
  return bool(np.asarray(tree["class_counts"]).sum() > 0)


def sampler_from_tree(pk_sampler, tree, *, batch_size: int, classes_per_anchor: int) -> AnchorNeighbourSampler:
  """HTL's anchor-neighbour sampler over the records and classes of `pk_sampler` (a `PKSampler`, whose
  `class_indices` the tree was built with), with `config.input.batch_size` and `classes_per_anchor` (m); t is
  the P x K sampler's K. The nearest classes come from the current `tree` (HTL's loss parameters)."""
  images_per_class = pk_sampler.images_per_product
  num_classes = int(np.asarray(tree["class_counts"]).shape[0])
  neighbours = min(num_classes - 1, max(4 * (classes_per_anchor - 1), 1))
  nearest = np.asarray(htl.nearest_classes(tree, neighbours))
  return AnchorNeighbourSampler(
      class_index=pk_sampler.class_indices, nearest_classes=nearest,
      anchors_per_batch=batch_size // (classes_per_anchor * images_per_class),
      classes_per_anchor=classes_per_anchor, images_per_class=images_per_class, seed=pk_sampler.seed,
      item_ids=pk_sampler.item_ids)
