"""P x K sampling, per-process sharding, padding of eval batches and image decoding."""

import io

import numpy as np
from PIL import Image
import pytest

from jaxret import input_pipeline
from jaxret import run_config
from jaxret import samplers


def jpeg(colour, size=(40, 30)) -> bytes:
  buffer = io.BytesIO()
  Image.new("RGB", size, colour).save(buffer, "JPEG", quality=95)
  return buffer.getvalue()


class FakeSplit(list):
  """Records like those of a TFDS data source read with SkipDecoding (image as JPEG bytes)."""

  def __getitems__(self, indices):
    return [self[i] for i in indices]


def fake_split(item_ids):
  """A split whose images encode the record index in their colour."""
  return FakeSplit([{"image": jpeg((i % 256, (7 * i) % 256, 100)), "item_id": int(item), "category": int(item) % 3,
           "image_name": f"img/{i}.jpg".encode()} for i, item in enumerate(item_ids)])


def make_item_ids(num_products=12, images=(1, 2, 3, 5, 8)):
  rng = np.random.default_rng(0)
  ids = np.concatenate([np.full(images[p % len(images)], 1000 + p) for p in range(num_products)])
  return rng.permutation(ids)


def test_pk_batches_are_balanced_and_deterministic():
  item_ids = make_item_ids()
  sampler = samplers.PKSampler(item_ids, products_per_batch=3, images_per_product=4, seed=7)
  again = samplers.PKSampler(item_ids, products_per_batch=3, images_per_product=4, seed=7)
  other_seed = samplers.PKSampler(item_ids, products_per_batch=3, images_per_product=4, seed=8)
  usable = {p for p in np.unique(item_ids) if np.sum(item_ids == p) >= 2}
  assert sampler.steps_per_epoch == len(usable) // 3
  seen_in_epoch = []
  for step in range(3 * sampler.steps_per_epoch):
    records = sampler.batch_records(step)
    assert records.shape == (12,)
    products = item_ids[records].reshape(3, 4)
    # P blocks of K images of one product each, P different products, none with a single image.
    assert np.all(products == products[:, :1])
    assert len(set(products[:, 0])) == 3
    assert set(products[:, 0]) <= usable
    for block in records.reshape(3, 4):
      count = np.sum(item_ids == item_ids[block[0]])
      if count >= 4:
        assert len(set(block)) == 4  # Without replacement when the product has enough images.
    np.testing.assert_array_equal(records, again.batch_records(step))
    if step < sampler.steps_per_epoch:
      seen_in_epoch.extend(products[:, 0])
  assert len(seen_in_epoch) == len(set(seen_in_epoch))  # Each product at most once per epoch.
  assert any(not np.array_equal(sampler.batch_records(s), other_seed.batch_records(s)) for s in range(4))


def test_too_few_products_is_a_config_error():
  with pytest.raises(run_config.ConfigError, match="products with at least 2 images"):
    samplers.PKSampler(np.array([1, 1, 2, 3]), products_per_batch=2, images_per_product=2, seed=0)


def test_train_batches_split_over_processes_equal_the_global_batch():
  item_ids = make_item_ids()
  source = fake_split(item_ids)
  sampler = samplers.PKSampler(item_ids, products_per_batch=2, images_per_product=4, seed=3)
  kwargs = dict(image_size=16, num_steps=5, num_threads=2)
  whole = list(input_pipeline.train_batches(source, sampler, first_step=0, **kwargs))
  assert len(whole) == 5
  assert whole[0]["image"].shape == (8, 16, 16, 3) and whole[0]["image"].dtype == np.float32
  for step, batch in enumerate(whole):
    np.testing.assert_array_equal(batch["item_id"], item_ids[sampler.batch_records(step)])
  halves = [list(input_pipeline.train_batches(source, sampler, first_step=0, process_index=p, process_count=2,
                                              **kwargs)) for p in range(2)]
  for step in range(5):
    for key in ("image", "item_id", "category"):
      np.testing.assert_array_equal(np.concatenate([halves[0][step][key], halves[1][step][key]]),
                                    whole[step][key])
  # Resuming at step 3 gives the same batches (augmentation included) as the uninterrupted run.
  resumed = list(input_pipeline.train_batches(source, sampler, first_step=3, **kwargs))
  assert len(resumed) == 2
  for a, b in zip(resumed, whole[3:]):
    np.testing.assert_array_equal(a["image"], b["image"])


