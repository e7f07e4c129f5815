"""JPEG bytes for the io tests: any picture saved as JPEG, and a file libjpeg warns about but Pillow reads."""

from __future__ import annotations

import io

from PIL import Image


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **{"quality": 90, **kw})
    return buf.getvalue()


def with_junk(data: bytes) -> bytes:
    """Two stray bytes after APP0: Pillow skips them, libjpeg warns ("extraneous bytes"), so jpegtran exits 2."""
    end = 4 + int.from_bytes(data[4:6], "big")
    return data[:end] + b"\x00\x00" + data[end:]
