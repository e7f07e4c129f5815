"""The two-model inference pipeline (paper Figure 4, section VII.c): scale model → chosen resolution → backbone.

Per image: read the scale model's prefix, decode it at the scale resolution, run the scale model (batched), pick a
resolution with the cost-aware rule, fetch only the missing byte range, decode at that resolution and run the
backbone batched per resolution. Reading and decoding run in a thread pool (Pillow and torch release the GIL) while
the main thread runs the models, so the decode of the next chunk overlaps the backbone of the current one. Static
mode (``resolution=R``) skips the scale model: the baselines of ``dynres bench pipeline``.

The three concerns stay swappable: the store gives bytes, a scans policy says how many, and a :class:`Runner`
turns uint8 images into logits (eager PyTorch or the tuned kernels of :mod:`dynres.runtime.kernels`: one line differs).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from dynres._ui import log, track
from dynres.errors import BadImageError, ConfigError, StoreError
from dynres.io.decode import PrefixViews, decode, decode_baseline
from dynres.io.jpeg import EOI
from dynres.io.store import StoreLike
from dynres.paper import DEFAULT_CROP_SIDE
from dynres.policy.scans import Scans, scans_for
from dynres.runtime.results import InferenceResult, Prediction, store_requests, summarize, top5
from dynres.runtime.runners import Runner, ScaleStage, load_scale, make_runner, recalibration_pairs

# --- configuration ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PipelineConfig:
    """How to run. ``resolution`` set: static mode. ``baseline``: the common baseline (full read, full Pillow
    decode + torchvision resize, no policy). ``max_wait`` is how many chunks a partly filled per-resolution batch
    may wait for more images before it runs anyway. ``read_ahead`` trades bytes for CPU in dynamic mode: one read
    and one decode per image instead of the scale prefix first and, when the backbone needs more scans, a second
    read and decode (decoding a progressive JPEG costs about as much per scan read whatever the output size).
    ``decode_once=False`` decodes every view at its own DCT scale, pixel-identical to
    :func:`dynres.io.decode.decode` (what ``dynres eval`` and calibration measured); the default decodes a prefix
    once, at the largest view's scale, and resizes: the views differ by resampling only, for fewer decodes per image
    (the accuracy and speed this trades: docs/bench-pipeline.md). ``crop_side`` is the center crop's side ratio.

    ``fetch_ahead`` trades bytes for storage requests in dynamic mode, not pixels: the scale stage's one request
    also fetches the prefix the policy wants at ``fetch_ahead_resolution`` (None: the longest prefix it gives any
    grid resolution, so no choice needs a second request), but only the scale prefix is decoded for the scale
    model; the backbone cuts its prefix from those bytes and fetches the rest only when its resolution needs
    more. Predictions are the plain dynamic pipeline's; against an object store, where a request costs a round
    trip and a fee whatever its size, an image costs one request instead of two (docs/bench-ray.md)."""

    batch_size: int = 16
    workers: int = 2
    torch_threads: int = 0  # 0: leave torch's setting alone
    crop_side: float = DEFAULT_CROP_SIDE
    resolution: int | None = None
    lam: float = 0.0
    baseline: bool = False
    prefetch: int = 2
    max_wait: int = 2
    read_ahead: bool = False  # dynamic: read the longest prefix any grid resolution needs up front
    decode_once: bool = True  # dynamic: views are resizes of one decode per prefix (False: each view decoded)
    fetch_ahead: bool = False  # dynamic: the scale prefix's request also fetches the backbone's likely bytes
    fetch_ahead_resolution: int | None = None  # whose prefix to fetch ahead (None: the grid's longest)
    bias: tuple[float, ...] | None = None  # dynamic: the choice rule's per-grid-resolution term (runners.choose)
    # dynamic: (a, c) per grid resolution, p(r) = σ(a·logit + c) (runners.recalibrated_probs; the study's guard fits it)
    recalibration: tuple[tuple[float, float], ...] | None = None
    # an image whose read or decode fails (StoreError, BadImageError) is skipped and listed in the summary's
    # "failures", as ingest does with a bad source; False: the run stops at the first
    skip_bad: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.workers < 1 or self.prefetch < 1 or self.max_wait < 1:
            raise ConfigError("pipeline", "batch_size, workers, prefetch and max_wait must be >= 1")
        if not 0 < self.crop_side <= 1:
            raise ConfigError("pipeline", f"crop_side (a side ratio) must be in (0, 1], got {self.crop_side}")
        if self.baseline and self.resolution is None:
            raise ConfigError("pipeline", "the baseline is a static mode: give a resolution")
        if self.fetch_ahead and self.read_ahead:
            raise ConfigError("pipeline", "read_ahead already reads each image once: fetch_ahead would add nothing")
        if self.fetch_ahead_resolution is not None and self.fetch_ahead_resolution < 1:
            raise ConfigError("pipeline", f"fetch_ahead_resolution must be >= 1, got {self.fetch_ahead_resolution}")
        if self.bias is not None:
            if self.resolution is not None:
                raise ConfigError("bias", "a static resolution runs no scale model: the bias would choose nothing")
            bias = tuple(float(b) for b in self.bias)  # a JSON list (serving.json) becomes the declared tuple
            if not all(math.isfinite(b) for b in bias):
                raise ConfigError("bias", f"every value must be finite, got {list(bias)}")
            object.__setattr__(self, "bias", bias)
        if self.recalibration is not None:
            object.__setattr__(self, "recalibration", check_recalibration(self.recalibration, self.resolution))


def check_recalibration(value, resolution: int | None) -> tuple[tuple[float, float], ...]:
    """A recalibration as the declared tuple of finite (a, c) pairs (:func:`runners.recalibration_pairs`); refused
    with a static resolution, which runs no scale model."""
    if resolution is not None:
        raise ConfigError("recalibration", "a static resolution runs no scale model: nothing to recalibrate")
    return recalibration_pairs(value)


# --- the engine --------------------------------------------------------------------------------------------------


@dataclass
class WorkItem:
    index: int
    key: str
    t0: float
    scans: int | None = None  # scans already in hand from the scale stage
    data: bytes = b""
    resolution: int = 0
    bytes_read: int = 0
    chunk: int = 0
    image: Future | None = None
    views: PrefixViews | None = None  # the scale prefix's views (its decode is the backbone's if reused)
    ahead: bytes = b""  # fetch-ahead: a longer prefix than ``data`` (a read's result), fetched in the same request
    ahead_scans: int = 0  # the scans ``ahead`` holds


class Engine:
    """Batch inference over a store. ``scale=None`` requires a static ``config.resolution``.

    ``label_map`` maps store label indices to backbone class indices (by class name), so accuracy is right even
    when the store's class list differs from the checkpoint's.
    """

    def __init__(self, store: StoreLike, backbone: Runner, *, scale: ScaleStage | None = None, policy: Scans = None,
                 config: PipelineConfig = PipelineConfig(), classes: Sequence[str] = ()):
        if scale is None and config.resolution is None:
            raise ConfigError("pipeline", "no scale model: give a static resolution")
        self.store, self.backbone, self.scale, self.policy, self.config = store, backbone, scale, policy, config
        self.classes = tuple(classes)
        index = {c: i for i, c in enumerate(self.classes)}
        store_classes = list(getattr(store, "classes", []) or [])
        self.label_map = {i: index[c] for i, c in enumerate(store_classes) if c in index} if index else {}
        # with both class lists known, a store class the backbone lacks has no label the backbone could give:
        # its images count in no accuracy (rather than be scored against whichever class has its index)
        self._strict_labels = bool(index and store_classes)
        unknown = [c for c in store_classes if c not in index] if self._strict_labels else []
        if unknown:
            log(f"{len(unknown)} of the store's {len(store_classes)} classes are not among the backbone's "
                f"({', '.join(unknown[:5])}{', …' if len(unknown) > 5 else ''}): their images count in no accuracy")
        self.timings: dict[str, float] = {}
        self.failures: list[tuple[str, str]] = []  # (key, why) of the images the last run skipped
        self._lock = threading.Lock()

    # one image's work, run in the pool --------------------------------------------------------------------------

    def _timed(self, name: str, fn, *args):
        t = time.thread_time()
        out = fn(*args)
        self._add(name, time.thread_time() - t)
        return out

    def _scans(self, key: str, resolution: int) -> int | None:
        return None if self.config.baseline else scans_for(self.policy, key, resolution)

    @property
    def _short_side(self) -> float | None:
        """What one decode of a scale prefix must cover: the largest grid view (None: exact views, see config)."""
        return max(self.scale.grid) / self.config.crop_side if self.config.decode_once else None

    def scale_read(self, item: WorkItem) -> torch.Tensor:
        """The scale prefix and the scale model's view of it. The prefix is decoded once, at the size the largest
        grid resolution needs, and the backbone's view is a resize of it too whenever the prefix already holds
        the scans the policy wants (``decode_once=False``: each view decoded on its own)."""
        s = self.scale
        scans = s.scans if s.scans is not None else self._scans(item.key, s.resolution)
        if self.config.read_ahead:
            scans = _longest(scans, (self._scans(item.key, r) for r in s.grid))
        item.scans = _clip(scans, self.store.num_scans(item.key))
        if self.config.fetch_ahead:
            self.fetch_ahead(item)
        else:
            item.data = self._timed("scale_read", self.store.read, item.key, scans)
        item.views = PrefixViews(item.data, self._short_side, item.key)
        t = time.thread_time()
        small = item.views.view(s.resolution, self.config.crop_side)
        self._add("scale_decode", time.thread_time() - t - item.views.decode_s)  # the shared decode: see backbone_read
        return small

    def fetch_ahead(self, item: WorkItem) -> None:
        """One request for the scale prefix (``item.scans``) and the prefix the fetch-ahead resolution wants:
        ``item.ahead`` holds the longer one, ``item.data`` the scale prefix cut from it."""
        cfg, key = self.config, item.key
        if cfg.fetch_ahead_resolution is None:  # the longest prefix any choice needs: a policy need not grow with r
            want = _longest(item.scans, (self._scans(key, r) for r in self.scale.grid))
        else:
            want = self._scans(key, cfg.fetch_ahead_resolution)
        ahead = max(item.scans, _clip(want, self.store.num_scans(key)))
        item.ahead = self._timed("scale_read", self.store.read, key, ahead)
        item.ahead_scans = ahead
        item.data = cut_prefix(self.store, key, item.ahead, item.scans)

    def backbone_read(self, item: WorkItem) -> torch.Tensor:
        """The view at the chosen resolution: from the scale prefix when it holds the scans the policy wants,
        else only the missing range is fetched and the longer prefix decoded."""
        key, r, cfg = item.key, item.resolution, self.config
        want = _clip(self._scans(key, r), self.store.num_scans(key))
        views, item.views = item.views, None
        if item.scans is not None and want <= item.scans:
            if views is None:  # the prefix came without its views (Ray's hand-off): make them the same way
                views = PrefixViews(item.data, self._short_side, key)
            self._add("decode", views.decode_s)  # the backbone's decode, done early by the scale stage
            item.data, item.ahead, item.bytes_read = b"", b"", self.store.prefix_size(key, item.scans)
            return self._timed("decode", views.view, r, cfg.crop_side)
        if views is not None:
            self._add("scale_decode", views.decode_s)  # a decode the backbone cannot use: scale-model overhead
        if want <= item.ahead_scans:  # fetched ahead with the scale prefix: no request
            data = cut_prefix(self.store, key, item.ahead, want)
        else:
            hold, in_hand = getattr(self.store, "hold", None), item.ahead or item.data  # the longest prefix held
            if hold is not None and in_hand:  # fetch only the range it lacks, even when other keys' reads (or
                hold(key, in_hand)  # another process: Ray's hand-off) have left it out of the store's cache
            data = self._timed("read", self.store.read, key, None if want >= self.store.num_scans(key) else want)
        item.data, item.ahead, item.bytes_read = b"", b"", self.store.prefix_size(key, want)
        fn = decode_baseline if cfg.baseline else decode
        return self._timed("decode", fn, data, r, cfg.crop_side, key)

    # the pipelined loop -----------------------------------------------------------------------------------------

    def run(self, keys: Sequence[str] | None = None, *, progress: bool = True) -> InferenceResult:
        keys = list(self.store.keys if keys is None else keys)
        cfg = self.config
        old_threads = torch.get_num_threads()
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        self.timings, self.failures = {}, []
        bytes0, requests0 = self.store.bytes_read, store_requests(self.store)
        out: list[Prediction | None] = [None] * len(keys)
        chunks = [keys[i : i + cfg.batch_size] for i in range(0, len(keys), cfg.batch_size)]
        start = time.perf_counter()
        try:
            with ThreadPoolExecutor(cfg.workers, thread_name_prefix="dynres-read") as pool:
                self._loop(pool, chunks, out, progress)
        finally:
            if cfg.torch_threads:  # only what this run changed: another thread may have set it meanwhile
                torch.set_num_threads(old_threads)
        wall = time.perf_counter() - start
        preds = [p for p in out if p is not None]
        requests = store_requests(self.store)
        summary = summarize(preds, wall, self.store.bytes_read - bytes0, self.timings,
                            None if requests is None else requests - requests0)
        summary["mode"] = "baseline" if cfg.baseline else ("static" if self.scale is None else "dynamic")
        summary["failed"] = len(self.failures)
        summary["failures"] = [{"key": k, "error": e} for k, e in self.failures[:1000]]  # the first thousand
        return InferenceResult(preds, summary, self.classes)

    def _loop(self, pool: ThreadPoolExecutor, chunks: list[list[str]], out: list, progress: bool) -> None:
        cfg, lam = self.config, self.config.lam
        first: dict[int, list[WorkItem]] = {}  # chunk -> items whose scale-stage decode is in flight
        buckets: dict[int, list[WorkItem]] = {}  # resolution -> items whose backbone-stage decode is in flight
        offsets = np.cumsum([0] + [len(c) for c in chunks])

        def submit(j: int) -> None:
            if j >= len(chunks) or j in first:
                return
            items = [WorkItem(int(offsets[j]) + n, k, time.perf_counter(), chunk=j) for n, k in enumerate(chunks[j])]
            for it in items:
                if self.scale is None:
                    it.resolution = cfg.resolution
                    it.image = pool.submit(self.backbone_read, it)
                else:
                    it.image = pool.submit(self.scale_read, it)
            first[j] = items

        lag = 1 if self.scale is not None else 0  # a dynamic chunk's backbone decodes were just submitted
        for j in track(range(len(chunks) + 1), len(chunks) + 1, "infer", progress):
            for ahead in range(j, j + cfg.prefetch + 1):
                submit(ahead)
            items = first.pop(j, [])
            if items and self.scale is not None:
                items = self._ok(items)
            if items and self.scale is not None:
                batch = torch.stack([it.image.result() for it in items])
                t = time.perf_counter()
                resolutions, _ = self.scale.choose(batch, lam)
                self._add("scale_model", time.perf_counter() - t)
                for it, r in zip(items, resolutions):
                    it.resolution = r
                    it.image = pool.submit(self.backbone_read, it)
            for it in items:
                buckets.setdefault(it.resolution, []).append(it)
            last = j >= len(chunks)
            for r in sorted(buckets):
                # run the decoded images of earlier chunks: full batches now, a partial one once it waited enough
                pending = buckets[r]
                while True:
                    ready = len(pending) if last else sum(1 for it in pending if it.chunk <= j - lag)
                    if not ready or (ready < cfg.batch_size and j - pending[0].chunk < cfg.max_wait and not last):
                        break
                    n = min(ready, cfg.batch_size)
                    batch, pending[:] = pending[:n], pending[n:]
                    self._backbone(batch, r, out, lam)

    def backbone_label(self, label: int | None) -> int | None:
        """A store label as the backbone's class index (None: unlabelled, or a class the backbone lacks)."""
        if label is None or label < 0:
            return None
        return self.label_map.get(label) if self._strict_labels else self.label_map.get(label, label)

    def readable(self, keys: Sequence[str], futures: Sequence[Future]) -> list[int]:
        """The positions whose read and decode (``futures``, one per key) succeeded. A failure (StoreError,
        BadImageError) is recorded in ``failures`` and skipped, or raised when ``config.skip_bad`` is off."""
        ok = []
        for j, (key, future) in enumerate(zip(keys, futures)):
            try:
                future.result()
                ok.append(j)
            except (StoreError, BadImageError) as err:
                if not self.config.skip_bad:
                    raise
                self.failures.append((key, " ".join(str(err).split())))
        return ok

    def _ok(self, items: list[WorkItem]) -> list[WorkItem]:
        return [items[j] for j in self.readable([it.key for it in items], [it.image for it in items])]

    def _backbone(self, items: list[WorkItem], resolution: int, out: list, lam: float) -> None:
        items = self._ok(items)
        if not items:
            return
        images = torch.stack([it.image.result() for it in items])
        t = time.perf_counter()
        idx, probs = top5(self.backbone(images, resolution))
        self._add("backbone", time.perf_counter() - t)
        now = time.perf_counter()
        for it, i, p in zip(items, idx, probs):
            label = self.backbone_label(self.store.label(it.key))
            out[it.index] = Prediction(it.key, label, i, p, resolution, it.bytes_read, self.store.size(it.key),
                                       (now - it.t0) * 1e3, lam if self.scale is not None else None)

    def _add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.timings[name] = self.timings.get(name, 0.0) + seconds


