"""`dynres serve`: the two-model pipeline as an HTTP service (FastAPI + uvicorn).

A request (an uploaded image or a store key) goes through the same stages as :mod:`dynres.runtime.engine`: decode at the
scale resolution → scale model → chosen resolution → decode at it → backbone. Both models run behind dynamic
batchers (one per resolution for the backbone) that wait at most ``max_wait_ms`` to fill a batch, on one compute
thread; decoding runs in a small thread pool. Admission is bounded: past ``max_queue`` requests in flight the
answer is 503 with Retry-After, never an unbounded wait; with a latency target, so is a request predicted (Little's
law, plus the event loop's own lag: the wait before a request is even read) to miss it. The load-adaptive mode
(paper VIII.a, beyond it): rising delay (queueing plus loop lag) or shedding raises the cost weight λ of the
cost-aware choice (cheaper resolutions, more requests served per second), falling delay lowers it again; every
response says which λ it used.

:func:`run_server` serves an :class:`~dynres.runtime.engine.EngineSpec` with uvicorn; ``python -m
dynres.runtime.serve SPEC.json`` does the same from a file written by :func:`write_server_spec`, so a load test can
start the service in its own process without going through the CLI.
"""


import asyncio
import io
import json
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image

from dynres.errors import BadImageError, ConfigError, DynresError, KeyNotFoundError
from dynres.io.decode import PrefixViews
from dynres.io.store import StoreLike
from dynres.paper import DEFAULT_CROP_SIDE
from dynres.policy.scans import Scans, scans_for
from dynres.runtime.engine import EngineSpec, PipelineConfig, top5
from dynres.runtime.runners import Runner, ScaleStage
from dynres.runtime.scheduling import Batcher, LoadController, LoopLag, Throughput
from dynres.version import __version__


@dataclass(frozen=True)
class ServeConfig:
    """Batching, admission and input limits; ``latency_target_ms`` sheds requests predicted to miss it, and with
    ``adaptive`` drives the load-adaptive λ. ``crop_side`` is the center crop's side ratio."""

    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_queue: int = 32
    retry_after_s: int = 1
    max_bytes: int = 8 << 20
    max_pixels: int = 40_000_000
    crop_side: float = DEFAULT_CROP_SIDE
    resolution: int | None = None  # static mode (no scale model)
    lam: float = 0.0
    latency_target_ms: float | None = None  # shed (503) requests predicted to miss it
    adaptive: bool = False  # load-adaptive λ (needs latency_target_ms)
    lam_max: float = 1.0
    lam_step: float = 0.05
    workers: int = 2
    decode_once: bool = True  # one decode per prefix, views resized from it (False: each view decoded; see Engine)

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queue < 1 or self.workers < 1 or self.max_wait_ms < 0:
            raise ConfigError("serve", "max_batch, max_queue, workers must be >= 1 and max_wait_ms >= 0")
        if self.adaptive and not self.latency_target_ms:
            raise ConfigError("serve", "the load-adaptive λ needs a latency target")
        if not 0 < self.crop_side <= 1:
            raise ConfigError("serve", f"crop_side (a side ratio) must be in (0, 1], got {self.crop_side}")


class Rejected(Exception):
    """A request the service answers with an HTTP error: ``status`` and the reason."""

    def __init__(self, status: int, reason: str, headers: dict | None = None):
        super().__init__(reason)
        self.status, self.reason, self.headers = status, reason, headers or {}


def check_upload(data: bytes, max_bytes: int, max_pixels: int, name: str = "upload") -> None:
    """413 too large / too many pixels, 415 not an image, 400 empty or truncated; reads only the header."""
    if not data:
        raise Rejected(400, f"{name}: empty body")
    if len(data) > max_bytes:
        raise Rejected(413, f"{name}: {len(data)} bytes is more than the limit of {max_bytes}")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise Rejected(413, f"{name}: too many pixels ({err})") from None
    except Exception as err:  # Pillow raises several unrelated types for non-images
        raise Rejected(415, f"{name}: not an image Pillow can read ({type(err).__name__})") from None
    w, h = img.size
    if w * h > max_pixels:
        raise Rejected(413, f"{name}: {w}x{h} = {w * h} pixels is more than the limit of {max_pixels}")
    if img.format == "JPEG":
        from dynres.io.jpeg import parse_scans

        try:  # every scan and the end-of-image marker present; bytes after it (a motion photo's video) are not
            parse_scans(data, name)  # the image's, as a viewer ignores them
        except BadImageError as err:
            raise Rejected(400, str(err)) from None
    if img.format != "JPEG":
        try:
            img.verify()  # PNG and friends: checks chunk CRCs and completeness without decoding
        except Exception as err:
            raise Rejected(400, f"{name}: truncated or corrupt {img.format}: {err}") from None


