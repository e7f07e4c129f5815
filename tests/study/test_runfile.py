"""study.runfile: the run file of `dynres run` (TOML or YAML) mapped onto the settings dataclasses."""

import json
from pathlib import Path

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
    assert cfg.chain.dynamic.recalibrate  # the default
    (tmp_path / "off.toml").write_text('data = "data"\nout = "o"\n[dynamic]\nrecalibrate = false\n')
    assert not load_study_config(tmp_path / "off.toml").chain.dynamic.recalibrate


def test_a_top_level_seed_is_recorded_as_the_files_where_it_flows(tmp_path):
    """``seed`` seeds the backbone and the scale model too: those settings come from the file, not the preset."""
    from dynres.study.summary import study_settings

    _data(tmp_path)
    (tmp_path / "run.toml").write_text('data = "data"\nout = "out"\nseed = 3\n')
    cfg = load_study_config(tmp_path / "run.toml")
    rows = {r["setting"]: r for r in study_settings(cfg)["rows"]}
    assert cfg.chain.backbone.seed == cfg.chain.scale.seed == 3
    assert {rows[k]["source"] for k in ("seed", "backbone.seed", "scale.seed")} == {"file"}
    (tmp_path / "run.toml").write_text('data = "data"\nout = "out"\n')
    rows = {r["setting"]: r for r in study_settings(load_study_config(tmp_path / "run.toml"))["rows"]}
    assert rows["backbone.seed"]["source"] == "default"


def test_file_paths_in_sections_are_relative_to_the_run_file_wherever_it_is_run_from(tmp_path, monkeypatch):
    _data(tmp_path)
    (tmp_path / "run.TOML").write_text('data = "data"\nout = "o"\n[backbone]\ninit = "weights/b.pt"\n'
                                       '[scale]\nlabels = "old/scale_labels.parquet"\n'
                                       '[dynamic]\ncost_table = {56 = 1.5, 112 = 4}\n')
    monkeypatch.chdir(tmp_path / "data")  # elsewhere than the run file
    cfg = load_study_config(tmp_path / "run.TOML")  # the suffix in any case is TOML
    assert cfg.chain.backbone.init == str((tmp_path / "weights" / "b.pt").resolve())
    assert cfg.chain.scale.labels == str((tmp_path / "old" / "scale_labels.parquet").resolve())
    assert cfg.chain.dynamic.cost_table == {56: 1.5, 112: 4.0}  # TOML's keys are strings; resolutions are ints


def test_an_int_given_for_a_float_setting_is_that_float(tmp_path):
    """``lr = 1`` and ``lr = 1.0`` are one setting: the same value, so the same stage key."""
    from dynres.study.chain import chain_settings

    _data(tmp_path)
    keys = []
    for lr in ("1", "1.0"):
        (tmp_path / "run.toml").write_text(f'data = "data"\nout = "o"\n[backbone]\nlr = {lr}\nepochs = 3\n')
        cfg = load_study_config(tmp_path / "run.toml")
        assert type(cfg.chain.backbone.lr) is float and type(cfg.chain.backbone.epochs) is int
        keys.append(chain_settings(cfg.chain))
    assert keys[0] == keys[1]


def test_yaml_works_too(tmp_path):
    _data(tmp_path)
    (tmp_path / "run.yaml").write_text("data: data\nout: out\nscale:\n  folds: 3\n")
    assert load_study_config(tmp_path / "run.yaml").chain.scale.folds == 3
    (tmp_path / "twice.yaml").write_text("data: data\nout: out\nbackbone:\n  epochs: 10\n  epochs: 30\n")
    with pytest.raises(ConfigError, match="epochs given twice"):  # as TOML refuses it, not the last one silently
        load_study_config(tmp_path / "twice.yaml")


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
    ('data = "data"\nout = "o"\n[scale]\ntarget = "best"\n', "recalibrate = false"),
    ('data = "data"\nout = "o"\n[dynamic]\nrecalibrate = "yes"\n', "dynamic.recalibrate must be bool"),
    # top-level settings are checked, not converted: "false" is not false, 1.9 is not a seed
    ('data = "data"\nout = "o"\nquick = "false"\n', "quick must be bool"),
    ('data = "data"\nout = "o"\nseed = 1.9\n', "seed must be int >= 0"),
    ('data = "data"\nout = "o"\nworkers = -3\n', "workers must be int >= 0"),
    ('data = "data"\nout = "o"\nio_repeats = 0\n', "io_repeats must be int >= 1"),
    ('data = 5\nout = "o"\n', "data must be str"),
    ('data = "data"\nout = "o"\n[dynamic]\ncost_table = {a = "x"}\n', "cost_table must map resolutions"),
    ('data = "data"\nout = "o"\n[backbone]\narch = "resnet_huge"\n', "unknown architecture 'resnet_huge'"),
    ('data = "data"\nout = "o"\n[eval]\nbackend = "tvm"\n', "unknown evaluation backend 'tvm'"),
])
def test_bad_run_configs_fail_naming_the_file_and_the_setting(tmp_path, text, message):
    _data(tmp_path)
    (tmp_path / "run.toml").write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        load_study_config(tmp_path / "run.toml")
    assert "run.toml" in str(err.value)


