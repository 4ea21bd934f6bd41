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

``fmgcam`` cannot be mixed with other methods in one animation (:func:`fused_options` says so): its
capture explains K classes, the others one, and their ranges are in different units. ``--target`` (the
classes are the top K), ``--road`` and ``--layers best`` (ROAD scores one class's map) do not apply to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from camanim.compute.fusion import ACTIVATIONS, FusionError, check_base
from camanim.compute.resize import upsample_by_size
from camanim.errors import UnknownNameError
from camanim.outputs.render import FrameComposer, FrameStyle
from camanim.pipelines.fmgcam import FMGCAMResult

__all__ = [
    "DEFAULT_K",
    "FMGCAM",
    "NORMALISATION",
    "FusedOptions",
    "LegendComposer",
    "fused_options",
    "upsample_fused",
]

#: The method name that asks an animation for FM-G-CAM frames.
FMGCAM = "fmgcam"
DEFAULT_K = 3
NORMALISATION = (
    "FM-G-CAM: each layer's fused (K, h, w) map bilinearly upsampled to the input size, negative values "
    "(ELU/GELU) set to 0; local: the min/max of the layer's K x H x W values (0 and the layer's max for "
    "K >= 2, in practice); global: the min/max over all kept layers; a pixel's class intensities, scaled by the range, "
    "blend that class's hue over the image"
)


@dataclass(frozen=True)
class FusedOptions:
    """What an FM-G-CAM animation asks for.

    Attributes:
        k: number of classes fused (the top K) when the animation runs the model.
        base: the base method's registry name.
        activation: Eq 6's activation: ``"relu"``, ``"elu"`` or ``"gelu"``.
    """

    k: int
    base: str
    activation: str

    def request(self) -> dict[str, Any]:
        """The entries recorded in an animation's request (and compared when resuming)."""
        return {"top_k": self.k, "base": self.base, "activation": self.activation}


def _names(methods: str | Sequence[str] | None) -> list[str]:
    if methods is None:
        return []
    items = methods.split(",") if isinstance(methods, str) else [str(m) for m in methods]
    return [m.strip() for m in items if m.strip()]


def fused_options(
    methods: str | Sequence[str] | None,
    *,
    top_k: int | None = None,
    base: str | None = None,
    activation: str | None = None,
    target: Any = None,
) -> FusedOptions | None:
    """Check an animation's methods and FM-G-CAM options; needs no model, so callers fail early.

    Args:
        methods: the methods asked for (comma-separated or a list).
        top_k, base, activation: FM-G-CAM options; None takes the default (3, ``"gradcam"``, ``"relu"``).
        target: the class asked for (must be None with ``fmgcam``).

    Returns:
        The FM-G-CAM options when ``methods`` is ``"fmgcam"``, else None (ordinary methods).

    Raises:
        FusionError: ``fmgcam`` mixed with other methods, with a target, ``k < 1``, a base method that is
            not class-discriminative, or FM-G-CAM options given without ``fmgcam``.
        UnknownNameError: an unknown activation or base method.
    """
    names = _names(methods)
    if FMGCAM not in names:
        given = [
            o for o, v in (("top_k", top_k), ("base", base), ("activation", activation)) if v is not None
        ]
        if given:
            raise FusionError(
                f"{', '.join(given)} (--top-k, --base, --activation) apply only to the method {FMGCAM!r}"
            )
        return None
    if len(names) > 1:
        others = [n for n in names if n != FMGCAM]
        raise FusionError(
            f"{FMGCAM!r} cannot be mixed with other methods ({', '.join(others)}) in one animation: it fuses "
            f"the top-K classes of a K-class capture while the others explain one class; animate {FMGCAM!r} "
            "alone and the other methods in a second run"
        )
    if target is not None:
        raise FusionError(
            f"a target does not apply to {FMGCAM!r}: it fuses the top-K classes (set K with top_k)"
        )
    if top_k is not None and int(top_k) < 1:
        raise FusionError(f"top_k must be at least 1, got {top_k}")
    activation = activation or "relu"
    if activation not in ACTIVATIONS:
        raise UnknownNameError("activation", activation, ACTIVATIONS)
    return FusedOptions(DEFAULT_K if top_k is None else int(top_k), check_base(base or "gradcam"), activation)


def upsample_fused(fused: Sequence[Tensor], size: tuple[int, int]) -> np.ndarray:
    """Fused maps as the frames scale and draw them (the report's viewer draws its tiles from this too).

    Args:
        fused: ``n`` fused maps ``(K, h, w)`` (:func:`~camanim.methods.fused.fuse`), native sizes may differ.
        size: ``(H, W)``, the input size.

    Returns:
        ``(n, K, H, W)`` float32: each map upsampled bilinearly, then clamped at 0 (see the module docstring).
    """
    out = upsample_by_size(list(fused), size)
    np.maximum(out, 0.0, out=out)
    return out


def fused_stack(result: FMGCAMResult, layers: Sequence[str], size: tuple[int, int]) -> np.ndarray:
    """:func:`upsample_fused` of the fused maps of ``layers`` (``result.fused[layer]`` is ``(K, h, w)``):
    ``(n, K, H, W)`` float32."""
    return upsample_fused([result.fused[name] for name in layers], size)


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
        self._legend = result.legend_strip(self.shape[1], font_size=self.style.font_size)
        self.shape = (self.shape[0] + self._legend.shape[0], self.shape[1], 3)

    def __call__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        """A frame of :meth:`FrameComposer.__call__` with the legend below: ``(Hf, Wf, 3)`` uint8, both even."""
        return np.concatenate([super().__call__(*args, **kwargs), self._legend], axis=0)


def describe_fusion(result: FMGCAMResult) -> dict[str, Any]:
    """The ``fmgcam`` entry of an animation's manifest section."""
    return {
        **result.describe(),
        "maps": f"maps.npz holds the raw {result.base} map of each class, (K, h, w) per layer; the fused maps "
        "are camanim.methods.fused.fmgcam_sweep of them",
        "normalisation": NORMALISATION,
    }
