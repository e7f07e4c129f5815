"""The quality index: SSIM of every k-scan prefix against the full file, per image and inference resolution.

Calibration (``dynres.study.calibrate``) turns it into a read policy: at resolution r, read the fewest scans whose SSIM
reaches the threshold calibrated for r. The index lives beside the manifest in ``STORE/quality.parquet`` (long
format: ``key, sha256, resolution, scans, ssim``; the last scan is 1.0 by definition), so it can be computed at
ingest time or afterwards (``dynres index quality STORE``) without touching the store's own files.

How the two decodes are compared, and why:

* Both are the engine's view: one decode of the prefix at the DCT scale the largest resolution needs, then
  :func:`dynres.io.decode.crop_resize`'s crop and resampling for each resolution (what
  :class:`dynres.io.decode.PrefixViews` does), with one crop per resolution: ``crop_side`` 0.875, the pipeline's
  default view. The paper keeps one policy per resolution whatever the crop ("read savings are identical for each
  crop size"), so the index measures the view the backbone usually sees; the calibration report then checks the
  other crops and flags any that lose more than the target. Evaluation's exact views (a decode per DCT scale)
  differ from these by resampling only; one decode per prefix instead of one per DCT scale, and luma only, keep the
  index cheap (entropy decoding, the bulk of a progressive decode, costs the same at every scale). The
  measurements behind both are in docs/io-measurements.md.
* SSIM is Wang et al.'s (Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, data range 255, 'valid' border) on
  luminance (ITU-R 601 Y, which libjpeg decodes directly), all k of one image in one batched torch call. It is
  written in terms of the difference d = x - y (``l = 1 - mu_d^2 / (...)``, ``cs = 1 - var(d) / (...)``):
  algebraically Wang's formula, but float32 stays exact near SSIM 1, where thresholds live (the textbook form
  cancels catastrophically there).
* A prefix that gives the full file's pixels (the same luma at the decode scale, and no chroma scan left to
  read) scores exactly 1.0; any other is capped just below 1.0, so "SSIM == 1" means "this prefix gives the same
  pixels", which calibration uses to skip inference. Prefixes that end in a chroma-only scan are not decoded at
  all (luma SSIM cannot see them; see :func:`image_quality`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from dynres._ui import track
from dynres.errors import BadImageError, ConfigError, StoreError
from dynres.io.decode import decode_array, resize_center
from dynres.io.format import REPORT
from dynres.io.jpeg import SOI, scan_components, scan_prefix
from dynres.io.store import Store, StoreLike, open_store
from dynres.paper import DEFAULT_CROP_SIDE, PAPER_GRID
from dynres.records import markdown_table, write_records

QUALITY = "quality.parquet"
PARTS = ".quality"  # resumable part files while an index is being built
FORMAT_VERSION = 2  # 2: one luma decode per prefix at the engine's scale (1: a decode per DCT scale)
META_KEY = b"dynres.quality"
DEFAULT_RESOLUTIONS = PAPER_GRID  # 112, the grid's smallest, is the paper's scale-model input
SCHEMA = pa.schema([("key", pa.string()), ("sha256", pa.string()), ("resolution", pa.int32()),
                    ("scans", pa.int32()), ("ssim", pa.float64())])
BELOW_ONE = float(np.nextafter(1.0, 0.0))


@dataclass(frozen=True)
class QualityConfig:
    """Which views the index covers. Include every resolution a policy will be asked about (scale model's too)."""

    resolutions: tuple[int, ...] = DEFAULT_RESOLUTIONS
    crop_side: float = DEFAULT_CROP_SIDE
    workers: int = 0  # threads; 0: every usable core
    chunk: int = 32  # images per resumable part file

    def __post_init__(self) -> None:
        if not self.resolutions or any(int(r) < 1 for r in self.resolutions):
            raise ConfigError("resolutions", f"need at least one, all positive, got {self.resolutions}")
        if not 0 < self.crop_side <= 1:
            raise ConfigError("crop_side", f"must be in (0, 1], got {self.crop_side}")
        if self.workers < 0:
            raise ConfigError("workers", f"must be >= 0 (0: every usable core), got {self.workers}")
        if self.chunk < 1:
            raise ConfigError("chunk", f"must be positive, got {self.chunk}")

    def fingerprint(self) -> dict:
        """What determines the numbers; an index with another fingerprint is recomputed, not mixed."""
        return {"version": FORMAT_VERSION, "resolutions": sorted(set(self.resolutions)), "crop_side": self.crop_side,
                "ssim": {"window": 11, "sigma": 1.5, "k1": 0.01, "k2": 0.03, "channel": "luma601"}}


# --- SSIM ---------------------------------------------------------------------------------------------------


def _gaussian(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


_WINDOW = _gaussian()


def _filter(t: torch.Tensor) -> torch.Tensor:
    """Separable 11x11 Gaussian mean of each channel of (1,C,H,W), 'valid' border (== scikit-image's reflect
    padding then cropped). Depthwise channels-last convolution: much faster on CPU than a (C,1,H,W) batch."""
    c = t.shape[1]
    w = _WINDOW.to(t.dtype)
    t = t.contiguous(memory_format=torch.channels_last)
    t = F.conv2d(t, w.view(1, 1, -1, 1).expand(c, 1, -1, 1).contiguous(), groups=c)
    return F.conv2d(t, w.view(1, 1, 1, -1).expand(c, 1, 1, -1).contiguous(), groups=c)


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float = 255.0) -> torch.Tensor:
    """Mean SSIM of each image in ``x`` (N,1,H,W) against ``ref`` (1,1,H,W); returns (N,) float64."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    n = x.shape[0]
    x, ref = x[:, 0][None], ref[:, 0][None]  # images as channels: (1,N,H,W)
    d = x - ref
    stats = _filter(torch.cat([x, x * x, d * d, ref, ref * ref], dim=1))  # one call for all k
    # channels-last (H,W,C) → one contiguous row per channel: as a 2-D transpose this copy is faster than
    # .contiguous(), and the arithmetic below is faster on contiguous rows than on channels-last slices
    stats = stats.permute(0, 2, 3, 1).reshape(-1, stats.shape[1]).t().contiguous()
    mu_x, ex2, ed2 = stats[:n], stats[n:2 * n], stats[2 * n:3 * n]
    mu_y, ey2 = stats[3 * n:3 * n + 1], stats[3 * n + 1:]
    mu_d = mu_x - mu_y
    var_sum = (ex2 - mu_x * mu_x) + (ey2 - mu_y * mu_y)
    lum = 1 - mu_d * mu_d / (mu_x * mu_x + mu_y * mu_y + c1)
    cs = 1 - (ed2 - mu_d * mu_d) / (var_sum + c2)
    return (lum * cs).mean(dim=1).double()


# --- one image ---------------------------------------------------------------------------------------------


def _luma_plane(prefix: bytes, short_side: float, name: str) -> torch.Tensor:
    """The prefix's luma plane, decoded at the DCT scale the engine's one decode uses, by the engine's decoder
    (:func:`dynres.io.decode.decode_array`): uint8 (H, W).

    Asking libjpeg for grayscale output skips the chroma inverse DCT, upsampling and colour conversion (about a
    quarter of the decode); JFIF's Y is ITU-R 601 luma, so this is the luma of the RGB decode up to rounding.
    """
    if prefix[:2] != SOI:
        raise BadImageError(name, "not a JPEG")
    return torch.from_numpy(decode_array(prefix, short_side, name, mode="L"))


def luma_views(planes: torch.Tensor, resolution: int, crop_side: float) -> torch.Tensor:
    """Center views of luma planes (P,H,W) uint8 at one resolution, as the engine's :func:`crop_resize` makes
    them: float32 (P,r,r)."""
    return resize_center(planes[:, None], resolution, crop_side)[:, 0].float()


def scan_roles(data: bytes, scan_ends: list[int], name: str = "<bytes>") -> tuple[list[bool], list[bool]]:
    """Per scan, from its SOS header: does it carry coefficients of the first (luma) component, and of any other
    (chroma) component?"""
    comps = scan_components(data, scan_ends, name)
    return [first in ids for first, ids in comps], [any(c != first for c in ids) for first, ids in comps]


def image_quality(data: bytes, scan_ends: list[int], resolutions: tuple[int, ...],
                  crop_side: float = DEFAULT_CROP_SIDE, name: str = "<bytes>") -> tuple[np.ndarray, dict[str, float]]:
    """SSIM of every k-scan prefix vs the whole file: array (len(resolutions), num_scans) + timings.

    Each prefix ending in a luma scan is decoded once (luma only) at the scale the largest resolution needs and
    resized to every resolution. A prefix ending in a chroma-only scan has the luma of the prefix before it, so it
    is not decoded: it gets that prefix's score (and so is never the fewest scans reaching a threshold). A score
    is exactly 1.0 only when the prefix gives the full file's pixels: the same luma and no chroma scan left.
    """
    k_total = len(scan_ends)
    cost = {"decode_s": 0.0, "ssim_s": 0.0}
    has_luma, has_chroma = scan_roles(data, scan_ends, name)
    ks = [k for k in range(1, k_total) if has_luma[k - 1]] + [k_total]
    result = np.ones((len(resolutions), k_total), dtype=np.float64)
    if k_total == 1:
        return result, cost
    t0 = time.thread_time()  # the CPU time of this thread: one core's, however many threads run
    short_side = max(resolutions) / crop_side
    planes = [_luma_plane(scan_prefix(data, scan_ends, k), short_side, name) for k in ks]
    if len({p.shape for p in planes}) != 1:
        raise BadImageError(name, "scan prefixes decode to different sizes")
    planes = torch.stack(planes)
    chroma_left = [any(has_chroma[k:]) for k in ks[:-1]]
    same = (planes[:-1] == planes[-1:]).flatten(1).all(dim=1).numpy() & ~np.array(chroma_left, dtype=bool)
    cost["decode_s"] = time.thread_time() - t0
    cols = [k - 1 for k in ks[:-1]]
    for j, r in enumerate(resolutions):
        views = luma_views(planes, r, crop_side)
        scores = ssim(views[:-1, None], views[-1:, None]).clamp(max=BELOW_ONE).numpy()
        scores[same] = 1.0
        result[j, cols] = scores
    cost["ssim_s"] = time.thread_time() - t0 - cost["decode_s"]
    for k in range(2, k_total + 1):  # chroma-only scans: the luma of the prefix before them
        if not has_luma[k - 1]:
            result[:, k - 1] = result[:, k - 2]
    return result, cost


# --- the index of a store -----------------------------------------------------------------------------------


def _fs(store: Store) -> tuple[Any, str]:
    """(fsspec filesystem, root) of a store, local or remote: the index is read and written like the manifest."""
    return store.filesystem, str(store.root).rstrip("/")


def _current(store: StoreLike) -> dict[str, str]:
    """sha256 by key, in the store's order: what an index row must match to be reused."""
    return {key: store.sha256(key) for key in store.keys}


def manifest_hash(store: StoreLike) -> str:
    """Identifies the stored bytes: every (key, sha256) of the manifest."""
    h = hashlib.sha256()
    for key, sha in _current(store).items():
        h.update(f"{key}\t{sha}\n".encode())
    return h.hexdigest()[:16]


def _index_chunk(store: StoreLike, keys: list[str], resolutions: tuple[int, ...], crop_side: float
                 ) -> tuple[pa.Table, dict[str, float]]:
    cols: dict[str, list] = {name: [] for name in SCHEMA.names}
    cost = {"decode_s": 0.0, "ssim_s": 0.0, "read_s": 0.0}
    for key in keys:
        t0 = time.perf_counter()
        data = store.read(key)
        cost["read_s"] += time.perf_counter() - t0
        ends = store.scan_ends(key)
        values, timing = image_quality(data, ends, resolutions, crop_side, name=key)
        for name in ("decode_s", "ssim_s"):
            cost[name] += timing[name]
        sha = store.sha256(key)
        for j, r in enumerate(resolutions):
            for k in range(len(ends)):
                for name, v in zip(SCHEMA.names, (key, sha, r, k + 1, float(values[j, k]))):
                    cols[name].append(v)
    return pa.table(cols, schema=SCHEMA), cost


def _write_atomic(fs, table: pa.Table, path: str) -> None:
    tmp = path + ".tmp"
    with fs.open(tmp, "wb") as f:
        pq.write_table(table, f)
    fs.mv(tmp, path)


def _read_table(fs, path: str) -> pa.Table | None:
    try:
        with fs.open(path, "rb") as f:
            return pq.read_table(f)
    except FileNotFoundError:
        return None
    except (pa.ArrowException, OSError) as err:
        raise StoreError(path, f"quality index is truncated or corrupt ({err}); delete it to rebuild") from err


def _done(table: pa.Table | None, current: dict[str, str]) -> pa.Table | None:
    """Rows of ``table`` whose (key, sha256) still match the manifest."""
    if table is None or table.num_rows == 0:
        return None
    keys, shas = table.column("key").to_pylist(), table.column("sha256").to_pylist()
    keep = np.fromiter((current.get(k) == s for k, s in zip(keys, shas)), dtype=bool, count=len(keys))
    return table.filter(pa.array(keep))


def build_quality_index(store_or_url: Store | str | os.PathLike, config: QualityConfig = QualityConfig(),
                        progress: bool = True, keys: Sequence[str] | None = None) -> dict:
    """Compute (or resume, or extend to new images) ``STORE/quality.parquet``; returns a cost record
    (:func:`quality_markdown` renders it).

    ``keys``: index only these images (None: every image). Calibration needs the index of its calibration images
    alone, and of the rest of the store only once it has chosen an SSIM rule (:mod:`dynres.study.calibrate`
    extends it then), so a store need not pay for an index no policy uses. A later call with other keys, or
    with None, adds the missing images to the same index.

    Resumable: finished chunks are kept in ``STORE/.quality/`` until the final table is written, and rows whose
    file (sha256) is unchanged are reused; a different config rebuilds everything.
    """
    store = open_store(store_or_url) if isinstance(store_or_url, (str, os.PathLike)) else store_or_url
    fs, root = _fs(store)
    final, parts = f"{root}/{QUALITY}", f"{root}/{PARTS}"
    fingerprint = config.fingerprint()
    resolutions = tuple(fingerprint["resolutions"])
    have, start = _resume(fs, final, parts, fingerprint, _current(store))
    done = set().union(*(set(t.column("key").to_pylist()) for t in have)) if have else set()
    wanted = list(store.keys) if keys is None else list(dict.fromkeys(keys))
    held = set(store.keys)
    unknown = [k for k in wanted if k not in held]
    if unknown:
        raise StoreError(store.root, f"{len(unknown)} keys are not in the store (e.g. {unknown[0]!r})")
    todo = [k for k in wanted if k not in done]

    workers = config.workers or len(os.sched_getaffinity(0))
    chunks = [todo[i:i + config.chunk] for i in range(0, len(todo), config.chunk)]
    cost = {"decode_s": 0.0, "ssim_s": 0.0, "read_s": 0.0}
    t0 = time.perf_counter()
    if chunks:
        with contextlib.closing(_index_chunks(store, chunks, resolutions, config.crop_side, workers)) as results:
            for i, (table, chunk_cost) in enumerate(track(results, len(chunks), "quality index", progress)):
                _write_atomic(fs, table, f"{parts}/part-{start + i:06d}.parquet")
                have.append(table)
                for name in cost:
                    cost[name] += chunk_cost[name]
    seconds = time.perf_counter() - t0
    table = pa.concat_tables(have) if have else SCHEMA.empty_table()
    meta = {"config": fingerprint, "manifest_hash": manifest_hash(store),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _write_atomic(fs, table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()}), final)
    fs.rm(parts, recursive=True)
    return _cost_record(store, final, config, workers, len(todo), len(done & set(wanted)), seconds, cost,
                        _ingest_report(fs, root))


