"""study.health: a backbone that did not learn the data is named as such, and one that did is not."""

import numpy as np
import pytest
import pyarrow as pa
import pyarrow.parquet as pq

from dynres.study.health import ALPHA, backbone_health, chance_p_value, shard_cells, split_duplicates

GRID = (56, 112, 168)


def guesser(rng, images: int, classes: int, crops=(0.25, 1.0)) -> dict[float, np.ndarray]:
    """Per crop, right or not (images x grid) for a backbone that answers at random."""
    return {c: rng.random((images, len(GRID))) < 1.0 / classes for c in crops}


def learner(rng, images: int, accuracy: float, crops=(0.25, 1.0)) -> dict[float, np.ndarray]:
    return {c: rng.random((images, len(GRID))) < accuracy for c in crops}


def test_the_binomial_tail_separates_a_guesser_from_a_learner():
    assert chance_p_value(30, 300, 10) > 0.4  # exactly chance
    assert chance_p_value(60, 300, 10) < 1e-6  # twice chance on 300 images
    assert chance_p_value(0, 0, 10) == 1.0


def test_a_backbone_at_chance_is_named_with_its_numbers_and_a_learned_one_is_not():
    rng = np.random.default_rng(0)
    flat = backbone_health(guesser(rng, 300, 8), GRID, 8)
    assert flat["backbone"]["at_chance"] and flat["chance"] == 12.5
    (warning,) = flat["warnings"]
    assert "no better than chance" in warning and "of 300 validation images" in warning and "1/8 = 12.5%" in warning
    learned = backbone_health(learner(rng, 300, 0.3), GRID, 8)  # the real-photo runs' weak but real backbone
    assert not learned["backbone"]["at_chance"] and learned["warnings"] == []


def test_the_check_rarely_calls_a_guesser_learned_though_it_takes_the_best_of_many_cells():
    """The best of 4 crops x 3 resolutions is the most favourable cell: the strict level keeps false alarms rare."""
    rng = np.random.default_rng(1)
    crops = (0.25, 0.56, 0.75, 1.0)
    passed = sum(not backbone_health(guesser(rng, 300, 10, crops), GRID, 10)["backbone"]["at_chance"]
                 for _ in range(400))
    assert passed / 400 <= 12 * ALPHA * 2  # Bonferroni over the 12 cells, with room for sampling noise


def test_each_shard_backbone_is_judged_on_the_images_it_labelled(tmp_path):
    rng = np.random.default_rng(2)
    rows = []
    for fold, accuracy in ((0, 0.6), (1, 0.1)):  # fold 1 never learned (chance for 10 classes)
        for i in range(200):
            for crop in (0.5, 1.0):
                for r in GRID:
                    rows.append({"key": f"f{fold}/{i}", "crop": crop, "resolution": r, "fold": fold, "split": 0,
                                 "correct": bool(rng.random() < accuracy)})
    path = tmp_path / "scale_labels.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    cells = shard_cells(path)
    assert [c[2]["fold"] for c in cells] == [0, 1] and all(c[1] == 200 for c in cells)
    health = backbone_health(learner(rng, 300, 0.6), GRID, 10, path)
    assert [s["at_chance"] for s in health["shards"]] == [False, True]
    (warning,) = health["warnings"]
    assert warning.startswith("1 of 2 shard backbones") and "fold 1 " in warning and "noise" in warning
    assert backbone_health(learner(rng, 300, 0.6), GRID, 10, tmp_path / "missing.parquet")["shards"] == []


def test_nothing_evaluated_is_nothing_judged():
    health = backbone_health({1.0: np.zeros((0, len(GRID)), dtype=bool)}, GRID, 10)
    assert health["backbone"] is None and health["warnings"] == []


def test_the_scale_models_auc_is_summarized_beside_the_backbones():
    rng = np.random.default_rng(3)
    health = backbone_health(learner(rng, 100, 0.6), GRID, 10, scale_aucs=[0.6, float("nan"), 0.8])
    assert health["scale_auc"] == {"min": 0.6, "max": 0.8, "mean": pytest.approx(0.7)}
    assert backbone_health(learner(rng, 100, 0.6), GRID, 10)["scale_auc"] is None


class Split:
    """A store's keys and file hashes, all the duplicate check reads."""

    def __init__(self, files: dict[str, str]):
        self.files = files
        self.keys = list(files)

    def sha256(self, key: str) -> str:
        return self.files[key]


def test_validation_images_copied_from_training_are_named_and_a_clean_split_is_not():
    train = Split({"cat/1.jpg": "aa", "cat/2.jpg": "bb", "dog/1.jpg": "cc"})
    leaky = split_duplicates(train, Split({"cat/9.jpg": "bb", "dog/9.jpg": "dd"}))
    assert leaky == {"images": 1, "of": 2, "examples": [{"val": "cat/9.jpg", "train": "cat/2.jpg"}]}
    rng = np.random.default_rng(0)
    warned = backbone_health(learner(rng, 300, 0.6), GRID, 8, duplicates=leaky)["warnings"]
    assert len(warned) == 1 and "1 of 2 validation images" in warned[0]
    assert "val cat/9.jpg = train cat/2.jpg" in warned[0]
    clean = split_duplicates(train, Split({"dog/9.jpg": "dd"}))
    assert clean["images"] == 0 and backbone_health(learner(rng, 300, 0.6), GRID, 8, duplicates=clean)["warnings"] == []
