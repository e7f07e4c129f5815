"""The quality index: SSIM of each scan prefix vs the whole file, at each inference view."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from skimage.metrics import structural_similarity

from dynres.errors import StoreError
from dynres.io.decode import PrefixViews
from dynres.io.ingest import IngestConfig, ingest
from dynres.io.store import open_store
from dynres.policy.quality import (
    QUALITY,
    QualityConfig,
    build_quality_index,
    image_quality,
    load_quality,
    scan_roles,
    ssim,
)

RES = (56, 112, 168)


def luma(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N,3,H,W) RGB → float32 (N,1,H,W) ITU-R 601 luminance: the reference the index's luma decode meets."""
    w = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32).view(1, 3, 1, 1)
    return (images.float() * w).sum(dim=1, keepdim=True)


@pytest.fixture(scope="module")
def photo_store(tmp_path_factory):
    """Three of scikit-image's real photos, ingested as progressive JPEGs."""
    src = tmp_path_factory.mktemp("photos")
    for cls, name in (("a", "astronaut"), ("a", "chelsea"), ("b", "coffee")):
        (src / cls).mkdir(exist_ok=True)
        Image.fromarray(getattr(skdata, name)()).save(src / cls / f"{name}.png")
    root = tmp_path_factory.mktemp("store") / "s"
    ingest(src, root, IngestConfig(workers=1), progress=False)
    return root


def test_ssim_matches_scikit_image_wang_settings():
    rng = np.random.default_rng(0)
    ref = rng.uniform(0, 255, (40, 52)).astype(np.float32)
    noisy = [np.clip(ref + rng.normal(0, s, ref.shape), 0, 255).astype(np.float32) for s in (0.5, 4, 30)]
    ours = ssim(torch.from_numpy(np.stack(noisy))[:, None], torch.from_numpy(ref)[None, None]).numpy()
    theirs = [structural_similarity(x, ref, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                    data_range=255.0) for x in noisy]
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    assert ours[0] > ours[1] > ours[2]


def test_index_scores_the_luma_of_the_engines_views(photo_store):
    """One luma-only decode per prefix, resized per resolution: the SSIM of what PrefixViews hands the backbone."""
    store = open_store(photo_store)
    res = (56, 112, 168, 224)
    for key in store.keys:
        data, ends = store.read(key), store.scan_ends(key)
        scores, _ = image_quality(data, ends, res, 0.875, key)
        ks = [k for k, has in enumerate(scan_roles(data, ends)[0], 1) if has][:-1]
        for j, r in enumerate(res):
            views = luma(torch.stack([PrefixViews(store.read(key, scans=k), max(res) / 0.875).view(r, 0.875)
                                      for k in ks + [len(ends)]]))
            engine = ssim(views[:-1], views[-1:]).numpy()
            np.testing.assert_allclose(scores[j, [k - 1 for k in ks]], engine, atol=0.01)


def test_a_grayscale_progressive_jpeg_is_indexed_like_a_colour_one():
    from dynres.io.jpeg import parse_scans

    buf = io.BytesIO()
    Image.fromarray(skdata.camera()).save(buf, "JPEG", quality=90, progressive=True)
    data = buf.getvalue()
    scores, _ = image_quality(data, parse_scans(data).scan_ends, RES)
    assert scores.shape == (len(RES), 6)
    assert (scores[:, -1] == 1.0).all() and (scores[:, :-1] < 1.0).all()
    assert (np.diff(scores, axis=1) > -2e-3).all() and (scores[:, 0] < 0.99).all()