class Service:
    """The models, their batchers, admission control and counters; :func:`create_app` puts HTTP around it."""

    def __init__(self, backbone: Runner, classes: Sequence[str], *, scale: ScaleStage | None = None,
                 store: StoreLike | None = None, policy: Scans = None, config: ServeConfig = ServeConfig()):
        if scale is None and config.resolution is None:
            raise ConfigError("serve", "no scale model: give a static resolution")
        self.backbone, self.classes, self.scale, self.store, self.policy = backbone, tuple(classes), scale, store, policy
        self.config = config
        # one decode per prefix serves every view: large enough for the largest resolution this service runs
        # (None: exact views, each decoded at its own DCT scale)
        self.short_side = (max(scale.grid if scale is not None else (config.resolution,)) / config.crop_side
                           if config.decode_once else None)
        self.controller = (LoadController(config.latency_target_ms, config.lam, config.lam_max, config.lam_step)
                           if config.adaptive else None)
        self.inflight = 0
        self.loop_lag = LoopLag()
        self._lag_task: asyncio.Task | None = None
        self.throughput = Throughput()
        self.compute = ThreadPoolExecutor(1, thread_name_prefix="dynres-compute")
        self.decoders = ThreadPoolExecutor(config.workers, thread_name_prefix="dynres-decode")
        self._batchers: dict[object, Batcher] = {}
        self.metrics = Metrics()

    def predicted_wait_ms(self) -> float:
        """What a request admitted now would wait, by Little's law (see :class:`Throughput`)."""
        return self.throughput.predicted_wait_ms(self.inflight, time.perf_counter())

    @property
    def lam(self) -> float:
        return self.controller.lam if self.controller else self.config.lam

    def _batcher(self, name: object) -> Batcher:
        """The batcher of ``name`` ("scale" or a resolution) on the running event loop: a batcher's queue and task
        belong to the loop that made them, so one from an earlier loop (an app started again, a test client per
        request) is replaced, not awaited forever."""
        old = self._batchers.get(name)
        if old is None or old.task.done() or old.task.get_loop() is not asyncio.get_running_loop():
            wait = self.config.max_wait_ms / 1e3
            if name == "scale":
                def fn(images: list[torch.Tensor]) -> list:
                    lam = self.lam
                    chosen, _ = self.scale.choose(torch.stack(images), lam)
                    return [(r, lam) for r in chosen]
            else:
                def fn(images: list[torch.Tensor], r: int = name) -> list:
                    idx, probs = top5(self.backbone(torch.stack(images), r))
                    return list(zip(idx, probs))
            self._batchers[name] = Batcher(fn, self.config.max_batch, wait, self.compute)
        return self._batchers[name]

    def close(self) -> None:
        if self._lag_task is not None:
            self._lag_task.cancel()
        for b in self._batchers.values():
            b.task.cancel()
        self._batchers.clear()
        self.compute.shutdown(wait=False, cancel_futures=True)
        self.decoders.shutdown(wait=False, cancel_futures=True)

    async def predict(self, *, data: bytes | None = None, key: str | None = None) -> dict:
        """One prediction: admission, validation, scale stage, backbone stage. Raises :class:`Rejected`."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        if self._lag_task is None or self._lag_task.get_loop() is not loop:  # first request (on this loop)
            self._lag_task = loop.create_task(self.loop_lag.run())
        wait = self.loop_lag.ms + self.predicted_wait_ms()  # what a request admitted now would wait
        # past the queue bound, or predicted to miss the latency target: shed it now instead
        full = self.inflight >= cfg.max_queue or bool(cfg.latency_target_ms and wait > 0.8 * cfg.latency_target_ms)
        if self.controller is not None:  # a shed request says the service is at its limit: a full target's delay
            self.controller.observe(cfg.latency_target_ms if full else wait)
        if full:
            self.metrics.count(503)
            raise Rejected(503, f"queue full ({self.inflight} requests in flight); retry later",
                           {"Retry-After": str(cfg.retry_after_s)})
        self.inflight += 1
        self.metrics.queue_depth.set(self.inflight)
        t0 = time.perf_counter()
        try:
            out = await self._predict(data, key, t0)
        except Rejected as err:
            self.metrics.count(err.status)
            raise
        except Exception:  # a bug or a broken store: FastAPI answers 500, the metrics still see it
            self.metrics.count(500)
            raise
        finally:
            self.inflight -= 1
            self.metrics.queue_depth.set(self.inflight)
        self.throughput.add(time.perf_counter())
        self.metrics.observe(out)
        return out

    async def _predict(self, data: bytes | None, key: str | None, t0: float) -> dict:
        cfg, loop = self.config, asyncio.get_running_loop()
        queued = 0.0
        if key is not None:
            if self.store is None:
                raise Rejected(400, "this service has no store: upload an image instead")
            if key not in self.store:
                raise Rejected(404, f"{key}: not in the store")
            source = _StoreSource(self.store, key, self.policy, self.short_side)
        else:
            await loop.run_in_executor(self.decoders, check_upload, data, cfg.max_bytes, cfg.max_pixels)
            source = _BytesSource(data, self.short_side)
        lam = None
        try:
            if self.scale is not None:
                small = await loop.run_in_executor(self.decoders, source.decode, self.scale.scans,
                                                   self.scale.resolution, cfg.crop_side)
                (resolution, lam), wait = await self._batcher("scale").submit(small)
                queued += wait
            else:
                resolution = cfg.resolution
            image = await loop.run_in_executor(self.decoders, source.decode, None, resolution, cfg.crop_side)
        except (BadImageError, KeyNotFoundError) as err:
            raise Rejected(400, str(err)) from None
        (idx, probs), wait = await self._batcher(resolution).submit(image)
        queued += wait
        total = (time.perf_counter() - t0) * 1e3
        return {
            "key": key,
            "top5": [{"label": self.classes[i] if i < len(self.classes) else str(i), "prob": p}
                     for i, p in zip(idx, probs)],
            "resolution": resolution,
            "lam": lam,
            "bytes_read": source.bytes_read,
            "file_bytes": source.file_bytes,
            "timings_ms": {"queued": queued * 1e3, "total": total, "loop_lag": self.loop_lag.ms},
        }


class _BytesSource:
    """An uploaded image: everything is already in hand; its views share one decode (see :class:`PrefixViews`)."""

    def __init__(self, data: bytes, short_side: float | None):
        self.bytes_read = self.file_bytes = len(data)
        self.views = PrefixViews(data, short_side, "upload")

    def decode(self, scans: int | None, resolution: int, crop_side: float) -> torch.Tensor:
        return self.views.view(resolution, crop_side)


class _StoreSource:
    """A stored image: the scale prefix first, later only the missing range; counts what it fetched. The views of
    the scans in hand share one decode (see :class:`PrefixViews`)."""

    def __init__(self, store: StoreLike, key: str, policy: Scans, short_side: float | None):
        self.store, self.key, self.policy, self.short_side = store, key, policy, short_side
        self.file_bytes, self.bytes_read = store.size(key), 0
        self.have, self.views = 0, None

    def decode(self, scans: int | None, resolution: int, crop_side: float) -> torch.Tensor:
        total = self.store.num_scans(self.key)
        if scans is None:
            scans = scans_for(self.policy, self.key, resolution)
        want = total if scans is None else max(1, min(int(scans), total))
        if want > self.have:
            data = self.store.read(self.key, None if want >= total else want)
            self.have, self.views = want, PrefixViews(data, self.short_side, self.key)
        self.bytes_read = self.store.prefix_size(self.key, self.have)
        return self.views.view(resolution, crop_side)


class Metrics:
    """Prometheus counters on a private registry (several services in one process stay apart)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dynres_requests", "Requests by HTTP status.", ["status"], registry=r)
        self.latency = Histogram("dynres_request_latency_seconds", "Latency of answered predictions.", registry=r,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.bytes = Counter("dynres_bytes_read", "Image bytes read or received.", registry=r)
        self.resolution = Counter("dynres_resolution", "Predictions by chosen resolution.", ["resolution"],
                                  registry=r)
        self.queue_depth = Gauge("dynres_queue_depth", "Requests in flight.", registry=r)
        self.lam = Gauge("dynres_lambda", "Cost weight of the latest choice.", registry=r)
        self.loop_lag = Gauge("dynres_event_loop_lag_seconds", "Smoothed lateness of the event loop: the wait "
                              "before a request is even read.", registry=r)

    def count(self, status: int) -> None:
        self.requests.labels(str(status)).inc()

    def observe(self, out: dict) -> None:
        self.count(200)
        self.latency.observe(out["timings_ms"]["total"] / 1e3)
        self.bytes.inc(out["bytes_read"])
        self.resolution.labels(str(out["resolution"])).inc()
        if out["lam"] is not None:
            self.lam.set(out["lam"])

    def render(self, loop_lag_ms: float = 0.0) -> bytes:
        from prometheus_client import generate_latest

        self.loop_lag.set(loop_lag_ms / 1e3)
        return generate_latest(self.registry)


def _api_models() -> tuple[type, type, type]:
    """The response, key-request and error schemas of the OpenAPI document."""
    from pydantic import BaseModel, Field

    class ClassProb(BaseModel):
        label: str
        prob: float

    class Prediction(BaseModel):
        key: str | None = Field(None, description="The store key, for key requests.")
        top5: list[ClassProb]
        resolution: int = Field(description="The resolution the backbone ran at.")
        lam: float | None = Field(None, description="Cost weight λ of the cost-aware choice (None: static).")
        bytes_read: int
        file_bytes: int
        timings_ms: dict[str, float]

    class KeyRequest(BaseModel):
        key: str = Field(min_length=1, max_length=4096)

    class Error(BaseModel):
        detail: str

    return Prediction, KeyRequest, Error


ERROR_STATUSES = {400: "Empty, truncated or corrupt image", 404: "Unknown store key", 413: "Too many bytes or pixels",
                  415: "Not an image", 503: "Queue full: retry after Retry-After"}


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``limit`` bytes, declared (Content-Length, refused before any
    byte is read) or not (a chunked upload, counted as it arrives and refused once past the limit, before the form
    parser has spooled it all to disk)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        from starlette.exceptions import HTTPException
        from starlette.responses import JSONResponse

        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"").decode("latin-1")
        if length.isdigit() and int(length) > self.limit:
            reply = JSONResponse({"detail": f"body of {length} bytes is more than the limit of {self.limit}"}, 413)
            return await reply(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b"")) if message["type"] == "http.request" else 0
            if seen > self.limit:  # raised inside the route's body parsing: the app answers it as a 413
                raise HTTPException(413, f"body of more than {self.limit} bytes is more than the limit")
            return message

        await self.app(scope, counted, send)


