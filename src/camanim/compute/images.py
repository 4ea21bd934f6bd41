"""Load a picture from a path, an http(s) URL, a built-in sample, a PIL image or a numpy array.

Whatever the source, :func:`load_image` returns a :class:`LoadedImage` whose ``image`` is an 8-bit
``"RGB"`` PIL image with the EXIF orientation applied and, when very large, downscaled. Every conversion
made on the way is recorded in ``LoadedImage.notes``.

High bit-depth data is mapped to 0-255 by these rules (colour channels always share one scale, so hues
are kept; alpha is composited over white):

* Unsigned 16-bit (``"I;16"`` files, 16-bit colour PNG/TIFF, ``uint16`` arrays): when the data maximum is
  at least 32768 (the top bit is in use, so the data fills the 16-bit range) values are scaled by the
  full range, ``v * 255 / 65535``. Otherwise (10-, 12- or 14-bit sensor or medical data stored in 16
  bits, e.g. maximum 4095) the actual ``[min, max]`` is stretched to ``[0, 255]`` so the picture is not
  nearly black. A constant image is scaled by the full range.
* 32-bit integer (``"I"`` files) within 0..65535 follows the 16-bit rule. Other integer arrays: values
  within 0..255 are used as 8-bit, within 0..65535 follow the 16-bit rule, anything else is stretched.
* Float (``"F"`` files, float arrays): values within ``[0, 1]`` (tolerance 1e-3, then clipped) are
  scaled by 255; anything else is min-max stretched. Non-finite values become black.
"""

from __future__ import annotations

import http.client
import io
import logging
import math
import os
import re
import socket
import struct
import time
import urllib.error
import urllib.request
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError
from skimage import data as _skdata

from camanim.errors import ImageError, close_matches

log = logging.getLogger(__name__)

#: Built-in sample pictures (bundled with scikit-image, no download) by lower-case name.
SAMPLES: dict[str, Callable[[], np.ndarray]] = {
    "chelsea": _skdata.chelsea,
    "coffee": _skdata.coffee,
    "astronaut": _skdata.astronaut,
    "rocket": _skdata.rocket,
}

#: Unsigned 16-bit data whose maximum reaches this value is scaled by the full 0..65535 range.
FULL_RANGE_MIN_16 = 2**15

_FLOAT_TOLERANCE = 1e-3
_URL_RE = re.compile(r"^https?://", re.IGNORECASE)
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# Some servers send images untyped; those bytes are still checked by the decoder.
_OK_CONTENT_TYPES = ("application/octet-stream", "binary/octet-stream")
_CHUNK = 2**20

_MODE_NAMES = {
    "1": "1-bit black-and-white",
    "L": "grayscale (L)",
    "P": "palette (P)",
    "CMYK": "CMYK",
    "YCbCr": "YCbCr",
    "LAB": "CIELAB",
    "HSV": "HSV",
    "I;16": "16-bit grayscale (I;16)",
    "I;16L": "16-bit grayscale (I;16L)",
    "I;16B": "16-bit grayscale (I;16B)",
    "I;16N": "16-bit grayscale (I;16N)",
    "I": "32-bit integer grayscale (I)",
    "F": "32-bit float grayscale (F)",
}
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")

# Pillow decodes 16-bit colour PNGs to 8 bits by keeping the high byte of each big-endian sample.
# Decoding the same stream again with the little-endian rawmode keeps the low bytes instead; the bytes
# per pixel are the same, so PNG un-filtering is identical and high/low together are the exact samples.
# 16-bit gray+alpha has no such twin, but 8-bit "RGBA" has the same 4 bytes per pixel and copies them
# verbatim as (L high, L low, A high, A low).
_PNG16_RAWMODES = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L", "LA;16B": "RGBA"}
_PNG16_MODES = {"RGB;16B": "RGB;16", "RGBA;16B": "RGBA;16", "LA;16B": "LA;16"}

