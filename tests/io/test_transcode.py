"""Lossless transcoding: frame headers read right, the rules that decline a source, jpegtran and mozjpeg routes."""

import io
import shutil
import subprocess
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageOps

from dynres.errors import BadImageError
from dynres.io.format import reason_rule
from dynres.io.jpeg import parse_scans
from dynres.io.transcode import (
    ORIENTATION_TRANSFORMS,
    JpegFrame,
    Transcoder,
    fallback_notice,
    find_transcoder,
    lossless_obstacle,
    read_frame,
    source_bytes,
    turbo_transform,
)
from jpeg_samples import jpeg_bytes as jpeg
from jpeg_samples import with_junk

needs_jpegtran = pytest.mark.skipif(shutil.which("jpegtran") is None,
                                    reason="needs jpegtran (libjpeg-turbo-progs; `make install` adds it)")


def picture(w=96, h=64, seed=0, mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 / w, y * 255 / h, (x * y) % 256], axis=-1) + rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).convert(mode)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def oriented(img: Image.Image, orientation: int, **kw) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg(img, exif=exif, **kw)


@pytest.mark.parametrize("mode, kw, sampling", [
    ("RGB", {}, ((2, 2), (1, 1), (1, 1))),
    ("RGB", {"subsampling": 0}, ((1, 1), (1, 1), (1, 1))),
    ("RGB", {"subsampling": 1, "progressive": True}, ((2, 1), (1, 1), (1, 1))),
    ("L", {}, ((1, 1),)),
    ("CMYK", {}, ((1, 1),) * 4),
], ids=["420", "444", "422-progressive", "gray", "cmyk"])
def test_read_frame_gives_size_sampling_and_coding(mode, kw, sampling):
    frame = read_frame(jpeg(picture(70, 50, mode=mode), **kw))
    assert (frame.width, frame.height, frame.precision, frame.sampling) == (70, 50, 8, sampling)
    assert frame.marker == (0xC2 if kw.get("progressive") else 0xC0) and frame.orientation == 1
    assert frame.mcu == ((8 * sampling[0][0], 8 * sampling[0][1]) if len(sampling) > 1 else (8, 8))


def test_read_frame_takes_the_orientation_of_the_first_exif_segment_and_refuses_headless_data():
    assert read_frame(oriented(picture(), 6)).orientation == 6
    assert read_frame(oriented(picture(), 1)).orientation == 1
    with pytest.raises(BadImageError, match="not a JPEG"):
        read_frame(b"\x89PNG\r\n\x1a\n", "x.png")
    with pytest.raises(BadImageError, match="no frame header"):
        read_frame(b"\xff\xd8\xff\xd9", "x.jpg")


