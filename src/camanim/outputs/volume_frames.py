"""Pictures of volume maps: orthogonal slices, projections and a clip's frames, with orientation labels.

A volume map ``(d, h, w)`` (a layer of kind ``volume``) is drawn on the model's grid ``(D, H, W)``: after the
method's ReLU it is upsampled trilinearly (``align_corners=False``, as ``torch.nn.functional.interpolate``)
to the grid, scaled to ``[0, 1]`` by a range taken over the whole volume (local: the layer's own min and
max; global: every layer's), and coloured over the windowed grey volume. A 2-D map ``(h, w)`` of a layer
inside a volume model is the same map at every depth.

Views (:func:`parse_view`):

* ``slices`` (default for volumes): the axial, coronal and sagittal slices through one point ``(z, y, x)`` of
  the grid (default: the maximum of the final layer's map; see :func:`peak_point`), side by side;
* ``mip``: maximum-intensity projections of the map along each axis, over the mean-intensity projection of
  the grey volume;
* ``axial:N``, ``coronal:N``, ``sagittal:N``: one slice, ``N`` on the model's grid (0-based);
* ``frames`` (default for videos): the clip's frames side by side (at most :data:`MAX_FRAMES_SHOWN`, evenly
  spaced), each the map at that time over that frame.

Aspect: each slice is drawn with the physical extent of the scan (the grid spacing of
:func:`camanim.compute.volumes.grid_spacing`), so a slice is resampled (bilinear) to square pixels: a coronal
slice of a 5 mm series is as tall as the body is, not squashed. Orientation labels (R/L, A/P, S/I) are drawn
on the edges when the volume's orientation is known (NIfTI and DICOM; see
:mod:`camanim.compute.volumes` for the layout); small ticks on the edges mark where the other two slices cut.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from camanim.compute.normalize import Range
from camanim.errors import OptionError, UnknownNameError
from camanim.outputs.render import FrameStyle, _TextPainter, colormap_lut, overlay_batch

__all__ = [
    "PLANES",
    "VIEWS",
    "VolumeGeometry",
    "View",
    "geometry_of",
    "parse_point",
    "parse_view",
    "peak_point",
    "upsample_volume",
    "view_image",
]

#: The planes of a volume: the axis each one is perpendicular to, in ``(D, H, W)``.
PLANES = {"axial": 0, "coronal": 1, "sagittal": 2}
VIEWS = ("slices", "mip", "frames", *PLANES)
#: A clip shows at most this many frames side by side.
MAX_FRAMES_SHOWN = 16
#: Edge labels per plane ``(top, bottom, left, right)`` in the layout of :mod:`camanim.compute.volumes`.
LABELS = {
    "axial": ("A", "P", "R", "L"),
    "coronal": ("S", "I", "R", "L"),
    "sagittal": ("S", "I", "A", "P"),
}
PANEL_MIN, PANEL_MAX = 176, 320
_TICK = (255, 255, 255)
_LABEL = (255, 255, 90)


@dataclass(frozen=True)
class View:
    """What a volume frame shows.

    Attributes:
        kind: ``"slices"``, ``"mip"``, ``"frames"``, ``"axial"``, ``"coronal"`` or ``"sagittal"``.
        index: the slice of a single-plane view on the model's grid (0-based); None otherwise.
    """

    kind: str = "slices"
    index: int | None = None

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"


def parse_view(text: str | View | None) -> View | None:
    """A :class:`View` from ``slices``, ``mip``, ``frames``, ``axial:N``, ``coronal:N`` or ``sagittal:N``; None
    (or ``"auto"``) lets the volume decide (slices, or frames for a video).

    Raises:
        UnknownNameError: an unknown view (close matches listed).
        OptionError: a plane without a whole slice number, or a negative one.
    """
    if text is None or isinstance(text, View):
        return text
    s = str(text).strip().lower()
    if s in ("", "auto"):
        return None
    kind, sep, num = s.partition(":")
    if kind not in VIEWS:
        raise UnknownNameError("view", kind, [*VIEWS, "axial:N", "coronal:N", "sagittal:N"])
    if kind in PLANES:
        if not sep or not num.strip().isdigit():
            raise OptionError(f"view {text!r}: give the slice as {kind}:N (N a slice number from 0)")
        return View(kind, int(num))
    if sep:
        raise OptionError(f"view {text!r}: {kind} takes no slice number")
    return View(kind)


def parse_point(text: str | Sequence[int] | None) -> tuple[int, int, int] | None:
    """``(z, y, x)`` from ``"z,y,x"`` (whole numbers from 0, on the model's grid) or a triple; None stays None.

    Raises:
        OptionError: not three whole numbers from 0.
    """
    if text is None:
        return None
    parts = str(text).split(",") if isinstance(text, str) else [str(v) for v in text]
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise OptionError(f"slice point {text!r}: give z,y,x as three whole numbers from 0 (e.g. 40,48,52)")
    z, y, x = (int(p) for p in parts)
    return z, y, x


# --------------------------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class VolumeGeometry:
    """The model's grid and how to draw it.

    Attributes:
        grid: ``(D, H, W)`` of the model input.
        spacing: voxel size of the grid in mm ``(z, y, x)``.
        oriented: whether anatomical labels apply (the volume came from NIfTI or DICOM).
        video: whether ``D`` is time (a clip).
    """

    grid: tuple[int, int, int]
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    oriented: bool = False
    video: bool = False

    def plane_shape(self, plane: str) -> tuple[int, int]:
        """``(rows, columns)`` of a plane on the grid."""
        d, h, w = self.grid
        return {"axial": (h, w), "coronal": (d, w), "sagittal": (d, h)}[plane]

    def plane_extent(self, plane: str) -> tuple[float, float]:
        """``(height, width)`` of a plane in mm."""
        (r, c), (sz, sy, sx) = self.plane_shape(plane), self.spacing
        return {"axial": (r * sy, c * sx), "coronal": (r * sz, c * sx), "sagittal": (r * sz, c * sy)}[plane]

    def panel_size(self, plane: str, longest: int) -> tuple[int, int]:
        """Pixels ``(h, w)`` of a plane's panel: the largest extent of the three planes is ``longest`` pixels
        and every plane keeps its physical aspect."""
        scale = longest / max(max(self.plane_extent(p)) for p in PLANES)
        eh, ew = self.plane_extent(plane)
        return max(8, round(eh * scale)), max(8, round(ew * scale))


def _find(info: Any, key: str) -> Any:
    """The first value of ``key`` in nested mappings (the explanation's image info)."""
    if isinstance(info, Mapping):
        if key in info:
            return info[key]
        for v in info.values():
            found = _find(v, key)
            if found is not None:
                return found
    return None


def geometry_of(image_info: Mapping[str, Any], grid: Sequence[int]) -> VolumeGeometry:
    """The :class:`VolumeGeometry` of an explanation's input grid ``(D, H, W)`` from its image info: the
    spacing of the loaded volume (``image_info["volume"]["spacing"]`` with the volume's ``shape``, else the
    loaded volume's ``spacing`` and ``original_shape``) stretched over the grid."""
    grid3 = tuple(int(g) for g in grid[-3:])
    vol = image_info.get("volume") if isinstance(image_info.get("volume"), Mapping) else {}
    spacing = vol.get("spacing") or _find(image_info, "spacing") or (1.0, 1.0, 1.0)
    shape = vol.get("shape") or _find(image_info, "original_shape") or grid3
    spacing = tuple(float(s) for s in list(spacing)[-3:])
    shape = tuple(int(s) for s in list(shape)[-3:])
    grid_sp = tuple(sp * n / g for sp, n, g in zip(spacing, shape, grid3, strict=True))
    kind = _find(image_info, "kind")
    fmt = str(_find(image_info, "format") or "")
    orientation = str(_find(image_info, "orientation") or "")
    oriented = fmt in ("nifti", "dicom") or "IPL" in orientation
    return VolumeGeometry(grid3, grid_sp, oriented and kind != "video", kind == "video")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- the maps


def upsample_volume(m: Any, grid: Sequence[int], relu: bool = True) -> np.ndarray:
    """A map ``(d, h, w)`` (or a 2-D map ``(h, w)``, the same at every depth) after ReLU, upsampled
    trilinearly (``align_corners=False``) to ``grid`` ``(D, H, W)``: float32 NumPy."""
    t = (
        m.detach().float().cpu()
        if isinstance(m, torch.Tensor)
        else torch.from_numpy(np.asarray(m, np.float32))
    )
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3:
        raise ValueError(f"a volume map must be (d, h, w) or (h, w), got {tuple(t.shape)}")
    if relu:
        t = t.clamp_min(0)
    size = tuple(int(g) for g in grid)
    if tuple(t.shape) != size:
        t = F.interpolate(t[None, None], size=size, mode="trilinear", align_corners=False)[0, 0]
    return t.numpy()


def peak_point(volume: np.ndarray) -> tuple[int, int, int]:
    """``(z, y, x)`` of the maximum of a volume ``(D, H, W)`` (the first, in C order, among ties)."""
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(volume)), volume.shape))  # type: ignore[return-value]


