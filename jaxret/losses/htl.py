"""HTL, the hierarchical triplet loss (Ge et al., ECCV 2018): a class tree and a triplet loss whose margin
follows it. There is no official code; the equations are the paper's, the choices below are ours.

The tree (`build_tree`, run on the device from one pass of the current model over the training split):
  * features L2-normalised; class distance d(p, q) = mean over i in p, j in q of |r_i - r_j|^2
    (= 2 - 2 mu_p . mu_q with mu the mean normalised feature), class spread s_c = the same mean over the
    pairs i != j of class c, d0 = the mean of s_c over the classes with >= 2 samples;
  * L = 16 levels with merge thresholds d_l = d0 + l (4 - d0) / L (4 is the largest squared distance of
    unit vectors); level 0 has one node per class, and level l groups the nodes of level l - 1 into the
    connected components of "node distance < d_l", where the distance of two nodes is the mean squared
    distance between their samples (average linkage over samples, again 2 - 2 mu . mu'). The grouping
    within a level is transitive (single linkage on those distances); level L is the root.
  * d_H(p, q) = d_h with h the lowest level at which p and q share a node.

The loss, over all triplets (a, p, n) of the batch with labels `batch["class_index"]`:
  alpha_an = beta + d_H(y_a, y_n) - s_{y_a}       (constant for the gradient, from the last tree),
  loss = 1 / (2 Z) sum_{(a, p, n)} [ |x_a - x_p| - |x_a - x_n| + alpha_an ]+,
with Z the number of triplets, on L2-normalised embeddings. Before any tree is built (`init`'s
parameters: all thresholds and spreads 0) alpha = beta, a plain triplet loss, which is what the paper
trains the first epoch with.

The tree is the loss's `params` (a pytree of float arrays, saved with every checkpoint): it is state, not
learned; the loss stops its gradient and declares `lr_multiplier = 0`. The trainer replaces it with
`rebuild(...)` every N steps, and gives the anchor-neighbour sampler (`jaxret.samplers_htl`) the lists from
`nearest_classes(params, m - 1)`.
"""

import functools

import jax
import jax.numpy as jnp

from jaxret import miners
from jaxret import reductions
from jaxret.distances import pairwise_distances
from jaxret.losses.inputs import check_labels
from jaxret.losses.inputs import cosine_similarities
from jaxret.losses.inputs import float_embeddings
from jaxret.losses.inputs import l2_normalize
from jaxret.losses.registry import Loss
from jaxret.losses.registry import LossContext
from jaxret.losses.registry import Option
from jaxret.losses.triplet import batch_all_triplet_sums

# The largest squared distance between unit vectors: the paper's thresholds run from d0 up to it.
MAX_SQUARED_DISTANCE = 4.0
HTL_AVERAGES = ("all_triplets", "active_triplets")


def empty_tree(num_classes: int, embedding_dim: int, num_levels: int = 16) -> dict[str, jax.Array]:
  """The tree before the first rebuild: all thresholds and spreads 0, so the loss is a plain triplet loss.

  Returns:
    `{"node_of_class": [L + 1, C], "thresholds": [L + 1], "class_spread": [C], "class_means": [C, D],
    "class_counts": [C]}`, all float32 (node ids as floats, exact below 2^24, so that the whole pytree can
    sit among differentiated parameters).
  """
  node_of_class = jnp.zeros((num_levels + 1, num_classes), jnp.float32)
  return {
      "node_of_class": node_of_class.at[0].set(jnp.arange(num_classes, dtype=jnp.float32)),
      "thresholds": jnp.zeros((num_levels + 1,), jnp.float32),
      "class_spread": jnp.zeros((num_classes,), jnp.float32),
      "class_means": jnp.zeros((num_classes, embedding_dim), jnp.float32),
      "class_counts": jnp.zeros((num_classes,), jnp.float32),
  }


def connected_components(adjacency: jax.Array) -> jax.Array:
  """Component of every node of an undirected graph: the smallest node index in its component.

  Min-label propagation with pointer jumping in a `lax.while_loop`: O(C^2) per round, about log(C) rounds
  on chains; no Python loop over nodes.

  Args:
    adjacency: `[C, C]` symmetric booleans.

  Returns:
    `[C]` int32 labels.
  """
  num_nodes = adjacency.shape[0]
  labels = jnp.arange(num_nodes, dtype=jnp.int32)

  def step(state):
    labels, _ = state
    neighbour_min = jnp.min(jnp.where(adjacency, labels[None, :], num_nodes), axis=1)
    updated = jnp.minimum(labels, neighbour_min)
    updated = updated[updated]  # pointer jumping: labels stay within the component and shrink faster
    return updated, jnp.any(updated != labels)

  labels, _ = jax.lax.while_loop(lambda state: state[1], step, (labels, jnp.array(True)))
  return labels