def _resume(fs, final: str, parts: str, fingerprint: dict, current: dict[str, str]) -> tuple[list[pa.Table], int]:
    """The rows still valid from an index with this fingerprint and from finished part files, and how many part
    files there are (new ones are numbered after them); part files of another config are removed."""
    have: list[pa.Table | None] = []
    old = _read_table(fs, final)
    if old is not None and json.loads((old.schema.metadata or {}).get(META_KEY, b"{}")).get("config") == fingerprint:
        have.append(_done(old.replace_schema_metadata(None), current))
    cfg_file = f"{parts}/config.json"
    if fs.exists(cfg_file) and json.loads(fs.cat_file(cfg_file)) != fingerprint:
        fs.rm(parts, recursive=True)
    fs.makedirs(parts, exist_ok=True)
    with fs.open(cfg_file, "wb") as f:
        f.write(json.dumps(fingerprint).encode())
    part_files = sorted(p for p in fs.ls(parts, detail=False) if p.endswith(".parquet"))
    have += [_done(_read_table(fs, p), current) for p in part_files]
    return [t for t in have if t is not None], len(part_files)


def _index_chunks(store: StoreLike, chunks: list[list[str]], resolutions: tuple[int, ...], crop_side: float,
                  workers: int) -> Iterator[tuple[pa.Table, dict[str, float]]]:
    """(rows, cost) of each chunk of keys, in order, on ``workers`` threads of this process.

    Threads, not processes: the decoder (libjpeg-turbo) and torch's kernels release the GIL, so threads scale
    like processes on this work, without starting a process that imports torch per worker (seconds, more than
    the index of a few hundred calibration images costs; docs/io-measurements.md). Each torch op runs on its
    caller's thread (torch's own pool is set to one thread meanwhile: two pools of every core oversubscribe)."""
    args = [(c, resolutions, crop_side) for c in chunks]
    with contextlib.ExitStack() as stack:
        stack.callback(torch.set_num_threads, torch.get_num_threads())
        torch.set_num_threads(1)
        if workers == 1:
            yield from (_index_chunk(store, *a) for a in args)
        else:
            pool = ThreadPoolExecutor(workers, thread_name_prefix="dynres-quality")
            stack.callback(pool.shutdown, wait=True, cancel_futures=True)  # a failed chunk stops the rest
            yield from pool.map(lambda a: _index_chunk(store, *a), args)


