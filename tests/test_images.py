"""Tests for camanim.images: sources, format conversions, safety limits. All offline."""

from __future__ import annotations

import email.message
import io
import struct
import urllib.error
import urllib.request
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from camanim.compute.images import LoadedImage, list_samples, load_image
from camanim.errors import CamanimError, ImageError

# ----------------------------------------------------------------------------------------------------
# Helpers


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def _filter_rows(raw: np.ndarray, bpp: int) -> bytes:
    """PNG-filter ``raw`` (H, rowbytes) uint8 with filter types cycling 0..4 over the rows."""
    h, n = raw.shape
    r = raw.astype(np.int32)
    out = []
    for y in range(h):
        x = r[y]
        a = np.concatenate([np.zeros(bpp, np.int32), x[:-bpp]])
        b = r[y - 1] if y else np.zeros(n, np.int32)
        c = np.concatenate([np.zeros(bpp, np.int32), b[:-bpp]])
        ftype = y % 5
        if ftype == 0:
            pred = np.zeros(n, np.int32)
        elif ftype == 1:
            pred = a
        elif ftype == 2:
            pred = b
        elif ftype == 3:
            pred = (a + b) // 2
        else:
            p = a + b - c
            pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
            pred = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
        out.append(bytes([ftype]) + ((x - pred) % 256).astype(np.uint8).tobytes())
    return b"".join(out)


def write_png16(path, arr: np.ndarray) -> None:
    """Write a 16-bit PNG (gray, gray+alpha, RGB or RGBA) using all five PNG row filters.

    Pillow cannot write 16-bit colour PNGs, so the file is assembled here.
    """
    arr = np.asarray(arr, dtype=">u2")
    h, w = arr.shape[:2]
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    raw = np.frombuffer(arr.tobytes(), np.uint8).reshape(h, -1)
    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    data = zlib.compress(_filter_rows(raw, 2 * channels))
    png = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", data)
        + _png_chunk(b"IEND", b"")
    )
    path.write_bytes(png)


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


class FakeResponse:
    """Stands in for what urllib.request.urlopen returns."""

    def __init__(self, body: bytes, content_type: str | None = "image/png", length: bool = True) -> None:
        self._buf = io.BytesIO(body)
        self.headers = email.message.Message()
        if content_type:
            self.headers["Content-Type"] = content_type
        if length:
            self.headers["Content-Length"] = str(len(body))

    def read(self, n: int = -1) -> bytes:
        return self._buf.read(n)

    def __enter__(self) -> FakeResponse:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def fake_urlopen(monkeypatch, response=None, error: Exception | None = None) -> list:
    calls = []

    def urlopen(request, timeout=None):
        calls.append((request.full_url, timeout))
        if error is not None:
            raise error
        return response

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return calls


@pytest.fixture(scope="module")
def big_png(tmp_path_factory):
    """A real 3000x3000 PNG (9 Mpx), cheap to compress."""
    path = tmp_path_factory.mktemp("big") / "big.png"
    ramp = np.broadcast_to(np.linspace(0, 255, 3000).astype(np.uint8), (3000, 3000))
    Image.fromarray(np.ascontiguousarray(ramp)).convert("RGB").save(path, compress_level=1)
    return path


# ----------------------------------------------------------------------------------------------------
# Samples and names


def test_samples_load_offline_with_expected_sizes():
    assert list_samples() == ["astronaut", "chelsea", "coffee", "rocket"]
    cat = load_image("chelsea")
    assert isinstance(cat, LoadedImage)
    assert cat.image.mode == "RGB" and cat.image.size == (451, 300)
    assert cat.original_size == (451, 300) and cat.original_mode == "RGB"
    assert cat.source == "chelsea" and cat.notes == ()
    arr = cat.to_array()
    assert arr.shape == (300, 451, 3) and arr.dtype == np.uint8
    assert load_image("Coffee").image.size == (600, 400)
    assert load_image("ROCKET").image.size == (640, 427)


