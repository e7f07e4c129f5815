"""Built-in dataset: a seeded, offline generator of photo-like image classification data (ImageFolder layout).

It is made so the paper's phenomena appear without downloading anything: objects appear at scales varying
more than 6x (so the best inference resolution depends on the crop), pairs of classes differ only in fine
detail such as a stripe period or an outline width (so low resolution loses accuracy on small objects), and the
backgrounds are jittered crops of the photographs bundled with scikit-image (so JPEG scans and SSIM behave as
on photos). Every image is a pure function of ``(seed, split, class, index)``: any number of workers writes the
same bytes. Each object's box and scale go to ``OUT/objects.parquet``.
"""

from __future__ import annotations

import colorsys
import functools
import io
import json
import math
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageEnhance

from dynres._ui import track
from dynres.errors import ConfigError, DynresError

SPLITS = ("train", "val")
TABLE = "objects.parquet"
PRETRAIN_SEED = 1_000_003  # the shipped demo weights were trained on this seed: demos must use another
MARKER = ".dynres-synth"  # marks a folder this module may clear and rewrite
_META_KEY = b"dynres.synth"


@dataclass(frozen=True)
class ClassSpec:
    """One class: a body shape plus a surface pattern; ``detail`` is the pattern's size relative to the object
    side (a period, an outline width, or a pip count). Classes come in pairs that share shape and pattern and
    differ only in ``detail``, so telling them apart needs enough pixels on the object."""

    name: str
    shape: str
    pattern: str
    detail: float


CLASSES: tuple[ClassSpec, ...] = (
    ClassSpec("00_stripes_fine", "ellipse", "stripes", 1 / 14),
    ClassSpec("01_stripes_coarse", "ellipse", "stripes", 1 / 8),
    ClassSpec("02_checker_fine", "squircle", "checker", 1 / 7),
    ClassSpec("03_checker_coarse", "squircle", "checker", 1 / 4),
    ClassSpec("04_dots_dense", "triangle", "dots", 1 / 12),
    ClassSpec("05_dots_sparse", "triangle", "dots", 1 / 7),
    ClassSpec("06_outline_thin", "hexagon", "outline", 0.02),
    ClassSpec("07_outline_thick", "hexagon", "outline", 0.055),
    ClassSpec("08_pips_nine", "pentagon", "pips", 9),
    ClassSpec("09_pips_sixteen", "pentagon", "pips", 16),
    ClassSpec("10_rings_fine", "disc", "rings", 1 / 14),
    ClassSpec("11_rings_coarse", "disc", "rings", 1 / 8),
    ClassSpec("12_grid_fine", "diamond", "grid", 1 / 10),
    ClassSpec("13_grid_coarse", "diamond", "grid", 1 / 6),
    ClassSpec("14_waves_fine", "cross", "waves", 1 / 12),
    ClassSpec("15_waves_coarse", "cross", "waves", 1 / 7),
)

# Photographs bundled in scikit-image's wheel (no pooch download). Grey ones are tinted when used.
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "camera",
          "coins", "moon", "grass", "gravel", "brick", "clock", "cell")


def check_image_set(cfg, prefix: str, max_classes: int, lowest_size: int) -> None:
    """The checks every generated image set shares (``synth``, ``photos``): class and image counts, sizes, aspect
    and object-scale ranges, workers; a ConfigError names ``prefix.setting``."""
    def bad(key: str, reason: str) -> ConfigError:
        return ConfigError(f"{prefix}.{key}", reason)

    if not 2 <= cfg.classes <= max_classes:
        raise bad("classes", f"must be between 2 and {max_classes}, got {cfg.classes}")
    if cfg.train_per_class < 0 or cfg.val_per_class < 0 or cfg.train_per_class + cfg.val_per_class == 0:
        raise bad("per_class", "image counts must be >= 0 and not both 0")
    if not lowest_size <= cfg.min_size <= cfg.max_size:
        raise bad("size", f"need {lowest_size} <= min_size <= max_size, got {cfg.min_size}..{cfg.max_size}")
    if not 1.0 <= cfg.aspect_range[0] <= cfg.aspect_range[1] <= 4.0:
        raise bad("aspect_range", f"need 1 <= low <= high <= 4, got {cfg.aspect_range}")
    if not 0.0 < cfg.scale_range[0] <= cfg.scale_range[1] <= 1.0:
        raise bad("scale_range", f"need 0 < low <= high <= 1, got {cfg.scale_range}")
    if cfg.workers < 0:
        raise bad("workers", f"must be >= 0 (0: every usable core), got {cfg.workers}")


