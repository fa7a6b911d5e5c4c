"""The guarded image loader: every bad file ends in one ImageError that says what to do."""

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from ufm.imageio import ImageError, open_image
from ufm.limits import MAX_IMAGE_PIXELS


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def bomb_png(side: int) -> bytes:
    """A valid PNG header declaring ``side x side`` 1-bit pixels with a tiny compressed payload
    (~100 bytes on disk; decoding it would allocate side**2 bytes)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 100))
            + _chunk(b"IEND", b""))


def png_bytes(arr: np.ndarray, pnginfo=None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", pnginfo=pnginfo)
    return buf.getvalue()


@pytest.mark.parametrize("side", [7_000, 10_000, 30_000])
def test_decompression_bombs_are_refused_without_touching_pillow(side, tmp_path):
    # 7,000^2 = 49 MP passes Pillow's own limit but not ours; 10,000^2 trips Pillow's warning,
    # 30,000^2 its error: all three must end in the same kind of message.
    limit_before, filters_before = Image.MAX_IMAGE_PIXELS, list(warnings.filters)
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png(side))
    assert path.stat().st_size < 200
    for source in (path, path.read_bytes(), io.BytesIO(path.read_bytes())):
        with pytest.raises(ImageError, match="decompression bomb") as e:
            open_image(source)
        assert "megapixels" in str(e.value)
    assert Image.MAX_IMAGE_PIXELS == limit_before and list(warnings.filters) == filters_before


def test_pixel_limit_is_a_parameter():
    data = png_bytes(np.zeros((100, 100), np.uint8))
    assert open_image(data).size == (100, 100)
    with pytest.raises(ImageError, match="100x100 pixels"):
        open_image(data, max_pixels=5_000)
    assert MAX_IMAGE_PIXELS >= 10_000_000  # ordinary photos must pass


def test_huge_compressed_text_chunk():
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "a" * 20_000_000, zip=True)  # 20 MB of text in a ~20 kB zTXt chunk
    data = png_bytes(np.zeros((4, 4), np.uint8), info)
    assert len(data) < 100_000
    with pytest.raises(ImageError, match="text or profile chunk.*without metadata"):
        open_image(data, name="logo.png")


def test_truncated_jpeg(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    with pytest.raises(ImageError, match=r"cut\.jpg is truncated.*export it again"):
        open_image(path)


def test_not_an_image_empty_missing_and_folder(tmp_path):
    with pytest.raises(ImageError, match="not an image.*PNG, JPEG"):
        open_image(b"%PDF-1.4 this is a pdf")
    with pytest.raises(ImageError, match="empty"):
        open_image(b"")
    with pytest.raises(ImageError, match="does not exist"):
        open_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="is a folder"):
        open_image(tmp_path)
    with pytest.raises(ImageError, match="cannot read an image from int"):
        open_image(42)  # type: ignore[arg-type]


def test_byte_cap_before_reading(tmp_path):
    data = png_bytes(np.zeros((50, 50), np.uint8))
    path = tmp_path / "a.png"
    path.write_bytes(data)
    for source in (data, path, io.BytesIO(data)):
        with pytest.raises(ImageError, match="larger than"):
            open_image(source, max_bytes=len(data) - 1)
        assert open_image(source, max_bytes=len(data)).size == (50, 50)


def test_good_images_load_fully_from_every_source(tmp_path):
    arr = np.arange(48, dtype=np.uint8).reshape(6, 8)
    data = png_bytes(arr)
    path = tmp_path / "ok.png"
    path.write_bytes(data)
    for source in (path, str(path), data, bytearray(data), io.BytesIO(data)):
        img = open_image(source)
        np.testing.assert_array_equal(np.asarray(img), arr)
    path.unlink()  # the image is detached from the file: still usable
    np.testing.assert_array_equal(np.asarray(img), arr)


def test_image_error_is_a_value_error():
    assert issubclass(ImageError, ValueError)
