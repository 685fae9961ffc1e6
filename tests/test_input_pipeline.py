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