@dataclass(frozen=True)
class SynthConfig:
    """What to generate. Sizes are the long side in pixels; ``aspect_range`` is long/short side; ``scale_range``
    is the object side over the shorter image side, sampled log-uniformly. ``workers``: processes (0: every
    usable core, 1: this process); the output does not depend on it."""

    classes: int = 10
    train_per_class: int = 300
    val_per_class: int = 100
    seed: int = 0
    min_size: int = 300
    max_size: int = 800
    aspect_range: tuple[float, float] = (1.0, 1.78)
    scale_range: tuple[float, float] = (0.13, 0.9)  # 6.9x; docs/io-measurements.md: why not smaller
    jpeg_quality: int = 90
    workers: int = 1

    def __post_init__(self) -> None:
        check_image_set(self, "synth", len(CLASSES), lowest_size=32)
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError("synth.jpeg_quality", f"must be in 1..100, got {self.jpeg_quality}")

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in CLASSES[: self.classes]]


@dataclass(frozen=True)
class SynthObject:
    """Where the object of one rendered image lies. Box in pixels, x1/y1 exclusive, clipped to the image."""

    width: int
    height: int
    box: tuple[int, int, int, int]
    scale: float  # object side (before clipping) / shorter image side
    occluded: bool


@dataclass(frozen=True)
class SynthReport:
    """What a generated image set (``synth``, and ``dynres.io.photos``) wrote: where, how many, how fast."""

    out_dir: str
    classes: int
    train: int
    val: int
    seconds: float

    @property
    def images(self) -> int:
        return self.train + self.val

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("inf")


# ---------------------------------------------------------------- shapes: signed distance, < 0 inside
# Coordinates are normalized: the object's square patch spans [-1, 1] on both axes.

