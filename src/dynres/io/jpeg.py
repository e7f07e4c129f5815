"""Progressive JPEG: where each scan ends, and how a source image becomes one.

A progressive JPEG is a sequence of *scans*; the first k of them plus an EOI marker is itself a valid
JPEG of lower quality. The store reads such prefixes, so it needs the byte offset just past each scan.
No library exposes that, so :func:`parse_scans` walks the markers by hand (ITU T.81, annex B):

    SOI, then marker segments (APPn, DQT, SOFn, DHT, DRI, COM, ...) each ``FF xx`` + 2-byte length,
    SOS + entropy-coded data, in which ``FF 00`` is a stuffed data byte and ``FF D0..D7`` are restart
    markers; the scan ends at the first other marker (usually the DHT before the next SOS), then EOI.

A JPEG source is stored by a lossless transcode (:mod:`dynres.io.transcode`); whatever cannot be transcoded is
normalised here (:func:`load_rgb`) and re-encoded (:func:`encode_progressive`) as an 8-bit RGB progressive JPEG.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dynres.errors import BadImageError, ConfigError

SOI = b"\xff\xd8"
EOI = b"\xff\xd9"
_SOS = 0xDA
_EOI = 0xD9
STANDALONE_MARKERS = {0x01, *range(0xD0, 0xD8)}  # TEM and RST0..7 carry no length
# SOF0..15 except DHT (C4), JPG (C8) and DAC (CC); progressive ones are SOF2/6/10/14.
SOF_MARKERS = {m for m in range(0xC0, 0xD0) if m not in (0xC4, 0xC8, 0xCC)}
_PROGRESSIVE_SOF = {0xC2, 0xC6, 0xCA, 0xCE}

# Pillow's own warning threshold; images above it are treated as decompression bombs by default.
DEFAULT_MAX_PIXELS = 89_478_485


@dataclass(frozen=True)
class JpegLayout:
    """What the store needs to know about one JPEG file."""

    progressive: bool
    width: int
    height: int
    components: int
    scan_ends: tuple[int, ...]  # offset just past each scan; the last one includes EOI (= file size)

    @property
    def num_scans(self) -> int:
        return len(self.scan_ends)


def parse_scans(data: bytes, name: str = "") -> JpegLayout:
    """Walk the markers of ``data`` and return where each scan ends.

    Raises :class:`BadImageError` naming ``name`` for anything that is not a complete JPEG
    (no SOI, a segment running past the end, a scan without a following marker, no EOI).
    Bytes after EOI are not part of the image; callers that store files strip them.
    """
    n = len(data)
    if n < 4 or data[:2] != SOI:
        raise BadImageError(name, "not a JPEG (no SOI marker)")
    pos, ends = 2, []
    progressive, width, height, comps = False, 0, 0, 0
    while True:
        if pos >= n:
            raise BadImageError(name, f"truncated JPEG: no EOI marker before the end ({n} bytes)")
        if data[pos] != 0xFF:
            raise BadImageError(name, f"corrupt JPEG: expected a marker at byte {pos}")
        while pos < n and data[pos] == 0xFF:  # a marker may be preceded by any number of fill bytes
            pos += 1
        if pos >= n:
            raise BadImageError(name, "truncated JPEG: ends inside a marker")
        marker = data[pos]
        pos += 1
        if marker == _EOI:
            if not ends:
                raise BadImageError(name, "corrupt JPEG: EOI before any scan")
            ends[-1] = pos
            return JpegLayout(progressive, width, height, comps, tuple(ends))
        if marker in STANDALONE_MARKERS:
            continue
        if pos + 2 > n:
            raise BadImageError(name, f"truncated JPEG: marker FF{marker:02X} at byte {pos - 2} has no length")
        seg_end = pos + int.from_bytes(data[pos : pos + 2], "big")
        if seg_end > n or seg_end < pos + 2:
            raise BadImageError(name, f"truncated JPEG: segment FF{marker:02X} runs past the end")
        if marker in SOF_MARKERS:
            progressive = marker in _PROGRESSIVE_SOF
            height = int.from_bytes(data[pos + 3 : pos + 5], "big")
            width = int.from_bytes(data[pos + 5 : pos + 7], "big")
            comps = data[pos + 7] if pos + 7 < n else 0
        if marker == _SOS:
            pos = _entropy_end(data, seg_end)
            if pos < 0:
                raise BadImageError(name, f"truncated JPEG: scan {len(ends) + 1} has no end marker")
            ends.append(pos)
        else:
            pos = seg_end


def _entropy_end(data: bytes, pos: int) -> int:
    """Offset of the first marker after entropy-coded data starting at ``pos`` (-1: none)."""
    n = len(data)
    while True:
        i = data.find(b"\xff", pos)
        if i < 0 or i + 1 >= n:
            return -1
        nxt = data[i + 1]
        if nxt == 0x00 or 0xD0 <= nxt <= 0xD7:  # stuffed byte or restart marker: still this scan
            pos = i + 2
            continue
        return i


def scan_components(data: bytes, scan_ends: tuple[int, ...] | list[int], name: str = "<bytes>"
                    ) -> list[tuple[int | None, bytes]]:
    """Per scan: (the frame's first component id, the component ids its SOS header lists), read from the marker
    segments between the previous scan's end and this scan's SOS."""
    frame_first, out = None, []
    for i in range(len(scan_ends)):
        pos = 2 if i == 0 else scan_ends[i - 1]
        while True:  # walk the marker segments (DHT, DQT, SOF, ...) that precede this scan's SOS
            while pos < len(data) and data[pos] == 0xFF:
                pos += 1
            if pos + 3 > len(data):
                raise BadImageError(name, f"no SOS header for scan {i + 1}")
            marker, length = data[pos], int.from_bytes(data[pos + 1:pos + 3], "big")
            if marker in (0xC0, 0xC1, 0xC2) and frame_first is None:
                frame_first = data[pos + 9]  # first component id of the frame: Y in YCbCr / grayscale
            if marker == _SOS:
                out.append((frame_first, bytes(data[pos + 4:pos + 4 + 2 * data[pos + 3]:2])))
                break
            pos += 1 + length
    return out


def prefix_crc32s(data: bytes, scan_ends: tuple[int, ...] | list[int]) -> list[int]:
    """crc32 of each prefix ``data[:end]``, so that a partial read can be verified too."""
    crcs, crc, start = [], 0, 0
    for end in scan_ends:
        crc = zlib.crc32(data[start:end], crc)
        crcs.append(crc)
        start = end
    return crcs


def scan_prefix(data: bytes, scan_ends: tuple[int, ...] | list[int], scans: int) -> bytes:
    """The first ``scans`` scans as a decodable JPEG: the prefix plus EOI (the whole file if all)."""
    if scans >= len(scan_ends):
        return bytes(data[: scan_ends[-1]])
    return bytes(data[: scan_ends[scans - 1]]) + EOI


# --------------------------------------------------------------------------- source images


def load_rgb(path: str, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int | None = None) -> Image.Image:
    """Open any Pillow-readable image as 8-bit RGB, upright, with its long side capped at ``max_side``.

    Decisions: EXIF orientation is applied (and dropped); 16-bit and 32-bit integer images are scaled
    (not clipped) to 8 bits; CMYK, grayscale and palette images are converted; transparency is
    composited on white, as a page or viewer shows it (dropping alpha would expose arbitrary colours).
    ``max_pixels`` is checked from the header before any pixel is decoded. Pillow's own hard limit
    (2 x ``Image.MAX_IMAGE_PIXELS``) still applies on top of it.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply our own cap below
            with Image.open(path) as img:
                pixels = img.width * img.height
                if pixels > max_pixels:
                    raise BadImageError(path, f"decompression bomb: {img.width}x{img.height} = {pixels} pixels > "
                                              f"max_pixels {max_pixels}")
                img.load()
                img = ImageOps.exif_transpose(img)
                rgb = _to_rgb(img)
    except Image.DecompressionBombError as err:
        raise BadImageError(path, f"decompression bomb: {err}") from err
    if max_side is not None and max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return rgb


def load_error_reason(err: Exception) -> str:
    """Why :func:`load_rgb` failed on a source, in a few words for an ingest report."""
    if isinstance(err, UnidentifiedImageError):
        return "not an image Pillow can identify"
    if isinstance(err, PermissionError):
        return f"cannot read: permission denied ({err.strerror or err})"
    if isinstance(err, OSError) and "truncated" in str(err):
        return f"truncated image ({err})"
    return f"corrupt image ({type(err).__name__}: {err})"


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        # 16-bit data uses 0..65535 even when Pillow hands it over as mode "I"
        scale = 257.0 if arr.max(initial=0) > 255 or img.mode.startswith("I;16") else 1.0
        img = Image.fromarray(np.clip(np.rint(arr / scale), 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def encode_progressive(img: Image.Image, quality: int = 90, scan_script: str | None = None) -> bytes:
    """Encode ``img`` as a progressive JPEG (libjpeg's default scan script unless ``scan_script``).

    Pillow cannot pass a scan script to libjpeg, so a custom script goes through libjpeg's own
    ``jpegtran -scans FILE``: a lossless rearrangement of the coefficients Pillow just encoded.
    """
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, progressive=True)
    data = buf.getvalue()
    if scan_script is not None:
        data = _jpegtran_scans(data, scan_script)
    return data


def check_scan_script(scan_script: str) -> None:
    """Fail early (ConfigError) when a custom scan script cannot be applied."""
    if not os.path.isfile(scan_script):
        raise ConfigError(scan_script, "scan script file not found")
    if shutil.which("jpegtran") is None:
        raise ConfigError(
            scan_script,
            "a custom scan script needs libjpeg's `jpegtran` on PATH (Pillow cannot set one); "
            "install libjpeg-turbo-progs or omit --scans to use libjpeg's default script",
        )
    probe = Image.new("RGB", (16, 16), (128, 64, 32))
    layout = parse_scans(encode_progressive(probe, 90, scan_script), scan_script)  # a bad script fails here, once
    if not layout.progressive:
        raise ConfigError(scan_script, "the scan script does not produce a progressive JPEG")


def _jpegtran_scans(data: bytes, scan_script: str) -> bytes:
    proc = subprocess.run(
        ["jpegtran", "-copy", "none", "-scans", scan_script], input=data, capture_output=True, check=False
    )
    if proc.returncode != 0 or not proc.stdout:
        first = (proc.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[0]
        raise ConfigError(scan_script, f"jpegtran rejected the scan script: {first}")
    return proc.stdout
