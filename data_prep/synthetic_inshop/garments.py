"""Procedural garments and their photos, for the synthetic In-shop dataset. Pure NumPy and PIL.

A *product* (`Product`, drawn by `sample_product`) is one garment: a silhouette set by its category (tee, shirt,
jacket, dress, jeans, skirt, ...) and by per-product shape attributes (neckline, sleeve length, fit, length, hem
shape), a fill (colours from a small per-category palette, a pattern type, scale and angle, a fabric texture)
and details (placket and buttons, zip, pockets, a logo, cuffs, belt, side stripes, rips, pleats).
A *view* (`View`, drawn by `sample_view`) is one photo of it: front, side, back, full body or close-up, on a
mannequin or laid flat, with pose, framing, background, lighting, noise and sometimes an occluder.
`render(product, view, image_size)` draws the photo as `uint8 [image_size, image_size, 3]`, and
`annotate(product, view, image_size)` gives what is true of it: the garment's box, its 8 landmarks with their
visibility, its clothes and pose types; `product_attributes(product)` gives the product's attributes.
For the consumer-to-shop variant, `consumer_view` turns a view into a street photo (the garment small,
off-centre, on clutter, often partly hidden) and `shop_view` into a clean shop photo.

Products of one category share a silhouette and a handful of colours, so colour alone does not tell them
apart; what does is the combination of pattern and shape details. Everything is drawn in *body coordinates*
(units of about a shoulder width; x to the model's left on the image's left, y down; neck at y = -0.74,
waist at y = 0, ankles at y = 1.75), then mapped to the image by one affine transform per view.
Rendering is deterministic: the same (product, view, size) gives the same pixels.
"""

import dataclasses
import functools
import math

import numpy as np
from PIL import Image
from PIL import ImageDraw

from data_prep import inshop_features

Colour = tuple[int, int, int]

# Bump when a change here alters the pixels drawn for the same specs: prepared datasets store it and are
# refused (see `SyntheticInshopConfig.settings`) rather than silently mixed with new drawings.
RENDERER_VERSION = 1

# --------------------------------------------------------------------------------------------------------------
# Colours and per-category styles.

COLOURS: dict[str, Colour] = {
    "white": (238, 238, 233), "cream": (236, 224, 198), "beige": (212, 192, 156), "camel": (190, 148, 100),
    "brown": (104, 68, 44), "black": (32, 32, 35), "charcoal": (66, 66, 72), "grey": (130, 130, 133),
    "lightgrey": (192, 192, 194), "navy": (34, 42, 86), "blue": (52, 90, 172), "skyblue": (138, 182, 224),
    "denim": (72, 102, 142), "darkdenim": (42, 56, 90), "lightdenim": (142, 166, 196), "teal": (32, 126, 128),
    "green": (50, 118, 62), "olive": (110, 110, 56), "khaki": (176, 164, 116), "mint": (164, 218, 192),
    "yellow": (234, 198, 62), "mustard": (196, 156, 42), "orange": (228, 118, 42), "coral": (238, 122, 110),
    "red": (186, 36, 42), "burgundy": (108, 26, 46), "pink": (238, 172, 192), "hotpink": (214, 62, 130),
    "lilac": (188, 160, 210), "purple": (98, 52, 128),
}
# Colours any product may use for a pattern's second colour or a trim, on top of its category palette.
ACCENT_COLOURS = ("white", "black", "cream", "navy", "red", "grey")
# Colours of the other clothes a model wears (companion trousers or top), of hair and of skin.
COMPANION_COLOURS = ("black", "white", "lightgrey", "charcoal", "navy", "denim", "beige")
HAIR_COLOURS: tuple[Colour, ...] = ((40, 30, 24), (88, 58, 34), (150, 108, 62), (214, 184, 120), (22, 22, 22))
SKIN_COLOURS: tuple[Colour, ...] = ((244, 208, 182), (226, 182, 150), (196, 146, 108), (150, 102, 70),
                                    (104, 70, 50))

KINDS = ("top", "jacket", "coat", "vest", "dress", "jumpsuit", "romper", "pants", "shorts", "skirt", "leggings")
TOP_KINDS = ("top", "jacket", "coat", "vest")
BOTTOM_KINDS = ("pants", "shorts", "skirt", "leggings")
PATTERNS = ("solid", "hstripes", "vstripes", "diagonal", "checks", "plaid", "dots", "chevron", "floral", "block",
            "band")
NECKLINES = ("round", "crew", "v", "square", "boat", "collar", "mandarin", "turtle", "hood", "lapels", "strap")
SLEEVE_LENGTHS = {"none": 0.0, "cap": 0.1, "short": 0.28, "elbow": 0.48, "threequarter": 0.66, "long": 0.9}
LOGO_SHAPES = ("circle", "ring", "triangle", "square", "diamond", "star", "heart", "cross", "bars")

# Photo types, with the view number the real In-shop image names use (`NN_<number>_<type>.jpg`).
VIEW_TYPES = ("front", "side", "back", "full", "additional")
VIEW_NUMBERS = {"front": 1, "side": 2, "back": 3, "full": 4, "additional": 7}


@dataclasses.dataclass(frozen=True)
class CategoryStyle:
  """What products of one category look like: kinds of garment, colours and the attribute values they use."""
  kinds: tuple[tuple[str, float], ...]  # (kind, probability)
  palette: tuple[str, ...]  # main colours, most typical first; `Difficulty.palette_size` keeps the first few
  necklines: tuple[str, ...] = ("round", "crew", "v")
  sleeves: tuple[str, ...] = ("short",)
  patterns: tuple[str, ...] = PATTERNS
  texture: str = "plain"  # plain | denim | knit
  extras: tuple[str, ...] = ()  # category details: placket, polo, zip, graphic, kangaroo, rib, belt, rips, ...


_TOP_PATTERNS = ("solid", "hstripes", "vstripes", "diagonal", "checks", "plaid", "dots", "chevron", "floral",
                 "block", "band")
_KNIT_PATTERNS = ("solid", "hstripes", "band", "checks", "chevron", "block", "dots")
_BOTTOM_PATTERNS = ("solid", "vstripes", "checks", "plaid", "dots", "floral", "hstripes", "block")
_DENIM_PATTERNS = ("solid", "block", "vstripes")