def _polygon(n: int, apothem: float):
    normals = [(math.cos(2 * math.pi * (k + 0.5) / n), math.sin(2 * math.pi * (k + 0.5) / n)) for k in range(n)]

    def sdf(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        d = u * normals[0][0] + v * normals[0][1]
        for nx, ny in normals[1:]:
            d = np.maximum(d, u * nx + v * ny)
        return d - apothem

    return sdf


def _ellipse(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (np.sqrt(u * u + (v * (1 / 0.62)) ** 2) - 0.97) * 0.62


def _squircle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    u2, v2 = u * u, v * v
    return np.sqrt(np.sqrt(u2 * u2 + v2 * v2)) - 0.78


def _disc(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.sqrt(u * u + v * v) - 0.96


def _diamond(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (np.abs(u) + np.abs(v) - 0.98) * (1 / math.sqrt(2))


def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    au, av = np.abs(u), np.abs(v)
    return np.minimum(np.maximum(au - 0.92, av - 0.36), np.maximum(au - 0.36, av - 0.92))


_SHAPES = {
    "ellipse": _ellipse,
    "squircle": _squircle,
    "triangle": _polygon(3, 0.5),
    "hexagon": _polygon(6, 0.85),
    "pentagon": _polygon(5, 0.8),
    "disc": _disc,
    "diamond": _diamond,
    "cross": _cross,
}


# ---------------------------------------------------------------- patterns: signed distance, > 0 on the pattern
# ``a, b`` are the object's coordinates turned by the pattern angle, ``p`` the pattern size (normalized units).

def _wave(x: np.ndarray, p: float) -> np.ndarray:
    # sin scaled so that its slope at a crossing is 1: a distance near the stripe edges, smooth elsewhere
    return np.sin(x * (2 * math.pi / p)) * (p / (2 * math.pi))


def _lattice(x: np.ndarray, p: float) -> np.ndarray:
    return np.abs(x / p - np.round(x / p)) * p  # distance to the nearest multiple of p


def _pat_stripes(a, b, u, v, d, p, rng):
    return _wave(a + rng.uniform(0, p), p)


def _pat_checker(a, b, u, v, d, p, rng):
    return _wave(a, p) * np.sin(b * (2 * math.pi / p))


def _pat_dots(a, b, u, v, d, p, rng):
    da, db = _lattice(a + rng.uniform(0, p), p), _lattice(b + rng.uniform(0, p), p)
    return 0.3 * p - np.sqrt(da * da + db * db)


def _pat_rings(a, b, u, v, d, p, rng):
    return _wave(np.sqrt(u * u + v * v) + rng.uniform(0, p), p)


def _pat_grid(a, b, u, v, d, p, rng):
    return 0.11 * p - np.minimum(_lattice(a + rng.uniform(0, p), p), _lattice(b + rng.uniform(0, p), p))


def _pat_waves(a, b, u, v, d, p, rng):
    return _wave(a + 0.3 * p * np.sin(b * (2 * math.pi / (2.5 * p))), p)


def _pat_outline(a, b, u, v, d, w, rng):
    return d + w


def _pat_pips(a, b, u, v, d, n, rng):
    # a k x k grid of pips, the same inked area for every count: both blur into the same even blob
    k = math.isqrt(int(n))
    radius, step = 0.36 / k, 1.08 / k
    centres = [(i - (k - 1) / 2) * step for i in range(k)]
    near = None
    for px, py in ((x, y) for x in centres for y in centres):
        dist = np.sqrt((u - px) ** 2 + (v - py) ** 2)
        near = dist if near is None else np.minimum(near, dist)
    return radius - near


_PATTERNS = {
    "stripes": _pat_stripes, "checker": _pat_checker, "dots": _pat_dots, "rings": _pat_rings,
    "grid": _pat_grid, "waves": _pat_waves, "outline": _pat_outline, "pips": _pat_pips,
}
_PERIODIC = {"stripes", "checker", "dots", "rings", "grid", "waves"}
# Sensor noise is added last with add_modulo (several times faster than a clipping add), so everything drawn
# before it stays at or below _WHITE.
_NOISE_MAX = 16
_WHITE = 255 - _NOISE_MAX


# ---------------------------------------------------------------- rendering

@functools.lru_cache(maxsize=1)
def _photos() -> tuple[Image.Image, ...]:
    """The bundled photographs as RGB images, loaded once per process."""
    import skimage.data

    out = []
    for name in PHOTOS:
        try:
            arr = np.asarray(getattr(skimage.data, name)())
        except (AttributeError, ImportError, OSError, ValueError) as err:
            raise DynresError(f"skimage.data.{name}", f"bundled photo not available offline ({err})") from err
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0, 1) * 255).astype(np.uint8) if arr.dtype.kind == "f" else arr.astype(np.uint8)
        out.append(Image.fromarray(arr[..., :3] if arr.ndim == 3 else arr).convert("RGB"))
    return tuple(out)


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A random crop of a bundled photo with the target aspect, flipped and colour-jittered."""
    photos = _photos()
    photo = photos[rng.integers(len(photos))]
    pw, ph = photo.size
    cw = min(pw, ph * w / h) * rng.uniform(0.45, 1.0)
    ch = cw * h / w
    x0, y0 = rng.uniform(0, pw - cw), rng.uniform(0, ph - ch)
    # jitter the (smaller) source crop, then resize: the output is mostly larger than the crop
    ix0, iy0 = int(x0), int(y0)
    img = photo.crop((ix0, iy0, min(pw, math.ceil(x0 + cw)), min(ph, math.ceil(y0 + ch))))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x0 = ix0 + img.width - (x0 - ix0) - cw  # the crop box flips with the pixels
    # brightness, contrast, gamma and a per-channel tint (which also colours the grey photos) in one lookup table
    x = np.arange(256, dtype=np.float64) / 255.0
    gamma, contrast, bright = rng.uniform(0.7, 1.4), rng.uniform(0.7, 1.25), rng.uniform(-0.12, 0.12)
    base = (x**gamma - 0.5) * contrast + 0.5 + bright
    lut = np.concatenate([base * rng.uniform(0.8, 1.2) for _ in range(3)])
    img = img.point(np.clip(lut * 255 + 0.5, 0, _WHITE).astype(np.uint8).tolist())
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.4, 1.4))
    box = (x0 - ix0, y0 - iy0, x0 - ix0 + cw, y0 - iy0 + ch)
    return img.resize((w, h), Image.Resampling.BILINEAR, box=box, reducing_gap=2.0)


@functools.lru_cache(maxsize=2)
def _noise(side: int) -> Image.Image:
    """A fixed tile of sensor-like noise in [0, _NOISE_MAX] (sigma 2.5): real photos carry it, and it is what
    makes JPEG's last scans cost bytes. One tile per process; each image takes a random window of it."""
    rng = np.random.default_rng(20240611)
    noise = rng.normal(_NOISE_MAX / 2, 2.5, (side, side, 3)) + 0.5
    return Image.fromarray(np.clip(noise, 0, _NOISE_MAX).astype(np.uint8))


def _noise_side(config: SynthConfig) -> int:
    return max(1024, 1 << (config.max_size - 1).bit_length())


def _colour(rng: np.random.Generator, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.25, 0.95), value), dtype=np.float32)