# EXIF orientation -> the transposition that undoes it: the table of PIL.ImageOps.exif_transpose, applied
# after the conversion to RGB so that it also covers pixels decoded outside Pillow (16-bit PNG/TIFF).
_ORIENTATIONS = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT, "mirrored"),
    3: (Image.Transpose.ROTATE_180, "rotated 180°"),
    4: (Image.Transpose.FLIP_TOP_BOTTOM, "flipped vertically"),
    5: (Image.Transpose.TRANSPOSE, "transposed"),
    6: (Image.Transpose.ROTATE_270, "rotated 90° clockwise"),
    7: (Image.Transpose.TRANSVERSE, "transversed"),
    8: (Image.Transpose.ROTATE_90, "rotated 90° counter-clockwise"),
}
_EXIF_ORIENTATION = 0x0112
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)

Opener = Callable[[], BinaryIO]


@dataclass(frozen=True)
class LoadedImage:
    """A picture ready for preprocessing.

    Attributes:
        image: Mode ``"RGB"``, 8 bits per channel, EXIF orientation applied, possibly downscaled.
        source: What the caller passed: a path, URL or sample name (the file name, ``"<PIL.Image>"`` or
            ``"<ndarray>"`` for in-memory input).
        original_size: ``(width, height)`` in pixels as stored, before downscaling and orientation.
        original_mode: Pillow mode of the source (``"RGB"``, ``"L"``, ``"I;16"``, ``"RGBA"``, ``"P"``,
            ``"CMYK"``, ...). 16-bit colour is ``"RGB;16"``, ``"RGBA;16"`` or ``"LA;16"``; arrays get the
            mode Pillow would give them, or a name such as ``"RGB;F"`` when Pillow has none.
        notes: Human-readable conversions applied, in order.
    """

    image: Image.Image
    source: str
    original_size: tuple[int, int]
    original_mode: str
    notes: tuple[str, ...] = ()

    def to_array(self) -> np.ndarray:
        """Return the picture as a new ``(H, W, 3)`` ``uint8`` array."""
        return np.array(self.image.convert("RGB"), dtype=np.uint8)


def list_samples() -> list[str]:
    """Return the names of the built-in sample pictures, sorted."""
    return sorted(SAMPLES)


