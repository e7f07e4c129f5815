"""A tiny store of real photographs: crops of scikit-image's bundled photos in two classes, ingested and
quality-indexed (the calibration policy's and the calibration search's tests share it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata

from dynres.io.ingest import IngestConfig, ingest
from dynres.policy.quality import QualityConfig, build_quality_index


def make_photo_store(src: Path, root: Path, crops_per_photo: int, resolutions: tuple[int, ...]) -> Path:
    """``crops_per_photo`` random crops of 4 photos (2 classes) under ``src``, ingested into ``root``."""
    rng = np.random.default_rng(0)
    for cls, names in (("people", ("astronaut", "coffee")), ("things", ("rocket", "chelsea"))):
        (src / cls).mkdir(parents=True)
        for name in names:
            img = getattr(skdata, name)()
            for i in range(crops_per_photo):
                h, w = img.shape[:2]
                ch, cw = int(h * rng.uniform(0.6, 0.9)), int(w * rng.uniform(0.6, 0.9))
                y, x = rng.integers(0, h - ch), rng.integers(0, w - cw)
                Image.fromarray(img[y:y + ch, x:x + cw]).save(src / cls / f"{name}{i}.png")
    ingest(src, root, IngestConfig(workers=1), progress=False)
    build_quality_index(root, QualityConfig(resolutions=resolutions, workers=1), progress=False)
    return root