def _object(rng: np.random.Generator, spec: ClassSpec, s: int, bg_lum: float) -> tuple[np.ndarray, np.ndarray]:
    """Render one object on an s x s patch: (rgb float32 in [0, 1], alpha float32)."""
    c = (np.arange(s, dtype=np.float32) + 0.5) * np.float32(2.0 / s) - 1.0
    x, y = c[None, :], c[:, None]
    px = 2.0 / s  # one pixel in normalized units
    t = rng.uniform(0, 2 * math.pi)
    u, v = x * math.cos(t) + y * math.sin(t), y * math.cos(t) - x * math.sin(t)
    d = _SHAPES[spec.shape](u, v)
    alpha = np.clip(0.5 - d / px, 0.0, 1.0)

    t = rng.uniform(0, 2 * math.pi)
    a, b = x * math.cos(t) + y * math.sin(t), y * math.cos(t) - x * math.sin(t)
    if spec.pattern in _PERIODIC:
        size = 2 * spec.detail * rng.uniform(0.88, 1.12)
        # a lens blurs what the sensor cannot sample: fade patterns whose period nears 2 pixels instead of aliasing
        contrast = float(np.clip((size / px - 2.0) / 2.0, 0.0, 1.0))
    else:
        size = spec.detail if spec.pattern == "pips" else 2 * spec.detail * rng.uniform(0.88, 1.12)
        contrast = 1.0
    ink = np.clip(0.5 + _PATTERNS[spec.pattern](a, b, u, v, d, size, rng) / px, 0.0, 1.0)
    if contrast < 1.0:
        ink = 0.5 + (ink - 0.5) * contrast

    # body stands out from the background; the pattern stands out from the body; hues carry no class information
    v_body = rng.uniform(0.55, 0.95) if bg_lum < 0.5 else rng.uniform(0.12, 0.45)
    v_ink = np.clip(v_body + rng.choice([-1.0, 1.0]) * rng.uniform(0.35, 0.6), 0.05, 1.0)
    if abs(v_ink - v_body) < 0.3:
        v_ink = v_body - 0.4 if v_body > 0.5 else v_body + 0.4
    body, inkc = _colour(rng, v_body), _colour(rng, float(v_ink))
    t = rng.uniform(0, 2 * math.pi)
    shade = 0.85 + 0.22 * (u * math.cos(t) + v * math.sin(t))
    shade += rng.standard_normal((s, s), dtype=np.float32) * np.float32(rng.uniform(0.01, 0.05))
    rgb = (body + (inkc - body) * ink[..., None]) * shade[..., None]
    return rgb, alpha


