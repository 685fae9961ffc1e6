"""Pictures of a run: training curves and retrieval results, written as PNG files."""

from collections.abc import Sequence
import os

import matplotlib

matplotlib.use("Agg")  # Files only; no display is needed.
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from jaxret import input_pipeline
from jaxret import metrics

CORRECT_COLOUR = (0.1, 0.7, 0.2)
WRONG_COLOUR = (0.85, 0.1, 0.1)


def plot_curves(rows: Sequence[dict], path: str) -> None:
  """Loss and Recall@K over steps from the rows of `metrics.jsonl`."""
  loss_rows = [r for r in rows if "loss" in r]
  eval_rows = [r for r in rows if any(k.startswith("recall@") for k in r)]
  fig, (ax_loss, ax_recall) = plt.subplots(1, 2, figsize=(11, 4))
  if loss_rows:
    ax_loss.plot([r["step"] for r in loss_rows], [r["loss"] for r in loss_rows], color="tab:blue")
  ax_loss.set(xlabel="step", ylabel="training loss", title="Loss")
  ax_loss.grid(alpha=0.3)
  if eval_rows:
    keys = sorted({k for r in eval_rows for k in r if k.startswith("recall@")}, key=lambda k: int(k[7:]))
    for key in keys:
      points = [(r["step"], 100 * r[key]) for r in eval_rows if key in r]
      ax_recall.plot(*zip(*points), marker="o", label=key.replace("recall@", "R@"))
    ax_recall.legend(loc="lower right", fontsize=8)
  ax_recall.set(xlabel="step", ylabel="%", title="Recall@K (query vs gallery)", ylim=(0, 100))
  ax_recall.grid(alpha=0.3)
  fig.tight_layout()
  save_figure(fig, path)


def plot_retrievals(query_emb: np.ndarray, gallery_emb: np.ndarray, query_index, gallery_index,
                    query_source, gallery_source, path: str, *, num_queries: int = 8, top_k: int = 5,
                    metric: str = "euclidean", thumbnail: int = 96) -> None:
  """Queries (one per row, spread over the split) beside their top-K gallery images; green = same product."""
  num_queries = min(num_queries, len(query_index))
  rows = np.linspace(0, len(query_index) - 1, num_queries).round().astype(int)
  distances = np.asarray(metrics.retrieval_distances(query_emb[rows], gallery_emb, metric))
  top_k = min(top_k, len(gallery_index))
  nearest = np.argsort(distances, axis=1, kind="stable")[:, :top_k]
  fig, axes = plt.subplots(num_queries, top_k + 1, figsize=(1.6 * (top_k + 1), 1.75 * num_queries),
                           squeeze=False)
  for r, (query, neighbours) in enumerate(zip(rows, nearest)):
    show_image(axes[r, 0], input_pipeline.load_thumbnail(query_source, query, thumbnail), "query", (0.2, 0.2, 0.2))
    axes[r, 0].set_ylabel(f"item {query_index.item_ids[query]}", fontsize=7)
    for c, g in enumerate(neighbours, start=1):
      correct = gallery_index.item_ids[g] == query_index.item_ids[query]
      show_image(axes[r, c], input_pipeline.load_thumbnail(gallery_source, g, thumbnail),
            f"{c}: d={distances[r, g]:.2f}", CORRECT_COLOUR if correct else WRONG_COLOUR)
  fig.suptitle("Query and its nearest gallery images (green: same product)", fontsize=10)
  fig.tight_layout()
  save_figure(fig, path)


def show_image(ax, image: np.ndarray, title: str, colour) -> None:
  """Shows `image` in `ax` without ticks, titled, framed in `colour` (the verdict of a retrieval)."""
  ax.imshow(image)
  ax.set_title(title, fontsize=7)
  ax.set_xticks([])
  ax.set_yticks([])
  for spine in ax.spines.values():
    spine.set_edgecolor(colour)
    spine.set_linewidth(3)


def save_figure(fig, path: str) -> None:
  """Writes to a temporary name, then renames: a PNG is never left half-written."""
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, path)