def clamp_point(point: Sequence[int], grid: Sequence[int]) -> tuple[int, int, int]:
    """``point`` checked against the grid.

    Raises:
        OptionError: a coordinate outside the grid.
    """
    names = ("z", "y", "x")
    for n, p, g in zip(names, point, grid, strict=True):
        if not 0 <= int(p) < int(g):
            raise OptionError(
                f"slice point {n}={p} is outside the model's grid {'x'.join(str(v) for v in grid)} (0..{g - 1})"
            )
    return tuple(int(p) for p in point)  # type: ignore[return-value]


def normalized(volume: np.ndarray, rng: Range) -> np.ndarray:
    """``volume`` scaled to ``[0, 1]`` by ``rng`` (clipped; a flat range gives zeros)."""
    if rng.is_flat():
        return np.zeros_like(volume, dtype=np.float32)
    out = (volume - np.float32(rng.low)) * np.float32(1.0 / rng.span)
    return np.clip(out, 0.0, 1.0, out=out)


# ------------------------------------------------------------------------------------------------ panels


def _resize(rgb: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    if rgb.shape[:2] == tuple(hw):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((hw[1], hw[0]), Image.Resampling.BILINEAR))


def _plane(volume: np.ndarray, plane: str, index: int) -> np.ndarray:
    """The slice of ``volume`` ``(D, H, W, ...)`` perpendicular to ``plane``'s axis at ``index``."""
    return np.take(volume, index, axis=PLANES[plane])


