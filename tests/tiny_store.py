"""A store in memory for the model/train/evaluate tests: the store contract on tiny generated progressive JPEGs.

Class ``i`` is a coloured square on noise whose size varies per image, so tiny models learn it in seconds. Scans are
split by :mod:`dynres.io.jpeg`, as ingest does, and ``bytes_read`` counts like :class:`dynres.io.store.Store`'s (the
prefix bytes, not the EOI marker a partial read appends); ``tests/io/test_store_contract.py`` holds it to that.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image

from dynres.io.jpeg import parse_scans, scan_prefix

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
    """``StoreLike`` over ``per_class`` generated images per class, keys ``class<i>/img<offset + n>.jpg``."""

    def __init__(self, per_class: int = 8, classes: int = 3, offset: int = 0):
        self.classes = [f"class{i}" for i in range(classes)]
        self._data: dict[str, bytes] = {}
        self._labels: dict[str, int] = {}
        for label in range(classes):
            for i in range(per_class):
                self.put(f"class{label}/img{offset + i:03d}.jpg", make_jpeg(label, offset + i), label)
        self.keys = sorted(self._data)
        self.bytes_read = 0

    def put(self, key: str, data: bytes, label: int) -> None:
        """Store ``data`` under ``key`` (replacing what was there, as a re-ingest would)."""
        self._data[key] = data[: parse_scans(data, key).scan_ends[-1]]  # what follows EOI is not stored
        self._labels[key] = label

    def label(self, key: str) -> int:
        return self._labels[key]

    def sha256(self, key: str) -> str:
        return hashlib.sha256(self._data[key]).hexdigest()

    def scan_ends(self, key: str) -> list[int]:
        return list(parse_scans(self._data[key], key).scan_ends)

    def num_scans(self, key: str) -> int:
        return len(self.scan_ends(key))

    def size(self, key: str) -> int:
        return len(self._data[key])

    def prefix_size(self, key: str, scans: int | None = None) -> int:
        if scans is not None and scans < 1:
            raise ValueError(f"scans must be >= 1 (or None for the whole file), got {scans}")
        ends = self.scan_ends(key)
        return ends[-1] if scans is None or scans >= len(ends) else ends[scans - 1]

    def read(self, key: str, scans: int | None = None) -> bytes:
        self.bytes_read += self.prefix_size(key, scans)
        return scan_prefix(self._data[key], self.scan_ends(key), scans or self.num_scans(key))