# Keyed by the In-shop `GENDER/Category` names; `CATEGORY_STYLES[i]` styles class label i.
_STYLES_BY_NAME = {
    "WOMEN/Blouses_Shirts": CategoryStyle(
        kinds=(("top", 1.0),), palette=("white", "pink", "skyblue", "black", "cream", "coral", "lilac", "mint"),
        necklines=("collar", "v", "round", "mandarin", "boat"), sleeves=("short", "elbow", "long", "threequarter"),
        patterns=_TOP_PATTERNS, extras=("placket",)),
    "WOMEN/Cardigans": CategoryStyle(
        kinds=(("jacket", 1.0),), palette=("grey", "cream", "black", "navy", "camel", "burgundy", "pink", "olive"),
        necklines=("v", "round"), sleeves=("long", "threequarter"), patterns=_KNIT_PATTERNS, texture="knit",
        extras=("rib",)),
    "WOMEN/Denim": CategoryStyle(
        kinds=(("pants", 0.6), ("shorts", 0.25), ("jacket", 0.15)),
        palette=("denim", "darkdenim", "lightdenim", "black", "white", "grey", "blue", "skyblue"),
        necklines=("collar",), sleeves=("long",), patterns=_DENIM_PATTERNS, texture="denim",
        extras=("rips", "jeans")),
    "WOMEN/Dresses": CategoryStyle(
        kinds=(("dress", 1.0),), palette=("black", "red", "navy", "white", "pink", "coral", "green", "yellow"),
        necklines=("round", "v", "square", "boat", "strap", "collar"), sleeves=("none", "cap", "short", "long"),
        patterns=_TOP_PATTERNS, extras=("belt",)),
    "WOMEN/Graphic_Tees": CategoryStyle(
        kinds=(("top", 1.0),), palette=("white", "black", "grey", "pink", "yellow", "skyblue", "red", "mint"),
        necklines=("crew", "round", "v"), sleeves=("short", "cap"),
        patterns=("solid", "solid", "solid", "hstripes", "block"), extras=("graphic",)),
    "WOMEN/Jackets_Coats": CategoryStyle(
        kinds=(("jacket", 0.6), ("coat", 0.4)),
        palette=("black", "camel", "navy", "olive", "beige", "grey", "burgundy", "red"),
        necklines=("lapels", "collar", "hood", "mandarin"), sleeves=("long",),
        patterns=("solid", "solid", "checks", "plaid", "hstripes", "block"), extras=("zip",)),
    "WOMEN/Leggings": CategoryStyle(
        kinds=(("leggings", 1.0),), palette=("black", "charcoal", "grey", "navy", "burgundy", "olive", "purple",
                                             "teal"),
        patterns=("solid", "solid", "floral", "hstripes", "dots", "block", "chevron"), extras=("sidestripe",)),
    "WOMEN/Pants": CategoryStyle(
        kinds=(("pants", 1.0),), palette=("black", "navy", "beige", "white", "khaki", "grey", "olive", "burgundy"),
        patterns=_BOTTOM_PATTERNS, extras=("belt", "sidestripe")),
    "WOMEN/Rompers_Jumpsuits": CategoryStyle(
        kinds=(("jumpsuit", 0.5), ("romper", 0.5)),
        palette=("black", "navy", "red", "white", "olive", "pink", "mustard", "skyblue"),
        necklines=("v", "strap", "round", "collar", "square"), sleeves=("none", "cap", "short", "long"),
        patterns=_TOP_PATTERNS, extras=("belt",)),
    "WOMEN/Shorts": CategoryStyle(
        kinds=(("shorts", 1.0),), palette=("denim", "white", "black", "khaki", "pink", "navy", "coral",
                                           "lightdenim"),
        patterns=_BOTTOM_PATTERNS, extras=("belt", "cuffs")),
    "WOMEN/Skirts": CategoryStyle(
        kinds=(("skirt", 1.0),), palette=("black", "navy", "red", "pink", "camel", "white", "green", "mustard"),
        patterns=_BOTTOM_PATTERNS, extras=("pleats", "belt")),
    "WOMEN/Sweaters": CategoryStyle(
        kinds=(("top", 1.0),), palette=("grey", "cream", "black", "burgundy", "navy", "pink", "mustard", "olive"),
        necklines=("crew", "turtle", "v", "boat"), sleeves=("long", "threequarter"), patterns=_KNIT_PATTERNS,
        texture="knit", extras=("rib",)),
    "WOMEN/Sweatshirts_Hoodies": CategoryStyle(
        kinds=(("top", 1.0),), palette=("grey", "black", "pink", "navy", "white", "lilac", "mint", "burgundy"),
        necklines=("hood", "crew", "hood"), sleeves=("long",),
        patterns=("solid", "solid", "block", "band", "hstripes"), extras=("kangaroo", "rib", "graphic_small")),
    "WOMEN/Tees_Tanks": CategoryStyle(
        kinds=(("top", 1.0),), palette=("white", "black", "grey", "pink", "navy", "coral", "mint", "yellow"),
        necklines=("round", "v", "strap", "crew", "square"), sleeves=("none", "cap", "short"),
        patterns=_TOP_PATTERNS, extras=("graphic_small",)),
    "MEN/Denim": CategoryStyle(
        kinds=(("pants", 0.85), ("shorts", 0.15)),
        palette=("denim", "darkdenim", "lightdenim", "black", "grey", "blue", "navy", "charcoal"),
        patterns=_DENIM_PATTERNS, texture="denim", extras=("rips", "jeans")),
    "MEN/Jackets_Vests": CategoryStyle(
        kinds=(("jacket", 0.65), ("vest", 0.35)),
        palette=("black", "navy", "olive", "khaki", "brown", "grey", "camel", "burgundy"),
        necklines=("collar", "hood", "mandarin", "v"), sleeves=("long",),
        patterns=("solid", "solid", "checks", "plaid", "block", "hstripes"), extras=("zip",)),
    "MEN/Pants": CategoryStyle(
        kinds=(("pants", 1.0),), palette=("khaki", "navy", "black", "grey", "olive", "beige", "charcoal", "brown"),
        patterns=("solid", "solid", "checks", "plaid", "vstripes"), extras=("belt", "sidestripe")),
    "MEN/Shirts_Polos": CategoryStyle(
        kinds=(("top", 1.0),), palette=("white", "skyblue", "navy", "black", "grey", "red", "green", "pink"),
        necklines=("collar", "collar", "mandarin"), sleeves=("short", "long"),
        patterns=("solid", "hstripes", "vstripes", "checks", "plaid", "dots", "floral"),
        extras=("placket", "polo")),
    "MEN/Shorts": CategoryStyle(
        kinds=(("shorts", 1.0),), palette=("khaki", "navy", "grey", "olive", "black", "denim", "red", "blue"),
        patterns=_BOTTOM_PATTERNS, extras=("belt", "sidestripe", "cuffs")),
    "MEN/Suiting": CategoryStyle(
        kinds=(("jacket", 0.7), ("pants", 0.3)),
        palette=("charcoal", "navy", "black", "grey", "brown", "beige", "lightgrey", "burgundy"),
        necklines=("lapels",), sleeves=("long",), patterns=("solid", "solid", "vstripes", "checks", "plaid"),
        extras=("suit",)),
    "MEN/Sweaters": CategoryStyle(
        kinds=(("top", 1.0),), palette=("grey", "navy", "charcoal", "burgundy", "green", "cream", "black",
                                        "mustard"),
        necklines=("crew", "v", "turtle", "collar"), sleeves=("long",), patterns=_KNIT_PATTERNS, texture="knit",
        extras=("rib",)),
    "MEN/Sweatshirts_Hoodies": CategoryStyle(
        kinds=(("top", 1.0),), palette=("grey", "black", "navy", "charcoal", "green", "burgundy", "red", "white"),
        necklines=("hood", "crew", "hood"), sleeves=("long",),
        patterns=("solid", "solid", "block", "band", "hstripes"), extras=("kangaroo", "rib", "graphic_small")),
    "MEN/Tees_Tanks": CategoryStyle(
        kinds=(("top", 1.0),), palette=("white", "black", "grey", "navy", "red", "green", "blue", "olive"),
        necklines=("crew", "round", "v", "strap"), sleeves=("short", "none"),
        patterns=("solid", "hstripes", "vstripes", "block", "band", "dots", "chevron"),
        extras=("graphic_small",)),
}
CATEGORY_STYLES: tuple[CategoryStyle, ...] = tuple(_STYLES_BY_NAME[n] for n in inshop_features.CATEGORY_NAMES)


@dataclasses.dataclass(frozen=True)
class Difficulty:
  """Knobs that make products harder to tell apart (`sample_product`) and views more varied (`sample_view`).

  The defaults are the `small` config's. Colour knobs move the colour-histogram baseline; shape and view
  knobs move what a CNN can learn.
  """
  # Main colours per category palette that products draw from. Fewer -> more products share colours, so
  # colour histograms confuse them more; shape and pattern cues are unaffected.
  palette_size: int = 5
  # How many of ACCENT_COLOURS (white, black, cream, navy, red, grey) a pattern's second colour, trims and
  # logos may use besides the category palette. Fewer -> more products share colour pairs.
  accent_colours: int = 6
  # Colourways (main, second, trim colour triples) per category that all its products share; 0 -> every
  # product draws its own colours. Few colourways -> many same-coloured siblings that only pattern and
  # details tell apart.
  colourways: int = 0
  # Probability that a pattern is tonal: its second colour a lighter or darker shade of the main colour (navy
  # on dark navy) rather than another colour. Higher -> colour pairs say less, the pattern's structure more.
  tonal_prob: float = 0.0
  # Per-product random offset (0-255 RGB units) around its palette colours; larger -> colour identifies more.
  colour_jitter: float = 8.0
  # Probability that a product is patterned (else solid, where only shape details tell it from its peers).
  pattern_prob: float = 0.75
  # Scales the probability of each detail (buttons, pockets, logos, cuffs, belts, ...); 0 -> plain garments.
  detail_level: float = 1.0
  # Scales geometric change between views: rotation (+-5.5 degrees), translation (+-4%), zoom (x0.91..1.08),
  # framing, arm and leg pose.
  view_jitter: float = 1.0
  # Scales photometric change between views: brightness (x0.76..1.2), contrast (same), colour cast (+-10%
  # per channel), light gradient, noise. Lighting moves colour histograms far more than a learned embedding.
  lighting_jitter: float = 1.0
  # Probability that a view has an occluder (a bag, a hand, a sign) over part of the garment.
  occlusion_prob: float = 0.15
  # Probability that a view shows the garment on a model (with head, arms, legs, other clothes), else flat.
  model_prob: float = 0.6
  # Probabilities of the view types front, side, back, full (whole model, garment small), additional (close-up).
  view_weights: tuple[float, float, float, float, float] = (0.55, 0.15, 0.1, 0.1, 0.1)

  def __post_init__(self):
    if not 1 <= self.palette_size <= 8:
      raise ValueError(f"Difficulty.palette_size must be in [1, 8] (each category lists 8 colours), got "
                       f"{self.palette_size}.")
    if not 0 <= self.accent_colours <= len(ACCENT_COLOURS) or self.colourways < 0:
      raise ValueError(f"Difficulty.accent_colours must be in [0, {len(ACCENT_COLOURS)}] and colourways >= 0, got "
                       f"{self.accent_colours} and {self.colourways}.")
    if min(self.colour_jitter, self.detail_level, self.view_jitter, self.lighting_jitter) < 0:
      raise ValueError("Difficulty.colour_jitter, detail_level, view_jitter and lighting_jitter must be >= 0.")
    if len(self.view_weights) != len(VIEW_TYPES) or min(self.view_weights) < 0 or sum(self.view_weights) <= 0:
      raise ValueError(f"Difficulty.view_weights must be {len(VIEW_TYPES)} non-negative weights for "
                       f"{VIEW_TYPES}, not all zero; got {self.view_weights}.")
    for name in ("pattern_prob", "tonal_prob", "occlusion_prob", "model_prob"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"Difficulty.{name} is a probability, got {getattr(self, name)}.")


# --------------------------------------------------------------------------------------------------------------
# Products.

@dataclasses.dataclass(frozen=True)
class Product:
  """One garment. Lengths are in body coordinates (see the module docstring); colours are RGB in [0, 255]."""
  category: int
  kind: str  # one of KINDS
  main: Colour
  second: Colour  # the pattern's second colour
  trim: Colour  # cuffs, piping, side stripes, drawstrings
  inner: Colour  # what shows inside an open jacket
  pattern: str  # one of PATTERNS
  pattern_period: float  # body units per repeat
  pattern_angle: float  # radians, for diagonal stripes and chevrons
  pattern_duty: float  # fraction of a repeat in the second colour (stripes), dot radius / period (dots)
  pattern_phase: tuple[float, float]
  pattern_seed: int  # for the floral print
  texture: str  # plain | denim | knit
  neckline: str  # one of NECKLINES; "none" for bottoms
  sleeve: float  # sleeve length, 0 = sleeveless
  sleeve_end: float  # half-width of the sleeve end (0.07 tapered .. 0.17 bell)
  shoulder: float  # half-width at the shoulders
  width: float  # half-width at the hem (tops, skirts, dresses) or of a trouser leg at its hem (bottoms)
  fit: float  # waist/hip width scale
  length: float  # y of the hem
  hem: str  # straight | curved | slanted | zigzag
  placket: str  # none | full | half
  buttons: int
  double_breasted: bool
  zip: bool
  pockets: str  # none | chest | chest2 | hip | flap | kangaroo | jeans | patch
  logo: str  # none or one of LOGO_SHAPES
  logo_colour: Colour
  logo_centre: tuple[float, float]
  logo_size: float
  graphic_bars: int  # rows of "text" under a big graphic
  cuffs: bool  # bands at sleeve or leg ends and at the hem
  belt: bool
  belt_colour: Colour
  side_stripe: bool
  pleats: int
  rips: tuple[tuple[float, float, float], ...]  # (x, y, radius)
  companion: Colour  # the model's other garment
  skin: Colour
  hair: Colour


def _mix(a, b, t: float) -> Colour:
  return tuple(int(round((1 - t) * x + t * y)) for x, y in zip(a, b))


def _scale(c, f: float) -> Colour:
  return tuple(int(min(255, max(0, round(x * f)))) for x in c)


def _jitter_colour(rng: np.random.Generator, name: str, jitter: float) -> Colour:
  base = np.asarray(COLOURS[name], np.float64)
  return tuple(int(v) for v in np.clip(np.round(base + rng.uniform(-jitter, jitter, 3)), 0, 255))


