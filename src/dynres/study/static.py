"""Static characterization: top-1 accuracy and GFLOPs over a resolution grid x center-crop areas (Table I).

Its parts are the grid evaluation every study step shares (:class:`GridModel`: how a classifier runs over many
image and batch sizes, on ONNX Runtime where it agrees with PyTorch; :func:`predict_grid` over the views of
:func:`image_views`) and the static record built on it (:func:`run_static`).

Every (image, crop, resolution) prediction is kept in a Parquet table (columns ``key, label, crop, resolution,
pred, prob, correct, true_prob, margin``) so the scale labels, the dynamic evaluation and the oracle are look-ups,
never re-runs.

Crops are *area* fractions here (the paper's 25/56/75/100 %); :func:`dynres.paper.crop_side` turns them into the
side ratio that ``decode`` takes.

Views (:func:`image_views`): ``exact=True`` gives the static engine's pixels (``decode``, one decode per DCT
scale) and ``engine=True`` the dynamic engine's decode-once pixels: the verdict judges each mode on its own
(:func:`views_table`). The default decodes each image once (center square at the largest size any view needs)
and derives every view by center crop + antialiased resize: 28 views for the price of one progressive-JPEG
decode, which is what makes the grid affordable on 2 cores; the views differ from the engines' only by resampling
rounding, and a backbone unsure of an image can answer differently (docs/run-config.md).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dynres._ui import log, track
from dynres.errors import ConfigError
from dynres.io.decode import ScaledDecodes, decode_short_side
from dynres.io.store import StoreLike
from dynres.model.checkpoint import checkpoint_digest, load_checkpoint
from dynres.model.nets import channels_last, gflops, to_input
from dynres.paper import PAPER_CROPS, crop_side, scaled_grid
from dynres.policy.quality import manifest_hash
from dynres.policy.scans import Scans, scans_for
from dynres.records import markdown_table, write_records
from dynres.study.stages import digest, read_json


@dataclass(frozen=True)
class EvalConfig:
    """What the static evaluation covers; ``crops`` are area fractions (a run file's ``[eval] crops``)."""

    grid: tuple[int, ...] | None = None  # None: the paper's ratios around the checkpoint's train resolution
    crops: tuple[float, ...] = PAPER_CROPS  # area fractions
    batch_size: int = 64
    exact: bool = False
    limit: int | None = None  # evaluate only the first N keys (smoke runs)
    backend: str = "auto"  # how the model runs: see GridModel

    def __post_init__(self) -> None:
        if self.backend not in ("auto", "ort", "eager"):
            raise ConfigError("backend", f"unknown evaluation backend {self.backend!r} (auto, ort, eager)")
        if self.grid is not None and (not self.grid or min(self.grid) < 8):
            raise ConfigError("grid", f"need resolutions >= 8, got {self.grid}")
        if not self.crops or not all(0 < c <= 1 for c in self.crops):
            raise ConfigError("crops", f"crop areas must be in (0, 1], got {self.crops}")


# --- running the model ---------------------------------------------------------------------------------------


class GridModel:
    """A classifier as evaluation runs it, over many batch and image sizes: ``backend`` "ort" (one ONNX Runtime
    session with dynamic shapes, see :func:`dynres.runtime.backends.ort_any_shape`), "eager" (channels-last PyTorch), or
    "auto": ORT where onnx and onnxruntime are installed and the exported model agrees with PyTorch (relative error
    <= 1e-4 on two image sizes, the tuner's bar), else eager with the reason logged. Build it once and pass it to
    every :func:`predict_grid` call (an export takes about a second)."""

    def __init__(self, model: torch.nn.Module, backend: str = "auto", threads: int = 0):
        from dynres.runtime import backends as _backends

        if backend not in ("auto", "ort", "eager"):
            raise ConfigError("backend", f"unknown evaluation backend {backend!r} (auto, ort, eager)")
        self.model = channels_last(model).eval()
        self.backend, self._ort = "eager", None
        if backend == "eager":
            return
        try:
            missing = _backends.BACKENDS["ort"].missing()
            if missing:
                raise RuntimeError(missing)
            with tempfile.TemporaryDirectory(prefix="dynres-eval-") as tmp:
                run = _backends.ort_any_shape(model, threads or torch.get_num_threads(), Path(tmp))
            err = self._disagreement(run)
            if err > 1e-4:
                raise RuntimeError(f"its output differs from PyTorch's by {err:.1e} (relative)")
        except Exception as err:  # export and runtime failures take many forms; eager always works
            if backend == "ort":
                raise ConfigError("backend", f"ONNX Runtime cannot run this model: {err}") from None
            log(f"evaluation runs on eager PyTorch: ONNX Runtime cannot run this model ({err})")
            return
        self.backend, self._ort = "ort", run

    @torch.no_grad()
    def _disagreement(self, run) -> float:
        """The tuner's relative error of ``run`` against the eager model, worst of random images of two sizes."""
        from dynres.runtime.kernels import rel_error

        gen = torch.Generator().manual_seed(0)
        xs = [torch.rand(2, 3, size, size, generator=gen) for size in (32, 64)]
        return max(rel_error(run(x), self.model(x.contiguous(memory_format=torch.channels_last))) for x in xs)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N,3,R,R) → logits."""
        if self._ort is not None:
            return self._ort(to_input(images))
        return self.model(to_input(images, True))


# --- views --------------------------------------------------------------------------------------------------


def image_views(store: StoreLike, key: str, grid: Sequence[int], crops: Sequence[float], scans: Scans = None,
                exact: bool = False, engine: bool = False, decode_for: int | None = None
                ) -> dict[tuple[float, int], torch.Tensor]:
    """Every (crop area, resolution) view of one image, each from the prefix the scans policy allows.

    Three kinds of view, of the same bytes:

    - ``exact``: the static engine's, pixel for pixel (:func:`~dynres.io.decode.decode`: each view at its own DCT
      scale; :class:`~dynres.io.decode.ScaledDecodes` decodes once per scale, at most four times).
    - ``engine``: the dynamic engine's decode-once views, pixel for pixel (``PrefixViews``: the prefix decoded at
      the DCT scale the largest view of that crop needs, of ``decode_for``, default the grid's largest, then
      resized): one decode per crop's scale.
    - neither (the default, the cheapest: characterization, labels, calibration): one decode for every crop, at
      the size the largest view (``decode_for``, default the grid's largest) of the smallest crop needs, resized;
      the engines' views differ from these by resampling only. ``decode_for`` lets a part of a grid be predicted
      later with the very views the whole grid got.

    Decodes are for the grid's largest view, not the largest of the resolutions that share a prefix: a view then
    changes only with the bytes behind it, so a policy that reads every scan at some resolution gives exactly the
    full read's view there (decoding at a smaller DCT scale for a group of small resolutions would move their
    pixels, and predictions, with no byte changed)."""
    from torchvision.transforms.v2 import functional as F

    views: dict[tuple[float, int], torch.Tensor] = {}
    by_scans: dict[int | None, list[int]] = {}
    for r in grid:
        by_scans.setdefault(scans_for(scans, key, r), []).append(r)
    top = decode_for or max(grid)
    for k, resolutions in by_scans.items():
        data = store.read(key, scans=k)
        if exact or engine:
            decodes = ScaledDecodes(data, key)
            for c in crops:
                side = crop_side(c)
                for r in resolutions:
                    views[(c, r)] = decodes.view(r, side, None if exact else top / side)
            continue
        base = decode_short_side(data, math.ceil(top / crop_side(min(crops))), True, key)
        for c in crops:
            side = max(1, round(base.shape[-1] * crop_side(c)))
            # laid out channels-last once: torch's uint8 antialiased resize works in that layout and would
            # otherwise convert the crop on every call (same pixels)
            square = F.center_crop(base, [side, side]).permute(1, 2, 0).contiguous().permute(2, 0, 1)
            for r in resolutions:
                views[(c, r)] = F.resize(square, [r, r], antialias=True)
    return views


@torch.no_grad()
def predict_grid(model: torch.nn.Module | GridModel, store: StoreLike, keys: Sequence[str], grid: Sequence[int],
                 crops: Sequence[float], scans: Scans = None, exact: bool = False, batch_size: int = 64,
                 progress: bool = True, description: str = "evaluate", backend: str = "auto",
                 workers: int = 0, engine: bool = False, decode_for: int | None = None) -> pa.Table:
    """Run ``model`` on every (key, crop, resolution) view; one row per view (a module runs as
    ``GridModel(model, backend)``).

    Views are decoded by ``workers`` threads (0: one per core; Pillow and torch release the GIL), the next batch's
    while the model runs on this one: decoding and resizing 28 views per image cost more than the inference.
    ``decode_for``: decode as for a grid whose largest resolution is this (:func:`image_views`).
    """
    run = model if isinstance(model, GridModel) else GridModel(model, backend)
    # true_prob / margin: the true class's probability and its lead over the best other class (the scale model's
    # graded targets, docs/scale-candidates.md)
    cols: dict[str, list] = {n: [] for n in ("key", "label", "crop", "resolution", "pred", "prob", "correct",
                                             "true_prob", "margin")}
    keys = list(keys)
    chunks = [keys[i:i + batch_size] for i in range(0, len(keys), batch_size)]
    with ThreadPoolExecutor(workers or len(os.sched_getaffinity(0)), thread_name_prefix="dynres-views") as pool:
        def submit(j: int) -> list:
            if j >= len(chunks):
                return []
            return [pool.submit(image_views, store, k, grid, crops, scans, exact, engine, decode_for) for k in chunks[j]]

        ahead = submit(0)
        for j in track(range(len(chunks)), len(chunks),
                       f"{description} ({len(keys)} images x {len(grid)}x{len(crops)} views)", progress):
            views, chunk = [f.result() for f in ahead], chunks[j]
            ahead = submit(j + 1)
            labels = [store.label(k) for k in chunk]
            for c in crops:
                for r in grid:
                    probs = torch.softmax(run(torch.stack([v[(c, r)] for v in views])), dim=1)
                    prob, pred = probs.max(dim=1)
                    index = torch.tensor(labels).unsqueeze(1)
                    true = probs.gather(1, index).squeeze(1)
                    margin = true - probs.scatter(1, index, -1.0).max(dim=1).values
                    for key, label, p, q, t, m in zip(chunk, labels, pred.tolist(), prob.tolist(), true.tolist(),
                                                      margin.tolist()):
                        for name, value in zip(cols, (key, label, c, r, p, q, p == label, t, m)):
                            cols[name].append(value)
    return pa.table(cols)


def accuracy_table(table: pa.Table) -> dict[tuple[float, int], float]:
    """Top-1 accuracy (percent) per (crop, resolution) of a :func:`predict_grid` table."""
    grouped = table.group_by(["crop", "resolution"]).aggregate([("correct", "mean")]).to_pylist()
    return {(row["crop"], row["resolution"]): 100.0 * row["correct_mean"] for row in grouped}


VIEW_TABLES = {True: "static_images_exact.parquet", False: "static_images_engine.parquet"}


def views_table(eval_dir: str | Path, checkpoint: str | Path, store: StoreLike, exact: bool, batch_size: int = 64,
                progress: bool = True) -> Path:
    """The static evaluation in ``eval_dir`` on the static engine's views (``exact``) or on the dynamic engine's
    decode-once views (:func:`image_views`): its own per-image table when it was made with exact views and those
    are asked for, else one made beside it (:data:`VIEW_TABLES`) with its images, grid, crops and backend and
    ``checkpoint`` (which must be the one it evaluated), and reused while they match."""
    eval_dir = Path(eval_dir)
    rec, own = read_json(eval_dir / "static.json"), eval_dir / "static_images.parquet"
    if exact and rec.get("exact_views"):
        return own
    path = eval_dir / VIEW_TABLES[exact]
    if checkpoint_digest(checkpoint) != rec["checkpoint_sha256"]:
        raise ConfigError(str(checkpoint), f"not the checkpoint {eval_dir / 'static.json'} evaluated")
    keys = list(dict.fromkeys(pq.read_table(own, columns=["key"]).column("key").to_pylist()))
    stamp = {"checkpoint_sha256": rec["checkpoint_sha256"], "keys": digest(keys), "grid": rec["grid"],
             "crops": rec["crops"], "exact_views": exact}
    if path.is_file() and json.loads((pq.read_schema(path).metadata or {}).get(b"dynres", b"{}")) == stamp:
        return path
    model, _ = load_checkpoint(checkpoint)
    table = predict_grid(GridModel(model, rec.get("backend", "auto")), store, keys, rec["grid"], rec["crops"],
                         None, exact, batch_size, progress, f"eval ({'static' if exact else 'dynamic'} engine's views)",
                         engine=not exact)
    tmp = path.with_suffix(".tmp")
    pq.write_table(table.replace_schema_metadata({"dynres": json.dumps(stamp)}), tmp)
    tmp.replace(path)  # a half-written table never reads as complete
    return path


# --- the static characterization ----------------------------------------------------------------------------


def static_markdown(rows: list[dict], model_name: str) -> str:
    """Table I layout, one accuracy column per crop; the best resolution of each crop in bold."""
    crops = sorted({r["crop"] for r in rows})
    grid = sorted({r["resolution"] for r in rows})
    acc = {(r["crop"], r["resolution"]): r["accuracy"] for r in rows}
    flops = {r["resolution"]: r["gflops"] for r in rows}
    best = {c: max(grid, key=lambda r: acc[(c, r)]) for c in crops}
    table = []
    for r in grid:
        row = {"model": model_name, "res": f"{r}x{r}", "gflops": flops[r]}
        for c in crops:
            cell = f"{acc[(c, r)]:.1f}"
            row[f"c{c}"] = f"**{cell}**" if best[c] == r else cell
        table.append(row)
    cols = ["model", "res", "gflops"] + [f"c{c}" for c in crops]
    heads = ["Model", "Resolution", "GFLOPs", *[f"Acc. {round(100 * c)}% crop" for c in crops]]
    return markdown_table(table, cols, heads)


def run_static(checkpoint: str | Path, store: StoreLike, out: str | Path, cfg: EvalConfig = EvalConfig(),
               scans: Scans = None, progress: bool = True) -> dict:
    """Evaluate a backbone over grid x crops; writes ``static.json``/``.md`` and ``static_images.parquet``."""
    out = Path(out)
    model, meta = load_checkpoint(checkpoint)
    if list(meta.classes) != list(store.classes):
        raise ConfigError(checkpoint, f"checkpoint classes {list(meta.classes)[:5]}... differ from the store's")
    grid = tuple(cfg.grid or scaled_grid(meta.train_resolution))
    keys = list(store.keys)[: cfg.limit]
    run = GridModel(model, cfg.backend)
    table = predict_grid(run, store, keys, grid, cfg.crops, scans, cfg.exact, cfg.batch_size, progress,
                         "eval static")
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out / "static_images.parquet")
    acc = accuracy_table(table)
    cost = {r: gflops(model, r) for r in grid}
    rows = [{"crop": c, "resolution": r, "accuracy": acc[(c, r)], "gflops": cost[r]} for c in cfg.crops for r in grid]
    best = {c: max(grid, key=lambda r: acc[(c, r)]) for c in cfg.crops}
    payload = {
        "checkpoint": str(checkpoint), "checkpoint_sha256": checkpoint_digest(checkpoint), "arch": meta.arch,
        "train_resolution": meta.train_resolution,
        "images": len(keys), "grid": list(grid), "crops": list(cfg.crops), "exact_views": cfg.exact,
        "backend": run.backend,
        # which bytes it saw, so that a later stage may take its full reads as its own (calibration's held-out table)
        "store": str(getattr(store, "root", "")), "store_manifest_hash": manifest_hash(store),
        "full_reads": scans is None,
        "flop_convention": "FlopCounterMode: 2 x MACs (the paper quotes MACs)",
        "static": rows, "best": [{"crop": c, "resolution": best[c], "accuracy": acc[(c, best[c])]} for c in cfg.crops],
        "per_image": str(out / "static_images.parquet"),
    }
    write_records(out, "static", payload, static_document(payload))
    return payload


def static_document(payload: dict) -> str:
    """The static record as Markdown: a header and the Table I layout."""
    return (f"# Static characterization: {payload['arch']} trained at {payload['train_resolution']}\n\n"
            f"{payload['images']} images; GFLOPs = 2 x MACs (FlopCounterMode); crops are area fractions.\n\n"
            + static_markdown(payload["static"], payload["arch"]))
