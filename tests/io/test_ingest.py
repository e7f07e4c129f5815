"""Ingest: every source format becomes a progressive JPEG; bad inputs are skipped and reported; resumable; atomic."""

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
from dynres.io.ingest import IngestConfig, ingest
from dynres.io.store import open_store


def image(w=64, h=48, seed=0, mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // w, y * 255 // h, np.full_like(x, seed * 37 % 256)], -1) + rng.normal(0, 8, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).convert(mode)


def jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


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
        assert img.format == "JPEG" and img.mode == "RGB" and img.info.get("progressive")
        assert store.scan_ends(key)[-1] == len(data) == store.size(key)
    assert not (store_dir / ".ingest").exists()
    assert not [p for p in store_dir.rglob("*") if ".tmp" in p.name]
    return store


def test_every_source_format_becomes_an_rgb_progressive_jpeg(tmp_path):
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
    assert store.num_scans("a_modes/gray") == 10  # grayscale sources are stored as RGB
    assert (store.record("a_modes/rotated")["width"], store.record("a_modes/rotated")["height"]) == (48, 64)
    assert store.record("a_modes/nested/deeper/ünï cödé")["path"].startswith("images/a_modes/nested_deeper_ünï cödé-")


def test_max_side_and_quality_shape_the_stored_files(tmp_path):
    write(tmp_path / "src/c/big.png", image(200, 100, seed=1))
    small = ingest(tmp_path / "src", tmp_path / "lo", IngestConfig(quality=30, max_side=50, workers=1), progress=False)
    big = ingest(tmp_path / "src", tmp_path / "hi", IngestConfig(quality=95, workers=1), progress=False)
    lo, hi = open_store(tmp_path / "lo"), open_store(tmp_path / "hi")
    assert (lo.record("c/big")["width"], lo.record("c/big")["height"]) == (50, 25)
    assert small.bytes < big.bytes and hi.record("c/big")["width"] == 200


def test_bad_inputs_are_skipped_reported_and_the_rest_is_kept(tmp_path, monkeypatch):
    src = tmp_path / "src"
    good = jpeg_bytes(image(seed=1))
    write(src / "cat/good one.jpg", good)
    write(src / "cat/zero.jpg", b"")
    write(src / "cat/truncated.jpg", good[: len(good) // 2])
    write(src / "cat/corrupt.png", b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    write(src / "cat/notes.jpg", b"just some text, not an image\n")
    write(src / "cat/huge.png", image(200, 200, seed=2))
    write(src / "cat/locked.png", image(seed=3))
    os.symlink(src / "cat/gone.png", src / "cat/dangling.png")
    os.mkfifo(src / "cat/pipe.jpg")  # opening a FIFO would block forever
    write(src / "dog/a.jpg", image(seed=4))
    write(src / "dog/a.png", image(seed=5))  # same key dog/a
    write(src / "dog/readme.txt", b"hello")
    write(src / "stray.png", image(seed=6))  # not inside a class folder

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
        "cat/locked.png": "permission denied",
        "cat/dangling.png": "cannot read: No such file",
        "cat/pipe.jpg": "not a regular file",
        "dog/a.png": "duplicate key 'dog/a': kept dog/a.jpg",
        "dog/readme.txt": "unsupported extension '.txt'",
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
    script = tmp_path / "scans.txt"
    script.write_text("0,1,2: 0-0, 0, 0 ;\n0: 1-63, 0, 0 ;\n1: 1-63, 0, 0 ;\n2: 1-63, 0, 0 ;\n")
    if shutil.which("jpegtran"):  # libjpeg-turbo-progs; Pillow itself cannot set a scan script
        ingest(tmp_path / "src", tmp_path / "store", IngestConfig(workers=1, scans=str(script)), progress=False)
        assert open_store(tmp_path / "store").num_scans("c/a") == 4
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


def test_a_missing_source_or_bad_setting_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="source directory not found"):
        ingest(tmp_path / "nope", tmp_path / "store", IngestConfig(workers=1), progress=False)
    (tmp_path / "src/c").mkdir(parents=True)
    with pytest.raises(ConfigError, match="must not be inside the source tree"):
        ingest(tmp_path / "src", tmp_path / "src/store", IngestConfig(workers=1), progress=False)
    with pytest.raises(ConfigError, match="quality"):
        IngestConfig(quality=0)
    with pytest.raises(ConfigError, match="chunksize"):
        IngestConfig(chunksize=0)
