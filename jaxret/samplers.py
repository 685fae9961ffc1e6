"""Which training records form the global batch of each step: pure functions of (seed, step).

A sampler never touches images and never depends on the number of processes: every process computes the
same global batch and reads its own block of it (`input_pipeline.train_batches`), so resuming and changing
the number of processes give the same run. `sampler_from_config` picks one from `config.input.sampler`:

  "pk": `PKSampler`, P products x K images;
  "category_balanced": `CategoryBalancedSampler`, C categories x P products x K images, so that every
    anchor has same-category negatives (what the category-aware quadruplet loss needs).
"""

import dataclasses
import functools

import numpy as np

from jaxret import run_config

# htl_anchor_neighbour: P x K batches until the HTL loss has built its class tree, then HTL's anchor-neighbour
# batches from the current tree (`jaxret.samplers_htl`; the trainer switches after every rebuild).
SAMPLERS = ("pk", "category_balanced", "htl_anchor_neighbour")


def draw_images(seed: int, step: int, product: int, first: int, count: int, images_per_product: int,
                records_by_product: np.ndarray) -> np.ndarray:
  """K records of one product for `step`: without replacement when it has at least K images, else with."""
  rng = np.random.default_rng([seed, 1, step, int(product)])
  picks = rng.choice(count, images_per_product, replace=count < images_per_product)
  return records_by_product[first + picks]


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
    return np.concatenate([
        draw_images(self.seed, step, product, self._starts[product], self._counts[product],
                    self.images_per_product, self._records_by_product) for product in products])


@dataclasses.dataclass(frozen=True, eq=False)
class CategoryBalancedSampler:
  """C categories x P products x K images per batch, a pure function of (seed, step).

  Categories are visited in a fresh random order every category epoch (each at most once per epoch, C per
  step). Each category keeps its own stream of its products, a fresh random order every round, and a visit
  takes the next P of them (no product twice in a batch); the K images of a product are drawn as in
  `PKSampler`. The global batch is category by category, product by product.

  Attributes:
    item_ids: `[N]` product id of every record of the training split.
    categories: `[N]` category of every record (a product's category is that of its first record).
    categories_per_batch: C.
    products_per_category: P.
    images_per_product: K.
    seed: the run's data seed.
    class_indices: `[N]` int32, set on construction, as in `PKSampler`.
  """
  item_ids: np.ndarray
  categories: np.ndarray
  categories_per_batch: int
  products_per_category: int
  images_per_product: int
  seed: int

  def __post_init__(self):
    item_ids, categories = np.asarray(self.item_ids), np.asarray(self.categories)
    if item_ids.shape != categories.shape:
      raise ValueError(f"item_ids {item_ids.shape} and categories {categories.shape} must be of one length.")
    products, first_record, inverse = np.unique(item_ids, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    object.__setattr__(self, "class_indices", inverse.astype(np.int32))
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse, minlength=len(products))
    product_categories = categories[first_record]
    # Products with a single image give no positive pair; they are not sampled.
    usable = counts >= 2
    by_category = {int(c): np.flatnonzero(usable & (product_categories == c)) for c in np.unique(product_categories)}
    eligible = np.array(sorted(c for c, p in by_category.items() if len(p) >= self.products_per_category), np.int64)
    if len(eligible) < self.categories_per_batch:
      raise run_config.ConfigError(
          f"config.input.categories_per_batch={self.categories_per_batch} with {self.products_per_category} "
          "products per category (config.input.batch_size / (categories_per_batch * images_per_product)) needs "
          f"{self.categories_per_batch} categories with at least {self.products_per_category} products of 2 "
          f"or more images, but the training split has {len(eligible)} such categories (of "
          f"{len(by_category)}; their products: {sorted(len(p) for p in by_category.values())}). Use fewer "
          "categories or fewer products per category, or config.input.sampler='pk'.")
    object.__setattr__(self, "_records_by_product", order)
    object.__setattr__(self, "_starts", np.searchsorted(inverse[order], np.arange(len(products))))
    object.__setattr__(self, "_counts", counts)
    object.__setattr__(self, "_eligible", eligible)
    object.__setattr__(self, "_products_by_category", {c: by_category[int(c)] for c in eligible})

  @property
  def batch_size(self) -> int:
    return self.categories_per_batch * self.products_per_category * self.images_per_product

  @property
  def steps_per_epoch(self) -> int:
    """Steps of one category epoch (every eligible category visited once, up to C - 1 left over)."""
    return len(self._eligible) // self.categories_per_batch

  @functools.lru_cache(maxsize=64)
  def _category_order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, 3, epoch]).permutation(self._eligible)

  @functools.lru_cache(maxsize=1024)
  def _product_round(self, category: int, round_index: int) -> np.ndarray:
    return np.random.default_rng([self.seed, 4, category, round_index]).permutation(
        self._products_by_category[category])

  def category_products(self, category: int, visit: int) -> np.ndarray:
    """The P products of `category` at its `visit`-th visit: the next P of its stream of rounds."""
    products = self._products_by_category[category]
    chunks_per_round = len(products) // self.products_per_category
    round_index, chunk = divmod(visit, chunks_per_round)
    start = chunk * self.products_per_category
    return self._product_round(category, round_index)[start:start + self.products_per_category]

  @functools.lru_cache(maxsize=256)
  def batch_records(self, step: int) -> np.ndarray:
    """`[C * P * K]` record indices of the global batch of `step`, category by category, product by product."""
    epoch, chunk = divmod(step, self.steps_per_epoch)
    categories = self._category_order(epoch)[chunk * self.categories_per_batch:
                                             (chunk + 1) * self.categories_per_batch]
    # A category appears once per category epoch, so its visit number is the epoch.
    products = np.concatenate([self.category_products(int(c), epoch) for c in categories])
    return np.concatenate([
        draw_images(self.seed, step, product, self._starts[product], self._counts[product],
                    self.images_per_product, self._records_by_product) for product in products])


def sampler_from_config(input_config, item_ids: np.ndarray, categories: np.ndarray,
                        seed: int) -> "PKSampler | CategoryBalancedSampler":
  """The sampler `config.input.sampler` names, sized by `config.input` (batch_size, images_per_product,
  categories_per_batch); ConfigError when the training split cannot fill its batches."""
  k = input_config.images_per_product
  if input_config.sampler == "category_balanced":
    c = input_config.categories_per_batch
    return CategoryBalancedSampler(item_ids, categories, c, input_config.batch_size // (c * k), k, seed)
  if input_config.sampler in ("pk", "htl_anchor_neighbour"):  # HTL's first batches are P x K (no tree yet).
    return PKSampler(item_ids, input_config.batch_size // k, k, seed)
  raise run_config.ConfigError(f"config.input.sampler={input_config.sampler!r} must be one of {list(SAMPLERS)}.")