def _size(rng: np.random.Generator, cfg: SynthConfig) -> tuple[int, int]:
    long_side = int(rng.integers(cfg.min_size, cfg.max_size + 1))
    short_side = max(16, int(round(long_side / rng.uniform(*cfg.aspect_range))))
    return (long_side, short_side) if rng.random() < 0.7 else (short_side, long_side)


def _centre(rng: np.random.Generator, extent: int, s: int, spread: float) -> float:
    # most objects near the centre (centre crops then magnify them as on ImageNet), some anywhere; at most ~20%
    # of an object is cut off by the image border
    pos = rng.normal(extent / 2, spread) if rng.random() < 0.85 else rng.uniform(0, extent)
    margin = min(0.3 * s, extent / 2)
    return float(np.clip(pos, margin, extent - margin))


def render(config: SynthConfig, split: str, label: int, index: int) -> tuple[Image.Image, SynthObject]:
    """Image ``index`` of class ``label`` in ``split``: a pure function of the config's seed and these three."""
    if split not in SPLITS or not 0 <= label < config.classes or index < 0:
        raise ConfigError(f"{split}/{label}/{index}", f"no such image: split in {SPLITS}, 0 <= label < "
                          f"{config.classes}, index >= 0")
    rng = np.random.default_rng([config.seed, SPLITS.index(split), label, index])
    spec = CLASSES[label]
    w, h = _size(rng, config)
    img = _background(rng, w, h)
    short_side = min(w, h)
    lo, hi = config.scale_range
    s = max(12, int(round(short_side * math.exp(rng.uniform(math.log(lo), math.log(hi))))))
    s = min(s, short_side)
    x0 = int(round(_centre(rng, w, s, 0.12 * short_side) - s / 2))
    y0 = int(round(_centre(rng, h, s, 0.12 * short_side) - s / 2))
    # the part of the patch inside the image
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x0 + s, w), min(y0 + s, h)
    region = np.asarray(img.crop((ix0, iy0, ix1, iy1)), dtype=np.float32) * np.float32(1 / 255)
    bg_lum = float(region.mean()) if region.size else 0.5
    rgb, alpha = _object(rng, spec, s, bg_lum)
    sub = (slice(iy0 - y0, iy1 - y0), slice(ix0 - x0, ix1 - x0))
    al = alpha[sub][..., None]
    region += (rgb[sub] - region) * al
    img.paste(Image.fromarray(np.clip(region * 255 + 0.5, 0, _WHITE).astype(np.uint8)), (ix0, iy0))

    rows, cols = np.flatnonzero(alpha.max(axis=1) >= 0.5), np.flatnonzero(alpha.max(axis=0) >= 0.5)
    scale = max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1) / short_side
    box = (max(x0 + int(cols[0]), 0), max(y0 + int(rows[0]), 0),
           min(x0 + int(cols[-1]) + 1, w), min(y0 + int(rows[-1]) + 1, h))
    occluded = bool(rng.random() < 0.25)
    if occluded:  # something in front covers part of the object's edge
        r = s * rng.uniform(0.15, 0.3)
        t = rng.uniform(0, 2 * math.pi)
        cx, cy = x0 + s / 2 + 0.5 * s * math.cos(t), y0 + s / 2 + 0.5 * s * math.sin(t)
        fill = tuple(int(c * 255) for c in _colour(rng, rng.uniform(0.1, 0.9)))
        draw = ImageDraw.Draw(img)
        if rng.random() < 0.5:
            draw.ellipse((cx - r, cy - r * rng.uniform(0.5, 1.0), cx + r, cy + r), fill=fill)
        else:
            draw.rectangle((cx - r, cy - r, cx + r * rng.uniform(0.5, 1.0), cy + r), fill=fill)
    tile = _noise(_noise_side(config))
    nx, ny = int(rng.integers(tile.width - w + 1)), int(rng.integers(tile.height - h + 1))
    img = ImageChops.add_modulo(img, tile.crop((nx, ny, nx + w, ny + h)))  # cannot wrap: pixels <= _WHITE
    return img, SynthObject(w, h, box, float(scale), occluded)


