"""Frame rendering of a CAManim animation: one frame per kept layer, for every layout.

The layouts (:data:`~camanim.pipelines.animate.LAYOUTS`): ``"side-by-side"`` (one tile per normalisation of
the animation), ``"local"``, ``"global"`` (one tile), and ``"grid"`` (one row of tiles per method, captions
under the last).

Rendering is vectorised, a chunk of :data:`~camanim.pipelines.animate.CHUNK` layers at a time: the maps of
one native size are upsampled in one call (:func:`~camanim.pipelines.animate.method_stack`), resized to the
tile size, scaled by each tile's range (:func:`~camanim.pipelines.animate.normalize_stack`) and coloured
over the image (:func:`colour`); a :class:`~camanim.outputs.render.FrameComposer` built once per video
(:func:`composers`) adds the titles, caption, colour bars and progress strip. FM-G-CAM frames draw each
class in its hue with a legend instead of colour bars (:mod:`camanim.outputs.animation.fused`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image

from camanim.compute.layers import Layer
from camanim.compute.normalize import Range
from camanim.compute.resize import shrink
from camanim.errors import UnknownNameError
from camanim.outputs.animation.fused import LegendComposer
from camanim.outputs.animation.volume import is_volume, volume_caption, volume_frames, volume_overlays
from camanim.outputs.fmgcam import blend_classes
from camanim.outputs.render import FrameComposer, FrameStyle, colormap_lut, draw_task_marks, overlay_batch
from camanim.pipelines.animate import (
    CHUNK,
    LAYOUTS,
    Animation,
    normalize_stack,
    raw_stack,
    resolve_positions,
)

__all__ = ["caption", "composers", "overlays", "render", "style_of"]

_TITLES = {
    "local": "local: layer min-max",
    "global": "global: all layers",
    "global-all": "global: all methods",
}
_SHORT = {"local": "local", "global": "global", "global-all": "global (all methods)"}


# ------------------------------------------------------------------------------------------------ tiles


def style_of(anim: Animation) -> FrameStyle:
    """The animation's frame look (:class:`~camanim.outputs.render.FrameStyle`; the default when None)."""
    return anim.style if anim.style is not None else FrameStyle()


def display(anim: Animation, size: tuple[int, int]) -> np.ndarray:
    """The animated sample's picture at ``size``: ``(H, W, 3)`` uint8, cached on the animation."""
    key = ("display", size)
    if key not in anim._cache:
        ex = anim.explanation
        img = ex.display[anim.sample]
        if img.shape[:2] != tuple(size):
            img = np.asarray(Image.fromarray(img).resize((size[1], size[0]), Image.Resampling.BILINEAR))
        region = None if ex.regions is None else ex.regions[min(anim.sample, len(ex.regions) - 1)].numpy()
        boxes = None if not ex.boxes else ex.boxes[min(anim.sample, len(ex.boxes) - 1)]
        if region is not None or boxes:
            img = draw_task_marks(img, region, boxes, source_hw=tuple(ex.input.shape[-2:]))
        anim._cache[key] = np.ascontiguousarray(img)
    return anim._cache[key]


def colour(
    anim: Animation,
    stack: np.ndarray,
    method: str,
    norm: str,
    positions: Sequence[int],
    size: tuple[int, int],
) -> np.ndarray:
    """Tiles of a raw ``stack`` already at ``size``: each map scaled by its range under ``norm``, coloured and
    blended over the picture (FM-G-CAM: each class in its hue). Returns ``(n, H, W, 3)`` uint8."""
    ranges = [anim.range_for(method, norm, p) for p in positions]
    if anim.fusion is not None:
        return fused_tiles(stack, ranges, display(anim, size), anim.fusion.colors, anim.alpha)
    norm_maps = normalize_stack(stack, ranges, nan_safe=False)
    return overlay_batch(display(anim, size), norm_maps, colormap_lut(anim.cmap), anim.alpha)


