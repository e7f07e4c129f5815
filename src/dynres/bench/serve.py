"""`dynres bench serve`: a bounded loopback load test of `dynres serve`, with and without the load-adaptive λ.

The server runs in its own process (as in production; its memory is sampled from /proc), started from a spec file
(:func:`dynres.runtime.serve.write_server_spec`). First a closed-loop run measures the sustainable rate; then each
scenario offers an open-loop burst — ``calm`` (0.5x) → ``burst`` (``overload`` x the sustainable rate) → ``calm`` —
of store-key requests, and records every answer: status, latency, chosen resolution and λ, correctness. Both
scenarios shed requests predicted to miss the latency target; the adaptive one also raises λ, so the record shows the
throughput/accuracy trade λ makes under the burst.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dynres._ui import log
from dynres.errors import ConfigError
from dynres.records import markdown_table, write_records
from dynres.runtime.engine import EngineSpec, PipelineConfig
from dynres.runtime.serve import ServeConfig, write_server_spec

SCENARIOS = ("fixed_lambda_0", "adaptive_lambda")  # a fixed λ = 0, and the load-adaptive λ (both shed by target)
Phase = tuple[str, float, float]  # name, seconds, requests per second
Send = Callable[[str], Awaitable[dict]]  # one request for a store key -> its answer as a row


@dataclass(frozen=True)
class ServeBenchConfig:
    latency_target_ms: float = 1000.0
    overload: float = 2.0
    calm_s: float = 8.0
    burst_s: float = 30.0
    calibrate_s: float = 8.0
    clients: int = 8  # closed-loop concurrency when measuring the sustainable rate
    max_requests: int = 20000  # hard bound on requests per scenario, above what the default burst sends
    max_outstanding: int = 128  # the generator's own bound: a request due while this many are unanswered is not sent
    max_queue: int = 32
    max_batch: int = 8
    max_wait_ms: float = 10.0
    lam_max: float = 1.0
    kernels: str = "tuned"
    threads: int = 0
    timeout_s: float = 10.0  # a request unanswered this long counts as an error

    def __post_init__(self) -> None:
        if min(self.latency_target_ms, self.overload, self.calibrate_s, self.timeout_s) <= 0:
            raise ConfigError("bench serve", "latency_target_ms, overload, calibrate_s and timeout_s must be > 0")
        if min(self.calm_s, self.burst_s) < 0 or min(self.clients, self.max_requests, self.max_outstanding) < 1:
            raise ConfigError("bench serve", "calm_s and burst_s must be >= 0; clients, max_requests and "
                              "max_outstanding >= 1")


def engine_spec(store_path: str, backbone: str, scale: str, policy: str | None, cfg: ServeBenchConfig) -> EngineSpec:
    """The engine every scenario's server builds: dynamic mode, the service's batch size and threads."""
    return EngineSpec(store_path, backbone, scale, policy, cfg.kernels,
                      PipelineConfig(batch_size=cfg.max_batch, torch_threads=cfg.threads))


def serve_config(cfg: ServeBenchConfig, scenario: str | None = None) -> ServeConfig:
    """The service's settings: no latency target for the sustainable rate (``scenario`` None), else one of
    :data:`SCENARIOS`."""
    limits = dict(max_batch=cfg.max_batch, max_wait_ms=cfg.max_wait_ms, max_queue=cfg.max_queue)
    if scenario is None:
        return ServeConfig(**limits)
    if scenario == "fixed_lambda_0":
        return ServeConfig(**limits, latency_target_ms=cfg.latency_target_ms)
    if scenario == "adaptive_lambda":
        return ServeConfig(**limits, latency_target_ms=cfg.latency_target_ms, adaptive=True, lam_max=cfg.lam_max)
    raise ConfigError("bench serve", f"unknown scenario {scenario!r} ({', '.join(SCENARIOS)})")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class ServiceProcess:
    """The service in a subprocess on 127.0.0.1 (``python -m dynres.runtime.serve SPEC.json``); its stderr goes to
    ``log`` (a pipe nobody drains would fill up under a burst of warnings and block the server mid-test)."""

    def __init__(self, spec: EngineSpec, config: ServeConfig, log: Path):
        self.port = _free_port()
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="dynres-serve-", suffix=".json")
        os.close(fd)
        self.spec_file = write_server_spec(name, spec, config, "127.0.0.1", self.port)
        cmd = [sys.executable, "-m", "dynres.runtime.serve", str(self.spec_file)]
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err,
                                         env={**os.environ, "DYNRES_NO_PROGRESS": "1"})
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 120.0) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-2000:]
                raise ConfigError("serve", f"server exited (log {self.log}): {tail}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as res:
                    if res.status == 200:
                        return
            except OSError:  # refused while it starts (URLError is an OSError)
                time.sleep(0.3)
        raise ConfigError("serve", f"server did not become ready (log {self.log})")

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=30) as res:
            return res.read().decode()

    def stop(self) -> int | None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.spec_file.unlink(missing_ok=True)
        return self.proc.returncode


# --- the load generator -------------------------------------------------------------------------------------------


def _session(outstanding: int, timeout_s: float):
    """The load generator's HTTP client: aiohttp, whose per-request CPU cost is a fraction of httpx's, which
    matters when the generator shares two cores with the service it measures."""
    import aiohttp

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=outstanding),
                                 timeout=aiohttp.ClientTimeout(total=timeout_s))


async def send_key(client, url: str, key: str, classes: dict[str, str]) -> dict:
    """One ``POST /predict/key``: status (-1: dropped or timed out), latency, chosen resolution and λ, and whether
    the top-1 label is the key's class (None without an answer)."""
    t = time.perf_counter()
    try:
        async with client.post(f"{url}/predict/key", json={"key": key}) as res:
            status = res.status
            body = await res.json() if status == 200 else {}
    except Exception:  # a dropped connection or a timeout counts as an error, the test goes on
        status, body = -1, {}
    return {"status": status, "latency_ms": (time.perf_counter() - t) * 1e3, "resolution": body.get("resolution"),
            "lam": body.get("lam"), "correct": (body["top5"][0]["label"] == classes[key]) if body else None}


