"""The check that every builder of a downloaded release runs on each image before writing it."""

import io

from PIL import Image


def check_jpeg(data: bytes) -> tuple[int, int]:
  """Decodes a JPEG fully, so that a truncated or corrupt file is caught; returns `(height, width)`.

  Raises:
    ValueError: saying why the bytes are not a usable JPEG.
  """
  try:
    with Image.open(io.BytesIO(data)) as image:
      if image.format != "JPEG":
        raise ValueError(f"is a {image.format} file, not a JPEG")
      if image.mode not in ("RGB", "L"):
        # Grayscale is widened to 3 channels on read; CMYK and others would not fit `[H, W, 3]`.
        raise ValueError(f"is a {image.mode} JPEG; convert it to RGB")
      image.load()  # Decodes every scan; raises OSError on truncated or corrupt data.
      return image.height, image.width
  except Image.UnidentifiedImageError as e:
    raise ValueError("is not an image file (PIL cannot identify it)") from e
  except (OSError, SyntaxError, Image.DecompressionBombError) as e:
    raise ValueError(f"is not a readable JPEG ({e})") from e
