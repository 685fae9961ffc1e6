"""FashionNet's landmark loss: landmark location regression and visibility classification.

  location:   sum over visible landmarks of |p - t|^2 / number of visible landmarks     p = outputs["landmark_locations"]
  visibility: mean softmax cross-entropy over the present landmark slots               z = outputs["visibility_logits"]
  landmarks = location + visibility_weight * visibility

Landmarks are the In-shop builders' `landmarks` `[B, L, 3]` rows `(visibility, x, y)` (x, y fractions of the
image; visibility 0 visible, 1 occluded, 2 truncated, -1 no landmark in this slot) with `has_landmarks` `[B]`.
Only visible landmarks have a location target (an occluded one's position is a guess of the annotator, a
truncated one lies outside the image); every present slot has a visibility target. Rows with
`has_landmarks` False count for nothing. With V visibility states, code c is class min(c, V - 1): V = 2 makes
occluded and truncated one "invisible" class.

References:
  Z. Liu, P. Luo, S. Qiu, X. Wang, X. Tang. DeepFashion: Powering Robust Clothes Recognition and Retrieval with
    Rich Annotations. CVPR 2016 (FashionNet's landmark location and visibility losses).
"""

import jax
import jax.numpy as jnp

from jaxret.losses.registry import Loss
from jaxret.losses.registry import Option

VISIBLE = 0  # DeepFashion's code of a visible landmark (`data_prep.inshop_features.VISIBLE`).


def landmark_losses(locations: jax.typing.ArrayLike, visibility_logits: jax.typing.ArrayLike,
                    landmarks: jax.typing.ArrayLike, has_landmarks: jax.typing.ArrayLike
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The location and visibility terms of a batch, and the visibility accuracy.

  Args:
    locations: `[B, L, 2]` predicted `(x, y)` fractions of the image.
    visibility_logits: `[B, L, V]` logits of the V visibility states.
    landmarks: `[B, L, 3]` ground truth rows `(visibility, x, y)`; visibility < 0 is an empty slot.
    has_landmarks: `[B]` bool; False rows are ignored.

  Returns:
    `(location, visibility, accuracy)` scalars: the mean squared distance of the visible landmarks, the mean
    cross-entropy of the present slots, and the fraction of present slots whose argmax is right (each 0 when
    nothing counts).

  Raises:
    ValueError: for shapes that do not fit together.
  """
  locations = jnp.asarray(locations)
  visibility_logits = jnp.asarray(visibility_logits)
  landmarks = jnp.asarray(landmarks)
  dtype = jnp.promote_types(jnp.promote_types(locations.dtype, visibility_logits.dtype), jnp.float32)
  if locations.ndim != 3 or locations.shape[-1] != 2:
    raise ValueError(f"landmark locations must be [batch, landmarks, 2]; got shape {locations.shape}.")
  if landmarks.shape != locations.shape[:2] + (3,):
    raise ValueError(f"landmarks must be [batch, landmarks, 3] = {locations.shape[:2] + (3,)} rows (visibility, x, "
                     f"y); got shape {landmarks.shape}. Does the model predict the dataset's number of landmarks?")
  if visibility_logits.ndim != 3 or visibility_logits.shape[:2] != locations.shape[:2]:
    raise ValueError(f"visibility_logits must be [batch, landmarks, states] with [batch, landmarks] = "
                     f"{locations.shape[:2]}; got shape {visibility_logits.shape}.")
  annotated = jnp.asarray(has_landmarks, bool)[:, None]
  code = jnp.round(landmarks[..., 0]).astype(jnp.int32)
  present = annotated & (code >= 0)
  visible = annotated & (code == VISIBLE)

  squared = jnp.sum(jnp.square(locations.astype(dtype) - landmarks[..., 1:].astype(dtype)), axis=-1)
  location = jnp.sum(jnp.where(visible, squared, 0.0)) / jnp.maximum(jnp.sum(visible), 1).astype(dtype)

  num_states = visibility_logits.shape[-1]
  target = jnp.clip(code, 0, num_states - 1)
  log_probs = jax.nn.log_softmax(visibility_logits.astype(dtype), axis=-1)
  cross_entropy = -jnp.take_along_axis(log_probs, target[..., None], axis=-1)[..., 0]
  count = jnp.maximum(jnp.sum(present), 1).astype(dtype)
  visibility = jnp.sum(jnp.where(present, cross_entropy, 0.0)) / count
  correct = jnp.argmax(visibility_logits, axis=-1) == target
  accuracy = jnp.sum(present & correct).astype(dtype) / count
  return location, visibility, accuracy


def _apply(params, outputs, batch, *, visibility_weight):
  del params
  for key in ("landmark_locations", "visibility_logits"):
    if key not in outputs:
      raise ValueError(f"The landmarks loss reads outputs[{key!r}], which this model does not produce; use a "
                       "model with a landmark branch (config.model.name='fashionnet').")
  location, visibility, accuracy = landmark_losses(outputs["landmark_locations"], outputs["visibility_logits"],
                                                   batch["landmarks"], batch["has_landmarks"])
  return location + visibility_weight * visibility, {"location": location, "visibility": visibility,
                                                     "visibility_accuracy": accuracy}


LOSS = Loss(
    name="landmarks",
    apply=_apply,
    options={"visibility_weight": Option(1.0, "Weight of the visibility cross-entropy beside the location term.",
                                         minimum=0.0)},
    batch_features=("landmarks", "has_landmarks"),
    reference="Liu et al., DeepFashion (FashionNet), CVPR 2016.",
)
