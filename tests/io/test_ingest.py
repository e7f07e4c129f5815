"""Ingest: JPEG sources stored losslessly, every other format re-encoded with its reason; bad inputs skipped and
reported; resumable; atomic; a killed ingest leaves no process behind."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
from PIL import Image
from typer.testing import CliRunner

from dynres.errors import ConfigError, StoreError
from dynres.io.format import reason_rule
from dynres.io.ingest import IngestConfig, ingest
from dynres.io.store import open_store
from jpeg_samples import jpeg_bytes, with_junk


def image(w=64, h=48, seed=0, mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // w, y * 255 // h, np.full_like(x, seed * 37 % 256)], -1) + rng.normal(0, 8, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).convert(mode)


def pixels(data_or_path) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path))


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, Image.Image):
        content.save(path)
    else:
        path.write_bytes(content)


def assert_store_is_complete_and_valid(store_dir, expected_keys):
    store = open_store(store_dir)
    assert sorted(store.keys) == sorted(expected_keys)
    for key in store.keys:
        data = store.read(key)  # verifies sha256
        img = Image.open(io.BytesIO(data))
        assert img.format == "JPEG" and img.mode in ("RGB", "L") and img.info.get("progressive")
        assert store.record(key)["lossless"] == (store.record(key)["reason"] in ("", MOZJPEG))
        assert store.scan_ends(key)[-1] == len(data) == store.size(key)
    assert not (store_dir / ".ingest").exists()
    assert not [p for p in store_dir.rglob("*") if ".tmp" in p.name]
    return store


MOZJPEG = "jpegtran missing: mozjpeg lossless transcode (its scan script)"
needs_jpegtran = pytest.mark.skipif(shutil.which("jpegtran") is None,
                                    reason="needs jpegtran (libjpeg-turbo-progs; `make install` adds it)")


@needs_jpegtran
def test_every_source_format_becomes_a_progressive_jpeg_and_says_how(tmp_path):
    src = tmp_path / "src"
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees
    write(src / "b_formats/photo.jpg", image(seed=1))
    write(src / "b_formats/graphic.png", image(seed=2))
    write(src / "b_formats/web.webp", image(seed=3))
    write(src / "b_formats/bitmap.bmp", image(seed=4))
    write(src / "b_formats/scan.tiff", image(seed=5))
    write(src / "a_modes/gray.png", image(seed=6, mode="L"))
    write(src / "a_modes/print.jpg", image(seed=7, mode="CMYK"))
    write(src / "a_modes/alpha.png", image(seed=8, mode="RGBA"))
    write(src / "a_modes/deep.png", Image.fromarray((np.arange(48 * 64).reshape(48, 64) * 20).astype(np.uint16)))
    image(seed=9).save(src / "a_modes/rotated.jpg", exif=exif)
    write(src / "a_modes/nested/deeper/ünï cödé.png", image(seed=10))
    report = ingest(src, tmp_path / "store", IngestConfig(workers=2), progress=False)
    assert report.skipped == [] and report.ingested == report.images == 11 and report.reused == 0
    assert report.seconds > 0 and report.images_per_s > 0
    store = assert_store_is_complete_and_valid(tmp_path / "store", [
        "b_formats/photo", "b_formats/graphic", "b_formats/web", "b_formats/bitmap", "b_formats/scan",
        "a_modes/gray", "a_modes/print", "a_modes/alpha", "a_modes/deep", "a_modes/rotated",
        "a_modes/nested/deeper/ünï cödé",
    ])
    assert store.classes == ["a_modes", "b_formats"]  # sorted folder names, as ImageFolder
    assert store.label("b_formats/web") == 1 and store.label("a_modes/gray") == 0
    assert store.num_scans("a_modes/gray") == 10  # a grayscale PNG is re-encoded as RGB (a gray JPEG stays gray)
    assert (store.record("a_modes/rotated")["width"], store.record("a_modes/rotated")["height"]) == (48, 64)
    assert store.record("a_modes/nested/deeper/ünï cödé")["path"].startswith("images/a_modes/nested_deeper_ünï cödé-")
    # JPEGs are transcoded, except CMYK; the rotated one too (rotating 64x48 by 90 degrees moves whole 16x16 blocks),
    # but its rotated inverse DCT rounds differently from the source's: transcoded, and not called lossless
    assert {k for k in store.keys if store.record(k)["lossless"]} == {"b_formats/photo"}
    assert store.record("a_modes/rotated")["reason"].startswith("EXIF orientation applied to the DCT coefficients")
    assert store.record("a_modes/print")["reason"] == "CMYK/YCCK JPEG (4 components)"
    assert store.record("b_formats/web")["reason"] == "not a JPEG source (WEBP)"
    assert report.lossless == 1 and report.reasons == {"not a JPEG source": 8, "CMYK/YCCK JPEG": 1,
                                                       "EXIF orientation applied to the DCT coefficients": 1}
    on_disk = json.loads((tmp_path / "store/ingest_report.json").read_text())
    assert on_disk["reasons"] == report.reasons and on_disk["transcoder"] == "jpegtran"


def test_max_side_and_quality_shape_the_stored_files(tmp_path):
    write(tmp_path / "src/c/big.png", image(200, 100, seed=1))
    small = ingest(tmp_path / "src", tmp_path / "lo", IngestConfig(quality=30, max_side=50, workers=1), progress=False)
    big = ingest(tmp_path / "src", tmp_path / "hi", IngestConfig(quality=95, workers=1), progress=False)
    lo, hi = open_store(tmp_path / "lo"), open_store(tmp_path / "hi")
    assert (lo.record("c/big")["width"], lo.record("c/big")["height"]) == (50, 25)
    assert small.bytes < big.bytes and hi.record("c/big")["width"] == 200


JPEG_KINDS = {  # name: (mode, Pillow save options)
    "baseline_420": ("RGB", {}),
    "baseline_422": ("RGB", {"subsampling": 1}),
    "baseline_444": ("RGB", {"subsampling": 0, "quality": 95}),
    "optimized": ("RGB", {"optimize": True, "quality": 80}),
    "progressive": ("RGB", {"progressive": True, "quality": 85}),
    "gray": ("L", {}),
    "odd_size": ("RGB", {}),
}


@needs_jpegtran
def test_jpeg_sources_are_stored_losslessly_and_in_fewer_bytes(tmp_path):
    src = tmp_path / "src"
    for i, (name, (mode, kw)) in enumerate(JPEG_KINDS.items()):
        w, h = (161, 97) if name == "odd_size" else (192, 144)
        write(src / f"c{i % 2}/{name}.jpg", jpeg_bytes(image(w, h, seed=i, mode=mode), **kw))
    report = ingest(src, tmp_path / "store", IngestConfig(workers=2), progress=False)
    store = assert_store_is_complete_and_valid(tmp_path / "store", [f"c{i % 2}/{n}" for i, n in enumerate(JPEG_KINDS)])
    for key in store.keys:
        rec = store.record(key)
        source = pixels(src / rec["source"])
        assert rec["lossless"] and rec["reason"] == "", key
        assert np.array_equal(pixels(store.read(key)), source), key  # the source's pixels, exactly
        assert (rec["width"], rec["height"]) == (source.shape[1], source.shape[0])
        assert store.num_scans(key) == (6 if source.ndim == 2 else 10)  # libjpeg's default script
        # optimized Huffman tables shrink a source written with standard ones; one already optimized may grow a
        # little (a progressive file's extra scan headers and tables)
        assert rec["size"] <= rec["source_size"] * (1.05 if "optimized" in key else 1.0), key
    assert report.lossless == report.images == len(JPEG_KINDS) and report.reasons == {}
    assert report.bytes <= report.source_bytes == sum(p.stat().st_size for p in src.rglob("*.jpg"))


@needs_jpegtran
def test_a_jpeg_is_re_encoded_only_where_it_must_be_and_says_why(tmp_path):
    src = tmp_path / "src"
    exif = Image.Exif()
    exif[0x0112] = 6
    write(src / "c/wide.jpg", jpeg_bytes(image(200, 100, seed=1)))
    write(src / "c/small.jpg", jpeg_bytes(image(40, 30, seed=2)))
    write(src / "c/rotated_odd.jpg", jpeg_bytes(image(65, 49, seed=3), exif=exif))  # 49 rows: not whole 16-px blocks
    write(src / "c/warned.jpg", with_junk(jpeg_bytes(image(64, 48, seed=4))))  # jpegtran fails, Pillow reads it
    report = ingest(src, tmp_path / "store", IngestConfig(max_side=100, workers=1), progress=False)
    store = open_store(tmp_path / "store")
    rec = {k: store.record(k) for k in store.keys}
    assert rec["c/wide"]["reason"] == "--max-side smaller than the image (200x100 > 100)"
    assert (rec["c/wide"]["width"], rec["c/wide"]["height"]) == (100, 50) and not rec["c/wide"]["lossless"]
    assert rec["c/small"]["lossless"] and np.array_equal(pixels(store.read("c/small")), pixels(src / "c/small.jpg"))
    assert reason_rule(rec["c/rotated_odd"]["reason"]) == "EXIF orientation not lossless at this size"
    assert (rec["c/rotated_odd"]["width"], rec["c/rotated_odd"]["height"]) == (49, 65)  # upright
    assert reason_rule(rec["c/warned"]["reason"]) == "jpegtran failed" and "extraneous bytes" in rec["c/warned"]["reason"]
    assert report.lossless == 1 and report.reasons == {
        "--max-side smaller than the image": 1, "EXIF orientation not lossless at this size": 1, "jpegtran failed": 1}


def test_lossless_false_re_encodes_everything_and_a_resumed_ingest_honours_the_switch(tmp_path):
    src = tmp_path / "src"
    for i in range(4):
        write(src / f"c/im{i}.jpg", jpeg_bytes(image(seed=i)))
    ingest(src, tmp_path / "store", IngestConfig(workers=1), progress=False)
    report = ingest(src, tmp_path / "store", IngestConfig(lossless=False, workers=1), progress=False)
    assert (report.ingested, report.reused, report.lossless) == (4, 0, 0)  # not reused: another setting
    assert report.reasons == {"re-encoding requested": 4} and report.transcoder is None
    store = assert_store_is_complete_and_valid(tmp_path / "store", [f"c/im{i}" for i in range(4)])
    assert {store.record(k)["reason"] for k in store.keys} == {"re-encoding requested (lossless=False)"}
    assert not np.array_equal(pixels(store.read("c/im0")), pixels(src / "c/im0.jpg"))  # a generation loss


def test_without_jpegtran_mozjpeg_transcodes_and_one_line_says_so(tmp_path, monkeypatch, caplog):
    pytest.importorskip("mozjpeg_lossless_optimization")
    src = tmp_path / "src"
    for i in range(3):
        write(src / f"c/im{i}.jpg", jpeg_bytes(image(96, 72, seed=i)))
    write(src / "c/graphic.png", image(seed=9))
    monkeypatch.setattr("shutil.which", lambda name: None)
    report = ingest(src, tmp_path / "store", IngestConfig(workers=1), progress=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "dynres.io.ingest"]
    assert len(lines) == 1 and lines[0].startswith(
        "libjpeg-turbo's jpegtran not found: JPEG sources are transcoded losslessly by mozjpeg-lossless-optimization")
    store = assert_store_is_complete_and_valid(tmp_path / "store", ["c/im0", "c/im1", "c/im2", "c/graphic"])
    for i in range(3):
        assert store.record(f"c/im{i}")["reason"] == MOZJPEG and store.record(f"c/im{i}")["lossless"]
        assert np.array_equal(pixels(store.read(f"c/im{i}")), pixels(src / f"c/im{i}.jpg"))
    assert report.transcoder == "mozjpeg" and report.lossless == 3
    assert report.reasons == {"jpegtran missing: mozjpeg lossless transcode": 3, "not a JPEG source": 1}


def test_with_no_lossless_route_jpegs_are_re_encoded_with_the_reason_and_one_line(tmp_path, monkeypatch, caplog):
    src = tmp_path / "src"
    for i in range(3):
        write(src / f"c/im{i}.jpg", jpeg_bytes(image(seed=i)))
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.setitem(sys.modules, "mozjpeg_lossless_optimization", None)  # an import of it now fails
    report = ingest(src, tmp_path / "store", IngestConfig(workers=1), progress=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "dynres.io.ingest"]
    assert len(lines) == 1 and "JPEG sources are re-encoded at quality 90 (lossy" in lines[0]
    assert "install libjpeg-turbo-progs" in lines[0]
    assert report.lossless == 0 and report.reasons == {"jpegtran missing": 3} and report.transcoder is None
    reasons = {open_store(tmp_path / "store").record(f"c/im{i}")["reason"] for i in range(3)}
    assert reasons == {"jpegtran missing (and mozjpeg-lossless-optimization not installed)"}


def test_bad_inputs_are_skipped_reported_and_the_rest_is_kept(tmp_path, monkeypatch):
    src = tmp_path / "src"
    good = jpeg_bytes(image(seed=1))
    write(src / "cat/good one.jpg", good)
    write(src / "cat/zero.jpg", b"")
    write(src / "cat/truncated.jpg", good[: len(good) // 2])
    write(src / "cat/corrupt.png", b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    write(src / "cat/notes.jpg", b"just some text, not an image\n")
    write(src / "cat/huge.png", image(200, 200, seed=2))
    write(src / "cat/big.jpg", jpeg_bytes(image(200, 200, seed=2)))  # refused from its header, before jpegtran
    write(src / "cat/locked.png", image(seed=3))
    os.symlink(src / "cat/gone.png", src / "cat/dangling.png")
    os.mkfifo(src / "cat/pipe.jpg")  # opening a FIFO would block forever
    write(src / "dog/a.jpg", image(seed=4))
    write(src / "dog/a.png", image(seed=5))  # same key dog/a
    write(src / "dog/readme.txt", b"hello")
    write(src / "stray.png", image(seed=6))  # not inside a class folder
    write(src / "emu/broken.jpg", good[:100])  # a class whose every image is bad

    # Tests run as root, for whom chmod 000 changes nothing; so the permission error is simulated
    # where ingest opens files. workers=1 keeps the patch in this process.
    real_open = PIL.Image.open

    def guarded_open(fp, *args, **kwargs):
        if str(fp).endswith("locked.png"):
            raise PermissionError(13, "Permission denied", str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", guarded_open)
    report = ingest(src, tmp_path / "store", IngestConfig(workers=1, max_pixels=100 * 100), progress=False)

    reasons = dict(report.skipped)
    expected = {
        "stray.png": "not inside a class folder",
        "cat/zero.jpg": "empty file (0 bytes)",
        "cat/truncated.jpg": "truncated",
        "cat/corrupt.png": "",
        "cat/notes.jpg": "not an image",
        "cat/huge.png": "decompression bomb: 200x200 = 40000 pixels > max_pixels 10000",
        "cat/big.jpg": "decompression bomb: 200x200 = 40000 pixels > max_pixels 10000",
        "cat/locked.png": "permission denied",
        "cat/dangling.png": "cannot read: No such file",
        "cat/pipe.jpg": "not a regular file",
        "dog/a.png": "duplicate key 'dog/a': kept dog/a.jpg",
        "dog/readme.txt": "unsupported extension '.txt'",
        "emu/broken.jpg": "corrupt image",
        "emu/": "no image of this class could be stored",
    }
    assert set(reasons) == set(expected)
    for name, reason in expected.items():
        assert reason in reasons[name], (name, reasons[name])
    on_disk = json.loads((tmp_path / "store/ingest_report.json").read_text())
    assert {s["file"]: s["reason"] for s in on_disk["skipped"]} == reasons
    store = assert_store_is_complete_and_valid(tmp_path / "store", ["cat/good one", "dog/a"])
    assert store.record("dog/a")["source"] == "dog/a.jpg"


def test_rerun_reuses_verified_files_and_redoes_only_what_changed(tmp_path):
    src = tmp_path / "src"
    for i in range(6):
        write(src / f"c{i % 2}/im{i}.png", image(seed=i))
    first = ingest(src, tmp_path / "store", IngestConfig(workers=1), progress=False)
    assert (first.ingested, first.reused) == (6, 0)
    again = ingest(src, tmp_path / "store", IngestConfig(workers=1), progress=False)
    assert (again.ingested, again.reused) == (0, 6)

    write(src / "c0/im0.png", image(seed=99))  # a changed source
    stored = tmp_path / "store" / open_store(tmp_path / "store").record("c1/im1")["path"]
    stored.write_bytes(stored.read_bytes()[:-10])  # a damaged stored file
    (src / "c1/im5.png").unlink()  # a removed source
    third = ingest(src, tmp_path / "store", IngestConfig(workers=1), progress=False)
    assert (third.ingested, third.reused) == (2, 3)
    assert_store_is_complete_and_valid(tmp_path / "store", ["c0/im0", "c0/im2", "c0/im4", "c1/im1", "c1/im3"])
    assert not (tmp_path / "store/images/c1/im5.jpg").exists()

    requality = ingest(src, tmp_path / "store", IngestConfig(quality=50, workers=1), progress=False)
    assert (requality.ingested, requality.reused) == (5, 0)
    assert_store_is_complete_and_valid(tmp_path / "store", ["c0/im0", "c0/im2", "c0/im4", "c1/im1", "c1/im3"])


SLOW_INGEST = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # a shell's background job starts us with SIGINT ignored
import PIL.Image
from dynres.io.ingest import IngestConfig, ingest
real = PIL.Image.open
PIL.Image.open = lambda *a, **k: (time.sleep(0.03), real(*a, **k))[1]  # slow sources: killed mid-way
ingest(sys.argv[1], sys.argv[2], IngestConfig(workers=1), progress=False)
"""