def load_image(
    source: str | os.PathLike[str] | Image.Image | np.ndarray,
    *,
    max_pixels: int = 50_000_000,
    downscale_to: int | None = 4096,
    url_timeout: float = 20.0,
    url_max_bytes: int = 50 * 2**20,
    url_deadline: float = 60.0,
) -> LoadedImage:
    """Load a picture as 8-bit RGB.

    A string is, in this order: an ``http(s)://`` URL, an existing file, or a built-in sample name
    (case-insensitive, see :func:`list_samples`). See the module docstring for how 16-bit and float data
    are scaled to 0-255.

    Args:
        source: Path, URL, sample name, PIL image, or array of shape ``(H, W)``, ``(H, W, 1)``,
            ``(H, W, 3)`` or ``(H, W, 4)`` with dtype ``uint8``, ``uint16``, another integer type, float
            or bool.
        max_pixels: Largest ``width * height`` accepted, checked from the header before decoding
            (decompression-bomb guard).
        downscale_to: Pictures whose long side exceeds this many pixels are downscaled so that it is this
            long (aspect kept); ``None`` keeps the full size.
        url_timeout: Seconds to wait on each network operation for a URL.
        url_max_bytes: Largest download accepted for a URL, in bytes.
        url_deadline: Seconds the whole download of a URL may take (a server trickling bytes slowly is
            given up on), connection included.

    Returns:
        The loaded picture with its provenance and conversion notes.

    Raises:
        ImageError: The source does not exist, is not a readable image, is truncated or corrupt, has zero
            size, exceeds ``max_pixels`` or ``url_max_bytes``, or the download failed or took longer than
            ``url_deadline``.
        TypeError: ``source`` has an unsupported type.
        ValueError: ``max_pixels`` or ``downscale_to`` is not positive.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if downscale_to is not None and downscale_to < 1:
        raise ValueError(f"downscale_to must be positive or None, got {downscale_to}")
    if not url_deadline > 0:
        raise ValueError(f"url_deadline must be positive, got {url_deadline}")

    if isinstance(source, np.ndarray):
        rgb, mode, notes = _from_array(source, max_pixels)
        return _finish(rgb, mode, notes, source="<ndarray>", orientation=1, downscale_to=downscale_to)
    if isinstance(source, Image.Image):
        return _from_pil(source, max_pixels, downscale_to)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            "load_image expects a path, URL, sample name, PIL image or numpy array, "
            f"got {type(source).__name__}"
        )

    text = os.fspath(source)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if _URL_RE.match(text):
        data = _fetch_url(text, url_timeout, url_max_bytes, url_deadline)
        return _from_encoded(lambda: io.BytesIO(data), text, len(data), max_pixels, downscale_to)

    path = Path(text).expanduser()
    if path.is_dir():
        raise ImageError(f"{text!r} is a directory, not an image file")
    if path.exists():
        try:
            nbytes = path.stat().st_size
        except OSError as e:
            raise ImageError(f"cannot read image {text!r}: {e.strerror or e}") from e
        return _from_encoded(lambda: path.open("rb"), text, nbytes, max_pixels, downscale_to)

    sample = SAMPLES.get(text.strip().lower())
    if sample is not None:
        log.debug("loading built-in sample %r from scikit-image", text)
        rgb, mode, notes = _from_array(sample(), max_pixels)
        return _finish(rgb, mode, notes, source=text, orientation=1, downscale_to=downscale_to)

    msg = f"image file {text!r} does not exist and is not a built-in sample"
    matches = close_matches(text, SAMPLES)
    if matches:
        msg += "; did you mean: " + ", ".join(repr(m) for m in matches) + "?"
    else:
        msg += " (samples: " + ", ".join(list_samples()) + ")"
    if "://" in text:
        msg += "; only http:// and https:// URLs are supported"
    raise ImageError(msg)


# ----------------------------------------------------------------------------------------------------
# Sources


def _socket_of(response: object) -> socket.socket | None:
    """The socket under an ``http.client.HTTPResponse`` (None for anything else)."""
    raw = getattr(getattr(response, "fp", None), "raw", None)
    sock = getattr(raw, "_sock", None)
    return sock if isinstance(sock, socket.socket) else None


def _fetch_url(url: str, timeout: float, max_bytes: int, deadline: float = 60.0) -> bytes:
    """Download ``url``, at most ``max_bytes`` bytes within ``deadline`` seconds in all; each network
    operation waits at most ``timeout`` seconds (and no longer than the time left). Raise ImageError on any
    failure."""
    limit = f"{max_bytes / 2**20:g} MB"
    request = urllib.request.Request(url, headers={"User-Agent": "camanim", "Accept": "image/*"})
    log.info("downloading %s", url)
    chunks: list[bytes] = []
    end = time.monotonic() + deadline
    too_slow = ImageError(
        f"could not download {url}: it took longer than {deadline:g} s (url_deadline); the server is too "
        "slow or stalled: retry later, raise url_deadline, or download the image and pass the file"
    )
    try:
        # Looked up on the module at call time, so tests can monkeypatch urllib.request.urlopen.
        with urllib.request.urlopen(request, timeout=min(timeout, deadline)) as response:
            headers = getattr(response, "headers", None) or {}
            ctype = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if ctype and not ctype.startswith("image/") and ctype not in _OK_CONTENT_TYPES:
                raise ImageError(f"{url} is not an image: the server sent Content-Type {ctype!r}")
            length = (headers.get("Content-Length") or "").strip()
            if length.isdigit() and int(length) > max_bytes:
                raise ImageError(f"{url} is larger than {limit} ({int(length):,} bytes; url_max_bytes)")
            total = 0
            # read1 returns what has arrived (read would wait for a whole chunk); the deadline is checked
            # between reads, and each read waits no longer than the time left.
            read = getattr(response, "read1", None) or response.read
            sock = _socket_of(response)
            while True:
                left = end - time.monotonic()
                if left <= 0:
                    raise too_slow
                if sock is not None:
                    sock.settimeout(min(timeout, left))
                chunk = read(_CHUNK)
                if not chunk:
                    break
                total += len(chunk)
                if total > max_bytes:
                    raise ImageError(f"{url} is larger than {limit} (url_max_bytes={max_bytes:,})")
                chunks.append(chunk)
    except ImageError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as e:  # URLError and TimeoutError included
        if time.monotonic() >= end:
            raise too_slow from e
        if isinstance(e, urllib.error.HTTPError):
            why = f"HTTP {e.code} {e.reason}"
        elif isinstance(e, urllib.error.URLError) and not isinstance(e.reason, TimeoutError):
            why = str(e.reason)
        elif isinstance(e, (TimeoutError, urllib.error.URLError)):
            why = f"timed out after {timeout:g} s"
        else:
            why = str(e)
        raise ImageError(f"could not download {url}: {why}") from e
    return b"".join(chunks)


def _from_encoded(
    opener: Opener, name: str, nbytes: int, max_pixels: int, downscale_to: int | None
) -> LoadedImage:
    """Decode an encoded image (a file or downloaded bytes) that ``opener`` opens afresh on each call."""
    if nbytes == 0:
        raise ImageError(f"cannot read image {name!r}: file is empty (0 bytes)")
    notes: list[str] = []
    try:
        fh = opener()
    except OSError as e:
        raise ImageError(f"cannot read image {name!r}: {e.strerror or e}") from e
    with fh:
        head = fh.read(16)
        fh.seek(0)
        try:
            with warnings.catch_warnings():
                # max_pixels is the policy; Pillow's warning threshold would only add noise.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(fh)
        except Image.DecompressionBombError as e:
            raise ImageError(
                f"image {name!r} is too large to decode safely: {e} (camanim limit max_pixels={max_pixels:,})"
            ) from e
        except UnidentifiedImageError as e:
            if not head.startswith(_TIFF_MAGIC):
                raise ImageError(
                    f"cannot read image {name!r}: not a recognised image format{_text_hint(fh)}"
                ) from e
            # e.g. float RGB TIFFs, which Pillow cannot open but tifffile can.
            arr, orientation, mode = _read_tiff(opener, name, max_pixels)
            rgb = _array_to_rgb8(arr, notes, f"{arr.dtype.name} TIFF")
            return _finish(rgb, mode, notes, source=name, orientation=orientation, downscale_to=downscale_to)
        except _DECODE_ERRORS as e:
            raise ImageError(f"cannot read image {name!r}: file is truncated or corrupt ({e})") from e

        _check_size(im.size, name, max_pixels)
        original_size = im.size
        if getattr(im, "is_animated", False):
            notes.append("animated image: used the first frame")

        if im.format == "TIFF" and im.mode in ("RGB", "RGBA") and _tiff_bits(im) > 8:
            # Pillow reduces 16-bit colour TIFFs to 8 bits; tifffile reads them faithfully.
            arr, orientation, mode = _read_tiff(opener, name, max_pixels)
            rgb = _array_to_rgb8(arr, notes, f"{_tiff_bits(im)}-bit {im.mode} TIFF")
            return _finish(rgb, mode, notes, source=name, orientation=orientation, downscale_to=downscale_to)

        rawmode = _tile_rawmode(im)
        if im.format == "PNG" and rawmode in _PNG16_RAWMODES:
            decoded = _try_png16(opener, rawmode, im.size)
            if decoded is not None:
                arr, orientation = decoded
                mode = _PNG16_MODES[rawmode]
                rgb = _array_to_rgb8(arr, notes, f"16-bit {mode.split(';')[0]} PNG")
                return _finish(
                    rgb, mode, notes, source=name, orientation=orientation, downscale_to=downscale_to
                )
            notes.append("16-bit colour PNG reduced to 8 bits by Pillow (high byte of each sample)")

        if im.format == "JPEG" and downscale_to is not None and max(im.size) > downscale_to:
            # DCT-domain downscaling while decoding: much faster and lighter than a full decode.
            scale = downscale_to / max(im.size)
            im.draft(None, (math.ceil(im.width * scale), math.ceil(im.height * scale)))
        _load(im, name)
        original_mode = im.mode
        rgb_image = _pil_to_rgb(im, notes)
        orientation = _orientation(im)
    return _finish(
        rgb_image,
        original_mode,
        notes,
        source=name,
        orientation=orientation,
        downscale_to=downscale_to,
        original_size=original_size,
    )


def _from_pil(im: Image.Image, max_pixels: int, downscale_to: int | None) -> LoadedImage:
    """Convert a caller's PIL image (possibly not yet loaded)."""
    name = getattr(im, "filename", "") or "<PIL.Image>"
    _check_size(im.size, name, max_pixels)
    _load(im, name)
    notes: list[str] = []
    rgb = _pil_to_rgb(im, notes)
    if rgb is im:  # never alias the caller's object
        rgb = im.copy()
    return _finish(rgb, im.mode, notes, source=name, orientation=_orientation(im), downscale_to=downscale_to)