def _pick(rng: np.random.Generator, options):
  return options[int(rng.integers(len(options)))]


def _draw_colourway(rng: np.random.Generator, palette: tuple[str, ...], accents: tuple[str, ...]
                    ) -> tuple[str, str, str]:
  main = _pick(rng, palette)
  others = [c for c in dict.fromkeys(palette + accents) if c != main] or [main]
  second = _pick(rng, others)
  return main, second, _pick(rng, [c for c in others if c != second] or others)


def category_colourways(category: int, difficulty: Difficulty) -> list[tuple[str, str, str]]:
  """The `difficulty.colourways` (main, second, trim) colour names that products of a category share.

  They depend on the category and the colour knobs only (not on a dataset seed), cycling through the
  palette's main colours so that a category's colourways use different mains where they can.
  """
  palette = CATEGORY_STYLES[category].palette[:difficulty.palette_size]
  accents = ACCENT_COLOURS[:difficulty.accent_colours]
  rng = np.random.default_rng([category, 7919])
  ways = []
  for i in range(difficulty.colourways):
    main, second, trim = _draw_colourway(rng, palette, accents)
    main = palette[i % len(palette)]
    others = [c for c in dict.fromkeys(palette + accents) if c != main] or [main]
    second = second if second in others else _pick(rng, others)
    ways.append((main, second, trim if trim != second else _pick(rng, others)))
  return ways


def sample_product(rng: np.random.Generator, category: int, difficulty: Difficulty = Difficulty()) -> Product:
  """Draws one product of a category.

  Args:
    rng: the product's generator (seed it from (dataset seed, item id) so products do not depend on order).
    category: class label, an index into `inshop_features.CATEGORY_NAMES`.
    difficulty: the palette and detail knobs.

  Returns:
    The product's spec.
  """
  if not 0 <= category < len(CATEGORY_STYLES):
    raise ValueError(f"category must be a class label in [0, {len(CATEGORY_STYLES)}), got {category}.")
  style = CATEGORY_STYLES[category]
  detail = difficulty.detail_level
  chance = lambda p: bool(rng.random() < min(1.0, p * detail))

  kinds, weights = zip(*style.kinds)
  kind = kinds[int(rng.choice(len(kinds), p=np.asarray(weights) / sum(weights)))]
  palette = style.palette[:difficulty.palette_size]
  accents = ACCENT_COLOURS[:difficulty.accent_colours]
  if difficulty.colourways:
    main_name, second_name, trim_name = _pick(rng, category_colourways(category, difficulty))
  else:
    main_name, second_name, trim_name = _draw_colourway(rng, palette, accents)
  others = [c for c in dict.fromkeys(palette + accents) if c != main_name] or [main_name]
  main = _jitter_colour(rng, main_name, difficulty.colour_jitter)
  second = _jitter_colour(rng, second_name, difficulty.colour_jitter)
  if rng.random() < difficulty.tonal_prob:
    # Lighten dark colours and darken light ones, so the pattern keeps a visible contrast.
    luma = 0.299 * main[0] + 0.587 * main[1] + 0.114 * main[2]
    second = _mix(main, (255, 255, 255), 0.45) if luma < 110 else _scale(main, 0.6)
  trim = _jitter_colour(rng, trim_name, difficulty.colour_jitter)

  is_top = kind in TOP_KINDS + ("dress", "jumpsuit", "romper")
  pattern = "solid"
  if rng.random() < difficulty.pattern_prob:
    pattern = _pick(rng, [p for p in style.patterns if p != "solid"] or ["solid"])
  period = float(_pick(rng, (0.11, 0.16, 0.24, 0.34)))
  if pattern in ("block", "band"):
    period = float(rng.uniform(0.12, 0.3))  # band height / block split offset
  angle = float(_pick(rng, (-1, 1)) * rng.uniform(0.5, 1.1))
  duty = float(_pick(rng, (0.25, 0.4, 0.5))) if pattern != "dots" else float(rng.uniform(0.2, 0.34))

  neckline = _pick(rng, style.necklines) if is_top else "none"
  if kind == "vest":
    sleeve_name = "none"
  elif kind in ("jacket", "coat"):
    sleeve_name = "long"
  else:
    sleeve_name = _pick(rng, style.sleeves) if is_top else "none"
  if neckline == "strap":
    sleeve_name = "none"
  sleeve = SLEEVE_LENGTHS[sleeve_name]
  sleeve_end = float(rng.choice((0.075, 0.1, 0.14))) if sleeve > 0.3 else float(rng.uniform(0.11, 0.15))

  fit = float(rng.uniform(0.9, 1.15))
  shoulder = float(rng.uniform(0.34, 0.44)) * (0.85 if neckline == "strap" else 1.0)
  hem = "straight"
  if kind in ("top",):
    length = float(_pick(rng, (-0.02, 0.2, 0.32, 0.45)))
    width = float(rng.uniform(0.27, 0.4)) * fit
    hem = _pick(rng, ("straight", "straight", "curved", "slanted"))
  elif kind in ("jacket", "vest"):
    length = float(_pick(rng, (0.05, 0.22, 0.4)))
    width = float(rng.uniform(0.3, 0.4)) * fit
  elif kind == "coat":
    length = float(rng.uniform(0.8, 1.3))
    width = float(rng.uniform(0.38, 0.52))
  elif kind == "dress":
    length = float(_pick(rng, (0.45, 0.75, 1.05, 1.45)))
    width = float(_pick(rng, (0.34, 0.48, 0.62))) + 0.1 * length
    hem = _pick(rng, ("straight", "straight", "slanted", "zigzag", "curved"))
  elif kind == "skirt":
    length = float(_pick(rng, (0.45, 0.75, 1.05, 1.45)))
    width = float(_pick(rng, (0.34, 0.46, 0.6))) + 0.12 * length
    hem = _pick(rng, ("straight", "straight", "slanted", "zigzag"))
  elif kind in ("shorts", "romper"):
    length = float(_pick(rng, (0.55, 0.65, 0.8)))
    width = float(_pick(rng, (0.12, 0.15, 0.18)))
  elif kind == "leggings":
    length = float(_pick(rng, (1.45, 1.72)))
    width = float(rng.uniform(0.055, 0.07))
  else:  # pants, jumpsuit
    length = float(_pick(rng, (1.5, 1.72, 1.72)))
    width = float(_pick(rng, (0.075, 0.1, 0.13, 0.18)))

  placket, buttons, double_breasted, zip_ = "none", 0, False, False
  if kind in ("jacket", "coat", "vest"):
    if "zip" in style.extras and neckline in ("hood", "mandarin", "collar") and rng.random() < 0.6:
      zip_ = True
    else:
      buttons = int(rng.integers(1, 6)) if neckline == "lapels" else int(rng.integers(3, 7))
      double_breasted = bool(neckline == "lapels" and rng.random() < 0.3)
  elif "placket" in style.extras and neckline in ("collar", "mandarin", "v"):
    if "polo" in style.extras and rng.random() < 0.4:
      placket, buttons = "half", int(rng.integers(2, 4))
    else:
      placket, buttons = "full", int(rng.integers(4, 8))
  elif is_top and chance(0.2):
    placket, buttons = "half", int(rng.integers(2, 5))

  pockets = "none"
  if kind in ("jacket", "coat"):
    pockets = _pick(rng, ("hip", "flap", "chest2", "none", "chest"))
  elif "kangaroo" in style.extras and chance(0.7):
    pockets = "kangaroo"
  elif kind == "top" and chance(0.3):
    pockets = _pick(rng, ("chest", "chest2"))
  elif kind in ("pants", "shorts", "jumpsuit", "romper"):
    pockets = "jeans" if "jeans" in style.extras else _pick(rng, ("jeans", "patch", "none", "flap"))
  elif kind == "skirt" and chance(0.3):
    pockets = "patch"

  logo, logo_size, logo_centre, graphic_bars = "none", 0.0, (0.0, 0.0), 0
  if "graphic" in style.extras:
    logo, logo_size = _pick(rng, LOGO_SHAPES), float(rng.uniform(0.13, 0.2))
    logo_centre = (float(rng.uniform(-0.05, 0.05)), float(rng.uniform(-0.42, -0.3)))
    graphic_bars = int(rng.integers(0, 4))
  elif is_top and kind != "dress" and chance(0.45 if "graphic_small" in style.extras else 0.2):
    logo, logo_size = _pick(rng, LOGO_SHAPES), float(rng.uniform(0.05, 0.08))
    logo_centre = (float(_pick(rng, (-0.17, 0.0, 0.17))), float(rng.uniform(-0.52, -0.38)))
  elif kind in BOTTOM_KINDS and chance(0.12):
    logo, logo_size = _pick(rng, LOGO_SHAPES), 0.05
    logo_centre = (float(_pick(rng, (-0.2, 0.2))), 0.3)
  logo_colour = _jitter_colour(rng, _pick(rng, others),
                               difficulty.colour_jitter)

  cuffs = ("rib" in style.extras and chance(0.8)) or ("cuffs" in style.extras and chance(0.4)) or chance(0.12)
  belt = "belt" in style.extras and chance(0.35)
  belt_colour = COLOURS[_pick(rng, ("black", "brown", "camel", "white"))] if belt else (0, 0, 0)
  side_stripe = "sidestripe" in style.extras and chance(0.3)
  pleats = int(rng.integers(4, 9)) if (kind == "skirt" and chance(0.35)) else 0
  rips = ()
  if "rips" in style.extras and chance(0.45):
    rips = tuple((float(_pick(rng, (-1, 1)) * rng.uniform(0.1, 0.25)), float(rng.uniform(0.35, 1.2)),
                  float(rng.uniform(0.03, 0.06))) for _ in range(int(rng.integers(1, 4))))
  inner = COLOURS[_pick(rng, ("white", "black", "lightgrey", "cream", "skyblue"))]
  if "suit" in style.extras:
    inner = COLOURS[_pick(rng, ("white", "skyblue", "white"))]

  return Product(
      category=category, kind=kind, main=main, second=second, trim=trim, inner=inner, pattern=pattern,
      pattern_period=period, pattern_angle=angle, pattern_duty=duty,
      pattern_phase=(float(rng.random()), float(rng.random())), pattern_seed=int(rng.integers(2**31)),
      texture=style.texture, neckline=neckline, sleeve=sleeve, sleeve_end=sleeve_end, shoulder=shoulder,
      width=width, fit=fit, length=length, hem=hem, placket=placket, buttons=buttons,
      double_breasted=double_breasted, zip=zip_, pockets=pockets, logo=logo, logo_colour=logo_colour,
      logo_centre=logo_centre, logo_size=logo_size, graphic_bars=graphic_bars, cuffs=cuffs, belt=belt,
      belt_colour=belt_colour, side_stripe=side_stripe, pleats=pleats, rips=rips,
      companion=COLOURS[_pick(rng, COMPANION_COLOURS)], skin=_pick(rng, SKIN_COLOURS),
      hair=_pick(rng, HAIR_COLOURS))


