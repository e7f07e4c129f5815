"""Scan indexing of progressive JPEGs, checked against independent readings; source normalisation."""

import io
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile
from skimage.metrics import structural_similarity

from dynres.errors import BadImageError
from dynres.io.jpeg import (
    encode_progressive,
    load_rgb,
    parse_scans,
    prefix_crc32s,
    scan_components,
    scan_prefix,
)


def picture(w=96, h=64, seed=0) -> Image.Image:
    """A natural-ish image: smooth gradients, a few discs and mild noise (pure noise has no structure)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], axis=-1)
    for _ in range(4):
        cx, cy, r = rng.integers(0, w), rng.integers(0, h), rng.integers(5, 20)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.integers(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def decodes(data: bytes) -> Image.Image:
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    img = Image.open(io.BytesIO(data))
    img.load()  # raises on a truncated or malformed stream
    return img


def next_marker_after(data: bytes, sos: int) -> int:
    """Independent of parse_scans: scan bytes one by one from the SOS header for the first real marker."""
    i = sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")
    while not (data[i] == 0xFF and data[i + 1] not in (0x00, *range(0xD0, 0xD8))):
        i += 1
    return i


@pytest.mark.parametrize(
    "mode,kw,expected",
    [("RGB", {}, 10), ("L", {}, 6), ("RGB", {"restart_marker_blocks": 2}, 10), ("RGB", {"subsampling": 0}, 10)],
)
def test_scan_ends_agree_with_an_independent_reading(mode, kw, expected):
    data = jpeg(picture().convert(mode), progressive=True, **kw)
    layout = parse_scans(data)
    assert layout.progressive and layout.num_scans == expected
    assert (layout.width, layout.height, layout.components) == (96, 64, 3 if mode == "RGB" else 1)
    sos = [i for i in range(len(data) - 1) if data[i : i + 2] == b"\xff\xda"]
    assert len(sos) == expected  # FF DA cannot occur inside entropy data (FF is always stuffed)
    assert list(layout.scan_ends[:-1]) == [next_marker_after(data, s) for s in sos[:-1]]
    assert layout.scan_ends[-1] == len(data)
    for k in range(1, expected + 1):
        img = decodes(scan_prefix(data, layout.scan_ends, k))
        assert img.size == (96, 64)


def test_full_prefix_is_the_file_and_partial_prefix_ends_with_eoi():
    data = jpeg(picture(), progressive=True)
    ends = parse_scans(data).scan_ends
    assert scan_prefix(data, ends, 10) == data and scan_prefix(data, ends, 99) == data
    assert scan_prefix(data, ends, 3) == data[: ends[2]] + b"\xff\xd9"


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_scan_components_are_read_from_each_sos_header(mode):
    data = jpeg(picture().convert(mode), progressive=True)
    ends = parse_scans(data).scan_ends
    comps = scan_components(data, ends)
    sos = [i for i in range(len(data) - 1) if data[i : i + 2] == b"\xff\xda"]
    # independent reading: the SOS header lists Ns component selectors, each followed by a table byte
    assert [ids for _, ids in comps] == [data[s + 5 : s + 5 + 2 * data[s + 4] : 2] for s in sos]
    first = {first for first, _ in comps}
    assert len(first) == 1 and first <= set(comps[0][1])  # the frame's first component: Y, in the first (DC) scan
    with pytest.raises(BadImageError, match="cut.jpg: no SOS header for scan"):
        scan_components(data[: ends[0]], ends, "cut.jpg")


def test_prefix_crcs_are_crcs_of_each_prefix():
    data = jpeg(picture(), progressive=True)
    ends = parse_scans(data).scan_ends
    assert prefix_crc32s(data, ends) == [zlib.crc32(data[:e]) for e in ends]


def test_ssim_to_the_full_decode_rises_with_scans():
    data = encode_progressive(picture(128, 96), quality=90)
    ends = parse_scans(data).scan_ends
    full = np.asarray(decodes(data).convert("L"), dtype=np.float64)
    ssim = [
        structural_similarity(
            np.asarray(decodes(scan_prefix(data, ends, k)).convert("L"), dtype=np.float64), full,
            data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
        )
        for k in range(1, len(ends) + 1)
    ]
    assert ssim[-1] == pytest.approx(1.0)
    assert ssim[0] < 0.9
    assert all(b >= a - 1e-3 for a, b in zip(ssim, ssim[1:])), ssim


def test_baseline_jpeg_is_one_non_progressive_scan():
    layout = parse_scans(jpeg(picture()))
    assert not layout.progressive and layout.num_scans == 1


@pytest.mark.parametrize(
    "cut,reason",
    [
        (lambda d: b"GIF89a" + d[6:], "not a JPEG"),
        (lambda d: d[: len(d) // 2], "truncated"),
        (lambda d: d[:-2], "scan 10 has no end marker"),
        (lambda d: d[:3], "not a JPEG"),
    ],
)
def test_malformed_jpegs_are_rejected_with_the_file_name(cut, reason):
    data = jpeg(picture(), progressive=True)
    with pytest.raises(BadImageError, match=reason) as err:
        parse_scans(cut(data), "cat/x.jpg")
    assert err.value.subject == "cat/x.jpg"


# ------------------------------------------------------------------ load_rgb: every source becomes upright RGB


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(64 * 32, dtype=np.uint32).reshape(32, 64) * 32).astype(np.uint16)  # 0..65504
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    rgb = np.asarray(load_rgb(str(tmp_path / "deep.png")))
    assert rgb.shape == (32, 64, 3)
    assert rgb.max() == 255 and rgb[0, 0, 0] == 0 and 120 < rgb[16, 0, 0] < 135  # mid-ramp stays mid-grey


def test_alpha_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.save(tmp_path / "a.png")
    rgb = load_rgb(str(tmp_path / "a.png"))
    assert rgb.mode == "RGB" and rgb.getpixel((1, 1)) == (255, 255, 255) and rgb.getpixel((0, 0)) == (255, 0, 0)


def test_palette_transparency_and_cmyk_and_grayscale_become_rgb(tmp_path):
    p = Image.new("P", (8, 8), 1)
    p.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    p.save(tmp_path / "p.png", transparency=1)
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    Image.new("L", (8, 8), 77).save(tmp_path / "g.bmp")
    assert load_rgb(str(tmp_path / "p.png")).getpixel((3, 3)) == (255, 255, 255)
    r, g, b = load_rgb(str(tmp_path / "c.jpg")).getpixel((3, 3))
    assert r > 200 and g < 60 and b < 60  # CMYK (0, 255, 255, 0) is red
    assert load_rgb(str(tmp_path / "g.bmp")).getpixel((3, 3)) == (77, 77, 77)


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    picture(40, 20).save(tmp_path / "r.jpg", exif=exif)
    assert load_rgb(str(tmp_path / "r.jpg")).size == (20, 40)


def test_max_side_caps_the_long_side(tmp_path):
    picture(120, 60).save(tmp_path / "big.png")
    assert load_rgb(str(tmp_path / "big.png"), max_side=50).size == (50, 25)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    picture(100, 100).save(tmp_path / "bomb.png")
    with pytest.raises(BadImageError, match="decompression bomb.*10000 pixels"):
        load_rgb(str(tmp_path / "bomb.png"), max_pixels=9_999)
