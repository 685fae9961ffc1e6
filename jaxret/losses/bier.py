"""BIER (boosted independent embeddings) and A-BIER (with adversarial decorrelation), as mop/bier trains them.

The embedding `[B, D]` is read as consecutive learner blocks of `learner_sizes` (default 96, 160, 256), each
L2-normalised here (x / max(|x|, 1e-5)). With S^(k) the cosine similarities of learner k, y_ij = 1 for a
pair with the same label (including i = j), m_ij = 1 for same-label pairs and -C otherwise:

  W_ij  = [i != j] (y_ij / #{same-label ordered pairs, i = j included} + (1 - y_ij) / #{other-label pairs}),
  l_ij^(k) = log(1 + exp(-alpha (S_ij^(k) - beta) m_ij))                       (binomial deviance)
  loss = 1/M sum_k sum_ij w_ij^(k) W_ij l_ij^(k),

with boosting weights w^(1) = 1 and, after learner k, under stop-gradient,

  a_ij <- a_ij + eta alpha (S_ij^(k) - beta) m_ij        (a starts at 0.5),
  w_ij^(k+1) = sigmoid(-a_ij) * (1 for same-label pairs, 2 otherwise)

(the negative gradient of log(1 + exp(-a)), the "simpler variant" of the released `build_train`).

A-BIER adds lambda_div times, for every learner pair i < j, a regressor from learner j to learner i (two
dense layers, 512 hidden, ReLU) trained to maximise mean((f_i * g(f_j))^2) while a gradient-reversal layer
makes the embedding minimise it, plus weight penalties: lambda_w mean((|row of W|^2 - 1)^2) on every
regressor kernel and on the embedding kernel (per learner), and lambda_w [|b|^2 - 1]+ on regressor biases.
As in the released code, f_i there are the learner outputs of the embedding layer applied to the backbone
features under stop-gradient and without bias (`outputs["bier_regularizer"]`), not the normalised
embedding, so the adversarial term trains the embedding layer only.
"""

import itertools

import jax
import jax.numpy as jnp

from jaxret.losses.inputs import check_labels
from jaxret.losses.inputs import cosine_similarities
from jaxret.losses.inputs import embedding_slices
from jaxret.losses.inputs import float_embeddings
from jaxret.losses.inputs import hinge
from jaxret.losses.inputs import l2_normalize
from jaxret.losses.registry import Loss
from jaxret.losses.registry import LossContext
from jaxret.losses.registry import Option

# The released code normalises every learner block by max(|x|, 1e-5).
NORM_EPS = 1e-5


def boosted_binomial_deviance(learners: list[jax.Array], labels: jax.typing.ArrayLike, *,
                              alpha: float = 2.0, beta: float = 0.5, negative_cost: float = 25.0,
                              shrinkage: float = 0.06, initial_activation: float = 0.5,
                              negative_weight: float = 2.0) -> tuple[jax.Array, list[jax.Array]]:
  """BIER's loss: binomial deviance per learner with online-boosted pair weights (module docstring).

  Args:
    learners: the M learner blocks, each `[B, d_k]` and already L2-normalised.
    labels: `[B]` integer labels.
    alpha, beta: binomial deviance scale (2) and similarity offset (0.5).
    negative_cost: C, the cost of the other-label pairs (25).
    shrinkage: eta, the boosting shrinkage (0.06).
    initial_activation: the ensemble's activation before the first learner (0.5).
    negative_weight: factor of the other-label pairs' boosting weights (2).

  Returns:
    `(loss, learner_losses)`: the scalar loss and each learner's share of it (they sum to the loss).

  References:
    Opitz, Waltner, Possegger & Bischof, "BIER - Boosting Independent Embeddings Robustly", ICCV 2017;
    "Deep Metric Learning with BIER: Boosting Independent Embeddings Robustly", TPAMI 2018.
    Code: https://github.com/mop/bier (train_bier.py, build_train).
  """
  batch_size = learners[0].shape[0]
  labels = check_labels(labels, batch_size, "labels")
  dtype = learners[0].dtype
  same = labels[:, None] == labels[None, :]
  # The released code counts the B diagonal pairs in the positive normaliser but gives them weight 0.
  pair_weight = jnp.where(same, 1.0 / jnp.maximum(jnp.sum(same), 1),
                          1.0 / jnp.maximum(jnp.sum(~same), 1)).astype(dtype)
  pair_weight = jnp.where(jnp.eye(batch_size, dtype=bool), 0.0, pair_weight)
  sign = jnp.where(same, 1.0, -negative_cost).astype(dtype)
  class_weight = jnp.where(same, 1.0, negative_weight).astype(dtype)
  boosting_weight = jnp.ones((batch_size, batch_size), dtype)
  activation = jnp.full((batch_size, batch_size), initial_activation, dtype)
  learner_losses = []
  for block in learners:
    margins = alpha * (cosine_similarities(block) - beta) * sign
    deviance = jax.nn.softplus(-margins)
    learner_losses.append(jnp.sum(deviance * boosting_weight * pair_weight) / len(learners))
    activation = activation + shrinkage * margins
    # d/da log(1 + exp(-a)) = -sigmoid(-a): the pairs the ensemble so far gets wrong weigh most.
    boosting_weight = jax.lax.stop_gradient(jax.nn.sigmoid(-activation) * class_weight)
  return sum(learner_losses), learner_losses