# --------------------------------------------------------------------------------------------------------------
# Views.

@dataclasses.dataclass(frozen=True)
class View:
  """One photo of a product: pose, framing, background, lighting and occluder."""
  view_type: str  # one of VIEW_TYPES
  on_model: bool
  flip: bool
  rotation: float  # radians
  zoom: float  # > 1 zooms in
  squash: float  # horizontal scale of the garment (side views turn it)
  centre: tuple[float, float]  # framing centre offset, in units of the framed half-extent
  shift: tuple[float, float]  # image translation, in image widths
  arm_angle: float  # radians from vertical
  leg_spread: float  # body units at the ankles
  background: str  # studio | plain | gradient | floor | noise
  background_colours: tuple[Colour, Colour]
  background_param: float
  brightness: float
  contrast: float
  cast: tuple[float, float, float]
  light: tuple[float, float]  # light gradient over the garment, body units^-1
  folds: tuple[tuple[float, float], ...]  # (x, depth) of vertical shading folds
  occluder: str  # none | box | blob
  occluder_colour: Colour
  occluder_box: tuple[float, float, float, float]  # (cx, cy, rx, ry) in image widths
  noise: float  # std of pixel noise, 0-255 units
  noise_seed: int


_STUDIO = ((244, 244, 242), (232, 232, 230), (222, 224, 228), (236, 230, 222), (210, 210, 210))
_BACKDROPS = ((196, 206, 214), (214, 200, 190), (120, 124, 130), (60, 62, 68), (200, 214, 196), (230, 214, 170),
              (180, 160, 140), (150, 170, 190), (226, 196, 200), (90, 100, 90))


def sample_view(rng: np.random.Generator, product: Product, difficulty: Difficulty = Difficulty()) -> View:
  """Draws one photo setup of a product.

  Args:
    rng: the view's generator (seed it from (dataset seed, item id, view index)).
    product: the product photographed (the view depends on its kind).
    difficulty: the view and lighting knobs.

  Returns:
    The view's spec.
  """
  del product  # Views do not depend on the product yet; the argument keeps that option open.
  jit, light = difficulty.view_jitter, difficulty.lighting_jitter
  weights = np.asarray(difficulty.view_weights, np.float64)
  view_type = VIEW_TYPES[int(rng.choice(len(VIEW_TYPES), p=weights / weights.sum()))]
  on_model = bool(view_type == "full" or rng.random() < difficulty.model_prob)
  zoom = float(np.exp(rng.uniform(-0.096, 0.08) * jit))
  centre = (float(rng.uniform(-0.048, 0.048) * jit), float(rng.uniform(-0.048, 0.048) * jit))
  squash = 1.0
  if view_type == "side":
    squash = float(rng.uniform(0.55, 0.75))
  elif view_type == "additional":
    zoom *= float(rng.uniform(1.5, 2.1))
    centre = (float(rng.uniform(-0.45, 0.45)), float(rng.uniform(-0.5, 0.5)))
  kind = _pick(rng, ("studio", "studio", "studio", "plain", "gradient", "gradient", "floor", "noise"))
  colours = (_pick(rng, _STUDIO), _pick(rng, _STUDIO + _BACKDROPS))
  if kind in ("plain", "noise"):
    colours = (_pick(rng, _BACKDROPS), _pick(rng, _STUDIO + _BACKDROPS))
  occluder = "none"
  if rng.random() < difficulty.occlusion_prob:
    occluder = _pick(rng, ("box", "blob"))
  occluder_colour = _pick(rng, list(COLOURS.values()) + list(SKIN_COLOURS))
  side = _pick(rng, (-1, 1))
  occluder_box = (0.5 + side * float(rng.uniform(0.12, 0.32)), float(rng.uniform(0.3, 0.8)),
                  float(rng.uniform(0.07, 0.14)), float(rng.uniform(0.07, 0.16)))
  cast = tuple(float(c) for c in np.exp(rng.uniform(-0.1, 0.1, 3) * light))
  return View(
      view_type=view_type, on_model=on_model, flip=bool(rng.random() < 0.5),
      rotation=float(rng.uniform(-0.096, 0.096) * jit), zoom=zoom, squash=squash, centre=centre,
      shift=(float(rng.uniform(-0.04, 0.04) * jit), float(rng.uniform(-0.04, 0.04) * jit)),
      arm_angle=float(rng.uniform(0.12, 0.12 + 0.28 * jit)), leg_spread=float(rng.uniform(0.0, 0.096 * jit)),
      background=kind, background_colours=colours, background_param=float(rng.uniform(0.3, 0.8)),
      brightness=float(np.exp(rng.uniform(-0.27, 0.18) * light)),
      contrast=float(np.exp(rng.uniform(-0.27, 0.18) * light)), cast=cast,
      light=(float(rng.uniform(-0.22, 0.22) * light), float(rng.uniform(-0.18, 0.09) * light)),
      folds=tuple((float(rng.uniform(-0.4, 0.4)), float(rng.uniform(0.05, 0.15))) for _ in range(2)),
      occluder=occluder, occluder_colour=occluder_colour, occluder_box=occluder_box,
      noise=float(rng.uniform(1.5, 4.5) * light), noise_seed=int(rng.integers(2**31)))


# --------------------------------------------------------------------------------------------------------------
# Geometry, in body coordinates. Each function returns float64 polygons `[n, 2]`.

NECK_Y, SHOULDER_Y, ARMPIT_Y, WAIST_Y, HIP_Y, CROTCH_Y, ANKLE_Y = -0.74, -0.67, -0.4, 0.0, 0.22, 0.45, 1.75
HEAD_CENTRE, HEAD_RADIUS = (0.0, -1.02), 0.19


def _ellipse(cx, cy, rx, ry, n: int = 14) -> np.ndarray:
  t = np.linspace(0, 2 * np.pi, n, endpoint=False)
  return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _rect(x0, y0, x1, y1) -> np.ndarray:
  return np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], np.float64)


def _mirror(points: np.ndarray) -> np.ndarray:
  return points * np.array([-1.0, 1.0])


def _hem_points(p: Product, half_width: float, y: float) -> list[tuple[float, float]]:
  """Points of a hem from left (-x) to right, for the hem shape of the product."""
  if p.hem == "curved":
    xs = np.linspace(-half_width, half_width, 7)
    return [(x, y - 0.09 * (x / half_width) ** 2) for x in xs]
  if p.hem == "slanted":
    return [(-half_width, y - 0.1), (half_width, y + 0.08)]
  if p.hem == "zigzag":
    xs = np.linspace(-half_width, half_width, 9)
    return [(x, y + (0.06 if i % 2 else 0.0)) for i, x in enumerate(xs)]
  return [(-half_width, y), (half_width, y)]