@functools.partial(jax.jit, static_argnames=("num_classes", "num_levels"))
def build_tree(embeddings: jax.typing.ArrayLike, class_index: jax.typing.ArrayLike, *, num_classes: int,
               num_levels: int = 16) -> dict[str, jax.Array]:
  """HTL's class tree from features of the training split (module docstring), on the device.

  Args:
    embeddings: `[N, D]` features of training images (L2-normalised here; they must be non-zero).
    class_index: `[N]` int class of each, in `[0, num_classes)`.
    num_classes: C.
    num_levels: L (16).

  Returns:
    The loss's parameters, as `empty_tree`: `node_of_class[l, c]` is the node of class c at level l (the
    smallest class index in it; level 0 the class itself, level L the root 0), `thresholds[l]` = d_l,
    `class_spread` = s_c (0 for classes with fewer than 2 images), `class_means` the mean normalised
    feature and `class_counts` the number of images of each class. A class without images stays alone
    until the root.

  References:
    Ge, Huang, Dong & Scott, "Deep Metric Learning with Hierarchical Triplet Loss", ECCV 2018, Sec. 3.1.
  """
  x = l2_normalize(float_embeddings(embeddings).astype(jnp.float32))
  class_index = jnp.asarray(class_index)
  counts = jax.ops.segment_sum(jnp.ones_like(class_index, jnp.float32), class_index, num_classes)
  sums = jax.ops.segment_sum(x, class_index, num_classes)
  means = sums / jnp.maximum(counts, 1.0)[:, None]
  mean_norms = jnp.sum(means * means, axis=1)
  # Mean over pairs i != j of |r_i - r_j|^2 = n / (n - 1) * (2 - 2 |mu|^2) for unit r.
  spread = jnp.where(counts >= 2, counts / jnp.maximum(counts - 1.0, 1.0) * (2.0 - 2.0 * mean_norms), 0.0)
  spread = jnp.maximum(spread, 0.0)
  d0 = reductions.masked_mean(spread, counts >= 2)
  thresholds = d0 + jnp.arange(num_levels + 1, dtype=jnp.float32) * (MAX_SQUARED_DISTANCE - d0) / num_levels

  node = jnp.arange(num_classes, dtype=jnp.int32)
  levels = [node]
  # One grouping per level; the levels are few (16) and each is a fixed-shape [C, C] computation.
  for level in range(1, num_levels):
    node_sums = jax.ops.segment_sum(sums, node, num_classes)
    node_counts = jax.ops.segment_sum(counts, node, num_classes)
    node_means = node_sums / jnp.maximum(node_counts, 1.0)[:, None]
    distances = 2.0 - 2.0 * cosine_similarities(node_means)
    present = node_counts > 0
    adjacency = (distances < thresholds[level]) & present[:, None] & present[None, :]
    node = connected_components(adjacency)[node]
    levels.append(node)
  levels.append(jnp.zeros_like(node))
  return {
      "node_of_class": jnp.stack(levels).astype(jnp.float32),
      "thresholds": thresholds,
      "class_spread": spread,
      "class_means": means,
      "class_counts": counts,
  }


def rebuild(train_embeddings: jax.typing.ArrayLike, train_class_index: jax.typing.ArrayLike,
            num_classes: int, num_levels: int = 16) -> dict[str, jax.Array]:
  """New HTL loss parameters from the current model's features of the training split.

  The trainer calls this every N steps with the embeddings of a pass over the train split (`[N, D]`, in
  any order, gathered on the devices) and their `[N]` class indices, and puts the result in place of the
  loss's parameters (same shapes as `init`'s when `num_levels` is the loss's option).
  """
  return build_tree(train_embeddings, train_class_index, num_classes=num_classes, num_levels=num_levels)


def merge_levels(node_of_class: jax.Array, labels: jax.Array) -> jax.Array:
  """`[B, B]` int32: the lowest level at which the classes of i and j share a node (0 for equal classes).

  Levels nest, so that level is the number of levels at which they differ; counted level by level, in
  O(B^2) memory.
  """
  nodes = node_of_class[:, labels]
  level = jnp.zeros((labels.shape[0], labels.shape[0]), jnp.int32)
  for row in nodes:
    level += (row[:, None] != row[None, :]).astype(jnp.int32)
  return level