def _from_array(arr: np.ndarray, max_pixels: int) -> tuple[np.ndarray, str, list[str]]:
    """Validate a caller's array; return it as ``(H, W, 3)`` uint8 with its mode name and notes."""
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        hint = ""
        if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[2] > 4:
            hint = "; it looks channels-first, use arr.transpose(1, 2, 0)"
        raise ImageError(
            f"image array must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got {arr.shape}{hint}"
        )
    if arr.dtype.kind not in "biuf":
        raise ImageError(f"image array must have an integer, float or bool dtype; got {arr.dtype}")
    h, w = arr.shape[:2]
    _check_size((w, h), "<ndarray>", max_pixels)
    notes: list[str] = []
    rgb = _array_to_rgb8(arr, notes, f"{arr.dtype.name} array")
    return rgb, _array_mode(arr), notes


def _read_tiff(opener: Opener, name: str, max_pixels: int) -> tuple[np.ndarray, int, str]:
    """Read the first page of a TIFF with tifffile: ``(H, W[, C])`` array, orientation, mode name."""
    import tifffile  # a scikit-image dependency; only needed for TIFFs Pillow cannot read faithfully

    try:
        with opener() as fh, tifffile.TiffFile(fh) as tif:
            page = tif.pages[0]
            axes, shape = page.axes, page.shape
            dims = dict(zip(axes, shape, strict=False))
            _check_size((int(dims.get("X", 0)), int(dims.get("Y", 0))), name, max_pixels)
            arr = page.asarray()
            tag = page.tags.get(_EXIF_ORIENTATION)
            orientation = int(tag.value) if tag is not None else 1
    except ImageError:
        raise
    except Exception as e:  # tifffile raises assorted types for malformed files
        raise ImageError(f"cannot read image {name!r}: TIFF is truncated or corrupt ({e})") from e
    if "S" in axes:  # samples (channels) last, whatever the planar configuration
        arr = np.moveaxis(arr, axes.index("S"), -1)
        axes = axes.replace("S", "") + "S"
    arr = arr.squeeze(axis=tuple(i for i, a in enumerate(axes) if a not in "YXS" and arr.shape[i] == 1))
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] <= 4)):
        raise ImageError(f"cannot read image {name!r}: unsupported TIFF layout, axes {axes} shape {shape}")
    return arr, orientation, _array_mode(arr)