def kill_midway(src, store, min_done, sig=signal.SIGKILL):
    proc = subprocess.Popen([sys.executable, "-c", SLOW_INGEST, str(src), str(store)], stderr=subprocess.DEVNULL)
    journal = store / ".ingest" / "journal.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_text(encoding="utf-8").count("\n") > min_done:
            break
        time.sleep(0.01)
    proc.send_signal(sig)
    code = proc.wait()
    assert code == -sig, f"ingest exited with {code} (finished before the kill?)"  # Python dies of an uncaught SIGINT too


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "Ctrl-C"])
def test_a_killed_ingest_leaves_no_manifest_and_resuming_finishes(tmp_path, sig):
    src, store = tmp_path / "src", tmp_path / "store"
    keys = [f"c{i % 3}/im{i:02d}" for i in range(40)]
    for i, key in enumerate(keys):
        write(src / f"{key}.png", image(96, 72, seed=i))
    kill_midway(src, store, min_done=8, sig=sig)
    assert not (store / "manifest.parquet").exists()
    with pytest.raises(StoreError, match="ingest did not finish"):
        open_store(store)
    report = ingest(src, store, IngestConfig(workers=2), progress=False)
    assert report.reused >= 8 and report.reused + report.ingested == 40
    assert_store_is_complete_and_valid(store, keys)


