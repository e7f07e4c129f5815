"""Bytes → tensor: decode a (possibly partial) progressive JPEG straight to the inference resolution.

The saving over the common baseline comes from libjpeg's DCT scaling: the decoder produces a 1/2, 1/4 or 1/8 size
image directly, skipping most of the inverse DCT work, and we pick the smallest scale that is still at least as large
as the resize needs (Pillow's ``Image.draft`` rule, :func:`dct_scale`). Resize and center crop are then one resample.

Every decode goes through :func:`decode_array`: libjpeg-turbo through simplejpeg (the fastest binding whose pixels
equal Pillow's at every DCT scale, ``dynres bench decode``), or Pillow when simplejpeg is not installed, when
``DYNRES_DECODER=pillow`` / :func:`set_decoder` asks for it, or for an input simplejpeg cannot take the way Pillow
would. Both decode at the same scale to the same pixels, so nothing downstream depends on which one ran: the engine,
evaluation, training cache, calibration and the quality index see the same images.

``crop_side`` is a side ratio (torchvision's convention: resize the shorter side to R / crop_side, take the central
R x R); the paper quotes crops as area fractions, which :func:`dynres.paper.crop_side` converts.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import os
import time
from types import ModuleType

import numpy as np
import torch
from PIL import Image

from dynres.errors import BadImageError, ConfigError
from dynres.paper import DEFAULT_CROP_SIDE

DECODERS = ("simplejpeg", "pillow")
DECODER_ENV = "DYNRES_DECODER"  # "auto" (default: simplejpeg when installed), "simplejpeg" or "pillow"
_JPEG_MAGIC = b"\xff\xd8\xff"  # what Pillow's JPEG plugin accepts
_TURBO_COLORSPACES = ("YCbCr", "Gray")  # CMYK, YCCK, Adobe RGB: Pillow converts them its own way
_log = logging.getLogger(__name__)
_choice: str | None = None  # set_decoder's; None: the environment decides


def _open(data: bytes, name: str) -> Image.Image:
    """The image's header, refused over Pillow's pixel limit. The limit is compared here rather than by turning
    Pillow's warning into an error: ``warnings.catch_warnings`` is process-global state, and decoding runs on
    several threads."""
    try:
        img = Image.open(io.BytesIO(data))
    except Exception as err:  # Pillow raises several unrelated types for bad bytes
        raise BadImageError(name, f"cannot decode image: {err}") from err
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and img.width * img.height > limit:
        raise BadImageError(name, f"decompression bomb: {img.width}x{img.height} = {img.width * img.height} pixels "
                                  f"is over Pillow's limit of {limit}")
    return img


def _crop_box(width: int, height: int, resolution: int, crop_side: float) -> tuple[float, float, float, float]:
    """The source-pixel box that torchvision's Resize(int(R / crop_side)) + CenterCrop(R) would keep.

    Mirroring its integer rounding keeps the fast path geometrically identical to the baseline.
    """
    short = int(resolution / crop_side)
    if width <= height:
        rw, rh = short, int(short * height / width)
    else:
        rw, rh = int(short * width / height), short
    top, left = int(round((rh - resolution) / 2.0)), int(round((rw - resolution) / 2.0))
    sx, sy = width / rw, height / rh
    return (left * sx, top * sy, (left + resolution) * sx, (top + resolution) * sy)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB image → contiguous uint8 CHW tensor."""
    # numpy does the HWC→CHW copy: torch's permute().contiguous() pays thread-pool overhead (ms) on tiny images
    arr = np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def draft_size(width: int, height: int, short_side: float) -> tuple[int, int]:
    """The size to ask ``Image.draft`` for so that the shorter side is still >= ``short_side``."""
    scale = short_side / min(width, height)
    return (max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale)))