def test_eval_batches_cover_the_split_in_order_with_padding():
  item_ids = make_item_ids(num_products=5)  # 19 records
  source = fake_split(item_ids)
  index = input_pipeline.index_split(source)
  np.testing.assert_array_equal(index.item_ids, item_ids)
  for process_count in (1, 2):
    per_process = [list(input_pipeline.eval_batches(source, index, image_size=8, global_batch=8,
                                                    process_index=p, process_count=process_count))
                   for p in range(process_count)]
    batches = [np.concatenate([per_process[p][b]["item_id"] for p in range(process_count)])
               for b in range(len(per_process[0]))]
    valid = np.concatenate([np.concatenate([per_process[p][b]["valid"] for p in range(process_count)])
                            for b in range(len(per_process[0]))])
    assert len(batches) == 3  # ceil(19 / 8)
    assert valid.sum() == len(item_ids) and valid[:len(item_ids)].all()
    np.testing.assert_array_equal(np.concatenate(batches)[:len(item_ids)], item_ids)


def test_decode_image_normalises_and_augments_deterministically():
  data = jpeg((255, 0, 0), size=(50, 40))
  plain = input_pipeline.decode_image(data, 24)
  assert plain.shape == (24, 24, 3) and plain.dtype == np.float32
  red = (np.array([1.0, 0.0, 0.0]) - input_pipeline.MEAN_RGB) / input_pipeline.STDDEV_RGB
  np.testing.assert_allclose(plain.mean(axis=(0, 1)), red, atol=0.05)
  a = input_pipeline.decode_image(data, 24, np.random.default_rng(1))
  b = input_pipeline.decode_image(data, 24, np.random.default_rng(1))
  np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="Could not decode"):
    input_pipeline.decode_image(data[:100], 24)


def make_category_split(seed=0):
  """Records of 5 categories with 1 to 6 products each, products with 1 to 5 images, shuffled."""
  rng = np.random.default_rng(seed)
  item_ids, categories = [], []
  for category, num_products in enumerate((3, 6, 1, 4, 5)):
    for p in range(num_products):
      images = (1, 2, 3, 5)[(category + p) % 4]
      item_ids += [100 * category + p] * images
      categories += [category] * images
  order = rng.permutation(len(item_ids))
  return np.asarray(item_ids)[order], np.asarray(categories)[order]


