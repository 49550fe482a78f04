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
from support.bad_images import (
    INVALID,
    ODD_VALID,
    animated_gif,
    exif_rotated_jpeg,
    gif_frames,
    photo,
    png_bomb,
)
from support.images import encode

from service.errors import GraftError, ImageTooLarge, InvalidImage, UnsupportedMediaType
from service.image_check import (
    CheckedImage,
    check_image,
    describe_bytes,
    header_cost,
    sniff_format,
)
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


@pytest.mark.parametrize(
    "make",
    [
        lambda: exif_rotated_jpeg(photo(3200, 2400, seed=3), 6),  # drafted to 1200x1600
        lambda: exif_rotated_jpeg(photo(8000, 300), 6),  # too narrow to draft
        lambda: ODD_VALID["palette.bmp"](),
        lambda: ODD_VALID["1bit.bmp"](),
        lambda: encode(photo(), "PNG"),
        lambda: encode(photo(), "JPEG"),
    ],
)
def test_header_cost_says_what_check_image_re_encodes(make) -> None:
    """The gateway's budgets trust `header_cost` to foresee, without decoding, the pixels
    `check_image` stores and re-encodes."""
    data = make()
    cost, checked = header_cost(data), check_image(data, max_pixels=LIMIT)
    assert cost.pixels == checked.width * checked.height
    if checked.reencoded is None:
        assert cost.reencoded_pixels == 0
    else:
        with Image.open(io.BytesIO(checked.data)) as reencoded:
            assert cost.reencoded_pixels == reencoded.width * reencoded.height > 0


def test_header_cost_of_unreadable_bytes_is_nothing() -> None:
    for data in (b"", b"hello", b"\x89PNG\r\n\x1a\n" + bytes(30), b"\xff\xd8\xff" + bytes(9)):
        assert header_cost(data).pixels == header_cost(data).reencoded_pixels == 0


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


# --- GIF: TensorFlow's decoder reads every frame, so every frame header is checked -------------


def test_tensorflow_sizes_a_gif_from_its_widest_and_tallest_frames_not_the_canvas() -> None:
    """Why the check reads every frame: measured, not assumed."""
    data = gif_frames((1, 1), [(1, 1), (30, 1), (1, 20)], real_pixels=True)
    assert Image.open(io.BytesIO(data)).size == (1, 1)  # what the old first-frame check saw
    assert decode_rgb(tf.constant(data)).numpy().shape == (20, 30, 3)
    assert check_image(data, max_pixels=600).width == 1
    with pytest.raises(ImageTooLarge, match=r"decode to 30x20 .*widest frame is frame 1.*tallest"):
        check_image(data, max_pixels=599)


def test_1x1_gif_with_a_huge_second_frame_is_refused_before_decoding() -> None:
    bomb = gif_frames((1, 1), [(1, 1), (30_000, 30_000)])
    started = time.perf_counter()
    with pytest.raises(ImageTooLarge, match=r"^image 2 .*frame 1 is 30000x30000 = 900\.0 megap"):
        check_image(bomb, max_pixels=LIMIT, index=2)
    assert time.perf_counter() - started < 0.5
    with pytest.raises(ImageTooLarge) as caught:
        check_image(bomb, max_pixels=LIMIT)
    assert (caught.value.code, caught.value.http_status) == ("image_too_large", 400)


def test_gif_frames_each_under_the_limit_but_together_over_it_are_refused() -> None:
    # Each frame is 8000 pixels; TensorFlow would allocate 8000x8000.
    with pytest.raises(ImageTooLarge, match=r"8000x8000 = 64\.0 megapixels"):
        check_image(gif_frames((1, 1), [(1, 1), (8000, 1), (1, 8000)]), max_pixels=LIMIT)


def test_gif_frames_holding_too_many_pixels_in_total_are_refused() -> None:
    # giflib holds every frame's raster at once: 4 x max_pixels in all is the budget.
    ok = gif_frames((10, 10), [(10, 10)] * 4, real_pixels=True)
    assert check_image(ok, max_pixels=100).data is ok
    with pytest.raises(ImageTooLarge, match=r"first 5 frames hold .*first frame only"):
        check_image(gif_frames((10, 10), [(10, 10)] * 5, real_pixels=True), max_pixels=100)


def test_gif_with_more_frames_than_the_cap_is_refused() -> None:
    at_cap = gif_frames((1, 1), [(1, 1)] * 1000)
    assert check_image(at_cap, max_pixels=LIMIT).data is at_cap
    with pytest.raises(InvalidImage, match=r"more than 1000 frames.*send that frame as a PNG"):
        check_image(gif_frames((1, 1), [(1, 1)] * 1001), max_pixels=LIMIT)


