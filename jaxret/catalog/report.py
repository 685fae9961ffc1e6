"""Search results for people: a text table, an HTML page with the images embedded, and a PNG grid."""

import base64
import html
import io
import os

import numpy as np
from PIL import Image

from jaxret import pictures
from jaxret.catalog import files
from jaxret.catalog.collection import Hit

THUMBNAIL = 128


def format_table(hits: list[Hit]) -> str:
  """Search results as a fixed-width text table: rank, distance, item_id, category, image."""
  rows = [("rank", "distance", "item_id", "category", "image")]
  rows += [(str(h.rank), f"{h.distance:.4f}", str(h.item_id) if h.item_id >= 0 else "-", h.category_name,
            h.image) for h in hits]
  widths = [max(len(row[c]) for row in rows) for c in range(4)]
  lines = []
  for row in rows:
    cells = [row[c].rjust(widths[c]) for c in range(3)] + [row[3].ljust(widths[3]), row[4]]
    lines.append("  ".join(cells))
  return "\n".join(lines)


def _data_uri(pixels: np.ndarray) -> str:
  encoded = io.BytesIO()
  Image.fromarray(pixels).save(encoded, format="JPEG", quality=90)
  return "data:image/jpeg;base64," + base64.b64encode(encoded.getvalue()).decode()


def query_thumbnail(path: str) -> np.ndarray:
  return np.asarray(Image.fromarray(files.load_image(path)).resize((THUMBNAIL, THUMBNAIL), Image.BILINEAR))


def _verdict(query_item: int, hit: Hit) -> str:
  """"same" / "other" product when the query's product is known (from its path), else ""."""
  if query_item < 0 or hit.item_id < 0:
    return ""
  return "same" if hit.item_id == query_item else "other"


def write_html(path: str, queries: list[str], results: list[list[Hit]], thumbnails: list[list[np.ndarray]],
               title: str) -> None:
  """An HTML page with each query photo and its results (images embedded, so the page stands alone)."""
  parts = ["<!doctype html>", "<meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
           "<style>body{font-family:sans-serif;margin:1em} .row{display:flex;flex-wrap:wrap;gap:8px;"
           "margin-bottom:1.5em} figure{margin:0;width:136px;font-size:11px;word-break:break-all} "
           "img{width:128px;height:128px;border:4px solid #888} .query img{border-color:#333} "
           ".same img{border-color:#1b1} .other img{border-color:#d22}</style>",
           f"<h1>{html.escape(title)}</h1>"]
  for query, hits, (query_thumb, *hit_thumbs) in zip(queries, results, thumbnails):
    query_item, _ = files.labels_from_path(query)
    parts.append(f"<h2>{html.escape(query)}</h2><div class='row'>")
    parts.append(f"<figure class='query'><img src='{_data_uri(query_thumb)}' alt='query'>"
                 "<figcaption><b>query</b></figcaption></figure>")
    for hit, thumb in zip(hits, hit_thumbs):
      item = hit.item_id if hit.item_id >= 0 else "-"
      parts.append(
          f"<figure class='{_verdict(query_item, hit)}'>"
          f"<img src='{_data_uri(thumb)}' alt='result {hit.rank}'>"
          f"<figcaption><b>{hit.rank}</b> d={hit.distance:.4g}<br>item {item} · "
          f"{html.escape(hit.category_name)}<br>{html.escape(hit.image)}</figcaption></figure>")
    parts.append("</div>")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write("\n".join(parts) + "\n")
  os.replace(tmp, path)


def plot_results(path: str, queries: list[str], results: list[list[Hit]],
                 thumbnails: list[list[np.ndarray]]) -> None:
  """A PNG: one row per query, the query then its results (green/red when the query's product is known)."""
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top  (pictures sets the backend)
  columns = 1 + max(len(hits) for hits in results)
  fig, axes = plt.subplots(len(queries), columns, figsize=(1.6 * columns, 1.9 * len(queries)), squeeze=False)
  colours = {"same": pictures.CORRECT_COLOUR, "other": pictures.WRONG_COLOUR, "": (0.6, 0.6, 0.6)}
  for row, (query, hits, (query_thumb, *hit_thumbs)) in enumerate(zip(queries, results, thumbnails)):
    query_item, _ = files.labels_from_path(query)
    pictures.show_image(axes[row, 0], query_thumb, "query", (0.2, 0.2, 0.2))
    axes[row, 0].set_ylabel(os.path.basename(query)[:24], fontsize=7)
    for column in range(1, columns):
      axes[row, column].axis("off")
    for hit, thumb in zip(hits, hit_thumbs):
      axes[row, hit.rank].axis("on")
      title = f"{hit.rank}: d={hit.distance:.3g}\nitem {hit.item_id}"
      pictures.show_image(axes[row, hit.rank], thumb, title,
                     colours[_verdict(query_item, hit)])
  known = any(files.labels_from_path(q)[0] >= 0 for q in queries)
  fig.suptitle("Query photo and its nearest catalogue images" + (" (green: same product)" if known else ""),
               fontsize=10)
  fig.tight_layout()
  pictures.save_figure(fig, path)
