"""What an inference run gives back: a prediction per image, the run's summary (accuracy, images/s, bytes, latency
and where the work went), and the predictions as Parquet. Shared by the local engine, the service and Ray."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dynres.io.store import StoreLike

TOPK = 5


@dataclass
class Prediction:
    key: str
    label: int | None
    top5: list[int]
    top5_probs: list[float]
    resolution: int
    bytes_read: int
    file_bytes: int
    latency_ms: float
    lam: float | None = None


@dataclass
class InferenceResult:
    predictions: list[Prediction]
    summary: dict
    classes: tuple[str, ...] = field(default=())

    def write_parquet(self, path: str | Path) -> Path:
        """One row per image: key, label, top-5 class names + probabilities, resolution, bytes, latency."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        names = self.classes
        p = self.predictions
        table = pa.table({
            "key": [x.key for x in p],
            "label": pa.array([names[x.label] if x.label is not None and names else x.label for x in p]),
            "top5_classes": [[names[i] if names else str(i) for i in x.top5] for x in p],
            "top5_probs": pa.array([x.top5_probs for x in p], pa.list_(pa.float32())),
            "resolution": pa.array([x.resolution for x in p], pa.int32()),
            "lam": pa.array([x.lam for x in p], pa.float64()),
            "bytes_read": pa.array([x.bytes_read for x in p], pa.int64()),
            "file_bytes": pa.array([x.file_bytes for x in p], pa.int64()),
            "latency_ms": pa.array([x.latency_ms for x in p], pa.float64()),
        })
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        return path


def top5(logits: torch.Tensor) -> tuple[list[list[int]], list[list[float]]]:
    probs = torch.softmax(logits.float(), dim=1)
    p, i = probs.topk(min(TOPK, probs.shape[1]), dim=1)
    return i.tolist(), p.tolist()


def store_requests(store: StoreLike) -> int | None:
    """The storage requests ``store`` has made so far (``Store.requests``); None for a store that does not count
    them (a test's in-memory store)."""
    return getattr(store, "requests", None)


def summarize(preds: Sequence[Prediction], wall_s: float, bytes_read: int, timings: dict[str, float],
              requests: int | None = None) -> dict:
    """Accuracy (percent, where labels are known), images/s, bytes, resolution histogram, latency percentiles.

    ``scale_overhead`` is the scale model's share of the pipeline's work: its read + decode (thread CPU time)
    + inference, over all reads, decodes and inference.
    """
    n = len(preds)
    lat = np.array([p.latency_ms for p in preds]) if n else np.zeros(1)
    labelled = [p for p in preds if p.label is not None]
    hist: dict[str, int] = {}
    for p in preds:
        hist[str(p.resolution)] = hist.get(str(p.resolution), 0) + 1
    work = sum(timings.values())
    scale = sum(v for k, v in timings.items() if k.startswith("scale"))
    file_bytes = sum(p.file_bytes for p in preds)
    return {
        "images": n,
        "seconds": wall_s,
        "images_per_s": n / wall_s if wall_s > 0 else 0.0,
        "accuracy": 100.0 * np.mean([p.top5[0] == p.label for p in labelled]) if labelled else None,
        "top5_accuracy": 100.0 * np.mean([p.label in p.top5 for p in labelled]) if labelled else None,
        "bytes_read": int(bytes_read),
        "bytes_per_image": bytes_read / n if n else 0.0,
        "requests": requests,
        "requests_per_image": requests / n if n and requests is not None else None,
        "policy_bytes": int(sum(p.bytes_read for p in preds)),
        "read_fraction": bytes_read / file_bytes if file_bytes else 0.0,
        "resolution_histogram": dict(sorted(hist.items(), key=lambda kv: int(kv[0]))),
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "p99_ms": float(np.percentile(lat, 99)),
        "work_s": {k: round(v, 4) for k, v in sorted(timings.items())},
        "scale_overhead": scale / work if work else 0.0,
    }