# ---------------------------------------------------------------- writing

def _relpath(split: str, label: int, index: int) -> str:
    return f"{split}/{CLASSES[label].name}/{index:05d}.jpg"


def _write_one(out_dir: str, config: SynthConfig, task: tuple[str, int, int]) -> dict:
    split, label, index = task
    img, obj = render(config, split, label, index)
    rel = _relpath(split, label, index)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=config.jpeg_quality, progressive=False, optimize=False)
    path = Path(out_dir) / rel
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
    return {"split": split, "path": rel, "label": label, "class_name": CLASSES[label].name,
            "width": obj.width, "height": obj.height, "box_x0": obj.box[0], "box_y0": obj.box[1],
            "box_x1": obj.box[2], "box_y1": obj.box[3], "scale": obj.scale, "occluded": obj.occluded}


def _write_chunk(out_dir: str, config: SynthConfig, tasks: list[tuple[str, int, int]]) -> list[dict]:
    return [_write_one(out_dir, config, t) for t in tasks]


def prepare_output(out: Path, marker: str, table: str, what: str) -> None:
    """Refuse to write into an unrelated non-empty folder; clear an earlier build (its ``marker`` file says so),
    finished or not: its train/, val/ and ``table``. ``what`` names the builder in the messages."""
    if out.exists() and not out.is_dir():
        raise DynresError(out, "exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / marker).is_file():
            raise DynresError(out, f"is not empty and holds no earlier {what} output ({marker}); choose a new folder")
        for split in SPLITS:
            shutil.rmtree(out / split, ignore_errors=True)
        (out / table).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / marker).write_text(f"written by dynres {what}; a new run may replace this folder's train/, val/ and "
                              f"{table}\n")


def synth(out_dir: str | os.PathLike, config: SynthConfig = SynthConfig(), progress: bool = True) -> SynthReport:
    """Write ``OUT/{train,val}/<class>/<index>.jpg`` and the sidecar ``OUT/objects.parquet``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    out = Path(out_dir)
    prepare_output(out, MARKER, TABLE, "synth")
    counts = {"train": config.train_per_class, "val": config.val_per_class}
    tasks = [(split, label, i) for split in SPLITS for label in range(config.classes) for i in range(counts[split])]
    for split in SPLITS:
        for name in config.class_names if counts[split] else []:
            (out / split / name).mkdir(parents=True, exist_ok=True)
    _photos(), _noise(_noise_side(config))  # load once before forking, so workers inherit them

    chunk = 8
    chunks = [tasks[i : i + chunk] for i in range(0, len(tasks), chunk)]
    work = functools.partial(_write_chunk, str(out), config)
    records: list[dict] = []
    bar = "synth"
    workers = config.workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    if workers == 1:
        for part in track(map(work, chunks), len(chunks), bar, progress):
            records.extend(part)
    else:
        with ProcessPoolExecutor(workers) as pool:
            for part in track(pool.map(work, chunks), len(chunks), bar, progress):
                records.extend(part)

    settings = {k: v for k, v in asdict(config).items() if k != "workers"}  # the bytes do not depend on workers
    meta = {_META_KEY: json.dumps(settings).encode(),
            b"dynres.synth.classes": json.dumps([asdict(c) for c in CLASSES[: config.classes]]).encode()}
    table = pa.Table.from_pylist(records).replace_schema_metadata(meta)
    tmp = out / f".{TABLE}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, out / TABLE)
    return SynthReport(str(out), config.classes, counts["train"] * config.classes,
                       counts["val"] * config.classes, time.perf_counter() - t0)
