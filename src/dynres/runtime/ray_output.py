"""Where the Ray engine's predictions go and what is read back from them: the output schema, the fsspec target
the Parquet writer writes to, and the run's summary computed by streaming over the written files.

Its own module so that :mod:`dynres.runtime.ray` holds the pipeline alone. The summary never collects the rows
on the driver: it scans the written Parquet files a few columns and one record batch at a time and keeps running
sums, a resolution histogram, the sets of actors seen and one float32 latency per image (the percentiles need
them: 4 bytes an image, 4 MB for a million).

The steady rate is the images over the span from the first actor call's start to the last backbone batch's end:
the pools' start-up (Ray's read of the manifest, actors importing torch and loading their models) is excluded,
every image's work included. (It replaced a rate between the first and the last batch to *end*, which a job of a
few large calls over several actors inflates: two calls ending together leave almost no span.)
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa

from dynres.errors import ConfigError

SCHEMA = pa.schema([
    ("key", pa.string()),
    ("label", pa.string()),  # the backbone's class name (None: unlabelled)
    ("top5_classes", pa.list_(pa.string())),
    ("top5_probs", pa.list_(pa.float32())),
    ("resolution", pa.int32()),
    ("lam", pa.float64()),
    ("bytes_read", pa.int64()),  # the prefix the chosen resolution needs (the local engine's column)
    ("file_bytes", pa.int64()),
    ("latency_ms", pa.float64()),  # from the scale stage's start on the image's batch to its backbone batch's end
    ("started_at", pa.float64()),  # when its first actor call started (Unix time) ...
    ("finished_at", pa.float64()),  # ... and its backbone batch ended: the steady rate, the pools' start-up excluded
    ("requests", pa.int32()),  # storage requests for this image, both stages
    ("bytes_fetched", pa.int64()),  # bytes those requests fetched
    ("scale_actor", pa.string()),  # node id : pid of the actor that ran each stage (empty: no scale stage)
    ("backbone_actor", pa.string()),
    ("scale_ms", pa.float64()),  # the image's share of its scale-actor call's time (0: no scale stage)
    ("backbone_ms", pa.float64()),  # ... and of its backbone-actor call's (reads, decodes and model)
])


def output_target(uri: str) -> tuple[Any, str]:
    """The pyarrow filesystem and path of an output URI (a local path or any fsspec URL, S3 included)."""
    import fsspec
    from pyarrow.fs import FSSpecHandler, LocalFileSystem, PyFileSystem

    if "://" not in uri or uri.startswith("file://"):
        return LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))
    fs, path = fsspec.core.url_to_fs(uri)
    return PyFileSystem(FSSpecHandler(fs)), path


def prepare_output(uri: str) -> tuple[Any, str]:
    """The target of ``uri``, emptied of an earlier run's Parquet files; anything else there is refused, so a run
    never mixes with other data nor deletes it."""
    from pyarrow.fs import FileSelector, FileType

    fs, path = output_target(uri)
    info = fs.get_file_info(path)
    if info.type == FileType.File:
        raise ConfigError("output", f"{uri} is a file: the Ray engine writes a directory of Parquet files")
    if info.type == FileType.Directory:
        found = fs.get_file_info(FileSelector(path, recursive=True))
        other = [f.path for f in found if f.type == FileType.File and not f.path.endswith(".parquet")]
        if other:
            raise ConfigError("output", f"{uri} holds files other than an earlier run's Parquet (e.g. {other[0]}): "
                              "choose an empty or new directory")
        for f in found:
            if f.type == FileType.File:
                fs.delete_file(f.path)
    return fs, path


def summarize_output(uri: str, wall_s: float, lam: float | None, batch_rows: int = 65536) -> dict:
    """The local engine's summary keys (:func:`dynres.runtime.results.summarize`), computed from the written
    predictions, plus the actors each stage ran on."""
    import pyarrow.dataset as pads

    fs, path = output_target(uri)
    data = pads.dataset(path, filesystem=fs, format="parquet")
    n = correct = correct5 = labelled = 0
    sums = {"bytes_read": 0, "file_bytes": 0, "requests": 0, "bytes_fetched": 0, "scale_ms": 0.0, "backbone_ms": 0.0}
    hist: dict[str, int] = {}
    actors: dict[str, set[str]] = {"scale_actor": set(), "backbone_actor": set()}
    latencies, started, finished = [], [], []
    columns = ["label", "top5_classes", "resolution", "latency_ms", "started_at", "finished_at", *sums, *actors]
    for batch in data.to_batches(columns=columns, batch_size=batch_rows):
        if not batch.num_rows:
            continue
        n += batch.num_rows
        label = batch.column("label").to_pylist()
        top5 = batch.column("top5_classes").to_pylist()
        for y, t in zip(label, top5):
            if y is not None:
                labelled += 1
                correct += bool(t) and t[0] == y
                correct5 += y in t
        for name in sums:
            sums[name] += pa.compute.sum(batch.column(name)).as_py() or 0
        for r, k in zip(*np.unique(batch.column("resolution").to_numpy(), return_counts=True)):
            hist[str(r)] = hist.get(str(r), 0) + int(k)
        for name, seen in actors.items():
            seen.update(a for a in pa.compute.unique(batch.column(name)).to_pylist() if a)
        latencies.append(batch.column("latency_ms").to_numpy().astype(np.float32))
        started.append(pa.compute.min(batch.column("started_at")).as_py())
        finished.append(pa.compute.max(batch.column("finished_at")).as_py())
    lat = np.concatenate(latencies) if n else np.zeros(1, np.float32)
    return {
        "images": n,
        "seconds": wall_s,
        "images_per_s": n / wall_s if wall_s > 0 else 0.0,
        "steady_images_per_s": n / span if n and (span := max(finished) - min(started)) > 0 else None,
        "accuracy": 100.0 * correct / labelled if labelled else None,
        "top5_accuracy": 100.0 * correct5 / labelled if labelled else None,
        "bytes_read": sums["bytes_fetched"],
        "bytes_per_image": sums["bytes_fetched"] / n if n else 0.0,
        "requests": sums["requests"],
        "requests_per_image": sums["requests"] / n if n else None,
        "policy_bytes": sums["bytes_read"],
        "read_fraction": sums["bytes_fetched"] / sums["file_bytes"] if sums["file_bytes"] else 0.0,
        "resolution_histogram": dict(sorted(hist.items(), key=lambda kv: int(kv[0]))),
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "p99_ms": float(np.percentile(lat, 99)),
        # the actors' busy time per stage: against wall time x actors, what the pools spent outside dynres's work
        "work_s": {"scale_actors": sums["scale_ms"] / 1e3, "backbone_actors": sums["backbone_ms"] / 1e3},
        "scale_overhead": sums["scale_ms"] / work if (work := sums["scale_ms"] + sums["backbone_ms"]) else 0.0,
        "lam": lam,
        "actors_seen": {name.removesuffix("_actor"): len(seen) for name, seen in actors.items()},
    }
