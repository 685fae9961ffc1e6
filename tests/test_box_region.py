"""`augment.box_region`: a record's box in pixels, grown by a margin and clipped, against hand-listed cases."""

import numpy as np
import pytest

from jaxret import augment

# (bbox ymin,xmin,ymax,xmax normalised, has_box, margin, H, W) -> (top, left, height, width) in pixels.
CASES = [
    ((0.25, 0.25, 0.75, 0.75), True, 0.0, 100, 200, (25.0, 50.0, 50.0, 100.0)),
    ((0.25, 0.25, 0.75, 0.75), True, 0.1, 100, 200, (20.0, 40.0, 60.0, 120.0)),
    ((0.0, 0.9, 0.5, 1.0), True, 0.2, 100, 100, (0.0, 88.0, 60.0, 12.0)),  # clipped at the top and right
    ((0.4, 0.4, 0.5, 0.5), False, 0.1, 64, 32, (0.0, 0.0, 64.0, 32.0)),  # no box: the whole image
]


@pytest.mark.parametrize("bbox,has_box,margin,height,width,expected", CASES)
def test_box_region_matches_hand_listed_boxes(bbox, has_box, margin, height, width, expected):
  got = augment.box_region(np.array(bbox, np.float32), np.bool_(has_box), margin, height, width)
  np.testing.assert_allclose(np.asarray(got, np.float64), np.array(expected), atol=1e-4)


def test_box_region_refuses_a_negative_margin():
  with pytest.raises(ValueError, match="margin must be >= 0"):
    augment.box_region(np.zeros(4, np.float32), np.bool_(True), -0.1, 10, 10)
