"""FM-G-CAM drawn and written: class colours, the fused overlay, the legend, the figure and the bundle.

Each class gets its own hue (:func:`class_colors`); a fused map is blended over the image class by class
(:func:`fused_overlay`, :func:`blend_classes`). :func:`render_result` draws the paper's figure layout and
:func:`save_result` writes a bundle; both are also the ``render`` and ``save`` methods of
:class:`~camanim.pipelines.fmgcam.FMGCAMResult` (attached by :mod:`camanim.outputs.attach`).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.colors as mcolors
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from camanim.compute.normalize import normalize
from camanim.compute.resize import resize_maps
from camanim.outputs.bundle import open_bundle
from camanim.outputs.explanation import overlay_path
from camanim.outputs.render import draw_task_marks, grid, overlay, save_png
from camanim.pipelines.explain import describe
from camanim.pipelines.fmgcam import FMGCAMResult

logger = logging.getLogger(__name__)

PALETTE = "tab10"
# tab10 without its grey (index 7), which does not read as a class colour over a photograph.
_PALETTE_INDICES = (0, 1, 2, 3, 4, 5, 6, 8, 9)
MAX_DISTINCT_COLORS = len(_PALETTE_INDICES)


def class_colors(k: int) -> np.ndarray:
    """One RGB colour per class: ``(K, 3)`` uint8.

    Up to :data:`MAX_DISTINCT_COLORS` (9) classes get the qualitative palette ``tab10`` (without grey);
    beyond that, ``K`` hues evenly spaced around the HSV circle (full saturation and value), with a warning
    (once per ``K``), since neighbouring hues then become hard to tell apart.
    """
    if k < 1:
        raise ValueError(f"need at least one class, got {k}")
    return np.array(_class_colors(k), dtype=np.uint8)


@functools.lru_cache(maxsize=32)
def _class_colors(k: int) -> tuple[tuple[int, int, int], ...]:
    if k <= MAX_DISTINCT_COLORS:
        colors = np.asarray(matplotlib.colormaps[PALETTE].colors)[list(_PALETTE_INDICES[:k])]
    else:
        logger.warning(
            "%d classes: more than the %d colours of the %s palette; using %d evenly spaced hues",
            k,
            MAX_DISTINCT_COLORS,
            PALETTE,
            k,
        )
        colors = mcolors.hsv_to_rgb(np.stack([np.arange(k) / k, np.ones(k), np.ones(k)], axis=1))
    return tuple(tuple(int(v) for v in c) for c in (np.asarray(colors) * 255 + 0.5).astype(np.uint8))


def fused_overlay(
    fused: Tensor | np.ndarray,
    image: np.ndarray,
    *,
    colors: np.ndarray | None = None,
    alpha: float = 0.7,
    scale: float | None = None,
) -> np.ndarray:
    """Blend a fused map over an image, each class in its own hue.

    Each class map is upsampled bilinearly to the image and divided by ``scale`` (default: the largest
    value of the whole fused stack, so the classes keep their relative strength; pass one value for every
    layer of a sweep for global normalisation), clipped to ``[0, 1]`` (ELU/GELU negatives show as 0). A
    pixel with intensities ``v_k`` becomes ``(1 - alpha * sum v_k) * image + alpha * sum v_k * colour_k``:
    the image where no class is, the class's hue where it is strongest.

    Args:
        fused: ``(K, h, w)`` from :func:`fuse`.
        image: ``(H, W, 3)`` uint8.
        colors: ``(K, 3)`` uint8; default :func:`class_colors`.
        alpha: opacity of a class at full intensity.
        scale: the value shown at full intensity.

    Returns:
        ``(H, W, 3)`` uint8.
    """
    f = torch.as_tensor(fused).float().cpu()
    if f.dim() != 3:
        raise ValueError(f"fused must be (K, h, w), got {tuple(f.shape)}")
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    colors = class_colors(f.shape[0]) if colors is None else np.asarray(colors)
    up = resize_maps(f, image.shape[:2]).numpy()  # (K, H, W)
    s = float(up.max()) if scale is None else float(scale)
    v = np.clip(up / s, 0.0, 1.0) if s > 0 else np.zeros_like(up)
    return blend_classes(v, image, colors, alpha)


def blend_classes(
    intensities: np.ndarray, image: np.ndarray, colors: np.ndarray, alpha: float = 0.7
) -> np.ndarray:
    """Colour per-class intensities over an image, each class in its hue (the blend of :func:`fused_overlay`).

    A pixel with intensities ``v_k`` becomes ``(1 - alpha * min(1, sum v_k)) * image + alpha * sum v_k *
    colour_k``.

    Args:
        intensities: ``(K, H, W)`` or ``(N, K, H, W)`` values in ``[0, 1]`` (float32).
        image: ``(H, W, 3)`` uint8.
        colors: ``(K, 3)`` uint8 class colours.
        alpha: opacity of a class at full intensity.

    Returns:
        ``(H, W, 3)`` or ``(N, H, W, 3)`` uint8.
    """
    v = np.asarray(intensities, np.float32)
    strength = np.clip(v.sum(axis=-3), 0.0, 1.0)[..., None]  # bilinear mixing at class borders sums to <= 1
    heat = np.einsum("...khw,kc->...hwc", v, np.asarray(colors).astype(np.float32))
    out = (1.0 - alpha * strength) * image.astype(np.float32) + alpha * heat
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def legend(
    names: Sequence[str],
    values: Sequence[float],
    colors: np.ndarray,
    width: int,
    *,
    label: str = "p",
    font_size: int = 12,
) -> np.ndarray:
    """A legend strip: one line per class, a colour swatch, the name and ``label=value``: ``(h, width, 3)`` uint8."""
    font = ImageFont.load_default(size=font_size)
    line = int(font.getbbox("Ág|")[3]) + 4
    img = Image.new("RGB", (width, line * len(names) + 8), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for i, (name, value, color) in enumerate(zip(names, values, colors, strict=True)):
        y = 4 + i * line
        draw.rectangle([8, y + 2, 8 + line - 6, y + line - 4], fill=tuple(int(c) for c in color))
        draw.text((8 + line, y), f"{i + 1}. {name}  {label}={value:.3f}", font=font, fill=(0, 0, 0))
    return np.asarray(img)


def result_colors(result: FMGCAMResult) -> np.ndarray:
    """``(K, 3)`` uint8 class colours."""
    return class_colors(len(result.classes))


def class_table(result: FMGCAMResult) -> list[dict[str, Any]]:
    """One manifest entry per class (or task target): rank, class index (a target's label or class index, or
    its position), name, probability (a target's score) and RGB colour."""
    return [
        {"rank": i + 1, "class": c, "name": n, "probability": p, "color": [int(v) for v in col]}
        for i, (c, n, p, col) in enumerate(
            zip(result.classes, result.names, result.probabilities, result_colors(result), strict=True)
        )
    ]


def describe_result(result: FMGCAMResult) -> dict[str, Any]:
    """The manifest entries every FM-G-CAM output shares: paper, classes and settings."""
    return {
        "paper": "Rammuni Silva and Bird, FM-G-CAM, 2024 (Eqs 1-6)",
        "k": len(result.classes),
        "classes": class_table(result),
        "probability": "sigmoid" if result.multilabel else "target score" if result.is_task else "softmax",
        "base": result.base,
        "activation": result.activation,
        "norm": result.norm,
    } | ({"task": dict(result.task)} if result.is_task else {})


def legend_strip(result: FMGCAMResult, width: int, *, font_size: int = 12) -> np.ndarray:
    """The legend (swatch, name, probability per class) ``(h, width, 3)`` uint8, ``h`` even."""
    strip = legend(
        result.names,
        result.probabilities,
        result_colors(result),
        width,
        label=result.score_label,
        font_size=font_size,
    )
    return strip if strip.shape[0] % 2 == 0 else np.concatenate([strip, strip[-1:]], axis=0)


def with_legend(result: FMGCAMResult, figure: np.ndarray, *, font_size: int = 12) -> np.ndarray:
    """``figure`` ``(H, W, 3)`` with :meth:`legend_strip` below it: ``(H + h, W, 3)`` uint8."""
    return np.concatenate([figure, legend_strip(result, figure.shape[1], font_size=font_size)], axis=0)


def result_overlay(result: FMGCAMResult, layer: str | None = None, **kwargs: Any) -> np.ndarray:
    """The fused overlay ``(H, W, 3)`` uint8 at ``layer`` (default the last); see :func:`fused_overlay`. For
    task targets, each target's region outline and boxes are drawn in its colour (:func:`task_marks`)."""
    layer = layer or result.layers[-1]
    colors = result_colors(result)
    image = fused_overlay(result.fused[layer], result.explanation.display[0], colors=colors, **kwargs)
    for k in range(len(result.classes)):
        image = task_marks(result, image, k, color=tuple(int(v) for v in colors[k]))
    return image


def task_marks(
    result: FMGCAMResult, image: np.ndarray, k: int, color: tuple[int, int, int] = (255, 255, 255)
) -> np.ndarray:
    """Target ``k``'s region outline and boxes drawn over ``image`` ``(H, W, 3)`` uint8 (as explain's frames
    draw them: :func:`~camanim.outputs.render.draw_task_marks`); the image itself when it has none."""
    ex = result.explanation
    regions, boxes = getattr(ex, "regions", None), getattr(ex, "boxes", None)
    region = None if regions is None or k >= len(regions) else regions[k].numpy()
    box = boxes[k] if boxes and k < len(boxes) else None
    if region is None and not box:
        return image
    return draw_task_marks(image, region, box, source_hw=tuple(ex.input.shape[-2:]), color=color)


def render_result(
    result: FMGCAMResult, layer: str | None = None, *, panels: bool = True, alpha: float = 0.7
) -> np.ndarray:
    """The figure: the fused overlay with a legend, and (``panels``) each class's base-method overlay
    beside it (the paper's Figs 6-7 layout). Returns ``(H', W', 3)`` uint8."""
    layer = layer or result.layers[-1]
    display = result.explanation.display[0]
    tiles = [result_overlay(result, layer, alpha=alpha)]
    titles = [f"FM-G-CAM ({result.base}, {result.activation})"]
    if panels:
        up = result.explanation.upsampled(result.base, layer)  # (K, H, W) after ReLU
        for k, name in enumerate(result.names):
            tiles.append(task_marks(result, overlay(display, normalize(up[k].numpy()), "jet"), k))
            titles.append(f"{result.base}: {name}")
    figure = grid([tiles], col_titles=titles, title=f"{result.explanation.model_name} - layer {layer}")
    return with_legend(result, figure)  # grid's height is even, so the figure's stays even


def save_result(
    result: FMGCAMResult,
    out: str | os.PathLike,
    *,
    force: bool = False,
    command: str = "",
    panels: bool = True,
    finalize: Callable[[Any], None] | None = None,
) -> Path:
    """Write a bundle: ``fmgcam.png``, ``maps.npz`` (``fmgcam/<layer>`` and ``<base>/<layer>``, ``(K, h, w)``)
    and the classes in ``manifest.json``; ``finalize`` as in :func:`camanim.bundle.open_bundle`.
    Returns the bundle's path."""
    with open_bundle(out, force=force, command=command, finalize=finalize) as bundle:
        write_fmgcam(result, bundle, panels=panels)
    return bundle.root


def write_fmgcam(result: FMGCAMResult, bundle: Any, *, panels: bool = True) -> None:
    """Write ``result`` into an open bundle (see :meth:`FMGCAMResult.save`).

    ``fmgcam.png`` shows the last layer; with several layers each also gets ``fmgcam/<index>_<layer>.png``.
    """
    ex = result.explanation
    bundle.save_npy("input.npy", ex.input[:1].numpy(), "input tensor (1, 3, H, W) float32")
    arrays = {f"fmgcam/{layer}": result.fused[layer].numpy() for layer in result.layers}
    arrays.update({f"{result.base}/{layer}": result.base_maps[layer].numpy() for layer in result.layers})
    bundle.save_npz("maps.npz", arrays, "raw maps (K, h, w): fused and base per class")
    manifest = describe(ex, "sigmoid" if result.multilabel else "logit")
    manifest["input"] = {"file": "input.npy", "shape": [1, *ex.input.shape[1:]], "dtype": "float32"}
    if getattr(ex, "regions", None) is not None:
        bundle.save_npy("regions.npy", ex.regions.numpy(), "the region each target's score is taken over")
        manifest["regions"] = {"file": "regions.npy", "shape": "(K, H, W) bool, at the output's size"}
    manifest["maps"] = {
        "file": "maps.npz",
        "key": "fmgcam/<layer> (fused, after the activation) and <base>/<layer> (raw base map per class)",
        "shape": "(K, h, w), K classes, most probable first (K task targets: in their order)",
    }
    bundle.manifest.update(manifest)
    save_png(bundle.file("fmgcam.png", "FM-G-CAM figure"), render_result(result, panels=panels))
    pngs = {}
    if len(result.layers) > 1:
        by_name = {layer.name: layer for layer in ex.chosen}
        for name in result.layers:
            rel = overlay_path("fmgcam", by_name[name]).replace("overlays/", "", 1)
            save_png(
                bundle.file(rel, "FM-G-CAM figure"),
                render_result(result, name, panels=panels),
                compress_level=3,
            )
            pngs[name] = rel
    bundle.manifest["fmgcam"] = {
        **describe_result(result),
        "layers": list(result.layers),
        "figure": "fmgcam.png",
        "figures": pngs,
        "timings": dict(ex.timings),
    }