def create_app(service: Service):
    """The FastAPI app: ``POST /predict`` (multipart upload), ``POST /predict/key``, ``/healthz``, ``/metrics``."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, File, Request, UploadFile
    from fastapi.responses import JSONResponse, Response

    Prediction, KeyRequest, Error = _api_models()
    errors = {code: {"model": Error, "description": text} for code, text in ERROR_STATUSES.items()}

    @asynccontextmanager
    async def lifespan(app):
        yield
        service.close()

    app = FastAPI(title="dynres", version=__version__, lifespan=lifespan,
                  description="Dynamic-resolution CNN inference: the scale model picks the resolution per image.")
    limit = service.config.max_bytes

    app.add_middleware(BodyLimit, limit=limit + 65536)  # multipart framing allowance

    @app.exception_handler(Rejected)
    async def rejected(request: Request, err: Rejected):
        return JSONResponse({"detail": err.reason}, err.status, headers=err.headers)

    @app.post("/predict", response_model=Prediction, responses=errors)
    async def predict_upload(file: UploadFile = File(..., description="A JPEG, PNG or other Pillow image.")):
        data = await file.read(limit + 1)
        return await service.predict(data=data)

    @app.post("/predict/key", response_model=Prediction, responses=errors)
    async def predict_key(body: KeyRequest):
        return await service.predict(key=body.key)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "queue_depth": service.inflight, "lam": service.lam,
                "loop_lag_ms": service.loop_lag.ms}

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(service.metrics.render(service.loop_lag.ms), media_type="text/plain; version=0.0.4")

    return app


def build_service(spec: EngineSpec, config: ServeConfig = ServeConfig()) -> Service:
    """A :class:`Service` from an :class:`~dynres.runtime.engine.EngineSpec` (paths of store, checkpoints, policy)."""
    from dynres.runtime.engine import build_engine

    engine = build_engine(spec)
    return Service(engine.backbone, engine.classes, scale=engine.scale, store=engine.store, policy=engine.policy,
                   config=config)


def run_server(spec: EngineSpec, config: ServeConfig, host: str, port: int) -> None:
    """Serve ``spec`` over HTTP on ``host:port`` until stopped (uvicorn; its own log at warning level)."""
    import uvicorn

    uvicorn.run(create_app(build_service(spec, config)), host=host, port=port, log_level="warning")


def write_server_spec(path: str | Path, spec: EngineSpec, config: ServeConfig, host: str, port: int) -> Path:
    """What :func:`run_server` needs, as JSON: the file ``python -m dynres.runtime.serve`` reads."""
    path = Path(path)
    path.write_text(json.dumps({"spec": asdict(spec), "serve": asdict(config), "host": host, "port": port}, indent=2))
    return path


def read_server_spec(path: str | Path) -> tuple[EngineSpec, ServeConfig, str, int]:
    """The arguments of :func:`run_server` from a file written by :func:`write_server_spec`."""
    try:
        raw = json.loads(Path(path).read_text())
        spec = EngineSpec(**{**raw["spec"], "config": PipelineConfig(**raw["spec"]["config"])})
        return spec, ServeConfig(**raw["serve"]), str(raw["host"]), int(raw["port"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(str(path), f"not a server spec: {type(err).__name__}: {err}") from None


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m dynres.runtime.serve SPEC.json``: serve what the file says; a dynres error is one line."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        raise SystemExit("usage: python -m dynres.runtime.serve SPEC.json")
    try:
        run_server(*read_server_spec(args[0]))
    except DynresError as err:
        raise SystemExit(f"dynres serve: {err}") from None


if __name__ == "__main__":
    main()