@jax.custom_vjp
def reverse_gradient(x: jax.Array) -> jax.Array:
  """Identity in the forward pass, gradient multiplied by -1 (the gradient-reversal layer of DANN)."""
  return x


def _reverse_gradient_fwd(x):
  return x, None


def _reverse_gradient_bwd(_, cotangent):
  return (-cotangent,)


reverse_gradient.defvjp(_reverse_gradient_fwd, _reverse_gradient_bwd)


def init_regressors(key: jax.Array, learner_sizes, hidden_size: int = 512,
                    num_layers: int = 2) -> dict[str, list[dict[str, jax.Array]]]:
  """A-BIER's regressors, one per learner pair i < j, from learner j to learner i.

  Each is `num_layers` dense layers (`hidden_size` units and ReLU between them), kernels Glorot-uniform
  and biases 0 (tf.slim's defaults, which the released code uses).

  Returns:
    `{"{i}_{j}": [{"kernel": [in, out], "bias": [out]}, ...]}`.
  """
  sizes = tuple(int(s) for s in learner_sizes)
  pairs = list(itertools.combinations(range(len(sizes)), 2))
  keys = jax.random.split(key, max(len(pairs), 1))
  glorot = jax.nn.initializers.glorot_uniform()
  regressors = {}
  for pair_key, (i, j) in zip(keys, pairs):
    widths = [sizes[j]] + [hidden_size] * (num_layers - 1) + [sizes[i]]
    layer_keys = jax.random.split(pair_key, num_layers)
    regressors[f"{i}_{j}"] = [{"kernel": glorot(k, (fan_in, fan_out), jnp.float32),
                               "bias": jnp.zeros((fan_out,), jnp.float32)}
                              for k, fan_in, fan_out in zip(layer_keys, widths[:-1], widths[1:])]
  return regressors


def unit_row_penalty(kernel: jax.Array) -> jax.Array:
  """mean over input units of (squared norm of the unit's outgoing weights - 1)^2, for an `[in, out]` kernel."""
  return jnp.mean(jnp.square(jnp.sum(jnp.square(kernel), axis=1) - 1.0))


