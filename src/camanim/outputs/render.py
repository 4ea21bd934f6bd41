"""Colour maps, overlays, frame composition and grids: arrays in, arrays out.

Everything here is vectorised NumPy plus a little Pillow text; no matplotlib figure is drawn (one figure per
frame costs ~180 ms, the whole frame here well under 1 ms). Matplotlib is used only for its colour tables.

Typical video loop (one :class:`FrameComposer` per video, so the static layout is drawn once)::

    lut = colormap_lut("jet")
    compose = FrameComposer((224, 224), ["local: layer range", "global"], luts=[lut, lut])
    for i, (m, rl) in enumerate(zip(maps, local)):
        tiles = [overlay(image, normalize(m, rl), lut), overlay(image, normalize(m, rg), lut)]
        writer.write(compose(tiles, caption_lines, ranges=[rl, rg], progress=(i + 1) / len(maps)))
"""

from __future__ import annotations

import functools
import logging
import math
import os
import secrets
import sys
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from camanim.compute.normalize import Range
from camanim.errors import UnknownNameError

__all__ = [
    "FrameComposer",
    "FrameStyle",
    "apply_colormap",
    "colormap_lut",
    "compose_frame",
    "grid",
    "overlay",
    "overlay_batch",
    "save_png",
]

logger = logging.getLogger(__name__)

RGB = tuple[int, int, int]


# --------------------------------------------------------------------------------------------- colour maps


@functools.lru_cache(maxsize=64)
def colormap_lut(name: str = "jet", n: int = 256) -> np.ndarray:
    """A matplotlib colour map as a lookup table.

    Args:
        name: A matplotlib colour map name, e.g. ``"jet"``, ``"viridis"``, ``"inferno_r"`` (case-sensitive).
        n: Number of entries.

    Returns:
        Read-only ``(n, 3)`` uint8 RGB table; entry ``k`` is ``cmap(k / (n - 1), bytes=True)``, so entries 0
        and ``n - 1`` are the map's colours at 0 and 1. Cached per ``(name, n)``.

    Raises:
        UnknownNameError: If matplotlib has no colour map called ``name``; the message lists close matches.
    """
    import matplotlib  # lazy: ~0.1 s, and only the colour tables are needed (no pyplot, no backend)

    if n < 2:
        raise ValueError(f"a colour table needs n >= 2 entries, got {n}")
    try:
        cmap = matplotlib.colormaps[name]
    except KeyError:
        raise UnknownNameError("colour map", name, sorted(matplotlib.colormaps)) from None
    lut = np.ascontiguousarray(cmap(np.linspace(0.0, 1.0, n), bytes=True)[:, :3])
    lut.flags.writeable = False
    return lut


def _as_lut(lut: np.ndarray | str) -> np.ndarray:
    return colormap_lut(lut) if isinstance(lut, str) else lut


def _as_numpy(x: Any) -> np.ndarray:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _lut_index(norm_map: Any, n: int) -> np.ndarray:
    # Same binning as matplotlib's Colormap.__call__: floor(x * n), with x == 1 in the last bin.
    m = np.asarray(_as_numpy(norm_map), dtype=np.float32)
    idx = np.nan_to_num(m * np.float32(n), copy=False, nan=0.0)
    np.clip(idx, 0, n - 1, out=idx)
    return idx.astype(np.uint8 if n <= 256 else np.intp)


def apply_colormap(norm_map: Any, lut: np.ndarray | str = "jet") -> np.ndarray:
    """Colour a normalised map by table lookup.

    Args:
        norm_map: ``(H, W)`` (or any shape ``S``) values in ``[0, 1]``; outside values clip, NaN counts as 0.
        lut: ``(n, 3)`` uint8 table from :func:`colormap_lut`, or a colour map name.

    Returns:
        ``(H, W, 3)`` (``S + (3,)``) uint8 RGB; equals ``cmap(norm_map, bytes=True)[..., :3]`` for ``n == cmap.N``.
    """
    lut = _as_lut(lut)
    # np.take along axis 0 is ~4x faster than lut[idx] fancy indexing for (H, W) indices.
    return np.take(lut, _lut_index(norm_map, len(lut)), axis=0)


