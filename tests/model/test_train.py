"""Training: determinism, resume, shard split, held-out labels, the scale model chain (tiny models, tiny data)."""

import json
from dataclasses import replace

import pyarrow.parquet as pq
import pytest
import torch

from dynres.errors import ConfigError
from dynres.model.checkpoint import load_checkpoint
from dynres.model.train import LR_DEFAULTS, WD_DEFAULTS, TrainConfig, data_hash, train_backbone
from dynres.study.scale import ScaleConfig, auc, fold_dir, label_stats, multi_hot, shard_split, train_scale
from tiny_store import MemoryStore

TINY = TrainConfig(resolution=32, epochs=2, batch_size=8, seed=3)


def _weights(path):
    model, _ = load_checkpoint(path)
    return model.state_dict()


def test_training_is_deterministic_and_writes_metadata(tmp_path):
    store = MemoryStore(per_class=4)
    a = train_backbone(store, tmp_path / "a", TINY, progress=False)
    b = train_backbone(store, tmp_path / "b", TINY, progress=False)
    for (name, wa), wb in zip(_weights(a).items(), _weights(b).values()):
        assert torch.equal(wa, wb), name
    meta = json.loads((tmp_path / "a" / "model.json").read_text())
    assert meta["arch"] == "resnet_tiny" and meta["classes"] == store.classes
    assert meta["train_resolution"] == 32 and meta["epochs_done"] == 2
    assert meta["recipe"]["optimizer"] == "adamw" and meta["data_hash"] == data_hash(store, store.keys)
    log = json.loads((tmp_path / "a" / "train_log.json").read_text())
    assert [h["epoch"] for h in log["history"]] == [1, 2]


def test_rerunning_a_finished_training_returns_the_same_weights(tmp_path):
    store = MemoryStore(per_class=4)
    first = _weights(train_backbone(store, tmp_path, TINY, progress=False))
    again = _weights(train_backbone(store, tmp_path, TINY, progress=False))
    assert all(torch.equal(x, y) for x, y in zip(first.values(), again.values()))


def test_resume_continues_from_the_last_epoch(tmp_path, monkeypatch):
    store = MemoryStore(per_class=4)
    sgd = TrainConfig(**{**TINY.__dict__, "optimizer": "sgd", "lr": 0.05})  # momentum state must resume too
    reference = train_backbone(store, tmp_path / "ref", sgd, progress=False)
    import dynres.model.train as train_mod

    calls = {"n": 0}
    real_save = train_mod.save_checkpoint

    def crash_after_first_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_save(*args, **kwargs)

    monkeypatch.setattr(train_mod, "save_checkpoint", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_backbone(store, tmp_path / "run", sgd, progress=False)
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    assert torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)["epoch"] == 1
    resumed = train_backbone(store, tmp_path / "run", sgd, progress=False)
    for (name, x), y in zip(_weights(reference).items(), _weights(resumed).values()):
        assert torch.allclose(x, y, atol=1e-6), name


def test_the_data_hash_follows_the_stored_bytes_not_only_the_keys():
    from tiny_store import make_jpeg

    a, b = MemoryStore(per_class=2), MemoryStore(per_class=2)
    assert data_hash(a, a.keys) == data_hash(b, b.keys)
    b.put(b.keys[0], make_jpeg(0, 99), b.label(b.keys[0]))  # re-ingested: same key and label, other image
    assert data_hash(a, a.keys) != data_hash(b, b.keys)


def test_bad_recipe_is_rejected():
    with pytest.raises(ConfigError, match="optimizer"):
        train_backbone(MemoryStore(per_class=1), "unused", TrainConfig(optimizer="lbfgs"), progress=False)


def test_a_recipe_is_checked_when_it_is_made():
    with pytest.raises(ConfigError, match="optimizer"):
        TrainConfig(optimizer="lbfgs")
    with pytest.raises(ConfigError, match="resolution"):
        TrainConfig(resolution=8)
    with pytest.raises(ConfigError, match="crop_scale"):
        replace(TINY, crop_scale=(0.5, 0.25))