def adversarial_decorrelation(regressors: dict[str, list[dict[str, jax.Array]]], blocks: list[jax.Array], *,
                              lambda_weight: float = 100.0) -> tuple[jax.Array, jax.Array]:
  """A-BIER's adversarial term over all learner pairs, before the factor lambda_div.

  For the pair i < j: -mean((f_i * g(f_j))^2) with both inputs behind `reverse_gradient` (the regressor g
  learns to predict f_i from f_j, the embedding learns to make that impossible), plus
  lambda_weight * (`unit_row_penalty` of each kernel of g + [|b|^2 - 1]+ of each bias).

  Args:
    regressors: from `init_regressors`.
    blocks: the learner blocks `[B, d_k]` the regressors see (unnormalised).
    lambda_weight: weight of the regressors' norm penalties.

  Returns:
    `(total, correlation)`: the whole term and its correlation part alone (for logging).
  """
  total = jnp.zeros((), blocks[0].dtype)
  correlation = jnp.zeros((), blocks[0].dtype)
  for i, j in itertools.combinations(range(len(blocks)), 2):
    layers = regressors[f"{i}_{j}"]
    target, hidden = reverse_gradient(blocks[i]), reverse_gradient(blocks[j])
    for index, layer in enumerate(layers):
      hidden = jnp.matmul(hidden, layer["kernel"], precision=jax.lax.Precision.HIGHEST) + layer["bias"]
      if index < len(layers) - 1:
        hidden = jax.nn.relu(hidden)
    pair_correlation = -jnp.mean(jnp.square(target * hidden))
    penalties = sum(unit_row_penalty(layer["kernel"]) + hinge(jnp.sum(jnp.square(layer["bias"])) - 1.0)
                    for layer in layers)
    correlation += pair_correlation
    total += pair_correlation + lambda_weight * penalties
  return total, correlation


def embedding_kernel_penalty(kernel: jax.typing.ArrayLike, learner_sizes) -> jax.Array:
  """Sum over learners of `unit_row_penalty` of the learner's columns of the `[F, D]` embedding kernel."""
  kernel = jnp.asarray(kernel)
  if kernel.ndim != 2:
    raise ValueError(f"The embedding kernel must be [features, embedding_dim]; got shape {kernel.shape}.")
  return sum(unit_row_penalty(block) for block in embedding_slices(kernel, learner_sizes,
                                                                    "config.loss.a_bier.learner_sizes"))


def bier_test_embedding(embedding: jax.typing.ArrayLike, learner_sizes) -> jax.Array:
  """The test-time BIER embedding: each learner block L2-normalised, scaled by size / total, concatenated.

  Args:
    embedding: `[B, D]` raw embedding (the concatenated learner outputs).
    learner_sizes: the learner sizes, summing to D.

  Returns:
    `[B, D]` float32 embedding (its norm is sqrt(sum_k (d_k / D)^2), not 1).
  """
  x = float_embeddings(embedding)
  blocks = embedding_slices(x, learner_sizes, "learner_sizes")
  return jnp.concatenate([l2_normalize(block, NORM_EPS) * (block.shape[1] / x.shape[1]) for block in blocks],
                         axis=1)


def bier_loss(embeddings: jax.typing.ArrayLike, labels: jax.typing.ArrayLike, *,
              learner_sizes=(96, 160, 256), **boosting_options) -> tuple[jax.Array, list[jax.Array]]:
  """BIER on a `[B, D]` embedding: split into learners, normalise, `boosted_binomial_deviance`."""
  x = float_embeddings(embeddings)
  blocks = [l2_normalize(block, NORM_EPS) for block in embedding_slices(x, learner_sizes, "learner_sizes")]
  return boosted_binomial_deviance(blocks, labels, **boosting_options)


_BOOSTING_OPTIONS = {
    "learner_sizes": Option((96, 160, 256), "Sizes of the learners, consecutive blocks of the embedding "
                            "(96, 160, 256); they must add up to the embedding size."),
    "alpha": Option(2.0, "Binomial deviance scale (2).", minimum=0.0, exclusive_minimum=True),
    "beta": Option(0.5, "Binomial deviance similarity offset (0.5)."),
    "negative_cost": Option(25.0, "C: cost of the other-label pairs (25).", minimum=0.0,
                            exclusive_minimum=True),
    "shrinkage": Option(0.06, "eta: boosting shrinkage (0.06).", minimum=0.0),
    "initial_activation": Option(0.5, "Ensemble activation before the first learner (0.5)."),
    "negative_weight": Option(2.0, "Factor of the other-label pairs' boosting weights (2).", minimum=0.0),
}


