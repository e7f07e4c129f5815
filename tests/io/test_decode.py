"""decode: DCT-scaled decode of scan prefixes to the inference resolution."""

import io
import re

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from skimage.metrics import structural_similarity

from dynres.errors import BadImageError
from dynres.io.decode import decode, decode_baseline, decode_image, decode_train, draft_size
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


@pytest.mark.parametrize("payload", [b"", b"not an image at all", b"\xff\xd8\xff\xe0garbage"])
def test_bad_bytes_raise_a_clear_error_naming_the_image(payload):
    with pytest.raises(BadImageError, match="cat/001"):
        decode(payload, 112, name="cat/001")