def dct_scale(width: int, height: int, short_side: float) -> int:
    """The DCT scale denominator (1, 2, 4 or 8) a decode for ``short_side`` uses: ``Image.draft``'s rule for
    :func:`draft_size`, the largest power of two both sides divide by (floor) at least that often. The output is
    ceil(side / scale) pixels per side, whichever decoder runs."""
    w, h = draft_size(width, height, short_side)
    ratio = min(width // w, height // h)
    return next(s for s in (8, 4, 2, 1) if ratio >= s or s == 1)


def open_drafted(data: bytes, short_side: float, name: str, mode: str = "RGB") -> Image.Image:
    """Open and, for a JPEG, pick the smallest DCT scale whose shorter side is still >= ``short_side`` (the decode
    itself happens on first pixel access). ``mode="L"`` has libjpeg output luma only. Pillow's half of
    :func:`decode_array`."""
    img = _open(data, name)
    if img.format in ("JPEG", "MPO"):  # MPO: a JPEG with more pictures after it, decoded like any other
        img.draft(mode, draft_size(*img.size, short_side))
    return img


def set_decoder(name: str | None) -> None:
    """Decode with ``name`` ("simplejpeg" or "pillow") in this process; ``None`` hands the choice back to
    ``$DYNRES_DECODER``. Processes started later (worker pools) follow the environment variable, not this."""
    global _choice
    if name is not None and name not in DECODERS:
        raise ConfigError("decoder", f"unknown decoder {name!r}: one of {', '.join(DECODERS)}")
    _choice = name


@functools.cache
def _simplejpeg() -> ModuleType | None:
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


def active_decoder() -> tuple[str, str]:
    """The decoder :func:`decode_array` uses now, and why: ``("simplejpeg" | "pillow", reason)``."""
    asked = _choice or os.environ.get(DECODER_ENV) or "auto"
    if asked not in (*DECODERS, "auto"):
        raise ConfigError(DECODER_ENV, f"unknown decoder {asked!r}: one of auto, {', '.join(DECODERS)}")
    if asked == "pillow":
        return "pillow", "asked for" if _choice else f"{DECODER_ENV}=pillow"
    if _simplejpeg() is None:
        if asked == "simplejpeg":
            raise ConfigError(DECODER_ENV, "simplejpeg is not installed (pip install simplejpeg)")
        return "pillow", "simplejpeg is not installed"
    return "simplejpeg", "the fastest binding with Pillow's pixels"


def decode_array(data: bytes, short_side: float, name: str = "<bytes>", mode: str = "RGB") -> np.ndarray:
    """Decode at the smallest DCT scale whose shorter side is still >= ``short_side`` (:func:`dct_scale`): uint8
    (H, W, 3) for ``mode="RGB"``, (H, W) for ``"L"`` (libjpeg decodes luma only).

    An input simplejpeg cannot take as Pillow would (not a JPEG, a CMYK / YCCK / RGB colour space, over Pillow's
    pixel limit, any libjpeg error or warning: truncated or corrupt data) goes to Pillow, which decodes it exactly
    as before or raises :class:`BadImageError` naming ``name``.
    """
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
    if active_decoder()[0] == "simplejpeg":
        arr, why = _turbo_array(data, short_side, mode)
        if arr is not None:
            return arr
        _log.debug("%s: decoded by Pillow: %s", name, why)
    img = open_drafted(data, short_side, name, mode)
    try:
        return np.array(img if img.mode == mode else img.convert(mode), dtype=np.uint8)
    except Exception as err:  # Pillow raises several unrelated types for bad bytes
        raise BadImageError(name, f"cannot decode image: {err}") from err


def _turbo_array(data: bytes, short_side: float, mode: str) -> tuple[np.ndarray | None, str]:
    """simplejpeg's decode at Pillow's DCT scale, or None and the reason Pillow must decode ``data`` instead."""
    sj = _simplejpeg()
    if data[:3] != _JPEG_MAGIC:
        return None, "not a JPEG"
    try:
        height, width, colorspace, _ = sj.decode_jpeg_header(data)
    except Exception as err:  # ValueError from libjpeg; anything else is simplejpeg's: Pillow decides
        return None, f"header: {err}"
    if colorspace not in _TURBO_COLORSPACES:
        return None, f"{colorspace} colour space"
    if Image.MAX_IMAGE_PIXELS is not None and width * height > Image.MAX_IMAGE_PIXELS:
        return None, f"{width}x{height} is over Pillow's pixel limit"
    s = dct_scale(width, height, short_side)
    size = (-(-height // s), -(-width // s))
    try:  # strict (the default): libjpeg's warnings, e.g. a premature end of data, raise too
        arr = sj.decode_jpeg(data, "RGB" if mode == "RGB" else "GRAY", min_height=size[0], min_width=size[1])
    except Exception as err:
        return None, str(err)
    if arr.shape[:2] != size:
        return None, f"simplejpeg decoded {arr.shape[1]}x{arr.shape[0]}, Pillow's scale gives {size[1]}x{size[0]}"
    return (arr if mode == "RGB" else arr[..., 0]), ""


def decode_short_side(data: bytes, short_side: int, square: bool = False, name: str = "<bytes>") -> torch.Tensor:
    """Decode to a uint8 tensor whose shorter side is ``short_side`` (never upsampled); ``square`` keeps only the
    center square of the shorter side, otherwise the aspect ratio is kept."""
    img = Image.fromarray(decode_array(data, short_side, name))
    try:
        w, h = img.size
        short = min(w, h)
        box = ((w - short) / 2, (h - short) / 2, (w + short) / 2, (h + short) / 2) if square else (0, 0, w, h)
        scale = min(1.0, short_side / short)
        size = (max(1, round((box[2] - box[0]) * scale)), max(1, round((box[3] - box[1]) * scale)))
        return to_tensor(img.resize(size, Image.Resampling.BILINEAR, box=box))
    except Exception as err:  # Pillow raises several unrelated types for bad bytes
        raise BadImageError(name, f"cannot decode image: {err}") from None


def decode(prefix: bytes, resolution: int, crop_side: float = DEFAULT_CROP_SIDE, name: str = "<bytes>"
           ) -> torch.Tensor:
    """Decode a scan prefix to a uint8 CHW tensor of shape (3, resolution, resolution).

    The decode is at the DCT scale; torch's uint8 resize (antialiased, vectorized) then scales only the crop
    region: faster than Pillow's own resize (docs/io-measurements.md).
    """
    _check_crop_side(crop_side)
    return crop_resize(decode_scaled(prefix, resolution / crop_side, name), resolution, crop_side, name)


def decode_scaled(prefix: bytes, short_side: float, name: str = "<bytes>") -> torch.Tensor:
    """Decode at the smallest DCT scale whose shorter side is still >= ``short_side``: a uint8 CHW *view* of the
    decoder's HWC memory (no copy; torch's uint8 resize is fastest on this channels-last layout).

    One such decode serves every view up to ``short_side`` (:func:`crop_resize`): the entropy decoding of a
    progressive JPEG costs most of a decode whatever the DCT scale (docs/io-measurements.md), so a pipeline that
    needs two views of one prefix decodes it once.
    """
    return torch.from_numpy(decode_array(prefix, short_side, name)).permute(2, 0, 1)


def crop_resize(image: torch.Tensor, resolution: int, crop_side: float = DEFAULT_CROP_SIDE, name: str = "<bytes>"
                ) -> torch.Tensor:
    """The (3, resolution, resolution) center view of a decoded uint8 CHW image (see :func:`resize_center`)."""
    _check_crop_side(crop_side)
    try:
        return torch.from_numpy(np.ascontiguousarray(resize_center(image[None], resolution, crop_side)[0].numpy()))
    except Exception as err:
        raise BadImageError(name, f"cannot resize image: {err}") from err


def resize_center(images: torch.Tensor, resolution: int, crop_side: float) -> torch.Tensor:
    """Center views (N,C,R,R) of uint8 images (N,C,H,W): torchvision's Resize(int(R / crop_side)) + CenterCrop(R)
    geometry, resampled once.

    The exact box is rounded to whole source pixels: at most half a source pixel off torchvision's geometry (a
    fraction of an output pixel), which costs nothing in accuracy and saves a resample. The resample is torch's
    antialiased bilinear, which is what torchvision's uint8 resize runs (pixel-identical), without importing
    torchvision's transforms (a second per process).
    """
    x0, y0, x1, y1 = (int(round(v)) for v in _crop_box(images.shape[-1], images.shape[-2], resolution, crop_side))
    return torch.nn.functional.interpolate(images[..., y0:y1, x0:x1], size=(resolution, resolution),
                                           mode="bilinear", align_corners=False, antialias=True)


class PrefixViews:
    """Center views of one (possibly partial) image at any resolution, for callers that need several.

    With ``short_side`` the bytes are decoded once, on the first view, at the DCT scale that size needs, and every
    view up to it is a :func:`crop_resize` of that decode; ``None`` decodes each view with :func:`decode` (exact
    views: what evaluation and calibration see). ``decode_s`` is the shared decode's thread time, so a pipeline can
    charge it to whichever stage the decode really served.
    """

    def __init__(self, data: bytes, short_side: float | None, name: str = "<bytes>"):
        self.data, self.short_side, self.name = data, short_side, name
        self.decode_s = 0.0
        self._image: torch.Tensor | None = None

    def view(self, resolution: int, crop_side: float = DEFAULT_CROP_SIDE) -> torch.Tensor:
        if self.short_side is None:
            return decode(self.data, resolution, crop_side, self.name)
        if self._image is None:
            t = time.thread_time()
            self._image = decode_scaled(self.data, self.short_side, self.name)
            self.decode_s = time.thread_time() - t
        return crop_resize(self._image, resolution, crop_side, self.name)


class ScaledDecodes:
    """:func:`decode_scaled` of one prefix, decoded once per DCT scale (there are four): every view an engine
    would make of these bytes, pixel for pixel, for at most four decodes.

    ``view(r, side)`` is :func:`decode` (the static engine's and exact evaluation's view); ``view(r, side,
    short_side)`` is :class:`PrefixViews`' view of a prefix decoded once for ``short_side`` (the dynamic engine's
    decode-once view). Two short sides at the same DCT scale give the same decode, so they share it."""

    def __init__(self, data: bytes, name: str = "<bytes>"):
        self.data, self.name = data, name
        self._size: tuple[int, int] | None = None
        self._decoded: dict[int, torch.Tensor] = {}

    def scaled(self, short_side: float) -> torch.Tensor:
        if self._size is None:
            self._size = _open(self.data, self.name).size  # the header only
        s = dct_scale(*self._size, short_side)
        if s not in self._decoded:
            self._decoded[s] = decode_scaled(self.data, short_side, self.name)
        return self._decoded[s]

    def view(self, resolution: int, crop_side: float = DEFAULT_CROP_SIDE, short_side: float | None = None
             ) -> torch.Tensor:
        _check_crop_side(crop_side)
        return crop_resize(self.scaled(resolution / crop_side if short_side is None else short_side), resolution,
                           crop_side, self.name)


def _check_crop_side(crop_side: float) -> None:
    if not 0 < crop_side <= 1:
        raise ValueError(f"crop_side (a side ratio) must be in (0, 1], got {crop_side}")


def decode_image(data: bytes, resolution: int, crop_side: float = DEFAULT_CROP_SIDE, name: str = "<bytes>"
                 ) -> Image.Image:
    """:func:`decode` as a PIL image (thumbnails, debugging)."""
    return Image.fromarray(decode(data, resolution, crop_side, name).permute(1, 2, 0).numpy())


def decode_baseline(data: bytes, resolution: int, crop_side: float = DEFAULT_CROP_SIDE, name: str = "<bytes>"
                    ) -> torch.Tensor:
    """The common baseline: full-size decode, torchvision Resize(shorter side) + CenterCrop. For benchmarks."""
    from torchvision.transforms.v2 import functional as F

    img = _open(data, name).convert("RGB")
    t = F.pil_to_tensor(img)
    t = F.resize(t, [int(resolution / crop_side)], antialias=True)
    return F.center_crop(t, [resolution, resolution])


def decode_train(
    prefix: bytes,
    resolution: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    name: str = "<bytes>",
) -> torch.Tensor:
    """Training view: RandomResizedCrop(resolution) + horizontal flip, drawn from torch's global RNG.

    The draft keeps the shorter side >= resolution / sqrt(min scale) capped at 2x, so small random crops are cut
    from an image with enough pixels while the decode stays cheap.
    """
    from torchvision.transforms import v2 as T

    img = Image.fromarray(decode_array(prefix, min(2.0, 1 / math.sqrt(scale[0])) * resolution, name))
    top, left, ch, cw = T.RandomResizedCrop.get_params(img, scale=list(scale), ratio=list(ratio))
    out = img.resize((resolution, resolution), Image.Resampling.BILINEAR, box=(left, top, left + cw, top + ch))
    if torch.rand(()) < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(out)
