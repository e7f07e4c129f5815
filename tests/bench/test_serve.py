"""The load test: its generator stays within its bound, drives the service started from a spec file in its own
process, and the record reads the service's own counters next to what the client saw."""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import asdict

import pytest

from dynres.bench.serve import (
    SCENARIOS,
    ServeBenchConfig,
    ServiceProcess,
    engine_spec,
    load_stats,
    offer_load,
    open_loop,
    render_markdown,
    scenario_record,
    serve_config,
    server_latency_quantile,
    server_status_counts,
)
from dynres.errors import ConfigError
from dynres.runtime.serve import Metrics
from pipeline_fixtures import GRID, make_store, save_tiny_checkpoints


def metrics_text(latencies_s=(), statuses=()) -> str:
    """What a service's /metrics says after answering ``statuses`` in ``latencies_s``."""
    metrics = Metrics()
    for seconds in latencies_s:
        metrics.latency.observe(seconds)
    for status in statuses:
        metrics.count(status)
    return metrics.render().decode()


def test_server_latency_quantile_reads_the_bucket_bound_from_metrics():
    text = metrics_text([0.01] * 98 + [0.3, 2.0])
    assert server_latency_quantile(text, 0.5) == 10.0
    assert server_latency_quantile(text, 0.99) == 500.0
    assert server_latency_quantile(metrics_text()) is None


def test_server_status_counts_read_the_services_own_counter():
    assert server_status_counts(metrics_text(statuses=(200, 200, 503))) == {"200": 2, "503": 1}


def generator_rows() -> list[dict]:
    rows = [{"phase": "burst", "status": 200, "latency_ms": 10.0 * (i + 1), "resolution": 32, "lam": 0.0,
             "correct": True, "sent_s": 0.5 * i, "lag_ms": lag} for i, lag in enumerate((0.0, 10.0, 400.0))]
    rows.append({**rows[0], "status": 503, "sent_s": 1.5, "lag_ms": 0.0, "resolution": None, "correct": None})
    rows.append({**rows[-1], "status": 0, "sent_s": 1.6})  # due while the generator was at its bound: not sent
    return rows


def test_load_test_stats_show_when_the_generator_fell_behind():
    s = load_stats(generator_rows(), target_ms=25.0)
    assert (s["requests"], s["ok"], s["rejected_503"], s["not_sent"], s["other"]) == (5, 3, 1, 1, 0)
    assert s["achieved_rps"] == pytest.approx(2.0)  # 4 requests really sent over 1.5 s
    assert 300 < s["client_lag_p99_ms"] <= 400 and not s["p99_under_target"]


def test_a_scenario_record_sets_the_services_view_beside_the_clients():
    calm = {**generator_rows()[0], "phase": "calm", "status": -1, "correct": None}  # dropped: the client's error
    rows = [calm, *generator_rows()]
    rss = [{"t": 0.0, "rss_mb": 100.0}, {"t": 0.5, "rss_mb": 130.0}, {"t": 1.0, "rss_mb": float("nan")}]
    text = metrics_text([0.01, 0.02, 0.03], statuses=(200, 200, 200, 503))
    record = scenario_record(rows, rss, text, target_ms=25.0, alive=True, exit_code=0)
    assert (record["requests"], record["other"], record["burst"]["requests"], record["burst"]["other"]) == (6, 1, 5, 0)
    assert record["server_answered"] == {"200": 3, "503": 1} and record["server_p99_ms_bucket"] == 50.0
    assert (record["rss_start_mb"], record["rss_max_mb"], record["rss_end_mb"]) == (100.0, 130.0, 130.0)
    assert record["server_alive_at_end"] and record["server_exit_code"] == 0


