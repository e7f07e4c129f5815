"""The tuning flags as a TuneConfig: backend keywords, ranges, the cache directory."""

from dynres.cli.runtime import tune_config
from dynres.runtime.backends import BACKENDS
from dynres.runtime.kernels import TuneConfig, default_backends


def flags(backends: str, cache_dir=None) -> TuneConfig:
    return tune_config("112..224:56", "1,4", 1, backends, 2, 1, 1e-4, 0, cache_dir)


def test_backend_keywords_and_lists(tmp_path):
    assert flags("default").backends == default_backends() == flags("").backends
    assert flags("all").backends == tuple(BACKENDS)
    assert flags("eager, channels_last").backends == ("eager", "channels_last")
    cfg = flags("eager", tmp_path)
    assert cfg.resolutions == (112, 168, 224) and cfg.batch_sizes == (1, 4) and cfg.cache_dir == tmp_path
    assert flags("eager").cache_dir == TuneConfig().cache_dir


def test_serve_takes_the_crop_side_its_default_the_serve_configs(monkeypatch):
    """`dynres serve --crop` reaches ServeConfig.crop_side (what the service crops with) and the engine spec, as
    serving.json's serve lines say."""
    from typer.testing import CliRunner

    from dynres.cli.app import app
    from dynres.runtime import serve as serve_module

    calls = []
    monkeypatch.setattr(serve_module, "run_server", lambda spec, cfg, host, port: calls.append((spec, cfg)))
    for extra, side in (([], serve_module.ServeConfig.crop_side), (["--crop", "0.866"], 0.866)):
        result = CliRunner().invoke(app, ["serve", "--model", "m.pt", "--resolution", "112", *extra])
        assert result.exit_code == 0, result.output
        spec, cfg = calls.pop()
        assert cfg.crop_side == spec.config.crop_side == side