@pytest.mark.slow
def test_a_killed_rerun_keeps_the_previous_complete_manifest(tmp_path):
    src, store = tmp_path / "src", tmp_path / "store"
    old = [f"c0/old{i}" for i in range(3)]
    for i, key in enumerate(old):
        write(src / f"{key}.png", image(seed=i))
    ingest(src, store, IngestConfig(workers=1), progress=False)
    new = [f"c{i % 2}/new{i:02d}" for i in range(30)]
    for i, key in enumerate(new):
        write(src / f"{key}.png", image(96, 72, seed=100 + i))
    kill_midway(src, store, min_done=5)
    assert open_store(store).keys == old and all(open_store(store).read(k) for k in old)  # still complete
    ingest(src, store, IngestConfig(workers=1), progress=False)
    assert_store_is_complete_and_valid(store, old + new)


def test_custom_scan_script_needs_jpegtran(tmp_path, monkeypatch):
    write(tmp_path / "src/c/a.png", image())
    write(tmp_path / "src/c/b.jpg", jpeg_bytes(image(seed=1)))
    script = tmp_path / "scans.txt"
    script.write_text("0,1,2: 0-0, 0, 0 ;\n0: 1-63, 0, 0 ;\n1: 1-63, 0, 0 ;\n2: 1-63, 0, 0 ;\n")
    if shutil.which("jpegtran"):  # libjpeg-turbo-progs; Pillow itself cannot set a scan script
        ingest(tmp_path / "src", tmp_path / "store", IngestConfig(workers=1, scans=str(script)), progress=False)
        store = open_store(tmp_path / "store")
        assert store.num_scans("c/a") == store.num_scans("c/b") == 4
        assert store.record("c/b")["lossless"]  # the JPEG's coefficients, rearranged by the script
        assert np.array_equal(pixels(store.read("c/b")), pixels(tmp_path / "src/c/b.jpg"))
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(ConfigError, match="needs libjpeg's `jpegtran`"):
        ingest(tmp_path / "src", tmp_path / "store2", IngestConfig(workers=1, scans=str(script)), progress=False)


