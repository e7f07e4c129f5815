"""decode: DCT-scaled decode of scan prefixes to the inference resolution."""

import io
import re

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from skimage.metrics import structural_similarity

from dynres.errors import BadImageError, ConfigError
from dynres.io.decode import (
    DECODER_ENV,
    PrefixViews,
    ScaledDecodes,
    active_decoder,
    dct_scale,
    decode,
    decode_array,
    decode_baseline,
    decode_image,
    decode_scaled,
    decode_short_side,
    decode_train,
    draft_size,
    set_decoder,
)
from dynres.io.jpeg import EOI
from dynres.paper import crop_side


@pytest.fixture(scope="module")
def photo_jpeg() -> bytes:
    """A real photo (scikit-image's astronaut, 700x500) as a progressive JPEG."""
    img = Image.fromarray(skdata.astronaut()).resize((700, 500))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, progressive=True)
    return buf.getvalue()


def prefixes(jpeg: bytes) -> list[bytes]:
    """Scan prefixes found naively (each SOS marker starts a scan) — independent of the store's indexer."""
    starts = [m.start() for m in re.finditer(b"\xff\xda", jpeg)]
    return [jpeg[:end] + EOI for end in starts[1:]] + [jpeg]


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    return structural_similarity(
        a.numpy(), b.numpy(), channel_axis=0, data_range=255, gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False,
    )


def test_decode_gives_uint8_square_at_the_resolution(photo_jpeg):
    for res in (112, 224, 448):
        t = decode(photo_jpeg, res)
        assert t.shape == (3, res, res) and t.dtype == torch.uint8


def test_dct_scaled_decode_matches_the_full_decode_baseline(photo_jpeg):
    for res in (112, 224):
        fast, slow = decode(photo_jpeg, res), decode_baseline(photo_jpeg, res)
        assert fast.shape == slow.shape
        assert ssim(fast, slow) > 0.85  # same content; DCT-domain scaling and sub-pixel rounding differ slightly
        assert (fast.float() - slow.float()).abs().mean() < 5


def test_draft_never_decodes_smaller_than_the_resize_needs(photo_jpeg):
    for res, side in ((112, 0.875), (224, 0.5), (448, 1.0)):
        img = Image.open(io.BytesIO(photo_jpeg))
        need = res / side
        img.draft("RGB", draft_size(*img.size, need))
        assert min(img.size) >= need or img.size == (700, 500)


def test_smaller_crop_magnifies_the_centre(photo_jpeg):
    wide, tight = decode_image(photo_jpeg, 64, crop_side=1.0), decode_image(photo_jpeg, 64, crop_side=0.25)
    assert np.asarray(wide).shape == np.asarray(tight).shape == (64, 64, 3)
    assert not np.array_equal(np.asarray(wide), np.asarray(tight))
    with pytest.raises(ValueError, match="crop_side"):
        decode(photo_jpeg, 64, crop_side=0.0)


def test_ssim_to_full_decode_rises_with_scans_and_reaches_one(photo_jpeg):
    full = decode(photo_jpeg, 224)
    scores = [ssim(decode(p, 224), full) for p in prefixes(photo_jpeg)]
    assert len(scores) == 10
    assert scores[-1] == pytest.approx(1.0)
    assert scores[0] < 0.97
    # non-decreasing up to small noise from chroma/luma refinement order
    assert all(b >= a - 0.01 for a, b in zip(scores, scores[1:]))
    assert scores[4] > scores[0]


def test_paper_crop_areas_convert_to_side_ratios():
    assert crop_side(0.25) == pytest.approx(0.5)
    assert crop_side(1.0) == 1.0
    with pytest.raises(ValueError):
        crop_side(0)


def test_train_views_are_random_but_seeded(photo_jpeg):
    torch.manual_seed(0)
    a = decode_train(photo_jpeg, 64)
    torch.manual_seed(0)
    b = decode_train(photo_jpeg, 64)
    c = decode_train(photo_jpeg, 64)
    assert a.shape == (3, 64, 64) and torch.equal(a, b) and not torch.equal(b, c)


# --- the decoder: libjpeg-turbo through simplejpeg by default, Pillow's pixels; Pillow as the fallback ----------


@pytest.fixture(params=["simplejpeg", "pillow"])
def decoder(request, monkeypatch):
    """Each test runs with both decoders, chosen the public way (the environment variable workers inherit)."""
    monkeypatch.setenv(DECODER_ENV, request.param)
    assert active_decoder()[0] == request.param
    return request.param