async def _closed_loop(url: str, keys: list[str], classes: dict, seconds: float, clients: int) -> float:
    """Answers per second (status 200) of ``clients`` clients each sending its next request on the last answer."""
    ok = 0
    end = time.perf_counter() + seconds
    async with _session(clients, 60.0) as client:
        async def worker(seed: int) -> None:
            nonlocal ok
            rng = random.Random(seed)
            while time.perf_counter() < end:
                row = await send_key(client, url, rng.choice(keys), classes)  # (``ok += await``: a lost update)
                ok += row["status"] == 200
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(clients)))
        wall = time.perf_counter() - t0
    return ok / wall


async def open_loop(send: Send, keys: list[str], phases: list[Phase], max_requests: int, pid: int,
                    max_outstanding: int = 128) -> tuple[list, list]:
    """Requests at fixed intervals per phase, each ``send(key)`` for a random key; RSS of process ``pid`` sampled
    each 0.5 s. Every row gets its phase, when it was sent (``sent_s``) and how late against the schedule.

    The generator shares the machine with the service, so it is bounded too: a request that falls due while
    ``max_outstanding`` are unanswered is recorded as not sent (status 0) instead of piling up in the client, whose
    own queueing would otherwise dominate every latency it measures (docs/bench-serve.md)."""
    out: list = []
    rss: list = []
    rng = random.Random(0)

    async def one(key: str, phase: str, sent_s: float, lag_ms: float) -> None:
        out.append({"phase": phase, **await send(key), "sent_s": sent_s, "lag_ms": lag_ms})

    start, tasks, offered, clock, next_rss, live = time.perf_counter(), [], 0, 0.0, 0.0, set()
    for name, seconds, rate in phases:
        for i in range(int(seconds * rate)):
            if offered >= max_requests:
                break
            offered += 1
            at = clock + i / rate
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if at >= next_rss:
                rss.append({"t": at, "rss_mb": _rss_mb(pid)})
                next_rss = at + 0.5
            sent = time.perf_counter() - start  # later than ``at`` when the generator cannot keep up
            if len(live) >= max_outstanding:
                out.append({"phase": name, "status": 0, "latency_ms": 0.0, "sent_s": sent,
                            "lag_ms": (sent - at) * 1e3, "resolution": None, "lam": None, "correct": None})
                continue
            task = asyncio.create_task(one(rng.choice(keys), name, sent, (sent - at) * 1e3))
            live.add(task)
            task.add_done_callback(live.discard)
            tasks.append(task)
        clock += seconds
    await asyncio.gather(*tasks)
    rss.append({"t": time.perf_counter() - start, "rss_mb": _rss_mb(pid)})
    return out, rss


async def offer_load(url: str, keys: list[str], classes: dict[str, str], phases: list[Phase], max_requests: int,
                     pid: int, max_outstanding: int = 128, timeout_s: float = 10.0) -> tuple[list, list]:
    """:func:`open_loop` of :func:`send_key` requests to the service at ``url`` (``pid``: its process)."""
    async with _session(max_outstanding, timeout_s) as client:
        return await open_loop(lambda key: send_key(client, url, key, classes), keys, phases, max_requests, pid,
                               max_outstanding)


