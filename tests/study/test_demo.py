"""study.demo: the demo's stages (the whole run is `make demo`; here what can be checked in a second)."""

import pytest

from dynres.errors import ConfigError
from dynres.study.demo import StudyConfig, run_study


def test_the_demo_refuses_the_seed_its_shipped_weights_were_trained_on(tmp_path):
    from dynres.io.synth import PRETRAIN_SEED

    with pytest.raises(ConfigError, match="shipped weights"):
        run_study(StudyConfig(out=tmp_path, seed=PRETRAIN_SEED))
    assert not (tmp_path / "data").exists()
