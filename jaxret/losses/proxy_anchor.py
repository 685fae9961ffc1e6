"""Proxy-Anchor loss (Kim et al., CVPR 2020): one learnable proxy per training class, owned by the loss.

With s(x, p) the cosine similarity of an embedding and a proxy, P+ the proxies that have at least one
embedding of their class in the batch, X_p+ the batch's embeddings of proxy p's class and X_p- the others:

  loss = 1/|P+| sum_{p in P+} log(1 + sum_{x in X_p+} exp(-alpha (s(x, p) - delta)))
       + 1/|P|  sum_{p in P}  log(1 + sum_{x in X_p-} exp( alpha (s(x, p) + delta))).

The proxies are `params["proxies"]` `[num_classes, D]`, indexed by `batch["class_index"]`; `init` draws
them kaiming-normal with fan_out as the official code (std sqrt(2 / num_classes)), and the official code
trains them with 100 times the model's learning rate (`lr_multiplier`).
"""

import jax
import jax.numpy as jnp

from jaxret import reductions
from jaxret.losses.inputs import check_labels
from jaxret.losses.inputs import cosine_similarities
from jaxret.losses.inputs import float_embeddings
from jaxret.losses.inputs import l2_normalize
from jaxret.losses.registry import Loss
from jaxret.losses.registry import LossContext
from jaxret.losses.registry import Option


def init_proxies(key: jax.Array, num_classes: int, dim: int) -> jax.Array:
  """`[num_classes, dim]` proxies ~ N(0, 2 / num_classes): torch's kaiming_normal_(mode="fan_out").

  For a `[num_classes, dim]` weight torch's fan_out is num_classes and the default gain sqrt(2).
  """
  return jax.random.normal(key, (num_classes, dim), jnp.float32) * jnp.sqrt(2.0 / num_classes)


def proxy_anchor_loss(embeddings: jax.typing.ArrayLike,
                      class_index: jax.typing.ArrayLike,
                      proxies: jax.typing.ArrayLike,
                      *,
                      alpha: jax.typing.ArrayLike = 32.0,
                      delta: jax.typing.ArrayLike = 0.1) -> jax.Array:
  """Proxy-Anchor loss (see the module docstring for the equation).

  Args:
    embeddings: `[B, D]` embeddings (L2-normalised here).
    class_index: `[B]` int class of each embedding, in `[0, num_classes)`. Out-of-range values cannot be
      checked under jit: they match no proxy (the embedding only acts as a negative).
    proxies: `[num_classes, D]` proxies (L2-normalised here).
    alpha: scale (32).
    delta: margin (0.1).

  Returns:
    Scalar loss. The positive term is 0 when no proxy has a positive (never in a real batch).

  References:
    Kim, Kim, Cho & Kwak, "Proxy Anchor Loss for Deep Metric Learning", CVPR 2020.
    Code: https://github.com/tjddus9597/Proxy-Anchor-CVPR2020 (code/losses.py).
  """
  x = l2_normalize(float_embeddings(embeddings))
  class_index = check_labels(class_index, x.shape[0], "class_index")
  proxies = jnp.asarray(proxies)
  if proxies.ndim != 2 or proxies.shape[1] != x.shape[1]:
    raise ValueError(f"proxies must be [num_classes, {x.shape[1]}] to match the embeddings; got "
                     f"{proxies.shape}.")
  p = l2_normalize(proxies.astype(x.dtype))
  cos = cosine_similarities(x, p)  # [B, C]
  positive = class_index[:, None] == jnp.arange(p.shape[0])[None, :]
  positive_per_proxy = reductions.masked_log1p_sum_exp(-alpha * (cos - delta), positive, axis=0)
  negative_per_proxy = reductions.masked_log1p_sum_exp(alpha * (cos + delta), ~positive, axis=0)
  with_positives = jnp.any(positive, axis=0)
  positive_term = reductions.masked_mean(positive_per_proxy, with_positives)
  negative_term = jnp.mean(negative_per_proxy)
  return (positive_term + negative_term).astype(x.dtype)


def _init(key: jax.Array, context: LossContext, **options) -> dict[str, jax.Array]:
  del options
  return {"proxies": init_proxies(key, context.num_classes, context.embedding_dim)}


def _apply(params, outputs, batch, *, alpha, delta):
  return proxy_anchor_loss(outputs["embedding"], batch["class_index"], params["proxies"], alpha=alpha,
                           delta=delta)


LOSS = Loss(
    name="proxy_anchor",
    apply=_apply,
    init=_init,
    options={
        "alpha": Option(32.0, "Scale (32).", minimum=0.0, exclusive_minimum=True),
        "delta": Option(0.1, "Margin (0.1).", minimum=0.0),
        "lr_multiplier": Option(100.0, "Learning rate of the proxies relative to the model's (official: 100).",
                                minimum=0.0),
    },
    reference="Kim, Kim, Cho & Kwak, CVPR 2020; tjddus9597/Proxy-Anchor-CVPR2020")