# --- what the service and the client saw --------------------------------------------------------------------------


def server_latency_quantile(metrics_text: str, q: float = 0.99) -> float | None:
    """The upper bound (ms) of the latency-histogram bucket holding quantile ``q``, from the server's /metrics:
    the service's own view, without client-side or connection queueing."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets = []
    for family in text_string_to_metric_families(metrics_text):
        if family.name == "dynres_request_latency_seconds":
            buckets = sorted((float(s.labels["le"]), s.value) for s in family.samples if s.name.endswith("_bucket"))
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    return next(1e3 * le for le, count in buckets if count >= q * total)


def server_status_counts(metrics_text: str) -> dict[str, int]:
    """Requests the service itself answered, by HTTP status (its /metrics counter): set against what the client
    saw, it tells a request the service failed from one the client never got through."""
    from prometheus_client.parser import text_string_to_metric_families

    counts: dict[str, int] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name == "dynres_requests":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counts[sample.labels["status"]] = int(sample.value)
    return dict(sorted(counts.items()))


def load_stats(rows: list[dict], target_ms: float) -> dict:
    """Counts by outcome, client-side latency percentiles, accuracy, λ and resolutions of the answered requests,
    and how far the generator fell behind its schedule."""
    ok = [r for r in rows if r["status"] == 200]
    lat = np.array([r["latency_ms"] for r in ok]) if ok else np.zeros(1)
    hist: dict[str, int] = {}
    for r in ok:
        hist[str(r["resolution"])] = hist.get(str(r["resolution"]), 0) + 1
    lams = [r["lam"] for r in ok if r["lam"] is not None]
    lag = np.array([r.get("lag_ms", 0.0) for r in rows]) if rows else np.zeros(1)
    sent = [r["sent_s"] for r in rows if "sent_s" in r and r["status"] != 0]  # status 0: never sent
    span = max(sent) - min(sent) if len(sent) > 1 else 0.0
    return {
        "requests": len(rows), "ok": len(ok), "rejected_503": sum(r["status"] == 503 for r in rows),
        "not_sent": sum(r["status"] == 0 for r in rows),
        "other": sum(r["status"] not in (0, 200, 503) for r in rows),
        "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
        "p99_under_target": bool(np.percentile(lat, 99) <= target_ms),
        "accuracy": 100 * float(np.mean([r["correct"] for r in ok])) if ok else None,
        "mean_lambda": float(np.mean(lams)) if lams else None, "max_lambda": max(lams) if lams else None,
        "mean_resolution": float(np.mean([r["resolution"] for r in ok])) if ok else None,
        "resolution_histogram": dict(sorted(hist.items(), key=lambda kv: int(kv[0]))),
        # the load generator shares the machine: how late it sent requests, and the rate it really offered
        "client_lag_p99_ms": float(np.percentile(lag, 99)),
        "achieved_rps": (len(sent) - 1) / span if span > 0 else None,
    }


def scenario_record(rows: list[dict], rss: list[dict], metrics_text: str, target_ms: float, alive: bool,
                    exit_code: int | None) -> dict:
    """One scenario's record: :func:`load_stats` of all rows and of the burst phase, the server's own view (its
    p99 bucket and answers by status), whether it survived, and its memory at start, peak and end."""
    stats = load_stats(rows, target_ms)
    stats["burst"] = load_stats([r for r in rows if r["phase"] == "burst"], target_ms)
    mem = [r["rss_mb"] for r in rss if r["rss_mb"] == r["rss_mb"]]  # NaN: the process was gone
    stats.update({"server_alive_at_end": alive, "server_exit_code": exit_code,
                  "server_p99_ms_bucket": server_latency_quantile(metrics_text),
                  "server_answered": server_status_counts(metrics_text),
                  "rss_start_mb": mem[0] if mem else None, "rss_max_mb": max(mem) if mem else None,
                  "rss_end_mb": mem[-1] if mem else None})
    return stats


# --- the benchmark: compute → record → render ---------------------------------------------------------------------


def _sustainable_rate(spec: EngineSpec, cfg: ServeBenchConfig, keys: list[str], classes: dict, log_file: Path) -> float:
    server = ServiceProcess(spec, serve_config(cfg), log_file)
    try:
        server.wait_ready()
        asyncio.run(_closed_loop(server.url, keys, classes, 2.0, cfg.clients))  # warm-up: kernels, caches
        return asyncio.run(_closed_loop(server.url, keys, classes, cfg.calibrate_s, cfg.clients))
    finally:
        server.stop()


def _scenario(spec: EngineSpec, config: ServeConfig, cfg: ServeBenchConfig, keys: list[str], classes: dict,
              phases: list[Phase], log_file: Path) -> dict:
    server = ServiceProcess(spec, config, log_file)
    try:
        server.wait_ready()
        asyncio.run(_closed_loop(server.url, keys, classes, 2.0, 2))
        rows, rss = asyncio.run(offer_load(server.url, keys, classes, phases, cfg.max_requests, server.proc.pid,
                                           cfg.max_outstanding, cfg.timeout_s))
        alive = server.proc.poll() is None
        metrics = server.metrics()
    finally:
        code = server.stop()
    return scenario_record(rows, rss, metrics, cfg.latency_target_ms, alive, code)


def measure_serve(store_path: str, backbone: str, scale: str, out: str | Path, policy: str | None = None,
                  cfg: ServeBenchConfig = ServeBenchConfig()) -> dict:
    """Sustainable rate, then the burst in every scenario; the servers' logs go to ``out``. Returns the record."""
    from dynres.io.store import open_store

    store = open_store(store_path)
    classes = {k: store.classes[store.label(k)] for k in store.keys}
    keys = list(store.keys)
    spec = engine_spec(store_path, backbone, scale, policy, cfg)
    sustainable = _sustainable_rate(spec, cfg, keys, classes, Path(out) / "serve_sustainable.log")
    log(f"sustainable rate {sustainable:.1f} req/s; bursting at {cfg.overload}x")
    phases = [("calm", cfg.calm_s, 0.5 * sustainable), ("burst", cfg.burst_s, cfg.overload * sustainable),
              ("calm", cfg.calm_s, 0.5 * sustainable)]
    scenarios = {}
    for name in SCENARIOS:
        stats = _scenario(spec, serve_config(cfg, name), cfg, keys, classes, phases, Path(out) / f"serve_{name}.log")
        scenarios[name] = stats
        log(f"{name}: {stats['ok']} ok, {stats['rejected_503']} x 503, p99 {stats['p99_ms']:.0f} ms, "
            f"top-1 {stats['accuracy']}")
    return {"store": store_path, "backbone": backbone, "scale_model": scale, "config": asdict(cfg),
            "sustainable_rps": sustainable, "offered_burst_rps": cfg.overload * sustainable,
            "phases": [{"phase": p, "seconds": s, "rate": r} for p, s, r in phases], "scenarios": scenarios}