def _sleeve(p: Product, arm_angle: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The left sleeve's polygon, its end (two points) and the arm's direction, for a model's left arm (-x)."""
  top = np.array([-p.shoulder, SHOULDER_Y + 0.02])
  pit = np.array([-p.shoulder + 0.05, ARMPIT_Y])
  down = np.array([-math.sin(arm_angle), math.cos(arm_angle)])
  across = np.array([math.cos(arm_angle), math.sin(arm_angle)])
  centre = (top + pit) / 2 + p.sleeve * down
  end = np.stack([centre - p.sleeve_end * across, centre + p.sleeve_end * across])
  return np.stack([top, end[0], end[1], pit]), end, down


def _top_polygons(p: Product, arm_angle: float, bottom: float) -> list[np.ndarray]:
  """Torso (down to `bottom`, with the product's hem if `bottom` is its length) and sleeves."""
  nh = 0.13 if p.neckline not in ("boat", "strap") else 0.19
  waist = 0.27 * p.fit
  hem_half = p.width if bottom == p.length else max(waist, 0.28)
  left = [(-nh, NECK_Y), (-p.shoulder, SHOULDER_Y + 0.02), (-p.shoulder + 0.05, ARMPIT_Y)]
  if bottom > WAIST_Y + 0.1:
    left.append((-waist, WAIST_Y))
  hem = _hem_points(p, hem_half, bottom) if bottom == p.length else [(-hem_half, bottom), (hem_half, bottom)]
  right = [(-x, y) for x, y in reversed(left)]
  polygons = [np.array(left + hem + right, np.float64)]
  if p.sleeve > 0:
    sleeve, _, _ = _sleeve(p, arm_angle)
    polygons += [sleeve, _mirror(sleeve)]
  return polygons


def _bottom_polygons(p: Product, leg_spread: float, waist_y: float = WAIST_Y) -> list[np.ndarray]:
  """Trousers (pants, shorts, leggings) or a skirt from the waist down."""
  waist, hip = 0.27 * p.fit, 0.32 * p.fit
  if p.kind == "leggings":
    waist, hip = 0.25, 0.29
  if p.kind == "skirt":
    left = [(-waist, waist_y), (-hip, HIP_Y)] if p.width < 0.45 else [(-waist, waist_y)]
    hem = _hem_points(p, p.width, p.length)
    return [np.array(left + hem + [(-x, y) for x, y in reversed(left)], np.float64)]
  spread = leg_spread * (p.length - CROTCH_Y) / (ANKLE_Y - CROTCH_Y)
  leg_centre = 0.16 + spread + (0.02 if p.width > 0.14 else 0.0)
  left = [(-waist, waist_y), (-hip, HIP_Y), (-leg_centre - p.width, p.length), (-leg_centre + p.width, p.length)]
  crotch = [(0.0, CROTCH_Y)]
  return [np.array(left + crotch + [(-x, y) for x, y in reversed(left)], np.float64)]


def garment_polygons(p: Product, arm_angle: float = 0.3, leg_spread: float = 0.05) -> list[np.ndarray]:
  """The product's silhouette as polygons `[n, 2]` in body coordinates (their union is the garment)."""
  if p.kind in TOP_KINDS:
    return _top_polygons(p, arm_angle, p.length)
  if p.kind in BOTTOM_KINDS:
    return _bottom_polygons(p, leg_spread)
  if p.kind == "dress":
    bodice = _top_polygons(p, arm_angle, WAIST_Y + 0.02)
    skirt = np.array([(-0.27 * p.fit, WAIST_Y)] + _hem_points(p, p.width, p.length) + [(0.27 * p.fit, WAIST_Y)])
    return bodice + [skirt]
  # Jumpsuit or romper: a top down to the waist on trousers.
  return _top_polygons(p, arm_angle, WAIST_Y + 0.05) + _bottom_polygons(p, leg_spread, WAIST_Y - 0.02)


# --------------------------------------------------------------------------------------------------------------
# Rendering.

@functools.lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
  return x, y


class _Canvas:
  """An image being drawn, with the view's map from body coordinates to pixels."""

  def __init__(self, size: int, matrix: np.ndarray, offset: np.ndarray, background: np.ndarray):
    self.size = size
    self.matrix, self.offset = matrix, offset
    self.image = Image.fromarray(background)
    self.draw = ImageDraw.Draw(self.image)

  def to_pixels(self, points: np.ndarray) -> list[tuple[float, float]]:
    return [tuple(q) for q in (np.asarray(points, np.float64) @ self.matrix.T + self.offset).tolist()]

  def polygon(self, points: np.ndarray, fill: Colour, outline: Colour | None = None):
    outline = None if outline is None else tuple(outline)
    self.draw.polygon(self.to_pixels(points), fill=tuple(fill), outline=outline)

  def line(self, points: np.ndarray, fill: Colour, width: float):
    self.draw.line(self.to_pixels(points), fill=tuple(fill), width=max(1, int(round(width * self.unit))))

  @property
  def unit(self) -> float:
    """Pixels per body unit."""
    return float(abs(np.linalg.det(self.matrix)) ** 0.5)

  def body_coordinates(self) -> tuple[np.ndarray, np.ndarray]:
    """Body coordinates (u, v) `[size, size]` of every pixel centre."""
    x, y = _pixel_grid(self.size)
    inverse = np.linalg.inv(self.matrix).astype(np.float32)
    dx, dy = x - np.float32(self.offset[0]), y - np.float32(self.offset[1])
    return inverse[0, 0] * dx + inverse[0, 1] * dy, inverse[1, 0] * dx + inverse[1, 1] * dy


def _background(view: View, size: int) -> np.ndarray:
  c0, c1 = (np.asarray(c, np.float32) for c in view.background_colours)
  t = np.linspace(0.0, 1.0, size, dtype=np.float32)
  if view.background == "gradient":
    ramp = t[:, None, None] if view.background_param > 0.5 else t[None, :, None]
    image = c0 + (c1 - c0) * ramp
  elif view.background == "floor":
    horizon = int(size * (0.55 + 0.35 * view.background_param))
    image = np.broadcast_to(c0, (size, size, 3)).copy()
    image[horizon:] = c1 * 0.85
  elif view.background == "noise":
    rng = np.random.default_rng(view.noise_seed)
    coarse = (rng.uniform(-40, 40, (5, 5, 3)) + c0).clip(0, 255).astype(np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), np.float32)
  elif view.background == "clutter":
    return _clutter(view, size)
  else:  # studio, plain: a soft vignette keeps a plain wall from being perfectly flat
    r2 = (t[:, None] - 0.5) ** 2 + (t[None, :] - 0.5) ** 2
    image = c0 * (1.0 - 0.12 * view.background_param * r2[..., None])
  return np.broadcast_to(image, (size, size, 3)).clip(0, 255).astype(np.uint8)


def _clutter(view: View, size: int) -> np.ndarray:
  """A street scene stand-in: a wall and floor under a few dozen overlapping boxes, discs and bars."""
  rng = np.random.default_rng([view.noise_seed, 1])  # Not the pixel noise's stream.
  c0, c1 = view.background_colours
  image = Image.new("RGB", (size, size), c0)
  draw = ImageDraw.Draw(image)
  draw.rectangle([0, int(size * (0.55 + 0.35 * view.background_param)), size, size], fill=_scale(c1, 0.85))
  palette = list(COLOURS.values()) + list(_BACKDROPS)
  for _ in range(int(view.background_param * 40) + 12):
    x, y = rng.uniform(-0.1, 1.1, 2) * size
    w, h = rng.uniform(0.04, 0.3, 2) * size
    colour = tuple(palette[int(rng.integers(len(palette)))])
    shape = int(rng.integers(3))
    if shape == 0:
      draw.rectangle([x, y, x + w, y + h], fill=colour, outline=_scale(colour, 0.6))
    elif shape == 1:
      draw.ellipse([x, y, x + w, y + w], fill=colour)
    else:
      draw.line([x, y, x + w, y + h * rng.choice((-1, 1))], fill=colour, width=max(1, int(size * 0.015)))
  return np.asarray(image)


def _frame(polygons: list[np.ndarray], view: View, size: int) -> tuple[np.ndarray, np.ndarray]:
  """The affine map (matrix `[2, 2]`, offset `[2]`) from body coordinates to pixels for this view."""
  if view.view_type == "full":
    lo, hi = np.array([-0.6, -1.3]), np.array([0.6, 1.9])
  else:
    points = np.concatenate(polygons)
    lo, hi = points.min(axis=0), points.max(axis=0)
  centre = (lo + hi) / 2
  half = max(float(np.max(hi - lo)) / 2, 0.35) * 1.1
  centre = centre + np.asarray(view.centre) * half
  scale = size / (2 * half) * view.zoom
  c, s = math.cos(view.rotation), math.sin(view.rotation)
  flip = -1.0 if view.flip else 1.0
  matrix = scale * np.array([[c, -s], [s, c]]) @ np.diag([flip * view.squash, 1.0])
  offset = np.array([size / 2, size / 2]) + np.asarray(view.shift) * size - matrix @ centre
  return matrix, offset


