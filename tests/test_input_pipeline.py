"""P x K sampling, the three places training images live (same batches), per-process blocks, eval padding."""

import gc
import io
import types

import jax
import numpy as np
from PIL import Image
import pytest

from jaxret import decoded_cache
from jaxret import input_pipeline
from jaxret import run_config
from jaxret import samplers
from jaxret import sharding


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


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """The tiny synthetic dataset: `(builder, train split decoded at 24x24, its labels only, its records)`."""
  builder = input_pipeline.get_builder("synthetic_inshop/tiny", str(tmp_path_factory.mktemp("tfds")))
  decoded = decoded_cache.open_split(builder, "train", 24, num_workers=0)
  labels = decoded_cache.open_split(builder, "train", None, num_workers=0)
  return builder, decoded, labels, input_pipeline.read_split(builder, "train")


@pytest.mark.parametrize("mode,workers", [("device", None), ("host", None), ("stream", 0), ("stream", 1)])
def test_the_cache_modes_give_the_same_batches(tiny, mode, workers):
  _, decoded, labels, source = tiny
  sampler = samplers.PKSampler(decoded.index.item_ids, products_per_batch=2, images_per_product=4, seed=3)
  mesh = sharding.data_mesh()

  def batches(first_step, hold):
    stream = input_pipeline.train_batches(mode, labels if mode == "stream" else decoded, sampler, mesh,
                                          first_step=first_step, num_steps=6, source=source, size=24,
                                          num_workers=workers)
    assert stream.mode == mode
    try:
      if hold:  # Every batch kept on the devices until all are made: a host buffer reused too early shows.
        return [jax.device_get(batch) for batch in list(stream)]
      return [jax.device_get(batch) for batch in stream]  # Each dropped at once: its buffer is reused.
    finally:
      stream.close()

  got = batches(first_step=1, hold=True)
  assert len(got) == 5
  for step, batch in enumerate(got, start=1):
    records = sampler.batch_records(step)
    assert batch["image"].shape == (8, 24, 24, 3) and batch["image"].dtype == np.uint8
    np.testing.assert_array_equal(batch["image"], decoded.images[records])
    np.testing.assert_array_equal(batch["item_id"], decoded.index.item_ids[records])
    np.testing.assert_array_equal(batch["category"], decoded.index.categories[records])
    np.testing.assert_array_equal(batch["class_index"], sampler.class_indices[records])
  # The cache holds exactly what decoding the records gives (stream decodes them while training).
  first = sampler.batch_records(1)[0]
  np.testing.assert_array_equal(got[0]["image"][0], input_pipeline.decode_pixels(source[int(first)]["image"], 24))
  # Resuming at step 4 gives the steps 4 and 5 of the uninterrupted stream (grain's workers: the same code).
  if workers:
    return
  for a, b in zip(batches(first_step=4, hold=False), got[3:], strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_process_blocks_concatenate_to_the_global_batch(tiny):
  _, decoded, labels, source = tiny
  sampler = samplers.PKSampler(decoded.index.item_ids, products_per_batch=2, images_per_product=4, seed=5)

  def host(process_index, process_count):
    return list(input_pipeline.host_local_batches(decoded, sampler, first_step=0, num_steps=3,
                                                  process_index=process_index, process_count=process_count))

  def stream(process_index, process_count):
    block = input_pipeline._process_block(8, process_index, process_count)  # pylint: disable=protected-access
    decode = input_pipeline.DecodeStepBlock(source, sampler, input_pipeline.batch_labels(labels.index, sampler),
                                            block, 24)
    return [decode(step) for step in range(3)]

  for local_batches in (host, stream):
    whole = local_batches(0, 1)
    halves = [local_batches(p, 2) for p in range(2)]
    for step in range(3):
      assert len(halves[0][step]["image"]) == 4
      for key in whole[step]:
        np.testing.assert_array_equal(np.concatenate([halves[0][step][key], halves[1][step][key]]),
                                      whole[step][key])
  with pytest.raises(ValueError, match="not divisible by the 3 processes"):
    next(input_pipeline.host_local_batches(decoded, sampler, first_step=0, num_steps=1, process_count=3))


def test_host_buffers_are_reused_only_when_nothing_holds_them():
  mesh = sharding.data_mesh()
  buffers = input_pipeline.HostBuffers((4, 8, 8, 3))
  first = buffers.get()
  assert first.shape == (4, 8, 8, 3) and first.ctypes.data % 64 == 0
  first[:] = 1
  address = first.ctypes.data
  held = sharding.global_batch({"image": first}, mesh)["image"]  # May keep `first`'s memory (CPU: zero copy).
  jax.block_until_ready(held)
  del first
  second = buffers.get()
  assert second.ctypes.data != address
  second[:] = 2
  np.testing.assert_array_equal(np.asarray(held), 1)
  del second, held
  gc.collect()  # A jax.Array may let go of its host array only when the cycle collector runs.
  assert buffers.get().ctypes.data == address  # Nothing holds it any more: reused.


def in_memory_split(item_ids, size=4):
  """A DecodedSplit held in memory whose image i is filled with i."""
  num = len(item_ids)
  images = np.broadcast_to(np.arange(num, dtype=np.uint8)[:, None, None, None], (num, size, size, 3))
  index = decoded_cache.SplitIndex(np.asarray(item_ids), np.asarray(item_ids) % 3,
                                   np.array([f"img/{i}.jpg" for i in range(num)]))
  return decoded_cache.DecodedSplit("in memory", index, images)


def test_eval_batches_cover_the_split_in_order_with_padding():
  item_ids = make_item_ids(num_products=5)  # 19 records
  split = in_memory_split(item_ids)
  for process_count in (1, 2):
    per_process = [list(input_pipeline.eval_batches(split, global_batch=8, process_index=p,
                                                    process_count=process_count)) for p in range(process_count)]
    assert all(len(blocks) == 3 for blocks in per_process)  # ceil(19 / 8)

    def joined(key):
      return np.concatenate([np.concatenate([per_process[p][b][key] for p in range(process_count)])
                             for b in range(3)])

    valid = joined("valid")
    assert valid.sum() == len(item_ids) and valid[:len(item_ids)].all()
    np.testing.assert_array_equal(joined("item_id")[:len(item_ids)], item_ids)
    np.testing.assert_array_equal(joined("image")[:len(item_ids), 0, 0, 0], np.arange(len(item_ids)))
    assert joined("image").dtype == np.uint8 and not joined("image")[len(item_ids):].any()


def test_decode_pixels_gives_uint8_squares():
  y, x = np.mgrid[0:30, 0:40]
  picture = np.stack([x * 6, y * 8, x + y], -1).astype(np.uint8)
  png = io.BytesIO()
  Image.fromarray(picture).save(png, "PNG")
  np.testing.assert_array_equal(input_pipeline.decode_pixels(png.getvalue(), 1000)[:0], np.zeros((0, 1000, 3)))
  resized = input_pipeline.decode_pixels(png.getvalue(), 24)
  assert resized.shape == (24, 24, 3) and resized.dtype == np.uint8
  np.testing.assert_array_equal(resized, np.asarray(Image.fromarray(picture).resize((24, 24), Image.BILINEAR)))
  square = picture[:, :30]
  png = io.BytesIO()
  Image.fromarray(square).save(png, "PNG")
  np.testing.assert_array_equal(input_pipeline.decode_pixels(png.getvalue(), 30), square)  # Lossless, same size.
  with pytest.raises(ValueError, match="Could not decode"):
    input_pipeline.decode_pixels(png.getvalue()[:50], 24)


def fake_device(memory_bytes):
  return types.SimpleNamespace(memory_stats=lambda: {"bytes_limit": memory_bytes})


def test_auto_cache_puts_the_split_where_it_fits():
  split_bytes = 1000 * 32 * 32 * 3
  choose = lambda devices, fraction=0.5: input_pipeline.choose_cache(  # pylint: disable=g-long-lambda
      "auto", num_records=1000, size=32, memory_fraction=fraction, devices=devices)
  assert choose([fake_device(2 * split_bytes)] * 2)[0] == "device"
  assert choose([fake_device(2 * split_bytes), fake_device(split_bytes)])[0] == "host"  # The smallest counts.
  assert choose([fake_device(4 * split_bytes)], fraction=0.2)[0] == "host"
  mode, why = choose([fake_device(split_bytes)], fraction=split_bytes / input_pipeline.host_memory_bytes() / 2)
  assert mode == "stream" and "RAM" in why
  assert input_pipeline.choose_cache("stream", num_records=1000, size=32, memory_fraction=0.5,
                                     devices=[fake_device(10 * split_bytes)])[0] == "stream"



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
  for epochs in visits.values():
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
  # Each record's pixels encode its record index, so the images show which records a batch holds.
  images = np.broadcast_to((np.arange(len(item_ids)) % 256).astype(np.uint8)[:, None, None, None],
                           (len(item_ids), 2, 2, 3))
  index = decoded_cache.SplitIndex(item_ids.astype(np.int64), categories.astype(np.int32),
                                   np.asarray([f"img_{i}" for i in range(len(item_ids))]))
  decoded = decoded_cache.DecodedSplit(path="", index=index, images=images)
  sampler = samplers.CategoryBalancedSampler(item_ids, categories, 2, 2, 3, seed=3)

  def batches(process_index, count):
    return [{k: np.copy(v) for k, v in batch.items()} for batch in input_pipeline.host_local_batches(
        decoded, sampler, first_step=0, num_steps=3, process_index=process_index, process_count=count)]

  whole = batches(0, 1)
  for step, batch in enumerate(whole):
    records = sampler.batch_records(step)
    np.testing.assert_array_equal(batch["item_id"], item_ids[records])
    np.testing.assert_array_equal(batch["category"], categories[records])
    np.testing.assert_array_equal(batch["image"][:, 0, 0, 0], records % 256)
  parts = [batches(p, process_count) for p in range(process_count)]
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
