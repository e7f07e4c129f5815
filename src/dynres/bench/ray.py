"""`dynres bench ray`: the Ray engine against the local engine on the same images, and what each costs in storage
requests.

(1) Throughput: the local engine (threads in this process) and the Ray engine in every layout of ``layouts``
(fused: one pool running both models; split: a pool per stage) with 1 and 2 actors per pool (more with
``actors``), the same first images of the store, each run's driver RSS sampled (peak and start). Ray's images/s
are reported both over the whole run (the pools' start-up, actors loading their models, included) and in steady
state (from the first actor call's start to the last batch's end: the pools' start-up excluded). (2) Driver
memory against the number of images: stores of 1,000 .. 20,000 images synthesized by repeating the manifest's
rows (new keys, the same files), so the driver's peak RSS can be compared across sizes. (3) Requests: every mode
against an S3-compatible server on loopback (moto's server mode), storage requests and bytes per image: the local
engine's dynamic pipeline with and without fetch-ahead, read-ahead, and the Ray engine's in each layout.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from dynres.errors import ConfigError
from dynres.io.format import MANIFEST
from dynres.records import markdown_table, write_records
from dynres.runtime.engine import EngineSpec, PipelineConfig, build_engine
from dynres.runtime.ray import RayConfig, run_ray

REQUEST_MODES = {  # the pipeline settings each requests row runs with
    "local dynamic": {},
    "local dynamic, fetch-ahead": {"fetch_ahead": True},
    "local dynamic, fetch-ahead @median": {"fetch_ahead": True, "fetch_ahead_resolution": "median"},
    "local dynamic, read-ahead": {"read_ahead": True},
    "ray dynamic": {},  # once per layout ("ray fused dynamic", ...)
    "ray dynamic, fetch-ahead": {"fetch_ahead": True},
}


@dataclass(frozen=True)
class RayBenchConfig:
    images: int = 1000  # the first N images of the store (0: all; more than it holds: its images repeated)
    actors: tuple[int, ...] = (1, 2)  # actors per pool, one Ray row each (and layout)
    layouts: tuple[str, ...] = ("fused", "split")  # RayConfig.layout, one set of Ray rows each
    worker_niceness: int | None = 0  # RayConfig.worker_niceness (None: Ray's default, 15)
    batch_size: int = 16  # the models' batch (both engines)
    ray_batch: int = RayConfig.batch_size  # images per Ray actor call
    workers: int = 2  # the local engine's read/decode threads
    lam: float = 0.0
    kernels: str = "eager"
    num_cpus: int | None = None  # the local Ray's CPUs (None: every core)
    memory_images: tuple[int, ...] = (1000, 20000)  # synthesized store sizes for the driver-memory check (): none
    s3_images: int = 200  # images uploaded to the S3-compatible server (0: no requests measurement)
    sample_s: float = 0.05  # driver RSS sampling period

    def __post_init__(self) -> None:
        if self.images < 0 or self.s3_images < 0 or any(n < 1 for n in (*self.actors, *self.memory_images)):
            raise ConfigError("bench ray", "images and s3_images must be >= 0, actors and memory_images >= 1")
        if not self.actors or not self.layouts:
            raise ConfigError("bench ray", "give at least one actor count and one layout")
        for layout in self.layouts:
            RayConfig(layout=layout, worker_niceness=self.worker_niceness)  # the engine's own checks


# --- driver memory -------------------------------------------------------------------------------------------------


def rss_mb() -> float:
    """This process's resident set (Linux /proc), in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@contextmanager
def driver_rss(period_s: float):
    """Samples this process's RSS every ``period_s`` while the block runs; yields a dict that gets start/peak MB."""
    found = {"rss_start_mb": rss_mb(), "rss_peak_mb": rss_mb()}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(period_s):
            found["rss_peak_mb"] = max(found["rss_peak_mb"], rss_mb())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield found
    finally:
        stop.set()
        thread.join()
        found["rss_peak_mb"] = max(found["rss_peak_mb"], rss_mb())
        found["rss_growth_mb"] = found["rss_peak_mb"] - found["rss_start_mb"]


def repeated_key(keys: list[str], i: int) -> str:
    """The ``i``-th key of ``keys`` repeated: its own key on the first pass, suffixed ``#pass`` after."""
    n = len(keys)
    return keys[i % n] + ("" if i < n else f"#{i // n}")