def test_cli_ingest_prints_skipped_files_and_a_summary(tmp_path):
    from dynres.cli.app import app

    write(tmp_path / "src/c/ok.png", image())
    write(tmp_path / "src/c/bad.jpg", b"nope")
    result = CliRunner().invoke(app, ["ingest", str(tmp_path / "src"), str(tmp_path / "store"), "--workers", "1",
                                      "--quality", "80", "--max-side", "32"])
    assert result.exit_code == 0, result.output
    assert "c/bad.jpg" in result.output and "not an image" in result.output
    assert "1 images in" in result.output and "1 skipped" in result.output
    assert open_store(tmp_path / "store").record("c/ok")["width"] == 32
    assert "0 stored losslessly, 1 re-encoded (reasons: 1 not a JPEG source)" in result.output


def test_cli_ingest_reencode_flag(tmp_path):
    from dynres.cli.app import app

    write(tmp_path / "src/c/a.jpg", jpeg_bytes(image()))
    args = ["ingest", str(tmp_path / "src"), str(tmp_path / "store"), "--workers", "1"]
    result = CliRunner().invoke(app, [*args, "--reencode"])
    assert result.exit_code == 0, result.output
    assert "0 stored losslessly, 1 re-encoded (reasons: 1 re-encoding requested)" in result.output
    assert not open_store(tmp_path / "store").record("c/a")["lossless"]
    if shutil.which("jpegtran"):
        result = CliRunner().invoke(app, args)  # --lossless, the default: the resumed ingest transcodes
        assert "1 stored losslessly, 0 re-encoded;" in result.output, result.output