def test_unknown_name_says_missing_and_suggests_close_sample():
    with pytest.raises(ImageError) as info:
        load_image("chelsae")
    msg = str(info.value)
    assert "does not exist" in msg and "'chelsea'" in msg
    assert isinstance(info.value, CamanimError) and isinstance(info.value, ValueError)


def test_unknown_name_without_match_lists_samples():
    with pytest.raises(ImageError, match="astronaut, chelsea, coffee, rocket"):
        load_image("zzzz.jpg")


def test_existing_file_wins_over_sample_name(tmp_path, monkeypatch):
    Image.new("RGB", (7, 5), (1, 2, 3)).save(tmp_path / "chelsea", format="PNG")
    monkeypatch.chdir(tmp_path)
    assert load_image("chelsea").image.size == (7, 5)


# ----------------------------------------------------------------------------------------------------
# 8-bit modes


def test_grayscale_png_replicated_to_rgb(tmp_path):
    gray = np.arange(12 * 20, dtype=np.uint8).reshape(12, 20)
    Image.fromarray(gray).save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    arr = out.to_array()
    assert out.original_mode == "L" and out.source == str(tmp_path / "g.png")
    assert (arr == gray[:, :, None]).all()
    assert any("grayscale" in n for n in out.notes)


def test_rgba_png_composited_over_white(tmp_path):
    px = np.zeros((2, 3, 4), np.uint8)
    px[0, 0] = (255, 0, 0, 0)  # fully transparent red
    px[0, 1] = (255, 0, 0, 255)  # opaque red
    px[0, 2] = (0, 0, 0, 128)  # half-transparent black
    px[1] = (0, 0, 255, 255)
    Image.fromarray(px, "RGBA").save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    arr = out.to_array()
    assert out.original_mode == "RGBA"
    assert tuple(arr[0, 0]) == (255, 255, 255)
    assert tuple(arr[0, 1]) == (255, 0, 0)
    assert np.abs(arr[0, 2].astype(int) - 127).max() <= 1
    assert tuple(arr[1, 0]) == (0, 0, 255)
    assert any("alpha composited on white" in n for n in out.notes)


def test_palette_png_with_and_without_transparency(tmp_path):
    p = Image.new("P", (4, 2))
    p.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    p.putpixel((1, 0), 1)
    p.save(tmp_path / "p.png")
    out = load_image(tmp_path / "p.png")
    assert out.original_mode == "P"
    assert tuple(out.to_array()[0, 0]) == (10, 20, 30) and tuple(out.to_array()[0, 1]) == (200, 100, 50)

    p.save(tmp_path / "pt.png", transparency=0)
    arr = load_image(tmp_path / "pt.png").to_array()
    assert tuple(arr[0, 0]) == (255, 255, 255) and tuple(arr[0, 1]) == (200, 100, 50)


def test_cmyk_jpeg_converted_to_rgb(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)
    out = load_image(tmp_path / "c.jpg")
    assert out.original_mode == "CMYK"
    r, g, b = out.to_array()[8, 8].astype(int)
    assert r > 240 and g < 15 and b < 15
    assert any("CMYK" in n for n in out.notes)


# ----------------------------------------------------------------------------------------------------
# High bit depth


def test_16bit_gray_png_full_range(tmp_path):
    ramp = np.linspace(0, 65535, 40 * 30).round().astype(np.uint16).reshape(30, 40)
    write_png16(tmp_path / "g16.png", ramp)
    out = load_image(tmp_path / "g16.png")
    flat = out.to_array()[:, :, 0].ravel()
    assert out.original_mode == "I;16"
    assert flat.min() == 0 and flat.max() == 255
    assert (np.diff(flat.astype(int)) >= 0).all()
    np.testing.assert_array_equal(flat, np.rint(ramp.ravel() / 65535 * 255))
    assert any("range 0-65535 scaled to 0-255" in n for n in out.notes)


