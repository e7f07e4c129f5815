"""The paper's experimental settings, defined once: the resolution grid, the crop sizes and how crops are named.

Crops have exactly two names in dynres: ``crop_side`` is a side ratio (torchvision's convention: resize the shorter
side to R / crop_side and keep the central R x R), ``crop_area`` the fraction of the shorter-side square kept (the
paper's 25/56/75/100%). :func:`crop_side` and :func:`crop_area` convert between them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

PAPER_GRID = (112, 168, 224, 280, 336, 392, 448)  # ResNet-50's grid: 0.5x..2x its train resolution
PAPER_TRAIN_RESOLUTION = 224
PAPER_CROPS = (0.25, 0.56, 0.75, 1.0)  # crop areas
DEFAULT_CROP_SIDE = 0.875  # torchvision's evaluation crop (resize 256, crop 224)


def scaled_grid(train_resolution: int, grid: Sequence[int] = PAPER_GRID) -> tuple[int, ...]:
    """The paper's grid at the same ratios to a model's train resolution (0.5x..2x)."""
    return tuple(int(round(r * train_resolution / PAPER_TRAIN_RESOLUTION)) for r in grid)


def crop_side(area: float) -> float:
    """The side ratio of a center crop that keeps ``area`` of the shorter-side square (paper's crop sizes)."""
    if not 0 < area <= 1:
        raise ValueError(f"crop area must be in (0, 1], got {area}")
    return math.sqrt(area)


def crop_area(side: float) -> float:
    """The area fraction a center crop of side ratio ``side`` keeps."""
    if not 0 < side <= 1:
        raise ValueError(f"crop side must be in (0, 1], got {side}")
    return side * side
