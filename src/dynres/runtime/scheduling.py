"""How the service schedules work: dynamic batchers in front of the models, and the signals that admission control
and the load-adaptive λ go by (Little's law on recent completions, the event loop's lag, the λ controller)."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable


class LoadController:
    """Additive increase / decrease of λ on the smoothed delay a new request would see: above ``high`` x target
    raise it, below ``low`` x target lower it, never outside [lam_min, lam_max]. The service feeds it at every
    admission decision; a shed request counts as a full target's delay, since with a queue bound shedding alone can
    keep the delay of admitted requests low all through a burst, and λ would then never rise (docs/bench-serve.md)."""

    def __init__(self, target_ms: float, lam_min: float = 0.0, lam_max: float = 1.0, step: float = 0.05,
                 high: float = 0.4, low: float = 0.15, smoothing: float = 0.2):
        self.target_ms, self.lam_min, self.lam_max, self.step = target_ms, lam_min, lam_max, step
        self.high, self.low, self.smoothing = high, low, smoothing
        self.lam, self.delay_ms = lam_min, 0.0

    def observe(self, queue_ms: float) -> float:
        self.delay_ms += self.smoothing * (queue_ms - self.delay_ms)
        if self.delay_ms > self.high * self.target_ms:
            self.lam = min(self.lam_max, self.lam + self.step)
        elif self.delay_ms < self.low * self.target_ms:
            self.lam = max(self.lam_min, self.lam - self.step)
        return self.lam


class LoopLag:
    """How late the event loop runs a wake-up due every ``period_s``, smoothed: the wait a request arriving now has
    before its handler even starts (reading and parsing it), which the batchers' queues cannot see, so admission
    adds it to the predicted wait (docs/bench-serve.md). ``clock`` is the time source (seconds)."""

    def __init__(self, period_s: float = 0.02, smoothing: float = 0.2,
                 clock: Callable[[], float] = time.perf_counter):
        self.period_s, self.smoothing, self.clock = period_s, smoothing, clock
        self.ms = 0.0

    def observe(self, late_s: float) -> float:
        """Fold one wake-up's lateness (seconds; early counts as on time) into the smoothed lag (ms)."""
        self.ms += self.smoothing * (max(0.0, late_s * 1e3) - self.ms)
        return self.ms

    async def run(self) -> None:
        while True:
            t = self.clock()
            await asyncio.sleep(self.period_s)
            self.observe(self.clock() - t - self.period_s)


class Throughput:
    """Completion times of the last ``window_s`` seconds, and Little's law on them: the wait a request admitted
    now would see is (requests in flight + 1) / recent completion rate (0 until there are 4 completions)."""

    def __init__(self, window_s: float = 2.0):
        self.window_s = window_s
        self.completed: collections.deque[float] = collections.deque()

    def add(self, t: float) -> None:
        self.completed.append(t)

    def predicted_wait_ms(self, inflight: int, now: float) -> float:
        while self.completed and now - self.completed[0] > self.window_s:
            self.completed.popleft()
        if len(self.completed) < 4:
            return 0.0
        rate = len(self.completed) / max(now - self.completed[0], 1e-3)
        return 1e3 * (inflight + 1) / rate


class Batcher:
    """Collects single items into batches of at most ``max_batch``, waiting at most ``max_wait_s`` after the first,
    and runs ``fn(list) -> list`` on ``executor``. ``await submit(x)`` gives ``(result, seconds queued)``."""

    def __init__(self, fn: Callable[[list], list], max_batch: int, max_wait_s: float, executor):
        self.fn, self.max_batch, self.max_wait_s, self.executor = fn, max_batch, max_wait_s, executor
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def submit(self, item):
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((item, future, time.perf_counter()))
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = batch[0][2] + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self.executor, self.fn, [b[0] for b in batch])
            except Exception as err:  # one failing batch fails its requests, not the service
                for _, fut, _ in batch:
                    if not fut.done():
                        fut.set_exception(err)
                continue
            for (_, fut, t0), res in zip(batch, results):
                if not fut.done():
                    fut.set_result((res, started - t0))
