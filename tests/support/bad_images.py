"""Real hostile and unusual uploads, generated in code, for the validation and bad-input tests.

`ODD_VALID` must be classified; `INVALID` must be refused with the given HTTP status.
"""

import io
import struct
import zlib
from collections.abc import Callable
from functools import cache

import numpy as np
from PIL import Image

from support.images import encode


def photo(height: int = 48, width: int = 64, seed: int = 0) -> Image.Image:
    """A smooth image with a clear up/down structure (so a rotation changes it visibly)."""
    rng = np.random.default_rng(seed)
    rows = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    noise = rng.normal(0, 8, size=(height, width, 3))
    pixels = np.broadcast_to(rows, (height, width, 3)) * np.array([1.0, 0.3, 0.6]) + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@cache
def png_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid 1-bit PNG of width x height black pixels: ~50 KB on the wire, 400 MP decoded."""
    row = b"\x00" * (1 + (width + 7) // 8)
    deflate = zlib.compressobj(9)
    idat = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def png_bad_crc() -> bytes:
    """A PNG whose IDAT checksum is wrong (one bit flipped in the stored CRC)."""
    data = bytearray(encode(photo(), "PNG"))
    start = data.find(b"IDAT")
    length = struct.unpack(">I", data[start - 4 : start])[0]
    data[start + 4 + length] ^= 0x01
    return bytes(data)


def truncated_jpeg() -> bytes:
    data = encode(photo(), "JPEG", quality=90)
    return data[: len(data) * 2 // 3]


def exif_rotated_jpeg(upright: Image.Image, orientation: int = 6) -> bytes:
    """`upright` stored the way a phone held sideways stores it, plus the EXIF tag that says
    how to turn it back (6: rotate 90 degrees clockwise to display)."""
    stored = upright.transpose(
        {
            6: Image.Transpose.ROTATE_90,
            8: Image.Transpose.ROTATE_270,
            3: Image.Transpose.ROTATE_180,
        }[orientation]
    )
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, "JPEG", quality=95, exif=exif)


def png16() -> bytes:
    rng = np.random.default_rng(1)
    return encode(Image.fromarray(rng.integers(0, 65535, (40, 30)).astype(np.uint16)), "PNG")


def animated_gif() -> bytes:
    frames = [photo(seed=1).convert("P"), Image.new("P", (64, 48), 3)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


def zip_bytes() -> bytes:
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("photo.jpg", b"not really")
    return buffer.getvalue()


def pickle_bytes() -> bytes:
    import pickle

    return pickle.dumps({"images": [b"x"]}, protocol=4)


ODD_VALID: dict[str, Callable[[], bytes]] = {
    "cmyk.jpg": lambda: encode(photo().convert("CMYK"), "JPEG"),
    "gray.jpg": lambda: encode(photo().convert("L"), "JPEG"),
    "16bit.png": png16,
    "gray.png": lambda: encode(photo().convert("L"), "PNG"),
    "palette.png": lambda: encode(photo().convert("P"), "PNG"),
    "rgba.png": lambda: encode(photo().convert("RGBA"), "PNG"),
    "animated.gif": animated_gif,
    "1x1.png": lambda: encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"),
    "1x10000.png": lambda: encode(Image.new("RGB", (1, 10_000), (10, 200, 10)), "PNG"),
    "10000x1.jpg": lambda: encode(Image.new("RGB", (10_000, 1), (10, 10, 200)), "JPEG"),
    "exif-rotated.jpg": lambda: exif_rotated_jpeg(photo()),
    "palette.bmp": lambda: encode(photo().convert("P"), "BMP"),
    "1bit.bmp": lambda: encode(photo().convert("1"), "BMP"),
}

# name -> (bytes, HTTP status graft must answer with)
INVALID: dict[str, tuple[Callable[[], bytes], int]] = {
    "zero-bytes.jpg": (lambda: b"", 400),
    "text.jpg": (lambda: b"hello, this is not an image\n", 415),
    "html.jpg": (lambda: b"<!DOCTYPE html><html><body>hi</body></html>", 415),
    "zip.jpg": (zip_bytes, 415),
    "pdf.jpg": (lambda: b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\n", 415),
    "pickle.jpg": (pickle_bytes, 415),
    "webp.jpg": (lambda: encode(photo(), "WEBP"), 415),
    "truncated.jpg": (truncated_jpeg, 400),
    "bad-crc.png": (png_bad_crc, 400),
    "bomb.png": (png_bomb, 400),
    "jpeg-magic-only.jpg": (lambda: b"\xff\xd8\xff", 400),
}


def gif_frames(
    screen: tuple[int, int], frames: list[tuple[int, int]], *, real_pixels: bool = False
) -> bytes:
    """A GIF written byte by byte: a `screen` canvas with a 4-colour table, then one frame per
    (width, height), each at offset 0,0 and in its own image descriptor.

    The headers are what matters to `check_image`, which refuses hostile ones before decoding,
    so by default every frame carries the same 1-pixel LZW stream (valid for a 1x1 frame only).
    `real_pixels` gives each frame a full uniform LZW stream taken from a Pillow encode, so
    TensorFlow and Pillow decode the file (keep those frames small).
    """
    flags = 0x80 | 0x70 | 1  # global colour table of 2**(1+1) entries
    out = [b"GIF89a", struct.pack("<HHBBB", *screen, flags, 0, 0), bytes(range(12))]
    for width, height in frames:
        body = _gif_lzw(width, height) if real_pixels else b"\x02\x02\x4c\x01\x00"
        out.append(b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + body)
    out.append(b"\x3b")
    return b"".join(out)


def _gif_lzw(width: int, height: int) -> bytes:
    """The LZW minimum code size and data sub-blocks of a uniform `width` x `height` frame."""
    data = encode(Image.new("P", (width, height), 1), "GIF")
    table = 3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0
    start = 13 + table
    assert data[start] == 0x2C and not data[start + 9] & 0x80, "unexpected Pillow GIF layout"
    assert data.endswith(b"\x3b")
    return data[start + 10 : -1]
