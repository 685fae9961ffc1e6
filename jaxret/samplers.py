"""Which training records form the global batch of each step: pure functions of (seed, step).

A sampler never touches images and never depends on the number of processes: every process computes the
same global batch and reads its own block of it (`input_pipeline.train_batches`), so resuming and changing
the number of processes give the same run.
"""

import dataclasses
import functools

import numpy as np

from jaxret import run_config


# eq=False keeps identity hashing, which the per-step caches below need (the fields hold arrays).
@dataclasses.dataclass(frozen=True, eq=False)
class PKSampler:
  """P x K product-balanced batches: P products, K images of each, a pure function of (seed, step).

  Products are visited in a fresh random order every epoch (each product at most once per epoch); the K
  images of a product are drawn without replacement when it has at least K, else with replacement.

  Attributes:
    item_ids: `[N]` product id of every record of the training split.
    products_per_batch: P.
    images_per_product: K.
    seed: the run's data seed.
    class_indices: `[N]` int32, set on construction: each record's product as an index in `[0, C)` over the C
      products of the split (sorted by id), for losses with one parameter per training class.
  """
  item_ids: np.ndarray
  products_per_batch: int
  images_per_product: int
  seed: int

  def __post_init__(self):
    products, inverse = np.unique(self.item_ids, return_inverse=True)
    object.__setattr__(self, "class_indices", inverse.astype(np.int32))
    order = np.argsort(inverse, kind="stable")
    starts = np.searchsorted(inverse[order], np.arange(len(products)))
    counts = np.bincount(inverse, minlength=len(products))
    # Products with a single image give no positive pair; they are not sampled as anchors' products.
    usable = np.flatnonzero(counts >= 2)
    if len(usable) < self.products_per_batch:
      raise run_config.ConfigError(
          f"config.input.batch_size / config.input.images_per_product asks for {self.products_per_batch} "
          f"products per batch, but the training split has only {len(usable)} products with at least 2 images; use a smaller batch or a larger dataset.")
    object.__setattr__(self, "_records_by_product", order)
    object.__setattr__(self, "_starts", starts)
    object.__setattr__(self, "_counts", counts)
    object.__setattr__(self, "_usable", usable)

  @property
  def batch_size(self) -> int:
    return self.products_per_batch * self.images_per_product

  @property
  def steps_per_epoch(self) -> int:
    return len(self._usable) // self.products_per_batch

  @functools.lru_cache(maxsize=64)
  def _epoch_order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, 0, epoch]).permutation(self._usable)

  @functools.lru_cache(maxsize=256)
  def batch_records(self, step: int) -> np.ndarray:
    """`[P * K]` record indices of the global batch of `step`, product by product."""
    epoch, chunk = divmod(step, self.steps_per_epoch)
    products = self._epoch_order(epoch)[chunk * self.products_per_batch:(chunk + 1) * self.products_per_batch]
    records = []
    for product in products:
      rng = np.random.default_rng([self.seed, 1, step, int(product)])
      count = self._counts[product]
      picks = rng.choice(count, self.images_per_product, replace=count < self.images_per_product)
      records.append(self._records_by_product[self._starts[product] + picks])
    return np.concatenate(records)