def test_16bit_gray_png_12bit_data_is_stretched(tmp_path):
    ramp = np.linspace(100, 4095, 40 * 30).round().astype(np.uint16).reshape(30, 40)
    write_png16(tmp_path / "g12.png", ramp)
    out = load_image(tmp_path / "g12.png")
    flat = out.to_array()[:, :, 0].ravel()
    assert flat.min() == 0 and flat.max() == 255
    assert (np.diff(flat.astype(int)) >= 0).all()
    assert len(np.unique(flat)) > 200
    assert any("100-4095 stretched" in n for n in out.notes)


@pytest.mark.parametrize("top", [65535, 4095])
def test_16bit_rgb_png_decoded_exactly(tmp_path, top):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, top + 1, (23, 31, 3)).astype(np.uint16)
    rgb[0, 0] = (0, top, top // 2)
    write_png16(tmp_path / "rgb16.png", rgb)
    out = load_image(tmp_path / "rgb16.png")
    assert out.original_mode == "RGB;16"
    # Pillow alone keeps only the high byte, which would cap 12-bit data at 15; the exact decode does not.
    expected = np.rint(rgb / top * 255).astype(np.uint8)
    np.testing.assert_array_equal(out.to_array(), expected)


def test_16bit_rgba_and_la_png_alpha(tmp_path):
    rgba = np.full((4, 5, 4), 65535, np.uint16)
    rgba[..., :3] = np.array([40000, 0, 0], np.uint16)
    rgba[0, 0, 3] = 0
    write_png16(tmp_path / "rgba16.png", rgba)
    out = load_image(tmp_path / "rgba16.png")
    arr = out.to_array()
    assert out.original_mode == "RGBA;16"
    assert tuple(arr[0, 0]) == (255, 255, 255)
    assert tuple(arr[1, 1]) == (round(40000 / 65535 * 255), 0, 0)

    la = np.stack([np.full((4, 5), 50000, np.uint16), np.full((4, 5), 65535, np.uint16)], -1)
    la[3, 4, 1] = 0
    write_png16(tmp_path / "la16.png", la)
    arr = load_image(tmp_path / "la16.png").to_array()
    assert tuple(arr[0, 0]) == (round(50000 / 65535 * 255),) * 3 and tuple(arr[3, 4]) == (255, 255, 255)


def test_16bit_rgb_tiff_via_tifffile(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    rgb = np.linspace(0, 4000, 8 * 6 * 3).astype(np.uint16).reshape(6, 8, 3)
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb, photometric="rgb")
    out = load_image(tmp_path / "rgb16.tif")
    arr = out.to_array()
    assert out.original_mode == "RGB;16"
    assert arr.min() == 0 and arr.max() == 255
    with pytest.raises(ImageError, match="max_pixels=10"):
        load_image(tmp_path / "rgb16.tif", max_pixels=10)

    # Pillow cannot open float RGB TIFFs at all; tifffile reads them.
    tifffile.imwrite(tmp_path / "rgbf.tif", rgb.astype(np.float32) / 4000, photometric="rgb")
    out = load_image(tmp_path / "rgbf.tif")
    assert out.original_mode == "RGB;F"
    np.testing.assert_array_equal(out.to_array(), np.rint(rgb / 4000 * 255))


def test_float_tiff_and_float_arrays(tmp_path):
    ramp = np.linspace(0, 1, 20 * 10, dtype=np.float32).reshape(10, 20)
    Image.fromarray(ramp).save(tmp_path / "f.tif")
    out = load_image(tmp_path / "f.tif")
    assert out.original_mode == "F"
    np.testing.assert_array_equal(out.to_array()[:, :, 1], np.rint(ramp * 255))

    wide = np.linspace(-3, 5, 4 * 6 * 3).reshape(4, 6, 3)
    out = load_image(wide)
    arr = out.to_array()
    assert arr.min() == 0 and arr.max() == 255 and out.original_mode == "RGB;F"
    assert any("stretched" in n for n in out.notes)

    bad = np.full((3, 3), 0.5)
    bad[1, 1] = np.nan
    arr = load_image(bad).to_array()
    assert arr[1, 1, 0] == 0 and arr[0, 0, 0] == 128


def test_array_inputs(tmp_path):
    u8 = np.random.default_rng(1).integers(0, 256, (5, 7, 3)).astype(np.uint8)
    out = load_image(u8)
    assert out.image.size == (7, 5) and out.source == "<ndarray>" and out.original_mode == "RGB"
    np.testing.assert_array_equal(out.to_array(), u8)
    out.to_array()[0, 0] = 0  # to_array returns a copy
    assert (load_image(u8).to_array() == u8).all()

    assert load_image(u8[:, :, :1]).to_array().shape == (5, 7, 3)
    mask = np.eye(4, dtype=bool)
    np.testing.assert_array_equal(load_image(mask).to_array()[:, :, 2], mask * 255)

    u16 = np.array([[0, 1000], [2000, 4095]], np.uint16)
    assert load_image(u16).to_array()[:, :, 0].tolist() == [[0, 62], [125, 255]]

    rgba = np.zeros((2, 2, 4), np.uint8)
    assert (load_image(rgba).to_array() == 255).all()

    for shape in [(2, 2, 2), (3, 224, 224), (2,), (1, 2, 3, 4)]:
        with pytest.raises(ImageError, match=r"\(H, W\), \(H, W, 1\), \(H, W, 3\) or \(H, W, 4\)"):
            load_image(np.zeros(shape, np.uint8))
    with pytest.raises(ImageError, match="zero size"):
        load_image(np.zeros((0, 5, 3), np.uint8))


def test_pil_input_converted_and_not_aliased():
    src = Image.fromarray(np.array([[0, 4095]], np.uint16))
    out = load_image(src)
    assert out.original_mode == "I;16" and out.to_array()[0, :, 0].tolist() == [0, 255]

    rgb = Image.new("RGB", (3, 2), (9, 8, 7))
    out = load_image(rgb)
    rgb.putpixel((0, 0), (0, 0, 0))
    assert out.image.getpixel((0, 0)) == (9, 8, 7) and out.source == "<PIL.Image>"
    with pytest.raises(TypeError):
        load_image(42)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------
# EXIF orientation


def test_exif_orientation_6_is_applied(tmp_path):
    im = Image.new("RGB", (60, 40), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 10, 10))  # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(tmp_path / "o.jpg", exif=exif.tobytes(), quality=95)
    out = load_image(tmp_path / "o.jpg")
    assert out.original_size == (60, 40)
    assert out.image.size == (40, 60)
    r, g, b = out.to_array()[3, 36].astype(int)  # rotated 90° clockwise: now top-right
    assert r > 200 and b < 60
    assert any("EXIF orientation 6" in n for n in out.notes)