def _blend(image: np.ndarray, heat: np.ndarray, alpha: float) -> np.ndarray:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    # Fixed point in 1/256ths: exact at alpha 0 and 1, no float round trip, fits uint16 (255*256+128).
    a = np.uint16(round(alpha * 256))
    out = heat.astype(np.uint16) * a  # heat first: it has the full (N, H, W, 3) shape when batched
    out += image.astype(np.uint16) * (np.uint16(256) - a)
    out += np.uint16(128)
    out >>= 8
    return out.astype(np.uint8)


def _check_image(image: np.ndarray, hw: tuple[int, ...]) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if image.shape[:2] != tuple(hw):
        raise ValueError(
            f"map size {tuple(hw)} differs from image size {image.shape[:2]}; upsample with resize_map first"
        )
    return image


def overlay(
    image: np.ndarray, norm_map: Any, lut: np.ndarray | str = "jet", alpha: float = 0.5
) -> np.ndarray:
    """Blend a coloured map over an image: ``(1 - alpha) * image + alpha * colour(norm_map)``.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        norm_map: ``(H, W)`` values in ``[0, 1]`` (NumPy or torch).
        lut: Colour table or colour map name.
        alpha: Weight of the colour map; 0 returns ``image``, 1 returns the coloured map, both exactly.

    Returns:
        ``(H, W, 3)`` uint8 RGB.
    """
    norm = _as_numpy(norm_map)
    if norm.ndim != 2:
        raise ValueError(f"norm_map must be (H, W), got {norm.shape}; use overlay_batch for (N, H, W)")
    return _blend(_check_image(image, norm.shape), apply_colormap(norm, lut), alpha)


def overlay_batch(
    image: np.ndarray, maps: Any, lut: np.ndarray | str = "jet", alpha: float = 0.5
) -> np.ndarray:
    """:func:`overlay` for many maps over one image at once.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        maps: ``(N, H, W)`` values in ``[0, 1]`` (NumPy or torch).
        lut: Colour table or colour map name.
        alpha: Weight of the colour map.

    Returns:
        ``(N, H, W, 3)`` uint8 RGB.
    """
    maps = _as_numpy(maps)
    if maps.ndim != 3:
        raise ValueError(f"maps must be (N, H, W), got {maps.shape}")
    return _blend(_check_image(image, maps.shape[1:])[None], apply_colormap(maps, lut), alpha)


# ---------------------------------------------------------------------------------------------------- text


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    font = ImageFont.load_default(size=size)
    if not isinstance(font, ImageFont.FreeTypeFont):
        logger.warning("Pillow has no FreeType support; captions use the fixed-size bitmap font")
    return font