def test_the_learning_rate_defaults_per_optimizer_and_is_recorded_as_a_number():
    assert TrainConfig().lr == LR_DEFAULTS["adamw"] and TrainConfig(optimizer="sgd").lr == LR_DEFAULTS["sgd"]
    assert TrainConfig(optimizer="sgd", lr=0.05).lr == 0.05
    assert replace(TrainConfig(), epochs=3).lr == LR_DEFAULTS["adamw"]  # a resolved recipe keeps its number


def test_weight_decay_defaults_per_optimizer():
    """AdamW's decoupled 0.05 would be a huge L2 term under SGD (it trained a fine-tuned backbone to chance)."""
    assert TrainConfig().weight_decay == WD_DEFAULTS["adamw"] == 0.05
    assert TrainConfig(optimizer="sgd").weight_decay == WD_DEFAULTS["sgd"] < 1e-3
    assert TrainConfig(optimizer="sgd", weight_decay=1e-4).weight_decay == 1e-4
    with pytest.raises(ConfigError, match="weight_decay >= 0"):
        TrainConfig(weight_decay=-1.0)


def test_shards_are_disjoint_stratified_and_cover_train():
    store = MemoryStore(per_class=7)
    shards = shard_split(store, store.keys, folds=4, seed=1)
    flat = [k for s in shards for k in s]
    assert sorted(flat) == sorted(store.keys) and len(flat) == len(set(flat))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    for s in shards:  # every class in every shard (7 per class >= 4 shards)
        assert {store.label(k) for k in s} == {0, 1, 2}
    assert shards == shard_split(store, store.keys, folds=4, seed=1)


def test_labels_come_only_from_a_backbone_that_did_not_see_the_sample(tmp_path):
    store = MemoryStore(per_class=4)
    cfg = ScaleConfig(folds=2, backbone=TrainConfig(resolution=32, epochs=1, batch_size=8), grid=(16, 32, 48),
                      crops=(0.25, 1.0), epochs=1, batch_size=8, holdout=0.25)
    result = train_scale(store, tmp_path, cfg, progress=False)
    labels = pq.read_table(tmp_path / "scale_labels.parquet").to_pylist()
    assert {(r["key"], r["crop"], r["resolution"]) for r in labels} == {
        (k, c, r) for k in store.keys for c in (0.25, 1.0) for r in (16, 32, 48)}
    shards = shard_split(store, store.keys, 2, cfg.seed)
    for fold in (0, 1):
        trained_on = [k for i, s in enumerate(shards) if i != fold for k in s]
        _, meta = load_checkpoint(tmp_path / f"fold{fold}" / "model.pt")
        assert meta.data_hash == data_hash(store, trained_on)  # the fold backbone saw exactly these keys
        labelled = {r["key"] for r in labels if r["fold"] == fold}
        assert labelled == set(shards[fold]) and not labelled & set(trained_on)
    scale, meta = load_checkpoint(result["scale_model"])
    assert meta.task == "scale" and meta.grid == (16, 32, 48) and meta.train_resolution == 16
    assert scale(torch.rand(1, 3, 16, 16)).shape == (1, 3)
    assert [row["resolution"] for row in result["auc"]] == [16, 32, 48]
    assert (tmp_path / "scale.md").read_text().count("|") > 10


def test_cheap_option_trains_one_shard_backbone(tmp_path):
    store = MemoryStore(per_class=4)
    cfg = ScaleConfig(folds=4, cheap=True, backbone=TrainConfig(resolution=32, epochs=1, batch_size=8),
                      grid=(16, 32), crops=(1.0,), epochs=1, batch_size=8, holdout=0.0)
    result = train_scale(store, tmp_path, cfg, progress=False)
    assert result["folds"] == 1 and not (tmp_path / "fold1").exists()
    assert result["labelled_images"] == len(shard_split(store, store.keys, 4, 0)[0])