# ----------------------------------------------------------------------------------------------------
# Conversions


def _pil_to_rgb(im: Image.Image, notes: list[str]) -> Image.Image:
    """Convert a loaded PIL image of any mode to ``"RGB"``, appending notes."""
    mode = im.mode
    if mode in _HIGH_DEPTH_MODES:
        arr = np.asarray(im)
        if mode == "I" and arr.size and arr.min() >= 0 and arr.max() <= 65535:
            # 16-bit files can open as "I"; treat them like I;16 rather than as generic integers.
            arr = arr.astype(np.uint16)
        return Image.fromarray(_array_to_rgb8(arr, notes, _MODE_NAMES[mode]))
    if _has_alpha(im):
        rgba = im.convert("RGBA")
        if rgba.getextrema()[3][0] == 255:
            notes.append(f"converted {_MODE_NAMES.get(mode, mode)} to RGB, alpha fully opaque and dropped")
            return rgba.convert("RGB")
        notes.append(f"converted {_MODE_NAMES.get(mode, mode)} to RGB, alpha composited on white")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return im
    try:
        out = im.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(f"cannot convert image mode {mode!r} to RGB: {e}") from e
    notes.append(f"converted {_MODE_NAMES.get(mode, mode)} to RGB")
    return out


def _array_to_rgb8(arr: np.ndarray, notes: list[str], what: str) -> np.ndarray:
    """Convert ``(H, W)`` or ``(H, W, C)`` (C in 1..4; 2 and 4 carry alpha) to ``(H, W, 3)`` uint8."""
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.ndim == 2:
        arr = arr[:, :, None]
    channels = arr.shape[2]
    colour = arr[:, :, :1] if channels <= 2 else arr[:, :, :3]
    alpha = arr[:, :, -1] if channels in (2, 4) else None
    gray = "" if channels > 2 or "grayscale" in what else " (grayscale)"

    parts = [f"converted {what}{gray} to RGB"]
    if colour.dtype == np.uint8:
        if alpha is None:
            if channels == 3:
                return np.ascontiguousarray(colour)
            notes.append(parts[0])
            return np.repeat(colour, 3, axis=2)
        values = colour.astype(np.float32) / 255
    else:
        values, rule = _scale(colour)
        parts.append(rule)

    if alpha is not None:
        a = _alpha(alpha)[:, :, None]
        if a.size and a.min() < 1:
            values = values * a + (1 - a)
            parts.append("alpha composited on white")
        else:
            parts.append("alpha fully opaque and dropped")
    notes.append(", ".join(parts))
    out = np.rint(np.clip(values, 0, 1) * 255).astype(np.uint8)
    return np.repeat(out, 3, axis=2) if out.shape[2] == 1 else np.ascontiguousarray(out)


