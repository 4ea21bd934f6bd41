"""Frame rendering of a CAManim animation: one frame per kept layer, for every layout.

The layouts (:data:`LAYOUTS`): ``"side-by-side"`` (one tile per normalisation of the animation),
``"local"``, ``"global"`` (one tile), and ``"grid"`` (one row of tiles per method, captions under the last).

Rendering is vectorised, a chunk of :data:`CHUNK` layers at a time: the maps of one native size are upsampled
in one call (:func:`method_stack`), resized to the tile size (:func:`shrink`), scaled by each tile's range
(:func:`normalize_stack`) and coloured over the image (:func:`colour`); a
:class:`~camanim.render.FrameComposer` built once per video (:func:`composers`) adds the titles, caption,
colour bars and progress strip. The ranges come from the animation
(:meth:`~camanim.animation.Animation.range_for`); FM-G-CAM frames draw each class in its hue with a legend
instead of colour bars (:mod:`camanim.fused_frames`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from camanim.compute.layers import Layer
from camanim.compute.methods import method_class
from camanim.compute.normalize import Range
from camanim.compute.resize import shrink, upsample_by_size
from camanim.errors import OptionError, UnknownNameError
from camanim.fused_frames import LegendComposer, fused_stack
from camanim.outputs.fmgcam import blend_classes
from camanim.outputs.render import FrameComposer, FrameStyle, colormap_lut, overlay_batch
from camanim.pipelines.explain import Explanation
from camanim.pipelines.fmgcam import FMGCAMResult

if TYPE_CHECKING:
    from camanim.animation import Animation

__all__ = ["CHUNK", "LAYOUTS", "caption", "composers", "method_stack", "render", "tile_size"]

LAYOUTS = ("side-by-side", "local", "global", "grid")
#: Layers upsampled at once while rendering: bounds memory to ~25 MB per method at 224x224.
CHUNK = 128

_TITLES = {
    "local": "local: layer min-max",
    "global": "global: all layers",
    "global-all": "global: all methods",
}
_SHORT = {"local": "local", "global": "global", "global-all": "global (all methods)"}


# ----------------------------------------------------------------------------------------------- arrays


def tile_size(size: int | tuple[int, int] | None, in_hw: tuple[int, int]) -> tuple[int, int]:
    """The ``(H, W)`` of a tile in pixels: ``size`` as the longer side (aspect ratio of ``in_hw`` kept), an
    explicit ``(H, W)``, or ``in_hw`` itself when None."""
    if size is None:
        return in_hw
    if isinstance(size, int):
        if size < 8:
            raise OptionError(f"tile size must be at least 8 pixels, got {size}")
        scale = size / max(in_hw)
        return max(1, round(in_hw[0] * scale)), max(1, round(in_hw[1] * scale))
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise OptionError(f"tile size must be positive, got {size}")
    return h, w


def normalize_stack(stack: np.ndarray, ranges: Sequence[Range], nan_safe: bool = True) -> np.ndarray:
    """:func:`camanim.normalize.normalize` of each map of ``(N, H, W)`` (or ``(N, K, H, W)``) by its own range.

    ``nan_safe=False`` skips the NaN pass when the caller's colour lookup treats NaN as 0 anyway."""
    axes = (-1,) + (1,) * (stack.ndim - 1)
    lo = np.array([r.low for r in ranges], np.float32).reshape(axes)
    inv = np.array([0.0 if r.is_flat() else 1.0 / r.span for r in ranges], np.float32).reshape(axes)
    out = stack - lo
    out *= inv
    np.clip(out, 0.0, 1.0, out=out)
    if nan_safe:
        np.nan_to_num(out, copy=False, nan=0.0)
    return out


def _upsampled_stack(
    ex: Explanation, method: str, layers: Sequence[Layer], positions: Sequence[int], sample: int
) -> np.ndarray:
    """Maps of ``layers[positions]`` after the method's ReLU, upsampled to the input size.

    Maps sharing a native size go through one ``resize_maps`` call; each result equals
    ``ex.upsampled(method, layer)[sample]`` exactly (same interpolation, one plane at a time).

    Returns:
        ``(n, H_in, W_in)`` float32.
    """
    maps = [ex.maps[method][layers[p].name][sample] for p in positions]
    return upsample_by_size(maps, tuple(ex.input.shape[-2:]), relu=method_class(method).relu)