def fused_tiles(
    stack: np.ndarray, ranges: Sequence[Range], image: np.ndarray, colors: np.ndarray, alpha: float
) -> np.ndarray:
    """FM-G-CAM tiles: each fused ``(K, H, W)`` of ``stack`` ``(n, K, H, W)`` scaled by its range, each class
    blended in its hue over ``image`` ``(H, W, 3)`` uint8 (the blend of
    :func:`~camanim.methods.fused.fused_overlay`). Returns ``(n, H, W, 3)`` uint8."""
    return blend_classes(normalize_stack(stack, ranges, nan_safe=False), image, colors, alpha)


def overlays(
    anim: Animation,
    method: str,
    norm: str = "local",
    positions: Sequence[int] | slice | None = None,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """The coloured maps over the image, as the tiles of the frames: ``(n, H, W, 3)`` uint8."""
    size = size or anim.size
    pos = resolve_positions(len(anim.layers), positions)
    if is_volume(
        anim
    ):  # slices, projections or a clip's frames of each volume map (size: longest panel side)
        return volume_overlays(anim, method, norm, pos, None if size == anim.size else max(size))
    stack = shrink(raw_stack(anim, method, pos), size)
    return colour(anim, stack, method, norm, pos, size)


# ----------------------------------------------------------------------------------------------- frames


def layout_norms(norms: Sequence[str], layout: str) -> tuple[str, ...]:
    """The normalisations a ``layout`` shows, one tile each, given the animation's ``norms``."""
    if layout in ("side-by-side", "grid"):
        return tuple(norms)
    if layout == "local":
        return ("local",)
    if layout == "global":
        return ("global-all",) if "global-all" in norms and "global" not in norms else ("global",)
    raise UnknownNameError("layout", layout, LAYOUTS)


def map_size_text(layer: Layer) -> str:
    """A layer's native map size, ``"HxW"`` (``"DxHxW"`` for a volume map; its output shape when it has no map
    size)."""
    if layer.map_size:
        return "x".join(str(s) for s in layer.map_size)
    return "x".join(str(s) for s in layer.shape[1:]) or "-"


def target_text(anim: Animation) -> str:
    """``"target <name> (p=<probability>)"`` of the animated sample (FM-G-CAM: its K classes' summary)."""
    if anim.fusion is not None:
        return f"top-{len(anim.fusion.classes)} classes fused ({anim.fusion.base}, {anim.fusion.activation})"
    ex = anim.explanation
    c = ex.targets[anim.sample]
    p = float(ex.probabilities[anim.sample, c]) if c < ex.probabilities.shape[1] else float("nan")
    if ex.task.get("kind", "classification") != "classification":
        return f"{ex.task['kind']}: {ex.target_names[anim.sample]} (score={p:.4g})"
    return f"target {ex.target_names[anim.sample]} (p={p:.3f})"


def caption(anim: Animation, method: str | None, position: int) -> list[str]:
    """Caption lines of frame ``position``: layer index/total and name; module type and native map size;
    method(s), target class and probability; flags and ROAD. (Parameter counts are in ``layers.csv``:
    a line that changes every frame costs a text rendering per frame.)"""
    if is_volume(anim):
        return volume_caption(anim, method, position)
    layer = anim.layers[position]
    n = len(anim.layers)
    shown = anim.methods if method is None else (method,)
    line3 = f"{', '.join(shown)} · {anim.target_text()}"
    notes = []
    for m in shown:
        prefix = f"{m}: " if len(shown) > 1 else ""
        fl = anim.flags(m, position)
        if "flat" in fl:
            notes.append(prefix + "flat map (constant after ReLU)")
        if "no_gradient" in fl:
            notes.append(prefix + "no gradient reaches this layer")
        if anim.road and m in anim.road:
            v = anim.road[m][position]
            notes.append(f"{prefix}ROAD {v:.3f}" if math.isfinite(v) else f"{prefix}ROAD n/a")
    return [
        f"layer {position + 1}/{n}: {layer.name}",
        f"{layer.type} · map {map_size_text(layer)}",
        line3,
        " · ".join(notes),
    ]


def _progress_curve(anim: Animation, method: str | None) -> np.ndarray | None:
    """The ROAD scores drawn as a running curve in the progress strip (the first method's for the grid)."""
    if not anim.road:
        return None
    key = next(iter(anim.road)) if method is None else method
    return np.asarray(anim.road[key], np.float64) if key in anim.road else None


def composers(anim: Animation, method: str | None, layout: str) -> list[tuple[str, FrameComposer]]:
    """One composer per video (a row of tiles); the grid stacks one row per method, captions in the last."""
    norms = layout_norms(anim.norms, layout)

    def composer(titles: list[str], curve: np.ndarray | None, style: FrameStyle) -> FrameComposer:
        if anim.fusion is not None:  # no colour bar: the hue is the class; a legend instead
            return LegendComposer(anim.size, titles, anim.fusion, curve, style)
        return FrameComposer(anim.size, titles, [colormap_lut(anim.cmap)] * len(titles), curve, style)

    if layout != "grid":
        assert method is not None
        titles = [f"{method} · {_TITLES[n]}" if len(norms) == 1 else _TITLES[n] for n in norms]
        return [(method, composer(titles, _progress_curve(anim, method), style_of(anim)))]
    rows = []
    for r, m in enumerate(anim.methods):
        last = r == len(anim.methods) - 1
        style = (
            style_of(anim) if last else dataclasses.replace(style_of(anim), caption_lines=0, progress=False)
        )
        titles = [f"{m} · {_SHORT[n]}" for n in norms]
        rows.append((m, composer(titles, _progress_curve(anim, None) if last else None, style)))
    return rows


def render(
    anim: Animation,
    method: str | None = None,
    layout: str | None = None,
    positions: Sequence[int] | None = None,
) -> Iterator[np.ndarray]:
    """Render frames one by one, in forward order (see :meth:`camanim.animation.Animation.frames`).

    Yields:
        ``(Hf, Wf, 3)`` uint8 RGB frames of one fixed, even size.
    """
    layout = layout or anim.layouts[0]
    if layout not in LAYOUTS:
        raise UnknownNameError("layout", layout, LAYOUTS)
    method = method or anim.methods[0]
    if method not in anim.methods:
        raise UnknownNameError("method", method, anim.methods)
    norms = layout_norms(anim.norms, layout)
    pos = resolve_positions(len(anim.layers), positions)
    if is_volume(anim):
        methods = anim.methods if layout == "grid" else (method,)
        titles = [
            [f"{m} · {_SHORT[nm]}" if layout == "grid" or len(norms) == 1 else _TITLES[nm] for nm in norms]
            for m in methods
        ]
        curves = [_progress_curve(anim, None if layout == "grid" else m) for m in methods]
        yield from volume_frames(anim, methods, norms, titles, pos, layout == "grid", curves)
        return
    rows = composers(anim, None if layout == "grid" else method, layout)
    n = len(anim.layers)
    for start in range(0, len(pos), CHUNK):
        chunk = pos[start : start + CHUNK]
        tiles: dict[tuple[str, str], np.ndarray] = {}
        for m, _ in rows:
            stack = shrink(raw_stack(anim, m, chunk), anim.size)
            for nm in norms:
                tiles[m, nm] = colour(anim, stack, m, nm, chunk, anim.size)
            del stack
        for j, p in enumerate(chunk):
            parts = []
            for r, (m, composer) in enumerate(rows):
                last = r == len(rows) - 1
                lines = anim.caption(None if layout == "grid" else m, p) if last else ()
                parts.append(
                    composer(
                        [tiles[m, nm][j] for nm in norms],
                        lines,
                        ranges=[anim.range_for(m, nm, p) for nm in norms],
                        progress=(p + 1) / n if last else None,
                    )
                )
            yield parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