def test_category_balanced_batches_hold_c_categories_p_products_k_images():
  item_ids, categories = make_category_split()
  kwargs = dict(categories_per_batch=2, products_per_category=2, images_per_product=3)
  sampler = samplers.CategoryBalancedSampler(item_ids, categories, seed=5, **kwargs)
  again = samplers.CategoryBalancedSampler(item_ids, categories, seed=5, **kwargs)
  other_seed = samplers.CategoryBalancedSampler(item_ids, categories, seed=6, **kwargs)
  counts = {p: np.sum(item_ids == p) for p in np.unique(item_ids)}
  # Categories with at least P = 2 products of 2+ images: 0 (products 0, 1, 2 -> images 1, 2, 3), 1, 3, 4.
  eligible = {0, 1, 3, 4}
  assert sampler.batch_size == 12 and sampler.steps_per_epoch == len(eligible) // 2
  visits = {c: [] for c in eligible}
  for step in range(6 * sampler.steps_per_epoch):
    records = sampler.batch_records(step)
    assert records.shape == (12,)
    products = item_ids[records].reshape(2, 2, 3)
    batch_categories = categories[records].reshape(2, 2, 3)
    assert np.all(products == products[..., :1])  # K images of one product per block
    assert np.all(batch_categories == batch_categories[:, :1, :1])  # P products of one category per block
    assert len(set(batch_categories[:, 0, 0])) == 2  # C different categories
    assert set(batch_categories[:, 0, 0]) <= eligible
    assert len(set(products[:, :, 0].ravel())) == 4  # no product twice in a batch
    assert all(counts[p] >= 2 for p in products[:, :, 0].ravel())
    for block in records.reshape(4, 3):
      if counts[item_ids[block[0]]] >= 3:
        assert len(set(block)) == 3  # without replacement when the product has enough images
    np.testing.assert_array_equal(records, again.batch_records(step))
    for c in set(batch_categories[:, 0, 0]):
      visits[c].append(step // sampler.steps_per_epoch)
  for c, epochs in visits.items():
    assert len(epochs) == len(set(epochs))  # each category at most once per category epoch
    assert len(epochs) >= 2
  # A category's visits within one round of its products bring P new products each.
  for c in eligible:
    usable = {p for p in np.unique(item_ids[categories == c]) if counts[p] >= 2}
    round_products = [item_ids[sampler._records_by_product[sampler._starts[p]]]
                      for v in range(len(usable) // 2) for p in sampler.category_products(c, v)]
    assert len(round_products) == len(set(round_products)) and set(round_products) <= usable
  assert any(not np.array_equal(sampler.batch_records(s), other_seed.batch_records(s)) for s in range(4))


def test_category_balanced_too_few_categories_or_products_is_a_config_error():
  item_ids, categories = make_category_split()
  with pytest.raises(run_config.ConfigError, match=r"categories_per_batch=5 .* has 4 such categories"):
    samplers.CategoryBalancedSampler(item_ids, categories, 5, 2, 2, seed=0)
  with pytest.raises(run_config.ConfigError, match=r"at least 6 products .* has 0 such categories"):
    samplers.CategoryBalancedSampler(item_ids, categories, 1, 6, 2, seed=0)


@pytest.mark.parametrize("process_count", [2, 3, 4])
def test_category_balanced_batches_split_over_processes_equal_the_global_batch(process_count):
  item_ids, categories = make_category_split(1)
  source = fake_split(item_ids)
  for record, category in zip(source, categories):
    record["category"] = int(category)
  sampler = samplers.CategoryBalancedSampler(item_ids, categories, 2, 2, 3, seed=3)
  kwargs = dict(image_size=8, num_steps=3, num_threads=2)
  whole = list(input_pipeline.train_batches(source, sampler, first_step=0, **kwargs))
  for step, batch in enumerate(whole):
    np.testing.assert_array_equal(batch["item_id"], item_ids[sampler.batch_records(step)])
    np.testing.assert_array_equal(batch["category"], categories[sampler.batch_records(step)])
  parts = [list(input_pipeline.train_batches(source, sampler, first_step=0, process_index=p,
                                             process_count=process_count, **kwargs)) for p in range(process_count)]
  for step in range(3):
    for key in ("image", "item_id", "category", "class_index"):
      np.testing.assert_array_equal(np.concatenate([part[step][key] for part in parts]), whole[step][key])


def test_sampler_from_config_and_its_checks():
  item_ids, categories = make_category_split()
  config = run_config.base_config()
  config.input.batch_size, config.input.images_per_product = 12, 3
  pk = samplers.sampler_from_config(config.input, item_ids, categories, seed=0)
  assert isinstance(pk, samplers.PKSampler) and (pk.products_per_batch, pk.images_per_product) == (4, 3)
  config.input.sampler, config.input.categories_per_batch = "category_balanced", 2
  balanced = samplers.sampler_from_config(config.input, item_ids, categories, seed=0)
  assert isinstance(balanced, samplers.CategoryBalancedSampler)
  assert (balanced.categories_per_batch, balanced.products_per_category, balanced.images_per_product) == (2, 2, 3)
  run_config.validate(config, device_count=1)
  config.input.categories_per_batch = 3
  with pytest.raises(run_config.ConfigError, match=r"batch_size=12 is not divisible by config.input.categories_"
                     r"per_batch=3 x config.input.images_per_product=3"):
    run_config.validate(config, device_count=1)
  config.input.sampler = "balanced"
  with pytest.raises(run_config.ConfigError, match=r"config.input.sampler='balanced' must be one of"):
    run_config.validate(config, device_count=1)