def _cost_record(store: Store, index: str, config: QualityConfig, workers: int, computed: int, reused: int,
                 seconds: float, cost: dict[str, float], ingest: dict) -> dict:
    """What building the index cost, per image and resolution, beside the ingest that built the store."""
    resolutions = config.fingerprint()["resolutions"]
    per = 1000.0 / max(computed, 1)
    ips = computed / seconds if seconds > 0 and computed else None
    return {
        "ingest_images_per_s": ingest.get("images_per_s"),
        # time this index took per image relative to ingest's (same machine; compare at equal workers)
        "index_time_over_ingest_time": (ingest["images_per_s"] / ips) if ips and ingest.get("images_per_s") else None,
        # this run's time against the time ingest took for the whole store: what indexing only the images
        # calibration needs saves
        "index_time_over_store_ingest_time": (seconds * ingest["images_per_s"] / len(store.keys))
        if ingest.get("images_per_s") and store.keys else None,
        "store": str(store.root), "index": index, "images": len(store.keys), "computed": computed, "reused": reused,
        "workers": workers, "seconds": seconds, "images_per_s": ips,
        "ms_per_image_per_resolution": {  # decode, ssim: CPU time of one core; read: wall time of its thread
            "decode": cost["decode_s"] * per / len(resolutions), "ssim": cost["ssim_s"] * per / len(resolutions),
            "read": cost["read_s"] * per / len(resolutions)},
        "config": asdict(config),
    }


