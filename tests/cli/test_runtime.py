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