def _pattern(p: Product, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Fill colour `[H, W, 3]` float32 of the product's fabric at body coordinates u, v `[H, W]`."""
  main, second, trim = (np.asarray(c, np.float32) for c in (p.main, p.second, p.trim))
  period, duty = p.pattern_period, p.pattern_duty
  ph0, ph1 = p.pattern_phase
  frac = lambda t: t - np.floor(t)
  if p.pattern == "solid":
    mask = np.zeros_like(u)
  elif p.pattern in ("hstripes", "vstripes", "diagonal"):
    a = {"hstripes": math.pi / 2, "vstripes": 0.0}.get(p.pattern, p.pattern_angle)
    mask = (frac((u * math.cos(a) + v * math.sin(a)) / period + ph0) < duty).astype(np.float32)
  elif p.pattern == "checks":  # gingham: crossings full, single bands half
    mask = 0.5 * ((frac(u / period + ph0) < 0.5).astype(np.float32) + (frac(v / period + ph1) < 0.5))
  elif p.pattern == "plaid":
    wide = np.maximum(frac(u / (2 * period) + ph0) < 0.35, frac(v / (2 * period) + ph1) < 0.35) * 0.7
    thin = np.maximum(np.abs(frac(u / (2 * period) + ph0) - 0.7) < 0.04, np.abs(frac(v / (2 * period) + ph1) - 0.7)
                      < 0.04)
    colour = main + (second - main) * wide[..., None]
    return np.where(thin[..., None], trim, colour).astype(np.float32)
  elif p.pattern == "dots":
    row = np.floor(v / period + ph1)
    du = frac(u / period + ph0 + 0.5 * (row % 2)) - 0.5
    dv = frac(v / period + ph1) - 0.5
    mask = (du * du + dv * dv < duty * duty).astype(np.float32)
  elif p.pattern == "chevron":
    zig = np.abs(frac(u / period + ph0) - 0.5) * period * 1.2
    mask = (frac((v + zig) / period + ph1) < duty).astype(np.float32)
  elif p.pattern == "floral":  # one blob per lattice cell, jittered by a hash of the cell and the product seed
    cu, cv = np.floor(u / period), np.floor(v / period)
    h = np.sin(cu * 12.9898 + cv * 78.233 + (p.pattern_seed % 1000) * 0.618) * 43758.5453
    jx, jy = frac(h), frac(h * 1.37)
    du, dv = frac(u / period) - (0.25 + 0.5 * jx), frac(v / period) - (0.25 + 0.5 * jy)
    blob = du * du + dv * dv < (0.12 + 0.1 * frac(h * 2.1)) ** 2
    colour = np.where((frac(h * 3.3) < 0.5)[..., None], second, trim)
    return np.where(blob[..., None], colour, main).astype(np.float32)
  elif p.pattern == "block":  # colour blocking: the garment split in two at a slanted line
    mask = (v * math.cos(p.pattern_angle * 0.3) + u * math.sin(p.pattern_angle * 0.3)
            > (-0.35 if p.kind in TOP_KINDS else 0.5) + period).astype(np.float32)
  elif p.pattern == "band":  # a chest band (knit "fair isle") of the second colour with trim edges
    top = -0.5 + period if p.kind not in BOTTOM_KINDS else 0.4 + period
    inside = (v > top) & (v < top + 0.2)
    edge = (np.abs(v - top) < 0.025) | (np.abs(v - top - 0.2) < 0.025)
    colour = np.where(inside[..., None], second, main)
    return np.where(edge[..., None], trim, colour).astype(np.float32)
  else:
    raise ValueError(f"Unknown pattern {p.pattern!r}; expected one of {PATTERNS}.")
  return main + (second - main) * mask[..., None]


def _fabric_shading(p: Product, view: View, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Multiplicative shading `[H, W]`: light gradient, folds and the fabric's texture."""
  shade = 1.0 + view.light[0] * u + view.light[1] * v
  for x, depth in view.folds:
    shade = shade - depth * np.exp(-((u - x) / 0.04) ** 2) * (v > 0.1 if p.kind in BOTTOM_KINDS else 1.0)
  if p.texture == "denim":
    shade = shade * (1.0 + 0.12 * np.exp(-((np.abs(u) - 0.17) / 0.06) ** 2) * (v > 0.3)
                     + 0.05 * np.sign(np.sin((u + v) * 180.0)))
  elif p.texture == "knit":
    shade = shade * (1.0 + 0.05 * np.sign(np.sin(u * 160.0)))
  return shade.astype(np.float32)


def _shape(name: str, cx: float, cy: float, r: float) -> list[np.ndarray]:
  """A logo shape of radius r at (cx, cy) as polygons (drawn in order)."""
  if name in ("circle", "ring"):
    return [_ellipse(cx, cy, r, r, 16)]
  if name == "triangle":
    return [np.array([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)])]
  if name == "square":
    return [_rect(cx - 0.8 * r, cy - 0.8 * r, cx + 0.8 * r, cy + 0.8 * r)]
  if name == "diamond":
    return [np.array([(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)])]
  if name == "star":
    t = -np.pi / 2 + np.arange(10) * np.pi / 5
    rad = np.where(np.arange(10) % 2, 0.45 * r, r)
    return [np.stack([cx + rad * np.cos(t), cy + rad * np.sin(t)], axis=1)]
  if name == "heart":
    return [_ellipse(cx - 0.45 * r, cy - 0.3 * r, 0.5 * r, 0.5 * r), _ellipse(cx + 0.45 * r, cy - 0.3 * r, 0.5 * r,
                                                                              0.5 * r),
            np.array([(cx - 0.93 * r, cy - 0.15 * r), (cx + 0.93 * r, cy - 0.15 * r), (cx, cy + r)])]
  if name == "cross":
    return [_rect(cx - r, cy - 0.3 * r, cx + r, cy + 0.3 * r), _rect(cx - 0.3 * r, cy - r, cx + 0.3 * r, cy + r)]
  if name == "bars":
    return [_rect(cx - r, cy - r + i * 0.7 * r, cx + r * (1 - 0.3 * (i % 2)), cy - r + i * 0.7 * r + 0.4 * r)
            for i in range(3)]
  raise ValueError(f"Unknown logo shape {name!r}; expected one of {LOGO_SHAPES}.")


def _draw_model_behind(canvas: _Canvas, p: Product, view: View):
  """Legs, arms, neck and the model's other garment, all behind the product."""
  skin, shoe = p.skin, (40, 36, 34)
  for sign in (-1.0, 1.0):
    hip = np.array([sign * 0.15, 0.3])
    ankle = np.array([sign * (0.16 + view.leg_spread), ANKLE_Y])
    canvas.line(np.stack([hip, ankle]), skin, 0.13)
    canvas.polygon(_ellipse(ankle[0] + sign * 0.03, ankle[1] + 0.06, 0.09, 0.05), shoe)
    shoulder = np.array([sign * 0.33, SHOULDER_Y + 0.1])
    down = np.array([sign * math.sin(view.arm_angle), math.cos(view.arm_angle)])
    hand = shoulder + 1.0 * down
    canvas.line(np.stack([shoulder, hand]), skin, 0.1)
    canvas.polygon(_ellipse(hand[0], hand[1] + 0.03, 0.055, 0.07), skin)
  canvas.polygon(_rect(-0.07, -0.9, 0.07, NECK_Y + 0.05), skin)
  if p.kind in BOTTOM_KINDS:  # a plain top over the torso, tucked under the product's waistband
    plain = dataclasses.replace(p, neckline="crew", sleeve=0.28, sleeve_end=0.12, shoulder=0.37, width=0.32,
                                fit=1.0, length=0.25, hem="straight")
    for poly in _top_polygons(plain, view.arm_angle, 0.25):
      canvas.polygon(poly, p.companion, outline=_scale(p.companion, 0.8))
    canvas.polygon(_ellipse(0.0, NECK_Y + 0.02, 0.1, 0.06), skin)
  elif p.kind in TOP_KINDS and p.length < 1.0:  # trousers under a top
    trousers = dataclasses.replace(p, kind="pants", fit=1.0, width=0.1, length=ANKLE_Y - 0.03)
    for poly in _bottom_polygons(trousers, view.leg_spread):
      canvas.polygon(poly, p.companion, outline=_scale(p.companion, 0.8))


def _draw_head(canvas: _Canvas, p: Product, view: View):
  cx, cy = HEAD_CENTRE
  if view.view_type == "back":
    canvas.polygon(_ellipse(cx, cy, HEAD_RADIUS * 1.05, HEAD_RADIUS * 1.1), p.hair)
    return
  canvas.polygon(_ellipse(cx, cy - 0.03, HEAD_RADIUS * 1.1, HEAD_RADIUS * 1.05), p.hair)
  canvas.polygon(_ellipse(cx, cy + 0.03, HEAD_RADIUS * 0.85, HEAD_RADIUS), p.skin)


def _neck_hole(p: Product) -> np.ndarray | None:
  """The neckline cut (front view) as a polygon, or None when the neckline covers the neck."""
  nh = 0.13
  if p.neckline in ("round", "crew"):
    return _ellipse(0.0, NECK_Y, nh, 0.12 if p.neckline == "round" else 0.07, 16)
  if p.neckline == "v" or p.neckline == "hood":
    return np.array([(-nh, NECK_Y - 0.01), (nh, NECK_Y - 0.01), (0.0, NECK_Y + 0.28)])
  if p.neckline == "square":
    return _rect(-0.15, NECK_Y - 0.01, 0.15, NECK_Y + 0.16)
  if p.neckline in ("boat", "strap"):
    boat = p.neckline == "boat"
    return _ellipse(0.0, NECK_Y, 0.19 if boat else 0.17, 0.07 if boat else 0.15, 16)
  if p.neckline in ("collar", "mandarin", "lapels"):
    return np.array([(-0.09, NECK_Y - 0.01), (0.09, NECK_Y - 0.01), (0.0, NECK_Y + 0.14)])
  return None


def _draw_details(canvas: _Canvas, p: Product, view: View):
  """Necklines, closures, pockets, logos, cuffs and belts over the filled silhouette."""
  back = view.view_type == "back"
  seam = _scale(p.main, 0.7)
  light = _mix(p.main, (255, 255, 255), 0.35)
  is_top = p.kind not in BOTTOM_KINDS
  skin_or_inside = p.skin if view.on_model else _scale(p.main, 0.55)
  bottom_y = WAIST_Y if p.kind in BOTTOM_KINDS else (WAIST_Y + 0.03 if p.kind in ("jumpsuit", "romper") else None)

  if is_top:
    if p.neckline == "strap":  # straps over the shoulders, the top of the torso cut away
      canvas.polygon(_ellipse(0.0, NECK_Y - 0.02, 0.17, 0.15, 16), skin_or_inside)
      for sign in (-1, 1):
        canvas.line(np.array([(sign * 0.2, NECK_Y + 0.02), (sign * 0.22, SHOULDER_Y - 0.06)]), p.main, 0.05)
    elif p.neckline == "turtle":
      canvas.polygon(_rect(-0.12, NECK_Y - 0.13, 0.12, NECK_Y + 0.03), p.main, outline=seam)
      canvas.line(np.array([(-0.12, NECK_Y - 0.05), (0.12, NECK_Y - 0.05)]), seam, 0.012)
    elif back:
      canvas.polygon(_ellipse(0.0, NECK_Y - 0.01, 0.12, 0.04, 12), skin_or_inside)
      if p.neckline == "hood":  # the hood lies on the upper back
        canvas.polygon(np.array([(-0.22, NECK_Y - 0.02), (0.22, NECK_Y - 0.02), (0.16, -0.38), (0.0, -0.3),
                                 (-0.16, -0.38)]), _scale(p.main, 0.9), outline=seam)
      elif p.neckline in ("collar", "lapels", "mandarin"):
        canvas.polygon(_rect(-0.15, NECK_Y - 0.05, 0.15, NECK_Y + 0.04), p.main, outline=seam)
    else:
      if p.neckline == "hood":  # the hood behind the neck
        canvas.polygon(_ellipse(0.0, NECK_Y - 0.02, 0.24, 0.1, 16), _scale(p.main, 0.8), outline=seam)
      if p.kind in ("jacket", "coat", "vest") and p.neckline in ("lapels", "v", "round"):
        close_y = -0.22 if p.neckline == "lapels" else -0.3
        canvas.polygon(np.array([(-0.13, NECK_Y - 0.01), (0.13, NECK_Y - 0.01), (0.0, close_y)]),
                       p.inner if view.on_model or p.kind != "vest" else skin_or_inside)
        if "suit" in CATEGORY_STYLES[p.category].extras:  # a tie
          canvas.polygon(np.array([(-0.025, NECK_Y + 0.02), (0.025, NECK_Y + 0.02), (0.035, close_y - 0.02),
                                   (0.0, close_y + 0.02), (-0.035, close_y - 0.02)]), p.trim)
        if p.neckline == "lapels":
          for sign in (-1, 1):
            canvas.polygon(np.array([(sign * 0.13, NECK_Y - 0.02), (sign * 0.25, -0.52), (sign * 0.17, -0.48),
                                     (sign * 0.01, close_y)]), _scale(p.main, 0.92), outline=seam)
      else:
        hole = _neck_hole(p)
        if hole is not None:
          canvas.polygon(hole, skin_or_inside)
        if p.neckline == "crew" or (p.cuffs and p.neckline == "round"):
          rib = _ellipse(0.0, NECK_Y, 0.13, 0.07, 16)[0:9]  # the lower half of the neck hole
          canvas.line(rib, p.trim if p.cuffs else seam, 0.03)
        if p.neckline == "collar":
          collar = p.trim if p.cuffs else p.main
          for sign in (-1, 1):
            canvas.polygon(np.array([(sign * 0.01, NECK_Y + 0.13), (sign * 0.15, NECK_Y - 0.04),
                                     (sign * 0.17, NECK_Y + 0.1), (sign * 0.08, NECK_Y + 0.17)]), collar,
                           outline=seam)
        elif p.neckline == "mandarin":
          canvas.polygon(_rect(-0.13, NECK_Y - 0.07, 0.13, NECK_Y + 0.01), p.main, outline=seam)
        elif p.neckline == "hood":
          for sign in (-1, 1):
            canvas.line(np.array([(sign * 0.05, NECK_Y + 0.1), (sign * 0.06, NECK_Y + 0.35)]), p.trim, 0.02)

  # Closures.
  hem_y = p.length if p.kind in TOP_KINDS else (bottom_y if bottom_y is not None else WAIST_Y)
  if not back and is_top:
    if p.zip:
      canvas.line(np.array([(0.0, NECK_Y + 0.02), (0.0, hem_y)]), (170, 170, 175), 0.025)
    if p.placket != "none" or p.buttons:
      top_y = NECK_Y + (0.14 if p.neckline in ("collar", "mandarin") else 0.12)
      if p.kind in ("jacket", "coat", "vest"):
        top_y = -0.22 if p.neckline == "lapels" else -0.3
      end_y = top_y + 0.35 if p.placket == "half" else hem_y - 0.05
      if p.placket != "none":
        canvas.polygon(_rect(-0.035, top_y, 0.035, end_y + 0.03), p.main, outline=seam)
      columns = (-0.07, 0.07) if p.double_breasted else (0.0,)
      for i in range(p.buttons):
        y = top_y + 0.04 + (end_y - top_y - 0.04) * (i / max(1, p.buttons - 1) if p.buttons > 1 else 0.0)
        for x in columns:
          button = _scale(p.main, 0.5) if p.kind == "top" else p.trim
          canvas.polygon(_ellipse(x, y, 0.022, 0.022, 8), button)
  if not back and p.kind in BOTTOM_KINDS + ("jumpsuit", "romper") and p.kind not in ("skirt", "leggings"):
    canvas.line(np.array([(0.0, WAIST_Y + 0.05), (0.02, CROTCH_Y - 0.07)]), seam, 0.012)  # fly

  # Pockets.
  if p.pockets != "none":
    pocket_fill = _scale(p.main, 0.95)
    if (p.pockets in ("jeans", "patch", "flap") and not is_top) or p.kind in ("jumpsuit", "romper"):
      if back and p.pockets in ("jeans", "patch", "flap"):
        for sign in (-1, 1):
          patch = [(0.07, 0.12), (0.24, 0.12), (0.23, 0.3), (0.155, 0.34), (0.08, 0.3)]
          canvas.polygon(np.array(patch) * np.array([sign, 1.0]), pocket_fill, outline=seam)
      elif not back and p.kind != "skirt":
        for sign in (-1, 1):
          canvas.line(np.array([(sign * 0.16, WAIST_Y + 0.03), (sign * 0.27 * p.fit, 0.16)]), seam, 0.02)
      elif not back:
        for sign in (-1, 1):
          canvas.polygon(_rect(sign * 0.08, 0.12, sign * 0.24, 0.3), pocket_fill, outline=seam)
    elif not back and p.pockets == "kangaroo":
      canvas.polygon(np.array([(-0.2, -0.05), (0.2, -0.05), (0.26, min(0.2, hem_y - 0.08)), (-0.26,
                     min(0.2, hem_y - 0.08))]), pocket_fill, outline=seam)
    elif not back and p.pockets in ("chest", "chest2"):
      for sign in ((1,) if p.pockets == "chest" else (-1, 1)):
        canvas.polygon(_rect(sign * 0.1, -0.5, sign * 0.24, -0.36), pocket_fill, outline=seam)
    elif not back and p.pockets in ("hip", "flap"):
      y0 = min(0.05, hem_y - 0.2)
      for sign in (-1, 1):
        canvas.polygon(_rect(sign * 0.1, y0, sign * 0.26, y0 + 0.12), pocket_fill, outline=seam)
        if p.pockets == "flap":
          canvas.polygon(_rect(sign * 0.09, y0 - 0.02, sign * 0.27, y0 + 0.04), _scale(p.main, 0.85), outline=seam)

  # Logo or graphic.
  if p.logo != "none" and not back:
    cx, cy = p.logo_centre
    for poly in _shape(p.logo, cx, cy, p.logo_size):
      canvas.polygon(poly, p.logo_colour)
    if p.logo == "ring":
      canvas.polygon(_ellipse(cx, cy, 0.55 * p.logo_size, 0.55 * p.logo_size, 16), p.main)
    for i in range(p.graphic_bars):
      y = cy + p.logo_size * 1.3 + i * 0.055
      canvas.polygon(_rect(cx - p.logo_size * (1.0 - 0.25 * i), y, cx + p.logo_size * (1.0 - 0.25 * i), y + 0.03),
                     p.logo_colour)

  # Cuffs, hem bands, belts, stripes, pleats, rips.
  if p.cuffs:
    if p.sleeve > 0.2:
      _, end, down = _sleeve(p, view.arm_angle)
      for sign in (1.0, -1.0):
        cuff = np.concatenate([end, end[::-1] - 0.06 * down]) * np.array([sign, 1.0])
        canvas.polygon(cuff, p.trim, outline=seam)
    if p.kind in ("top", "jacket") and p.hem == "straight":
      canvas.polygon(_rect(-p.width, p.length - 0.07, p.width, p.length), p.trim, outline=seam)
    if p.kind in ("pants", "shorts", "jumpsuit", "romper"):
      spread = view.leg_spread * (p.length - CROTCH_Y) / (ANKLE_Y - CROTCH_Y)
      centre = 0.16 + spread + (0.02 if p.width > 0.14 else 0.0)
      for sign in (-1, 1):
        canvas.polygon(_rect(sign * centre - p.width, p.length - 0.07, sign * centre + p.width, p.length), p.trim
                       if p.kind != "shorts" else light, outline=seam)
  if p.kind in BOTTOM_KINDS:
    canvas.polygon(_rect(-0.27 * p.fit, WAIST_Y, 0.27 * p.fit, WAIST_Y + 0.06), _scale(p.main, 0.85), outline=seam)
  if p.belt:
    y = WAIST_Y if p.kind != "dress" else WAIST_Y - 0.01
    canvas.polygon(_rect(-0.29 * p.fit, y - 0.005, 0.29 * p.fit, y + 0.055), p.belt_colour)
    if not back:
      canvas.polygon(_rect(-0.04, y - 0.015, 0.04, y + 0.065), (196, 176, 110))
  if p.side_stripe:
    for sign in (-1, 1):
      if p.kind == "leggings" or p.kind in ("pants", "shorts", "jumpsuit", "romper"):
        spread = view.leg_spread * (p.length - CROTCH_Y) / (ANKLE_Y - CROTCH_Y)
        centre = 0.16 + spread + (0.02 if p.width > 0.14 else 0.0)
        top, bottom = np.array([sign * 0.31 * p.fit, HIP_Y]), np.array([sign * (centre + p.width), p.length])
        canvas.line(np.stack([top, bottom]) - np.array([sign * 0.03, 0.0]), p.trim, 0.04)
  for i in range(p.pleats):
    x = -0.25 + 0.5 * (i + 0.5) / p.pleats
    canvas.line(np.array([(x, WAIST_Y + 0.08), (x * p.width / 0.27, p.length - 0.02)]), seam, 0.012)
  for x, y, r in p.rips:
    if y < p.length - 0.05:
      canvas.polygon(_ellipse(x, y, r * 1.4, r * 0.6, 10), _mix(p.main, (235, 235, 235), 0.6))


def render(product: Product, view: View, image_size: int, supersample: int = 2) -> np.ndarray:
  """Draws one photo of a product.

  Args:
    product: what is photographed.
    view: how.
    image_size: side of the square image in pixels.
    supersample: draw at this many times the size, then average down (anti-aliasing).

  Returns:
    The photo, `uint8 [image_size, image_size, 3]`.
  """
  if image_size < 8 or supersample < 1:
    raise ValueError(f"image_size must be >= 8 and supersample >= 1, got {image_size} and {supersample}.")
  size = image_size * supersample
  polygons = garment_polygons(product, view.arm_angle, view.leg_spread)
  matrix, offset = _frame(polygons, view, size)
  canvas = _Canvas(size, matrix, offset, _background(view, size))

  if view.on_model:
    _draw_model_behind(canvas, product, view)
  # The silhouette, filled with the fabric: pattern times shading where the polygons' mask is set.
  mask_image = Image.new("L", (size, size), 0)
  mask_draw = ImageDraw.Draw(mask_image)
  for poly in polygons:
    mask_draw.polygon(canvas.to_pixels(poly), fill=255)
  mask = np.asarray(mask_image) > 127
  u, v = canvas.body_coordinates()
  fabric = _pattern(product, u, v) * _fabric_shading(product, view, u, v)[..., None]
  pixels = np.asarray(canvas.image).copy()
  pixels[mask] = fabric[mask].clip(0, 255).astype(np.uint8)
  canvas.image.paste(Image.fromarray(pixels))
  seam = _scale(product.main, 0.7)
  for poly in polygons:
    canvas.draw.polygon(canvas.to_pixels(poly), outline=seam)
  _draw_details(canvas, product, view)
  if view.on_model:
    _draw_head(canvas, product, view)

  if view.occluder != "none":
    cx, cy, rx, ry = (q * size for q in view.occluder_box)
    box = [cx - rx, cy - ry, cx + rx, cy + ry]
    if view.occluder == "box":
      canvas.draw.rectangle(box, fill=view.occluder_colour, outline=_scale(view.occluder_colour, 0.6))
    else:
      canvas.draw.ellipse(box, fill=view.occluder_colour)

  image = canvas.image.reduce(supersample) if supersample > 1 else canvas.image
  pixels = np.asarray(image, np.float32)
  mean = pixels.mean()
  pixels = (pixels - mean) * view.contrast + mean
  pixels = pixels * view.brightness * np.asarray(view.cast, np.float32)
  noise_rng = np.random.default_rng(view.noise_seed)
  pixels += noise_rng.normal(0.0, view.noise, pixels.shape).astype(np.float32)
  return pixels.clip(0, 255).round().astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------
# Consumer and shop photos (the consumer-to-shop variant).

@dataclasses.dataclass(frozen=True)
class ConsumerPhotos:
  """How street photos of a product differ from its shop photos (the consumer-to-shop variant).

  A consumer photo shows the garment small and off-centre, on clutter, often partly hidden; a shop photo
  shows it alone, centred, on a studio background, unoccluded.
  """
  # The garment's longer side as a fraction of the image side, drawn uniformly from this range.
  garment_scale: tuple[float, float] = (0.3, 0.55)
  # Probability that something hides part of the garment.
  occlusion_prob: float = 0.8
  # Side of the occluder relative to the garment's (so it hides very roughly this fraction's square).
  occluder_scale: tuple[float, float] = (0.25, 0.55)
  # Probability that a consumer photo shows the garment worn (on a model).
  model_prob: float = 0.9
  # Fraction of the train split's photos that are consumer photos (the rest are shop photos).
  train_consumer_fraction: float = 0.5

  def __post_init__(self):
    lo, hi = self.garment_scale
    if not 0.05 <= lo <= hi <= 0.9:
      raise ValueError(f"ConsumerPhotos.garment_scale must satisfy 0.05 <= lo <= hi <= 0.9, got "
                       f"{self.garment_scale}.")
    lo, hi = self.occluder_scale
    if not 0.0 < lo <= hi <= 1.0:
      raise ValueError(f"ConsumerPhotos.occluder_scale must satisfy 0 < lo <= hi <= 1, got {self.occluder_scale}.")
    for name in ("occlusion_prob", "model_prob", "train_consumer_fraction"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"ConsumerPhotos.{name} is a probability, got {getattr(self, name)}.")


def consumer_view(rng: np.random.Generator, view: View, photos: ConsumerPhotos = ConsumerPhotos()) -> View:
  """A street photo from a view: the garment small and off-centre, on clutter, often partly occluded.

  Args:
    rng: the consumer photo's own generator (seed it from (dataset seed, item id, view index)).
    view: the view it starts from (its lighting, pose, flip and rotation are kept).
    photos: the consumer photo knobs.

  Returns:
    The consumer photo's view.
  """
  scale = float(rng.uniform(*photos.garment_scale))
  # `_frame` makes the garment's longer side size * zoom / 1.1; a shift keeps it inside the image.
  room = (1.0 - scale) / 2 * 0.9
  shift = (float(rng.uniform(-room, room)), float(rng.uniform(-room, room)))
  occluder, occluder_box = "none", view.occluder_box
  if rng.random() < photos.occlusion_prob:
    occluder = _pick(rng, ("box", "blob"))
    radius = scale * float(rng.uniform(*photos.occluder_scale)) / 2
    # Centred on the garment's edge region, so that it hides part of it, never all.
    offset = rng.uniform(-0.4, 0.4, 2) * scale
    occluder_box = (0.5 + shift[0] + float(offset[0]), 0.5 + shift[1] + float(offset[1]),
                    radius * float(rng.uniform(0.7, 1.3)), radius * float(rng.uniform(0.7, 1.3)))
  return dataclasses.replace(
      view, view_type=view.view_type if view.view_type in ("front", "side", "back") else "front",
      on_model=bool(rng.random() < photos.model_prob), zoom=scale * 1.1, centre=(0.0, 0.0), shift=shift,
      background="clutter", background_colours=(_pick(rng, _BACKDROPS), _pick(rng, _STUDIO + _BACKDROPS)),
      background_param=float(rng.uniform(0.0, 1.0)), occluder=occluder, occluder_box=occluder_box)


def shop_view(view: View) -> View:
  """A clean shop photo from a view: the garment alone, centred, upright, on a studio background."""
  return dataclasses.replace(
      view, view_type=view.view_type if view.view_type in ("front", "side", "back") else "front",
      rotation=0.0, zoom=1.0, centre=(0.0, 0.0), shift=(0.0, 0.0), background="studio",
      background_colours=(_STUDIO[0], _STUDIO[0]), occluder="none")


# --------------------------------------------------------------------------------------------------------------
# Annotations: what the renderer knows about a photo, in the In-shop annotation features' terms.

# Colour families of the `colour:` attributes; each named colour belongs to one.
COLOUR_FAMILIES = {
    "white": ("white", "cream"), "beige": ("beige", "camel", "khaki"), "brown": ("brown",),
    "black": ("black", "charcoal"), "grey": ("grey", "lightgrey"),
    "blue": ("navy", "blue", "skyblue", "denim", "darkdenim", "lightdenim"), "green": ("teal", "green", "olive",
                                                                                      "mint"),
    "yellow": ("yellow", "mustard"), "orange": ("orange", "coral"), "red": ("red", "burgundy"),
    "pink": ("pink", "hotpink"), "purple": ("lilac", "purple"),
}
_FAMILY_OF = {colour: family for family, colours in COLOUR_FAMILIES.items() for colour in colours}
# The attribute vocabulary: one group per property, each value an attribute (1 has it, -1 has not,
# 0 not applicable, e.g. the sleeves of trousers).
ATTRIBUTE_NAMES = (tuple(f"pattern:{p}" for p in PATTERNS) + tuple(f"sleeve:{s}" for s in SLEEVE_LENGTHS)
                   + tuple(f"neckline:{n}" for n in NECKLINES) + tuple(f"colour:{c}" for c in COLOUR_FAMILIES))


def colour_family(colour: Colour) -> str:
  """The family (`COLOUR_FAMILIES`) of the named colour nearest to an RGB colour."""
  names = list(COLOURS)
  distances = [sum((a - b) ** 2 for a, b in zip(colour, COLOURS[n])) for n in names]
  return _FAMILY_OF[names[int(np.argmin(distances))]]


def product_attributes(product: Product) -> np.ndarray:
  """`[len(ATTRIBUTE_NAMES)]` int8: 1 for the product's pattern, sleeve, neckline and colour family, -1 for
  the other values of each group, 0 for groups that do not apply (sleeves and necklines of bottoms)."""
  is_top = product.kind not in BOTTOM_KINDS
  sleeve = next(name for name, length in SLEEVE_LENGTHS.items() if length == product.sleeve)
  groups = ((PATTERNS, product.pattern, True), (tuple(SLEEVE_LENGTHS), sleeve, is_top),
            (NECKLINES, product.neckline, is_top),
            (tuple(COLOUR_FAMILIES), colour_family(product.main), True))
  values = []
  for names, value, applies in groups:
    values += [(1 if name == value else -1) if applies else 0 for name in names]
  return np.asarray(values, np.int8)


def clothes_type(product: Product) -> int:
  """In-shop's clothes type code: 1 upper body, 2 lower body, 3 full body."""
  if product.kind in TOP_KINDS:
    return 1
  return 2 if product.kind in BOTTOM_KINDS else 3


def pose_type(view: View) -> int:
  """In-shop's pose type code: 1 frontal, 2 side, 3 back (worn), 4 zoom-out (full body), 5 zoom-in (close-up),
  6 stand-alone (laid flat)."""
  if view.view_type == "full":
    return 4
  if view.view_type == "additional":
    return 5
  if not view.on_model:
    return 6
  return {"front": 1, "side": 2, "back": 3}[view.view_type]


def _landmark_points(p: Product, view: View) -> dict[int, np.ndarray]:
  """Body coordinates of the product's landmarks, by slot of `inshop_features.LANDMARK_NAMES` (left = -x)."""
  points = {}
  upper = p.kind in TOP_KINDS + ("dress", "jumpsuit", "romper")
  if upper:
    nh = 0.13 if p.neckline not in ("boat", "strap") else 0.19
    points[0] = np.array([-nh, NECK_Y])
    if p.sleeve > 0:
      _, end, _ = _sleeve(p, view.arm_angle)
      points[2] = end.mean(axis=0)
    else:  # the armhole
      points[2] = np.array([-p.shoulder + 0.025, (SHOULDER_Y + 0.02 + ARMPIT_Y) / 2])
  if p.kind not in TOP_KINDS:  # bottoms and full-body garments have a waistline
    points[4] = np.array([-(0.25 if p.kind == "leggings" else 0.27 * p.fit), WAIST_Y])
  if p.kind in TOP_KINDS or p.kind in ("dress", "skirt"):
    points[6] = np.array(_hem_points(p, p.width, p.length)[0])
  else:  # trouser legs: the centre of the left leg's hem
    spread = view.leg_spread * (p.length - CROTCH_Y) / (ANKLE_Y - CROTCH_Y)
    points[6] = np.array([-(0.16 + spread + (0.02 if p.width > 0.14 else 0.0)), p.length])
  # Right landmarks mirror the left ones, except a slanted hem's, which is not symmetric.
  for left in (0, 2, 4, 6):
    if left in points:
      points[left + 1] = points[left] * np.array([-1.0, 1.0])
  if 6 in points and (p.kind in TOP_KINDS or p.kind in ("dress", "skirt")):
    points[7] = np.array(_hem_points(p, p.width, p.length)[-1])
  return points


@dataclasses.dataclass(frozen=True)
class Annotations:
  """What is true of one photo, in the terms of the In-shop annotation features.

  Attributes:
    bbox: `(x_1, y_1, x_2, y_2)` of the garment in pixels of the final image, clipped to it.
    landmarks: `[8, 3]` float32 `(visibility, x, y)` in the slots of `inshop_features.LANDMARK_NAMES`, x and
      y in pixels; visibility 0 visible, 1 under the occluder, 2 outside the image, -1 for slots the
      garment's clothes type does not have.
    clothes_type: 1 upper, 2 lower, 3 full body.
    pose_type: 1 frontal ... 6 stand-alone (`pose_type`).
  """
  bbox: tuple[float, float, float, float]
  landmarks: np.ndarray
  clothes_type: int
  pose_type: int


def annotate(product: Product, view: View, image_size: int, supersample: int = 2) -> Annotations:
  """The garment's box, landmarks and types in the photo that `render` draws with the same arguments.

  Geometry is exact: the box bounds the silhouette polygons (not the small details drawn over them, such as a
  hood behind the neck), mapped by the same transform as the pixels.
  """
  size = image_size * supersample
  polygons = garment_polygons(product, view.arm_angle, view.leg_spread)
  matrix, offset = _frame(polygons, view, size)
  to_image = lambda points: (np.asarray(points) @ matrix.T + offset) / supersample
  corners = to_image(np.concatenate(polygons))
  x1, y1 = np.clip(corners.min(axis=0), 0, image_size)
  x2, y2 = np.clip(corners.max(axis=0), 0, image_size)
  landmarks = np.zeros((8, 3), np.float32)
  landmarks[:, 0] = -1
  kind = clothes_type(product)
  points = _landmark_points(product, view)
  cx, cy, rx, ry = (q * image_size for q in view.occluder_box)
  for slot in (0, 1, 2, 3, 4, 5, 6, 7):
    if slot not in points or slot not in _SLOTS_OF_TYPE[kind]:
      continue
    x, y = to_image(points[slot])
    if not (0 <= x < image_size and 0 <= y < image_size):
      visibility = 2
    elif (view.occluder == "box" and abs(x - cx) <= rx and abs(y - cy) <= ry) or (view.occluder == "blob" and ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1):
      visibility = 1
    else:
      visibility = 0
    landmarks[slot] = (visibility, x, y)
  return Annotations(bbox=(float(x1), float(y1), float(x2), float(y2)), landmarks=landmarks, clothes_type=kind,
                     pose_type=pose_type(view))


_SLOTS_OF_TYPE = inshop_features.LANDMARK_SLOTS
