"""Scatter frames of layer embeddings: one colour per label, drawn with NumPy and Pillow (no matplotlib figure).

A frame shows one layer's aligned 2-D layout (:mod:`camanim.compute.projections`), its name and scores in a
caption, the label colours in a legend and, in a strip below, the separability curve over depth with a
cursor at this layer. Every frame of an animation shares the axis limits, so points move but the frame does
not rescale.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

#: Colour of every point when there are no labels.
UNLABELLED = (37, 99, 235)
BACKGROUND = (255, 255, 255)
INK = (29, 35, 48)
MUTED = (110, 118, 135)
CURVE_COLORS = {"knn": (37, 99, 235), "probe": (194, 65, 12), "silhouette": (22, 163, 74)}


@functools.lru_cache(maxsize=32)
def _label_colors(n: int) -> tuple[tuple[int, int, int], ...]:
    import matplotlib  # colour tables only

    if n <= 10:
        colors = np.asarray(matplotlib.colormaps["tab10"].colors)[:n]
    elif n <= 20:
        colors = np.asarray(matplotlib.colormaps["tab20"].colors)[:n]
    else:
        colors = matplotlib.colormaps["turbo"](np.linspace(0.05, 0.95, n))[:, :3]
    return tuple(tuple(int(v) for v in c) for c in (np.asarray(colors) * 255 + 0.5).astype(np.uint8))


def label_colors(n: int) -> np.ndarray:
    """One RGB colour per label: ``(n, 3)`` uint8 (``tab10`` up to 10 labels, ``tab20`` up to 20, then
    ``n`` colours spread along ``turbo``)."""
    if n < 1:
        return np.zeros((0, 3), np.uint8)
    return np.array(_label_colors(n), dtype=np.uint8)


def hex_color(rgb: Sequence[int]) -> str:
    """``#rrggbb`` of an RGB triple."""
    return "#" + "".join(f"{int(v):02x}" for v in rgb[:3])


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


@dataclass(frozen=True)
class ScatterStyle:
    """Sizes of a scatter frame, in pixels (the frame is ``width x height``, both even)."""

    plot: int = 480
    legend: int = 170
    caption: int = 50
    strip: int = 96
    pad: int = 12
    radius: float = 2.2
    font_size: int = 13

    @property
    def width(self) -> int:
        return self.plot + self.legend + 3 * self.pad

    @property
    def height(self) -> int:
        return self.caption + self.plot + self.strip + 3 * self.pad


def axis_limit(layouts: Sequence[np.ndarray], quantile: float = 0.995) -> float:
    """One half-width for every frame: the ``quantile`` of the points' radius over all layouts (points beyond
    sit on the frame's edge)."""
    radii = np.concatenate([np.sqrt((np.asarray(y, np.float64) ** 2).sum(1)) for y in layouts])
    radii = radii[np.isfinite(radii)]
    lim = float(np.quantile(radii, quantile)) if radii.size else 1.0
    return lim * 1.05 if lim > 0 else 1.0


