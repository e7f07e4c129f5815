"""Kernel backends and the tuner, on a tiny conv net at 32 px: correct or rejected, cached, never a crash.
(The kernels benchmark and its record: tests/bench/test_kernels.py.)"""

import json

import pytest
import torch
from torch import nn

from dynres.errors import BackendError, ConfigError
from dynres.runtime import kernels
from dynres.runtime.backends import BACKENDS, Backend, build_kernel
from dynres.runtime.kernels import TuneConfig, load, tune

RES = 32


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )
    with torch.no_grad():  # non-trivial BN statistics, so folding them wrongly would show
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


def example(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, RES, RES, generator=torch.Generator().manual_seed(1))


def config(tmp_path, backends=("eager", "channels_last"), **kw) -> TuneConfig:
    return TuneConfig(resolutions=(RES,), batch_sizes=(1,), threads=1, warmup=1, runs=3, min_runs=3,
                      backends=tuple(backends), cache_dir=tmp_path / "cache", **kw)


def check_kernel(name: str, tmp_path) -> None:
    """The contract every backend keeps: same logits as eager (rel. err <= 1e-4), input untouched."""
    missing = BACKENDS[name].missing()
    if missing:
        pytest.skip(f"{name}: {missing}")
    net, x = tiny_net(), example()
    ref = net(x).detach()
    before = x.clone()
    kernel = build_kernel(name, net, x, 1, tmp_path / name)
    out = kernel(x)
    assert kernel.backend == name and out.shape == ref.shape and out.dtype == torch.float32
    assert kernels.rel_error(out, ref) <= 1e-4
    assert torch.equal(x, before)


@pytest.mark.parametrize("name", ["eager", "channels_last", "ort", "ort_nospin", "openvino"])
def test_backend_matches_eager(name, tmp_path):
    check_kernel(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["inductor", "inductor_max", "tvm"])
def test_slow_backend_matches_eager(name, tmp_path):
    check_kernel(name, tmp_path)


def test_compiled_artifact_is_reused(tmp_path):
    if BACKENDS["ort"].missing():
        pytest.skip(BACKENDS["ort"].missing())
    net, x = tiny_net(), example()
    build_kernel("ort", net, x, 1, tmp_path)
    onnx = tmp_path / "model.onnx"
    stamp = onnx.stat().st_mtime_ns
    kernel = build_kernel("ort", net, x, 1, tmp_path)  # what load() does: no second export
    assert onnx.stat().st_mtime_ns == stamp
    assert kernels.rel_error(kernel(x), net(x).detach()) <= 1e-4


def test_tune_caches_and_load_returns_the_winner(tmp_path):
    net, cfg = tiny_net(), config(tmp_path)
    first = tune(net, cfg, gemm_peak=100.0, progress=False)
    tuned = [r for r in first if r["backend"] == "tuned"]
    assert len(tuned) == 1 and tuned[0]["chosen"] in ("eager", "channels_last")
    assert {r["backend"] for r in first} == {"eager", "channels_last", "tuned"}
    assert not any(r["cached"] for r in first)
    assert all(r["latency_ms"] > 0 and r["gflops"] > 0 and r["rel_err"] <= 1e-4 for r in first)

    second = tune(net, cfg, gemm_peak=100.0, progress=False)
    assert all(r["cached"] for r in second)
    assert [r["latency_ms"] for r in second] == [r["latency_ms"] for r in first]

    kernel = load(net, RES, 1, 1, cfg.cache_dir)
    assert kernel.backend == tuned[0]["chosen"]
    x = example(1)
    assert kernels.rel_error(kernel(x), net(x).detach()) <= 1e-4


def test_changed_weights_invalidate_the_cache(tmp_path):
    net, cfg = tiny_net(), config(tmp_path)
    tune(net, cfg, gemm_peak=100.0, progress=False)
    with torch.no_grad():
        net[-1].bias.add_(1.0)
    with pytest.warns(UserWarning, match="no tuned kernel"):
        assert load(net, RES, 1, 1, cfg.cache_dir).backend == "eager"
    again = tune(net, cfg, gemm_peak=100.0, progress=False)
    assert not any(r["cached"] for r in again)
    assert len(json.loads((cfg.cache_dir / "index.json").read_text())) == 2


def test_asking_for_more_backends_retunes(tmp_path):
    net = tiny_net()
    tune(net, config(tmp_path, backends=("eager",)), gemm_peak=100.0, progress=False)
    rows = tune(net, config(tmp_path), gemm_peak=100.0, progress=False)
    assert not any(r["cached"] for r in rows) and "channels_last" in {r["backend"] for r in rows}