def _policy_reads(scale: ScaleStage | None, resolution: int | None) -> set[int]:
    """The resolutions whose reads the scans policy decides: the static one, or the scale model's grid and its own
    resolution unless its checkpoint fixes its scans."""
    if scale is None:
        return {resolution}
    return set(scale.grid) | ({scale.resolution} if scale.scans is None else set())


def _longest(scans: int | None, others) -> int | None:
    """The longest of several prefixes (None: the whole file)."""
    for k in others:
        if scans is None or k is None:
            return None
        scans = max(scans, k)
    return scans


def _clip(scans: int | None, total: int) -> int:
    return total if scans is None else max(1, min(int(scans), total))


def cut_prefix(store: StoreLike, key: str, data: bytes, scans: int) -> bytes:
    """What ``store.read(key, scans)`` returns, cut from ``data``, the result of a read of at least that many
    scans: the whole file when ``scans`` covers it, else its first ``scans`` scans and an EOI marker."""
    if scans >= store.num_scans(key):
        return data
    return data[: store.prefix_size(key, scans)] + EOI


# --- building an engine from files --------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineSpec:
    """Everything that rebuilds an engine anywhere (the CLI, the service, every Ray worker): paths, not objects."""

    store: str
    backbone: str
    scale: str | None = None
    policy: str | None = None
    kernels: str = "eager"
    config: PipelineConfig = PipelineConfig()


