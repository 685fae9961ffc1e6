"""Capsule margin loss (Sabour et al. 2017) on the class-capsule lengths against the product category.

An auxiliary term for the capsule models: it makes the longest class capsule the product's category, which
is what the `"predicted"` embedding mode relies on. With |v_k| the length of class capsule k and T_k = 1
for the true category:

  loss = mean over the batch of sum_k T_k [m+ - |v_k|]+^2 + lambda (1 - T_k) [|v_k| - m-]+^2.
"""

import jax
import jax.numpy as jnp

from jaxret.losses.inputs import check_labels
from jaxret.losses.inputs import hinge
from jaxret.losses.registry import Loss
from jaxret.losses.registry import Option


def capsule_margin_loss(capsule_lengths: jax.typing.ArrayLike,
                        labels: jax.typing.ArrayLike,
                        *,
                        positive_margin: jax.typing.ArrayLike = 0.9,
                        negative_margin: jax.typing.ArrayLike = 0.1,
                        negative_weight: jax.typing.ArrayLike = 0.5) -> jax.Array:
  """Margin loss of Sabour et al. (Eq. 4), summed over classes and averaged over the batch.

  Args:
    capsule_lengths: `[B, num_classes]` class-capsule lengths (in [0, 1) after squashing).
    labels: `[B]` int true class, in `[0, num_classes)`; out-of-range values cannot be checked under jit
      and count as "no class present".
    positive_margin: m+, the length the true class's capsule should reach (0.9).
    negative_margin: m-, the length the other capsules should stay under (0.1).
    negative_weight: lambda, the down-weighting of the absent classes (0.5).

  Returns:
    Scalar loss (float32 for float32 or bfloat16 lengths).

  References:
    Sabour, Frosst & Hinton, "Dynamic Routing Between Capsules", NeurIPS 2017, Eq. 4.
  """
  lengths = jnp.asarray(capsule_lengths)
  if lengths.ndim != 2:
    raise ValueError(f"capsule_lengths must be [batch_size, num_classes]; got shape {lengths.shape}.")
  lengths = lengths.astype(jnp.promote_types(lengths.dtype, jnp.float32))
  labels = check_labels(labels, lengths.shape[0], "labels")
  present = labels[:, None] == jnp.arange(lengths.shape[1])[None, :]
  per_class = jnp.where(present, jnp.square(hinge(positive_margin - lengths)),
                        negative_weight * jnp.square(hinge(lengths - negative_margin)))
  return jnp.mean(jnp.sum(per_class, axis=1)).astype(lengths.dtype)


def _apply(params, outputs, batch, **options):
  del params
  if "capsule_lengths" not in outputs:
    raise ValueError("The capsule_margin loss reads outputs['capsule_lengths'] [batch, num_classes], which "
                     "only the capsule models return; use it with a capsule model.")
  return capsule_margin_loss(outputs["capsule_lengths"], batch["category"], **options)


LOSS = Loss(
    name="capsule_margin",
    apply=_apply,
    options={
        "positive_margin": Option(0.9, "m+: length the true category's capsule should reach (0.9).",
                                  minimum=0.0),
        "negative_margin": Option(0.1, "m-: length the other capsules should stay under (0.1).", minimum=0.0),
        "negative_weight": Option(0.5, "lambda: weight of the absent-class term (0.5).", minimum=0.0),
    },
    reference="Sabour, Frosst & Hinton, NeurIPS 2017")
