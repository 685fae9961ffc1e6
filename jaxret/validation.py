"""A validation split held out of the training products: model selection without the test set.

`config.input.validation_products = N` (default 0: none) takes N products of the training split away from
training and splits each one's images into validation queries and validation gallery images, as In-shop's
test products are split. The trainer evaluates this split beside the test split at every evaluation and logs
`val/recall@K`; a step chosen on `val/recall@1` is chosen without looking at the test split, which then only
measures (the strong metric-learning papers instead kept the epoch with the best test Recall@1).

Everything here is a pure function of the training split's labels and the seed, like the samplers: a resumed
run, or one on more processes, holds out the same products and splits them the same way.

  held_out = hold_out_products(train_index.item_ids, num_products=40, seed=config.seed)
  sampler = SubsetSampler(PKSampler(train_index.item_ids[held_out.train_records], P, K, seed),
                          held_out.train_records, train_index.item_ids)
  splits = evaluation_splits(train_split, held_out)    # {"query": DecodedSplit, "gallery": DecodedSplit}
"""

import dataclasses

import numpy as np

from jaxret import decoded_cache
from jaxret import run_config

# Tag of the random stream that chooses the held-out products (the samplers use 0 and 1, the augmentation 2,
# the loss 3), so that it never coincides with another stream of the same seed.
_HOLD_OUT_STREAM = 5


@dataclasses.dataclass(frozen=True)
class HeldOutProducts:
  """Which records of the training split train, and which form the validation queries and gallery.

  Attributes:
    products: `[N]` int64 ids of the held-out products, sorted.
    train_records: `[R]` int64 record indices of the training split that training may draw, sorted (the
      records of every product but the held-out ones).
    query_records: `[Q]` int64 record indices of the validation queries, sorted: about half of each held-out
      product's images (at least one).
    gallery_records: `[G]` int64 record indices of the validation gallery, sorted: the other images of the
      held-out products (at least one each).
  """
  products: np.ndarray
  train_records: np.ndarray
  query_records: np.ndarray
  gallery_records: np.ndarray


