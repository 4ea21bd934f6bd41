"""Frames of an animation of volume maps: every layer's map as orthogonal slices, projections or a clip.

An animation whose input is a volume or a clip ``(B, C, D, H, W)`` draws each tile with
:func:`camanim.outputs.volume_frames.view_image`: the layer's map after ReLU, upsampled trilinearly to the
model's grid, scaled by the animation's range for that layer and normalisation (taken over the whole
volume, never per slice), over the windowed grey volume. The view and the point the slices go through come
from the animation's style (``FrameStyle.view``, ``FrameStyle.slice_at``); by default the slices go through
the maximum of the final layer's map of the first method, the same point in every frame.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

import numpy as np

from camanim.compute.methods import method_class
from camanim.outputs.render import FrameComposer, FrameStyle, colormap_lut
from camanim.outputs.volume_frames import (
    View,
    VolumeGeometry,
    clamp_point,
    geometry_of,
    normalized,
    panel_longest,
    parse_view,
    peak_point,
    upsample_volume,
    view_image,
    view_text,
)
from camanim.pipelines.animate import Animation

__all__ = ["is_volume", "volume_caption", "volume_frames", "volume_overlays", "volume_settings"]


def is_volume(anim: Animation) -> bool:
    """Whether ``anim`` animates volume maps (its input is ``(B, C, D, H, W)``)."""
    return anim.explanation.input.dim() == 5


def _style(anim: Animation) -> FrameStyle:
    return anim.style if anim.style is not None else FrameStyle()


def geometry(anim: Animation) -> VolumeGeometry:
    """The animation's grid, spacing and orientation (cached)."""
    if "volume_geometry" not in anim._cache:
        ex = anim.explanation
        anim._cache["volume_geometry"] = geometry_of(ex.image_info, tuple(ex.input.shape[-3:]))
    return anim._cache["volume_geometry"]


def grid_map(anim: Animation, method: str, position: int) -> np.ndarray:
    """The map of frame ``position`` after the method's ReLU on the model's grid: ``(D, H, W)`` float32."""
    m = anim.explanation.maps[method][anim.layers[position].name][anim.sample]
    return upsample_volume(m, geometry(anim).grid, relu=method_class(method).relu)


def volume_settings(anim: Animation) -> tuple[View, tuple[int, int, int]]:
    """The view and the point ``(z, y, x)`` the slices go through (cached): the style's, else slices (frames
    for a clip) through the maximum of the final layer's map of the first method."""
    if "volume_view" not in anim._cache:
        geo = geometry(anim)
        s = _style(anim)
        view = parse_view(s.view) or View("frames" if geo.video else "slices")
        if s.slice_at is not None:
            point = clamp_point(s.slice_at, geo.grid)
        else:
            point = peak_point(grid_map(anim, anim.methods[0], len(anim.layers) - 1))
        anim._cache["volume_view"] = (view, point)
    return anim._cache["volume_view"]


def describe_volume(anim: Animation) -> dict:
    """The manifest's ``animation.volume`` section: grid, spacing, view and point."""
    geo = geometry(anim)
    view, point = volume_settings(anim)
    return {
        "grid": list(geo.grid),
        "grid_spacing_mm": [round(s, 6) for s in geo.spacing],
        "oriented": geo.oriented,
        "video": geo.video,
        "view": str(view),
        "slice_at": list(point),
        "slice_at_source": "given"
        if _style(anim).slice_at is not None
        else "maximum of the final layer's map",
        "normalisation": "over the whole volume on the model's grid (trilinear upsampling), not per slice",
    }


def volume_overlays(
    anim: Animation, method: str, norm: str, positions: Sequence[int], longest: int | None = None
) -> np.ndarray:
    """The tiles of frames ``positions`` for ``method`` under ``norm``: ``(n, h, w, 3)`` uint8."""
    geo = geometry(anim)
    view, point = volume_settings(anim)
    display = anim.explanation.display[anim.sample]
    lut = colormap_lut(anim.cmap)
    longest = longest or panel_longest(anim.size)
    out = []
    for p in positions:
        norm_map = normalized(grid_map(anim, method, p), anim.range_for(method, norm, p))
        out.append(
            view_image(
                norm_map,
                display,
                geo,
                view,
                point,
                longest=longest,
                lut=lut,
                alpha=anim.alpha,
                style=_style(anim),
            )
        )
    return np.stack(out)


def map_size_text(layer) -> str:
    """A layer's native map size, ``"dxhxw"`` (``"hxw"`` for a 2-D map)."""
    size = layer.map_size or layer.shape[2:]
    return "x".join(str(s) for s in size) or "-"


def volume_caption(anim: Animation, method: str | None, position: int) -> list[str]:
    """Caption lines of a volume frame: layer index and name; type, kind and map size ``dxhxw``; method and
    target; view and slice indices, with flags and ROAD."""
    layer = anim.layers[position]
    shown = anim.methods if method is None else (method,)
    view, point = volume_settings(anim)
    notes = [view_text(view, point, geometry(anim))]
    for m in shown:
        prefix = f"{m}: " if len(shown) > 1 else ""
        fl = anim.flags(m, position)
        if "flat" in fl:
            notes.append(prefix + "flat map")
        if "no_gradient" in fl:
            notes.append(prefix + "no gradient")
        if anim.road and m in anim.road:
            v = anim.road[m][position]
            notes.append(f"{prefix}ROAD {v:.3f}" if math.isfinite(v) else f"{prefix}ROAD n/a")
    return [
        f"layer {position + 1}/{len(anim.layers)}: {layer.name}",
        f"{layer.type} · {layer.kind} · map {map_size_text(layer)}",
        f"{', '.join(shown)} · {anim.target_text()}",
        " · ".join(notes),
    ]


def volume_frames(
    anim: Animation,
    rows: Sequence[str],
    norms: Sequence[str],
    titles: Sequence[Sequence[str]],
    positions: Sequence[int],
    grid_layout: bool,
    curve: Sequence[np.ndarray | None],
) -> Iterator[np.ndarray]:
    """Frames of a volume animation: one row of tiles (one per normalisation) per method in ``rows``, the
    caption and progress strip under the last row.

    Args:
        anim: the animation.
        rows: the methods, one row each (one method unless the layout is the grid).
        norms: the normalisations, one tile each.
        titles: per row, the tiles' titles.
        positions: frame positions.
        grid_layout: the caption names every method (the grid layout).
        curve: per row, the progress strip's running curve (ROAD) or None.

    Yields:
        ``(Hf, Wf, 3)`` uint8 frames of one even size.
    """
    n = len(anim.layers)
    style = _style(anim)
    probe = volume_overlays(anim, rows[0], norms[0], [positions[0]] if positions else [n - 1])
    tile = probe.shape[1:3]
    composers = []
    for r in range(len(rows)):
        last = r == len(rows) - 1
        st = style if last else dataclasses.replace(style, caption_lines=0, progress=False)
        composers.append(FrameComposer(tile, titles[r], [colormap_lut(anim.cmap)] * len(norms), curve[r], st))
    for p in positions:
        parts = []
        for r, m in enumerate(rows):
            last = r == len(rows) - 1
            tiles = [volume_overlays(anim, m, nm, [p])[0] for nm in norms]
            parts.append(
                composers[r](
                    tiles,
                    volume_caption(anim, None if grid_layout else m, p) if last else (),
                    ranges=[anim.range_for(m, nm, p) for nm in norms],
                    progress=(p + 1) / n if last else None,
                )
            )
        yield parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