def synthesize_store(store: str, images: int, where: Path) -> str:
    """A store of ``images`` images under ``where`` made by repeating ``store``'s manifest rows (keys suffixed
    ``#i`` from the second pass on) over the same files, linked in: the Ray engine's cost per image, at any
    count, without encoding new images."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(Path(store) / MANIFEST)
    n = table.num_rows
    rows = table.take(pa.array([i % n for i in range(images)]))
    originals = table.column("key").to_pylist()
    keys = pa.array([repeated_key(originals, i) for i in range(images)], table.schema.field("key").type)
    rows = rows.set_column(rows.schema.get_field_index("key"), "key", keys).replace_schema_metadata(
        table.schema.metadata)
    where.mkdir(parents=True, exist_ok=True)
    for entry in Path(store).iterdir():
        if entry.name != MANIFEST and not entry.name.endswith(".parquet"):
            (where / entry.name).symlink_to(entry.resolve())
    pq.write_table(rows, where / MANIFEST)
    return str(where)


def synthesize_policy(policy: str, store: str, images: int, where: Path) -> str:
    """``policy`` for the store :func:`synthesize_store` makes from ``store``: every repeated key reads what its
    original reads (a per-image policy lists keys; an unlisted one would read whole files and skew the rates)."""
    import numpy as np
    import pyarrow.parquet as pq

    from dynres.policy.calibration import CalibrationPolicy, load_policy

    pol = load_policy(policy)
    keys = pq.read_table(Path(store) / MANIFEST, columns=["key"]).column("key").to_pylist()
    rows = {k: i for i, k in enumerate(pol.keys)}
    n = len(keys)
    listed = [i for i in range(images) if keys[i % n] in rows]
    new_keys = tuple(repeated_key(keys, i) for i in listed)
    counts = np.asarray(pol.counts)[[rows[keys[i % n]] for i in listed]].reshape(len(listed), -1)
    return str(CalibrationPolicy(pol.rules, new_keys, counts, pol.provenance).save(where))


# --- runs ----------------------------------------------------------------------------------------------------------


def _row(mode: str, summary: dict, memory: dict) -> dict:
    return {"mode": mode, "images": summary["images"], "images_per_s": summary["images_per_s"],
            "steady_images_per_s": summary.get("steady_images_per_s", summary["images_per_s"]),
            "accuracy": summary["accuracy"], "requests_per_image": summary.get("requests_per_image"),
            "bytes_per_image": summary["bytes_per_image"], "p50_ms": summary["p50_ms"],
            "actors_seen": summary.get("actors_seen"), **{k: round(v, 1) for k, v in memory.items()}}


def time_local(spec: EngineSpec, images: int, cfg: RayBenchConfig, timed=lambda: None) -> dict:
    """The local engine on the first ``images`` keys, after a warm-up run of one batch (``timed()`` is called
    between the two)."""
    engine = build_engine(spec)
    keys = engine.store.keys[:images] if images else engine.store.keys
    engine.run(keys[: spec.config.batch_size], progress=False)
    engine.store.reset_stats()
    timed()
    with driver_rss(cfg.sample_s) as memory:
        summary = engine.run(keys, progress=False).summary
    return _row("local", summary, memory)


def ray_mode(layout: str, actors: int) -> str:
    return f"ray {layout}, {actors} actor{'s' if actors > 1 else ''}{' per stage' if layout == 'split' else ''}"


def time_ray(spec: EngineSpec, images: int, actors: int, out: str, cfg: RayBenchConfig, mode: str = "",
             layout: str | None = None) -> dict:
    """The Ray engine with ``actors`` per pool (``layout``: the first of ``cfg.layouts``) on the first ``images``
    keys, predictions written under ``out``."""
    layout = layout or cfg.layouts[0]
    ray_cfg = RayConfig(layout=layout, scale_actors=actors if layout == "split" else None, backbone_actors=actors,
                        batch_size=cfg.ray_batch,
                        num_cpus=cfg.num_cpus, worker_niceness=cfg.worker_niceness)
    with driver_rss(cfg.sample_s) as memory:
        summary = run_ray(spec, out, ray_cfg, limit=images or None, progress=False).summary
    busy = sum(summary["work_s"].values())
    pools = 2 if summary["ray"]["layout"] == "split" and summary["mode"] == "dynamic" else 1
    held = summary["seconds"] * actors * pools
    return {**_row(mode or ray_mode(layout, actors), summary, memory), "layout": summary["ray"]["layout"],
            "ray": summary["ray"], "work_s": summary["work_s"], "seconds": summary["seconds"],
            "actor_busy_fraction": busy / held if held else None}


def measure_throughput(spec: EngineSpec, cfg: RayBenchConfig, scratch: Path) -> list[dict]:
    """Every engine on the first ``cfg.images`` images; more images than the store holds: a store synthesized
    by repeating its images (:func:`synthesize_store`), so a job can have many actor calls on a small store."""
    from dynres.io.store import open_store

    if cfg.images > len(open_store(spec.store)):
        store = synthesize_store(spec.store, cfg.images, scratch / "throughput-store")
        policy = spec.policy and synthesize_policy(spec.policy, spec.store, cfg.images, scratch / "policy.json")
        spec = replace(spec, store=store, policy=policy)
    rows = [time_local(spec, cfg.images, cfg)]
    for layout in cfg.layouts:
        for n in cfg.actors:
            rows.append(time_ray(spec, cfg.images, n, str(scratch / f"preds-{layout}-{n}"), cfg, layout=layout))
    return rows


def measure_driver_memory(spec: EngineSpec, cfg: RayBenchConfig, scratch: Path) -> list[dict]:
    """The Ray engine (the largest actor count) on synthesized stores of every ``memory_images`` size."""
    rows = []
    for n in cfg.memory_images:
        store = synthesize_store(spec.store, n, scratch / f"store-{n}")
        rows.append(time_ray(replace(spec, store=store), 0, max(cfg.actors), str(scratch / f"mem-{n}"), cfg,
                             mode=f"ray {cfg.layouts[0]}, {n} images"))
    return rows


# --- requests against an S3-compatible server ----------------------------------------------------------------------


class ServerGets(logging.Handler):
    """Counts the GETs of objects under ``prefix`` that the server logged (its request log, silenced here): the
    server's side of the store's own ``requests`` count."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix, self.count = f"GET {prefix}", 0  # the request line, maybe inside ANSI colour codes

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.count += self.prefix in message and MANIFEST not in message


