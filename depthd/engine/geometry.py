"""Camera geometry on the pinhole model: from a field of view to a focal length in pixels."""

from __future__ import annotations

import math


def focal_length_px(field_of_view_deg: float, width: int) -> float:
    """The focal length, in pixels of an image `width` wide, of a camera with this horizontal field of view."""
    return 0.5 * width / math.tan(math.radians(field_of_view_deg) / 2)
