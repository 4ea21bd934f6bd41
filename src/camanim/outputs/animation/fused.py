"""FM-G-CAM as a method of the CAManim animation: ``camanim animate --method fmgcam``.

One frame per kept layer, in forward order, shows that layer's fused map (:func:`camanim.methods.fused.fuse`
of the base method's maps of the top-K classes) over the image, one hue per class, as
:func:`~camanim.methods.fused.fused_overlay` draws it, with the legend (class, probability) under the frame.
The K class maps of every layer come from the one K-class capture of ``explain(..., top_k=K)`` (never one
capture per layer or per class); the fused maps are computed from it with
:func:`~camanim.methods.fused.fmgcam_sweep`.

Normalisation (:data:`NORMALISATION`) follows the other methods' ranges: every layer's fused ``(K, h, w)``
map is upsampled bilinearly to the input size and its negative values set to 0; the local range is that
stack's minimum and maximum over all ``K x H x W`` values, the global range the minimum and maximum over
all kept layers. With ``K >= 2`` every class is 0 wherever another class wins, so the minimum is 0 (only
classes alternating pixel by pixel could leave no zero after upsampling) and the ranges are
``[0, per-layer max]`` and ``[0, max over layers]``: a local tile equals ``fused_overlay(fused, image)``
(to rounding) and only the layer holding the global maximum reaches full intensity.
With ``K = 1`` the local frames equal the base method's (its map after ReLU over its L2 norm, scaled by
the same kind of range).

Negative values: ReLU (the default) leaves none. ELU and GELU map a position where even the winning
class's evidence is negative to a small negative value (ELU down to about -0.63, GELU to about -0.17: the
stack has unit L2 norm). Such a position has no class to show, so it is set to 0 after upsampling (drawn
as the bare image, exactly as ``fused_overlay`` clips it) and never enters a range: a negative floor would
tint the whole image in every class's hue. The stored maps (``maps.npz``) keep the raw base maps, from
which the fused maps, negatives included, are recomputed exactly.

Because Eq 6 divides each layer's stack by its own L2 norm, the global range compares how concentrated the
layers' fused maps are, not the raw size of their gradients.

``fmgcam`` cannot be mixed with other methods in one animation (:func:`~camanim.pipelines.animate.fused_options` says so): its
capture explains K classes, the others one, and their ranges are in different units. ``--target`` (the
classes are the top K), ``--road`` and ``--layers best`` (ROAD scores one class's map) do not apply to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from camanim.outputs.fmgcam import describe_result, legend_strip
from camanim.outputs.render import FrameComposer, FrameStyle
from camanim.pipelines.fmgcam import FMGCAMResult

__all__ = ["NORMALISATION", "LegendComposer", "describe_fusion"]

NORMALISATION = (
    "FM-G-CAM: each layer's fused (K, h, w) map bilinearly upsampled to the input size, negative values "
    "(ELU/GELU) set to 0; local: the min/max of the layer's K x H x W values (0 and the layer's max for "
    "K >= 2, in practice); global: the min/max over all kept layers; a pixel's class intensities, scaled by the range, "
    "blend that class's hue over the image"
)


class LegendComposer(FrameComposer):
    """A :class:`~camanim.render.FrameComposer` for FM-G-CAM frames: no colour bars (the hue is the class)
    and the legend (swatch, class name, probability per class) under every frame.

    Args:
        tile_size: ``(H, W)`` of the tiles.
        titles: one title per tile.
        result: the FM-G-CAM result whose classes the legend lists.
        progress_curve, style: see :class:`~camanim.render.FrameComposer`.
    """

    def __init__(
        self,
        tile_size: tuple[int, int],
        titles: Sequence[str],
        result: FMGCAMResult,
        progress_curve: np.ndarray | Sequence[float] | None = None,
        style: FrameStyle | None = None,
    ) -> None:
        super().__init__(tile_size, titles, None, progress_curve, style)
        self._legend = legend_strip(result, self.shape[1], font_size=self.style.font_size)
        self.shape = (self.shape[0] + self._legend.shape[0], self.shape[1], 3)

    def __call__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        """A frame of :meth:`FrameComposer.__call__` with the legend below: ``(Hf, Wf, 3)`` uint8, both even."""
        return np.concatenate([super().__call__(*args, **kwargs), self._legend], axis=0)


def describe_fusion(result: FMGCAMResult) -> dict[str, Any]:
    """The ``fmgcam`` entry of an animation's manifest section."""
    return {
        **describe_result(result),
        "maps": f"maps.npz holds the raw {result.base} map of each class, (K, h, w) per layer; the fused maps "
        "are camanim.compute.fusion.fmgcam_sweep of them",
        "normalisation": NORMALISATION,
    }
