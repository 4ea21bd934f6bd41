"""The report's viewer for an FM-G-CAM bundle: an animation (``camanim animate --method fmgcam``, the
manifest's ``animation.fmgcam`` entry) or a result (``camanim fmgcam``,
:func:`~camanim.methods.fused.write_fmgcam`: a top-level ``fmgcam`` section, no animation).

Such a bundle stores the K raw base maps of every kept layer (``"<base>/<layer>"``, ``(K, h, w)``), not the
fused maps. The viewer fuses them again with :func:`camanim.methods.fused.fuse` and the manifest's base,
activation and norm (what :func:`~camanim.methods.fused.fmgcam_sweep` does for the animation), then draws
each tile as the animation draws its frames' tiles: :func:`camanim.fused_frames.upsample_fused`, the
animation's shrink, and :func:`camanim.frames.fused_tiles` (each class in its hue, the blend of
:func:`~camanim.methods.fused.fused_overlay`), scaled by the ranges the manifest records
(:data:`camanim.fused_frames.NORMALISATION`). The class legend comes from the manifest's class table.

A result bundle records no ranges, tile size or opacity: its viewer shows the layers its ``fmgcam`` section
lists, measures the local and global ranges as the animation does (:func:`local_ranges`, then their union)
and draws with the animation's defaults (opacity 0.5, tiles of the input size up to 224 px), so its tiles
are those of ``camanim animate --method fmgcam`` of the same model, image and K at those layers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from camanim.compute.fusion import fuse
from camanim.compute.normalize import Range
from camanim.compute.resize import shrink
from camanim.outputs.animation.frames import fused_tiles
from camanim.outputs.animation.fused import NORMALISATION
from camanim.outputs.fmgcam import class_colors
from camanim.outputs.report.source import Source, dig, finite
from camanim.pipelines.animate import FMGCAM, upsample_fused

__all__ = ["FMGCAM", "Fusion", "fmgcam_tiles", "fused_maps", "fusion_of", "legend", "local_ranges"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fusion:
    """What an FM-G-CAM bundle's manifest says about its fusion.

    Attributes:
        base: the base method whose ``(K, h, w)`` maps ``maps.npz`` holds.
        activation, norm: Eq 6's activation and L2 norm (see :func:`camanim.methods.fused.fuse`).
        classes: the manifest's class table, most probable first (rank, class, name, probability, colour).
        colors: ``(K, 3)`` uint8 class colours, as the manifest records them.
        score: ``"softmax"``, ``"sigmoid"`` or ``"target score"`` (a task target's own score): what the
            classes' numbers are.
        normalisation: how the frames are scaled (the manifest's text; a result bundle records none, and
            its frames are scaled by :data:`~camanim.fused_frames.NORMALISATION`).
        layers: a result bundle's layers, in forward order (the viewer's frames); empty for an animation,
            whose frames are its ``per_frame`` layers.
    """

    base: str
    activation: str
    norm: str
    classes: tuple[Mapping[str, Any], ...]
    colors: np.ndarray
    score: str
    normalisation: str
    layers: tuple[str, ...] = ()

    @property
    def k(self) -> int:
        """Number of classes fused."""
        return len(self.classes)


def _color(value: Any) -> tuple[int, int, int] | None:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value):
        return None
    return int(value[0]), int(value[1]), int(value[2])


def fusion_of(manifest: Mapping[str, Any]) -> Fusion | None:
    """The fusion of an FM-G-CAM bundle, or None for any other bundle (ordinary methods).

    An animation bundle is FM-G-CAM when its methods are ``["fmgcam"]`` and it has an ``animation.fmgcam``
    entry; a bundle without an animation section when its top-level ``fmgcam`` section holds a class table
    (:meth:`~camanim.methods.fused.FMGCAMResult.describe`; a section naming only a figure is not one).
    Class colours missing or malformed in the manifest fall back to
    :func:`~camanim.methods.fused.class_colors` (what the animation uses).
    """
    if dig(manifest, "animation"):
        entry = dig(manifest, "animation", "fmgcam")
        if not isinstance(entry, Mapping) or dig(manifest, "animation", "methods") != [FMGCAM]:
            return None
        return _fusion(entry, str(entry.get("normalisation") or ""), ())
    entry = manifest.get("fmgcam")
    if not isinstance(entry, Mapping) or "classes" not in entry:
        return None
    layers = entry.get("layers")
    layers = tuple(str(n) for n in layers) if isinstance(layers, list) else ()
    return _fusion(entry, NORMALISATION, layers)


def _fusion(entry: Mapping[str, Any], normalisation: str, layers: tuple[str, ...]) -> Fusion | None:
    """:class:`Fusion` from a manifest's FM-G-CAM entry (an animation's or a result's), or None (a
    warning) when it names no classes or base method."""
    classes = [c for c in entry.get("classes") or [] if isinstance(c, Mapping)]
    base = entry.get("base")
    if not classes or not isinstance(base, str) or not base:
        logger.warning("the manifest's FM-G-CAM entry names no classes or base method: no fused viewer")
        return None
    colors = [_color(c.get("color")) for c in classes]
    if any(c is None for c in colors):
        table = class_colors(len(classes))
    else:
        table = np.array(colors, np.uint8)
    return Fusion(
        base=base,
        activation=str(entry.get("activation") or "relu"),
        norm=str(entry.get("norm") or "stack"),
        classes=tuple(classes),
        colors=table,
        score=entry.get("probability")
        if entry.get("probability") in ("sigmoid", "target score")
        else "softmax",
        normalisation=normalisation,
        layers=layers,
    )


def legend(fusion: Fusion) -> list[dict[str, Any]]:
    """One row per class for the page (the template escapes the texts): rank, class, name, score label and
    value (None when not a finite number), colour as ``#rrggbb``."""

    label = {"sigmoid": "sigmoid", "target score": "score"}.get(fusion.score, "p")
    return [
        {
            "rank": i + 1,
            "class": c["class"] if isinstance(c.get("class"), int) else str(c.get("class", "?")),
            "name": str(c.get("name", "?")),
            "label": label,
            "probability": finite(c.get("probability")),
            "color": "#{:02x}{:02x}{:02x}".format(*(int(v) for v in color)),
        }
        for i, (c, color) in enumerate(zip(fusion.classes, fusion.colors, strict=True))
    ]


