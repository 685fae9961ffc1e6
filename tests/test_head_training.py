"""Fine-tuning options of the optimizer (issue 15 item 4): the embedding head's learning-rate multiplier and
head-only warm-up steps, against plain optax.adamw on each part; frozen BatchNorm is a model option
(`config.model.freeze_batch_norm`, tests/test_backbones.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxret import losses
from jaxret import run_config
from jaxret import trainer


def backbone_config(**optim):
  config = run_config.base_config()
  config.model.name = "resnet18_tiny"
  config.optim.update(learning_rate=1e-2, grad_clip_norm=0.0, weight_decay=1e-4, **optim)
  config.warmup_steps, config.total_steps = 0, 20  # The first step already moves every parameter.
  return config


def params_and_grads():
  rng = np.random.default_rng(0)
  params = {"backbone": {"conv": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)}},
            "head": {"projection": {"kernel": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)}}}
  grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params) for _ in range(6)]
  return params, grads


def run(tx, params, grads):
  """The parameters after each of the updates, for a transformation over `params`."""
  state, out = tx.init(params), []
  for grad in grads:
    updates, state = tx.update(grad, state, params)
    params = optax.apply_updates(params, updates)
    out.append(params)
  return out


@pytest.mark.parametrize("head_lr_multiplier,head_only_steps", [(10.0, 0), (1.0, 3), (5.0, 2)])
def test_head_and_backbone_follow_their_own_rates(head_lr_multiplier, head_only_steps):
  config = backbone_config(head_lr_multiplier=head_lr_multiplier, head_only_steps=head_only_steps)
  run_config.validate(config, device_count=1)
  objective = losses.objective_from_config(config.loss)
  params, grads = params_and_grads()
  got = run(trainer.make_optimizer(config, objective), {"model": params, "loss": {"triplet": {}}},
            [{"model": g, "loss": {"triplet": {}}} for g in grads])
  schedule = trainer.learning_rate_schedule(config)
  head_rate = lambda step: head_lr_multiplier * schedule(step)
  backbone_rate = lambda step: jnp.where(step < head_only_steps, 0.0, schedule(step))
  head = run(optax.adamw(head_rate, weight_decay=1e-4), params["head"], [g["head"] for g in grads])
  backbone = run(optax.adamw(backbone_rate, weight_decay=1e-4), params["backbone"], [g["backbone"] for g in grads])
  for step, (g, h, b) in enumerate(zip(got, head, backbone)):
    np.testing.assert_allclose(g["model"]["head"]["projection"]["kernel"], h["projection"]["kernel"], rtol=1e-6)
    np.testing.assert_allclose(g["model"]["backbone"]["conv"]["kernel"], b["conv"]["kernel"], rtol=1e-6)
    frozen = step < head_only_steps
    assert np.array_equal(g["model"]["backbone"]["conv"]["kernel"], params["backbone"]["conv"]["kernel"]) == frozen
  # The multiplier is not a no-op: a plain AdamW head moves differently.
  plain = run(optax.adamw(schedule, weight_decay=1e-4), params["head"], [g["head"] for g in grads])
  assert (head_lr_multiplier == 1.0) == np.allclose(plain[-1]["projection"]["kernel"],
                                                    got[-1]["model"]["head"]["projection"]["kernel"])


def test_head_options_are_checked():
  config = backbone_config(head_lr_multiplier=-1.0, head_only_steps=-1)
  with pytest.raises(run_config.ConfigError) as error:
    run_config.validate(config, device_count=1)
  assert "head_lr_multiplier=-1.0 must be a number >= 0" in str(error.value)
  assert "head_only_steps=-1 must be a whole number >= 0" in str(error.value)
  capsules = run_config.base_config()
  capsules.optim.head_only_steps = 10
  with pytest.raises(run_config.ConfigError, match="apply to the backbone models .* not to rccapsnet"):
    run_config.validate(capsules, device_count=1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from jaxret import input_pipeline  # pylint: disable=g-import-not-at-top
  path = tmp_path_factory.mktemp("tfds")
  input_pipeline.get_builder("synthetic_inshop/tiny", str(path))
  return str(path)


@pytest.mark.parametrize("name", ["inshop_resnet50", "inshop_vits16"])
def test_backbone_configs_train_from_their_smoke_runs(tmp_path, data_dir, name):
  """`python -m jaxret.train --config configs/NAME.py:smoke` without weights, head-only steps included."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("smoke")
  config.data_dir = data_dir
  assert config.model.pretrained is None and config.optim.head_only_steps > 0
  result = trainer.train_and_evaluate(config, str(tmp_path / name))
  rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
  assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r) and 0 <= result["recall@1"] <= 1