def _metrics(learner_losses):
  return {f"learner_{k}": value for k, value in enumerate(learner_losses)}


def _apply_bier(params, outputs, batch, **options):
  del params
  loss, learner_losses = bier_loss(outputs["embedding"], batch["item_id"], **options)
  return loss, _metrics(learner_losses)


def _regularizer_inputs(outputs):
  missing = [key for key in ("bier_regularizer", "embedding_kernel") if key not in outputs]
  if missing:
    raise ValueError(f"The a_bier loss reads outputs {missing}: the model's BIER head must also return "
                     "'bier_regularizer' [B, D], its embedding layer applied to the backbone features under "
                     "stop_gradient and without bias, and 'embedding_kernel' [F, D], that layer's kernel.")
  return outputs["bier_regularizer"], outputs["embedding_kernel"]


def _apply_a_bier(params, outputs, batch, *, lambda_div, lambda_weight, regressor_hidden_size,
                  regressor_layers, **options):
  del regressor_hidden_size, regressor_layers  # used by init
  regularizer, kernel = _regularizer_inputs(outputs)
  discriminative, learner_losses = bier_loss(outputs["embedding"], batch["item_id"], **options)
  regularizer = float_embeddings(regularizer, "outputs['bier_regularizer']")
  if regularizer.shape != float_embeddings(outputs["embedding"]).shape:
    raise ValueError(f"outputs['bier_regularizer'] must have the embedding's shape "
                     f"{outputs['embedding'].shape}; got {regularizer.shape}.")
  blocks = embedding_slices(regularizer, options["learner_sizes"], "config.loss.a_bier.learner_sizes")
  adversarial, correlation = adversarial_decorrelation(params["regressors"], blocks,
                                                       lambda_weight=lambda_weight)
  kernel_penalty = embedding_kernel_penalty(kernel, options["learner_sizes"])
  loss = discriminative + lambda_div * (adversarial + lambda_weight * kernel_penalty)
  return loss, {**_metrics(learner_losses), "discriminative": discriminative, "correlation": correlation,
                "kernel_penalty": kernel_penalty}


def _init_a_bier(key: jax.Array, context: LossContext, *, learner_sizes, regressor_hidden_size,
                 regressor_layers, **options):
  del options
  if sum(learner_sizes) != context.embedding_dim:
    raise ValueError(f"config.loss.a_bier.learner_sizes={tuple(learner_sizes)} adds up to "
                     f"{sum(learner_sizes)}, but the model's embedding has {context.embedding_dim} "
                     "dimensions; make them equal.")
  return {"regressors": init_regressors(key, learner_sizes, regressor_hidden_size, regressor_layers)}


BIER = Loss(
    name="bier",
    apply=_apply_bier,
    options=_BOOSTING_OPTIONS,
    reference="Opitz et al., ICCV 2017 / TPAMI 2018; mop/bier train_bier.py")

A_BIER = Loss(
    name="a_bier",
    apply=_apply_a_bier,
    init=_init_a_bier,
    options={
        **_BOOSTING_OPTIONS,
        "lambda_div": Option(5e-5, "Weight of the adversarial term (mop/bier run.sh: 5e-5).", minimum=0.0),
        "lambda_weight": Option(1e5, "Weight of the unit-norm penalties inside it (run.sh: 1e5; the "
                                "script's default: 100).", minimum=0.0),
        "regressor_hidden_size": Option(512, "Hidden units of each adversarial regressor (512).", minimum=1),
        "regressor_layers": Option(2, "Dense layers of each adversarial regressor (2).", minimum=1),
        "lr_multiplier": Option(1.0, "Learning rate of the regressors relative to the model's (released "
                                "code: 1, the backbone's rate).", minimum=0.0),
    },
    reference="Opitz et al., TPAMI 2018; mop/bier train_bier.py and run.sh")
