"""service.image_check on real generated files: what passes decodes like the original in the
model's own decoder, what is refused is refused before decoding with a message that says why."""

import io
import time

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from support.bad_images import INVALID, ODD_VALID, exif_rotated_jpeg, photo, png_bomb
from support.images import encode

from service.errors import GraftError, ImageTooLarge, InvalidImage, UnsupportedMediaType
from service.image_check import CheckedImage, check_image, describe_bytes, sniff_format
from service.settings import GraftSettings
from training.preprocess import decode_and_resize, decode_rgb

LIMIT = GraftSettings().max_image_pixels


def model_view(data: bytes, size: int = 32) -> np.ndarray:
    """What a graft SavedModel sees: the shared decode + resize."""
    return decode_and_resize(tf.constant(data), size).numpy()


@pytest.mark.parametrize("name", sorted(ODD_VALID))
def test_unusual_but_valid_images_pass_and_decode(name: str) -> None:
    data = ODD_VALID[name]()
    checked = check_image(data, max_pixels=LIMIT)
    pixels = decode_rgb(tf.constant(checked.data)).numpy()
    assert pixels.shape[2] == 3 and pixels.size > 0
    if checked.reencoded is None:
        assert checked.data is data


@pytest.mark.parametrize("name", ["cmyk.jpg", "palette.bmp", "1bit.bmp", "palette.png"])
def test_model_sees_the_same_colours_as_an_image_viewer(name: str) -> None:
    data = ODD_VALID[name]()
    checked = check_image(data, max_pixels=LIMIT)
    seen = decode_rgb(tf.constant(checked.data)).numpy().astype(np.int16)
    viewer = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.int16)
    assert seen.shape == viewer.shape
    assert np.abs(seen - viewer).mean() < 2.0, "decoded colours drift from the file's colours"


def test_palette_bmp_is_reencoded_because_tensorflow_ignores_its_palette() -> None:
    data = ODD_VALID["palette.bmp"]()
    raw = decode_rgb(tf.constant(data)).numpy().astype(np.int16)
    viewer = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.int16)
    assert np.abs(raw - viewer).mean() > 10  # the reason re-encoding exists
    assert check_image(data, max_pixels=LIMIT).reencoded


def test_plain_bmp_png_gif_jpeg_pass_through_untouched() -> None:
    for fmt in ("BMP", "PNG", "GIF", "JPEG"):
        data = encode(photo(), fmt)
        checked = check_image(data, max_pixels=LIMIT)
        assert checked.data is data and checked.reencoded is None
        assert (checked.format, checked.width, checked.height) == (fmt.lower(), 64, 48)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_rotated_jpeg_reaches_the_model_upright(orientation: int) -> None:
    upright = photo(48, 64)
    rotated = exif_rotated_jpeg(upright, orientation)
    plain = model_view(rotated)
    checked = check_image(rotated, max_pixels=LIMIT)
    assert checked.reencoded == f"exif orientation {orientation} applied"
    expected = model_view(encode(upright, "JPEG", quality=95))
    assert np.abs(model_view(checked.data) - expected).mean() < 3.0
    assert np.abs(plain - expected).mean() > 20, "test image must look different when rotated"


def test_large_exif_photo_is_decoded_at_reduced_scale_but_looks_the_same() -> None:
    upright = photo(3200, 2400, seed=3)
    checked = check_image(exif_rotated_jpeg(upright, 6), max_pixels=LIMIT)
    reencoded = Image.open(io.BytesIO(checked.data))
    assert reencoded.size == (1200, 1600)  # JPEG decoded at 1/2: shorter side stays >= 1024
    expected = model_view(encode(upright, "JPEG", quality=95), 224)
    assert np.abs(model_view(checked.data, 224) - expected).mean() < 2.0


def test_orientation_1_and_broken_exif_are_passed_through() -> None:
    exif = Image.Exif()
    exif[0x0112] = 1
    normal = encode(photo(), "JPEG", exif=exif)
    assert check_image(normal, max_pixels=LIMIT).data is normal
    broken = encode(photo(), "JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff")
    assert check_image(broken, max_pixels=LIMIT).data is broken


@pytest.mark.parametrize("name", sorted(INVALID))
def test_bad_uploads_are_refused_with_a_clear_4xx(name: str) -> None:
    make, status = INVALID[name]
    with pytest.raises(GraftError) as caught:
        check_image(make(), max_pixels=LIMIT, index=3)
    assert caught.value.http_status == status
    assert caught.value.message.startswith("image 3 ")
    assert len(caught.value.message) > 40  # says what to do, not just "invalid"


@pytest.mark.parametrize(
    ("name", "named"),
    [
        ("html.jpg", "HTML"),
        ("zip.jpg", "ZIP"),
        ("pdf.jpg", "PDF"),
        ("pickle.jpg", "pickle"),
        ("webp.jpg", "WebP"),
        ("text.jpg", "plain text"),
    ],
)
def test_415_names_what_was_actually_sent(name: str, named: str) -> None:
    with pytest.raises(UnsupportedMediaType, match=named) as caught:
        check_image(INVALID[name][0](), max_pixels=LIMIT)
    assert "JPEG, PNG, BMP or GIF" in caught.value.message