def method_stack(
    ex: Explanation,
    fusion: FMGCAMResult | None,
    method: str,
    layers: Sequence[Layer],
    positions: Sequence[int],
    sample: int,
) -> np.ndarray:
    """What normalisation scales: the maps of ``layers[positions]`` after the method's ReLU, upsampled to the
    input size, ``(n, H_in, W_in)`` float32 in the method's raw units; with ``fusion`` the fused maps
    ``(n, K, H_in, W_in)`` (:func:`camanim.fused_frames.fused_stack`)."""
    if fusion is not None:
        return fused_stack(fusion, [layers[p].name for p in positions], tuple(ex.input.shape[-2:]))
    return _upsampled_stack(ex, method, layers, positions, sample)


def raw_stack(anim: Animation, method: str, positions: Sequence[int]) -> np.ndarray:
    """:func:`method_stack` of the animation's frames at ``positions``."""
    return method_stack(anim.explanation, anim.fusion, method, anim.layers, positions, anim.sample)


def resolve_positions(n: int, positions: Sequence[int] | slice | None) -> list[int]:
    """Frame positions as a list of indices into ``n`` frames: all when None, a slice, or indices (negative
    counts from the end).

    Raises:
        IndexError: a position outside ``-n..n-1``.
    """
    if positions is None:
        return list(range(n))
    if isinstance(positions, slice):
        return list(range(n))[positions]
    out = [int(p) + (n if int(p) < 0 else 0) for p in positions]
    bad = [p for p in out if not 0 <= p < n]
    if bad:
        raise IndexError(f"frame positions {bad} out of range 0..{n - 1}")
    return out


# ------------------------------------------------------------------------------------------------ tiles


def display(anim: Animation, size: tuple[int, int]) -> np.ndarray:
    """The animated sample's picture at ``size``: ``(H, W, 3)`` uint8, cached on the animation."""
    key = ("display", size)
    if key not in anim._cache:
        img = anim.explanation.display[anim.sample]
        if img.shape[:2] != tuple(size):
            img = np.asarray(Image.fromarray(img).resize((size[1], size[0]), Image.Resampling.BILINEAR))
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
    """A layer's native map size, ``"HxW"`` (or its output shape when it has no map size)."""
    if layer.map_size:
        return f"{layer.map_size[0]}x{layer.map_size[1]}"
    return "x".join(str(s) for s in layer.shape[1:]) or "-"


def target_text(anim: Animation) -> str:
    """``"target <name> (p=<probability>)"`` of the animated sample (FM-G-CAM: its K classes' summary)."""
    if anim.fusion is not None:
        return f"top-{len(anim.fusion.classes)} classes fused ({anim.fusion.base}, {anim.fusion.activation})"
    ex = anim.explanation
    c = ex.targets[anim.sample]
    p = float(ex.probabilities[anim.sample, c]) if c < ex.probabilities.shape[1] else float("nan")
    return f"target {ex.target_names[anim.sample]} (p={p:.3f})"


def caption(anim: Animation, method: str | None, position: int) -> list[str]:
    """Caption lines of frame ``position``: layer index/total and name; module type and native map size;
    method(s), target class and probability; flags and ROAD. (Parameter counts are in ``layers.csv``:
    a line that changes every frame costs a text rendering per frame.)"""
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
        return [(method, composer(titles, _progress_curve(anim, method), anim.style))]
    rows = []
    for r, m in enumerate(anim.methods):
        last = r == len(anim.methods) - 1
        style = anim.style if last else dataclasses.replace(anim.style, caption_lines=0, progress=False)
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
    rows = composers(anim, None if layout == "grid" else method, layout)
    pos = resolve_positions(len(anim.layers), positions)
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