# ----------------------------------------------------------------------------------------------------
# Bad files


def test_truncated_jpeg_raises(tmp_path):
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3)).astype(np.uint8)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    with pytest.raises(ImageError, match=r"cut\.jpg.*truncated or corrupt"):
        load_image(tmp_path / "cut.jpg")


def test_text_file_named_png_raises(tmp_path):
    (tmp_path / "notes.png").write_text("<html><body>not found</body></html>\n")
    with pytest.raises(ImageError, match=r"notes\.png.*not a recognised image format.*text"):
        load_image(tmp_path / "notes.png")


def test_empty_file_and_directory_raise(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.jpg.*empty"):
        load_image(tmp_path / "empty.jpg")
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)


# ----------------------------------------------------------------------------------------------------
# Size limits


def test_oversized_image_refused_before_decoding(big_png, monkeypatch):
    def no_decode(self):
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with pytest.raises(ImageError, match=r"3000x3000 = 9,000,000 pixels.*max_pixels=1,000,000"):
        load_image(big_png, max_pixels=1_000_000)


def test_header_claiming_huge_size_refused(tmp_path):
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
    (tmp_path / "bomb.png").write_bytes(data + _png_chunk(b"IEND", b""))
    with pytest.raises(ImageError, match="max_pixels"):
        load_image(tmp_path / "bomb.png")
    with pytest.raises(ImageError, match="too large"):  # Pillow's own guard still applies
        load_image(tmp_path / "bomb.png", max_pixels=10**11)