def test_the_markdown_is_rendered_from_the_record():
    record = scenario_record(generator_rows(), [], metrics_text(statuses=(200,)), 25.0, True, 0)
    payload = {"config": asdict(ServeBenchConfig()), "sustainable_rps": 10.0, "offered_burst_rps": 20.0,
               "scenarios": {name: record for name in SCENARIOS}}
    text = render_markdown(json.loads(json.dumps(payload)))  # what serve_load.json gives back
    assert "Sustainable: 10.0 req/s" in text and "Burst: 20.0 req/s" in text
    assert "| adaptive_lambda (burst phase) | 5 | 3 | 1 | 1 | 0 |" in text
    assert "200: 1" in text  # the service's own count, per scenario


def test_the_load_generator_never_holds_more_than_its_bound():
    running, peak = [0], [0]

    async def slow_send(key: str) -> dict:
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        await asyncio.sleep(0.2)  # a slow service: answers come back long after the next requests fall due
        running[0] -= 1
        return {"status": 200, "latency_ms": 200.0, "resolution": 32, "lam": 0.0, "correct": True}

    rows, _ = asyncio.run(open_loop(slow_send, ["k"], [("burst", 0.5, 100.0)], 1000, os.getpid(), max_outstanding=5))
    assert len(rows) == 50 and peak[0] == 5
    assert 0 < sum(r["status"] == 0 for r in rows) < 50  # due while 5 were unanswered: recorded, not sent
    assert {r["phase"] for r in rows} == {"burst"} and all("sent_s" in r and "lag_ms" in r for r in rows)


def test_every_scenario_serves_with_the_load_tests_limits():
    cfg = ServeBenchConfig(max_batch=4, max_wait_ms=7.0, max_queue=9, latency_target_ms=300.0, lam_max=0.3,
                           kernels="eager", threads=1)
    spec = engine_spec("store", "b.pt", "s.pt", None, cfg)
    assert (spec.kernels, spec.config.batch_size, spec.config.torch_threads, spec.config.resolution) == (
        "eager", 4, 1, None)
    sustainable, fixed, adaptive = serve_config(cfg), *(serve_config(cfg, name) for name in SCENARIOS)
    for c in (sustainable, fixed, adaptive):
        assert (c.max_batch, c.max_wait_ms, c.max_queue, c.lam) == (4, 7.0, 9, 0.0)
    assert sustainable.latency_target_ms is None and not sustainable.adaptive
    assert fixed.latency_target_ms == 300.0 and not fixed.adaptive
    assert adaptive.latency_target_ms == 300.0 and adaptive.adaptive and adaptive.lam_max == 0.3
    with pytest.raises(ConfigError, match="unknown scenario"):
        serve_config(cfg, "nope")


@pytest.mark.parametrize("bad", [{"overload": 0.0}, {"clients": 0}, {"burst_s": -1.0}])
def test_a_bad_load_test_config_is_refused(bad):
    with pytest.raises(ConfigError):
        ServeBenchConfig(**bad)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-serve")
    return make_store(root, per_class=4), *save_tiny_checkpoints(root)


def test_the_load_generator_drives_the_service_process_and_counts_what_it_answered(checkpoints, tmp_path):
    """The burst's client (aiohttp) against ``python -m dynres.runtime.serve`` on loopback: every request answered
    and counted both sides, the server's memory sampled, and the spec file gone after it stops."""
    store, backbone, scale = checkpoints
    cfg = ServeBenchConfig(kernels="eager", threads=1)
    server = ServiceProcess(engine_spec(str(store.root), str(backbone), str(scale), None, cfg),
                            serve_config(cfg), tmp_path / "serve.log")
    try:
        server.wait_ready()
        classes = {k: store.classes[store.label(k)] for k in store.keys}
        rows, rss = asyncio.run(offer_load(server.url, list(store.keys), classes, [("burst", 1.0, 20.0)], 100,
                                           server.proc.pid))
        metrics = server.metrics()
    finally:
        code = server.stop()
    assert len(rows) == 20 and {r["status"] for r in rows} == {200}
    assert all(r["resolution"] in GRID and isinstance(r["correct"], bool) for r in rows)
    assert server_status_counts(metrics) == {"200": 20}
    assert rss and all(r["rss_mb"] > 0 for r in rss)
    assert code is not None and not server.spec_file.exists()