def _scale(values: np.ndarray) -> tuple[np.ndarray, str]:
    """Map non-uint8 colour values to float32 in [0, 1] by the module rules; also return the rule text."""
    if values.dtype == bool:
        return values.astype(np.float32), "False/True mapped to 0/255"
    if values.size == 0:
        return values.astype(np.float32), "empty"
    if values.dtype.kind == "f":
        finite = np.isfinite(values)
        bad = int(values.size - np.count_nonzero(finite))
        if bad == values.size:
            return np.zeros(values.shape, np.float32), "no finite values, set to black"
        lo = float(values[finite].min()) if bad else float(values.min())
        hi = float(values[finite].max()) if bad else float(values.max())
        if lo >= -_FLOAT_TOLERANCE and hi <= 1 + _FLOAT_TOLERANCE:
            out, rule = np.clip(values, 0, 1).astype(np.float32), "float values in [0, 1] scaled to 0-255"
        else:
            out = ((values.astype(np.float64) - lo) / (hi - lo if hi > lo else 1)).astype(np.float32)
            rule = f"float data range {lo:.4g} to {hi:.4g} stretched to 0-255"
        if bad:
            out = np.where(finite, out, np.float32(0))
            rule += f", {bad:,} non-finite values set to black"
        return out, rule

    lo, hi = int(values.min()), int(values.max())
    if values.dtype != np.uint16:
        if lo >= 0 and hi <= 255:
            return values.astype(np.float32) / 255, "values 0-255 used as 8-bit"
        if lo < 0 or hi > 65535:
            out = ((values.astype(np.float64) - lo) / (hi - lo or 1)).astype(np.float32)
            return out, f"data range {lo} to {hi} stretched to 0-255"
    if hi >= FULL_RANGE_MIN_16 or hi == lo:
        return values.astype(np.float32) / 65535, "range 0-65535 scaled to 0-255"
    out = (values.astype(np.float32) - lo) / (hi - lo)
    return out, (
        f"data range {lo}-{hi} stretched to 0-255 "
        f"(max below {FULL_RANGE_MIN_16}, so scaling by 0-65535 would leave it nearly black)"
    )