def _ingest_report(fs, root: str) -> dict:
    """The store's ``ingest_report.json`` (images/s of the ingest that built it), or {} if absent."""
    try:
        return json.loads(fs.cat_file(f"{root}/{REPORT}"))
    except (OSError, ValueError):
        return {}


def quality_markdown(report: dict) -> str:
    cost = report["ms_per_image_per_resolution"]
    rows = [{"part": k, "ms": v} for k, v in cost.items()]
    ratio, whole = report.get("index_time_over_ingest_time"), report.get("index_time_over_store_ingest_time")
    return "\n".join([
        f"# Quality index of `{report['store']}`", "",
        (f"{report['computed']} images indexed ({report['reused']} reused) in {report['seconds']:.1f} s with "
        f"{report['workers']} workers; resolutions {report['config']['resolutions']}, crop side "
        f"{report['config']['crop_side']}."), "",
        "Cost per image per resolution (one core's time, ms):", "",
        markdown_table(rows, ["part", "ms"]), "",
        (f"Ingest of this store: {report.get('ingest_images_per_s') or 'unknown'} images/s; index time / ingest time: "
        f"{f'{ratio:.2f}' if ratio else 'unknown'} per image, "
        f"{f'{whole:.2f}' if whole else 'unknown'} for this run against ingesting the whole store "
        f"({report['computed']} of {report['images']} images indexed)."),
    ])


