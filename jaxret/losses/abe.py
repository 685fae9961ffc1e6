"""ABE-M's loss (Kim et al., ECCV 2018): a contrastive loss per learner plus a divergence loss between them.

No official code exists; this is our reading of the paper, with lambda_div = 1 and m_div = 1 unconfirmed.
The model (M attention branches over shared early features, one learner each) returns the concatenation of
the M learner embeddings, each d / M wide; `outputs["embedding"]` is read as M equal consecutive blocks,
each L2-normalised here. With f_m(x_i) learner m's embedding of image i:

  loss = sum_m contrastive(f_m) + lambda_div * sum_i sum_{m != n} [m_div - |f_m(x_i) - f_n(x_i)|^2]+,

where contrastive(f) is `jaxret.losses.contrastive_loss` (over all pairs i < j: d^2 for a positive pair,
[margin - d]+^2 for a negative one; mean over pairs) and the divergence sums over the images of the batch and
the ordered learner pairs (`divergence_reduction="mean"` divides it by the batch size instead).
"""

import itertools

import jax
import jax.numpy as jnp

from jaxret.losses.contrastive import contrastive_loss
from jaxret.losses.inputs import check_labels
from jaxret.losses.inputs import embedding_slices
from jaxret.losses.inputs import float_embeddings
from jaxret.losses.inputs import hinge
from jaxret.losses.inputs import l2_normalize
from jaxret.losses.registry import Loss
from jaxret.losses.registry import Option

DIVERGENCE_REDUCTIONS = ("sum", "mean")


def learner_divergence(learners: list[jax.Array], *, margin: float = 1.0, reduction: str = "sum") -> jax.Array:
  """ABE's divergence loss: sum over images and ordered learner pairs m != n of [margin - |f_m - f_n|^2]+.

  Args:
    learners: M blocks `[B, d]`, learner m's embeddings of the batch.
    margin: m_div, the squared distance two learners' embeddings of one image should keep (1).
    reduction: "sum" over the images (the paper's equation) or "mean" over them.

  Returns:
    Scalar; 0 for a single learner.

  References:
    Kim, Goyal, Chawla, Lee & Kwon, "Attention-based Ensemble for Deep Metric Learning", ECCV 2018.
  """
  if reduction not in DIVERGENCE_REDUCTIONS:
    raise ValueError(f"Unknown divergence reduction {reduction!r}; use one of {DIVERGENCE_REDUCTIONS}.")
  per_image = jnp.zeros((learners[0].shape[0],), learners[0].dtype)
  for m, n in itertools.combinations(range(len(learners)), 2):
    squared = jnp.sum(jnp.square(learners[m] - learners[n]), axis=1)
    per_image += 2.0 * hinge(margin - squared)  # (m, n) and (n, m)
  return jnp.sum(per_image) if reduction == "sum" else jnp.mean(per_image)


def abe_loss(embeddings: jax.typing.ArrayLike,
             labels: jax.typing.ArrayLike,
             *,
             num_learners: int = 8,
             margin: float = 1.0,
             lambda_div: float = 1.0,
             divergence_margin: float = 1.0,
             divergence_reduction: str = "sum") -> tuple[jax.Array, dict[str, jax.Array]]:
  """ABE-M's loss on a concatenated `[B, M * d]` embedding (module docstring).

  Args:
    embeddings: `[B, D]`, the M learners' embeddings side by side (each block L2-normalised here).
    labels: `[B]` integer labels.
    num_learners: M (ABE-8: 8); must divide D.
    margin: contrastive margin of each learner's loss (Euclidean distance; our choice, 1).
    lambda_div: weight of the divergence loss (1, unconfirmed).
    divergence_margin: m_div (1, unconfirmed).
    divergence_reduction: "sum" or "mean" over the batch's images.

  Returns:
    `(loss, {"contrastive": ..., "divergence": ...})`.
  """
  x = float_embeddings(embeddings)
  labels = check_labels(labels, x.shape[0], "labels")
  if x.shape[1] % num_learners:
    raise ValueError(f"num_learners={num_learners} must divide the embedding size {x.shape[1]} (each "
                     "learner has an equal block).")
  size = x.shape[1] // num_learners
  learners = [l2_normalize(block) for block in embedding_slices(x, (size,) * num_learners, "num_learners")]
  metric = sum(contrastive_loss(block, labels, margin=margin) for block in learners)
  divergence = learner_divergence(learners, margin=divergence_margin, reduction=divergence_reduction)
  return metric + lambda_div * divergence, {"contrastive": metric, "divergence": divergence}


def _apply(params, outputs, batch, **options):
  del params
  return abe_loss(outputs["embedding"], batch["item_id"], **options)


LOSS = Loss(
    name="abe",
    apply=_apply,
    options={
        "num_learners": Option(8, "M, the number of learners (ABE-8); must divide the embedding size.",
                               minimum=1),
        "margin": Option(1.0, "Contrastive margin of each learner (our choice: 1).", minimum=0.0,
                         exclusive_minimum=True),
        "lambda_div": Option(1.0, "Weight of the divergence loss (1, unconfirmed).", minimum=0.0),
        "divergence_margin": Option(1.0, "m_div on the squared distance between learners (1, unconfirmed).",
                                    minimum=0.0),
        "divergence_reduction": Option("sum", "Divergence over the batch: sum (paper's equation) or mean.",
                                       choices=DIVERGENCE_REDUCTIONS),
    },
    reference="Kim, Goyal, Chawla, Lee & Kwon, ECCV 2018 (no official code; our reading)")
