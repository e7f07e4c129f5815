"""The service answers like the models do, rejects bad uploads with the right status, and sheds load with 503."""

from __future__ import annotations

import asyncio
import io
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from dynres.io.decode import crop_resize, decode_scaled
from dynres.model.nets import to_input
from dynres.runtime.runners import EagerRunner, choose
from dynres.runtime.serve import Rejected, ServeConfig, Service, create_app
from pipeline_fixtures import GRID, SCALE_RES, StepPolicy, make_store, tiny_classifier, tiny_scale

CLASSES = ("cat", "dog")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("serve"))


def jpeg(size=(120, 90), level=128) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (level, level // 2, 200)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def noisy_jpeg() -> bytes:
    buf = io.BytesIO()
    arr = np.random.default_rng(0).integers(0, 255, (200, 240, 3), dtype=np.uint8)
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def client(store=None, **config) -> TestClient:
    """An app around the tiny models; ``config`` goes to ServeConfig."""
    service = Service(EagerRunner(tiny_classifier()), CLASSES, scale=tiny_scale(), store=store, policy=StepPolicy(),
                      config=ServeConfig(**config))
    return TestClient(create_app(service))


def expected(data: bytes, scans=None) -> tuple[int, list[str]]:
    once = decode_scaled(data, max(GRID) / ServeConfig().crop_side)  # one decode; both views are resizes of it
    small = crop_resize(once, SCALE_RES)
    with torch.inference_mode():
        probs = torch.sigmoid(tiny_scale().runner.model(to_input(small[None]))).numpy()
    r = GRID[int(choose(probs, np.array(tiny_scale().costs), 0.0)[0])]
    with torch.inference_mode():
        logits = tiny_classifier()(to_input(crop_resize(once, r)[None]))[0]
    return r, [CLASSES[i] for i in logits.softmax(0).topk(2).indices.tolist()]


def test_an_upload_gets_the_models_answer():
    data = jpeg()
    with client() as c:
        res = c.post("/predict", files={"file": ("a.jpg", data, "image/jpeg")})
    assert res.status_code == 200, res.text
    body = res.json()
    r, labels = expected(data)
    assert body["resolution"] == r and [t["label"] for t in body["top5"]] == labels
    assert body["bytes_read"] == body["file_bytes"] == len(data) and body["lam"] == 0.0
    assert body["timings_ms"]["total"] > 0


@pytest.mark.parametrize("trailer", [b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4, b"\xff" * 64])
def test_bytes_after_the_end_of_image_are_ignored_as_a_viewer_does(trailer):
    """A phone's motion photo (a video after the JPEG) or 0xFF padding: the picture is complete, so it is answered."""
    data = jpeg()
    with client() as c:
        res = c.post("/predict", files={"file": ("a.jpg", data + trailer, "image/jpeg")})
    assert res.status_code == 200, res.text
    assert res.json()["resolution"] == expected(data)[0]


def test_requests_on_a_new_event_loop_are_answered_not_left_waiting():
    """Without ``with``, the test client runs each request on an event loop of its own, as a service started
    again would: the second request must not wait on the first loop's batchers."""
    import threading

    data, app, answers = jpeg(), client(), []

    def two_requests():
        answers.extend(app.post("/predict", files={"file": ("a.jpg", data, "image/jpeg")}).status_code
                       for _ in range(2))

    worker = threading.Thread(target=two_requests, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert answers == [200, 200]


def test_exact_views_decode_each_view_like_decode():
    from dynres.io.decode import decode

    buf = io.BytesIO()  # textured and large enough for DCT scaling, so the two kinds of views differ
    Image.fromarray(np.random.default_rng(1).integers(150, 255, (300, 400, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    assert not torch.equal(decode(data, SCALE_RES), crop_resize(decode_scaled(data, max(GRID) / 0.875), SCALE_RES))
    service = Service(EagerRunner(tiny_classifier()), CLASSES, scale=tiny_scale(),
                      config=ServeConfig(decode_once=False))
    with TestClient(create_app(service)) as c:
        body = c.post("/predict", files={"file": ("a.jpg", data, "image/jpeg")}).json()
    small = decode(data, SCALE_RES)
    with torch.inference_mode():
        probs = torch.sigmoid(tiny_scale().runner.model(to_input(small[None]))).numpy()
        r = GRID[int(choose(probs, np.array(tiny_scale().costs), 0.0)[0])]
        logits = tiny_classifier()(to_input(decode(data, r)[None]))[0]
    assert body["resolution"] == r == SCALE_RES  # bright: the tiny scale model picks 32 px, where the views differ
    assert [t["prob"] for t in body["top5"]] == pytest.approx(logits.softmax(0).topk(2).values.tolist(), abs=1e-6)


def test_a_store_key_reads_only_the_policys_prefix(store):
    key = store.keys[3]
    store.reset_stats()
    with client(store) as c:
        body = c.post("/predict/key", json={"key": key}).json()
    want = max(tiny_scale().scans, StepPolicy().scans(key, body["resolution"]))
    assert body["bytes_read"] == store.prefix_size(key, want) == store.bytes_read
    assert body["bytes_read"] < body["file_bytes"] == store.size(key)
    r, labels = expected(store.read(key, tiny_scale().scans))
    assert body["resolution"] == r


@pytest.mark.parametrize("payload, config, status, reason", [
    (b"", {}, 400, "empty"),
    (b"this is plain text, not an image", {}, 415, "not an image"),
    (noisy_jpeg()[:6000], {}, 400, "truncated"),
    (jpeg(), {"max_bytes": 100}, 413, "limit"),
    (jpeg((400, 300)), {"max_pixels": 10_000}, 413, "pixels"),
])
def test_bad_uploads_get_the_right_status_and_reason(payload, config, status, reason):
    with client(**config) as c:
        res = c.post("/predict", files={"file": ("x.jpg", payload, "image/jpeg")})
    assert res.status_code == status
    assert reason in res.json()["detail"]


def test_a_body_without_a_declared_length_is_still_held_to_the_limit():
    """A chunked upload carries no Content-Length, and is still refused (through this client the whole body arrives
    at once; that it is refused while arriving, not after, is the ASGI-level test below)."""
    def chunked():  # a generator body: sent without Content-Length
        yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
        yield b"Content-Type: image/jpeg\r\n\r\n"
        for _ in range(32):
            yield b"\0" * 65536
        yield b"\r\n--x--\r\n"

    with client(max_bytes=100_000) as c:
        res = c.post("/predict", content=chunked(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert res.status_code == 413 and "limit" in res.json()["detail"]


def test_the_body_limit_stops_reading_once_past_it():
    """At the ASGI level: a body that arrives in pieces is refused at the piece that crosses the limit, before
    the rest is read (the form parser would otherwise spool it all to disk first)."""
    import asyncio

    from starlette.exceptions import HTTPException

    from dynres.runtime.serve import BodyLimit

    pieces = []

    async def receive():
        pieces.append(65536)
        return {"type": "http.request", "body": b"\0" * 65536, "more_body": len(pieces) < 32}

    async def form_parser(scope, receive, send):  # reads to the end, as a multipart parser does
        while (await receive()).get("more_body"):
            pass

    scope = {"type": "http", "headers": [(b"content-type", b"multipart/form-data; boundary=x")]}
    with pytest.raises(HTTPException) as refused:
        asyncio.run(BodyLimit(form_parser, 100_000)(scope, receive, None))
    assert refused.value.status_code == 413 and sum(pieces) == 2 * 65536


def test_unknown_key_is_404_and_keys_need_a_store(store):
    with client(store) as c:
        assert c.post("/predict/key", json={"key": "nope/0"}).status_code == 404
    with client() as c:
        assert c.post("/predict/key", json={"key": "cat/0"}).status_code == 400


class BlockingRunner(EagerRunner):
    """A backbone that waits for the test to release it, so requests pile up."""

    def __init__(self, model):
        super().__init__(model)
        self.release = threading.Event()

    def __call__(self, images, resolution):
        self.release.wait(10)
        return super().__call__(images, resolution)


def test_a_full_queue_answers_503_with_retry_after_and_the_rest_complete():
    runner = BlockingRunner(tiny_classifier())
    service = Service(runner, CLASSES, config=ServeConfig(resolution=32, max_queue=2, retry_after_s=3))
    app = create_app(service)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            files = {"file": ("a.jpg", jpeg(), "image/jpeg")}
            first = [asyncio.create_task(c.post("/predict", files=files)) for _ in range(2)]
            while service.inflight < 2:
                await asyncio.sleep(0.01)
            shed = await asyncio.gather(*(c.post("/predict", files=files) for _ in range(3)))
            metrics = (await c.get("/metrics")).text
            runner.release.set()
            return await asyncio.gather(*first), shed, metrics

    done, shed, metrics = asyncio.run(scenario())
    service.close()
    assert [r.status_code for r in done] == [200, 200]
    assert [r.status_code for r in shed] == [503] * 3
    assert all(r.headers["retry-after"] == "3" for r in shed)
    assert 'dynres_requests_total{status="503"} 3.0' in metrics
    assert "dynres_queue_depth 2.0" in metrics


def test_metrics_and_health_after_traffic():
    with client() as c:
        for level in (30, 220):
            c.post("/predict", files={"file": ("a.jpg", jpeg(level=level), "image/jpeg")})
        c.post("/predict", files={"file": ("a.jpg", b"junk", "image/jpeg")})
        health = c.get("/healthz").json()
        text = c.get("/metrics").text
    assert health["status"] == "ok" and health["queue_depth"] == 0 and health["loop_lag_ms"] >= 0
    assert 'dynres_requests_total{status="200"} 2.0' in text
    assert "dynres_event_loop_lag_seconds " in text
    assert 'dynres_requests_total{status="415"} 1.0' in text
    assert "dynres_request_latency_seconds_bucket" in text and "dynres_bytes_read_total" in text
    assert "dynres_resolution_total{resolution=" in text


def test_a_latency_target_sheds_requests_predicted_to_miss_it():
    service = Service(EagerRunner(tiny_classifier()), CLASSES, config=ServeConfig(resolution=32, latency_target_ms=50))
    now = time.perf_counter()
    for i in range(10):  # 10 req/s: 100 ms per request
        service.throughput.add(now - 1.0 + 0.1 * i)
    assert service.predicted_wait_ms() > 50

    async def one():
        return await service.predict(data=jpeg())

    with pytest.raises(Rejected) as err:
        asyncio.run(one())
    service.close()
    assert err.value.status == 503 and err.value.headers["Retry-After"] == "1"


def test_adaptive_service_answers_with_the_lambda_it_used_and_cheaper_resolutions_under_load():
    service = Service(EagerRunner(tiny_classifier()), CLASSES, scale=tiny_scale(),
                      config=ServeConfig(latency_target_ms=1000, adaptive=True))
    app = TestClient(create_app(service))
    dark = {"file": ("d.jpg", jpeg(level=10), "image/jpeg")}
    with app as c:
        calm = c.post("/predict", files=dark).json()
        service.controller.lam = 1.0  # what a sustained queueing delay drives it to
        loaded = c.post("/predict", files=dark).json()
    assert calm["lam"] == 0.0 and loaded["lam"] == pytest.approx(0.95)  # its own calm admission: one step down
    assert loaded["resolution"] < calm["resolution"] == max(GRID)


def test_openapi_spec_documents_the_error_statuses():
    spec = client().app.openapi()
    responses = spec["paths"]["/predict"]["post"]["responses"]
    assert {"200", "400", "413", "415", "503"} <= set(responses)
    assert "/predict/key" in spec["paths"] and "/metrics" in spec["paths"]


@pytest.mark.slow
def test_schemathesis_fuzzes_every_endpoint_without_a_server_error(store):
    """Requests generated from the OpenAPI spec: no 5xx, statuses and bodies as documented. Arbitrary bytes are
    schema-valid uploads that the service rightly rejects (415/400), so that one check is off."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    schema = schemathesis.openapi.from_asgi("/openapi.json", client(store).app)
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=10, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case):
            case.call_and_validate(excluded_checks=[positive_data_acceptance])

        check()


def test_a_lagging_event_loop_sheds_requests_that_would_miss_the_target():
    service = Service(EagerRunner(tiny_classifier()), CLASSES, scale=tiny_scale(),
                      config=ServeConfig(latency_target_ms=100))

    async def one():
        return await service.predict(data=jpeg())

    assert asyncio.run(one())["timings_ms"]["loop_lag"] >= 0
    service.loop_lag.ms = 90.0  # requests already wait 90 ms before they are read: 0.8 x target is 80 ms
    with pytest.raises(Rejected) as err:
        asyncio.run(one())
    service.close()
    assert err.value.status == 503


def test_shedding_raises_lambda_and_calm_traffic_lowers_it_again():
    """A service turning requests away runs cheaper resolutions to serve more of them; calm brings λ back to 0."""
    runner = BlockingRunner(tiny_classifier())
    service = Service(runner, CLASSES, scale=tiny_scale(),
                      config=ServeConfig(max_queue=2, latency_target_ms=1000, adaptive=True, lam_step=0.1))

    async def scenario():
        first = [asyncio.create_task(service.predict(data=jpeg(level=10))) for _ in range(2)]
        while service.inflight < 2:
            await asyncio.sleep(0.01)
        for _ in range(5):  # the queue is full: each of these is shed
            with pytest.raises(Rejected):
                await service.predict(data=jpeg(level=10))
        shedding = service.lam
        runner.release.set()
        await asyncio.gather(*first)
        answers = [await service.predict(data=jpeg(level=10)) for _ in range(20)]
        return shedding, answers

    shedding, answers = asyncio.run(scenario())
    service.close()
    assert shedding >= 0.2  # the smoothed delay crosses the threshold after two shed requests, then steps up
    assert answers[0]["lam"] > 0 and answers[-1]["lam"] == 0.0  # steps down while requests get through quickly


def test_a_server_spec_file_gives_back_what_was_written(tmp_path):
    from dynres.runtime.engine import EngineSpec, PipelineConfig
    from dynres.runtime.serve import read_server_spec, write_server_spec

    spec = EngineSpec("store", "b.pt", "s.pt", "policy.json", "tuned", PipelineConfig(batch_size=8, torch_threads=1,
                                                                                      crop_side=0.75))
    config = ServeConfig(max_batch=8, max_wait_ms=10.0, latency_target_ms=500.0, adaptive=True, lam_max=0.2)
    path = write_server_spec(tmp_path / "serve.json", spec, config, "127.0.0.1", 8123)
    assert read_server_spec(path) == (spec, config, "127.0.0.1", 8123)


@pytest.mark.parametrize("text", ["not json", '{"spec": {}}', '{"spec": {"store": "s", "backbone": "b", "config": '
                                  '{"nope": 1}}, "serve": {}, "host": "h", "port": 1}'])
def test_a_bad_server_spec_is_a_clear_error(tmp_path, text):
    from dynres.errors import ConfigError
    from dynres.runtime.serve import read_server_spec

    (tmp_path / "serve.json").write_text(text)
    with pytest.raises(ConfigError, match="not a server spec"):
        read_server_spec(tmp_path / "serve.json")


def test_the_module_entry_point_wants_one_spec_file_and_says_what_is_wrong_in_one_line(tmp_path):
    from dynres.runtime.serve import main

    with pytest.raises(SystemExit, match="usage"):
        main([])
    (tmp_path / "serve.json").write_text("{}")
    with pytest.raises(SystemExit, match="^dynres serve: .*serve.json: not a server spec"):
        main([str(tmp_path / "serve.json")])


@pytest.mark.parametrize("crop_side", [0.0, 1.5])
def test_a_crop_side_outside_0_1_is_refused(crop_side):
    from dynres.errors import ConfigError

    with pytest.raises(ConfigError, match="crop_side"):
        ServeConfig(crop_side=crop_side)
