"""The scale model's configuration: what its own training recipe would refuse is refused before any shard
backbone trains."""

import pytest

from dynres.errors import ConfigError
from dynres.model.train import TrainConfig
from dynres.study.scale import ScaleConfig


@pytest.mark.parametrize("bad, setting", [
    ({"optimizer": "lion"}, "optimizer"), ({"resolution": 8}, "grid"), ({"grid": (8, 16)}, "grid"),
    ({"folds": 1}, "folds"), ({"holdout": 0.5}, "holdout"),
])
def test_a_scale_config_refuses_bad_settings_when_built(bad, setting):
    with pytest.raises(ConfigError, match=setting):
        ScaleConfig(**bad)


def test_a_small_backbone_whose_scaled_grid_goes_below_16_px_is_refused():
    with pytest.raises(ConfigError, match="grid"):
        ScaleConfig(backbone=TrainConfig(resolution=24))  # the paper's ratios around 24 px start at 12 px


def test_the_default_scale_config_labels_the_papers_ratios_around_the_backbone():
    assert ScaleConfig(backbone=TrainConfig(resolution=112)).label_grid == (56, 84, 112, 140, 168, 196, 224)
