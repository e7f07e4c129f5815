"""Real-photo development data: real drawings composited at random scales onto real photographs, offline.

``dynres data synth`` makes the phenomena appear on purpose; this set is for checking that dynres holds up on data
it did not make. Its objects are real clip art: the colour emoji of Debian's ``fonts-noto-color-emoji`` (Noto
Color Emoji, drawn by people, rendered with Pillow). A class is one hand gesture; each gesture comes in six
variants (the default yellow and five skin tones), which every class shares, so colour says nothing about the
class and telling gestures apart needs the shape. Each image pastes one gesture at a random scale (log-uniform,
side over the shorter image side), position, rotation and mirror onto a random crop of a real photograph
(scikit-image's bundled photos, matplotlib's sample photograph, and any folder of photos given), sometimes with
an unrelated emoji (an object, not a hand) as clutter behind it, and saves a baseline JPEG at a random quality,
as clip art composited by hand would be. Every image is a pure function of ``(seed, split, class, index)``; each
object's box, scale, variant and rotation go to ``OUT/objects.parquet``.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

from dynres._ui import track
from dynres.errors import ConfigError, DynresError
from dynres.io.synth import SynthReport, check_image_set, prepare_output

SPLITS = ("train", "val")
TABLE = "objects.parquet"
MARKER = ".dynres-photos"  # marks a folder this module may clear and rewrite
FONT_PACKAGE = "fonts-noto-color-emoji"
FONT_PATHS = ("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf", "/usr/share/fonts/noto/NotoColorEmoji.ttf",
              "/usr/share/fonts/google-noto-emoji/NotoColorEmoji.ttf")
FONT_ENV = "DYNRES_EMOJI_FONT"  # another path to the font
_FONT_SIZE = 109  # the one size of the font's colour bitmaps (136 x 128 px)
_VS16 = "\ufe0f"  # emoji presentation, for the gestures whose plain code point is a text symbol

# (class name, code point); none is a mirror or a turn of another within the rotations used
GESTURES: tuple[tuple[str, str], ...] = (
    ("00_thumbs_up", "\U0001F44D"), ("01_victory", "\u270C"), ("02_ok_hand", "\U0001F44C"),
    ("03_crossed_fingers", "\U0001F91E"), ("04_waving", "\U0001F44B"), ("05_raised_fist", "\u270A"),
    ("06_horns", "\U0001F918"), ("07_call_me", "\U0001F919"), ("08_vulcan", "\U0001F596"),
    ("09_love_you", "\U0001F91F"), ("10_clapping", "\U0001F44F"), ("11_folded_hands", "\U0001F64F"),
    ("12_flexed_biceps", "\U0001F4AA"), ("13_writing_hand", "\u270D"), ("14_pinched_fingers", "\U0001F90C"),
    ("15_oncoming_fist", "\U0001F44A"),
)
SKIN_TONES = ("", "\U0001F3FB", "\U0001F3FC", "\U0001F3FD", "\U0001F3FE", "\U0001F3FF")  # "" = default yellow
CLUTTER = tuple("\U0001F34E\U0001F697\U0001F333\u26BD\U0001F4DA\U0001F388\U0001F436\U0001F3B8\u2615\U0001F4F1"
                "\U0001F6B2\U0001F33B\U0001F41F\U0001F9F8\u23F0\U0001F511")  # objects and animals, never hands

# Photographs bundled with scikit-image's wheel and matplotlib's sample data (no download).
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "grass", "gravel", "brick",
                  "clock", "immunohistochemistry")
MPL_PHOTOS = ("grace_hopper.jpg",)


@dataclass(frozen=True)
class PhotosConfig:
    """What to build. Sizes are the long side in pixels; ``scale_range`` is the object's side over the shorter image
    side (log-uniform); ``rotation`` the largest turn in degrees either way; ``quality_range`` the baseline JPEG
    quality (uniform); ``clutter`` the chance of an unrelated emoji behind the object; ``backgrounds`` an optional
    folder of more photos (JPEG/PNG, searched recursively). ``workers``: processes (0: every usable core); the
    output does not depend on it."""

    classes: int = 8
    train_per_class: int = 200
    val_per_class: int = 60
    seed: int = 0
    min_size: int = 320
    max_size: int = 720
    aspect_range: tuple[float, float] = (1.0, 1.6)
    scale_range: tuple[float, float] = (0.1, 0.8)
    rotation: float = 30.0
    quality_range: tuple[int, int] = (85, 95)
    clutter: float = 0.4
    backgrounds: str | None = None
    workers: int = 1

    def __post_init__(self) -> None:
        check_image_set(self, "photos", len(GESTURES), lowest_size=64)
        if not 0.0 <= self.rotation <= 180.0:
            raise ConfigError("photos.rotation", f"must be in [0, 180] degrees, got {self.rotation}")
        if not 1 <= self.quality_range[0] <= self.quality_range[1] <= 100:
            raise ConfigError("photos.quality_range", f"need 1 <= low <= high <= 100, got {self.quality_range}")
        if not 0.0 <= self.clutter <= 1.0:
            raise ConfigError("photos.clutter", f"must be a probability, got {self.clutter}")

    @property
    def class_names(self) -> list[str]:
        return [name for name, _ in GESTURES[: self.classes]]


# ---------------------------------------------------------------- sources

def font_path() -> Path:
    """The colour emoji font: ``$DYNRES_EMOJI_FONT``, else the Debian/Fedora locations; one clear line if absent."""
    candidates = [os.environ[FONT_ENV]] if os.environ.get(FONT_ENV) else list(FONT_PATHS)
    for path in map(Path, candidates):
        if path.is_file():
            return path
    raise DynresError(candidates[0], f"colour emoji font not found: install the Debian package {FONT_PACKAGE} "
                                     f"(`make install` does, as root) or set {FONT_ENV}")


@functools.lru_cache(maxsize=1)
def _font() -> ImageFont.FreeTypeFont:
    from PIL import features

    if not features.check("raqm"):  # skin-tone sequences are one glyph only through libraqm's shaping
        raise DynresError("Pillow", "needs libraqm (complex text layout) to render skin-tone emoji sequences")
    return ImageFont.truetype(str(font_path()), _FONT_SIZE, layout_engine=ImageFont.Layout.RAQM)


@functools.lru_cache(maxsize=256)
def emoji(text: str) -> Image.Image:
    """One emoji (a code point or sequence) as an RGBA image cropped to its drawing; an error if it draws nothing."""
    font = _font()
    canvas = Image.new("RGBA", (2 * _FONT_SIZE, 2 * _FONT_SIZE), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((4, 4), text, font=font, embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    if box is None or canvas.convert("RGB").getextrema() == ((0, 0),) * 3:
        raise DynresError(str(font_path()), f"draws no colour glyph for {text!r}")
    return canvas.crop(box)


def gesture_text(label: int, variant: int) -> str:
    """The emoji sequence of class ``label`` in skin-tone ``variant`` (0: default yellow)."""
    base = GESTURES[label][1]
    if variant == 0:
        return base + (_VS16 if ord(base) < 0x1F000 else "")
    return base + SKIN_TONES[variant]


def _to_rgb(arr: np.ndarray) -> Image.Image:
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255).astype(np.uint8) if arr.dtype.kind == "f" else arr.astype(np.uint8)
    return Image.fromarray(arr[..., :3] if arr.ndim == 3 else arr).convert("RGB")


@functools.lru_cache(maxsize=4)
def photos(backgrounds: str | None = None) -> tuple[Image.Image, ...]:
    """The background photographs, loaded once per process: the bundled ones, then ``backgrounds``' files (sorted)."""
    import matplotlib.cbook
    import skimage.data

    out = []
    for name in SKIMAGE_PHOTOS:
        try:
            out.append(_to_rgb(np.asarray(getattr(skimage.data, name)())))
        except (AttributeError, ImportError, OSError, ValueError) as err:
            raise DynresError(f"skimage.data.{name}", f"bundled photo not available offline ({err})") from err
    for name in MPL_PHOTOS:
        with matplotlib.cbook.get_sample_data(name) as f:
            out.append(Image.open(f).convert("RGB"))
    if backgrounds is not None:
        files = sorted(p for p in Path(backgrounds).rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
        if not files:
            raise DynresError(backgrounds, "holds no .jpg/.jpeg/.png photos")
        for path in files:
            with Image.open(path) as img:
                img.draft("RGB", (1024, 1024))  # wallpapers are large: decode near the sizes used
                out.append(img.convert("RGB"))
    return tuple(out)


# ---------------------------------------------------------------- rendering

def _background(rng: np.random.Generator, pool: tuple[Image.Image, ...], w: int, h: int) -> tuple[Image.Image, int]:
    """A random crop (30-100% of the largest one with the target aspect) of a random photo, maybe mirrored."""
    index = int(rng.integers(len(pool)))
    photo = pool[index]
    pw, ph = photo.size
    cw = min(pw, ph * w / h) * rng.uniform(0.3, 1.0)
    ch = cw * h / w
    x0, y0 = rng.uniform(0, pw - cw), rng.uniform(0, ph - ch)
    img = photo.resize((w, h), Image.Resampling.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch), reducing_gap=2.0)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img, index