def test_truncation_and_corruption_messages_say_so() -> None:
    with pytest.raises(InvalidImage, match="truncated JPEG"):
        check_image(INVALID["truncated.jpg"][0](), max_pixels=LIMIT)
    with pytest.raises(InvalidImage, match=r"damaged or truncated .*checksum"):
        check_image(INVALID["bad-crc.png"][0](), max_pixels=LIMIT)
    with pytest.raises(InvalidImage, match=r"is empty \(0 bytes\)"):
        check_image(b"", max_pixels=LIMIT)


def test_decompression_bomb_is_refused_from_the_header_alone() -> None:
    bomb = png_bomb(20_000, 20_000)
    assert len(bomb) < 200_000
    started = time.perf_counter()
    with pytest.raises(ImageTooLarge, match=r"400000000 pixels.*limit is 40 megapixels"):
        check_image(bomb, max_pixels=LIMIT)
    assert time.perf_counter() - started < 0.5, "the bomb was decoded"


def test_moderate_bomb_is_refused_by_graft_limit_with_its_size() -> None:
    # Under Pillow's own guard (~179 MP) graft's limit is the one that fires.
    with pytest.raises(ImageTooLarge, match=r"10000x6000 = 60\.0 megapixels.*40 megapixel"):
        check_image(png_bomb(10_000, 6_000), max_pixels=LIMIT)


def test_pixel_limit_is_inclusive() -> None:
    data = encode(Image.new("RGB", (20, 10)), "PNG")
    assert check_image(data, max_pixels=200).width == 20
    with pytest.raises(ImageTooLarge, match="20x10"):
        check_image(data, max_pixels=199)


def check_images(images: list[bytes], *, max_pixels: int) -> list[CheckedImage]:
    """What the gateway does with a request's images: each checked with its position."""
    return [check_image(data, max_pixels=max_pixels, index=i) for i, data in enumerate(images)]


def test_check_images_names_the_failing_position() -> None:
    good = encode(photo(), "PNG")
    with pytest.raises(UnsupportedMediaType, match=r"^image 2 is PDF"):
        check_images([good, good, b"%PDF-1.4 ..."], max_pixels=LIMIT)
    assert len(check_images([good, good], max_pixels=LIMIT)) == 2


def test_sniffing_ignores_everything_but_the_bytes() -> None:
    assert sniff_format(encode(photo(), "GIF")) == "gif"
    assert sniff_format(b"\x89PNG\r\n\x1a") is None  # one byte short of the signature
    assert describe_bytes(b"\x00\x01\x02\x03\x04") == "unknown (starts 00 01 02 03 04)"


# --- fuzzing: whatever the bytes, only GraftErrors with a 4xx status may escape -------------

SEEDS = [encode(photo(24, 20, seed=s), fmt) for s, fmt in enumerate(["PNG", "JPEG", "GIF", "BMP"])]
SEEDS.append(exif_rotated_jpeg(photo(24, 20)))
PREFIXES = [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"GIF87a", b"BM", b""]


def assert_only_client_errors(data: bytes) -> None:
    try:
        checked = check_image(data, max_pixels=4_000_000)
    except GraftError as error:
        assert 400 <= error.http_status < 500, error
        assert error.message
    else:
        assert checked.data and checked.width >= 1 and checked.height >= 1


FUZZ = settings(
    max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
# Forged headers legitimately trip Pillow's bomb warning and its corrupt-EXIF warning.
pytestmark = [
    pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning"),
    pytest.mark.filterwarnings("ignore:Corrupt EXIF data"),
    pytest.mark.filterwarnings("ignore:Metadata Warning"),
]


@FUZZ
@given(prefix=st.sampled_from(PREFIXES), tail=st.binary(max_size=512))
def test_fuzz_random_bytes_behind_every_magic(prefix: bytes, tail: bytes) -> None:
    assert_only_client_errors(prefix + tail)


@FUZZ
@given(
    seed=st.sampled_from(SEEDS),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=8),
    cut=st.integers(0, 10**6),
)
def test_fuzz_mutated_real_images(seed: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(seed)
    for position, mask in flips:
        data[position % len(data)] ^= mask
    assert_only_client_errors(bytes(data[: max(1, cut % (len(data) + 1))]))


@FUZZ
@given(
    seed=st.sampled_from(SEEDS),
    width=st.integers(0, 2**31),
    height=st.integers(0, 2**31),
)
def test_fuzz_forged_dimensions(seed: bytes, width: int, height: int) -> None:
    """Header sizes are attacker-controlled: forge them in the PNG/GIF/BMP headers."""
    data = bytearray(seed)
    if data.startswith(b"\x89PNG"):
        data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    elif data.startswith(b"GIF"):
        data[6:10] = (width % 65536).to_bytes(2, "little") + (height % 65536).to_bytes(2, "little")
    elif data.startswith(b"BM"):
        data[18:26] = (width % 2**31).to_bytes(4, "little") + (height % 2**31).to_bytes(4, "little")
    assert_only_client_errors(bytes(data))