def test_a_missing_source_or_bad_setting_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="source directory not found"):
        ingest(tmp_path / "nope", tmp_path / "store", IngestConfig(workers=1), progress=False)
    (tmp_path / "src/c").mkdir(parents=True)
    with pytest.raises(ConfigError, match="must not hold one another"):
        ingest(tmp_path / "src", tmp_path / "src/store", IngestConfig(workers=1), progress=False)
    with pytest.raises(ConfigError, match="must not hold one another"):  # nor the source inside the store
        ingest(tmp_path / "src/c", tmp_path / "src", IngestConfig(workers=1), progress=False)
    with pytest.raises(ConfigError, match="quality"):
        IngestConfig(quality=0)
    with pytest.raises(ConfigError, match="chunksize"):
        IngestConfig(chunksize=0)


def test_a_folder_of_other_files_is_not_taken_for_a_store_and_nothing_in_it_is_deleted(tmp_path):
    """Ingest deletes what its manifest does not list: pointed at a folder of the user's files, it refuses."""
    write(tmp_path / "src/cat/a.jpg", image())
    write(tmp_path / "project/images/holiday/IMG_0001.jpg", image(seed=1))
    write(tmp_path / "project/notes.txt", b"mine")
    with pytest.raises(ConfigError, match="holds no dynres store"):
        ingest(tmp_path / "src", tmp_path / "project", IngestConfig(workers=1), progress=False)
    assert (tmp_path / "project/images/holiday/IMG_0001.jpg").is_file() and (tmp_path / "project/notes.txt").is_file()
    ingest(tmp_path / "src", tmp_path / "store", IngestConfig(workers=1), progress=False)
    ingest(tmp_path / "src", tmp_path / "store", IngestConfig(workers=1), progress=False)  # its own store: resumed


