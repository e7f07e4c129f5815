"""`dynres bench decode`: every libjpeg-turbo binding on the store's prefixes, at every DCT scale, against Pillow.

For each colour mode (RGB; L, the quality index's luma), scan count (a k-scan prefix, or the whole file) and DCT
scale (1/1, 1/2, 1/4, 1/8): ms per decode of each binding on the same bytes (one core, bindings rotated inside each
repeat, median of the repeats), whether its pixels equal Pillow's at that scale on every image, and dynres's own
decode (:func:`dynres.io.decode.decode_array` with the active decoder, asked for the same scale through its
``short_side``) against the fastest binding whose pixels match. Bindings that cannot scale (imagecodecs,
torchvision) are timed at full size only; one that is not installed or does not load is recorded with the reason.
"""

from __future__ import annotations

import ctypes.util
import io
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata

import numpy as np

from dynres._ui import track
from dynres.errors import ConfigError
from dynres.io.decode import active_decoder, dct_scale, decode_array
from dynres.io.store import StoreLike, open_store
from dynres.records import markdown_table, median, write_records

DecodeFn = Callable[[bytes, int, str], np.ndarray]  # (data, scale denominator, "RGB" | "L") -> HWC / HW uint8
SCALES = (1, 2, 4, 8)
MODES = ("RGB", "L")
MIN_SIDE = 64  # smaller images cannot be asked for every scale through a short side


@dataclass(frozen=True)
class DecodeBenchConfig:
    images: int = 48  # sampled from the store, the same sample for every cell
    repeats: int = 5
    scans: tuple[int, ...] = (1, 3, 5, 7, 0)  # 0: the whole file
    scales: tuple[int, ...] = SCALES
    modes: tuple[str, ...] = MODES
    seed: int = 0

    def __post_init__(self) -> None:
        if self.images < 1 or self.repeats < 1:
            raise ConfigError("bench decode", "images and repeats must be >= 1")
        if not self.scans or min(self.scans) < 0:
            raise ConfigError("bench decode", f"scans must be >= 1 (0: the whole file), got {self.scans}")
        if not self.scales or not set(self.scales) <= set(SCALES):
            raise ConfigError("bench decode", f"scales must be among {SCALES}, got {self.scales}")
        if not self.modes or not set(self.modes) <= set(MODES):
            raise ConfigError("bench decode", f"modes must be among {MODES}, got {self.modes}")


# --- the bindings: each loader returns a decode function or raises with the reason it cannot -----------------------