def test_the_orientation_is_read_even_past_pillows_pixel_limit(monkeypatch):
    """Ingest's own cap (``max_pixels``) may allow more than Pillow opens: the header still gives the rotation."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the picture is over twice this: Image.open refuses it
    assert read_frame(oriented(picture(), 6)).orientation == 6


def frame(**kw) -> JpegFrame:
    return JpegFrame(**{"marker": 0xC0, "precision": 8, "width": 64, "height": 48,
                        "sampling": ((2, 2), (1, 1), (1, 1)), **kw})


@pytest.mark.parametrize("kw, options, rule", [
    ({}, {}, None),
    ({"marker": 0xC2, "sampling": ((1, 1),)}, {}, None),
    ({"marker": 0xC9}, {}, None),  # jpegtran reads arithmetic coding and writes Huffman
    ({"marker": 0xC9}, {"jpegtran": False}, "arithmetic-coded JPEG"),
    ({"marker": 0xC3}, {}, "lossless or hierarchical JPEG"),
    ({"marker": 0xC5}, {}, "lossless or hierarchical JPEG"),
    ({"precision": 12}, {}, "not an 8-bit JPEG"),
    ({"sampling": ((1, 1),) * 4}, {}, "CMYK/YCCK JPEG"),
    ({}, {"max_side": 63}, "--max-side smaller than the image"),
    ({}, {"max_side": 64}, None),
    ({"orientation": 6}, {}, None),  # rotating 90 degrees moves whole 16x16 blocks: 48 rows are 3 of them
    ({"orientation": 6, "height": 49}, {}, "EXIF orientation not lossless at this size"),
    ({"orientation": 5, "height": 49, "width": 65}, {}, None),  # a transpose is always perfect
    ({"orientation": 6}, {"jpegtran": False}, "jpegtran missing"),
])
def test_lossless_obstacle_names_the_rule_that_applies(kw, options, rule):
    reason = lossless_obstacle(frame(**kw), **options)
    assert (reason and reason_rule(reason)) == rule


@needs_jpegtran
@pytest.mark.parametrize("subsampling", [0, 1, 2], ids=["444", "422", "420"])
@pytest.mark.parametrize("size", [(64, 48), (72, 56), (65, 49)])
def test_the_perfect_rule_agrees_with_jpegtran(subsampling, size):
    for orientation, transform in ORIENTATION_TRANSFORMS.items():
        data = jpeg(picture(*size), subsampling=subsampling)
        proc = subprocess.run(["jpegtran", *transform, "-perfect"], input=data, capture_output=True, check=False)
        predicted = lossless_obstacle(replace(read_frame(data), orientation=orientation))
        assert (predicted is None) == (proc.returncode == 0), (orientation, proc.stderr)


@needs_jpegtran
@pytest.mark.parametrize("orientation", sorted(ORIENTATION_TRANSFORMS))
def test_an_exif_orientation_is_applied_to_the_coefficients_and_not_called_lossless(orientation):
    source = oriented(picture(64, 48, seed=orientation), orientation)
    data, reason = source_bytes(source, "a.jpg", find_transcoder())
    assert reason.startswith("EXIF orientation applied to the DCT coefficients") and parse_scans(data).progressive
    shown = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(source)))).astype(int)
    stored = pixels(data).astype(int)
    assert stored.shape == shown.shape
    # the same coefficients, moved: only the IDCT's and chroma upsampling's rounding differ with the direction
    assert np.abs(stored - shown).max() <= 4 and np.abs(stored - shown).mean() < 0.5
    assert "exif" not in Image.open(io.BytesIO(data)).info  # -copy none: no orientation left to apply twice


@needs_jpegtran
def test_jpegtran_copies_coefficients_of_every_coding_and_reports_its_failures():
    transcoder = find_transcoder()
    assert transcoder.name == "jpegtran" and transcoder.note == ""
    source = jpeg(picture(80, 60))
    arithmetic = subprocess.run(["jpegtran", "-arithmetic"], input=source, capture_output=True, check=True).stdout
    assert read_frame(arithmetic).marker == 0xC9
    for data in (source, jpeg(picture(80, 60), progressive=True), arithmetic):
        out = transcoder.transcode(data)
        assert parse_scans(out).num_scans == 10 and np.array_equal(pixels(out), pixels(data))
    with pytest.raises(BadImageError, match="jpegtran failed .*Premature end of JPEG file"):
        transcoder.transcode(source[: len(source) // 2], name="half.jpg")
    data, reason = source_bytes(with_junk(source), "x.jpg", transcoder)
    assert data is None and reason.startswith("jpegtran failed (") and "extraneous bytes" in reason


@needs_jpegtran
@pytest.mark.skipif(turbo_transform(jpeg(picture(16, 16))) is None, reason="libturbojpeg does not load here")
def test_the_in_process_transform_writes_jpegtrans_bytes_and_leaves_what_it_declines_to_jpegtran():
    """libturbojpeg's tjTransform is jpegtran's transform without a process per image: the same bytes, and a source
    libjpeg warns about is declined, so the jpegtran process still decides (and words) the failure."""
    sources = [jpeg(picture(83, 61)), jpeg(picture(83, 61), subsampling=0), jpeg(picture(83, 61), progressive=True),
               jpeg(picture(83, 61, mode="L")), jpeg(picture(64, 48), quality=60)]
    for data in sources:
        tool = subprocess.run(["jpegtran", "-copy", "none", "-optimize", "-progressive"], input=data,
                              capture_output=True, check=True).stdout
        assert turbo_transform(data) == tool
    assert turbo_transform(with_junk(sources[0])) is None and turbo_transform(sources[0][:300]) is None


def test_mozjpeg_transcodes_losslessly_to_a_progressive_file_with_its_own_scan_script():
    pytest.importorskip("mozjpeg_lossless_optimization")
    transcoder = Transcoder("mozjpeg", note="jpegtran missing: mozjpeg lossless transcode (its scan script)")
    for img in (picture(120, 90), picture(120, 90, mode="L")):
        source = jpeg(img)
        data, reason = source_bytes(source, "a.jpg", transcoder)
        assert reason == transcoder.note and parse_scans(data).progressive
        assert np.array_equal(pixels(data), pixels(source)) and len(data) <= len(source)
    _, reason = source_bytes(oriented(picture(64, 48), 6), "r.jpg", transcoder)
    assert reason_rule(reason) == "jpegtran missing" and "orientation 6" in reason


def test_non_jpeg_and_bomb_sources(tmp_path):
    buf = io.BytesIO()
    picture().save(buf, "PNG")
    assert source_bytes(buf.getvalue(), "a.png", find_transcoder()) == (None, "not a JPEG source (PNG)")
    assert source_bytes(b"text", "a.jpg", find_transcoder()) == (None, "not a JPEG source (not identified)")
    with pytest.raises(BadImageError, match="decompression bomb: 96x64 = 6144 pixels > max_pixels 6000"):
        source_bytes(jpeg(picture()), "big.jpg", find_transcoder(), max_pixels=6000)
    assert source_bytes(jpeg(picture()), "a.jpg", None) == (
        None, "jpegtran missing (and mozjpeg-lossless-optimization not installed)")


XMP_ROTATED = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
               b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF>'
               b"</x:xmpmeta>")


@needs_jpegtran
def test_an_orientation_given_only_in_xmp_is_applied_as_the_reencode_path_would():
    """Pillow's exif_transpose (the re-encode path) reads XMP's tiff:Orientation too: the transcode must agree."""
    buf = io.BytesIO()
    picture(64, 48).save(buf, "JPEG", quality=90, xmp=XMP_ROTATED)
    data, reason = source_bytes(buf.getvalue(), "x.jpg", find_transcoder())
    assert Image.open(io.BytesIO(data)).size == (48, 64) and reason.startswith("EXIF orientation applied")


def test_the_mozjpeg_route_refuses_what_libjpeg_warns_about_and_custom_scan_scripts():
    """mozjpeg would return a truncated source grey-filled as if it were whole; the check before it says why not."""
    mozjpeg = Transcoder("mozjpeg", note="jpegtran missing: mozjpeg lossless transcode (its scan script)")
    source = jpeg(picture(80, 60))
    with pytest.raises(BadImageError, match="refused: libjpeg warns"):
        mozjpeg.transcode(source[: 2 * len(source) // 3], name="cut.jpg")
    data, reason = source_bytes(source, "a.jpg", mozjpeg, scans="script.txt")
    assert data is None and reason.startswith("a custom scan script needs jpegtran")


def test_a_jpegtran_that_cannot_start_is_a_transcode_failure_not_a_lost_image(tmp_path):
    gone = Transcoder("jpegtran", path=str(tmp_path / "no-jpegtran"))
    with pytest.raises(BadImageError, match="jpegtran failed"):
        gone.transcode(jpeg(picture(32, 32)), name="a.jpg", orientation=6)  # a rotation always takes the process


def test_a_jpegtran_that_is_not_libjpeg_turbos_is_not_used(tmp_path, monkeypatch):
    """mozjpeg ships a `jpegtran` with another default progressive script: the store's layout would silently change."""
    fake = tmp_path / "jpegtran"
    fake.write_text("#!/bin/sh\necho 'mozjpeg version 4.1.1 (build 20230101)' >&2\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    transcoder = find_transcoder()
    assert transcoder is None or transcoder.name == "mozjpeg"
    assert "libjpeg-turbo's jpegtran not found" in fallback_notice(transcoder, 90)