def _alpha(alpha: np.ndarray) -> np.ndarray:
    """Alpha as float32 in [0, 1]: uint8 / 255, uint16 / 65535, float clipped, bool as 0/1."""
    if alpha.dtype == bool:
        return alpha.astype(np.float32)
    if alpha.dtype.kind == "f":
        return np.clip(np.nan_to_num(alpha, nan=1.0), 0, 1).astype(np.float32)
    if alpha.dtype == np.uint8:
        full = 255
    elif alpha.dtype == np.uint16:
        full = 65535
    else:
        full = 255 if alpha.size and int(alpha.min()) >= 0 and int(alpha.max()) <= 255 else 65535
    return np.clip(alpha.astype(np.float32) / full, 0, 1)


def _finish(
    image: Image.Image | np.ndarray,
    original_mode: str,
    notes: list[str],
    *,
    source: str,
    orientation: int,
    downscale_to: int | None,
    original_size: tuple[int, int] | None = None,
) -> LoadedImage:
    """Downscale, apply the EXIF orientation and wrap up."""
    notes = list(notes)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if original_size is None:
        original_size = image.size
    if downscale_to is not None and max(image.size) > downscale_to:
        image = _downscale(image, downscale_to, original_size, notes)
    if orientation in _ORIENTATIONS:
        method, how = _ORIENTATIONS[orientation]
        image = image.transpose(method)
        notes.append(f"EXIF orientation {orientation} applied ({how})")
    log.debug("loaded %s: %dx%d %s -> %dx%d RGB", source, *original_size, original_mode, *image.size)
    return LoadedImage(image, source, original_size, original_mode, tuple(notes))


def _downscale(
    image: Image.Image, downscale_to: int, original_size: tuple[int, int], notes: list[str]
) -> Image.Image:
    """Resize so that the long side is ``downscale_to`` pixels."""
    w, h = image.size
    scale = downscale_to / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    # reducing_gap lets Pillow box-reduce by an integer factor first (fast); LANCZOS then finishes.
    out = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    ow, oh = original_size
    notes.append(f"downscaled from {ow}x{oh} to {size[0]}x{size[1]} (downscale_to={downscale_to})")
    log.info("downscaled image from %dx%d to %dx%d (downscale_to=%d)", ow, oh, *size, downscale_to)
    return out


# ----------------------------------------------------------------------------------------------------
# Helpers


def _check_size(size: tuple[int, int], name: str, max_pixels: int) -> None:
    """Refuse zero-size images and images over ``max_pixels`` (before any decoding)."""
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError(f"image {name!r} has zero size ({w}x{h})")
    if w * h > max_pixels:
        raise ImageError(
            f"image {name!r} is {w}x{h} = {w * h:,} pixels, over the limit of max_pixels={max_pixels:,} "
            "(decompression-bomb guard); pass a larger max_pixels if you trust the file"
        )


def _load(im: Image.Image, name: str) -> None:
    """Decode pixel data, turning Pillow's assorted decoder errors into ImageError."""
    try:
        im.load()
    except _DECODE_ERRORS as e:
        raise ImageError(f"cannot read image {name!r}: file is truncated or corrupt ({e})") from e