def test_shard_backbones_can_train_for_fewer_epochs_than_the_backbone(tmp_path):
    store = MemoryStore(per_class=4)
    cfg = ScaleConfig(folds=2, cheap=True, backbone=TrainConfig(resolution=32, epochs=3, batch_size=8),
                      shard_epochs=1, grid=(16, 32), crops=(1.0,), epochs=1, batch_size=8, holdout=0.0)
    train_scale(store, tmp_path, cfg, progress=False)
    log = json.loads((fold_dir(tmp_path, 0, 0) / "train_log.json").read_text())
    assert log["recipe"]["epochs"] == 1 and len(log["history"]) == 1
    with pytest.raises(ConfigError, match="shard_epochs"):
        train_scale(store, tmp_path, replace(cfg, shard_epochs=0), progress=False)


def test_new_labels_at_the_same_path_retrain_the_scale_model(tmp_path):
    import pyarrow.compute as pc

    store = MemoryStore(per_class=4)
    first = ScaleConfig(folds=2, cheap=True, backbone=TrainConfig(resolution=32, epochs=1, batch_size=8),
                        grid=(16, 32), crops=(1.0,), epochs=1, batch_size=8, holdout=0.0)
    train_scale(store, tmp_path / "a", first, progress=False)
    labels = tmp_path / "labels.parquet"
    table = pq.read_table(tmp_path / "a" / "scale_labels.parquet")
    pq.write_table(table, labels)
    cfg = ScaleConfig(labels=str(labels), epochs=1, batch_size=8, holdout=0.0)
    before = _weights(train_scale(store, tmp_path / "b", cfg, progress=False)["scale_model"])
    flipped = table.set_column(table.column_names.index("correct"), "correct", pc.invert(table.column("correct")))
    pq.write_table(flipped, labels)  # same path, other labels: the finished model must not be reused
    after = _weights(train_scale(store, tmp_path / "b", cfg, progress=False)["scale_model"])
    fresh = _weights(train_scale(store, tmp_path / "c", cfg, progress=False)["scale_model"])
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(after[k], fresh[k]) for k in after)


def test_existing_labels_retrain_only_the_scale_model(tmp_path):
    import pyarrow as pa

    store = MemoryStore(per_class=4)
    first = ScaleConfig(folds=2, cheap=True, backbone=TrainConfig(resolution=32, epochs=1, batch_size=8),
                        grid=(16, 32), crops=(0.5, 1.0), epochs=1, batch_size=8, holdout=0.0)
    train_scale(store, tmp_path / "a", first, progress=False)
    labels = tmp_path / "a" / "scale_labels.parquet"
    again = ScaleConfig(labels=str(labels), grid=(8, 99), crops=(0.1,), epochs=1, batch_size=8, holdout=0.0)
    result = train_scale(store, tmp_path / "b", again, progress=False)
    assert not (tmp_path / "b" / "fold0").exists() and result["backbones"] == []
    assert result["grid"] == [16, 32] and result["crops"] == [0.5, 1.0]  # the labels' own, not the config's
    assert load_checkpoint(result["scale_model"])[1].grid == (16, 32) and result["labels"] == str(labels)

    pq.write_table(pa.table({"key": ["nope"], "crop": [1.0], "resolution": [16], "correct": [True]}),
                   tmp_path / "bad.parquet")
    with pytest.raises(ConfigError, match="not in the store"):
        train_scale(store, tmp_path / "c", replace(again, labels=str(tmp_path / "bad.parquet")), progress=False)