def write_quality_record(report: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """``quality_index.json`` + ``.md`` under ``out_dir``: the record of one :func:`build_quality_index` report."""
    return write_records(out_dir, "quality_index", report, quality_markdown(report))


# --- reading it back ----------------------------------------------------------------------------------------


@dataclass
class QualityIndex:
    """Dense view: ``ssim[i, j, k-1]`` for key i, resolution j, k scans (NaN past the image's last scan)."""

    keys: tuple[str, ...]
    resolutions: tuple[int, ...]
    num_scans: np.ndarray  # (N,)
    ssim: np.ndarray  # (N, R, Kmax)
    meta: dict

    def __post_init__(self) -> None:
        self.rows = {k: i for i, k in enumerate(self.keys)}

    def column(self, resolution: int) -> int:
        if resolution not in self.resolutions:
            raise StoreError(resolution, f"resolution not in the quality index {list(self.resolutions)}")
        return self.resolutions.index(resolution)

    def fewest_scans(self, threshold: float, resolution: int, rows: np.ndarray | None = None) -> np.ndarray:
        """Per image: the fewest scans whose SSIM >= ``threshold`` (the last scan always qualifies)."""
        rows = np.arange(len(self.keys)) if rows is None else np.asarray(rows)
        s = self.ssim[rows, self.column(resolution), :]
        ok = np.nan_to_num(s, nan=-np.inf) >= threshold
        ok[np.arange(len(rows)), self.num_scans[rows] - 1] = True
        return ok.argmax(axis=1) + 1


def load_quality(store: Store, keys: Sequence[str] | None = None) -> QualityIndex:
    """Read ``STORE/quality.parquet`` (local or fsspec) for the images the store holds now (``keys``: only these,
    in this order; the index may lack the others)."""
    fs, root = _fs(store)
    path = f"{root}/{QUALITY}"
    table = _read_table(fs, path)
    if table is None:
        raise StoreError(path, "no quality index: run `dynres index quality STORE` first")
    meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
    table = _done(table, _current(store))
    if table is None:
        raise StoreError(path, "quality index covers none of the store's current files: rebuild it")
    keys_done = set(table.column("key").to_pylist())
    keys = list(store.keys) if keys is None else list(keys)
    missing = [k for k in keys if k not in keys_done]
    if missing:
        raise StoreError(path, f"{len(missing)} images lack quality data (e.g. {missing[0]!r}): "
                               "run `dynres index quality STORE` to extend it")
    rows = {k: i for i, k in enumerate(keys)}
    table = table.filter(pc.is_in(table.column("key"), value_set=pa.array(keys, pa.string())))
    resolutions = tuple(meta.get("config", {}).get("resolutions")
                        or sorted(set(table.column("resolution").to_pylist())))
    cols = {r: j for j, r in enumerate(resolutions)}
    num_scans = np.array([store.num_scans(k) for k in keys], dtype=np.int64)
    dense = np.full((len(keys), len(resolutions), int(num_scans.max(initial=1))), np.nan)
    ki = np.array([rows[k] for k in table.column("key").to_pylist()])
    rj = np.array([cols[r] for r in table.column("resolution").to_pylist()])
    kk = table.column("scans").to_numpy() - 1
    dense[ki, rj, kk] = table.column("ssim").to_numpy()
    return QualityIndex(tuple(keys), resolutions, num_scans, dense, meta)
