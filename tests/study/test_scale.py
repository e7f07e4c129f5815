"""The scale model's configuration: what its own training recipe would refuse is refused before any shard
backbone trains."""

import numpy as np
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


def test_an_unknown_target_is_refused():
    with pytest.raises(ConfigError, match="target"):
        ScaleConfig(target="loss")


def _labels(**columns):
    import pyarrow as pa

    base = {"key": ["a", "a", "b", "b"], "crop": [1.0] * 4, "resolution": [16, 32, 16, 32],
            "correct": [True, False, False, True], "true_prob": [0.7, 0.2, 0.4, 0.9],
            "margin": [0.5, -0.6, -0.1, 0.85]}
    return pa.table(base | columns)


def test_each_target_maps_the_held_out_backbones_answer_to_0_1():
    from dynres.study.scale import label_targets

    labels = _labels()
    assert label_targets(labels, (16, 32), "correct")[("a", 1.0)].tolist() == [1.0, 0.0]
    assert label_targets(labels, (16, 32), "prob")[("b", 1.0)].tolist() == pytest.approx([0.4, 0.9])
    margin = label_targets(labels, (16, 32), "margin")
    assert margin[("a", 1.0)].tolist() == pytest.approx([0.75, 0.2])
    # above one half exactly where the backbone was right
    assert [(margin[(k, 1.0)] > 0.5).tolist() for k in "ab"] == [[True, False], [False, True]]


def test_the_best_target_is_one_distribution_over_the_resolutions_the_backbone_got_right():
    """Right at some resolutions: uniform over them; right nowhere: uniform over the grid (no preference)."""
    from dynres.study.scale import label_targets, target_activation

    labels = _labels(key=["a", "a", "b", "b", "c", "c"], crop=[1.0] * 6, resolution=[16, 32] * 3,
                     correct=[True, False, True, True, False, False], true_prob=[0.5] * 6, margin=[0.0] * 6)
    best = label_targets(labels, (16, 32), "best")
    assert [best[(k, 1.0)].tolist() for k in "abc"] == [[1.0, 0.0], [0.5, 0.5], [0.5, 0.5]]
    assert target_activation("best") == "softmax" and target_activation("correct") == "sigmoid"


def test_a_softmax_scale_model_is_read_as_one_by_the_engine_and_the_evaluation(tmp_path):
    """The checkpoint records its softmax, so the runtime's p(r) (runners.ScaleStage) and the study's
    (predict_scale, dynamic.decide) are the same distribution over the grid, summing to one per image."""
    from dynres.io.decode import decode
    from dynres.model.checkpoint import load_checkpoint
    from dynres.runtime.runners import load_scale
    from dynres.study.dynamic import decide
    from dynres.study.scale import train_scale
    from tiny_store import MemoryStore

    store = MemoryStore(per_class=4)
    cfg = ScaleConfig(folds=2, backbone=TrainConfig(resolution=32, epochs=1, batch_size=8), grid=(16, 32),
                      crops=(1.0,), epochs=1, batch_size=8, holdout=0.25, target="best")
    result = train_scale(store, tmp_path, cfg, progress=False)
    model, meta = load_checkpoint(result["scale_model"])
    assert meta.activation == "softmax" and meta.recipe["target"] == "best"
    backbone, _ = load_checkpoint(tmp_path / "fold0" / "model.pt")
    stage = load_scale(result["scale_model"], backbone)
    data = store.read(store.keys[0])
    _, probs = stage.choose(decode(data, meta.train_resolution, 1.0)[None], 0.0)
    assert probs.sum(1) == pytest.approx([1.0], abs=1e-5)
    _, study_probs = decide((model, meta), data, 1.0, 0.0)
    assert study_probs == pytest.approx(probs[0], abs=1e-5)


def test_labels_made_before_a_targets_column_existed_are_refused_by_name():
    from dynres.study.scale import label_targets

    with pytest.raises(ConfigError, match="true_prob"):
        label_targets(_labels().drop_columns(["true_prob"]), (16, 32), "prob")


def test_graded_targets_come_only_from_the_backbone_that_did_not_see_the_image(tmp_path):
    """The probability and margin targets are the ones the row's own shard backbone gives, and that backbone was
    trained without the image: recomputed from each fold's checkpoint on its held-out shard, they match."""
    import pyarrow.parquet as pq

    from dynres.model.checkpoint import load_checkpoint
    from dynres.model.train import data_hash
    from dynres.study.scale import label_targets, shard_split, train_scale
    from dynres.study.static import predict_grid
    from tiny_store import MemoryStore

    store = MemoryStore(per_class=4)
    grid, crops = (16, 32), (0.5, 1.0)
    cfg = ScaleConfig(folds=2, backbone=TrainConfig(resolution=32, epochs=1, batch_size=8), grid=grid, crops=crops,
                      epochs=1, batch_size=8, holdout=0.25, target="margin")
    result = train_scale(store, tmp_path, cfg, progress=False)
    assert result["target"] == "margin"
    assert load_checkpoint(result["scale_model"])[1].recipe["target"] == "margin"
    labels = pq.read_table(tmp_path / "scale_labels.parquet")
    shards = shard_split(store, store.keys, 2, cfg.seed)
    rows = {(r["key"], r["crop"], r["resolution"]): r for r in labels.to_pylist()}
    for fold in (0, 1):
        trained_on = [k for i, s in enumerate(shards) if i != fold for k in s]
        model, meta = load_checkpoint(tmp_path / f"fold{fold}" / "model.pt")
        assert meta.data_hash == data_hash(store, trained_on)
        assert not set(shards[fold]) & set(trained_on)
        again = predict_grid(model, store, shards[fold], grid, crops, progress=False, backend="eager")
        for r in again.to_pylist():
            row = rows[(r["key"], r["crop"], r["resolution"])]
            assert row["fold"] == fold  # labelled by this held-out backbone, and by no other
            assert row["true_prob"] == pytest.approx(r["true_prob"], abs=1e-4)
            assert row["margin"] == pytest.approx(r["margin"], abs=1e-4)
    for row in rows.values():  # the margin is the true class's lead: positive exactly where the backbone is right
        assert (row["margin"] > 0) == row["correct"] and row["true_prob"] <= row["prob"] + 1e-6
    best = label_targets(labels, grid, "best")  # a function of the same held-out backbone's answers
    for (key, crop), dist in best.items():
        right = np.array([rows[(key, crop, r)]["correct"] for r in grid], dtype=float)
        assert dist.tolist() == pytest.approx((right / right.sum() if right.any() else right + 1 / len(grid)).tolist())
    prob = label_targets(labels, grid, "prob")
    key = shards[0][0]
    assert prob[(key, 1.0)].tolist() == pytest.approx([rows[(key, 1.0, r)]["true_prob"] for r in grid])