def test_a_cached_winner_outside_the_backends_asked_for_is_not_reused(tmp_path, monkeypatch):
    def fast(model, example, threads, artifact_dir):
        right = model(example).detach()  # correct and instant: it wins
        return lambda x: right

    _fake(monkeypatch, "fast", fast)
    net = tiny_net()
    first = tune(net, config(tmp_path, backends=("eager", "fast")), gemm_peak=100.0, progress=False)
    assert next(r["chosen"] for r in first if r["backend"] == "tuned") == "fast"
    rows = tune(net, config(tmp_path, backends=("eager",)), gemm_peak=100.0, progress=False)
    assert not any(r["cached"] for r in rows)
    assert next(r["chosen"] for r in rows if r["backend"] == "tuned") == "eager"


def test_an_ort_winner_loads_without_spinning_threads_for_the_engines(tmp_path, monkeypatch):
    built = []

    def fake(tag):
        def build(model, example, threads, artifact_dir):
            built.append(tag)
            right = model(example).detach()  # correct and instant: it wins
            return lambda x: right
        return build

    _fake(monkeypatch, "ort", fake("ort"))
    _fake(monkeypatch, "ort_nospin", fake("ort_nospin"))
    net, cfg = tiny_net(), config(tmp_path, backends=("eager", "ort"))
    tune(net, cfg, gemm_peak=100.0, progress=False)
    assert load(net, RES, 1, 1, cfg.cache_dir).backend == "ort"  # alone on the cores: the timed winner
    assert load(net, RES, 1, 1, cfg.cache_dir, spinning=False).backend == "ort_nospin"  # beside decode threads
    assert built[-2:] == ["ort", "ort_nospin"]


def _fake(monkeypatch, name: str, build, requires=()) -> None:
    monkeypatch.setitem(BACKENDS, name, Backend(name, build, tuple(requires)))


def test_raising_and_missing_backends_are_skipped_with_their_reason(tmp_path, monkeypatch):
    def boom(model, example, threads, artifact_dir):
        raise RuntimeError("compiler exploded")

    _fake(monkeypatch, "boom", boom)
    _fake(monkeypatch, "ghost", boom, requires=("no_such_module_for_dynres",))
    rows = tune(tiny_net(), config(tmp_path, backends=("eager", "boom", "ghost")), gemm_peak=100.0, progress=False)
    by = {r["backend"]: r for r in rows}
    assert by["boom"]["status"] == "failed" and "compiler exploded" in by["boom"]["reason"]
    assert by["ghost"]["status"] == "missing" and "no_such_module_for_dynres" in by["ghost"]["reason"]
    assert by["tuned"]["chosen"] == "eager"


def test_a_fast_but_wrong_backend_is_rejected_and_never_chosen(tmp_path, monkeypatch):
    def liar(model, example, threads, artifact_dir):
        wrong = model(example).detach() * 1.01  # 1% off, and instant: it would win on speed
        return lambda x: wrong

    _fake(monkeypatch, "liar", liar)
    rows = tune(tiny_net(), config(tmp_path, backends=("eager", "liar")), gemm_peak=100.0, progress=False)
    by = {r["backend"]: r for r in rows}
    assert by["liar"]["status"] == "rejected" and by["liar"]["rel_err"] > 1e-4
    assert "tolerance" in by["liar"]["reason"] and by["liar"]["latency_ms"] is None
    assert by["tuned"]["chosen"] == "eager"


def test_unknown_backend_and_bad_grid_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown"):
        config(tmp_path, backends=("eager", "nope"))
    with pytest.raises(BackendError, match="unknown backend"):
        build_kernel("nope", tiny_net(), example(), 1, tmp_path)


def test_cli_tune_a_checkpoint_then_load_its_kernel(tmp_path):
    from typer.testing import CliRunner

    from dynres.cli.app import app
    from dynres.model.checkpoint import ModelMeta, load_checkpoint, save_checkpoint
    from dynres.model.nets import create_model

    path = save_checkpoint(create_model("resnet_tiny", 3), ModelMeta("resnet_tiny", ("a", "b", "c"), RES),
                           tmp_path / "model.pt")
    args = ["tune", str(path), "--resolutions", str(RES), "--backends", "eager,channels_last", "--threads", "1",
            "--runs", "2", "--warmup", "1", "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "out" / "kernels.json").read_text())["rows"]
    chosen = next(r["chosen"] for r in rows if r["backend"] == "tuned")
    assert {r["model"] for r in rows} == {"resnet_tiny"}
    model, _ = load_checkpoint(path)  # a fresh load of the same file hits the cache: the key is the weights
    assert load(model, RES, 1, 1, tmp_path / "c").backend == chosen