def _sprite(rng: np.random.Generator, text: str, side: int, rotation: float) -> tuple[Image.Image, float]:
    """``text``'s drawing scaled so its longer side is ``side`` px, colour-jittered, mirrored or not, turned."""
    art = emoji(text)
    f = side / max(art.size)
    art = art.resize((max(1, round(art.width * f)), max(1, round(art.height * f))), Image.Resampling.LANCZOS)
    rgb, alpha = art.convert("RGB"), art.getchannel("A")
    rgb = ImageEnhance.Brightness(rgb).enhance(rng.uniform(0.8, 1.15))
    rgb = ImageEnhance.Contrast(rgb).enhance(rng.uniform(0.85, 1.15))
    art = Image.merge("RGBA", (*rgb.split(), alpha))
    if rng.random() < 0.5:
        art = art.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    angle = float(rng.uniform(-rotation, rotation))
    return art.rotate(angle, Image.Resampling.BICUBIC, expand=True), angle


def _place(rng: np.random.Generator, img: Image.Image, art: Image.Image) -> tuple[int, int, int, int]:
    """Paste ``art`` at a uniformly random position that keeps it inside the image where it fits; returns the box
    of its opaque part, clipped to the image (x1, y1 exclusive)."""
    x0 = int(rng.integers(min(0, img.width - art.width), max(0, img.width - art.width) + 1))
    y0 = int(rng.integers(min(0, img.height - art.height), max(0, img.height - art.height) + 1))
    img.paste(art, (x0, y0), art)
    bx0, by0, bx1, by1 = art.getchannel("A").point(lambda a: 255 if a >= 128 else 0).getbbox() or (0, 0, 0, 0)
    return (max(x0 + bx0, 0), max(y0 + by0, 0), min(x0 + bx1, img.width), min(y0 + by1, img.height))


