"""The training objective of a config: one loss, or a weighted sum of several (`config.loss.name = "a+b"`).

`config.loss.name` names the terms joined by "+" (e.g. `"triplet+capsule_margin"`); each term reads its
options from its own section `config.loss.<name>`, whose `weight` (default 1) multiplies it in the sum.
The trainer calls `Objective` exactly like one `Loss`, with the parameters of all terms in one dict by name.
"""

from collections.abc import Mapping
import dataclasses
from typing import Any

import jax

from jaxret.losses.registry import LR_MULTIPLIER
from jaxret.losses.registry import REBUILD_EVERY
from jaxret.losses.registry import Loss
from jaxret.losses.registry import LossContext
from jaxret.losses.registry import Option

# Every loss section has this besides the loss's own options.
WEIGHT = Option(1.0, "Weight of this loss in the sum `config.loss.name = 'a+b'`.", minimum=0.0)


def term_names(name: str) -> list[str]:
  """The loss names in `config.loss.name` ("triplet" or "triplet+capsule_margin")."""
  return [part.strip() for part in name.split("+")]


def problems(loss_config: Mapping[str, Any], losses: Mapping[str, Loss]) -> list[str]:
  """Everything wrong with `config.loss` for the terms it names, one line each naming the field."""
  found = []
  names = term_names(loss_config["name"])
  unknown = [n for n in names if n not in losses]
  if unknown or len(set(names)) != len(names):
    found.append(f"config.loss.name={loss_config['name']!r}: use one of {sorted(losses)}, or several "
                 "distinct ones joined by '+' (e.g. 'triplet+capsule_margin').")
  for name in names:
    if name in losses:
      section = dict(loss_config.get(name) or {})
      weight = section.pop("weight", WEIGHT.default)
      problem = WEIGHT.problem(weight)
      if problem:
        found.append(f"config.loss.{name}.weight {problem}.")
      found.extend(losses[name].problems(section))
  return found


@dataclasses.dataclass(frozen=True)
class Term:
  loss: Loss
  options: dict[str, Any]
  weight: float


@dataclasses.dataclass(frozen=True)
class Objective:
  """The weighted sum of the configured losses, called like one `Loss` (see `jaxret.losses.registry`)."""
  terms: dict[str, Term]

  @classmethod
  def from_config(cls, loss_config: Mapping[str, Any], losses: Mapping[str, Loss]) -> "Objective":
    found = problems(loss_config, losses)
    if found:
      raise ValueError("\n".join(found))
    terms = {}
    for name in term_names(loss_config["name"]):
      section = dict(loss_config.get(name) or {})
      weight = float(section.pop("weight", WEIGHT.default))
      terms[name] = Term(losses[name], losses[name].options_from(section), weight)
    return cls(terms)

  def init_params(self, key: jax.Array, context: LossContext) -> dict[str, Any]:
    """`{term name: its parameters}` (an empty dict for terms without parameters)."""
    return {name: term.loss.init_params(jax.random.fold_in(key, index), context, term.options)
            for index, (name, term) in enumerate(self.terms.items())}

  def batch_features(self) -> tuple[str, ...]:
    """The dataset features the terms read from the batch (`Loss.batch_features`), each once, in order."""
    return tuple(dict.fromkeys(f for term in self.terms.values() for f in term.loss.batch_features))

  def rebuild_intervals(self, steps_per_epoch: int) -> dict[str, int]:
    """`{term name: steps between rebuilds of its parameters}` for the terms whose loss has `rebuild`."""
    return {name: int(term.options.get(REBUILD_EVERY) or 0) or max(1, steps_per_epoch)
            for name, term in self.terms.items() if term.loss.rebuild is not None}

  def lr_multipliers(self) -> dict[str, float]:
    """`{term name: learning-rate multiplier of its parameters}` (1 unless the loss declares one)."""
    return {name: float(term.options.get(LR_MULTIPLIER, 1.0)) for name, term in self.terms.items()}

  def __call__(self, params: Mapping[str, Any], outputs: Mapping[str, jax.Array],
               batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`(weighted sum, metrics)`; with several terms the metrics hold each as `loss/<name>`."""
    total, logged = 0.0, {}
    for name, term in self.terms.items():
      value, extra = term.loss(params.get(name, {}), outputs, batch, term.options)
      total = total + term.weight * value
      if len(self.terms) > 1:
        logged[f"loss/{name}"] = value
      logged.update({f"{name}/{key}": v for key, v in extra.items()})
    return total, logged
