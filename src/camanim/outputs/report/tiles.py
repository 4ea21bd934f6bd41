"""The report's frames: every layer's overlay, packed into WebP (or JPEG) sprite sheets.

A frame tile is computed exactly as :meth:`camanim.animation.Animation.overlays` computes it: the raw map
after the method's ReLU, bilinearly upsampled to the input size, shrunk (antialiased) to the tile size,
scaled by a range and coloured over the picture the model saw. Only the tiles are embedded (no caption,
colour bar or progress strip: the page draws those), :data:`PER_SHEET` tiles per sheet, row-major in a grid
of :data:`COLUMNS` columns, so the page decodes one sheet per 64 layers and draws a tile with one
``drawImage`` call.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from camanim.compute.normalize import Range
from camanim.compute.resize import resize_maps
from camanim.outputs.render import overlay_batch

#: Tiles per row of a sprite sheet.
COLUMNS = 8
#: Tiles per sprite sheet (WebP images are limited to 16383 pixels a side).
PER_SHEET = 64
FORMATS = {"webp": "image/webp", "jpeg": "image/jpeg", "png": "image/png"}


def tile_size(in_hw: tuple[int, int], longest: int | None) -> tuple[int, int]:
    """``(h, w)`` of a tile whose longer side is ``longest`` pixels (the input size when None or larger)."""
    h, w = in_hw
    if longest is None or longest >= max(h, w):
        return h, w
    if longest < 8:
        raise ValueError(f"tiles must be at least 8 pixels, got {longest}")
    scale = longest / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def upsampled(maps: Sequence[np.ndarray], size: tuple[int, int], relu: bool) -> np.ndarray:
    """Maps ``(h, w)`` (any mix of sizes) after ReLU, bilinearly upsampled to ``size``: ``(n, H, W)`` float32.

    Maps of one native size go through one interpolation call, as in :mod:`camanim.animation`.
    """
    out = np.empty((len(maps), *size), np.float32)
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, m in enumerate(maps):
        groups.setdefault(tuple(m.shape), []).append(k)
    for ks in groups.values():
        raw = torch.from_numpy(np.stack([np.asarray(maps[k], np.float32) for k in ks]))
        if relu:
            raw = raw.clamp_min(0)
        out[ks] = resize_maps(raw, size).numpy()
    return out


def shrink(stack: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize ``(n, H, W)`` to ``size`` (antialiased when shrinking): values stay inside the input's range."""
    if stack.shape[1:] == tuple(size):
        return stack
    t = torch.from_numpy(stack)[:, None]
    smaller = size[0] < stack.shape[1] or size[1] < stack.shape[2]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=smaller)[:, 0].numpy()


def map_ranges(maps: Sequence[np.ndarray], size: tuple[int, int], relu: bool) -> list[Range]:
    """Each map's range after ReLU and upsampling to ``size`` (local normalisation), ``PER_SHEET`` at a time."""
    out: list[Range] = []
    for start in range(0, len(maps), PER_SHEET):
        flat = upsampled(maps[start : start + PER_SHEET], size, relu).reshape(-1, size[0] * size[1])
        out.extend(Range(float(lo), float(hi)) for lo, hi in zip(flat.min(1), flat.max(1), strict=True))
    return out


def normalize_stack(stack: np.ndarray, ranges: Sequence[Range]) -> np.ndarray:
    """Scale each ``(H, W)`` of ``(n, H, W)`` by its range into ``[0, 1]``; a flat range gives zeros."""
    lo = np.array([r.low for r in ranges], np.float32)[:, None, None]
    inv = np.array([0.0 if r.is_flat() else 1.0 / r.span for r in ranges], np.float32)[:, None, None]
    out = (stack - lo) * inv
    np.clip(out, 0.0, 1.0, out=out)
    return np.nan_to_num(out, copy=False, nan=0.0)


def overlay_tiles(
    maps: Sequence[np.ndarray],
    ranges: Mapping[str, Sequence[Range]],
    *,
    in_hw: tuple[int, int],
    tile: tuple[int, int],
    display: np.ndarray,
    lut: np.ndarray,
    alpha: float,
    relu: bool,
) -> Iterator[dict[str, np.ndarray]]:
    """The overlays of every map under every normalisation, ``PER_SHEET`` maps at a time.

    Args:
        maps: raw maps ``(h, w)`` in frame order.
        ranges: per normalisation name, one range per map.
        in_hw: the model's input size; maps are upsampled to it before anything else.
        tile: ``(h, w)`` of a tile.
        display: the picture the model saw, resized to ``tile``: ``(h, w, 3)`` uint8.
        lut: ``(n, 3)`` uint8 colour table.
        alpha: weight of the colour over the picture.
        relu: apply the method's ReLU first.

    Yields:
        Per chunk of frames, ``{norm: (n, h, w, 3) uint8}``.
    """
    for start in range(0, len(maps), PER_SHEET):
        stop = min(len(maps), start + PER_SHEET)
        stack = shrink(upsampled(maps[start:stop], in_hw, relu), tile)
        yield {
            norm: overlay_batch(display, normalize_stack(stack, rs[start:stop]), lut, alpha)
            for norm, rs in ranges.items()
        }


def pack(tiles: np.ndarray, columns: int = COLUMNS) -> np.ndarray:
    """Tiles ``(n, h, w, 3)`` laid out row-major in a grid ``columns`` wide (unused cells black)."""
    n, h, w, _ = tiles.shape
    rows = -(-n // columns)
    sheet = np.zeros((rows * h, min(n, columns) * w, 3), np.uint8)
    for k in range(n):
        r, c = divmod(k, columns)
        sheet[r * h : (r + 1) * h, c * w : (c + 1) * w] = tiles[k]
    return sheet


def encode(rgb: np.ndarray, fmt: str = "webp", quality: int = 75) -> bytes:
    """An ``(H, W, 3)`` uint8 image as WebP, JPEG (lossy, ``quality`` 1-100) or PNG bytes."""
    if fmt not in FORMATS:
        raise ValueError(f"image format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    buf = io.BytesIO()
    img = Image.fromarray(np.ascontiguousarray(rgb))
    if fmt == "webp":
        img.save(buf, "WEBP", quality=quality, method=2)  # method 4+: ~5 % smaller, 2x slower
    elif fmt == "jpeg":
        img.save(buf, "JPEG", quality=quality, optimize=True)
    else:
        img.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def data_uri(data: bytes, fmt: str) -> str:
    """``data:<mime>;base64,...`` for image bytes of format ``fmt``."""
    return f"data:{FORMATS[fmt]};base64,{base64.b64encode(data).decode('ascii')}"


def image_format(data: bytes) -> str | None:
    """``"png"``, ``"jpeg"`` or ``"webp"`` from an image file's first bytes; None for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def figure_uri(data: bytes, *, max_png: int = 150_000, fmt: str = "webp", quality: int = 90) -> str | None:
    """A figure file as a data URI: kept as is when small, else re-encoded (lossy, text stays legible).

    Returns None when ``data`` is not a PNG, JPEG or WebP image.
    """
    kind = image_format(data)
    if kind is None:
        return None
    if len(data) <= max_png:
        return data_uri(data, kind)
    with Image.open(io.BytesIO(data)) as img:
        rgb = np.asarray(img.convert("RGB"))
    smaller = encode(rgb, fmt, quality)
    return data_uri(smaller, fmt) if len(smaller) < len(data) else data_uri(data, kind)
