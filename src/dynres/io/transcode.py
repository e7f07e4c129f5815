"""Lossless transcoding of a JPEG source into the store: its DCT coefficients copied, Huffman tables optimized, written
progressive, so a full read decodes to exactly the source's pixels.

``jpegtran -copy none -optimize -progressive`` (libjpeg-turbo-progs) does it, with a custom ``-scans`` script if
asked, and applies an EXIF orientation losslessly where the flip or rotation moves whole blocks (``-perfect``). The
common case (no scan script, no rotation) runs the same transform in-process through libturbojpeg's
``tjTransform`` (progressive, copy none, stop on warning) when that library loads: byte-identical output without a
process per image; anything it declines goes to the jpegtran process, whose message becomes the reason.
Without jpegtran, mozjpeg-lossless-optimization (a pip wheel) transcodes with mozjpeg's own scan script and no
rotations. :func:`source_bytes` decides per image; everything it declines is re-encoded by the caller, with the
reason it gives (one of :mod:`dynres.io.format`'s rules).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib
import io
import shutil
import subprocess
import threading
from dataclasses import dataclass, field

from PIL import Image

from dynres.errors import BadImageError
from dynres.io.format import (
    REASON_ARITHMETIC,
    REASON_CMYK,
    REASON_HEADER,
    REASON_HIERARCHICAL,
    REASON_MAX_SIDE,
    REASON_MISSING,
    REASON_MOZJPEG,
    REASON_NOT_JPEG,
    REASON_ORIENTATION,
    REASON_PRECISION,
    REASON_ROTATED,
    REASON_SCANS,
    REASON_TRANSCODE_FAILED,
)
from dynres.io.jpeg import SOF_MARKERS, SOI, STANDALONE_MARKERS

_HUFFMAN_SOF = {0xC0, 0xC1, 0xC2}  # baseline, extended sequential, progressive
_ARITHMETIC_SOF = {0xC9, 0xCA, 0xCB}  # the same three, arithmetic-coded
# applying each EXIF orientation (as Pillow's ImageOps.exif_transpose does) as a jpegtran transform
ORIENTATION_TRANSFORMS: dict[int, tuple[str, ...]] = {
    2: ("-flip", "horizontal"), 3: ("-rotate", "180"), 4: ("-flip", "vertical"), 5: ("-transpose",),
    6: ("-rotate", "90"), 7: ("-transverse",), 8: ("-rotate", "270"),
}


@dataclass(frozen=True)
class JpegFrame:
    """A JPEG's frame header (SOFn) and EXIF orientation: what decides whether it can be transcoded losslessly."""

    marker: int  # the SOFn marker's second byte (0xC0 baseline, 0xC2 progressive, ...)
    precision: int  # bits per sample
    width: int
    height: int
    sampling: tuple[tuple[int, int], ...]  # (horizontal, vertical) sampling factors per component
    orientation: int = 1  # EXIF orientation; 1 (upright) when absent

    @property
    def mcu(self) -> tuple[int, int]:
        """Width and height of the block grid a lossless flip or rotation moves whole (libjpeg's iMCU)."""
        if len(self.sampling) == 1:
            return 8, 8
        return 8 * max(h for h, _ in self.sampling), 8 * max(v for _, v in self.sampling)


