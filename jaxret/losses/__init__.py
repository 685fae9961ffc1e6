"""Metric-learning losses, looked up by config name: `get_loss(name)` gives a `Loss` (see `registry`).

Each module holds one method's math as pure functions on `[B, D]` embeddings and `[B]` labels (tested
against float64 loops over hand-listed tuples) and its `Loss` value; this file lists them by name. See
docs/losses.md for the equations and references.
"""

from jaxret.distances import pairwise_distances
from jaxret.losses import abe
from jaxret.losses import bier
from jaxret.losses import capsule_margin
from jaxret.losses import classification
from jaxret.losses import contrastive
from jaxret.losses import grid
from jaxret.losses import hdc
from jaxret.losses import htl
from jaxret.losses import landmarks
from jaxret.losses import multi_similarity
from jaxret.losses import objective
from jaxret.losses import proxy_anchor
from jaxret.losses import quadruplet
from jaxret.losses import triplet
from jaxret.losses.contrastive import contrastive_loss
from jaxret.losses.quadruplet import adaptive_margins
from jaxret.losses.quadruplet import category_quadruplet_loss
from jaxret.losses.quadruplet import quadruplet_loss
from jaxret.losses.registry import Loss
from jaxret.losses.registry import LossContext
from jaxret.losses.registry import Option
from jaxret.losses.triplet import TRIPLET_MINING
from jaxret.losses.triplet import triplet_loss

# One line per loss: config name -> its `Loss`.
LOSSES: dict[str, Loss] = {
    "triplet": triplet.LOSS,
    "quadruplet": quadruplet.QUADRUPLET,
    "category_quadruplet": quadruplet.CATEGORY_QUADRUPLET,
    "contrastive": contrastive.LOSS,
    "multi_similarity": multi_similarity.LOSS,
    "proxy_anchor": proxy_anchor.LOSS,
    "htl": htl.LOSS,
    "bier": bier.BIER,
    "a_bier": bier.A_BIER,
    "hdc": hdc.LOSS,
    "abe": abe.LOSS,
    "grid": grid.LOSS,
    "capsule_margin": capsule_margin.LOSS,
    "category": classification.CATEGORY,
    "attributes": classification.ATTRIBUTES,
    "landmarks": landmarks.LOSS,
}
assert all(name == loss.name for name, loss in LOSSES.items())


def objective_from_config(loss_config) -> objective.Objective:
  """The objective of `config.loss`: the loss(es) `config.loss.name` with their sections; ValueError if bad."""
  return objective.Objective.from_config(loss_config, LOSSES)


def config_problems(loss_config) -> list[str]:
  """What is wrong with `config.loss` (unknown names, options or values), one line each naming the field."""
  return objective.problems(loss_config, LOSSES)


def default_sections() -> dict[str, dict]:
  """`{name: {option: default, ..., "weight": 1.0}}` of every loss: the `config.loss` sections."""
  return {name: {**loss.defaults(), "weight": objective.WEIGHT.default} for name, loss in LOSSES.items()}


def get_loss(name: str) -> Loss:
  """The loss called `name` in `LOSSES`.

  Raises:
    ValueError: for an unknown name, listing the known ones.
  """
  if name not in LOSSES:
    raise ValueError(f"Unknown loss {name!r}; use one of {sorted(LOSSES)}.")
  return LOSSES[name]


__all__ = [
  "LOSSES",
  "TRIPLET_MINING",
  "Loss",
  "LossContext",
  "Option",
  "adaptive_margins",
  "category_quadruplet_loss",
  "config_problems",
  "contrastive_loss",
  "default_sections",
  "get_loss",
  "objective_from_config",
  "pairwise_distances",
  "quadruplet_loss",
  "triplet_loss",
]
