"""Contact sheet of synthetic In-shop products: one row per product, its views side by side.

  python -m data_prep.synthetic_inshop.preview --out docs/synthetic_inshop.png
  python -m data_prep.synthetic_inshop.preview --config inshop --products 6 --views 5 --zoom 1 --out /tmp/s.png
  python -m data_prep.synthetic_inshop.preview --config c2s_small --annotations --products 3 --views 4 --out docs/synthetic_c2s.png

Rows come in pairs of train products of one category, to show that products of a category share silhouette
and colours and differ in pattern and details. The images are the ones the builder writes (same seeds), before
JPEG encoding; nothing is prepared on disk. Consumer-to-shop configs show each product twice: its street photos
(as queries) and its shop photos (as gallery). `--annotations` draws the true box and the landmarks (green
visible, yellow occluded, red outside the image).
"""

import argparse

import numpy as np
from PIL import Image
from PIL import ImageDraw

from data_prep import inshop_features
from data_prep.synthetic_inshop import garments
from data_prep.synthetic_inshop import synthetic_inshop

_LABEL_WIDTH = 150
_GAP = 2


def _config(name: str) -> synthetic_inshop.SyntheticInshopConfig:
  for config in synthetic_inshop.BUILDER_CONFIGS:
    if config.name == name:
      return config
  raise ValueError(f"Unknown synthetic_inshop config {name!r}; expected one of "
                   f"{[c.name for c in synthetic_inshop.BUILDER_CONFIGS]}.")


def pick_items(config: synthetic_inshop.SyntheticInshopConfig, num_products: int
               ) -> list[synthetic_inshop.ItemLayout]:
  """Train items in same-category pairs, categories spread over the list (first items of the layout)."""
  by_category: dict[int, list[synthetic_inshop.ItemLayout]] = {}
  for item in synthetic_inshop.split_layout(config)["train"]:
    by_category.setdefault(item.category, []).append(item)
  pairs = [items[:2] for _, items in sorted(by_category.items()) if len(items) >= 2]
  stride = max(1, len(pairs) // max(1, (num_products + 1) // 2))
  chosen = [item for pair in pairs[::stride] for item in pair]
  return chosen[:num_products]


_VISIBILITY_COLOURS = ((40, 220, 40), (250, 220, 0), (230, 30, 30))  # visible, occluded, outside


def _draw_annotations(image: Image.Image, annotations: garments.Annotations, scale: float):
  draw = ImageDraw.Draw(image)
  draw.rectangle([v * scale for v in annotations.bbox], outline=(255, 0, 0))
  for visibility, x, y in annotations.landmarks:
    if visibility >= 0:
      draw.ellipse([x * scale - 2, y * scale - 2, x * scale + 2, y * scale + 2],
                   fill=_VISIBILITY_COLOURS[int(visibility)])


def contact_sheet(config: synthetic_inshop.SyntheticInshopConfig, num_products: int = 8, num_views: int = 6,
                  zoom: int = 2, annotations: bool = False) -> np.ndarray:
  """A labelled grid of products (two rows each for consumer-to-shop configs) x views, `uint8 [H, W, 3]`."""
  items = pick_items(config, num_products)
  splits = ("query", "gallery") if config.consumer_photos is not None else ("train",)
  rows = [(item, split) for item in items for split in splits]
  cell = config.image_size * zoom
  height = len(rows) * (cell + _GAP) + _GAP
  width = _LABEL_WIDTH + num_views * (cell + _GAP) + _GAP
  sheet = Image.new("RGB", (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(sheet)
  for row, (item, split) in enumerate(rows):
    product, _ = synthetic_inshop.product_and_views(config, item)
    top = _GAP + row * (cell + _GAP)
    category = inshop_features.CATEGORY_NAMES[item.category]
    label = f"{category}\nid_{item.item_id:08d}\n{product.kind}, {product.pattern}"
    if len(splits) > 1:
      label += f"\n{'street photos' if split == 'query' else 'shop photos'}"
    draw.text((4, top + 4), label, fill=(0, 0, 0))
    for column in range(num_views):
      view_item = synthetic_inshop.ItemLayout(item.item_id, item.category, column, 1, split)
      _, [(_, view)] = synthetic_inshop.product_and_views(config, view_item)
      pixels = garments.render(product, view, config.image_size, config.supersample)
      image = Image.fromarray(pixels).resize((cell, cell), Image.Resampling.NEAREST)
      if annotations:
        _draw_annotations(image, garments.annotate(product, view, config.image_size, config.supersample), zoom)
      sheet.paste(image, (_LABEL_WIDTH + _GAP + column * (cell + _GAP), top))
  return np.asarray(sheet)


def main(argv: list[str] | None = None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="docs/synthetic_inshop.png", help="where to write the PNG")
  parser.add_argument("--config", default="small", help="synthetic_inshop config name")
  parser.add_argument("--products", type=int, default=8, help="rows; even numbers show same-category pairs")
  parser.add_argument("--views", type=int, default=6, help="columns (views of each product)")
  parser.add_argument("--zoom", type=int, default=2, help="nearest-neighbour upscaling of each image")
  parser.add_argument("--annotations", action="store_true", help="draw the true box and landmarks")
  args = parser.parse_args(argv)
  sheet = contact_sheet(_config(args.config), args.products, args.views, args.zoom, args.annotations)
  Image.fromarray(sheet).save(args.out, optimize=True)
  print(f"wrote {args.out} ({sheet.shape[1]}x{sheet.shape[0]})")


if __name__ == "__main__":
  main()