class _TextPainter:
    """Draws single lines of text into uint8 RGB arrays, caching each rendered line's coverage mask."""

    def __init__(self, size: int, max_cached: int = 1024) -> None:
        self.font = _font(size)
        self.line_height = int(self.font.getbbox("Ág|")[3]) + 2
        self._masks: OrderedDict[tuple[str, int | None], np.ndarray] = OrderedDict()
        self._max = max_cached

    def width(self, text: str) -> int:
        return math.ceil(self.font.getlength(text))

    def fit(self, text: str, max_width: int | None) -> str:
        """``text`` shortened with an ellipsis so that it fits in ``max_width`` pixels."""
        if max_width is None or self.width(text) <= max_width:
            return text
        lo, hi = 0, len(text)  # longest prefix that fits, by bisection
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.width(text[:mid] + "…") <= max_width:
                lo = mid
            else:
                hi = mid - 1
        return text[:lo] + "…"

    def mask(self, text: str, max_width: int | None = None) -> np.ndarray:
        key = (text, max_width)
        m = self._masks.get(key)
        if m is not None:
            self._masks.move_to_end(key)
            return m
        fitted = self.fit(text, max_width)
        img = Image.new("L", (max(1, self.width(fitted) + 1), self.line_height), 0)
        ImageDraw.Draw(img).text((0, 0), fitted, font=self.font, fill=255)
        m = np.asarray(img, dtype=np.uint16)
        self._masks[key] = m
        if len(self._masks) > self._max:
            self._masks.popitem(last=False)
        return m

    def draw(
        self,
        frame: np.ndarray,
        text: str,
        xy: tuple[int, int],
        color: RGB,
        max_width: int | None = None,
        align: str = "left",
    ) -> None:
        """Blend ``text`` into ``frame`` in place; ``xy`` is the top-left (or top-right/top-centre) corner."""
        if not text:
            return
        m = self.mask(text, max_width)
        h, w = m.shape
        x, y = xy
        if align == "right":
            x -= w
        elif align == "center":
            x -= w // 2
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, frame.shape[1]), min(y + h, frame.shape[0])
        if x1 <= x0 or y1 <= y0:
            return
        a = m[y0 - y : y1 - y, x0 - x : x1 - x, None]
        region = frame[y0:y1, x0:x1]
        blended = region * (255 - a) + np.asarray(color, dtype=np.uint16) * a + 127
        region[...] = (blended // 255).astype(np.uint8)


def _auto_text_color(background: RGB) -> RGB:
    luma = 0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2]
    return (0, 0, 0) if luma >= 128 else (255, 255, 255)


def _shade(color: RGB, amount: int) -> RGB:
    """``color`` moved ``amount`` levels towards the middle grey (darker if light, lighter if dark)."""
    sign = -1 if sum(color) / 3 >= 128 else 1
    return tuple(int(min(255, max(0, c + sign * amount))) for c in color)  # type: ignore[return-value]


def _even(n: int) -> int:
    return n + (n & 1)


def _format_value(v: float) -> str:
    return f"{v:.3g}"


# ---------------------------------------------------------------------------------------------- frames


@dataclass(frozen=True)
class FrameStyle:
    """Look of a composed frame. All sizes are in pixels, colours are RGB 0..255.

    Attributes:
        tile_size: Displayed ``(H, W)`` of each tile; tiles of another size are resized (bilinear). None shows
            tiles at the size given to :class:`FrameComposer`.
        font_size: Text height for titles, captions and colour-bar labels.
        caption_lines: Number of caption lines reserved under the tiles; extra lines are dropped.
        colorbar: Draw a colour bar with the range's low/high values under each tile.
        progress: Draw the progress strip (depth in the network) at the bottom.
        background: Frame background colour.
        text_color: Text colour; None picks black or white for contrast with ``background``.
        padding: Outer margin.
        gap: Space between tiles.
        colorbar_height: Height of the colour bar gradient.
        progress_height: Height of the progress strip without a curve.
        curve_height: Height of the progress strip when a running curve is drawn.
        progress_color: Fill colour of the covered part of the strip.
        curve_color: Colour of the running curve.
        view: what a frame of a volume map shows: ``"slices"``, ``"mip"``, ``"frames"`` (a clip),
            ``"axial:N"``, ``"coronal:N"`` or ``"sagittal:N"``; None: slices, or frames for a clip (see
            :mod:`camanim.outputs.volume_frames`). Ignored for 2-D maps.
        slice_at: ``(z, y, x)`` on the model's grid the slices of a volume go through; None: the maximum of
            the final layer's map.
    """

    tile_size: tuple[int, int] | None = None
    font_size: int = 12
    caption_lines: int = 4
    colorbar: bool = True
    progress: bool = True
    background: RGB = (255, 255, 255)
    text_color: RGB | None = None
    padding: int = 8
    gap: int = 8
    colorbar_height: int = 8
    progress_height: int = 6
    curve_height: int = 28
    progress_color: RGB = (190, 190, 190)
    curve_color: RGB = (31, 119, 180)
    view: str | None = None
    slice_at: tuple[int, int, int] | None = None