def jpeg(kind: str, size: tuple[int, int] = (701, 499), progressive: bool = True) -> bytes:
    """The astronaut at an odd size (partial MCUs at every scale) as a 4:2:0 / 4:4:4 colour or grayscale JPEG."""
    img = Image.fromarray(skdata.astronaut()).resize(size)
    buf = io.BytesIO()
    if kind == "gray":
        img.convert("L").save(buf, "JPEG", quality=90, progressive=progressive)
    else:
        img.save(buf, "JPEG", quality=90, progressive=progressive, subsampling=kind)
    return buf.getvalue()


def pillow_draft(data: bytes, scale: int, mode: str) -> np.ndarray:
    """Pillow's own DCT-scaled decode, asked for 1/scale directly: the reference pixels."""
    img = Image.open(io.BytesIO(data))
    img.draft(mode, (img.size[0] // scale, img.size[1] // scale))
    return np.asarray(img if img.mode == mode else img.convert(mode))


def short_side_for(data: bytes, scale: int) -> int:
    w, h = Image.open(io.BytesIO(data)).size
    return next(s for s in range(min(w, h) // scale, 0, -1) if dct_scale(w, h, s) == scale)


def test_the_default_decoder_is_simplejpeg(monkeypatch):
    monkeypatch.delenv(DECODER_ENV, raising=False)
    assert active_decoder()[0] == "simplejpeg"


@pytest.mark.parametrize("kind", ["4:2:0", "4:4:4", "gray"])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_every_prefix_at_every_dct_scale_gives_pillows_pixels(decoder, kind, mode):
    data = jpeg(kind)
    pres = prefixes(data)
    assert len(pres) == (6 if kind == "gray" else 10)
    for scale in (1, 2, 4, 8):
        side = short_side_for(data, scale)
        for k, prefix in enumerate(pres, 1):
            got, want = decode_array(prefix, side, mode=mode), pillow_draft(prefix, scale, mode)
            assert got.dtype == np.uint8 and got.shape == want.shape == (
                (-(-499 // scale), -(-701 // scale), 3) if mode == "RGB" else (-(-499 // scale), -(-701 // scale)))
            assert np.array_equal(got, want), f"{kind} {mode}: {k} scans at 1/{scale}"


def test_dct_scale_is_pillow_drafts_choice():
    """The scale follows Image.draft for draft_size(...), including where floor division picks a smaller scale
    than the short side alone would (701 // 351 = 1)."""
    assert dct_scale(700, 500, 128) == 2 and dct_scale(701, 499, 250) == 1 and dct_scale(701, 499, 249) == 2
    for w, h in ((701, 499), (64, 64), (97, 131), (1000, 333)):
        for side in range(1, max(w, h) + 2, 7):
            img = Image.new("RGB", (w, h))
            buf = io.BytesIO()
            img.save(buf, "JPEG")
            drafted = Image.open(io.BytesIO(buf.getvalue()))
            drafted.draft("RGB", draft_size(w, h, side))
            scale = dct_scale(w, h, side)
            assert drafted.size == (-(-w // scale), -(-h // scale)), (w, h, side)


def test_both_decoders_give_the_same_tensors_on_every_path(photo_jpeg, monkeypatch):
    def outputs():
        torch.manual_seed(0)
        return [decode(p, r, c) for p in prefixes(photo_jpeg)[::3] for r in (56, 112, 224) for c in (0.5, 0.875)] + [
            decode_scaled(photo_jpeg, 100), decode_short_side(photo_jpeg, 96, True), decode_train(photo_jpeg, 64)]

    monkeypatch.setenv(DECODER_ENV, "pillow")
    slow = outputs()
    monkeypatch.setenv(DECODER_ENV, "simplejpeg")
    fast = outputs()
    assert all(torch.equal(a, b) for a, b in zip(slow, fast))


def test_set_decoder_overrides_the_environment_in_this_process(photo_jpeg, monkeypatch):
    monkeypatch.setenv(DECODER_ENV, "simplejpeg")
    set_decoder("pillow")
    try:
        assert active_decoder() == ("pillow", "asked for")
        slow = decode_scaled(photo_jpeg, 200)
    finally:
        set_decoder(None)
    assert active_decoder()[0] == "simplejpeg"
    assert torch.equal(slow, decode_scaled(photo_jpeg, 200))
    with pytest.raises(ConfigError, match="unknown decoder"):
        set_decoder("libjpeg")
    monkeypatch.setenv(DECODER_ENV, "turbo")
    with pytest.raises(ConfigError, match=DECODER_ENV):
        decode(photo_jpeg, 64)


def test_a_decoded_view_is_channels_last_memory_without_a_copy(photo_jpeg):
    t = decode_scaled(photo_jpeg, 100)
    assert t.shape == (3, 125, 175) and t.stride() == (1, 175 * 3, 3)  # 1/4 scale of 700x500


def test_inputs_simplejpeg_does_not_take_like_pillow_are_decoded_by_pillow(decoder):
    """CMYK (Pillow's own conversion), MPO (a JPEG with a second picture) and PNG all decode to the same pixels,
    whichever decoder is chosen."""
    rgb = Image.fromarray(skdata.astronaut()).resize((160, 120))
    cmyk, mpo, png = io.BytesIO(), io.BytesIO(), io.BytesIO()
    rgb.convert("CMYK").save(cmyk, "JPEG", quality=90)
    rgb.save(mpo, "MPO", save_all=True, append_images=[rgb.rotate(90)])
    rgb.save(png, "PNG")
    for data, size in ((cmyk, (60, 80)), (mpo, (60, 80)), (png, (120, 160))):  # JPEGs at 1/2 scale
        got = decode_array(data.getvalue(), 50)
        assert got.shape == (*size, 3)
        img = Image.open(io.BytesIO(data.getvalue()))
        if img.format in ("JPEG", "MPO"):
            img.draft("RGB", draft_size(*img.size, 50))
        assert np.array_equal(got, np.asarray(img.convert("RGB")))


def test_corrupt_entropy_data_decodes_as_pillow_decodes_it(decoder, photo_jpeg):
    """libjpeg warns (bad Huffman code) and simplejpeg refuses; Pillow decodes what it can, as before."""
    broken = bytearray(photo_jpeg)
    mid = len(broken) // 2
    broken[mid : mid + 64] = bytes(range(64))
    got = decode_array(bytes(broken), 200)
    assert np.array_equal(got, pillow_draft(bytes(broken), 2, "RGB"))


def test_more_pixels_than_pillows_limit_is_refused_by_either_decoder(decoder, photo_jpeg, monkeypatch):
    import warnings

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    filters = list(warnings.filters)
    with pytest.raises(BadImageError, match="cat/001.*decompression bomb"):
        decode(photo_jpeg, 64, name="cat/001")
    assert warnings.filters == filters  # no process-wide warning filter touched: decoding runs on many threads


@pytest.mark.parametrize("payload", ["empty", "text", "garbage", "truncated", "prefix without EOI"])
def test_bad_bytes_raise_a_clear_error_naming_the_image(decoder, photo_jpeg, payload):
    data = {"empty": b"", "text": b"not an image at all", "garbage": b"\xff\xd8\xff\xe0garbage",
            "truncated": photo_jpeg[: len(photo_jpeg) // 2], "prefix without EOI": prefixes(photo_jpeg)[2][:-2]}
    with pytest.raises(BadImageError, match="cat/001"):
        decode(data[payload], 112, name="cat/001")
    with pytest.raises(BadImageError, match="cat/001"):
        decode_array(data[payload], 40, name="cat/001", mode="L")


def test_scaled_decodes_give_each_engines_pixels_for_one_decode_per_dct_scale(photo_jpeg, monkeypatch):
    """``ScaledDecodes.view`` is ``decode`` (the static engine's view) and, given the short side a decode-once
    covers, ``PrefixViews``' view (the dynamic engine's), while decoding each DCT scale once."""
    import dynres.io.decode as dec

    decodes = ScaledDecodes(photo_jpeg)
    calls = []
    real = dec.decode_scaled
    monkeypatch.setattr(dec, "decode_scaled", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    views = {(r, side, once): decodes.view(r, side, 224 / side if once else None)
             for side in (0.5, 0.75, 1.0) for r in (56, 112, 224) for once in (False, True)}
    monkeypatch.undo()
    assert len(calls) == len({dct_scale(700, 500, s) for s in calls}) <= 4  # one decode per scale used
    for (r, side, once), view in views.items():
        engine = PrefixViews(photo_jpeg, 224 / side).view(r, side) if once else decode(photo_jpeg, r, side)
        assert torch.equal(view, engine), (r, side, once)