def read_frame(data: bytes, name: str = "") -> JpegFrame:
    """The frame header of a JPEG and its orientation as Pillow's ``exif_transpose`` (the re-encode path) reads it:
    EXIF, else XMP (BadImageError if there is no frame header)."""
    if data[:2] != SOI:
        raise BadImageError(name, "not a JPEG (no SOI marker)")
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:  # junk between segments: libjpeg skips it with a warning, and so does Pillow
            pos = data.find(b"\xff", pos)
            if pos < 0:
                break
            continue
        marker = data[pos + 1]
        if marker == 0xFF or marker in STANDALONE_MARKERS:  # a fill byte, or a marker without a length
            pos += 1 if marker == 0xFF else 2
            continue
        seg = data[pos + 4 : pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")]
        if marker in SOF_MARKERS and len(seg) >= 6 and len(seg) >= 6 + 3 * seg[5]:
            sampling = tuple((seg[7 + 3 * i] >> 4, seg[7 + 3 * i] & 15) for i in range(seg[5]))
            return JpegFrame(marker, seg[0], int.from_bytes(seg[3:5], "big"), int.from_bytes(seg[1:3], "big"),
                             sampling, pillow_orientation(data))
        if marker in (0xDA, 0xD9):  # SOS, EOI
            break
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    raise BadImageError(name, "no frame header (SOFn) before the first scan")


def lossless_obstacle(frame: JpegFrame, *, max_side: int | None = None, jpegtran: bool = True) -> str | None:
    """Why ``frame`` cannot be stored by a lossless transcode (a reason of :mod:`dynres.io.format`), or None.

    ``jpegtran``: the transcoder is jpegtran, which reads arithmetic coding (and writes Huffman) and applies an EXIF
    orientation exactly when the flip or rotation moves whole blocks (libjpeg's ``-perfect`` rule, transupp.c
    ``jtransform_perfect_transform``); mozjpeg-lossless-optimization does neither.
    """
    if frame.marker in _ARITHMETIC_SOF and not jpegtran:
        return f"{REASON_ARITHMETIC} (mozjpeg-lossless-optimization cannot read it)"
    if frame.marker not in _HUFFMAN_SOF | _ARITHMETIC_SOF:
        return f"{REASON_HIERARCHICAL} (SOF{frame.marker - 0xC0})"
    if frame.precision != 8:
        return f"{REASON_PRECISION} ({frame.precision}-bit samples)"
    if len(frame.sampling) not in (1, 3):
        return f"{REASON_CMYK} ({len(frame.sampling)} components)"
    if max_side is not None and max(frame.width, frame.height) > max_side:
        return f"{REASON_MAX_SIDE} ({frame.width}x{frame.height} > {max_side})"
    if frame.orientation == 1:
        return None
    transform = " ".join(ORIENTATION_TRANSFORMS[frame.orientation])
    if not jpegtran:
        return f"{REASON_MISSING} (EXIF orientation {frame.orientation} needs jpegtran {transform})"
    mcu_w, mcu_h = frame.mcu
    need_w = frame.orientation in (2, 3, 7, 8)  # FLIP_H, ROT_180, TRANSVERSE, ROT_270
    need_h = frame.orientation in (3, 4, 6, 7)  # ROT_180, FLIP_V, TRANSVERSE, ROT_90
    if (need_w and frame.width % mcu_w) or (need_h and frame.height % mcu_h):
        return (f"{REASON_ORIENTATION} (EXIF orientation {frame.orientation}: jpegtran {transform} -perfect needs "
                f"{frame.width}x{frame.height} to be whole {mcu_w}x{mcu_h} blocks)")
    return None


@dataclass(frozen=True)
class Transcoder:
    """A lossless JPEG → progressive JPEG route: libjpeg's ``jpegtran`` (custom scan scripts, EXIF rotations) or,
    without it, mozjpeg-lossless-optimization (mozjpeg's own scan script, no rotations)."""

    name: str  # "jpegtran" or "mozjpeg"
    path: str = ""  # the jpegtran executable
    note: str = field(default="", compare=False)  # the reason recorded with each image it writes

    def transcode(self, data: bytes, *, name: str = "", orientation: int = 1, scans: str | None = None) -> bytes:
        """``data`` with its coefficients copied, Huffman tables optimized, written progressive (metadata dropped,
        the EXIF orientation applied). BadImageError with the tool's message if it fails."""
        if self.name == "mozjpeg":
            return _mozjpeg(data, name)
        if orientation == 1 and scans is None and (out := turbo_transform(data)) is not None:
            return out
        args = [self.path, "-copy", "none", "-optimize", "-progressive"]
        if orientation != 1:
            args += [*ORIENTATION_TRANSFORMS[orientation], "-perfect"]
        if scans is not None:
            args += ["-scans", scans]
        try:
            proc = subprocess.run(args, input=data, capture_output=True, check=False, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as err:  # gone mid-ingest, no process slots, hung
            raise BadImageError(name, f"{REASON_TRANSCODE_FAILED} ({err})") from None
        if proc.returncode != 0 or not proc.stdout:  # 2: libjpeg warned (e.g. a truncated source): not to be trusted
            message = " ".join(proc.stderr.decode(errors="replace").split()) or f"exit status {proc.returncode}"
            raise BadImageError(name, f"{REASON_TRANSCODE_FAILED} ({message})")
        return proc.stdout


class _TJRegion(ctypes.Structure):
    _fields_ = [("x", ctypes.c_int), ("y", ctypes.c_int), ("w", ctypes.c_int), ("h", ctypes.c_int)]


class _TJTransform(ctypes.Structure):
    _fields_ = [("r", _TJRegion), ("op", ctypes.c_int), ("options", ctypes.c_int), ("data", ctypes.c_void_p),
                ("customFilter", ctypes.c_void_p)]


_TJXOPT_PROGRESSIVE, _TJXOPT_COPYNONE, _TJFLAG_STOPONWARNING = 32, 64, 8192  # turbojpeg.h
_turbo = threading.local()


def _turbo_library():
    """libturbojpeg with tjTransform's signature, or None where it does not load (then jpegtran's process runs)."""
    path = ctypes.util.find_library("turbojpeg")
    try:
        lib = ctypes.CDLL(path or "libturbojpeg.so.0")
    except OSError:
        return None
    lib.tjInitTransform.restype = ctypes.c_void_p
    lib.tjTransform.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_int,
                                ctypes.POINTER(ctypes.POINTER(ctypes.c_ubyte)), ctypes.POINTER(ctypes.c_ulong),
                                ctypes.POINTER(_TJTransform), ctypes.c_int]
    lib.tjFree.argtypes = [ctypes.c_void_p]
    return lib


def turbo_transform(data: bytes) -> bytes | None:
    """``jpegtran -copy none -optimize -progressive`` in-process (libturbojpeg's tjTransform; progressive output has
    optimized Huffman tables), or None when the library is missing or declines (any libjpeg warning included)."""
    if not hasattr(_turbo, "handle"):  # one handle per thread: TurboJPEG handles are not thread-safe
        lib = _turbo_library()
        _turbo.lib, _turbo.handle = lib, (lib.tjInitTransform() if lib is not None else None)
    if not _turbo.handle:
        return None
    out, size = ctypes.POINTER(ctypes.c_ubyte)(), ctypes.c_ulong(0)
    transform = _TJTransform(options=_TJXOPT_PROGRESSIVE | _TJXOPT_COPYNONE)
    status = _turbo.lib.tjTransform(_turbo.handle, data, len(data), 1, ctypes.byref(out), ctypes.byref(size),
                                    ctypes.byref(transform), _TJFLAG_STOPONWARNING)
    try:
        return ctypes.string_at(out, size.value) if status == 0 and size.value else None
    finally:
        if out:
            _turbo.lib.tjFree(out)


def _mozjpeg(data: bytes, name: str) -> bytes:
    import mozjpeg_lossless_optimization
    import simplejpeg

    try:  # mozjpeg does not stop on libjpeg's warnings (a truncated file comes back grey-filled): check first
        simplejpeg.decode_jpeg(data, "GRAY", strict=True, min_height=1, min_width=1)
    except (ValueError, RuntimeError) as err:
        raise BadImageError(name, f"{REASON_MOZJPEG} refused: libjpeg warns ({err})") from None
    try:
        return mozjpeg_lossless_optimization.optimize(data)
    except Exception as err:  # noqa: BLE001 - it raises ValueError and others for bad input
        raise BadImageError(name, f"{REASON_MOZJPEG} failed ({err})") from None


def is_libjpeg_turbo(path: str) -> bool:
    """Whether the ``jpegtran`` at ``path`` is libjpeg-turbo's: mozjpeg ships one too, with another default
    progressive script, and the store's layout is libjpeg's."""
    try:
        proc = subprocess.run([path, "-version"], capture_output=True, check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return b"libjpeg-turbo" in proc.stdout + proc.stderr


def find_transcoder() -> Transcoder | None:
    """The lossless route available here: libjpeg-turbo's jpegtran on PATH, else mozjpeg-lossless-optimization,
    else None."""
    path = shutil.which("jpegtran")
    if path is not None and is_libjpeg_turbo(path):
        return Transcoder("jpegtran", path)
    try:
        importlib.import_module("mozjpeg_lossless_optimization")
    except ImportError:
        return None
    return Transcoder("mozjpeg", note=f"{REASON_MOZJPEG} (its scan script)")


def fallback_notice(transcoder: Transcoder | None, quality: int) -> str | None:
    """The one line an ingest logs when it cannot transcode with jpegtran: what it does instead (None: nothing)."""
    install = "install libjpeg-turbo-progs (`make install` does, as root on Debian)"
    if transcoder is None:
        return (f"libjpeg-turbo's jpegtran not found and mozjpeg-lossless-optimization not installed: JPEG sources "
                f"are re-encoded at quality {quality} (lossy; reason {REASON_MISSING!r} per image); {install} to "
                "store them losslessly")
    if transcoder.name != "jpegtran":
        return ("libjpeg-turbo's jpegtran not found: JPEG sources are transcoded losslessly by "
                "mozjpeg-lossless-optimization with its own scan script (not libjpeg's default), and those with an "
                f"EXIF rotation re-encoded; {install} for libjpeg's layout")
    return None


def source_bytes(source: bytes, name: str, transcoder: Transcoder | None, *, max_side: int | None = None,
                 max_pixels: int | None = None, scans: str | None = None) -> tuple[bytes | None, str]:
    """``source`` transcoded losslessly and the reason to record ("" for jpegtran), or None and why the image must
    be re-encoded. A JPEG over ``max_pixels`` raises BadImageError (a decompression bomb) before any tool sees it."""
    if source[:2] != SOI:
        return None, f"{REASON_NOT_JPEG} ({_format_name(source)})"
    try:
        frame = read_frame(source, name)
    except BadImageError as err:
        return None, f"{REASON_HEADER} ({err.reason})"
    if max_pixels is not None and frame.width * frame.height > max_pixels:
        raise BadImageError(name, f"decompression bomb: {frame.width}x{frame.height} = "
                                  f"{frame.width * frame.height} pixels > max_pixels {max_pixels}")
    if transcoder is None:
        return None, f"{REASON_MISSING} (and mozjpeg-lossless-optimization not installed)"
    if scans is not None and transcoder.name != "jpegtran":
        return None, f"{REASON_SCANS} (mozjpeg-lossless-optimization writes its own)"
    reason = lossless_obstacle(frame, max_side=max_side, jpegtran=transcoder.name == "jpegtran")
    if reason is not None:
        return None, reason
    try:
        data = transcoder.transcode(source, name=name, orientation=frame.orientation, scans=scans)
    except BadImageError as err:
        return None, err.reason
    if frame.orientation != 1:
        transform = " ".join(ORIENTATION_TRANSFORMS[frame.orientation])
        return data, f"{REASON_ROTATED} ({transform}: pixels within a few levels)"
    return data, transcoder.note


def pillow_orientation(source: bytes) -> int:
    """The orientation Pillow's ``exif_transpose`` (and so the re-encode path) applies: EXIF, or XMP without it.
    Read from the header by the JPEG plugin itself, which skips ``Image.open``'s pixel-count check: a picture over
    Pillow's limit that ingest's own cap lets through keeps its orientation."""
    from PIL import JpegImagePlugin

    try:
        with JpegImagePlugin.JpegImageFile(io.BytesIO(source)) as img:
            value = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - an unreadable header is the transcoder's to report
        return 1
    return value if value in ORIENTATION_TRANSFORMS else 1


def _format_name(source: bytes) -> str:
    try:
        with Image.open(io.BytesIO(source)) as img:
            return str(img.format)
    except Exception:  # noqa: BLE001 - the re-encode reports what is wrong with it
        return "not identified"
