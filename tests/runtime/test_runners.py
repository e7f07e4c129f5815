"""Runners: the tuned-kernel runner cuts batches down its ladder of tuned sizes and answers like eager PyTorch; the
choice rule trades p(right) against cost."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dynres.errors import ConfigError
from dynres.runtime import kernels
from dynres.runtime.runners import EagerRunner, KernelRunner, ScaleStage, choose, make_runner
from pipeline_fixtures import tiny_classifier


@pytest.fixture
def built(monkeypatch):
    """Replace the tuned kernels with the model itself, checking each is called with its own batch size; returns
    the (resolution, batch) of every kernel built, and the batch size of every call."""
    record = {"built": [], "calls": []}

    def load(model, resolution, batch=1, threads=2, cache_dir=None, spinning=True):
        record["built"].append((resolution, batch))

        def kernel(x):
            record["calls"].append(x.shape[0])
            assert x.shape[0] == batch, f"a batch of {x.shape[0]} on a kernel tuned for {batch}"
            return model(x)
        return kernel

    monkeypatch.setattr(kernels, "load", load)
    return record


def test_kernel_runner_cuts_and_pads_batches_like_eager(built):
    model = tiny_classifier()
    x = torch.randint(0, 255, (7, 3, 32, 32), dtype=torch.uint8)
    runner = KernelRunner(model, batch=3, batches=(3, 1))
    assert torch.allclose(runner(x, 32), EagerRunner(model)(x, 32), atol=1e-5)
    assert built["calls"] == [3, 3, 1]  # 7 = 3 + 3 + 1: a remainder of 1 is not padded to 3
    x = torch.randint(0, 255, (5, 3, 32, 32), dtype=torch.uint8)
    built["calls"].clear()
    assert torch.allclose(runner(x, 32), EagerRunner(model)(x, 32), atol=1e-5)
    assert built["calls"] == [3, 3]  # 5 = 3 + 2, and 2 of 3 is padded to a batch of 3


def test_kernel_runner_cuts_a_batch_down_the_ladder_of_tuned_sizes(built, tmp_path):
    model = tiny_classifier()
    runner = KernelRunner(model, batch=16, cache_dir=tmp_path)  # nothing tuned: the default ladder
    assert runner.ladder(32) == (16, 4, 1)
    x = torch.randint(0, 255, (23, 3, 32, 32), dtype=torch.uint8)
    assert torch.allclose(runner(x, 32), EagerRunner(model)(x, 32), atol=1e-5)
    assert built["calls"] == [16, 4, 4]  # 23 = 16 + 4 + 3 (padded to 4); never seven batch-1 calls
    runner.warm([32, 48])
    assert sorted(built["built"]) == sorted((r, b) for r in (32, 48) for b in (16, 4, 1))  # each built once


def test_kernel_runner_uses_the_batch_sizes_the_cache_holds(monkeypatch, tmp_path):
    from dynres.runtime.kernels import TuneConfig, tune

    model = tiny_classifier()
    tune(model, TuneConfig(resolutions=(32,), batch_sizes=(1, 4), threads=1, runs=2, min_runs=1,
                           backends=("eager",), cache_dir=tmp_path), gemm_peak=1.0, progress=False)
    loaded, real_load = [], kernels.load

    def load(model, resolution, batch=1, *args, **kwargs):
        loaded.append((resolution, batch))
        return real_load(model, resolution, batch, *args, **kwargs)

    monkeypatch.setattr(kernels, "load", load)
    runner = KernelRunner(model, batch=8, threads=1, cache_dir=tmp_path)  # a service allowing batches of 8
    assert runner.ladder(32) == (4, 1)  # the tuned sizes, not an untuned 8
    assert runner.ladder(48) == (8, 4, 1)  # nothing tuned at 48 px: the default ladder
    x = torch.randint(0, 255, (9, 3, 32, 32), dtype=torch.uint8)
    assert torch.allclose(runner(x, 32), EagerRunner(model)(x, 32), atol=1e-5)
    assert set(loaded) == {(32, 4), (32, 1)}


def test_the_choice_rule_trades_p_right_against_cost():
    probs = np.array([[0.80, 0.85, 0.90], [0.1, 0.2, 0.9]])
    cost = np.array([1.0, 2.0, 4.0])
    assert choose(probs, cost, None).tolist() == [2, 2]  # argmax p
    assert choose(probs, cost, 0.0).tolist() == [2, 2]
    assert choose(probs, cost, 0.5).tolist() == [0, 2]  # p - 0.5 x cost / max cost


def test_a_bias_moves_the_choice_and_a_large_one_is_a_static_resolution():
    probs = np.array([[0.80, 0.85, 0.90], [0.1, 0.2, 0.9], [0.5, 0.1, 0.1]])
    cost = np.array([1.0, 2.0, 4.0])
    assert choose(probs, cost, 0.5, np.zeros(3)).tolist() == choose(probs, cost, 0.5).tolist()  # b = 0: today's
    assert choose(probs, cost, None, [0.0, 0.1, 0.0]).tolist() == [1, 2, 0]  # +0.1 at the middle resolution
    assert choose(probs, cost, 0.5, [0.0, 5.0, 0.0]).tolist() == [1, 1, 1]  # larger than any p difference: static


def test_the_scale_stage_applies_its_bias():
    logits = torch.tensor([[0.0, 0.2, 0.1], [2.0, 0.0, 0.0]])
    runner = lambda images, resolution: logits  # noqa: E731 - a scale model with fixed answers
    plain = ScaleStage(runner, 16, (16, 32, 64), (1.0, 4.0, 16.0))
    assert plain.choose(torch.zeros(2, 3, 16, 16), 0.0)[0] == [32, 16]
    biased = ScaleStage(runner, 16, (16, 32, 64), (1.0, 4.0, 16.0), bias=(0.0, 0.0, 1.0))
    assert biased.choose(torch.zeros(2, 3, 16, 16), 0.0)[0] == [64, 64]
    with pytest.raises(ConfigError, match="one value per grid resolution"):
        ScaleStage(runner, 16, (16, 32, 64), (1.0, 4.0, 16.0), bias=(0.0, 1.0))


def test_an_unknown_kernel_choice_is_a_clear_error():
    assert isinstance(make_runner(tiny_classifier(), "eager"), EagerRunner)
    with pytest.raises(ConfigError, match="unknown kernel choice"):
        make_runner(tiny_classifier(), "fastest")