def _pillow() -> DecodeFn:
    from PIL import Image

    def run(data: bytes, s: int, mode: str) -> np.ndarray:
        img = Image.open(io.BytesIO(data))
        img.draft(mode, (max(1, img.size[0] // s), max(1, img.size[1] // s)))  # draft floors: ask for floor sizes
        return np.asarray(img if img.mode == mode else img.convert(mode))

    return run


def _simplejpeg() -> DecodeFn:
    import simplejpeg

    def run(data: bytes, s: int, mode: str) -> np.ndarray:
        h, w, _, _ = simplejpeg.decode_jpeg_header(data)  # min_factor alone does not scale: ask for the size
        out = simplejpeg.decode_jpeg(data, "RGB" if mode == "RGB" else "GRAY", min_height=-(-h // s),
                                     min_width=-(-w // s))
        return out if mode == "RGB" else out[..., 0]

    return run


def _pyturbojpeg() -> DecodeFn:
    import turbojpeg

    tj = turbojpeg.TurboJPEG()  # loads the system libturbojpeg; 2.x raises on libjpeg-turbo < 3.0

    def run(data: bytes, s: int, mode: str) -> np.ndarray:
        fmt = turbojpeg.TJPF_RGB if mode == "RGB" else turbojpeg.TJPF_GRAY
        out = tj.decode(data, pixel_format=fmt, scaling_factor=(1, s))
        return out if mode == "RGB" else out.reshape(out.shape[:2])

    return run


def _opencv() -> DecodeFn:
    import cv2

    cv2.setNumThreads(1)
    reduced = {1: 0, 2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
               8: cv2.IMREAD_REDUCED_GRAYSCALE_8}

    def run(data: bytes, s: int, mode: str) -> np.ndarray:
        flags = reduced[s] | cv2.IMREAD_IGNORE_ORIENTATION | (cv2.IMREAD_COLOR_RGB if mode == "RGB" else 0)
        return cv2.imdecode(np.frombuffer(data, np.uint8), flags)

    return run


def _imagecodecs() -> DecodeFn:
    import imagecodecs

    def run(data: bytes, s: int, mode: str) -> np.ndarray:
        return imagecodecs.jpeg8_decode(data, outcolorspace="RGB" if mode == "RGB" else "GRAY")

    return run


def _torchvision() -> DecodeFn:
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    def run(data: bytes, s: int, mode: str) -> np.ndarray:
        out = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                          mode=ImageReadMode.RGB if mode == "RGB" else ImageReadMode.GRAY)
        return out.permute(1, 2, 0).numpy() if mode == "RGB" else out[0].numpy()

    return run


@dataclass(frozen=True)
class Binding:
    name: str
    package: str  # the distribution whose version is recorded
    load: Callable[[], DecodeFn]
    scales: tuple[int, ...] = SCALES  # the DCT scales it can decode at
    note: str = ""


BINDINGS = (
    Binding("pillow", "pillow", _pillow, note="Image.draft (dynres's fallback)"),
    Binding("simplejpeg", "simplejpeg", _simplejpeg, note="pip wheel bundling libjpeg-turbo"),
    Binding("pyturbojpeg", "PyTurboJPEG", _pyturbojpeg, note="ctypes on the system libturbojpeg"),
    Binding("opencv", "opencv-python-headless", _opencv, note="imdecode IMREAD_REDUCED_*"),
    Binding("imagecodecs", "imagecodecs", _imagecodecs, (1,), note="no DCT scaling"),
    Binding("torchvision", "torchvision", _torchvision, (1,), note="no DCT scaling; deprecated in 0.29"),
)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def load_bindings() -> tuple[dict[str, DecodeFn], dict[str, dict]]:
    """The bindings that load here, and for every one its version, scales and why it is missing if it is."""
    fns, info = {}, {}
    for b in BINDINGS:
        entry = {"version": _version(b.package), "scales": list(b.scales), "note": b.note, "available": True,
                 "reason": ""}
        try:
            fns[b.name] = b.load()
        except Exception as err:  # ImportError, or the library it wraps is missing / too old
            entry.update(available=False, reason=f"{type(err).__name__}: {' '.join(str(err).split())}")
        info[b.name] = entry
    if "pyturbojpeg" in info:
        info["pyturbojpeg"]["library"] = ctypes.util.find_library("turbojpeg")
    return fns, info


# --- measuring -----------------------------------------------------------------------------------------------------


@dataclass
class _Cell:
    """One (mode, scans, scale): the sample's bytes and the short side that asks dynres for that scale."""

    mode: str
    scans: int  # 0: the whole file
    scale: int
    data: list[bytes]
    short_sides: list[int]


def short_side_for(width: int, height: int, scale: int) -> int:
    """A ``short_side`` for which dynres's decode picks DCT scale 1/``scale`` (the floor of the scaled short side,
    lowered until :func:`dct_scale` agrees)."""
    for side in range(min(width, height) // scale, 0, -1):
        if dct_scale(width, height, side) == scale:
            return side
    raise ConfigError("bench decode", f"no short side gives scale 1/{scale} for {width}x{height}")


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.array_equal(a, b))


def _ms_per_decode(run: Callable[[int], object], n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        run(i)
    return (time.perf_counter() - t0) / n * 1e3


def _measure_cell(cell: _Cell, fns: dict[str, DecodeFn], repeats: int) -> list[dict]:
    """Rows for every binding that decodes at this scale, and dynres: ms per decode (median), pixels == Pillow's."""
    mode, s, data, sides = cell.mode, cell.scale, cell.data, cell.short_sides
    scales = {b.name: b.scales for b in BINDINGS}
    runners: dict[str, Callable[[int], np.ndarray]] = {
        name: (lambda i, f=fn: f(data[i], s, mode)) for name, fn in fns.items() if s in scales[name]}
    runners["dynres"] = lambda i: decode_array(data[i], sides[i], mode=mode)
    reference = [runners["pillow"](i) for i in range(len(data))]
    equal = {name: all(_same(run(i), ref) for i, ref in enumerate(reference))  # doubles as the warm-up
             for name, run in runners.items()}
    times: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners)
    for r in range(repeats):  # rotated inside each repeat: drift hits every binding alike
        for name in order[r % len(order):] + order[: r % len(order)]:
            times[name].append(_ms_per_decode(runners[name], len(data)))
    mean_bytes = float(np.mean([len(d) for d in data]))
    return [{"mode": mode, "scans": cell.scans or "all", "scale": s, "mean_bytes": mean_bytes, "binding": name,
             "ms": median(times[name]), "equal_to_pillow": equal[name]} for name in runners]


def summarize(rows: list[dict]) -> list[dict]:
    """Per cell: the fastest binding whose pixels equal Pillow's, and dynres's decode against it."""
    cells: dict[tuple, list[dict]] = {}
    for row in rows:
        cells.setdefault((row["mode"], row["scans"], row["scale"]), []).append(row)
    out = []
    for (mode, scans, scale), group in cells.items():
        ok = [r for r in group if r["equal_to_pillow"] and r["binding"] != "dynres"]
        best = min(ok, key=lambda r: r["ms"])
        mine = next(r for r in group if r["binding"] == "dynres")
        pillow = next(r for r in group if r["binding"] == "pillow")
        out.append({"mode": mode, "scans": scans, "scale": scale, "mean_bytes": mine["mean_bytes"],
                    "fastest": best["binding"], "fastest_ms": best["ms"],
                    "pillow_ms": pillow["ms"], "dynres_ms": mine["ms"], "dynres_equal": mine["equal_to_pillow"],
                    "dynres_vs_fastest": mine["ms"] / best["ms"], "pillow_vs_fastest": pillow["ms"] / best["ms"]})
    return out


def _sample(store: StoreLike, config: DecodeBenchConfig) -> list[tuple[str, tuple[int, int]]]:
    """``config.images`` random keys with their sizes (from the first scan's header), both sides >= MIN_SIDE."""
    from PIL import Image

    keys = sorted(store.keys)
    random.Random(config.seed).shuffle(keys)
    sample = []
    for key in keys:
        size = Image.open(io.BytesIO(store.read(key, 1))).size
        if min(size) >= MIN_SIDE:
            sample.append((key, size))
        if len(sample) == config.images:
            break
    return sample


def measure_decode(store_url: str, config: DecodeBenchConfig = DecodeBenchConfig(), progress: bool = True) -> dict:
    """The record: per-binding ms per decode and pixel equality per (mode, scans, scale), and the summary."""
    import torch

    torch.set_num_threads(1)  # one core
    store = open_store(store_url)
    sample = _sample(store, config)
    if not sample:
        raise ConfigError("bench decode", f"no image with both sides >= {MIN_SIDE} px in {store_url}")
    fns, info = load_bindings()
    if "pillow" not in fns:
        raise ConfigError("bench decode", f"Pillow does not load: {info['pillow']['reason']}")
    cells = [(m, k, s) for m in config.modes for k in config.scans for s in config.scales]
    rows = []
    with warnings.catch_warnings():  # torchvision warns on every decode that its decoders are deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        for mode, k, s in track(cells, len(cells), "bench decode", progress):
            data = [store.read(key, k or None) for key, _ in sample]
            sides = [short_side_for(w, h, s) for _, (w, h) in sample]
            rows += _measure_cell(_Cell(mode, k, s, data, sides), fns, config.repeats)
    name, reason = active_decoder()
    return {"store": str(store_url), "config": asdict(config), "images": len(sample),
            "keys": [key for key, _ in sample], "bindings": info,
            "decoder": {"name": name, "reason": reason}, "rows": rows, "summary": summarize(rows)}


# --- rendering -----------------------------------------------------------------------------------------------------


def render_markdown(result: dict) -> str:
    names = [n for n, b in result["bindings"].items() if b["available"]] + ["dynres"]
    cfg = result["config"]
    parts = ["# dynres bench decode", "",
             f"Store `{result['store']}`, {result['images']} images, one core, median of {cfg['repeats']} repeats, "
             f"ms per decode (read excluded). `≠`: pixels differ from Pillow's at that scale on at least one image. "
             f"dynres decodes with **{result['decoder']['name']}** ({result['decoder']['reason']}).", ""]
    times = {(r["mode"], r["scans"], r["scale"], r["binding"]): r for r in result["rows"]}
    summary = {(r["mode"], r["scans"], r["scale"]): r for r in result["summary"]}
    for mode in cfg["modes"]:
        table = []
        for (m, scans, scale), s in summary.items():
            if m != mode:
                continue
            row = {"scans": scans, "scale": f"1/{scale}", "bytes": f"{s['mean_bytes']:,.0f}"}
            for n in names:
                r = times.get((m, scans, scale, n))
                row[n] = "" if r is None else f"{r['ms']:.3f}" + ("" if r["equal_to_pillow"] else " ≠")
            row["fastest"] = s["fastest"]
            row["ratio"] = f"{s['dynres_vs_fastest']:.2f}x"
            table.append(row)
        parts += [f"## {mode}", "",
                  markdown_table(table, ["scans", "scale", "bytes", *names, "fastest", "ratio"],
                                 ["scans", "scale", "mean bytes", *names, "fastest equal", "dynres / fastest"]), ""]
    parts += ["## Bindings", "", markdown_table(
        [{"name": n, "version": b["version"] or "", "scales": ", ".join(f"1/{s}" for s in b["scales"]),
          "note": b["note"], "status": "ok" if b["available"] else b["reason"]} for n, b in result["bindings"].items()],
        ["name", "version", "scales", "note", "status"])]
    return "\n".join(parts)


def run_bench_decode(store_url: str, out_dir, config: DecodeBenchConfig = DecodeBenchConfig(),
                     progress: bool = True) -> dict:
    """Measure, then write ``bench_decode.json`` / ``bench_decode.md`` under ``out_dir``."""
    result = measure_decode(store_url, config, progress)
    write_records(out_dir, "bench_decode", result, render_markdown(result))
    return result