def run_bench_serve(store_path: str, backbone: str, scale: str, out: str | Path, policy: str | None = None,
                    cfg: ServeBenchConfig = ServeBenchConfig()) -> dict:
    """Sustainable rate, then the burst with a fixed λ=0 and with the load-adaptive λ; writes serve_load.json/.md."""
    payload = measure_serve(store_path, backbone, scale, out, policy, cfg)
    write_records(out, "serve_load", payload, render_markdown(payload))
    return payload


def render_markdown(p: dict) -> str:
    rows = [{"scenario": k, **v} for k, v in p["scenarios"].items()]
    rows += [{"scenario": f"{k} (burst phase)", **v["burst"]} for k, v in p["scenarios"].items()]
    for row in rows:
        if "server_answered" in row:
            row["server_answered"] = ", ".join(f"{k}: {v}" for k, v in row["server_answered"].items())
    cols = ["scenario", "requests", "ok", "rejected_503", "not_sent", "other", "server_answered", "p50_ms", "p99_ms",
            "server_p99_ms_bucket",
            "client_lag_p99_ms", "achieved_rps", "accuracy", "mean_lambda",
            "mean_resolution", "rss_start_mb", "rss_max_mb", "server_alive_at_end"]
    return (f"# Service under a burst (loopback)\n\nSustainable: {p['sustainable_rps']:.1f} req/s (closed loop, "
            f"{p['config']['clients']} clients). Burst: {p['offered_burst_rps']:.1f} req/s for "
            f"{p['config']['burst_s']:.0f} s between calm phases at half the sustainable rate. Latency target "
            f"{p['config']['latency_target_ms']:.0f} ms; queue bound {p['config']['max_queue']}.\n\n"
            + markdown_table(rows, cols) + "\n\np50/p99: client-side (loopback, includes connection and client queueing); "
            "server p99: the bucket bound of the service's own latency histogram (whole scenario). The load "
            "generator (one Python process) shares the cores with the server: client lag p99 is how late it sent "
            "requests against its schedule and achieved req/s the rate it really offered; where these fall short "
            "of the burst, client-side latency measures the generator, not the service. Server answered: the "
            "service's own count by status (the closed-loop warm-up included); client-side 'other' errors it "
            "does not count never reached it. Not sent: due while the generator already had "
            f"{p['config']['max_outstanding']} requests unanswered.\n")