def test_ordinary_animated_gifs_pass_untouched() -> None:
    frames = [photo(48, 64, seed=s).convert("P") for s in range(5)]
    made = encode(
        frames[0],
        "GIF",
        save_all=True,
        append_images=frames[1:],
        duration=80,
        loop=0,
        comment=b"made by Pillow",
        transparency=0,
        disposal=2,
    )
    for data in (made, animated_gif()):
        assert Image.open(io.BytesIO(data)).n_frames > 1
        checked = check_image(data, max_pixels=LIMIT)
        assert checked.data is data and (checked.width, checked.height) == (64, 48)
        assert decode_rgb(tf.constant(checked.data)).numpy().shape == (48, 64, 3)


def test_gif_truncated_inside_a_frame_descriptor_is_a_clear_400() -> None:
    data = animated_gif()
    second = data.index(b"\x2c", data.index(b"\x2c") + 1)
    while data[second - 1] != 0:  # the real descriptor follows the first frame's terminator
        second = data.index(b"\x2c", second + 1)
    with pytest.raises(InvalidImage, match=r"truncated GIF .*image descriptor of frame 1.*whole"):
        check_image(data[: second + 6], max_pixels=LIMIT)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GIF89a\x01\x00\x01", "logical screen descriptor"),
        (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00", "global colour table"),
        (gif_frames((1, 1), [])[:-1] + b"\x21\xf9\x04\x00\x00", "data sub-blocks"),
        (gif_frames((1, 1), []), "no frame"),
        (gif_frames((1, 1), [(1, 1)])[:-2], "data sub-blocks"),
    ],
    ids=["screen", "colour-table", "extension", "no-frame", "frame-data"],
)
def test_truncated_gif_headers_say_where_they_end(data: bytes, message: str) -> None:
    with pytest.raises(InvalidImage, match=rf"^image 0 is a truncated GIF .*{message}"):
        check_image(data, max_pixels=LIMIT)


def test_damaged_gif_blocks_are_refused_with_a_clear_400() -> None:
    junk = gif_frames((1, 1), [(1, 1)])[:-1] + b"\x00" + gif_frames((1, 1), [(1, 1)])[13 + 12 :]
    with pytest.raises(InvalidImage, match=r"damaged GIF \(byte \d+ is 0x00"):
        check_image(junk, max_pixels=LIMIT)
    with pytest.raises(InvalidImage, match=r"frame 1 is 0x5 and has no pixels"):
        check_image(gif_frames((1, 1), [(1, 1), (0, 5)]), max_pixels=LIMIT)
    # Without the trailer, both Pillow and TensorFlow decode it: so does graft.
    untrailed = gif_frames((1, 1), [(1, 1)])[:-1]
    assert check_image(untrailed, max_pixels=LIMIT).data is untrailed


def test_gif_made_of_tiny_sub_blocks_is_refused_quickly() -> None:
    # 16 MiB of 1-byte data sub-blocks: legal syntax no encoder writes, a loop turn each.
    head = gif_frames((1, 1), [])[:-1] + b"\x2c" + bytes(4) + b"\x01\x00\x01\x00\x00\x02"
    data = head + b"\x01\x4c" * (8 * 2**20) + b"\x00\x3b"
    started = time.perf_counter()
    with pytest.raises(InvalidImage, match=r"over 250000 data sub-blocks"):
        check_image(data, max_pixels=LIMIT)
    assert time.perf_counter() - started < 2.0


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
SEEDS.append(
    encode(
        photo(24, 20).convert("P"),
        "GIF",
        save_all=True,
        append_images=[Image.new("P", (24, 20), 2)] * 2,
    )
)
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


@FUZZ
@given(
    screen=st.tuples(st.integers(0, 65535), st.integers(0, 65535)),
    frames=st.lists(st.tuples(st.integers(0, 65535), st.integers(0, 65535)), max_size=6),
    cut=st.integers(0, 10**4),
)
def test_fuzz_gif_frame_descriptors(
    screen: tuple[int, int], frames: list[tuple[int, int]], cut: int
) -> None:
    """Every frame header is attacker-controlled: whatever passes must fit TensorFlow's output
    (widest x tallest frame) and each frame in the limit."""
    whole = gif_frames(screen, frames)
    data = whole[: cut % (len(whole) + 1)] or whole
    limit = 4_000_000
    try:
        check_image(data, max_pixels=limit)
    except GraftError as error:
        assert 400 <= error.http_status < 500 and error.message
    else:
        assert frames and screen[0] * screen[1] <= limit
        if data is not whole:
            return
        assert max(w for w, _ in frames) * max(h for _, h in frames) <= limit
        assert all(w * h >= 1 for w, h in frames)
