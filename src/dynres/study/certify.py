"""The calibration search with a stated guarantee: per resolution, the cheapest read rule of each policy family
whose upper confidence bound on the loss stays within the target.

Images are judged in *pools*: a model and images it never trained on (the deployed backbone on the labelled
calibration split; each shard backbone of the scale-model chain on the training shard it did not see), so the
calibration can use thousands of images without new labels. Per image, a candidate read is compared with the full
read of the same image by the same model (:mod:`dynres.policy.bounds`: lost, gained, flipped). Candidates of a
family are walked from the safest (every scan) towards the cheapest, and the walk stops at the first candidate
whose bound exceeds the target at any searched crop (fixed-sequence testing: the chosen rule is certified at
confidence ``1 - delta`` without correction). The family with the largest saving on the pools wins each
resolution; each family is tested at ``delta / families`` (Bonferroni), so the winner keeps the guarantee.
A resolution where nothing shorter than the full read can be certified reads every scan, and the record says how
many images a certificate would have needed.

The pooled bound is the deployed backbone's only insofar as the shard backbones' answers change no less often under
a shorter read than its own do. Each step tests that on the data: a rule whose deployed-backbone pool flips more
often than the judged pools (:func:`~dynres.policy.bounds.assumption_p`) fails, however low the pooled bound.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

import numpy as np
import torch

from dynres._ui import track
from dynres.io.store import StoreLike
from dynres.model.checkpoint import scale_probs
from dynres.policy.bounds import ASSUMPTION_ALPHA, assumption_p, images_needed, loss_bound
from dynres.policy.calibration import ReadRule, rule_counts
from dynres.policy.quality import QualityIndex

# SSIM thresholds walked from the safest down (the paper's search range is [0.94, 1.0])
SSIM_LADDER = (1.0, 0.99995, 0.9999, 0.9998, 0.9996, 0.9993, 0.999, 0.998, 0.997, 0.995, 0.993, 0.99, 0.985, 0.98,
               0.97, 0.96, 0.95, 0.94)


def lanes() -> int:
    """Side-by-side prediction lanes: one per core (:func:`predict_lanes`)."""
    return len(os.sched_getaffinity(0))


def predict_lanes(model, store: StoreLike, keys: Sequence[str], grid: Sequence[int], crops: Sequence[float],
                  scans=None, exact: bool = False, batch_size: int = 64, description: str = "evaluate",
                  progress: bool = False, count: int = 0, decode_for: int | None = None):
    """:func:`dynres.study.static.predict_grid` over ``keys`` in ``count`` lanes side by side (0: one per core),
    each lane decoding on one thread while its model call runs on another; the rows of all keys in one table, in
    the order of ``keys``.

    Why: a model run on one thread (``GridModel(..., threads=1)``) costs less CPU than the same run split over
    two, and decoding costs about as much as the model, so one model thread and one decode thread per lane keep
    every core busy with the cheaper work (docs/calibration.md, "What it costs"). With ONNX Runtime a view's
    prediction depends on the view alone, not on the batch around it or the threads that ran it (checked bitwise
    in the tests), so the rows are those of one call. Eager PyTorch runs on every core already and may pick other
    kernels for other batch sizes, so it runs in one lane, as one call. The keys go to the lanes in pieces of a few
    batches, so that a failure (or Ctrl-C) stops the pieces not started and waits only for the running ones."""
    from dynres.study.static import GridModel, predict_grid

    keys = list(keys)
    run = model if isinstance(model, GridModel) else GridModel(model, "auto", threads=1)  # one export for all lanes
    count = max(1, min(count or lanes(), len(keys))) if run.backend == "ort" else 1
    if count == 1:
        return predict_grid(run, store, keys, grid, crops, scans=scans, exact=exact, batch_size=batch_size,
                            progress=progress, description=description, decode_for=decode_for)
    import pyarrow as pa

    size = batch_size * max(1, -(-len(keys) // (batch_size * count * 4)))  # about 4 pieces per lane
    pieces = [keys[i:i + size] for i in range(0, len(keys), size)]

    def piece(part: list[str]):
        return predict_grid(run, store, part, grid, crops, scans=scans, exact=exact, batch_size=batch_size,
                            progress=False, workers=1, decode_for=decode_for)

    pool = ThreadPoolExecutor(count, thread_name_prefix="dynres-lane")
    try:
        futures = [pool.submit(piece, part) for part in pieces]
        label = f"{description} ({len(keys)} images x {len(grid)}x{len(crops)} views, {count} lanes)"
        for done in track(as_completed(futures), len(futures), label, progress):
            done.result()  # the first failure stops the rest (finally)
        return pa.concat_tables([f.result() for f in futures])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class ViewPredictions:
    """Top-1 predictions of one model per (key, scans), at every (resolution, crop) of a grid from one read of the
    prefix, computed in batches on demand and cached. A prefix of ``num_scans`` or more is the full read."""

    def __init__(self, model, store: StoreLike, grid: Sequence[int], crops: Sequence[float], exact: bool,
                 batch_size: int):
        self.model, self.store, self.grid, self.crops = model, store, tuple(grid), tuple(crops)
        self.exact, self.batch_size = exact, batch_size
        self.cache: dict[tuple[str, int], np.ndarray] = {}  # (resolutions, crops) predicted classes
        self.evaluated = 0

    def predict(self, keys: Sequence[str], scans: Sequence[int]) -> np.ndarray:
        """Predicted classes, shape (resolutions, crops, keys)."""
        want = [(k, min(int(s), self.store.num_scans(k))) for k, s in zip(keys, scans)]
        pending = sorted({p for p in want if p not in self.cache})
        self.evaluated += len(pending)
        rows = {r: i for i, r in enumerate(self.grid)}
        cols = {c: j for j, c in enumerate(self.crops)}
        while pending:  # predict_grid reads one prefix per key per call
            group: dict[str, int] = {}
            rest = []
            for key, k in pending:
                (rest.append((key, k)) if key in group else group.__setitem__(key, k))
            table = predict_lanes(self.model, self.store, list(group), self.grid, self.crops, scans=group,
                                  exact=self.exact, batch_size=self.batch_size)
            found = {key: np.zeros((len(self.grid), len(self.crops)), dtype=np.int64) for key in group}
            for key, crop, res, pred in zip(*(table.column(n).to_pylist()
                                              for n in ("key", "crop", "resolution", "pred"))):
                found[key][rows[res], cols[crop]] = pred
            self.cache.update({(key, k): found[key] for key, k in group.items()})
            pending = rest
        return np.stack([self.cache[p] for p in want], axis=-1)


@dataclass
class Pool:
    """Images one model judges (it never trained on them): ``index`` rows for the SSIM family (None: no index)."""

    name: str
    preds: ViewPredictions
    keys: list[str]
    index: QualityIndex | None = None
    labels: np.ndarray = field(init=False)
    num_scans: np.ndarray = field(init=False)
    full: np.ndarray = field(init=False)  # (resolutions, crops, keys) full-read predictions
    sizes: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        store = self.preds.store
        self.labels = np.array([store.label(k) for k in self.keys])
        self.num_scans = np.array([store.num_scans(k) for k in self.keys])
        self.sizes = np.array([store.size(k) for k in self.keys], dtype=np.float64)
        self.full = self.preds.predict(self.keys, self.num_scans)
        self.rows = None if self.index is None else np.array([self.index.rows[k] for k in self.keys])

    def counts(self, rule: ReadRule, resolution: int) -> np.ndarray:
        return rule_counts(rule, resolution, self.num_scans, self.index, self.rows)

    def judge(self, rule: ReadRule, resolution: int) -> dict:
        """Events of ``rule`` at ``resolution`` per crop (lost, gained, flipped: arrays over crops) and bytes."""
        counts = self.counts(rule, resolution)
        i = self.preds.grid.index(resolution)
        full, cal = self.full[i], self.preds.predict(self.keys, counts)[i]  # (crops, keys)
        right_full, right_cal = full == self.labels, cal == self.labels
        store = self.preds.store
        read = np.array([store.prefix_size(k, int(c)) for k, c in zip(self.keys, counts)], dtype=np.float64)
        return {"lost": (right_full & ~right_cal).sum(axis=1), "gained": (~right_full & right_cal).sum(axis=1),
                "flipped": (full != cal).sum(axis=1), "n": len(self.keys), "read": read.sum(),
                "size": self.sizes.sum()}


class ChoiceModel(torch.nn.Module):
    """The scale model's choice as a classifier, so :class:`ViewPredictions` can run it: output ``i`` wins when the
    pipeline's rule (:func:`dynres.runtime.runners.choose`: argmax p - lam * cost / max cost) picks ``grid[i]``;
    padded to ``width`` outputs."""

    def __init__(self, scale: torch.nn.Module, costs: Sequence[float], lam: float | None, width: int,
                 activation: str = "sigmoid"):
        super().__init__()
        self.scale, self.lam, self.width, self.activation = scale.eval(), lam, width, activation
        self.register_buffer("penalty", torch.tensor(costs, dtype=torch.float32) / max(costs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = scale_probs(self.scale(x), self.activation)
        if self.lam is not None:
            score = score - self.lam * self.penalty[None, :]
        return torch.nn.functional.one_hot(score.argmax(1), self.width).float()


class ChoicePool:
    """The scale model's read judged by what it alone changes in the dynamic pipeline's answers: a shorter scale
    prefix changes an answer only by changing the chosen resolution; the answer compared at each resolution is the
    backbone's full read there (``backbone``: a :class:`Pool` over the same keys whose grid holds the scale
    model's). What the backbone's own shorter reads lose at the chosen resolutions is certified per resolution and
    adds to this; the two are not one simultaneous bound on the pipeline."""

    def __init__(self, choices: ViewPredictions, backbone: Pool, scale_grid: Sequence[int]):
        self.choices, self.backbone, self.keys = choices, backbone, backbone.keys
        self.rows = [backbone.preds.grid.index(r) for r in scale_grid]
        self.full_choice = choices.predict(self.keys, backbone.num_scans)[0]  # (crops, keys)

    def judge(self, rule: ReadRule, resolution: int) -> dict:
        b = self.backbone
        counts = b.counts(rule, resolution)
        choice = self.choices.predict(self.keys, counts)[0]
        rows = np.asarray(self.rows)
        cols = np.arange(len(self.keys))
        crops = range(choice.shape[0])
        full = np.stack([b.full[rows[self.full_choice[c]], c, cols] for c in crops])
        cal = np.stack([b.full[rows[choice[c]], c, cols] for c in crops])
        right_full, right_cal = full == b.labels, cal == b.labels
        store = b.preds.store
        read = np.array([store.prefix_size(k, int(n)) for k, n in zip(self.keys, counts)], dtype=np.float64)
        return {"lost": (right_full & ~right_cal).sum(axis=1), "gained": (~right_full & right_cal).sum(axis=1),
                "flipped": (full != cal).sum(axis=1), "n": len(self.keys), "read": read.sum(),
                "size": b.sizes.sum()}


@dataclass(frozen=True)
class Certification:
    """What the search certifies: ``criterion`` (net, lost, flips), ``target`` in accuracy points, confidence
    ``1 - delta`` (None: point estimates, no guarantee: the paper's way)."""

    criterion: str = "net"
    target: float = 0.05
    delta: float | None = 0.05


def judge_pools(pools: Sequence[Pool], rule: ReadRule, resolution: int, cert: Certification, delta: float | None
                ) -> dict:
    """Pooled events of ``rule`` and the criterion's bound at the worst crop (points); with judged pools beside
    the first (the deployed backbone's), ``assumption_p``: how likely the first's flips are under the others' rate
    (:func:`~dynres.policy.bounds.assumption_p`)."""
    parts = [p.judge(rule, resolution) for p in pools]
    total = {name: sum(part[name] for part in parts) for name in ("lost", "gained", "flipped", "n", "read", "size")}
    bounds = [100.0 * loss_bound(cert.criterion, int(lo), int(g), int(f), int(total["n"]), delta)
              for lo, g, f in zip(total["lost"], total["gained"], total["flipped"])]
    worst = int(np.argmax(bounds))
    step = {"rule": rule.to_dict(), "label": rule.label(), "bound": bounds[worst], "bounds": bounds,
            "lost": int(total["lost"][worst]), "gained": int(total["gained"][worst]),
            "flipped": int(total["flipped"][worst]), "images": int(total["n"]),
            "read_savings": 1.0 - float(total["read"] / total["size"])}
    if len(parts) > 1:
        flips = [(int(part["flipped"][worst]), int(part["n"])) for part in parts]
        step["pool_flips"] = [{"pool": p.name, "flipped": f, "images": n} for p, (f, n) in zip(pools, flips)]
        step["assumption_p"] = assumption_p(flips[0], (sum(f for f, _ in flips[1:]), sum(n for _, n in flips[1:])))
    return step


def passes(step: dict, cert: Certification) -> bool:
    """A step holds its certificate: the bound within the target and the pooled images not shown to flip less often
    than the deployed backbone's own."""
    return step["bound"] <= cert.target + 1e-9 and step.get("assumption_p", 1.0) >= ASSUMPTION_ALPHA


def family_ladder(family: str, pools: Sequence[Pool]) -> list[ReadRule]:
    """A family's candidates from the safest to the cheapest."""
    if family == "count":
        top = max(int(p.num_scans.max()) for p in pools)
        return [ReadRule("count", k) for k in range(top - 1, 0, -1)]
    if family == "ssim":
        return [ReadRule("ssim", t) for t in SSIM_LADDER]
    raise ValueError(f"unknown family {family!r}")


def walk(pools: Sequence[Pool], family: str, resolution: int, cert: Certification, delta: float | None,
         scale_read: Sequence[ChoicePool] = ()) -> dict:
    """Fixed-sequence test of one family at one resolution: the last candidate before the first failure. The
    ssim family is judged on the pools with a quality index only (the index costs more than the ingest). With
    ``scale_read`` pools (this is the scale model's resolution), a rule must also keep what the scale read changes
    in the pipeline's answers within the target (:class:`ChoicePool`; the rule passes only if both bounds hold)."""
    pools = [p for p in pools if family != "ssim" or p.index is not None]
    if not pools:
        return {"family": family, "skipped": "no pool has a quality index", "steps": []}
    ladder = family_ladder(family, pools)
    chosen, steps = ReadRule("full"), []
    for rule in ladder:
        step = judge_pools(pools, rule, resolution, cert, delta)
        if scale_read:
            step["scale_read"] = judge_pools(scale_read, rule, resolution, cert, delta)
            step["bound"] = max(step["bound"], step["scale_read"]["bound"])
        steps.append(step)
        if not passes(step, cert):
            break
        chosen = rule
    passed = [s for s in steps if passes(s, cert)]
    best = passed[-1] if passed else None
    failed = steps[-1] if steps and not passes(steps[-1], cert) else None
    return {"family": family, "rule": chosen.to_dict(), "label": chosen.label(), "steps": steps,
            "stopped_at": None if failed is None else {"label": failed["label"], "bound": failed["bound"],
                                                       "assumption_p": failed.get("assumption_p")},
            "read_savings": best["read_savings"] if best else 0.0, "bound": best["bound"] if best else None,
            "images": steps[0]["images"] if steps else 0}


def certify_resolution(pools: Sequence[Pool], resolution: int, families: Sequence[str], cert: Certification,
                       scale_read: Sequence[ChoicePool] = ()) -> dict:
    """Every family's walk at ``resolution`` and the winner (largest pooled saving; ties: the earlier family)."""
    delta = None if cert.delta is None else cert.delta / len(families)
    walks = [walk(pools, f, resolution, cert, delta, scale_read) for f in families]
    judged = [w for w in walks if "skipped" not in w]
    best = max(judged, key=lambda w: w["read_savings"]) if judged else None
    rule = best["rule"] if best and best["read_savings"] > 0 else ReadRule("full").to_dict()
    n = sum(len(p.keys) for p in pools)
    needed = None if delta is None else images_needed(cert.target / 100.0, delta, cert.criterion)
    return {"resolution": resolution, "rule": rule, "family": rule["family"], "families": walks,
            "images": n, "delta_per_family": delta, "images_needed_without_events": needed,
            "read_savings": best["read_savings"] if best and rule["family"] != "full" else 0.0,
            "bound": best["bound"] if best and rule["family"] != "full" else None}