def test_large_png_downscaled_with_note(big_png, caplog):
    with caplog.at_level("INFO", logger="camanim.compute.images"):
        out = load_image(big_png, max_pixels=20_000_000, downscale_to=1000)
    assert out.image.size == (1000, 1000) and out.original_size == (3000, 3000)
    assert "downscaled from 3000x3000 to 1000x1000 (downscale_to=1000)" in out.notes
    assert any("downscaled" in r.getMessage() and r.levelname == "INFO" for r in caplog.records)
    row = out.to_array()[500, :, 0].astype(int)
    assert row[0] < 5 and row[-1] > 250 and (np.diff(row) >= -2).all()
    assert load_image(big_png, downscale_to=None).image.size == (3000, 3000)


def test_large_jpeg_downscaled_with_draft(tmp_path):
    Image.new("RGB", (3000, 2000), (200, 30, 10)).save(tmp_path / "big.jpg")
    out = load_image(tmp_path / "big.jpg", downscale_to=1000)
    assert out.image.size == (1000, 667) and out.original_size == (3000, 2000)
    assert any(n.startswith("downscaled from 3000x2000 to 1000x667") for n in out.notes)
    r, g, b = out.to_array()[300, 500].astype(int)
    assert abs(r - 200) < 8 and abs(g - 30) < 8 and abs(b - 10) < 8


# ----------------------------------------------------------------------------------------------------
# URLs (urlopen monkeypatched: no network)


def test_url_png(monkeypatch):
    body = png_bytes(Image.new("RGB", (9, 4), (1, 2, 3)))
    calls = fake_urlopen(monkeypatch, FakeResponse(body, "image/png; charset=binary"))
    out = load_image("https://example.org/cat.png", url_timeout=3.5)
    assert out.image.size == (9, 4) and out.source == "https://example.org/cat.png"
    assert out.image.getpixel((0, 0)) == (1, 2, 3)
    assert calls == [("https://example.org/cat.png", 3.5)]


def test_url_html_content_type_refused(monkeypatch):
    fake_urlopen(monkeypatch, FakeResponse(b"<html>login</html>", "text/html"))
    with pytest.raises(ImageError, match="not an image.*text/html"):
        load_image("http://example.org/page")


def test_url_over_byte_cap_refused(monkeypatch):
    body = png_bytes(Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), np.uint8)))
    fake_urlopen(monkeypatch, FakeResponse(body, "image/png", length=False))  # cap hit while streaming
    with pytest.raises(ImageError, match="larger than"):
        load_image("https://example.org/big.png", url_max_bytes=1000)
    fake_urlopen(monkeypatch, FakeResponse(body, "image/png"))  # cap hit from Content-Length
    with pytest.raises(ImageError, match="larger than"):
        load_image("https://example.org/big.png", url_max_bytes=1000)


def test_url_network_error_and_undecodable_body(monkeypatch):
    fake_urlopen(monkeypatch, error=urllib.error.URLError("Name or service not known"))
    with pytest.raises(ImageError, match="could not download.*Name or service not known"):
        load_image("https://nowhere.invalid/x.png")
    fake_urlopen(monkeypatch, FakeResponse(b"\x01\x02garbage" * 10, "application/octet-stream"))
    with pytest.raises(ImageError, match="not a recognised image format"):
        load_image("https://example.org/x.bin")
