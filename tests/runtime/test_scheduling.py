"""The service's scheduling parts on their own: batches fill up to their bound, Little's law predicts the wait, the
loop-lag probe measures lateness against its clock, and the controller moves λ with the delay."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from dynres.runtime.scheduling import Batcher, LoadController, LoopLag, Throughput


def test_load_controller_raises_lambda_under_delay_and_lowers_it_after():
    ctl = LoadController(target_ms=100, lam_max=0.5, step=0.1)
    for _ in range(20):
        ctl.observe(90.0)
    assert ctl.lam == pytest.approx(0.5)
    for _ in range(40):
        ctl.observe(1.0)
    assert ctl.lam == 0.0


class SteppingClock:
    """A clock that advances ``step`` seconds each time it is read: every wake-up of the probe looks that late."""

    def __init__(self, step: float):
        self.step, self.now = step, 0.0

    def __call__(self) -> float:
        self.now += self.step
        return self.now


@pytest.mark.parametrize("late_s, smoothing", [(0.2, 1.0), (0.0, 1.0), (0.05, 0.5)])
def test_loop_lag_measures_how_late_each_wake_up_runs(late_s, smoothing):
    """The probe's reading is the lateness its clock shows (0.2 s late: 200 ms), whatever the real loop did."""
    period = 0.001

    async def main() -> float:
        lag = LoopLag(period_s=period, smoothing=smoothing, clock=SteppingClock(period + late_s))
        task = asyncio.get_running_loop().create_task(lag.run())
        while lag.clock.now < 40 * (period + late_s):  # enough wake-ups for the smoothing to settle
            await asyncio.sleep(0)
        task.cancel()
        return lag.ms

    assert asyncio.run(main()) == pytest.approx(late_s * 1e3, abs=0.01)


def test_loop_lag_smooths_and_counts_an_early_wake_up_as_on_time():
    lag = LoopLag(smoothing=0.5)
    assert lag.observe(0.1) == pytest.approx(50.0)
    assert lag.observe(0.1) == pytest.approx(75.0)
    assert lag.observe(-0.5) == pytest.approx(37.5)  # early: 0 ms late, not negative


def test_throughput_predicts_the_wait_by_littles_law_over_its_window():
    rate = Throughput(window_s=2.0)
    for i in range(3):
        rate.add(10.0 + 0.1 * i)
    assert rate.predicted_wait_ms(inflight=5, now=10.3) == 0.0  # fewer than 4 completions: no rate to go by
    rate.add(10.3)
    # 4 completions over the 0.5 s since the first: 8 per second, so 6 requests ahead of a new one wait 750 ms
    assert rate.predicted_wait_ms(inflight=5, now=10.5) == pytest.approx(750.0)
    assert rate.predicted_wait_ms(inflight=5, now=20.0) == 0.0  # all older than the window: forgotten
    assert len(rate.completed) == 0


def test_batcher_fills_batches_up_to_its_bound_and_answers_in_order():
    calls = []

    def double(items: list[int]) -> list[int]:
        calls.append(list(items))
        return [2 * x for x in items]

    async def main():
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher(double, max_batch=3, max_wait_s=5.0, executor=pool)
            answers = await asyncio.gather(*(batcher.submit(x) for x in range(6)))
            batcher.task.cancel()
        return answers

    answers = asyncio.run(main())
    assert [value for value, _ in answers] == [2 * x for x in range(6)]
    assert all(queued >= 0 for _, queued in answers)
    assert calls == [[0, 1, 2], [3, 4, 5]]  # full batches run at once, without waiting out max_wait_s


def test_a_failing_batch_fails_its_requests_and_the_batcher_goes_on():
    def fn(items: list[int]) -> list[int]:
        if 0 in items:
            raise ValueError("bad batch")
        return items

    async def main():
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher(fn, max_batch=1, max_wait_s=0.0, executor=pool)
            with pytest.raises(ValueError, match="bad batch"):
                await batcher.submit(0)
            answer, _ = await batcher.submit(5)
            batcher.task.cancel()
        return answer

    assert asyncio.run(main()) == 5
