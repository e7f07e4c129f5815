"""`dynres bench io`: what DCT-scaled decoding and scan prefixes buy, measured against the common baseline.

For each resolution: images/s of read + decode + resize + crop with the fast path (``decode``: libjpeg DCT scaling)
versus the baseline (full Pillow decode + torchvision Resize + CenterCrop), on one core and on all cores, both
reading every scan. Methods alternate inside each repeat so machine drift hits both alike; medians are reported.
Also the mean bytes read per image for each scan count, the store's bytes against its sources' (and how many images
are stored losslessly), and ingest throughput when a source tree is given.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from dynres._ui import track
from dynres.errors import ConfigError
from dynres.io.decode import decode, decode_baseline
from dynres.io.store import Store, StoreLike
from dynres.paper import DEFAULT_CROP_SIDE, PAPER_GRID
from dynres.records import markdown_table, median, write_records


@dataclass(frozen=True)
class IOBenchConfig:
    resolutions: tuple[int, ...] = PAPER_GRID
    images: int = 64  # sampled from the store, the same sample for every cell
    repeats: int = 3
    crop_side: float = DEFAULT_CROP_SIDE
    workers: int = 0  # "all cores": 0 means every usable core
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.resolutions or min(self.resolutions) < 1:
            raise ConfigError("bench io", f"resolutions must be positive, got {self.resolutions}")
        if self.images < 1 or self.repeats < 1 or self.workers < 0:
            raise ConfigError("bench io", "images and repeats must be >= 1, workers >= 0")
        if not 0 < self.crop_side <= 1:
            raise ConfigError("bench io", f"crop_side must be in (0, 1], got {self.crop_side}")


METHODS = ("dct_scaled", "baseline")
_DECODERS = dict(zip(METHODS, (decode, decode_baseline)))
MODES = ("one_core", "all_cores")

# Worker-process state for the all-cores runs: each process opens the store once.
_worker_store = None


def _init_worker(store_url: str) -> None:
    global _worker_store
    import torch

    from dynres.io.store import open_store

    torch.set_num_threads(1)
    _worker_store = open_store(store_url)


def _decode_keys(store: StoreLike, keys: list[str], method: str, resolution: int, crop_side: float) -> int:
    fn = _DECODERS[method]
    for key in keys:
        fn(store.read(key), resolution, crop_side, name=key)
    return len(keys)


def _worker_run(args: tuple[list[str], str, int, float]) -> int:
    return _decode_keys(_worker_store, *args)


def _rate(fn) -> float:
    t0 = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - t0)


def bytes_per_scan(store: Store) -> list[dict]:
    """Mean bytes read per image (and fraction of the file) when reading the first k scans, k = 1..max."""
    ends = store.manifest.column("scan_ends").to_pylist()
    sizes = np.array([e[-1] for e in ends], dtype=np.float64)
    rows = []
    for k in range(1, max(len(e) for e in ends) + 1):
        read = np.array([e[min(k, len(e)) - 1] for e in ends], dtype=np.float64)
        rows.append({"scans": k, "mean_bytes": float(read.mean()), "fraction_of_file": float((read / sizes).mean())})
    return rows


def measure_ingest(src: str | Path, workers: int) -> dict:
    """Ingest ``src`` into a throw-away store and report images/s (progressive re-encode included)."""
    from dynres.io.ingest import IngestConfig, ingest

    with tempfile.TemporaryDirectory(prefix="dynres-bench-ingest-") as tmp:
        report = ingest(src, Path(tmp) / "store", IngestConfig(workers=workers), progress=False)
    return {"images": report.ingested, "seconds": report.seconds, "images_per_s": report.images_per_s,
            "workers": workers, "lossless": report.lossless, "reasons": report.reasons,
            "transcoder": report.transcoder}


def store_bytes(store: Store) -> dict:
    """Stored bytes against the sources' bytes (the manifest's ``size`` and ``source_size``), and how many images
    are stored losslessly."""
    m = store.manifest
    size, source = int(pc.sum(m.column("size")).as_py() or 0), int(pc.sum(m.column("source_size")).as_py() or 0)
    return {"store_bytes": size, "source_bytes": source, "store_over_source": size / source if source else None,
            "lossless_images": int(pc.sum(m.column("lossless")).as_py() or 0), "images": m.num_rows}


def _decode_row(store: StoreLike, pool: ProcessPoolExecutor, keys: list[str], chunks: list[list[str]],
                resolution: int, config: IOBenchConfig) -> dict:
    """Images/s of each method on one core and on all cores at one resolution (medians), and the speedups."""
    rates: dict[tuple[str, str], list[float]] = {}
    for _ in range(config.repeats):
        for method in METHODS:  # alternated inside each repeat: machine drift hits both alike
            one = _rate(lambda: _decode_keys(store, keys, method, resolution, config.crop_side))
            rates.setdefault((method, "one_core"), []).append(one)
            args = [(c, method, resolution, config.crop_side) for c in chunks]
            many = _rate(lambda: sum(pool.map(_worker_run, args)))
            rates.setdefault((method, "all_cores"), []).append(many)
    row = {"resolution": resolution}
    for (method, mode), values in rates.items():
        row[f"{method}_{mode}_images_per_s"] = median(values)
    for mode in MODES:
        row[f"speedup_{mode}"] = row[f"dct_scaled_{mode}_images_per_s"] / row[f"baseline_{mode}_images_per_s"]
    return row


def measure_io(store_url: str, config: IOBenchConfig = IOBenchConfig(), src: str | Path | None = None,
               progress: bool = True) -> dict:
    """The record: decode rates per resolution, bytes per scan count, mean file size (and ingest, given ``src``)."""
    import torch

    from dynres.io.store import open_store

    torch.set_num_threads(1)  # "one core" means one core: decode's torch resize would otherwise use two
    store = open_store(store_url)
    keys = sorted(store.keys)
    random.Random(config.seed).shuffle(keys)
    keys = keys[: config.images]
    workers = config.workers or len(os.sched_getaffinity(0))
    chunks = [keys[i::workers] for i in range(workers)]
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(store_url,)) as pool:
        for method in METHODS:  # warm-up: imports, page cache, worker start-up stay out of the timings
            _decode_keys(store, keys[:4], method, 112, config.crop_side)
            list(pool.map(_worker_run, [(c[:4], method, 112, config.crop_side) for c in chunks]))
        rows = [_decode_row(store, pool, keys, chunks, res, config)
                for res in track(config.resolutions, len(config.resolutions), "bench io", progress)]
    result = {
        "store": str(store_url),
        "config": asdict(config),
        "workers": workers,
        "decode": rows,
        "bytes_per_scan": bytes_per_scan(store),
        "mean_file_bytes": float(np.mean(store.manifest.column("size").to_numpy())),
        "bytes": store_bytes(store),
    }
    if src is not None:
        result["ingest"] = measure_ingest(src, workers)
    return result


def render_markdown(result: dict) -> str:
    cols = ["resolution", "dct_scaled_one_core_images_per_s", "baseline_one_core_images_per_s", "speedup_one_core",
            "dct_scaled_all_cores_images_per_s", "baseline_all_cores_images_per_s", "speedup_all_cores"]
    heads = ["res", "DCT-scaled 1 core (img/s)", "baseline 1 core", "speedup", f"DCT-scaled {result['workers']} cores",
             f"baseline {result['workers']} cores", "speedup"]
    parts = [
        "# dynres bench io", "",
        f"Store `{result['store']}`, {result['config']['images']} images, crop {result['config']['crop_side']}, "
        f"median of {result['config']['repeats']} repeats. Read + decode + resize + center crop, all scans.", "",
        markdown_table(result["decode"], cols, heads), "",
        "## Bytes read per image by scan count", "",
        markdown_table(result["bytes_per_scan"], ["scans", "mean_bytes", "fraction_of_file"],
                       ["scans", "mean bytes", "fraction of file"]),
    ]
    if "bytes" in result:
        b = result["bytes"]
        ratio = f"**{b['store_over_source']:.3f}x**" if b["store_over_source"] is not None else "n/a"
        parts += ["", f"Store bytes / source bytes: {b['store_bytes']:,} / {b['source_bytes']:,} = {ratio}; "
                  f"{b['lossless_images']} of {b['images']} images stored losslessly."]
    if "ingest" in result:
        ing = result["ingest"]
        reasons = "; ".join(f"{n} {rule}" for rule, n in ing.get("reasons", {}).items()) or "none"
        parts += ["", f"Ingest: {ing['images']} images in {ing['seconds']:.1f} s = **{ing['images_per_s']:.1f} images/s** "
                  f"({ing['workers']} workers; {ing.get('lossless', 0)} transcoded losslessly by "
                  f"{ing.get('transcoder')}, the rest re-encoded; reasons: {reasons})."]
    return "\n".join(parts)


def run_bench_io(store_url: str, out_dir: str | Path, config: IOBenchConfig = IOBenchConfig(),
                 src: str | Path | None = None, progress: bool = True) -> dict:
    """Measure, then write ``bench_io.json`` / ``bench_io.md`` under ``out_dir``."""
    result = measure_io(store_url, config, src, progress)
    write_records(out_dir, "bench_io", result, render_markdown(result))
    return result