class ScatterFrames:
    """Draws the frames of one animation: the legend and the strip's curve are laid out once.

    Args:
        classes: label names (empty without labels).
        colors: ``(len(classes), 3)`` uint8.
        curves: per metric, its value at every layer (forward order), for the strip; may be empty.
        best: position of the marked (best) layer, or ``None``.
        limit: the axes' half-width (:func:`axis_limit`).
        style: sizes.
    """

    def __init__(
        self,
        classes: Sequence[str],
        colors: np.ndarray,
        curves: dict[str, np.ndarray],
        best: int | None,
        limit: float,
        style: ScatterStyle | None = None,
    ) -> None:
        self.s = style or ScatterStyle()
        self.classes = list(classes)
        self.colors = [tuple(int(v) for v in c) for c in np.asarray(colors)]
        self.curves = curves
        self.best = best
        self.limit = limit
        self.font = _font(self.s.font_size)
        self.small = _font(max(9, self.s.font_size - 2))
        self._base = self._background()

    # ----------------------------------------------------------------------------------------- static

    def _plot_box(self) -> tuple[int, int, int, int]:
        s = self.s
        top = s.caption + s.pad
        return s.pad, top, s.pad + s.plot, top + s.plot

    def _strip_box(self) -> tuple[int, int, int, int]:
        s = self.s
        top = s.caption + s.plot + 2 * s.pad
        return s.pad + 34, top + 4, s.width - s.pad, top + s.strip - 16

    def _background(self) -> Image.Image:
        s = self.s
        img = Image.new("RGB", (s.width, s.height), BACKGROUND)
        d = ImageDraw.Draw(img)
        x0, y0, x1, y1 = self._plot_box()
        d.rectangle((x0 - 1, y0 - 1, x1, y1), outline=(217, 221, 229))
        # legend
        lx = x1 + s.pad
        y = y0
        shown = self.classes[:24]
        for name, col in zip(shown, self.colors, strict=False):
            d.rectangle((lx, y + 3, lx + 10, y + 13), fill=col)
            d.text((lx + 16, y), _fit(d, str(name), self.small, s.legend - 18), font=self.small, fill=INK)
            y += 17
        if len(self.classes) > len(shown):
            d.text((lx, y), f"+ {len(self.classes) - len(shown)} more labels", font=self.small, fill=MUTED)
        if not self.classes:
            d.text((lx, y), "no labels", font=self.small, fill=MUTED)
        # the curve strip
        if self.curves:
            bx0, by0, bx1, by1 = self._strip_box()
            d.line((bx0, by1, bx1, by1), fill=(138, 147, 163))
            d.line((bx0, by0, bx0, by1), fill=(138, 147, 163))
            d.text((bx0 - 6, by0 - 6), "1", font=self.small, fill=MUTED, anchor="ra")
            d.text((bx0 - 6, by1 - 6), "0", font=self.small, fill=MUTED, anchor="ra")
            legend_x = bx0 + 4
            for metric, values in self.curves.items():
                col = CURVE_COLORS.get(metric, INK)
                pts = self._curve_points(values)
                if len(pts) > 1:
                    d.line(pts, fill=col, width=2)
                label = {"knn": "k-NN", "probe": "probe", "silhouette": "silhouette"}.get(metric, metric)
                d.text((legend_x, by1 + 2), label, font=self.small, fill=col)
                legend_x += int(d.textlength(label, font=self.small)) + 14
            if self.best is not None and "knn" in self.curves:
                bx, byy = self._curve_xy(self.best, float(self.curves["knn"][self.best]))
                _star(d, bx, byy, 7, CURVE_COLORS["knn"])
            d.text((bx1, by1 + 2), "layer (forward order)", font=self.small, fill=MUTED, anchor="ra")
        return img

    def _curve_xy(self, i: int, v: float) -> tuple[float, float]:
        bx0, by0, bx1, by1 = self._strip_box()
        n = max(len(next(iter(self.curves.values()))), 2)
        x = bx0 + (i / (n - 1)) * (bx1 - bx0)
        v = min(max(v, 0.0), 1.0)
        return x, by1 - v * (by1 - by0)

    def _curve_points(self, values: np.ndarray) -> list[tuple[float, float]]:
        return [self._curve_xy(i, float(v)) for i, v in enumerate(values) if np.isfinite(v)]

    # ---------------------------------------------------------------------------------------- a frame

    def __call__(
        self, layout: np.ndarray, labels: np.ndarray | None, caption: Sequence[str], position: int
    ) -> np.ndarray:
        """One frame ``(H, W, 3)`` uint8.

        Args:
            layout: ``(M, 2)`` aligned coordinates.
            labels: ``(M,)`` label indices into ``classes`` (``None``: one colour).
            caption: up to two lines of text above the plot.
            position: this layer's position, for the strip's cursor.
        """
        s = self.s
        img = self._base.copy()
        d = ImageDraw.Draw(img)
        x0, y0, x1, y1 = self._plot_box()
        half = s.plot / 2
        xy = np.clip(np.nan_to_num(np.asarray(layout, np.float64)) / self.limit, -1, 1)
        px = x0 + half + xy[:, 0] * (half - 4)
        py = y0 + half - xy[:, 1] * (half - 4)
        r = s.radius
        if labels is None:
            cols = [UNLABELLED] * len(px)
        else:
            cols = [self.colors[int(c)] for c in labels]
        for i in np.random.default_rng(0).permutation(len(px)):  # no class always on top
            d.ellipse((px[i] - r, py[i] - r, px[i] + r, py[i] + r), fill=cols[i])
        for k, line in enumerate(caption[:2]):
            d.text(
                (s.pad, s.pad + k * (s.font_size + 6)),
                _fit(d, line, self.font, s.width - 2 * s.pad),
                font=self.font,
                fill=INK if k == 0 else MUTED,
            )
        if self.curves:
            _, by0, _, by1 = self._strip_box()
            cx, _ = self._curve_xy(position, 0.0)
            d.line((cx, by0 - 4, cx, by1), fill=INK, width=1)
            for metric, values in self.curves.items():
                v = float(values[position])
                if np.isfinite(v):
                    cx, cy = self._curve_xy(position, v)
                    col = CURVE_COLORS.get(metric, INK)
                    d.ellipse((cx - 4, cy - 4, cx + 4, cy + 4), fill=BACKGROUND, outline=col, width=2)
        return np.asarray(img)


def _star(d: ImageDraw.ImageDraw, x: float, y: float, r: float, color: tuple[int, int, int]) -> None:
    angles = np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
    pts = [(x + rr * np.cos(a), y - rr * np.sin(a)) for a, rr in zip(angles, radii, strict=True)]
    d.polygon(pts, fill=color, outline=INK)
