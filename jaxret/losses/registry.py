"""The one interface every loss has: how the trainer calls it, what it owns, which options it accepts.

A loss is a `Loss`: a pure function `apply(params, outputs, batch, **options)` plus the declaration of its
options (default, allowed values) and, for losses that own parameters (e.g. the proxies of Proxy-Anchor),
an `init` that makes them. The trainer knows nothing else about any loss:

  loss = losses.get_loss(config.loss.name)
  options = loss.options_from(config.loss[config.loss.name])          # checked, defaults filled in
  params = loss.init_params(key, context, options)                    # {} for most losses
  value, metrics = loss(params, outputs, batch, options)              # inside the jitted step

* `outputs` is what the model returned: `{"embedding": [B, D], **aux}` (aux holds e.g. class capsules,
  pooled features or per-level embeddings, so that a loss may read more than one embedding).
* `batch` holds the batch's labels: `item_id` `[B]` (product), `category` `[B]`, `class_index` `[B]`
  (the product's index among the training split's products, in `[0, context.num_classes)`), and the dataset
  features the loss declares in `batch_features` (e.g. `attributes` `[B, A]` with `has_attributes` `[B]`).
* `params` are the loss's own parameters: they live in the train state beside the model's, are updated by
  the same optimizer (with `config.optim.loss_lr_multiplier`) and are saved in every checkpoint.

A new loss is one module with its math as pure functions and a `Loss(...)` value, plus one line in
`jaxret/losses/__init__.py`.
"""

from collections.abc import Callable, Mapping
import dataclasses
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class Option:
  """One option of a loss: its default, and what values are allowed.

  Attributes:
    default: the value used when the config does not set one; its type is the option's type (a bool option
      takes only bools, a float option any real number, an int option only integers, a str option strings).
    doc: one line for the docs and the config.
    choices: the allowed values, or None for any value of the type.
    minimum: for numbers, the smallest allowed value (inclusive), or None.
    exclusive_minimum: whether `minimum` itself is refused (e.g. a margin > 0).
  """
  default: Any
  doc: str
  choices: tuple | None = None
  minimum: float | None = None
  exclusive_minimum: bool = False

  def problem(self, value: Any) -> str | None:
    """Why `value` is not allowed, or None when it is."""
    kind = type(self.default)
    if kind is bool:
      if not isinstance(value, bool):
        return f"must be True or False, not {value!r}"
    elif kind in (int, float):
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"must be a number, not {value!r}"
      if kind is int and not float(value).is_integer():
        return f"must be an integer, not {value!r}"
      if self.minimum is not None and (value < self.minimum or (self.exclusive_minimum and value == self.minimum)):
        return f"must be {'>' if self.exclusive_minimum else '>='} {self.minimum}, not {value!r}"
    elif kind is str and not isinstance(value, str):
      return f"must be a string, not {value!r}"
    elif kind is tuple and not isinstance(value, (tuple, list)):
      return f"must be a tuple, not {value!r}"
    if self.choices is not None and value not in self.choices:
      return f"must be one of {list(self.choices)}, not {value!r}"
    return None


@dataclasses.dataclass(frozen=True)
class LossContext:
  """What the trainer knows about the run when it makes a loss's parameters.

  Attributes:
    num_classes: training products; `batch["class_index"]` is in `[0, num_classes)`.
    num_categories: category labels; `batch["category"]` is in `[0, num_categories)`.
    embedding_dim: D of `outputs["embedding"]`.
  """
  num_classes: int
  num_categories: int
  embedding_dim: int


# An option a loss with parameters may declare: their learning rate is the model's times it. The optimizer
# reads it (`jaxret.losses.objective`); `apply` and `init` never see it.
LR_MULTIPLIER = "lr_multiplier"
# An option a loss with `rebuild` declares: the steps between rebuilds of its parameters from the training
# split's embeddings (0: once per epoch of the sampler). The trainer reads it; `apply` and `init` never see it.
REBUILD_EVERY = "rebuild_every"
TRAINER_OPTIONS = (LR_MULTIPLIER, REBUILD_EVERY)


def _math_options(options: Mapping[str, Any]) -> dict[str, Any]:
  return {key: value for key, value in options.items() if key not in TRAINER_OPTIONS}


@dataclasses.dataclass(frozen=True)
class Loss:
  """A registered loss (see the module docstring for the calling convention).

  Attributes:
    name: the config name (`config.loss.name`, and the section `config.loss.<name>`).
    apply: `apply(params, outputs, batch, **options) -> scalar` or `(scalar, {name: scalar})`; the dict
      holds extra metrics to log (e.g. each term of a sum).
    options: the keyword options of `apply` (and `init`) with their defaults, plus `lr_multiplier` for a loss
      with parameters (read by the optimizer only).
    init: `init(key, context, **options) -> params pytree` for a loss that owns parameters; None otherwise.
    rebuild: `rebuild(embeddings [N, D], class_index [N], context, **options) -> params pytree` for a loss
      whose parameters are state computed from the whole training split (HTL's class tree), not learned:
      the trainer calls it every `rebuild_every` steps with the current model's embeddings of the training
      records, and puts the result in place of the parameters. None otherwise.
    batch_features: dataset features (TFDS names, e.g. "attributes", "has_attributes") that `apply` reads
      from `batch`; the trainer puts them in every batch and refuses a dataset without them.
    reference: the paper, for the docs.
  """
  name: str
  apply: Callable[..., Any]
  options: Mapping[str, Option]
  init: Callable[..., Any] | None = None
  rebuild: Callable[..., Any] | None = None
  batch_features: tuple[str, ...] = ()
  reference: str = ""

  def defaults(self) -> dict[str, Any]:
    return {key: option.default for key, option in self.options.items()}

  def problems(self, options: Mapping[str, Any], field: str = "") -> list[str]:
    """What is wrong with `options` (unknown names, bad values), one line each naming `field.<option>`."""
    field = field or f"config.loss.{self.name}"
    found = []
    for key in options:
      if key not in self.options:
        found.append(f"{field}.{key} is not an option of the {self.name} loss; its options are "
                     f"{sorted(self.options)}.")
    for key, option in self.options.items():
      if key in options:
        problem = option.problem(options[key])
        if problem:
          found.append(f"{field}.{key} {problem}.")
    return found

  def options_from(self, options: Mapping[str, Any]) -> dict[str, Any]:
    """The defaults updated by `options`; raises ValueError listing every problem."""
    found = self.problems(options)
    if found:
      raise ValueError("\n".join(found))
    return {**self.defaults(), **{key: options[key] for key in options}}

  def init_params(self, key: jax.Array, context: LossContext, options: Mapping[str, Any]) -> Any:
    """The loss's own parameters (a pytree; `{}` when it has none)."""
    return {} if self.init is None else self.init(key, context, **_math_options(options))

  def rebuild_params(self, embeddings: jax.Array, class_index: jax.Array, context: LossContext,
                     options: Mapping[str, Any]) -> Any:
    """New parameters from `[N, D]` embeddings of the training records and their `[N]` class indices."""
    if self.rebuild is None:
      raise ValueError(f"The {self.name} loss has no parameters to rebuild.")
    return self.rebuild(embeddings, class_index, context, **_math_options(options))

  def __call__(self, params: Any, outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array],
               options: Mapping[str, Any]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`(scalar loss, {metric name: scalar})` of a batch."""
    result = self.apply(params, outputs, batch, **_math_options(options))
    if isinstance(result, tuple):
      return result
    return result, {}