class FrameComposer:
    """Lays out video frames once, then fills in the changing parts per frame.

    Layout, top to bottom: a title above each tile; the tiles side by side; under each tile a colour bar with
    its range's low and high values; a caption band of ``style.caption_lines`` lines; a progress strip whose
    filled fraction is the depth in the network, with an optional running curve (e.g. a ROAD score per layer).
    The frame's width and height are even (H.264 with yuv420p needs that).

    The background, titles, colour-bar gradients and strip are drawn in ``__init__``; a call copies that,
    pastes the tiles and draws the text that changes (rendered text lines are cached, so repeated strings
    such as the global range cost nothing).

    Args:
        tile_size: ``(H, W)`` of the tiles that will be passed in.
        titles: One title per tile, e.g. ``["local: layer range", "global"]``; sets the number of tiles.
        luts: One colour table (or colour map name) per tile for its colour bar; None draws no colour bars.
        progress_curve: ``(L,)`` values, one per layer, for the running curve; NaN leaves a gap.
        style: Layout and colours.
    """

    def __init__(
        self,
        tile_size: tuple[int, int],
        titles: Sequence[str],
        luts: Sequence[np.ndarray | str] | None = None,
        progress_curve: np.ndarray | Sequence[float] | None = None,
        style: FrameStyle | None = None,
    ) -> None:
        self.style = s = style or FrameStyle()
        self.n_tiles = len(titles)
        if self.n_tiles == 0:
            raise ValueError("FrameComposer needs at least one tile title")
        if luts is not None and len(luts) != self.n_tiles:
            raise ValueError(f"got {len(luts)} colour tables for {self.n_tiles} tiles")
        self.in_size = (int(tile_size[0]), int(tile_size[1]))
        th, tw = self.tile_size = s.tile_size or self.in_size
        self.text = _TextPainter(s.font_size)
        self.text_color = s.text_color or _auto_text_color(s.background)
        lh = self.text.line_height
        curve = None if progress_curve is None else np.asarray(progress_curve, dtype=np.float64).ravel()

        pad = s.padding
        width = 2 * pad + self.n_tiles * tw + (self.n_tiles - 1) * s.gap
        y = pad
        self.title_y = y
        y += lh if any(titles) else 0
        self.tile_y = y
        self.tile_x = [pad + i * (tw + s.gap) for i in range(self.n_tiles)]
        y += th + 4
        self.has_colorbar = bool(s.colorbar and luts is not None)
        if self.has_colorbar:
            self.bar_y = y
            y += s.colorbar_height + 1
            self.bar_label_y = y
            y += lh
        self.caption_y = y + 2
        y = self.caption_y + s.caption_lines * lh
        self.has_progress = s.progress
        if self.has_progress:
            y += 4
            self.strip_y = y
            self.strip_h = s.curve_height if curve is not None else s.progress_height
            y += self.strip_h
        height = y + pad
        self.shape = (_even(height), _even(width), 3)

        base = np.empty(self.shape, np.uint8)
        base[...] = s.background
        for x, title in zip(self.tile_x, titles, strict=True):
            self.text.draw(base, title, (x + tw // 2, self.title_y), self.text_color, tw, "center")
        if self.has_colorbar:
            assert luts is not None
            for x, lut in zip(self.tile_x, luts, strict=True):
                lut = _as_lut(lut)
                gradient = apply_colormap(np.linspace(0.0, 1.0, tw, dtype=np.float32), lut)
                base[self.bar_y : self.bar_y + s.colorbar_height, x : x + tw] = gradient
        if self.has_progress:
            self._strip_empty, self._strip_full = self._draw_strip(width - 2 * pad, curve)
            base[self.strip_y : self.strip_y + self.strip_h, pad : width - pad] = self._strip_empty
        self._base = base

    def _draw_strip(self, width: int, curve: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """The strip's uncovered and fully covered images; a frame shows a prefix of the covered one."""
        s = self.style
        empty = Image.new("RGB", (width, self.strip_h), _shade(s.background, 24))
        full = Image.new("RGB", (width, self.strip_h), s.progress_color)
        if curve is not None and curve.size:
            finite = curve[np.isfinite(curve)]
            if finite.size:
                lo, hi = float(finite.min()), float(finite.max())
                span = hi - lo if hi > lo else 1.0
                xs = (np.arange(curve.size) + 0.5) / curve.size * (width - 1)
                ys = (self.strip_h - 2) - (curve - lo) / span * (self.strip_h - 3)
                if hi == lo:
                    ys = np.full_like(curve, self.strip_h / 2)
                draw = ImageDraw.Draw(full)
                run: list[tuple[float, float]] = []
                for x, yv, ok in [*zip(xs, ys, np.isfinite(curve), strict=True), (0.0, 0.0, False)]:
                    if ok:
                        run.append((float(x), float(yv)))
                        continue
                    if len(run) == 1:
                        (px, py) = run[0]
                        draw.ellipse([px - 1, py - 1, px + 1, py + 1], fill=s.curve_color)
                    elif run:
                        draw.line(run, fill=s.curve_color, width=1)
                    run = []
        return np.asarray(empty), np.asarray(full)

    def __call__(
        self,
        tiles: Sequence[np.ndarray],
        caption: Sequence[str] = (),
        ranges: Sequence[Range | None] | None = None,
        progress: float | None = None,
    ) -> np.ndarray:
        """Compose one frame.

        Args:
            tiles: One ``(H, W, 3)`` uint8 image per title, at the ``tile_size`` given to the constructor.
            caption: Up to ``style.caption_lines`` text lines, e.g. layer index/total, layer name, module type
                and native map size, method, target class and probability. Long lines are cut with "…".
            ranges: One :class:`Range` (or None) per tile, written under its colour bar as low/high values.
            progress: Depth in the network in ``[0, 1]``, e.g. ``(i + 1) / n_layers``; the curve point of
                layer ``i`` shows once ``progress >= (i + 0.5) / n_layers``. None leaves the strip empty.

        Returns:
            ``(Hf, Wf, 3)`` uint8 RGB frame with even ``Hf`` and ``Wf`` (the same for every call).
        """
        s = self.style
        if len(tiles) != self.n_tiles:
            raise ValueError(f"got {len(tiles)} tiles for {self.n_tiles} titles")
        frame = self._base.copy()
        th, tw = self.tile_size
        for x, tile in zip(self.tile_x, tiles, strict=True):
            tile = np.asarray(tile)
            if tile.dtype != np.uint8 or tile.ndim != 3 or tile.shape[2] != 3:
                raise ValueError(f"tiles must be (H, W, 3) uint8, got {tile.shape} {tile.dtype}")
            if tile.shape[:2] != (th, tw):
                tile = np.asarray(Image.fromarray(tile).resize((tw, th), Image.Resampling.BILINEAR))
            frame[self.tile_y : self.tile_y + th, x : x + tw] = tile
        if self.has_colorbar and ranges is not None:
            if len(ranges) != self.n_tiles:
                raise ValueError(f"got {len(ranges)} ranges for {self.n_tiles} tiles")
            for x, rng in zip(self.tile_x, ranges, strict=True):
                if rng is None:
                    continue
                y = self.bar_label_y
                self.text.draw(frame, _format_value(rng.low), (x, y), self.text_color, tw // 2)
                self.text.draw(frame, _format_value(rng.high), (x + tw, y), self.text_color, tw // 2, "right")
        lines = list(caption)
        if len(lines) > s.caption_lines:
            logger.debug("caption has %d lines, showing the first %d", len(lines), s.caption_lines)
        text_width = self.shape[1] - 2 * s.padding
        for k, line in enumerate(lines[: s.caption_lines]):
            y = self.caption_y + k * self.text.line_height
            self.text.draw(frame, line, (s.padding, y), self.text_color, text_width)
        if self.has_progress and progress is not None:
            if not math.isfinite(progress):
                raise ValueError(f"progress must be a finite fraction, got {progress}")
            width = self._strip_full.shape[1]
            filled = round(min(1.0, max(0.0, progress)) * width)
            x0 = s.padding
            frame[self.strip_y : self.strip_y + self.strip_h, x0 : x0 + filled] = self._strip_full[:, :filled]
        return frame


def compose_frame(
    tiles: Sequence[np.ndarray],
    titles: Sequence[str],
    caption: Sequence[str] = (),
    colorbars: Sequence[tuple[Range, np.ndarray | str]] | None = None,
    progress: float | None = None,
    progress_curve: np.ndarray | Sequence[float] | None = None,
    style: FrameStyle | None = None,
) -> np.ndarray:
    """Compose a single frame; for a video build one :class:`FrameComposer` and call it per frame instead.

    Args:
        tiles: ``(H, W, 3)`` uint8 images shown side by side (all the same size).
        titles: One title per tile.
        caption: Caption lines (see :meth:`FrameComposer.__call__`).
        colorbars: ``(range, colour table)`` per tile, or None for no colour bars.
        progress: Depth in the network in ``[0, 1]``, or None.
        progress_curve: ``(L,)`` per-layer values for the running curve (NaN allowed), or None.
        style: Layout and colours.

    Returns:
        ``(Hf, Wf, 3)`` uint8 RGB frame with even ``Hf`` and ``Wf``.
    """
    if not tiles:
        raise ValueError("compose_frame needs at least one tile")
    luts = None if colorbars is None else [lut for _, lut in colorbars]
    ranges = None if colorbars is None else [rng for rng, _ in colorbars]
    composer = FrameComposer(np.asarray(tiles[0]).shape[:2], titles, luts, progress_curve, style)
    return composer(tiles, caption, ranges, progress)


# ------------------------------------------------------------------------------------------------- grids


def grid(
    tiles: Sequence[Sequence[np.ndarray | None]],
    row_titles: Sequence[str] | None = None,
    col_titles: Sequence[str] | None = None,
    title: str | None = None,
    style: FrameStyle | None = None,
) -> np.ndarray:
    """Arrange tiles in rows and columns with optional row, column and figure titles.

    Used for method x {local, global} figures and, with a single row, for strip figures (one column per
    layer).

    Args:
        tiles: ``tiles[r][c]`` is an ``(H, W, 3)`` uint8 image or None (left blank); rows may be ragged.
            Cells take the largest tile's size; smaller tiles are centred.
        row_titles: One label per row, written left of the row.
        col_titles: One label per column, written above the first row (cut to the cell width).
        title: A line above everything.
        style: Uses ``font_size``, ``background``, ``text_color``, ``padding`` and ``gap``.

    Returns:
        ``(Hg, Wg, 3)`` uint8 RGB image with even ``Hg`` and ``Wg``.
    """
    s = style or FrameStyle()
    rows = [list(r) for r in tiles]
    n_rows, n_cols = len(rows), max((len(r) for r in rows), default=0)
    cells = [np.asarray(t) for r in rows for t in r if t is not None]
    if not cells:
        raise ValueError("grid needs at least one tile")
    for t in cells:
        if t.dtype != np.uint8 or t.ndim != 3 or t.shape[2] != 3:
            raise ValueError(f"tiles must be (H, W, 3) uint8, got {t.shape} {t.dtype}")
    if row_titles is not None and len(row_titles) != n_rows:
        raise ValueError(f"got {len(row_titles)} row titles for {n_rows} rows")
    if col_titles is not None and len(col_titles) != n_cols:
        raise ValueError(f"got {len(col_titles)} column titles for {n_cols} columns")
    ch, cw = max(t.shape[0] for t in cells), max(t.shape[1] for t in cells)
    text = _TextPainter(s.font_size)
    color = s.text_color or _auto_text_color(s.background)
    lh, pad, gap = text.line_height, s.padding, s.gap

    label_w = max((text.width(t) for t in row_titles or ()), default=0)
    label_w = label_w + gap if label_w else 0
    grid_w = n_cols * cw + (n_cols - 1) * gap
    width = 2 * pad + label_w + grid_w
    y0 = pad + (lh + 2 if title else 0) + (lh if col_titles else 0)
    height = y0 + n_rows * ch + (n_rows - 1) * gap + pad
    out = np.empty((_even(height), _even(width), 3), np.uint8)
    out[...] = s.background

    if title:
        text.draw(out, title, (width // 2, pad), color, width - 2 * pad, "center")
    x0 = pad + label_w
    for c, name in enumerate(col_titles or ()):
        text.draw(out, name, (x0 + c * (cw + gap) + cw // 2, y0 - lh), color, cw, "center")
    for r, row in enumerate(rows):
        y = y0 + r * (ch + gap)
        if row_titles is not None:
            text.draw(out, row_titles[r], (pad, y + (ch - lh) // 2), color)
        for c, tile in enumerate(row):
            if tile is None:
                continue
            t = np.asarray(tile)
            ty, tx = y + (ch - t.shape[0]) // 2, x0 + c * (cw + gap) + (cw - t.shape[1]) // 2
            out[ty : ty + t.shape[0], tx : tx + t.shape[1]] = t
    return out


# ------------------------------------------------------------------------------------------------- files


def draw_task_marks(
    image: np.ndarray,
    region: np.ndarray | None = None,
    boxes: Sequence[tuple[float, float, float, float, str]] | None = None,
    source_hw: tuple[int, int] | None = None,
    color: RGB = (255, 255, 255),
) -> np.ndarray:
    """What a task target explains, drawn over ``image`` ``(H, W, 3)`` uint8: the outline of a region
    (``region``, a boolean mask at any resolution, resized to the image by nearest neighbour) and boxes
    with their labels (``(x1, y1, x2, y2, label)`` in the pixels of ``source_hw``, default the image's).

    Returns:
        A new ``(H, W, 3)`` uint8 array.
    """
    h, w = image.shape[:2]
    out = image.copy()
    if region is not None:
        mask = (
            np.asarray(Image.fromarray(np.asarray(region, np.uint8) * 255).resize((w, h), Image.NEAREST)) > 0
        )
        inner = mask.copy()
        inner[1:, :] &= mask[:-1, :]
        inner[:-1, :] &= mask[1:, :]
        inner[:, 1:] &= mask[:, :-1]
        inner[:, :-1] &= mask[:, 1:]
        edge = mask & ~inner
        thick = edge.copy()
        thick[1:, :] |= edge[:-1, :]
        thick[:, 1:] |= edge[:, :-1]
        out[thick] = color
    if boxes:
        sy, sx = (h / source_hw[0], w / source_hw[1]) if source_hw else (1.0, 1.0)
        pil = Image.fromarray(out)
        draw = ImageDraw.Draw(pil)
        font = _font(max(10, h // 24))
        for x1, y1, x2, y2, label in boxes:
            box = (x1 * sx, y1 * sy, x2 * sx, y2 * sy)
            draw.rectangle(box, outline=color, width=max(1, h // 150))
            draw.text((box[0] + 2, box[1] + 1), str(label), fill=color, font=font)
        out = np.asarray(pil).copy()
    return out


def save_png(path: str | os.PathLike[str], array: np.ndarray, compress_level: int = 6) -> Path:
    """Write an image atomically: to a temporary file in the same folder, then ``os.replace``.

    A reader never sees a half-written PNG, and a failure leaves any previous file untouched.

    Args:
        path: Destination ``.png`` path; its folder must exist.
        array: ``(H, W)`` grey, ``(H, W, 3)`` RGB or ``(H, W, 4)`` RGBA uint8.
        compress_level: zlib level 0..9 (1 is several times faster and ~20% larger).

    Returns:
        The destination path.
    """
    path = Path(path)
    array = np.asarray(array)
    if (
        array.dtype != np.uint8
        or array.ndim not in (2, 3)
        or (array.ndim == 3 and array.shape[2] not in (3, 4))
    ):
        raise ValueError(f"expected (H, W), (H, W, 3) or (H, W, 4) uint8, got {array.shape} {array.dtype}")
    # Not mkstemp: its 0600 mode would survive os.replace; open(..., "xb") honours the umask like a plain write.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            Image.fromarray(array).save(f, format="PNG", compress_level=compress_level)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