def render(config: PhotosConfig, split: str, label: int, index: int) -> tuple[Image.Image, dict]:
    """Image ``index`` of class ``label`` in ``split`` and what it holds: a pure function of the seed and these."""
    if split not in SPLITS or not 0 <= label < config.classes or index < 0:
        raise ConfigError(f"{split}/{label}/{index}", f"no such image: split in {SPLITS}, 0 <= label < "
                          f"{config.classes}, index >= 0")
    rng = np.random.default_rng([config.seed, SPLITS.index(split), label, index])
    long_side = int(rng.integers(config.min_size, config.max_size + 1))
    short_side = max(32, round(long_side / rng.uniform(*config.aspect_range)))
    w, h = (long_side, short_side) if rng.random() < 0.7 else (short_side, long_side)
    img, photo = _background(rng, photos(config.backgrounds), w, h)
    if rng.random() < config.clutter:  # behind the object: it may hide part of the clutter, never the reverse
        side = max(8, round(min(w, h) * rng.uniform(0.08, 0.3)))
        _place(rng, img, _sprite(rng, CLUTTER[int(rng.integers(len(CLUTTER)))], side, config.rotation)[0])
    lo, hi = config.scale_range
    side = max(8, round(min(w, h) * math.exp(rng.uniform(math.log(lo), math.log(hi)))))
    variant = int(rng.integers(len(SKIN_TONES)))
    art, angle = _sprite(rng, gesture_text(label, variant), side, config.rotation)
    box = _place(rng, img, art)
    quality = int(rng.integers(config.quality_range[0], config.quality_range[1] + 1))
    return img, {"width": w, "height": h, "box_x0": box[0], "box_y0": box[1], "box_x1": box[2], "box_y1": box[3],
                 "scale": side / min(w, h), "variant": variant, "rotation": angle, "quality": quality,
                 "photo": photo}


