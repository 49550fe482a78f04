"""Image checks that run before any pixel is decoded: format, size, integrity, orientation.

Every upload passes `check_image` in the entry service. It sniffs the format from magic bytes
(never from a file name or content type), reads width and height from the header only and
refuses images over `max_image_pixels`, so a decompression bomb costs a few header bytes (for a
GIF: every frame's header, see `_check_gif_frames`). It then runs one cheap structural check per
format so truncated and corrupted files get a clear 400 here instead of a decoder error deep in
a batch. The SavedModel's own decoder stays the last line of defence: anything that slips
through fails there and the inference service must turn that into a per-image 400 as well.

Pixels are decoded here in two rare cases only, both bounded by the pixel limit:
- a JPEG with an EXIF orientation other than 1: TensorFlow's decoder ignores EXIF, so a phone
  photo taken in portrait would be classified lying on its side. It is rotated here and
  re-encoded as 24-bit BMP (lossless, and TensorFlow decodes it in microseconds); large photos
  are decoded at a reduced JPEG scale that keeps the shorter side >= 1024 px, far above every
  backbone's input size, so the model still resizes down from a sharp image.
- a BMP that TensorFlow decodes wrongly or not at all (palettes, 1/4/16-bit, RLE, trailing
  bytes): re-encoded the same way.

Both re-encodes cost 3 bytes a pixel in the entry process (and again in the copy sent to an
inference process), whatever the upload's size: `header_cost` says from the headers alone how
many pixels an upload holds and how many of them `check_image` would re-encode, so that the
gateway refuses a request over its budgets before any pixel is decoded.

There is no minimum size: a 1x1 image or a 1x10000 strip is classified (the model squashes
every image to its square input, as in training).
"""

import io
import struct
from dataclasses import dataclass

from PIL import Image

from service.errors import GraftError, ImageTooLarge, InvalidImage, UnsupportedMediaType

ACCEPTED = "JPEG, PNG, BMP or GIF"
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
)
_PIL_FORMAT = {"jpeg": "JPEG", "png": "PNG", "gif": "GIF", "bmp": "BMP"}
# Known non-image (or unsupported image) signatures, so a 415 can say what was actually sent.
_OTHER_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"%PDF-", "PDF"),
    (b"PK\x03\x04", "ZIP archive (or docx/xlsx/jar)"),
    (b"PK\x05\x06", "empty ZIP archive"),
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"7z\xbc\xaf\x27\x1c", "7-Zip archive"),
    (b"Rar!\x1a\x07", "RAR archive"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"8BPS", "Photoshop PSD"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000 codestream"),
    (b"\xff\x0a", "JPEG XL"),
    (b"qoif", "QOI"),
    (b"\x7fELF", "ELF executable"),
    (b"MZ", "Windows executable"),
    (b"\xca\xfe\xba\xbe", "Java class / Mach-O"),
    (b"SQLite format 3\x00", "SQLite database"),
    (b"\x89HDF\r\n\x1a\n", "HDF5 (Keras .h5)"),
)
_TEXT_MARKUP: tuple[tuple[bytes, str], ...] = (
    (b"<!doctype html", "HTML"),
    (b"<html", "HTML"),
    (b"<svg", "SVG"),
    (b"<?xml", "XML"),
    (b"{", "JSON"),
    (b"[", "JSON"),
)
# EXIF orientation -> the transpose that makes the stored pixels upright.
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ORIENTATION_TAG = 0x0112
_DRAFT_MIN_SIDE = 1024

# TensorFlow's GIF decoder (giflib's DGifSlurp) reads every frame before it returns the first,
# even with expand_animations=False. Measured with tf.io.decode_image on hand-built GIFs: its
# output is (tallest frame's height) x (widest frame's width), whatever the logical screen says
# and wherever the frames sit (a 1x1 GIF with a 2000x2000 second frame decodes to 2000x2000x3;
# a 2000x1 frame plus a 1x2000 frame also decode to 2000x2000x3), and it holds every frame's
# raster at once, 1 byte a pixel (100 frames of 2000x2000 took ~380 MB). The model only ever
# sees the first frame.
# Frame count cap: each frame costs giflib an allocation and this check a loop turn whatever its
# size, and 1000 frames is over 30 s of animation at 30 fps, far more than a photo upload needs.
_GIF_MAX_FRAMES = 1000
# All frames together may hold this many times max_pixels (at 40 MP: 160 MB of giflib rasters,
# about what decoding the largest allowed still image costs), else a 16 MiB upload of ~500
# well-compressed 40 MP frames would make the decoder hold 20 GB.
_GIF_FRAME_PIXEL_BUDGET = 4
# Data sub-blocks (a size byte, then up to 255 bytes): every encoder writes pixel data in
# 255-byte sub-blocks, so 250 000 of them is over 60 MB of data, while a crafted file of 1-byte
# sub-blocks would cost this walk a loop turn per 2 bytes (~2.4 s for 16 MiB) and giflib an
# allocation per extension sub-block. Bounds the walk to ~0.1 s.
_GIF_MAX_SUB_BLOCKS = 250_000