def fused_maps(src: Source, fusion: Fusion, frames: Sequence[str]) -> list[torch.Tensor] | None:
    """Every frame's fused map ``(K, h, w)``, fused again from the bundle's base maps; None when a layer's
    base maps are missing or do not hold the K classes."""

    out = []
    for name in frames:
        a = src.maps(f"{fusion.base}/{name}")
        if a is None or a.ndim != 3 or a.shape[0] != fusion.k:
            logger.info("no (K, h, w) %s maps of layer %s in the bundle: no fused viewer", fusion.base, name)
            return None
        out.append(fuse(torch.from_numpy(np.asarray(a, np.float32)), fusion.activation, norm=fusion.norm))
    return out


def local_ranges(fused: Sequence[torch.Tensor], in_hw: tuple[int, int], chunk: int = 64) -> list[Range]:
    """Each frame's local range where the manifest records none: the min and max of its upsampled fused
    stack, as the animation measures it."""
    out: list[Range] = []
    for start in range(0, len(fused), chunk):
        part = fused[start : start + chunk]
        flat = upsample_fused(part, in_hw).reshape(len(part), -1)
        out.extend(Range(float(lo), float(hi)) for lo, hi in zip(flat.min(1), flat.max(1), strict=True))
    return out


def fmgcam_tiles(
    fused: Sequence[torch.Tensor],
    ranges: Mapping[str, Sequence[Range]],
    *,
    in_hw: tuple[int, int],
    tile: tuple[int, int],
    display: np.ndarray,
    colors: np.ndarray,
    alpha: float,
    per_sheet: int,
) -> Iterator[dict[str, np.ndarray]]:
    """The FM-G-CAM tiles of every frame under every normalisation, ``per_sheet`` frames at a time.

    Args:
        fused: fused maps ``(K, h, w)`` in frame order.
        ranges: per normalisation name, one range per frame.
        in_hw: the model's input size; maps are upsampled to it first.
        tile: ``(h, w)`` of a tile.
        display: the picture the model saw, resized to ``tile``: ``(h, w, 3)`` uint8.
        colors: ``(K, 3)`` uint8 class colours.
        alpha: opacity of a class at full intensity.
        per_sheet: frames per chunk (one sprite sheet each).

    Yields:
        Per chunk of frames, ``{norm: (n, h, w, 3) uint8}``.
    """

    for start in range(0, len(fused), per_sheet):
        stop = min(len(fused), start + per_sheet)
        stack = shrink(upsample_fused(fused[start:stop], in_hw), tile)
        yield {
            norm: fused_tiles(stack, rs[start:stop], display, colors, alpha) for norm, rs in ranges.items()
        }
