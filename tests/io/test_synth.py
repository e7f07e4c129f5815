"""The built-in data set: deterministic, a valid ImageFolder, and a sidecar table that describes the files."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from dynres.errors import ConfigError, DynresError
from dynres.io.synth import SynthConfig, render, synth

# Small images keep the tests fast; short sides >= 150 px keep objects above the 12 px floor at the smallest scale.
SMALL = SynthConfig(classes=10, train_per_class=6, val_per_class=2, seed=3, min_size=200, max_size=256,
                    aspect_range=(1.0, 1.33))


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    report = synth(out, SMALL, progress=False)
    assert (report.train, report.val, report.images) == (60, 20, 80)
    return out


def test_same_config_gives_identical_bytes(data, tmp_path):
    synth(tmp_path / "again", SMALL, progress=False)
    assert files(tmp_path / "again") == files(data)


def test_two_workers_write_the_same_bytes_as_one(data, tmp_path):
    synth(tmp_path / "par", SynthConfig(**{**SMALL.__dict__, "workers": 2}), progress=False)
    assert files(tmp_path / "par") == files(data)


def test_another_seed_gives_other_images(data, tmp_path):
    cfg = SynthConfig(**{**SMALL.__dict__, "seed": 4, "classes": 2, "train_per_class": 1, "val_per_class": 0})
    synth(tmp_path / "other", cfg, progress=False)
    assert (tmp_path / "other/train/00_stripes_fine/00000.jpg").read_bytes() != \
        (data / "train/00_stripes_fine/00000.jpg").read_bytes()


def test_layout_is_an_imagefolder(data):
    from torchvision.datasets import ImageFolder

    train, val = ImageFolder(data / "train"), ImageFolder(data / "val")
    assert train.classes == val.classes == SMALL.class_names
    assert train.classes[:2] == ["00_stripes_fine", "01_stripes_coarse"]
    assert (len(train), len(val)) == (60, 20)
    image, label = val[len(val) - 1]
    assert image.mode == "RGB" and label == 9


def test_sidecar_rows_describe_the_files(data):
    table = pq.read_table(data / "objects.parquet").to_pylist()
    jpegs = {str(p.relative_to(data)) for p in data.rglob("*.jpg")}
    assert sorted(r["path"] for r in table) == sorted(jpegs)
    for r in table:
        with Image.open(data / r["path"]) as im:
            assert im.format == "JPEG" and im.size == (r["width"], r["height"])
            assert "progressive" not in im.info  # baseline: the store re-encodes to progressive
        assert r["path"].startswith(f"{r['split']}/{r['class_name']}/")
        assert SMALL.class_names[r["label"]] == r["class_name"]
        assert 0 <= r["box_x0"] < r["box_x1"] <= r["width"]
        assert 0 <= r["box_y0"] < r["box_y1"] <= r["height"]


def test_image_sizes_stay_in_range(data):
    for r in pq.read_table(data / "objects.parquet").to_pylist():
        long_side, short_side = max(r["width"], r["height"]), min(r["width"], r["height"])
        assert SMALL.min_size <= long_side <= SMALL.max_size
        assert 1.0 <= long_side / short_side <= 1.34


def test_object_scales_span_more_than_6x(data):
    scales = pq.read_table(data / "objects.parquet").column("scale").to_pylist()
    assert max(scales) / min(scales) >= 6
    assert 0.05 <= min(scales) and max(scales) <= 0.9


def test_scale_is_the_box_side_over_the_shorter_image_side(data):
    rows = pq.read_table(data / "objects.parquet").to_pylist()
    inside = [r for r in rows if r["box_x0"] > 0 and r["box_y0"] > 0 and r["box_x1"] < r["width"]
              and r["box_y1"] < r["height"]]
    assert len(inside) > len(rows) // 2  # most objects lie wholly inside the image
    for r in inside:
        side = max(r["box_x1"] - r["box_x0"], r["box_y1"] - r["box_y0"])
        assert side == round(r["scale"] * min(r["width"], r["height"]))


def test_rerun_replaces_an_earlier_output_even_one_that_stopped_halfway(tmp_path):
    synth(tmp_path / "d", SynthConfig(classes=3, train_per_class=1, val_per_class=1, min_size=64, max_size=96),
          progress=False)
    (tmp_path / "d/objects.parquet").unlink()  # as if interrupted before the table was written
    synth(tmp_path / "d", SynthConfig(classes=2, train_per_class=1, val_per_class=0, min_size=64, max_size=96),
          progress=False)
    assert sorted(p.name for p in (tmp_path / "d/train").iterdir()) == ["00_stripes_fine", "01_stripes_coarse"]
    assert not (tmp_path / "d/val").exists()
    assert pq.read_table(tmp_path / "d/objects.parquet").num_rows == 2


def test_refuses_a_foreign_non_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DynresError, match="not empty"):
        synth(tmp_path, SynthConfig(classes=2, train_per_class=1, val_per_class=0), progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("bad", [{"classes": 1}, {"classes": 99}, {"min_size": 900}, {"scale_range": (0.5, 0.1)},
                                 {"train_per_class": 0, "val_per_class": 0}, {"workers": -1}])
def test_bad_settings_name_the_key(bad):
    with pytest.raises(ConfigError, match="synth\\."):
        SynthConfig(**bad)


def test_render_one_image_without_writing():
    image, obj = render(SynthConfig(classes=2, min_size=64, max_size=96), "val", 1, 7)
    assert image.size == (obj.width, obj.height) and max(image.size) <= 96
    with pytest.raises(ConfigError, match="no such image"):
        render(SynthConfig(classes=2), "val", 2, 0)


def test_cli_writes_the_data_set_and_a_summary(tmp_path):
    from dynres.cli.app import app

    result = CliRunner().invoke(app, ["data", "synth", str(tmp_path / "d"), "--classes", "3", "--per-class", "2",
                                      "--val-per-class", "1", "--min-size", "64", "--max-size", "96"])
    assert result.exit_code == 0, result.output
    assert "wrote 9 images (6 train, 3 val, 3 classes)" in result.output
    assert len(list((tmp_path / "d").rglob("*.jpg"))) == 9
    assert pq.read_table(tmp_path / "d/objects.parquet").num_rows == 9