@dataclass(frozen=True)
class CheckedImage:
    """An upload that passed every check, ready for the model's decoder."""

    data: bytes  # the upload itself, or a lossless BMP re-encode (see `reencoded`)
    format: str  # jpeg | png | bmp | gif: what the client sent
    width: int  # as stored in the header, before any EXIF rotation
    height: int
    reencoded: str | None = None  # why the bytes were re-encoded; None when passed through


def sniff_format(data: bytes) -> str | None:
    """The accepted format these bytes start with (jpeg, png, gif, bmp), or None."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    return None


def describe_bytes(data: bytes) -> str:
    """A short human name for what non-image bytes look like, for error messages."""
    for magic, name in _OTHER_MAGIC:
        if data.startswith(magic):
            return name
    if data[:12].startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WebP"
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        return "HEIC/AVIF" if brand in (b"heic", b"heix", b"mif1", b"avif", b"msf1") else "MP4"
    if data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "Python pickle"
    head = data[:256].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    for magic, name in _TEXT_MARKUP:
        if head.startswith(magic):
            return name
    return "plain text" if _looks_like_text(data[:512]) else f"unknown (starts {data[:8].hex(' ')})"


@dataclass(frozen=True)
class HeaderCost:
    """What an upload costs, read from its header: pixels stored, pixels re-encoded."""

    pixels: int  # width x height as stored
    reencoded_pixels: int  # what `check_image` would decode and re-encode as BMP (0: none)


def header_cost(data: bytes) -> HeaderCost:
    """`data`'s cost from its header alone (no check, no pixel decoded). Bytes whose header
    cannot be read cost nothing here: `check_image` then says what is wrong with them."""
    fmt = sniff_format(data)
    if fmt is None:
        return HeaderCost(0, 0)
    try:
        with Image.open(io.BytesIO(data), formats=[_PIL_FORMAT[fmt]]) as image:
            pixels = image.width * image.height
            if fmt == "jpeg" and _exif_orientation(image) in _UPRIGHT:
                _draft(image)
                return HeaderCost(pixels, image.width * image.height)
            if fmt == "bmp" and not _bmp_is_native(data):
                return HeaderCost(pixels, pixels)
            return HeaderCost(pixels, 0)
    except Exception:  # Pillow's zoo of parse errors (see check_image): not this function's call
        return HeaderCost(0, 0)


def check_image(data: bytes, *, max_pixels: int, index: int = 0) -> CheckedImage:
    """Refuse anything the model should not decode; return the bytes it should decode.

    Raises InvalidImage (400), ImageTooLarge (400) or UnsupportedMediaType (415), each
    naming the image by its position in the request.
    """
    where = f"image {index}"
    if not data:
        raise InvalidImage(f"{where} is empty (0 bytes); send the file's contents.")
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedMediaType(
            f"{where} is {describe_bytes(data)}, not an image format graft accepts; "
            f"send {ACCEPTED} (convert other formats first)."
        )
    try:
        return _check_known_format(data, fmt, max_pixels=max_pixels, where=where)
    except GraftError:
        raise
    except Image.DecompressionBombError as error:
        # Pillow's own guard fires only when max_pixels is set above ~179 megapixels.
        raise ImageTooLarge(
            f"{where} is refused before decoding ({error}); the limit is "
            f"{max_pixels / 1e6:g} megapixels (GRAFT_MAX_IMAGE_PIXELS): downscale it first."
        ) from None
    except Exception as error:
        # Pillow's parsers raise a zoo of types (OSError, SyntaxError, struct.error, ...) on
        # hostile bytes; every one of them means the same thing to the caller.
        raise InvalidImage(
            f"{where} looks like a {fmt.upper()} but is damaged or truncated ({error}); "
            "re-export or re-upload the file."
        ) from None


def _check_known_format(data: bytes, fmt: str, *, max_pixels: int, where: str) -> CheckedImage:
    if fmt == "gif":
        _check_gif_frames(data, max_pixels=max_pixels, where=where)
    with Image.open(io.BytesIO(data), formats=[_PIL_FORMAT[fmt]]) as image:
        width, height = image.size
        _check_size(width, height, max_pixels=max_pixels, where=where)
        if fmt == "jpeg":
            return _check_jpeg(data, image, where=where)
        if fmt == "png":
            image.verify()  # walks every chunk checking its CRC; does not inflate pixels
        elif fmt == "gif":
            image.load()  # first frame (the one the model sees) on Pillow's canvas
        elif not _bmp_is_native(data):
            return _reencode(image, fmt, reason="bmp variant TensorFlow cannot decode")
    return CheckedImage(data, fmt, width, height)


def _check_size(width: int, height: int, *, max_pixels: int, where: str) -> None:
    if width < 1 or height < 1:
        raise InvalidImage(f"{where} is {width}x{height}: it has no pixels.")
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"{where} is {width}x{height} = {width * height / 1e6:.1f} megapixels, over the "
            f"{max_pixels / 1e6:g} megapixel limit (GRAFT_MAX_IMAGE_PIXELS); downscale it first."
        )


def _check_gif_frames(data: bytes, *, max_pixels: int, where: str) -> None:
    """Walk a GIF's blocks from the bytes, decoding nothing, and refuse it unless every frame,
    the output TensorFlow's decoder sizes from all of them, and all their rasters together fit
    the pixel limit (see `_GIF_MAX_FRAMES`).

    One loop turn per block and per data sub-block, both capped (`_GIF_MAX_FRAMES`,
    `_GIF_MAX_SUB_BLOCKS`), so a crafted file costs at most ~0.1 s. Frames are counted from 0.
    A file that ends cleanly after a block without the trailer is accepted, as Pillow and
    TensorFlow both decode it.
    """
    end = len(data)
    if end < 13:
        raise _gif_truncated(where, "its logical screen descriptor")
    pos = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
    if pos > end:
        raise _gif_truncated(where, "its global colour table")
    frames = 0
    widest = tallest = (0, 0)  # (size, frame)
    total = 0
    sub_blocks = 0
    while pos < end:
        kind = data[pos]
        if kind == 0x3B:  # trailer; anything after it is ignored by every decoder
            break
        if kind == 0x21:  # extension: label byte, then sub-blocks
            if pos + 2 > end:
                raise _gif_truncated(where, f"an extension block at byte {pos}")
            pos, sub_blocks = _skip_gif_sub_blocks(data, pos + 2, sub_blocks, where=where)
        elif kind == 0x2C:  # image descriptor: left, top, width, height, flags
            if frames == _GIF_MAX_FRAMES:
                raise InvalidImage(
                    f"{where} is a GIF with more than {_GIF_MAX_FRAMES} frames; graft classifies "
                    "the first frame only: send that frame as a PNG or a still GIF."
                )
            if pos + 10 > end:
                raise _gif_truncated(where, f"the image descriptor of frame {frames}")
            width, height = struct.unpack_from("<HH", data, pos + 5)
            flags = data[pos + 9]
            _check_gif_frame(frames, width, height, max_pixels=max_pixels, where=where)
            if width > widest[0]:
                widest = (width, frames)
            if height > tallest[0]:
                tallest = (height, frames)
            if widest[0] * tallest[0] > max_pixels:
                raise ImageTooLarge(
                    f"{where} is a GIF that TensorFlow's decoder would decode to "
                    f"{widest[0]}x{tallest[0]} = {widest[0] * tallest[0] / 1e6:.1f} megapixels "
                    f"(its widest frame is frame {widest[1]}, its tallest frame {tallest[1]}), "
                    f"over the {max_pixels / 1e6:g} megapixel limit (GRAFT_MAX_IMAGE_PIXELS); "
                    "send the first frame as a PNG or downscale every frame."
                )
            total += width * height
            if total > _GIF_FRAME_PIXEL_BUDGET * max_pixels:
                raise ImageTooLarge(
                    f"{where} is a GIF whose first {frames + 1} frames hold {total / 1e6:.1f} "
                    f"megapixels together, over {_GIF_FRAME_PIXEL_BUDGET} times the "
                    f"{max_pixels / 1e6:g} megapixel limit (GRAFT_MAX_IMAGE_PIXELS) that the "
                    "decoder holds at once; graft classifies the first frame only: send that "
                    "frame as a PNG or a still GIF."
                )
            pos += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
            if pos + 1 > end:  # local colour table, then the LZW minimum code size byte
                raise _gif_truncated(where, f"the colour table of frame {frames}")
            pos, sub_blocks = _skip_gif_sub_blocks(data, pos + 1, sub_blocks, where=where)
            frames += 1
        else:
            raise InvalidImage(
                f"{where} is a damaged GIF (byte {pos} is 0x{kind:02x}, not a frame, an "
                "extension or the trailer); re-export or re-upload the file."
            )
    if frames == 0:
        raise _gif_truncated(where, "its header: it has no frame")


def _check_gif_frame(frame: int, width: int, height: int, *, max_pixels: int, where: str) -> None:
    if width < 1 or height < 1:
        raise InvalidImage(
            f"{where} is a damaged GIF: frame {frame} is {width}x{height} and has no pixels; "
            "re-export or re-upload the file."
        )
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"{where} is a GIF whose frame {frame} is {width}x{height} = "
            f"{width * height / 1e6:.1f} megapixels, over the {max_pixels / 1e6:g} megapixel "
            "limit (GRAFT_MAX_IMAGE_PIXELS); TensorFlow's decoder sizes its output from the "
            "largest frame: send the first frame as a PNG or downscale every frame."
        )


def _skip_gif_sub_blocks(data: bytes, pos: int, count: int, *, where: str) -> tuple[int, int]:
    """Position after the sub-blocks starting at `pos` (a size byte, then that many bytes,
    until a size of 0), and `count` plus how many there were."""
    end = len(data)
    while pos < end:
        size = data[pos]
        pos += 1 + size
        count += 1
        if size == 0:
            return pos, count
        if count > _GIF_MAX_SUB_BLOCKS:
            raise InvalidImage(
                f"{where} is a GIF split into over {_GIF_MAX_SUB_BLOCKS} data sub-blocks, far "
                "more than any encoder writes (they use 255-byte sub-blocks); re-export the "
                "file or send it as PNG."
            )
    raise _gif_truncated(where, f"the data sub-blocks ending at byte {end}")


def _gif_truncated(where: str, inside: str) -> InvalidImage:
    return InvalidImage(
        f"{where} is a truncated GIF (it ends inside {inside}); the upload was probably cut "
        "short: send the whole file."
    )


def _check_jpeg(data: bytes, image: Image.Image, *, where: str) -> CheckedImage:
    # Inside entropy-coded data 0xFF is always followed by 0x00 or a restart marker, so the
    # last start-of-scan must be followed by an end-of-image marker in a complete file.
    if data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda") or b"\xff\xda" not in data:
        raise InvalidImage(
            f"{where} is a truncated JPEG (no end-of-image marker after the image data); "
            "the upload was probably cut short: send the whole file."
        )
    orientation = _exif_orientation(image)
    if orientation not in _UPRIGHT:
        return CheckedImage(data, "jpeg", image.width, image.height)
    width, height = image.size
    _draft(image)
    upright = image.transpose(_UPRIGHT[orientation])
    checked = _reencode(upright, "jpeg", reason=f"exif orientation {orientation} applied")
    return CheckedImage(checked.data, "jpeg", width, height, checked.reencoded)


def _draft(image: Image.Image) -> None:
    """Decode at the smallest JPEG scale that keeps both sides >= _DRAFT_MIN_SIDE (the size
    changes at once; pixels are decoded only when read)."""
    image.draft(None, (_DRAFT_MIN_SIDE, _DRAFT_MIN_SIDE))


def _exif_orientation(image: Image.Image) -> int | None:
    try:
        return image.getexif().get(_ORIENTATION_TAG)
    except Exception:
        # Broken EXIF is ignored, exactly as TensorFlow's decoder ignores all of it.
        return None


def _bmp_is_native(data: bytes) -> bool:
    """True when TensorFlow's BMP decoder reads these bytes as Pillow would.

    It handles uncompressed 24/32-bit pixels only, ignores palettes and insists the file is
    exactly header + rows long.
    """
    if len(data) < 34:
        return False
    offset, _, width, height, _, bpp, compression = struct.unpack_from("<I I i i H H I", data, 10)
    row = (bpp * abs(width) + 31) // 32 * 4
    return bpp in (24, 32) and compression == 0 and len(data) == offset + row * abs(height)


def _reencode(image: Image.Image, fmt: str, *, reason: str) -> CheckedImage:
    out = io.BytesIO()
    image.convert("RGB").save(out, "BMP")
    return CheckedImage(out.getvalue(), fmt, image.width, image.height, reason)


def _looks_like_text(head: bytes) -> bool:
    text = head.decode("utf-8", errors="replace")
    printable = sum((ch.isprintable() and ch != "\ufffd") or ch in "\r\n\t" for ch in text)
    return bool(text) and printable >= 0.95 * len(text)