def test_a_second_ingest_into_a_store_being_written_fails_at_once_naming_it(tmp_path):
    import fcntl

    write(tmp_path / "src/cat/a.jpg", image())
    (tmp_path / "store").mkdir()
    with open(tmp_path / "store/.ingest.lock", "w") as held:  # as the first ingest holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(StoreError, match="another ingest is writing this store"):
            ingest(tmp_path / "src", tmp_path / "store", IngestConfig(workers=1), progress=False)
    ingest(tmp_path / "src", tmp_path / "store", IngestConfig(workers=1), progress=False)
    assert_store_is_complete_and_valid(tmp_path / "store", ["cat/a"])


def test_links_loops_unlistable_folders_and_odd_names_are_reported_not_stored_twice_or_fatal(tmp_path):
    write(tmp_path / "src/cat/a.jpg", image())
    write(tmp_path / "src/dog/b.jpg", image(seed=1))
    os.symlink("..", tmp_path / "src/cat/loop")  # cat/loop/cat/loop/... and cat/loop/dog
    write(tmp_path / "src/dog/locked/c.jpg", image(seed=2))
    write(tmp_path / os.fsdecode(b"src/dog/caf\xe9.jpg"), image(seed=3))  # a Latin-1 name from an old archive
    write(tmp_path / "src/a:apple/#1 50%.jpg", image(seed=4))  # breaks Windows paths and URLs unless renamed
    os.chmod(tmp_path / "src/dog/locked", 0)
    try:
        rep = ingest(tmp_path / "src", tmp_path / "store", IngestConfig(workers=1), progress=False)
    finally:
        os.chmod(tmp_path / "src/dog/locked", 0o755)
    reasons = dict(rep.skipped)
    assert reasons["cat/loop"] == "folder reached a second time through a symbolic link"
    assert reasons["dog/caf?.jpg"] == "file name is not valid UTF-8"
    if os.geteuid() != 0:  # root lists any folder
        assert reasons["dog/locked"].startswith("cannot list the folder")
    store = open_store(tmp_path / "store")  # its own reader takes every stored path
    assert sorted(store.keys) == ["a:apple/#1 50%", "cat/a", "dog/b"] + (["dog/locked/c"] if os.geteuid() == 0 else [])
    assert all(store.read(k) for k in store.keys)
    assert not any(c in store.record("a:apple/#1 50%")["path"] for c in ":#%")