def _orientation(im: Image.Image) -> int:
    """EXIF orientation tag (1..8); 1 when absent or unreadable."""
    try:
        value = int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # malformed EXIF must not make an otherwise good picture unreadable
        log.debug("ignoring unreadable EXIF", exc_info=True)
        return 1
    return value if 1 <= value <= 8 else 1


def _has_alpha(im: Image.Image) -> bool:
    """Whether the image carries transparency (an alpha band, or a tRNS/GIF transparent colour)."""
    has = getattr(im, "has_transparency_data", None)  # Pillow >= 10.1
    if has is not None:
        return bool(has)
    return im.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info


def _tile_rawmode(im: Image.Image) -> str | None:
    """The rawmode Pillow will decode the first tile with, when it is a plain string."""
    tile = getattr(im, "tile", None)
    if not tile or len(tile[0]) < 4:
        return None
    args = tile[0][3]
    return args if isinstance(args, str) else None


def _try_png16(opener: Opener, rawmode: str, size: tuple[int, int]) -> tuple[np.ndarray, int] | None:
    """Decode a 16-bit colour PNG exactly: ``(H, W, C)`` uint16 samples and the EXIF orientation.

    Returns None when Pillow will not cooperate; the caller then uses Pillow's 8-bit decode, which also
    reports genuine corruption.
    """
    orientation = 1

    def decode(raw: str) -> np.ndarray:
        nonlocal orientation
        with opener() as fh, Image.open(fh) as im:
            t = im.tile[0]
            im.tile = [t._replace(args=raw) if hasattr(t, "_replace") else (t[0], t[1], t[2], raw)]
            im.load()
            orientation = _orientation(im)  # after load: an eXIf chunk may follow the image data
            return np.asarray(im).astype(np.uint16)

    try:
        if rawmode == "LA;16B":
            b = decode("RGBA")
            arr = np.stack([b[:, :, 0] << 8 | b[:, :, 1], b[:, :, 2] << 8 | b[:, :, 3]], axis=-1)
        else:
            arr = decode(rawmode) << 8 | decode(_PNG16_RAWMODES[rawmode])
    except Exception:
        log.warning("exact 16-bit PNG decoding failed; using Pillow's 8-bit reduction", exc_info=True)
        return None
    if arr.shape[:2] != (size[1], size[0]):
        log.warning("exact 16-bit PNG decoding gave shape %s; using Pillow's 8-bit reduction", arr.shape)
        return None
    return arr, orientation


def _tiff_bits(im: Image.Image) -> int:
    """Largest BitsPerSample of a Pillow-opened TIFF; 8 when unknown."""
    try:
        return int(max(np.atleast_1d(im.tag_v2.get(258, 8))))  # type: ignore[attr-defined]
    except Exception:
        return 8


def _array_mode(arr: np.ndarray) -> str:
    """A Pillow-style mode name for an array: ``"L"``, ``"RGB"``, ``"I;16"``, ``"RGB;16"``, ``"F"``, ..."""
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    base = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[channels]
    kind, itemsize = arr.dtype.kind, arr.dtype.itemsize
    if kind == "u" and itemsize == 1:
        return base
    if kind == "b":
        return "1" if channels == 1 else f"{base};bool"
    if kind == "u" and itemsize == 2:
        return "I;16" if channels == 1 else f"{base};16"
    if kind == "f":
        return "F" if channels == 1 else f"{base};F"
    return "I" if channels == 1 else f"{base};{arr.dtype.name}"


def _text_hint(fh: BinaryIO) -> str:
    """A hint when undecodable bytes look like text (an HTML error page, JSON, a renamed text file)."""
    try:
        fh.seek(0)
        head = fh.read(512)
    except OSError:
        return ""
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in head)
    if head and b"\x00" not in head and printable >= 0.9 * len(head):
        return " (the file contains text, e.g. HTML or JSON, not image data)"
    return ""