def test_luma_scans_reads_the_scan_headers():
    buf = io.BytesIO()
    Image.fromarray(skdata.astronaut()).save(buf, "JPEG", quality=90, progressive=True)
    from dynres.io.jpeg import parse_scans

    colour = buf.getvalue()
    # libjpeg's default colour script: DC, Y AC1-5, Cr, Cb, Y AC6-63, Y refine, DC refine, Cr, Cb, Y refine
    ends = parse_scans(colour).scan_ends
    luma, chroma = scan_roles(colour, ends)
    assert luma == [True, True, False, False, True, True, True, False, False, True]
    assert chroma == [True, False, True, True, False, False, True, True, True, False]
    buf = io.BytesIO()
    Image.fromarray(skdata.camera()).save(buf, "JPEG", quality=90, progressive=True)
    gray = buf.getvalue()
    luma, chroma = scan_roles(gray, parse_scans(gray).scan_ends)
    assert all(luma) and not any(chroma)


def test_ssim_rises_with_scans_and_reaches_one_on_real_photos(photo_store):
    report = build_quality_index(photo_store, QualityConfig(resolutions=RES, workers=1), progress=False)
    assert report["computed"] == 3 and (photo_store / QUALITY).is_file()
    assert not (photo_store / ".quality").exists()
    index = load_quality(open_store(photo_store))
    assert index.resolutions == RES
    for i, key in enumerate(index.keys):
        for j in range(len(RES)):
            s = index.ssim[i, j, : index.num_scans[i]]
            assert not np.isnan(s).any(), key
            assert np.array_equal(s[2:4], [s[1], s[1]])  # chroma-only scans 3, 4: luma of scan 2
            assert s[-1] == 1.0 and s[0] < 0.99
            assert np.all(np.diff(s) > -2e-3), (key, RES[j], s)  # rises (up to rounding noise)
            assert s[-2] > s[0]


def test_index_is_resumable_and_rebuilt_when_the_config_changes(photo_store):
    cfg = QualityConfig(resolutions=(56,), workers=1)
    first = build_quality_index(photo_store, cfg, progress=False)
    again = build_quality_index(photo_store, cfg, progress=False)
    assert first["computed"] == 3 and again["computed"] == 0 and again["reused"] == 3
    other = build_quality_index(photo_store, QualityConfig(resolutions=(64,), workers=1), progress=False)
    assert other["computed"] == 3
    assert load_quality(open_store(photo_store)).resolutions == (64,)

def test_threads_give_the_index_one_thread_gives_and_leave_torch_threads_as_they_were(photo_store):
    def index(workers: int) -> np.ndarray:
        (photo_store / QUALITY).unlink(missing_ok=True)
        build_quality_index(photo_store, QualityConfig(resolutions=RES, workers=workers, chunk=1), progress=False)
        return load_quality(open_store(photo_store)).ssim

    threads = torch.get_num_threads()
    assert np.array_equal(index(3), index(1), equal_nan=True)  # 3 chunks of 1 image run at once
    assert torch.get_num_threads() == threads



def test_an_index_of_some_images_reads_back_for_them_and_extends_to_the_rest(photo_store):
    cfg = QualityConfig(resolutions=(56,), workers=1)
    (photo_store / QUALITY).unlink(missing_ok=True)
    store = open_store(photo_store)
    some = store.keys[:2]
    part = build_quality_index(photo_store, cfg, progress=False, keys=some)
    assert part["computed"] == 2 and part["images"] == 3
    assert part["index_time_over_store_ingest_time"] < part["index_time_over_ingest_time"]  # 2 of 3 images
    with pytest.raises(StoreError, match="lack quality data"):
        load_quality(store)
    partial = load_quality(store, some)
    assert partial.keys == tuple(some) and partial.ssim.shape[0] == 2
    rest = build_quality_index(photo_store, cfg, progress=False)  # only the image it lacks
    assert rest["computed"] == 1 and rest["reused"] == 2
    full = load_quality(open_store(photo_store))
    assert np.array_equal(full.ssim[:2], partial.ssim, equal_nan=True)
    with pytest.raises(StoreError, match="not in the store"):
        build_quality_index(photo_store, cfg, progress=False, keys=["nope.jpg"])