def dies_on_b(arg):
    """Encodes as ingest does, but the worker process dies on images named b (as the OOM killer would end it)."""
    from dynres.io.ingest import _encode_one

    if arg[0].key.endswith("/b"):
        os._exit(9)
    return _encode_one(arg)


def test_an_image_that_kills_its_worker_is_skipped_named_and_the_rest_are_stored(tmp_path):
    from dynres.io.ingest import _encode_all
    from dynres.io.sources import plan

    for name, seed in (("a", 0), ("b", 1), ("c", 2), ("d", 3), ("e", 4)):
        write(tmp_path / f"src/cat/{name}.jpg", image(seed=seed))
    (tmp_path / "store").mkdir()
    _, tasks, _ = plan(tmp_path / "src")
    results = dict((t.key, r) for t, r in _encode_all(tasks, tmp_path / "store", IngestConfig(workers=2, chunksize=1),
                                                       None, dies_on_b))
    assert list(results) == ["cat/a", "cat/b", "cat/c", "cat/d", "cat/e"]  # every image answered, in order
    assert results["cat/b"].startswith("its worker process died")
    assert all(isinstance(results[k], dict) for k in ("cat/a", "cat/c", "cat/d", "cat/e"))


def process_tree() -> dict[int, tuple[int, str]]:
    """Every process: pid -> (parent pid, state), from /proc."""
    procs = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:  # gone meanwhile
                continue
            procs[int(entry)] = (int(fields[1]), fields[0])
    return procs


def descendants(pids: set[int], procs: dict[int, tuple[int, str]]) -> set[int]:
    found, todo = set(), list(pids)
    while todo:
        parent = todo.pop()
        for pid, (ppid, _) in procs.items():
            if ppid == parent and pid not in found:
                found.add(pid)
                todo.append(pid)
    return found


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds processes through /proc (Linux)")
def test_a_killed_ingest_leaves_no_process_behind(tmp_path):
    src, store = tmp_path / "src", tmp_path / "store"
    data = jpeg_bytes(image(256, 192, seed=1))
    for i in range(1500):
        write(src / f"c{i % 2}/im{i:04d}.jpg", data)
    proc = subprocess.Popen(
        [sys.executable, "-c", "from dynres.cli import main; main()", "ingest", str(src), str(store), "--workers", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "DYNRES_NO_PROGRESS": "1"})
    journal, started = store / ".ingest" / "journal.jsonl", set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        started |= descendants({proc.pid}, process_tree())  # the forkserver, its workers, the resource tracker
        if len(started) >= 4 and journal.exists() and journal.read_text(encoding="utf-8").count("\n") > 20:
            break
        time.sleep(0.01)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL, "ingest finished before the kill"
    assert len(started) >= 4, started
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        procs = process_tree()
        started |= descendants(started, procs)  # anything they started meanwhile
        left = {pid for pid in started if pid in procs and procs[pid][1] != "Z"}
        if not left:
            break
        time.sleep(0.1)
    assert not left, f"still running 10 s after the SIGKILL: {left}"