def _project(norm: np.ndarray, grey: np.ndarray, plane: str) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-intensity projection of the map, over the mean projection of the picture."""
    axis = PLANES[plane]
    return norm.max(axis=axis), grey.astype(np.float32).mean(axis=axis).round().astype(np.uint8)


def _label(panel: np.ndarray, plane: str, text: _TextPainter) -> None:
    top, bottom, left, right = LABELS[plane]
    h, w = panel.shape[:2]
    lh = text.line_height
    text.draw(panel, top, (w // 2, 1), _LABEL, align="center")
    text.draw(panel, bottom, (w // 2, h - lh), _LABEL, align="center")
    text.draw(panel, left, (2, h // 2 - lh // 2), _LABEL)
    text.draw(panel, right, (w - 2, h // 2 - lh // 2), _LABEL, align="right")


def _ticks(panel: np.ndarray, row: float | None, col: float | None) -> None:
    """Short ticks on the edges at a fractional row and column (where the other slices cut)."""
    h, w = panel.shape[:2]
    n = max(3, min(h, w) // 16)
    if row is not None:
        r = min(h - 1, max(0, int(row * h)))
        panel[r, :n] = _TICK
        panel[r, w - n :] = _TICK
    if col is not None:
        c = min(w - 1, max(0, int(col * w)))
        panel[:n, c] = _TICK
        panel[h - n :, c] = _TICK


def _panel(
    norm: np.ndarray,
    display: np.ndarray,
    geo: VolumeGeometry,
    plane: str,
    index: int | None,
    point: tuple[int, int, int] | None,
    size: tuple[int, int],
    lut: np.ndarray,
    alpha: float,
    text: _TextPainter,
) -> np.ndarray:
    """One plane: the map's slice (or projection when ``index`` is None) over the picture, resized to ``size``
    with labels and ticks."""
    if index is None:
        m2, g2 = _project(norm, display, plane)
    else:
        m2, g2 = _plane(norm, plane, index), _plane(display, plane, index)
    rgb = overlay_batch(np.ascontiguousarray(g2), m2[None], lut, alpha)[0]
    panel = np.array(_resize(rgb, size))
    if point is not None and index is not None:
        d, h, w = geo.grid
        z, y, x = point
        frac = {"axial": ((y + 0.5) / h, (x + 0.5) / w), "coronal": ((z + 0.5) / d, (x + 0.5) / w)}
        frac["sagittal"] = ((z + 0.5) / d, (y + 0.5) / h)
        _ticks(panel, *frac[plane])
    if geo.oriented:
        _label(panel, plane, text)
    return panel


def frames_layout(t: int) -> tuple[list[int], int]:
    """The frames of a clip of ``t`` shown (at most :data:`MAX_FRAMES_SHOWN`, evenly spaced) and the columns."""
    shown = (
        list(range(t))
        if t <= MAX_FRAMES_SHOWN
        else [round(i * (t - 1) / (MAX_FRAMES_SHOWN - 1)) for i in range(MAX_FRAMES_SHOWN)]
    )
    return shown, min(len(shown), 4)


def panel_longest(tile: Sequence[int]) -> int:
    """A panel's longest side from the animation's tile size, kept between 176 and 320 pixels."""
    return int(min(PANEL_MAX, max(PANEL_MIN, max(tile))))


def view_image(
    norm: np.ndarray,
    display: np.ndarray,
    geo: VolumeGeometry,
    view: View,
    point: tuple[int, int, int] | None,
    *,
    longest: int = 192,
    lut: np.ndarray | str = "jet",
    alpha: float = 0.5,
    style: FrameStyle | None = None,
) -> np.ndarray:
    """One tile of a volume frame: the view of a normalised map over the picture.

    Args:
        norm: the map on the grid, ``(D, H, W)`` in ``[0, 1]`` (see :func:`upsample_volume`, :func:`normalized`).
        display: the picture on the grid, ``(D, H, W, 3)`` uint8.
        geo: the grid's geometry.
        view: what to show (:class:`View`); ``frames`` for a clip.
        point: ``(z, y, x)`` the slices go through (``slices``); None for the centre.
        longest: pixels of the longest physical extent of a panel (the panels keep their aspect).
        lut: colour table or colour map name; ``alpha`` the weight of the colour.
        style: background and gaps (a :class:`~camanim.outputs.render.FrameStyle`).

    Returns:
        ``(h, w, 3)`` uint8, the panels side by side (a clip: a grid of frames), of a size that depends only
        on the geometry, view and ``longest``.
    """
    s = style or FrameStyle()
    lut = colormap_lut(lut) if isinstance(lut, str) else lut
    text = _TextPainter(max(9, s.font_size - 1))
    gap = max(2, s.gap // 2)
    d, h, w = geo.grid
    if point is None:
        point = (d // 2, h // 2, w // 2)
    if view.kind == "frames":
        shown, cols = frames_layout(d)
        scale = longest / max(h, w) / 2
        size = (max(8, round(h * scale)), max(8, round(w * scale)))
        tiles = [_resize(overlay_batch(display[t], norm[t][None], lut, alpha)[0], size) for t in shown]
        rows = math.ceil(len(tiles) / cols)
        out = np.empty((rows * size[0] + (rows - 1) * gap, cols * size[1] + (cols - 1) * gap, 3), np.uint8)
        out[...] = s.background
        for k, tile in enumerate(tiles):
            r, c = divmod(k, cols)
            out[
                r * (size[0] + gap) : r * (size[0] + gap) + size[0],
                c * (size[1] + gap) : c * (size[1] + gap) + size[1],
            ] = tile
            text.draw(out, f"t={shown[k]}", (c * (size[1] + gap) + 2, r * (size[0] + gap) + 1), _LABEL)
        return out
    if view.kind in PLANES:
        index = clamp_point([view.index if a == PLANES[view.kind] else 0 for a in range(3)], geo.grid)[
            PLANES[view.kind]
        ]
        panels = [
            _panel(
                norm,
                display,
                geo,
                view.kind,
                index,
                None,
                geo.panel_size(view.kind, longest),
                lut,
                alpha,
                text,
            )
        ]
    else:
        idx = dict(zip(PLANES, point, strict=True))
        panels = [
            _panel(
                norm,
                display,
                geo,
                p,
                None if view.kind == "mip" else idx[p],
                point,
                geo.panel_size(p, longest),
                lut,
                alpha,
                text,
            )  # fmt: skip
            for p in PLANES
        ]
    height = max(p.shape[0] for p in panels)
    width = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    out = np.empty((height, width, 3), np.uint8)
    out[...] = s.background
    x = 0
    for p in panels:
        y = (height - p.shape[0]) // 2
        out[y : y + p.shape[0], x : x + p.shape[1]] = p
        x += p.shape[1] + gap
    return out


def view_text(view: View, point: tuple[int, int, int] | None, geo: VolumeGeometry) -> str:
    """The caption's view: ``"slices z=40 y=48 x=52 (axial, coronal, sagittal)"``, ``"MIP"``, ``"axial z=12"``,
    ``"frames 0..15"``."""
    if view.kind == "frames":
        shown, _ = frames_layout(geo.grid[0])
        return f"clip frames {shown[0]}..{shown[-1]} of {geo.grid[0]}" + (
            f" ({len(shown)} shown)" if len(shown) < geo.grid[0] else ""
        )
    if view.kind == "mip":
        return "maximum-intensity projections (axial, coronal, sagittal)"
    if view.kind in PLANES:
        axis = "zyx"[PLANES[view.kind]]
        return f"{view.kind} {axis}={view.index}"
    z, y, x = point if point is not None else (0, 0, 0)
    return f"slices through z={z} y={y} x={x} (axial, coronal, sagittal)"
