"""Scan layouts judged by the backbone (``dynres layout``): which scan script gives a read policy the most accuracy
per byte, measured with the model that will read the store, not by SSIM (shared/REFERENCE.md: SSIM prefers a
DC-first spectral layout that the backbone needs 91-93% of the bytes for at 112 px, against 35% for libjpeg's).

For every candidate script (:mod:`dynres.io.layout`), a sample of the images is transcoded losslessly with it into a
temporary store (``ingest --scans``: same DCT coefficients, only the scan order differs), and the backbone's top-1 is
measured with *every* image read to k scans, for every k and every resolution of the grid, at one crop. Together with
the mean bytes a k-scan read costs, that is the candidate's *frontier* per resolution: (bytes, top-1) at k = 1..all.

Bytes are a fraction of the libjpeg-default file: per image, the prefix's bytes over the same image's file in libjpeg's
default layout, averaged over images; so a layout whose files are larger pays for it, and the default's full read is
1.0. *Fewest bytes* at a resolution is the smallest such fraction whose top-1 is within ``tolerance`` points (0.1) of
the candidate's full read (which is the same for every candidate: the transcodes are lossless).

**Dominance and the choice.** The sample is split in two halves, deterministically (seeded shuffle of the sorted keys,
alternate images): *selection* and *held-out*. On a half, candidate A dominates the default D when A's fewest bytes
are lower than or equal to D's at every grid resolution and strictly lower at one at least. The choice:

1. among the candidates that dominate the default on the selection half, the one with the lowest mean fewest bytes
   over the grid (ties: the order of the candidates);
2. it is chosen only if it also dominates the default on the held-out half (one test, no second guess on held-out
   images); otherwise, and when no candidate dominates, libjpeg's default stays.

The ranking reported orders the candidates by their mean fewest bytes over the grid on the held-out half.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dynres._ui import log, status_bar
from dynres.errors import ConfigError
from dynres.io.format import MANIFEST
from dynres.io.ingest import IngestConfig, ingest
from dynres.io.layout import CANDIDATES, DEFAULT_CANDIDATES, LIBJPEG, ScanScript, candidate, require_jpegtran
from dynres.io.sources import IMG_EXTENSIONS
from dynres.io.store import Store, open_store
from dynres.model.checkpoint import checkpoint_digest, load_checkpoint
from dynres.paper import DEFAULT_CROP_SIDE, scaled_grid
from dynres.records import markdown_table, write_records
from dynres.study.static import GridModel, predict_grid

HALVES = ("selection", "held_out")


@dataclass(frozen=True)
class LayoutConfig:
    """What ``dynres layout`` measures. ``crop`` is an area fraction (default: the pipeline's 0.875 side);
    ``candidates``: names of :data:`dynres.io.layout.CANDIDATES` or scan-script files (libjpeg's default is always
    added first: it is the baseline); ``workers``: ingest processes (0: every core)."""

    grid: tuple[int, ...] | None = None  # None: the paper's ratios around the checkpoint's train resolution
    crop: float = DEFAULT_CROP_SIDE ** 2
    sample: int = 600
    candidates: tuple[str, ...] = DEFAULT_CANDIDATES
    tolerance: float = 0.1  # top-1 points below the full read still counted as "the full read's accuracy"
    seed: int = 0
    batch_size: int = 64
    backend: str = "auto"
    workers: int = 0

    def __post_init__(self) -> None:
        if self.grid is not None and (not self.grid or min(self.grid) < 8):
            raise ConfigError("grid", f"need resolutions >= 8, got {self.grid}")
        if not 0 < self.crop <= 1:
            raise ConfigError("crop", f"a crop area is in (0, 1], got {self.crop}")
        if self.sample < 2:
            raise ConfigError("sample", f"need at least 2 images (a selection and a held-out half), got {self.sample}")
        if self.tolerance < 0:
            raise ConfigError("tolerance", f"must be >= 0, got {self.tolerance}")
        if self.workers < 0:
            raise ConfigError("workers", f"must be >= 0, got {self.workers}")
        self.scripts()  # an unknown name or a bad script file fails here, before any work

    def scripts(self) -> list[ScanScript]:
        """The candidate scripts, libjpeg's default first, each once."""
        scripts = [CANDIDATES[LIBJPEG]] + [candidate(c) for c in self.candidates]
        return list({s.sha256: s for s in reversed(scripts)}.values())[::-1]


# --- the sample ---------------------------------------------------------------------------------------------


def is_store(source: str | Path) -> bool:
    """Whether ``source`` is a store (an fsspec URL, or a directory with a manifest) rather than an ImageFolder."""
    return "://" in str(source) or (Path(source) / MANIFEST).is_file()


def sample_source(source: str | Path, dst: Path, n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Copy a seeded sample of ``n`` images of ``source`` (a store: each file's full read; an ImageFolder: the
    files) into the ImageFolder ``dst``, every class folder created; returns (classes, the sampled keys/paths)."""
    rng = random.Random(seed)
    if is_store(source):
        store = open_store(source)
        classes, picked = list(store.classes), sorted(rng.sample(sorted(store.keys), min(n, len(store))))
        for c in classes:
            (dst / c).mkdir(parents=True, exist_ok=True)
        for i, key in enumerate(picked):
            (dst / store.classes[store.label(key)] / f"{i:06d}.jpg").write_bytes(store.read(key))
        return classes, picked
    root = Path(source)
    if not root.is_dir():
        raise ConfigError(source, "neither a store (no manifest.parquet) nor an ImageFolder directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = sorted(p.relative_to(root).as_posix() for c in classes for p in (root / c).rglob("*")
                   if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
    if not files:
        raise ConfigError(source, "no images in class folders")
    picked = sorted(rng.sample(files, min(n, len(files))))
    for c in classes:
        (dst / c).mkdir(parents=True, exist_ok=True)
    for i, rel in enumerate(picked):
        shutil.copyfile(root / rel, dst / rel.split("/")[0] / f"{i:06d}{Path(rel).suffix.lower()}")
    return classes, picked


def split_halves(keys: Sequence[str], seed: int = 0) -> dict[str, list[str]]:
    """The selection and held-out halves: a seeded shuffle of the sorted keys, alternate images to each."""
    order = sorted(keys)
    random.Random(seed).shuffle(order)
    return {"selection": sorted(order[0::2]), "held_out": sorted(order[1::2])}


# --- measuring one candidate ----------------------------------------------------------------------------------


@dataclass
class Measurement:
    """One candidate's store measured: ``correct[k-1, i, j]`` whether image ``keys[i]`` read to k scans is classified
    right at ``grid[j]``; ``prefix[k-1, i]`` the bytes that read costs (the whole file once k passes its scans)."""

    keys: list[str]
    grid: tuple[int, ...]
    correct: np.ndarray
    prefix: np.ndarray
    sizes: np.ndarray


def measure(run: GridModel, store: Store, grid: Sequence[int], crop: float, batch_size: int = 64,
            step=lambda status: None) -> Measurement:
    """Top-1 correctness of every image at every scan count and resolution (one :func:`predict_grid` per k)."""
    keys, grid = list(store.keys), tuple(grid)
    most = max(store.num_scans(k) for k in keys)
    correct = np.zeros((most, len(keys), len(grid)), dtype=bool)
    row, col = {k: i for i, k in enumerate(keys)}, {r: j for j, r in enumerate(grid)}
    for k in range(1, most + 1):
        table = predict_grid(run, store, keys, grid, (crop,), scans=k, batch_size=batch_size, progress=False)
        for key, r, ok in zip(*(table.column(n).to_pylist() for n in ("key", "resolution", "correct"))):
            correct[k - 1, row[key], col[r]] = ok
        step(f"{k}/{most} scans")
    prefix = np.array([[store.prefix_size(key, k) for key in keys] for k in range(1, most + 1)], dtype=np.int64)
    return Measurement(keys, grid, correct, prefix, np.array([store.size(k) for k in keys], dtype=np.int64))


def frontier(m: Measurement, keys: Sequence[str], base_sizes: dict[str, int]) -> list[dict]:
    """(resolution, scans, bytes, top1) for every k and resolution over ``keys``; bytes as a fraction of each image's
    libjpeg-default file (``base_sizes``), averaged."""
    position = {k: i for i, k in enumerate(m.keys)}
    index = [position[k] for k in keys]
    base = np.array([base_sizes[k] for k in keys], dtype=np.float64)
    rows = []
    for j, r in enumerate(m.grid):
        for k in range(1, m.correct.shape[0] + 1):
            rows.append({"resolution": r, "scans": k,
                         "bytes": float(np.mean(m.prefix[k - 1, index] / base)),
                         "top1": 100.0 * float(np.mean(m.correct[k - 1, index, j]))})
    return rows


def fewest_bytes(points: list[dict], tolerance: float) -> dict[int, dict]:
    """Per resolution, the cheapest point whose top-1 is within ``tolerance`` points of the full read (the last k),
    with that full read's top-1."""
    out = {}
    for r in sorted({p["resolution"] for p in points}):
        pts = [p for p in points if p["resolution"] == r]
        full = max(pts, key=lambda p: p["scans"])
        ok = [p for p in pts if p["top1"] >= full["top1"] - tolerance - 1e-9]
        best = min(ok, key=lambda p: (p["bytes"], p["scans"]))
        out[r] = {**best, "full_top1": full["top1"], "full_bytes": full["bytes"]}
    return out


def dominates(a: dict[int, dict], b: dict[int, dict]) -> bool:
    """Whether fewest-bytes ``a`` is <= ``b`` at every resolution and < at one (see the module docstring)."""
    return all(a[r]["bytes"] <= b[r]["bytes"] for r in b) and any(a[r]["bytes"] < b[r]["bytes"] for r in b)


def mean_bytes(fewest: dict[int, dict]) -> float:
    return float(np.mean([p["bytes"] for p in fewest.values()]))


def choose(results: list[dict]) -> tuple[str, str]:
    """The chosen candidate's name and why (module docstring: dominate on the selection half, confirm on held-out);
    ``results[0]`` is libjpeg's default."""
    default = results[0]
    winners = [c for c in results[1:] if c["dominates_default"]["selection"]]
    if not winners:
        return default["name"], "no candidate dominates libjpeg's default on the selection half: the default stays"
    best = min(winners, key=lambda c: mean_bytes(c["fewest_bytes"]["selection"]))
    if not best["dominates_default"]["held_out"]:
        return default["name"], (f"{best['name']} dominates libjpeg's default on the selection half but not on the "
                                 "held-out half: the default stays")
    return best["name"], (f"{best['name']} dominates libjpeg's default on the selection and the held-out half "
                          f"(mean fewest bytes {mean_bytes(best['fewest_bytes']['held_out']):.3f} vs "
                          f"{mean_bytes(default['fewest_bytes']['held_out']):.3f} held-out)")


# --- the search -----------------------------------------------------------------------------------------------


def score_layouts(model, classes: Sequence[str], source: str | Path, grid: Sequence[int],
                  cfg: LayoutConfig = LayoutConfig(), progress: bool = True) -> dict:
    """Every candidate's frontier on a sample of ``source`` and the choice (no files written but temporaries)."""
    scripts = cfg.scripts()
    if len(scripts) > 1:
        require_jpegtran()
    run = model if isinstance(model, GridModel) else GridModel(model, cfg.backend)
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="dynres-layout-") as tmp:
        src_classes, picked = sample_source(source, Path(tmp) / "src", cfg.sample, cfg.seed)
        if list(src_classes) != list(classes):
            raise ConfigError(source, f"its classes {src_classes[:5]}... differ from the checkpoint's "
                                      f"{list(classes)[:5]}...")
        stores = [_transcode(Path(tmp), s, cfg.workers) for s in scripts]
        halves = split_halves(stores[0].keys, cfg.seed)
        base = {k: stores[0].size(k) for k in stores[0].keys}
        total = sum(max(s.num_scans(k) for k in s.keys) for s in stores)
        with status_bar(total, f"layout ({len(picked)} images x {len(grid)} resolutions)", progress) as step:
            for script, store in zip(scripts, stores):
                m = measure(run, store, grid, cfg.crop, cfg.batch_size,
                            lambda status, name=script.name: step(f"{name} {status}"))
                results.append(_result(script, store, m, halves, base, cfg.tolerance))
    for r in results:
        r["dominates_default"] = {h: dominates(r["fewest_bytes"][h], results[0]["fewest_bytes"][h]) for h in HALVES}
    chosen, reason = choose(results)
    ranking = sorted(results, key=lambda c: (mean_bytes(c["fewest_bytes"]["held_out"]),
                                             mean_bytes(c["fewest_bytes"]["selection"])))
    return {"source": str(source), "images": len(picked), "sample_keys": picked,
            "halves": {h: len(v) for h, v in halves.items()}, "grid": list(grid), "crop": cfg.crop,
            "tolerance": cfg.tolerance, "seed": cfg.seed, "backend": run.backend,
            "bytes_unit": "mean over images of the prefix's bytes / the image's file bytes in libjpeg's default layout",
            "candidates": results, "ranking": [c["name"] for c in ranking], "chosen": chosen, "reason": reason}


def _transcode(tmp: Path, script: ScanScript, workers: int) -> Store:
    """The sample ingested with ``script`` (libjpeg's default: no script, as ``ingest`` stores it)."""
    path = None if script.name == LIBJPEG else str(script.write(tmp / "scripts" / f"{script.ident}.txt"))
    out = tmp / "stores" / script.ident
    ingest(tmp / "src", out, IngestConfig(scans=path, workers=workers), progress=False)
    return open_store(out)


def _result(script: ScanScript, store: Store, m: Measurement, halves: dict[str, list[str]], base: dict[str, int],
            tolerance: float) -> dict:
    lossless = sum(bool(store.record(k)["lossless"]) for k in store.keys)
    if lossless < len(store):
        log(f"layout {script.name}: {len(store) - lossless} of {len(store)} sample images were re-encoded, not "
            "transcoded: their full reads differ from the source's")
    points = {h: frontier(m, keys, base) for h, keys in halves.items()}
    return {"name": script.name, "ident": script.ident, "sha256": script.sha256, "note": script.note,
            "scans": len(script.scans), "script": script.body(), "images": len(store), "lossless": lossless,
            "size_vs_default": float(np.mean(m.sizes / np.array([base[k] for k in m.keys]))),
            "frontier": points, "fewest_bytes": {h: fewest_bytes(p, tolerance) for h, p in points.items()}}


def run_layout(source: str | Path, checkpoint: str | Path, out: str | Path, cfg: LayoutConfig = LayoutConfig(),
               progress: bool = True) -> dict:
    """Score the candidate layouts with the backbone at ``checkpoint``; writes ``layout.json`` / ``layout.md``, the
    figure ``layout_frontiers.png`` and the chosen script ``layout.scans`` under ``out``."""
    from dynres.report.figures import layout_frontiers

    t0 = time.perf_counter()
    out = Path(out)
    model, meta = load_checkpoint(checkpoint)
    grid = tuple(cfg.grid or scaled_grid(meta.train_resolution))
    payload = score_layouts(model, meta.classes, source, grid, cfg, progress)
    chosen = next(c for c in cfg.scripts() if c.name == payload["chosen"])
    script_file = chosen.write(out / "layout.scans")
    payload = {"checkpoint": str(checkpoint), "checkpoint_sha256": checkpoint_digest(checkpoint), "arch": meta.arch,
               "train_resolution": meta.train_resolution, **payload, "chosen_ident": chosen.ident,
               "chosen_is_default": chosen.name == LIBJPEG, "script_file": str(script_file),
               "config": {**asdict(cfg), "grid": list(grid)}, "seconds": time.perf_counter() - t0}
    payload["figure"] = str(layout_frontiers(payload, out / "layout_frontiers.png"))
    write_records(out, "layout", payload, layout_document(payload))
    return payload


# --- the record -----------------------------------------------------------------------------------------------


def fewest_table(payload: dict, half: str = "held_out") -> str:
    """Fewest bytes within the tolerance per candidate (rows) and resolution (columns), with the scans read."""
    grid = payload["grid"]
    rows = []
    for c in payload["candidates"]:
        row = {"name": c["name"], "scans": c["scans"], "size": f"{c['size_vs_default']:.3f}"}
        for r in grid:
            p = c["fewest_bytes"][half][r]
            row[str(r)] = f"{100 * p['bytes']:.0f}% ({p['scans']})"
        row["mean"] = f"{100 * mean_bytes(c['fewest_bytes'][half]):.1f}%"
        rows.append(row)
    return markdown_table(rows, ["name", "scans", "size", *map(str, grid), "mean"],
                          ["layout", "scans", "file vs default", *[f"{r} px" for r in grid], "mean"])


def full_read_line(payload: dict, half: str = "held_out") -> str:
    default = payload["candidates"][0]["fewest_bytes"][half]
    return ", ".join(f"{r} px {default[r]['full_top1']:.1f}%" for r in payload["grid"])


def layout_document(payload: dict) -> str:
    """The layout record as Markdown: the choice, the fewest-bytes table on both halves, the scripts."""
    h = payload["halves"]
    lines = [
        f"# Scan layouts judged by {payload['arch']} (trained at {payload['train_resolution']} px)",
        "",
        (f"{payload['images']} images of `{payload['source']}` ({h['selection']} selection, {h['held_out']} "
         f"held-out), crop area {payload['crop']:.3f}, every image read to the same scan count; bytes are "
         f"{payload['bytes_unit']}."),
        "",
        (f"**Chosen: {payload['chosen']}** (`{payload['chosen_ident']}`): {payload['reason']}. Script: "
         f"`{payload['script_file']}`"
         + (" (libjpeg's default: `dynres ingest` without `--scans` writes it)." if payload["chosen_is_default"]
            else f"; apply it with `dynres ingest SRC STORE --scans {payload['script_file']}`.")),
        "",
        f"Ranking (mean fewest bytes, held-out): {' < '.join(payload['ranking'])}.",
        "",
        f"## Fewest bytes within {payload['tolerance']} points of the full read (scans read), held-out half",
        "",
        f"Full-read top-1: {full_read_line(payload)}.",
        "",
        fewest_table(payload, "held_out"),
        "",
        "## The same on the selection half",
        "",
        fewest_table(payload, "selection"),
        "",
        f"![frontiers]({Path(payload['figure']).name})",
        "",
        "## Candidates",
        "",
    ]
    for c in payload["candidates"]:
        lines += [f"- **{c['name']}** (`{c['ident']}`, {c['lossless']}/{c['images']} lossless): {c['note']}",
                  "  `" + " ".join(c["script"].split()) + "`"]
    return "\n".join(lines)