def hierarchical_triplet_loss(embeddings: jax.typing.ArrayLike,
                              class_index: jax.typing.ArrayLike,
                              tree: dict[str, jax.Array],
                              *,
                              beta: float = 0.1,
                              squared: bool = False,
                              average: str = "all_triplets") -> jax.Array:
  """HTL over all triplets of the batch with the dynamic violate margin (module docstring).

  The margin depends on (anchor, negative) only, so each triplet's loss is
  [d_ap - (d_an - alpha_an)]+: batch-all triplets over "shifted" negative distances, summed through sorted
  negatives and prefix sums (`batch_all_triplet_sums`) in O(B^2) memory, no `[B, B, B]` tensor.

  Args:
    embeddings: `[B, D]` embeddings (L2-normalised here).
    class_index: `[B]` int training classes, in `[0, num_classes)` (out-of-range values are clamped by the
      gather and cannot be checked under jit).
    tree: the loss's parameters (`empty_tree` / `build_tree`); under stop-gradient here.
    beta: the base margin (0.1).
    squared: squared distances in the triplets (the paper: not squared).
    average: "all_triplets" (the paper: 1 / (2 Z), Z the number of triplets) or "active_triplets" (mean
      over the triplets with a positive loss, as batch-all triplet).

  Returns:
    Scalar loss; 0 when the batch has no triplet.

  References:
    Ge, Huang, Dong & Scott, "Deep Metric Learning with Hierarchical Triplet Loss", ECCV 2018, Eq. 4-5.
  """
  if average not in HTL_AVERAGES:
    raise ValueError(f"Unknown HTL average {average!r}; use one of {HTL_AVERAGES}.")
  x = l2_normalize(float_embeddings(embeddings))
  labels = check_labels(class_index, x.shape[0], "class_index")
  tree = jax.lax.stop_gradient(tree)
  distances = pairwise_distances(x, squared=squared)
  positive, negative = miners.label_masks(labels)
  levels = merge_levels(tree["node_of_class"], labels)
  merge_distance = tree["thresholds"].astype(x.dtype)[levels]
  margins = beta + merge_distance - tree["class_spread"].astype(x.dtype)[labels][:, None]
  total, active = batch_all_triplet_sums(distances, positive, negative, 0.0,
                                         negative_distances=distances - margins)
  if average == "active_triplets":
    return (total / jnp.maximum(active, 1.0)).astype(x.dtype)
  num_triplets = jnp.sum(jnp.sum(positive, axis=1) * jnp.sum(negative, axis=1)).astype(x.dtype)
  return (total / (2.0 * jnp.maximum(num_triplets, 1.0))).astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("num_neighbours",))
def nearest_classes(tree: dict[str, jax.Array], num_neighbours: int) -> jax.Array:
  """For every class, its `num_neighbours` nearest other classes in the tree, nearest first.

  Nearest means the lowest common level, then the smallest class distance d(p, q); classes without images
  come last. This is what the anchor-neighbour sampler needs (`jaxret.samplers_htl`).

  Args:
    tree: the HTL loss's parameters after a `rebuild`.
    num_neighbours: how many (e.g. m - 1, or more so that the sampler can skip classes already taken).

  Returns:
    `[C, num_neighbours]` int32 class indices.
  """
  num_classes = tree["class_counts"].shape[0]
  if not 0 < num_neighbours < num_classes:
    raise ValueError(f"num_neighbours must be in [1, {num_classes - 1}] (the other classes); got "
                     f"{num_neighbours}.")
  labels = jnp.arange(num_classes)
  levels = merge_levels(tree["node_of_class"].astype(jnp.int32), labels)
  means = tree["class_means"]
  distances = 2.0 - 2.0 * cosine_similarities(means)
  # Levels are integers and distances lie in [0, 4], so level * 8 + distance orders by level first.
  order_key = levels.astype(jnp.float32) * 8.0 + jnp.clip(distances, 0.0, 4.0)
  highest = jnp.finfo(jnp.float32).max
  order_key = jnp.where((tree["class_counts"] <= 0)[None, :], 0.5 * highest, order_key)
  order_key = jnp.where(jnp.eye(num_classes, dtype=bool), highest, order_key)
  _, neighbours = jax.lax.top_k(-order_key, num_neighbours)
  return neighbours.astype(jnp.int32)


def _init(key: jax.Array, context: LossContext, *, num_levels, **options):
  del key, options
  return empty_tree(context.num_classes, context.embedding_dim, num_levels)


def _rebuild(embeddings, class_index, context: LossContext, *, num_levels, **options):
  del options
  return rebuild(embeddings, class_index, context.num_classes, num_levels)


def _apply(params, outputs, batch, *, beta, squared, average, num_levels):
  del num_levels  # used by init and rebuild
  return hierarchical_triplet_loss(outputs["embedding"], batch["class_index"], params, beta=beta,
                                   squared=squared, average=average)


LOSS = Loss(
    name="htl",
    apply=_apply,
    init=_init,
    rebuild=_rebuild,
    options={
        "beta": Option(0.1, "Base of the violate margin beta + d_H(y_a, y_n) - s_{y_a} (0.1)."),
        "squared": Option(False, "Squared distances in the triplets (the paper: not squared)."),
        "average": Option("all_triplets", "Normaliser: all_triplets (paper, 1/(2Z)) or active_triplets.",
                          choices=HTL_AVERAGES),
        "num_levels": Option(16, "L, the levels of the class tree (16); rebuild() must use the same.",
                             minimum=1),
        "lr_multiplier": Option(0.0, "The tree is state, not learned: its parameters never get updates.",
                                choices=(0.0,)),
        "rebuild_every": Option(0, "Steps between rebuilds of the tree from the training split's embeddings "
                                "(0: once per epoch of the sampler, as the paper).", minimum=0),
    },
    reference="Ge, Huang, Dong & Scott, ECCV 2018 (no official code; tree construction is our reading)")