@contextmanager
def s3_server(count_prefix: str):
    """moto's S3 server on a free loopback port, credentials and endpoint in the environment (so Ray workers
    started from here inherit them); yields the endpoint URL and a :class:`ServerGets` of ``count_prefix``; the
    environment and the request log are restored after."""
    import socket

    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        raise ConfigError("bench ray", "the requests measurement needs moto's server: pip install 'moto[server]' "
                          "(or set s3_images=0)") from None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": url, "FSSPEC_S3_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    log, gets = logging.getLogger("werkzeug"), ServerGets(count_prefix)
    propagate, level = log.propagate, log.level
    log.addHandler(gets)
    log.propagate = False
    log.setLevel(logging.INFO)
    try:
        yield url, gets
    finally:
        log.removeHandler(gets)
        log.propagate, log.level = propagate, level
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def upload_store(store: str, images: int, bucket_url: str) -> str:
    """The first ``images`` images of ``store`` and a manifest of just them, uploaded under ``bucket_url``."""
    import fsspec
    import pyarrow.parquet as pq

    table = pq.read_table(Path(store) / MANIFEST).slice(0, images)
    fs, root = fsspec.core.url_to_fs(bucket_url)
    fs.mkdir(root.split("/")[0])
    for rel in table.column("path").to_pylist():
        fs.put_file(str(Path(store) / rel), f"{root}/{rel}")
    with tempfile.TemporaryDirectory() as tmp:
        pq.write_table(table, Path(tmp) / MANIFEST)
        fs.put_file(str(Path(tmp) / MANIFEST), f"{root}/{MANIFEST}")
    fs.invalidate_cache()
    return bucket_url


def request_runs(layouts: tuple[str, ...]) -> list[tuple[str, dict, str | None]]:
    """(mode, pipeline settings, Ray layout or None for the local engine) of every requests row: each Ray mode
    once per layout."""
    runs = []
    for mode, settings in REQUEST_MODES.items():
        if mode.startswith("ray "):
            runs += [(mode.replace("ray ", f"ray {layout} ", 1), settings, layout) for layout in layouts]
        else:
            runs.append((mode, settings, None))
    return runs


