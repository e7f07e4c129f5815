"""study.runfile: the run file of `dynres run` (TOML or YAML) mapped onto the settings dataclasses."""

import pytest

from dynres.errors import ConfigError
from dynres.study.runfile import load_study_config


def _data(tmp_path):
    for split in ("train", "val"):
        (tmp_path / "data" / split).mkdir(parents=True)


def test_run_config_maps_sections_to_the_dataclasses(tmp_path):
    _data(tmp_path)
    (tmp_path / "run.toml").write_text(
        'data = "data"\nout = "runs/mine"\nseed = 3\n'
        '[backbone]\narch = "resnet18"\nresolution = 224\nepochs = 2\ncrop_scale = [0.08, 1.0]\n'
        '[scale]\nshard_epochs = 1\nresolution = 56\n'
        '[eval]\ngrid = [112, 224, 448]\ncrops = [0.25, 1.0]\n'
        '[calibration]\ntarget = 0.1\nsearch_crops = [0.25, 1.0]\n'
    )
    cfg = load_study_config(tmp_path / "run.toml")
    assert cfg.data == (tmp_path / "data").resolve() and cfg.out == (tmp_path / "runs" / "mine").resolve()
    assert cfg.chain.backbone.arch == "resnet18" and cfg.chain.backbone.resolution == 224
    assert cfg.chain.backbone.crop_scale == (0.08, 1.0)
    assert cfg.chain.scale.backbone == cfg.chain.backbone  # shard backbones use the same recipe ...
    assert cfg.chain.scale.shard_backbone.epochs == 1 and cfg.chain.scale.resolution == 56  # ... but their epochs
    assert cfg.chain.eval.grid == (112, 224, 448) and cfg.seed == 3
    assert cfg.calibration.target == 0.1 and cfg.calibration.search_crops == (0.25, 1.0)


def test_yaml_works_too(tmp_path):
    _data(tmp_path)
    (tmp_path / "run.yaml").write_text("data: data\nout: out\nscale:\n  folds: 3\n")
    assert load_study_config(tmp_path / "run.yaml").chain.scale.folds == 3


@pytest.mark.parametrize("text, message", [
    ('data = "data"\nout = "o"\n[backbone]\narchitecture = "x"\n', "unknown setting backbone.architecture"),
    ('data = "data"\nout = "o"\n[backbone]\nepochs = "ten"\n', "backbone.epochs must be int"),
    ('data = "data"\nout = "o"\n[backbone]\nepochs = true\n', "backbone.epochs must be int"),
    ('data = "data"\nout = "o"\n[backbone]\ncrop_scale = [0.3, "x"]\n', r"crop_scale must be tuple\[float, float\]"),
    ('data = "data"\nout = "o"\n[scale]\nshard_epochs = "four"\n', r"scale.shard_epochs must be int \| None"),
    ('data = "data"\nout = "o"\n[scale]\nresolution = 56.5\n', r"scale.resolution must be int \| None"),
    ('data = "data"\nout = "o"\nspeed = 3\n', "unknown setting"),
    ('out = "o"\n', "needs `data`"),
    ('data = "nowhere"\nout = "o"\n', "is not a directory"),
    ('data = "data"\nout = "o"\n[scale]\nfolds = 1\n', "at least 2 shards"),
    ('data = [unclosed\n', "not valid TOML"),
    ('data = "data"\nout = "o"\n[calibration]\nsearch_crops = [0.0]\n', "search_crops"),
    ('data = "data"\nout = "o"\n[backbone]\noptimizer = "rmsprop"\n', r"\[backbone\] optimizer"),
    ('data = "data"\nout = "o"\n[eval]\ncrops = [0.0, 1.0]\n', r"\[eval\] crops"),
    ('data = "data"\nout = "o"\n[scale]\ngrid = [56, 112]\n[eval]\ngrid = [56, 224]\n', "grid .* differ"),
])
def test_bad_run_configs_fail_naming_the_file_and_the_setting(tmp_path, text, message):
    _data(tmp_path)
    (tmp_path / "run.toml").write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        load_study_config(tmp_path / "run.toml")
    assert "run.toml" in str(err.value)