def hold_out_products(item_ids: np.ndarray, num_products: int, seed: int, *,
                      products_per_batch: int = 2) -> HeldOutProducts:
  """Holds out `num_products` products of a training split, each split into query and gallery images.

  The products are drawn uniformly, without replacement, among those with at least 2 images (a product needs
  a query and a gallery image); each product's images are shuffled and the first `n // 2` become queries,
  the rest gallery images. Both draws depend only on `(item_ids, num_products, seed)`; each product's split
  depends only on the seed and that product, not on which other products were drawn.

  Args:
    item_ids: `[N]` product id of every record of the training split.
    num_products: how many products to hold out (at least 1).
    seed: the run's seed.
    products_per_batch: P of the training batches: at least this many products with 2 or more images must
      remain for training.

  Returns:
    The held-out products and the three sets of record indices (disjoint, together all records).

  Raises:
    run_config.ConfigError: when the split has fewer than `num_products` products with 2 or more images, or
      holding them out leaves fewer than `products_per_batch` to train on.
  """
  item_ids = np.asarray(item_ids)
  if num_products < 1:
    raise ValueError(f"num_products must be at least 1, got {num_products}.")
  products, inverse, counts = np.unique(item_ids, return_inverse=True, return_counts=True)
  eligible = products[counts >= 2]
  if num_products > len(eligible):
    raise run_config.ConfigError(
        f"config.input.validation_products={num_products} asks for more products than the training split "
        f"has: {len(eligible)} of its {len(products)} products have the 2 or more images that a validation "
        f"query and gallery need. Use at most {max(len(eligible) - products_per_batch, 0)} (so that "
        f"{products_per_batch} products per batch remain to train on), or 0 for no validation split.")
  if len(eligible) - num_products < products_per_batch:
    raise run_config.ConfigError(
        f"config.input.validation_products={num_products} leaves {len(eligible) - num_products} training "
        f"products with 2 or more images, fewer than the {products_per_batch} products of a training batch "
        f"(config.input.batch_size / config.input.images_per_product). Use at most "
        f"{len(eligible) - products_per_batch}.")
  held = np.sort(np.random.default_rng([seed, _HOLD_OUT_STREAM]).choice(eligible, num_products, replace=False))
  is_held = np.isin(item_ids, held)
  order = np.argsort(inverse, kind="stable")  # Records grouped by product, each group in record order.
  starts = np.concatenate([[0], np.cumsum(counts)])
  position = np.searchsorted(products, held)
  query, gallery = [], []
  for product, p in zip(held, position):
    records = order[starts[p]:starts[p + 1]]
    shuffled = np.random.default_rng([seed, _HOLD_OUT_STREAM, int(product)]).permutation(records)
    query.append(shuffled[:len(shuffled) // 2])
    gallery.append(shuffled[len(shuffled) // 2:])
  return HeldOutProducts(products=held.astype(np.int64), train_records=np.flatnonzero(~is_held).astype(np.int64),
                         query_records=np.sort(np.concatenate(query)).astype(np.int64),
                         gallery_records=np.sort(np.concatenate(gallery)).astype(np.int64))


class RecordRows:
  """Rows `records` of a split's images, as an array of their own (`shape`, `len`, `[slice]`, `[indices]`).

  Row i is record `records[i]` of the split: read from its decoded `images` (`[N, S, S, 3]` uint8), or, for
  a split decoded while training (`config.input.cache="stream"`, no decoded pixels), decoded from the
  JPEGs of `source` at `size` by `decoded_cache.decode_pixels`, the function that fills the caches.
  Nothing is read until asked for.
  """

  def __init__(self, records: np.ndarray, *, images: np.ndarray | None = None, source=None,
               size: int | None = None):
    if (images is None) == (source is None):
      raise ValueError("Give either the decoded images of the split or its source and a size.")
    self.records = np.asarray(records, np.int64)
    self.images, self.source = images, source
    side = images.shape[1] if images is not None else size
    self.shape = (len(self.records), side, side, 3)
    self.dtype = np.dtype(np.uint8)

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, key) -> np.ndarray:
    records = self.records[key]
    if self.images is not None:
      return np.asarray(self.images[records])
    rows = np.atleast_1d(records)
    pixels = np.zeros((len(rows), *self.shape[1:]), np.uint8)
    for i, record in enumerate(self.source.__getitems__([int(r) for r in rows]) if len(rows) else []):
      pixels[i] = decoded_cache.decode_pixels(record["image"], self.shape[1])
    return pixels if np.ndim(records) else pixels[0]


def subset_index(index: decoded_cache.SplitIndex, records: np.ndarray) -> decoded_cache.SplitIndex:
  """The labels of `records` of a split, in that order."""
  return decoded_cache.SplitIndex(
      item_ids=index.item_ids[records], categories=index.categories[records],
      image_names=index.image_names[records],
      features={name: np.asarray(values)[records] for name, values in index.features.items()})


def record_split(split: decoded_cache.DecodedSplit, records: np.ndarray, *, source=None,
                 size: int | None = None) -> decoded_cache.DecodedSplit:
  """Records `records` of a decoded split as a decoded split of their own (labels and `RecordRows` pixels).

  Their pixels are rows of `split.images`; when the split has no decoded pixels (stream mode), they are
  decoded from its `source` at `size` when read.
  """
  if split.images is not None:
    rows = RecordRows(records, images=split.images)
  else:
    rows = RecordRows(records, source=source, size=size)
  return decoded_cache.DecodedSplit(path=split.path, index=subset_index(split.index, records), images=rows)


def evaluation_splits(train: decoded_cache.DecodedSplit, held_out: HeldOutProducts, *, source=None,
                      size: int | None = None) -> dict[str, decoded_cache.DecodedSplit]:
  """The validation query and gallery as decoded splits `{"query": ..., "gallery": ...}` of the training split
  (`record_split`: `source` and `size` for a training split without decoded pixels)."""
  return {split: record_split(train, records, source=source, size=size)
          for split, records in (("query", held_out.query_records), ("gallery", held_out.gallery_records))}


class SubsetSampler:
  """A sampler built over some records of a split, giving record indices of the whole split.

  `inner` (a `PKSampler` or any sampler with the same interface) was built over `item_ids[records]`; this
  maps its batches back to the split's records, so that the input pipeline reads the split unchanged.

  Attributes:
    item_ids: `[N]` product id of every record of the whole split.
    class_indices: `[N]` int32: the inner sampler's class index for the records it draws from, -1 for the
      others (never drawn).
    seed, batch_size, steps_per_epoch: the inner sampler's.
  """

  def __init__(self, inner, records: np.ndarray, item_ids: np.ndarray):
    self.inner = inner
    self.records = np.asarray(records, np.int64)
    self.item_ids = np.asarray(item_ids)
    if not np.array_equal(self.item_ids[self.records], inner.item_ids):
      raise ValueError("The inner sampler must be built over item_ids[records].")
    self.class_indices = np.full(len(self.item_ids), -1, np.int32)
    self.class_indices[self.records] = inner.class_indices
    self.seed = inner.seed

  @property
  def batch_size(self) -> int:
    return self.inner.batch_size

  @property
  def steps_per_epoch(self) -> int:
    return self.inner.steps_per_epoch

  def batch_records(self, step: int) -> np.ndarray:
    """`[B]` record indices of the whole split forming the global batch of `step`."""
    return self.records[self.inner.batch_records(step)]