def measure_requests(spec: EngineSpec, cfg: RayBenchConfig, scratch: Path) -> list[dict]:
    """Every :data:`REQUEST_MODES` row on ``s3_images`` images served by moto; Ray writes its predictions to the
    same server (the output URI is any fsspec URI)."""
    import ray

    from dynres.model.checkpoint import read_meta

    grid = sorted(read_meta(spec.scale).grid)
    median = grid[len(grid) // 2]
    rows = []
    ray.shutdown()  # the Ray workers must start with the server's endpoint in their environment
    try:
        with s3_server("/dynres-bench/store/") as (endpoint, gets):
            url = upload_store(spec.store, cfg.s3_images, "s3://dynres-bench/store")
            for mode, settings, layout in request_runs(cfg.layouts):
                if settings.get("fetch_ahead_resolution") == "median":  # the grid's middle resolution's prefix
                    settings = {**settings, "fetch_ahead_resolution": median}
                    mode = mode.replace("median", f"{median} px")
                s3_spec = replace(spec, store=url, config=replace(spec.config, **settings))
                gets.count = 0
                if layout is None:
                    row = time_local(s3_spec, 0, cfg, timed=lambda: setattr(gets, "count", 0))
                else:
                    out = f"s3://dynres-bench/preds-{len(rows)}"
                    row = time_ray(s3_spec, 0, max(cfg.actors), out, cfg, layout=layout)
                rows.append({**row, "mode": mode, "server_gets_per_image": gets.count / max(row["images"], 1),
                             "endpoint": endpoint})
            ray.shutdown()
    finally:
        ray.shutdown()
    return rows


# --- the record ----------------------------------------------------------------------------------------------------


def measure_ray(store: str, backbone: str, scale: str, policy: str | None = None,
                cfg: RayBenchConfig = RayBenchConfig(), progress: bool = True) -> dict:
    """Throughput and driver memory per engine and actor count, driver memory per store size, requests per mode."""
    from dynres._ui import console

    pipeline = PipelineConfig(batch_size=cfg.batch_size, workers=cfg.workers, lam=cfg.lam)
    spec = EngineSpec(str(store), str(backbone), str(scale), policy, cfg.kernels, pipeline)
    with tempfile.TemporaryDirectory(prefix="dynres-bench-ray-") as tmp:
        scratch = Path(tmp)
        steps = [("throughput", measure_throughput), ("driver_memory", measure_driver_memory)]
        if cfg.s3_images:
            steps.append(("requests", measure_requests))
        found = {}
        for name, step in steps:
            if progress:
                console.print(f"bench ray: {name}")
            found[name] = step(spec, cfg, scratch)
    return {"store": str(store), "backbone": str(backbone), "scale_model": str(scale), "policy": policy,
            "config": asdict(cfg), "cpus": os.cpu_count(), **found, "ratios": ray_ratios(found["throughput"])}


def ray_ratios(rows: list[dict]) -> dict:
    """Each Ray row's steady images/s against its layout's first row (its fewest actors) and against the local
    engine (same images)."""
    local = next(r for r in rows if r["mode"] == "local")
    ray_rows = [r for r in rows if r["mode"] != "local"]
    first = {}
    for r in ray_rows:
        first.setdefault(r.get("layout"), r)
    return {r["mode"]: {"vs_first_ray_row": r["steady_images_per_s"] / first[r.get("layout")]["steady_images_per_s"],
                        "vs_local": r["steady_images_per_s"] / local["images_per_s"],
                        "whole_run_vs_local": r["images_per_s"] / local["images_per_s"]} for r in ray_rows}


def run_bench_ray(store: str, backbone: str, scale: str, out: str | Path, policy: str | None = None,
                  cfg: RayBenchConfig = RayBenchConfig(), progress: bool = True) -> dict:
    """Measure and write ``bench_ray.json`` / ``bench_ray.md`` under ``out``."""
    payload = measure_ray(store, backbone, scale, policy, cfg, progress)
    write_records(out, "bench_ray", payload, render_markdown(payload))
    return payload


COLUMNS = ["mode", "images", "images_per_s", "steady_images_per_s", "accuracy", "requests_per_image",
           "bytes_per_image", "p50_ms", "rss_start_mb", "rss_peak_mb", "rss_growth_mb"]
HEADERS = ["Mode", "Images", "Images/s (whole run)", "Images/s (steady)", "Top-1 %", "Requests/image",
           "Bytes/image", "p50 ms", "Driver RSS start MB", "peak MB", "growth MB"]


def render_markdown(p: dict) -> str:
    c = p["config"]
    lines = [f"# Ray engine benchmark ({p['cpus']} CPUs; model batch {c['batch_size']}, {c['ray_batch']} images per "
             f"actor call, λ={c['lam']})", "",
             "## Throughput and driver memory (the same first images; Ray's steady rate excludes the pools' "
             "start-up)", "", markdown_table(p["throughput"], COLUMNS, HEADERS), ""]
    lines += [f"- {mode}: steady {r['vs_first_ray_row']:.2f}x its layout's first row, {r['vs_local']:.2f}x the local "
              f"engine ({r['whole_run_vs_local']:.2f}x over the whole run)" for mode, r in p["ratios"].items()]
    lines += [f"- {r['mode']}: the actors were busy {100 * r['actor_busy_fraction']:.0f}% of the run's wall time "
              f"x actors (scale {r['work_s']['scale_actors']:.1f} s, backbone {r['work_s']['backbone_actors']:.1f} s "
              f"of work in {r['seconds']:.1f} s)" for r in p["throughput"] if r.get("actor_busy_fraction") is not None]
    if p.get("driver_memory"):
        lines += ["", "## Driver memory against the number of images (synthesized stores: manifest rows repeated "
                  "over the same files)", "", markdown_table(p["driver_memory"], COLUMNS, HEADERS)]
    if p.get("requests"):
        lines += ["", f"## Storage requests against an S3-compatible server (moto, loopback; "
                  f"{c['s3_images']} images; requests counted by the store and by the server)", "",
                  markdown_table(p["requests"], [*COLUMNS[:6], "server_gets_per_image", *COLUMNS[6:]],
                                 [*HEADERS[:6], "Server GETs/image", *HEADERS[6:]])]
    return "\n".join(lines)