def test_folds_means_folds_unless_the_file_itself_says_cheap(tmp_path):
    """`folds = K` trains K shard backbones for a user's data: the preset used to set `cheap` silently (issue 18)."""
    _data(tmp_path)
    (tmp_path / "run.toml").write_text('data = "data"\nout = "o"\n[scale]\nfolds = 3\n')
    cfg = load_study_config(tmp_path / "run.toml")
    assert cfg.chain.scale.folds == 3 and not cfg.chain.scale.cheap
    assert cfg.file_settings == ("data", "out", "scale.folds")
    (tmp_path / "run.toml").write_text('data = "data"\nout = "o"\nquick = true\n')
    assert not load_study_config(tmp_path / "run.toml").chain.scale.cheap  # nor does `quick`
    (tmp_path / "run.toml").write_text('data = "data"\nout = "o"\n[scale]\ncheap = true\n')
    assert load_study_config(tmp_path / "run.toml").chain.scale.cheap


def test_a_file_that_switches_the_optimizer_gets_that_optimizers_defaults_and_is_told(tmp_path):
    """The preset's lr / weight decay are chosen for AdamW: a file that says only ``optimizer = "sgd"`` must not
    run SGD with them (AdamW's weight decay under SGD trained a backbone to chance), and the settings say so."""
    from dynres.model.train import LR_DEFAULTS, WD_DEFAULTS
    from dynres.study.summary import study_settings

    _data(tmp_path)
    (tmp_path / "run.toml").write_text('data = "data"\nout = "o"\n[backbone]\noptimizer = "sgd"\n')
    cfg = load_study_config(tmp_path / "run.toml")
    assert cfg.chain.backbone.lr == LR_DEFAULTS["sgd"] and cfg.chain.backbone.weight_decay == WD_DEFAULTS["sgd"]
    assert cfg.chain.scale.backbone == cfg.chain.backbone  # the shard backbones too
    (warning,) = [w for w in study_settings(cfg)["warnings"] if "optimizer" in w]
    assert "backbone.lr = 0.1" in warning and "backbone.weight_decay = 5e-05" in warning
    (tmp_path / "run.toml").write_text('data = "data"\nout = "o"\n[backbone]\noptimizer = "sgd"\nlr = 0.05\n'
                                       'weight_decay = 1e-4\n')
    cfg = load_study_config(tmp_path / "run.toml")  # what the file sets is what runs, and nothing to say
    assert (cfg.chain.backbone.lr, cfg.chain.backbone.weight_decay) == (0.05, 1e-4)
    assert not [w for w in study_settings(cfg)["warnings"] if "optimizer" in w]
    (tmp_path / "run.toml").write_text('data = "data"\nout = "o"\n[backbone]\nweight_decay = 0.01\n')
    assert load_study_config(tmp_path / "run.toml").chain.backbone.lr == 0.01  # same optimizer: the preset's lr


def test_a_scale_optimizer_switch_without_its_lr_and_weight_decay_is_refused(tmp_path):
    """The scale model's defaults were measured with AdamW only: there is no SGD default to fall back on."""
    _data(tmp_path)
    (tmp_path / "run.toml").write_text('data = "data"\nout = "o"\n[scale]\noptimizer = "sgd"\nlr = 0.1\n')
    with pytest.raises(ConfigError, match=r"needs scale\.weight_decay set too.*are for adamw"):
        load_study_config(tmp_path / "run.toml")
    (tmp_path / "run.toml").write_text('data = "data"\nout = "o"\n[scale]\noptimizer = "sgd"\nlr = 0.1\n'
                                       'weight_decay = 1e-4\n')
    assert load_study_config(tmp_path / "run.toml").chain.scale.optimizer == "sgd"


@pytest.mark.parametrize("moot", ["folds = 3", "cheap = true", "splits = 2", "shard_epochs = 1", "crops = [1.0]"])
def test_settings_that_reused_labels_would_ignore_are_refused_by_name(tmp_path, moot):
    _data(tmp_path)
    (tmp_path / "run.toml").write_text(f'data = "data"\nout = "o"\n[scale]\nlabels = "l.parquet"\n{moot}\n')
    with pytest.raises(ConfigError, match=rf"scale\.{moot.split()[0]} would be ignored"):
        load_study_config(tmp_path / "run.toml")


def test_a_run_files_folds_train_that_many_shard_backbones(tmp_path):
    """End to end on tiny data: the chain a run file describes trains exactly `folds` shard backbones."""
    from dynres.study.chain import run_accuracy_chain
    from tiny_store import MemoryStore

    _data(tmp_path)
    (tmp_path / "run.toml").write_text(
        'data = "data"\nout = "o"\n[backbone]\nresolution = 32\nepochs = 1\nbatch_size = 8\n'
        '[scale]\nfolds = 3\nepochs = 1\nbatch_size = 8\ncrops = [1.0]\n[eval]\ngrid = [24, 32]\ncrops = [1.0]\n')
    chain = load_study_config(tmp_path / "run.toml").chain
    result = run_accuracy_chain(MemoryStore(per_class=3), MemoryStore(per_class=2, offset=50), tmp_path / "acc",
                                chain, progress=False)
    shards = sorted(p.parent.name for p in (tmp_path / "acc" / "scale").glob("fold*/model.pt"))
    assert shards == ["fold0", "fold1", "fold2"]
    assert json.loads(Path(result["scale"]).read_text())["folds"] == 3