def build_engine(spec: EngineSpec, store: StoreLike | None = None) -> Engine:
    """Open the store, load the checkpoints and the scans policy; static mode when ``config.resolution`` is set."""
    from dynres.model.checkpoint import load_checkpoint

    if store is None and spec.store:  # no store: a service that only takes uploads
        from dynres.io.store import open_store

        store = open_store(spec.store)
    cfg = spec.config
    threads = cfg.torch_threads or torch.get_num_threads()
    model, meta = load_checkpoint(spec.backbone)
    backbone = make_runner(model, spec.kernels, cfg.batch_size, threads)
    scale = None
    if cfg.resolution is None:
        if spec.scale is None:
            raise ConfigError("pipeline", "give a scale model (dynamic mode) or a static resolution")
        scale = load_scale(spec.scale, model, spec.kernels, cfg.batch_size, threads, bias=cfg.bias,
                           recalibration=cfg.recalibration)
    policy = None
    if spec.policy is not None:
        from dynres.policy.calibration import load_policy

        policy = load_policy(spec.policy)
        uncovered = sorted(_policy_reads(scale, cfg.resolution) - set(policy.resolutions))
        if uncovered:
            log(f"the scans policy {spec.policy} has no rule at {', '.join(map(str, uncovered))} px: reads there "
                "take every scan")
    return Engine(store, backbone, scale=scale, policy=policy, config=cfg, classes=meta.classes)