# ---------------------------------------------------------------- writing

def _write_chunk(out_dir: str, config: PhotosConfig, tasks: list[tuple[str, int, int]]) -> list[dict]:
    rows = []
    for split, label, index in tasks:
        img, row = render(config, split, label, index)
        rel = f"{split}/{GESTURES[label][0]}/{index:05d}.jpg"
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=row["quality"], progressive=False, optimize=False)
        path = Path(out_dir) / rel
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, path)
        rows.append({"split": split, "path": rel, "label": label, "class_name": GESTURES[label][0]} | row)
    return rows


def build_photos(out_dir: str | os.PathLike, config: PhotosConfig = PhotosConfig(),
                 progress: bool = True) -> SynthReport:
    """Write ``OUT/{train,val}/<class>/<index>.jpg`` and ``OUT/objects.parquet`` (settings in its metadata)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    _font(), photos(config.backgrounds)  # fail (one line) before touching OUT; load before forking
    for name, _ in GESTURES[: config.classes]:
        for variant in range(len(SKIN_TONES)):
            emoji(gesture_text(GESTURES.index((name, _)), variant))
    out = Path(out_dir)
    prepare_output(out, MARKER, TABLE, "photos")
    counts = {"train": config.train_per_class, "val": config.val_per_class}
    tasks = [(s, label, i) for s in SPLITS for label in range(config.classes) for i in range(counts[s])]
    for split in SPLITS:
        for name in config.class_names if counts[split] else []:
            (out / split / name).mkdir(parents=True, exist_ok=True)
    chunks = [tasks[i: i + 8] for i in range(0, len(tasks), 8)]
    work = functools.partial(_write_chunk, str(out), config)
    workers = config.workers or len(os.sched_getaffinity(0))
    records: list[dict] = []
    if workers == 1:
        for part in track(map(work, chunks), len(chunks), "photos", progress):
            records.extend(part)
    else:
        with ProcessPoolExecutor(workers) as pool:
            for part in track(pool.map(work, chunks), len(chunks), "photos", progress):
                records.extend(part)
    settings = {k: v for k, v in asdict(config).items() if k != "workers"}  # the bytes do not depend on workers
    meta = {b"dynres.photos": json.dumps(settings).encode(),
            b"dynres.photos.font": str(font_path()).encode()}
    tmp = out / f".{TABLE}.tmp"
    pq.write_table(pa.Table.from_pylist(records).replace_schema_metadata(meta), tmp)
    os.replace(tmp, out / TABLE)
    return SynthReport(str(out), config.classes, counts["train"] * config.classes, counts["val"] * config.classes,
                        time.perf_counter() - t0)