def test_fewest_scans_never_picks_a_prefix_below_the_threshold(photo_store):
    build_quality_index(photo_store, QualityConfig(resolutions=RES, workers=1), progress=False)
    index = load_quality(open_store(photo_store))
    for t in (0.5, 0.9, 0.95, 0.99, 0.999, 1.0):
        for j, r in enumerate(RES):
            ks = index.fewest_scans(t, r)
            for i, k in enumerate(ks):
                s = index.ssim[i, j]
                assert s[k - 1] >= t or k == index.num_scans[i]
                assert not np.any(s[: k - 1] >= t)  # and no fewer scans would do


def test_missing_index_is_a_clear_error(tmp_path, photo_store):
    store = open_store(photo_store)
    (photo_store / QUALITY).rename(tmp_path / "q.parquet")
    try:
        with pytest.raises(StoreError, match="dynres index quality"):
            load_quality(store)
    finally:
        (tmp_path / "q.parquet").rename(photo_store / QUALITY)


def test_cli_index_quality_writes_the_index_and_its_cost_record(photo_store, tmp_path):
    from typer.testing import CliRunner

    from dynres.cli.app import app

    result = CliRunner().invoke(app, ["index", "quality", str(photo_store), "--resolutions", "56",
                                      "--workers", "1", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    record = (tmp_path / "quality_index.json").read_text()
    assert '"ms_per_image_per_resolution"' in record and "ingest_images_per_s" in record
    assert load_quality(open_store(photo_store)).resolutions == (56,)
    # --calibration-only: the images `dynres calibrate` searches on at that holdout and seed, no others
    from dynres.study.calibrate import CalibrationConfig, calibration_keys

    (photo_store / QUALITY).unlink()
    result = CliRunner().invoke(app, ["index", "quality", str(photo_store), "--resolutions", "56", "--workers", "1",
                                      "--out", str(tmp_path), "--calibration-only", "--holdout", "0.6"])
    assert result.exit_code == 0, result.output
    store = open_store(photo_store)
    calib = calibration_keys(store.keys, CalibrationConfig(holdout_fraction=0.6))[0]
    assert 0 < len(calib) < len(store.keys)
    assert load_quality(store, calib).keys == tuple(calib)
    with pytest.raises(StoreError, match="lack quality data"):
        load_quality(store)


def test_index_of_a_remote_store_is_read_like_its_manifest(photo_store):
    import fsspec

    build_quality_index(photo_store, QualityConfig(resolutions=(56,), workers=1), progress=False)
    fs = fsspec.filesystem("memory")
    fs.put(str(photo_store), "/remote-store", recursive=True)
    remote = open_store("memory://remote-store")
    local = load_quality(open_store(photo_store))
    index = load_quality(remote)
    assert index.keys == local.keys and np.array_equal(index.ssim, local.ssim, equal_nan=True)


@pytest.mark.parametrize("bad", [dict(resolutions=()), dict(resolutions=(56, 0)), dict(crop_side=0.0),
                                 dict(crop_side=1.5), dict(workers=-1), dict(chunk=0)])
def test_a_bad_quality_config_is_refused(bad):
    from dynres.errors import ConfigError

    with pytest.raises(ConfigError, match=next(iter(bad))):
        QualityConfig(**bad)


@pytest.mark.slow
def test_worker_processes_build_the_same_index_as_one_process(photo_store, tmp_path):
    import shutil

    import pyarrow.parquet as pq

    tables = []
    for workers in (1, 2):
        root = tmp_path / f"workers{workers}"
        shutil.copytree(photo_store, root)
        (root / QUALITY).unlink(missing_ok=True)
        report = build_quality_index(root, QualityConfig(resolutions=(56,), workers=workers, chunk=1), progress=False)
        assert report["computed"] == 3 and report["workers"] == workers
        tables.append(pq.read_table(root / QUALITY).replace_schema_metadata(None))
    assert tables[0].equals(tables[1])
