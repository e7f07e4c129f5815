"""A store in memory for the model/train/evaluate tests: the store contract on tiny generated progressive JPEGs.

Class ``i`` is a coloured square on noise whose size varies per image, so tiny models learn it in seconds.
``bytes_read`` counts what ``read`` returned, like the real store.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image

SOS = b"\xff\xda"
EOI = b"\xff\xd9"
COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220)]


def make_jpeg(label: int, index: int, size: tuple[int, int] = (72, 56)) -> bytes:
    rng = np.random.default_rng(1000 * label + index)
    w, h = size
    pixels = rng.integers(90, 160, size=(h, w, 3), dtype=np.uint8)
    side = int(rng.integers(h // 4, h - 4))
    top, left = (h - side) // 2, (w - side) // 2
    pixels[top:top + side, left:left + side] = COLOURS[label]
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90, progressive=True)
    return buf.getvalue()


class MemoryStore:
    def __init__(self, per_class: int = 8, classes: int = 3, offset: int = 0):
        self.classes = [f"class{i}" for i in range(classes)]
        self._data, self._labels = {}, {}
        for label in range(classes):
            for i in range(per_class):
                key = f"class{label}/img{offset + i:03d}.jpg"
                self._data[key] = make_jpeg(label, offset + i)
                self._labels[key] = label
        self.keys = sorted(self._data)
        self.bytes_read = 0

    def label(self, key: str) -> int:
        return self._labels[key]

    def sha256(self, key: str) -> str:
        return hashlib.sha256(self._data[key]).hexdigest()

    def _scan_starts(self, key: str) -> list[int]:
        data, starts, i = self._data[key], [], 0
        while (i := data.find(SOS, i)) >= 0:
            starts.append(i)
            i += 2
        return starts

    def num_scans(self, key: str) -> int:
        return len(self._scan_starts(key))

    def read(self, key: str, scans: int | None = None) -> bytes:
        data = self._data[key]
        starts = self._scan_starts(key)
        if scans is not None and scans < len(starts):
            data = data[: starts[scans]] + EOI
        self.bytes_read += len(data)
        return data