def test_label_statistics_and_auc():
    import numpy as np
    import pyarrow as pa

    table = pa.table({"key": ["a", "a", "b", "b"], "crop": [1.0] * 4, "resolution": [16, 32, 16, 32],
                      "correct": [False, True, True, True]})
    targets = multi_hot(table, (16, 32))
    assert targets[("a", 1.0)].tolist() == [0.0, 1.0]
    twice = pa.concat_tables([table, table.set_column(3, "correct", pa.array([True, True, False, True]))])
    assert multi_hot(twice, (16, 32))[("a", 1.0)].tolist() == [0.5, 1.0]  # two splits' labels: their mean
    assert multi_hot(twice, (16, 32))[("b", 1.0)].tolist() == [0.5, 1.0]
    stats = label_stats(targets, (16, 32), (1.0,))[0]
    assert stats["all_correct"] == 50.0 and stats["p@32"] == 100.0 and stats["mean_correct"] == 1.5
    assert auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert auc(np.array([0.1, 0.2]), np.array([1, 1])) is None


def test_scale_model_trunk_starts_from_the_given_weights(tmp_path):
    from dynres.model.nets import build_backbone

    source = build_backbone("mobilenet_v2_tiny", 5)  # a classifier: its head does not fit the scale grid
    torch.save(source.state_dict(), tmp_path / "init.pt")
    store = MemoryStore(per_class=4)
    cfg = ScaleConfig(folds=2, cheap=True, backbone=TrainConfig(resolution=32, epochs=1, batch_size=8),
                      grid=(16, 32), crops=(1.0,), epochs=1, batch_size=8, holdout=0.0, lr=0.0,
                      init=str(tmp_path / "init.pt"))
    result = train_scale(store, tmp_path / "run", cfg, progress=False)
    scale, meta = load_checkpoint(result["scale_model"])
    assert torch.equal(scale.net.features[0][0].weight, source.features[0][0].weight)  # lr 0: still the init
    assert scale.net.classifier[-1].out_features == 2 == len(meta.grid)


def test_the_image_cache_decodes_in_threads_but_keeps_each_key_its_own_image():
    from dynres.io.decode import decode_short_side
    from dynres.model.train import ImageCache

    store = MemoryStore(per_class=4)
    cache = ImageCache.build(store, store.keys, 40, progress=False)
    assert list(cache.images) == list(store.keys)
    for key in store.keys:
        assert torch.equal(cache.images[key], decode_short_side(store.read(key), 40, name=key))


def test_repeated_splits_label_every_image_once_per_split_and_the_model_learns_the_mean(tmp_path):
    import numpy as np

    store = MemoryStore(per_class=4)
    cfg = ScaleConfig(folds=2, splits=2, backbone=TrainConfig(resolution=32, epochs=1, batch_size=8), grid=(16, 32),
                      crops=(1.0,), epochs=1, batch_size=8, holdout=0.25)
    result = train_scale(store, tmp_path, cfg, progress=False)
    labels = pq.read_table(tmp_path / "scale_labels.parquet").to_pylist()
    for split in (0, 1):
        shards = shard_split(store, store.keys, 2, cfg.seed + split)
        rows = [r for r in labels if r["split"] == split]
        assert sorted(r["key"] for r in rows if r["resolution"] == 16) == sorted(store.keys)  # once per split
        for fold in (0, 1):
            trained_on = [k for i, s in enumerate(shards) if i != fold for k in s]
            _, meta = load_checkpoint(fold_dir(tmp_path, split, fold) / "model.pt")
            assert meta.data_hash == data_hash(store, trained_on)
            assert not {r["key"] for r in rows if r["fold"] == fold} & set(trained_on)
    assert shard_split(store, store.keys, 2, 0) != shard_split(store, store.keys, 2, 1)  # two different splits
    assert result["splits"] == 2 and len(result["backbones"]) == 4
    mean = multi_hot(pq.read_table(tmp_path / "scale_labels.parquet"), (16, 32))
    for (key, crop), vec in mean.items():  # the mean of the two backbones' answers
        answers = [[r["correct"] for r in labels if r["key"] == key and r["resolution"] == res and r["split"] == s]
                   for res in (16, 32) for s in (0, 1)]
        assert vec.tolist() == [float(np.mean(answers[0] + answers[1])), float(np.mean(answers[2] + answers[3]))]
