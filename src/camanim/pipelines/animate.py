"""CAManim: the class activation map of every layer, animated in forward order.

CAManim (Kaczmarek et al., PLOS ONE 2024) shows one frame per layer so a viewer sees how the network arrives
at its final map. Each frame shows the map twice (paper, "Global- vs. Local-Level Normalization"):

* **local**: scaled by the layer's own minimum and maximum (where does this layer look?);
* **global**: scaled by the minimum and maximum over every kept layer of the method (which layer activates
  most strongly?), so only the layer holding the network-wide maximum reaches the top colour; optionally
  **global-all**, one range across all methods.

Both start from the method's raw map after its ReLU, bilinearly upsampled to the input size (a volume's
trilinearly to its ``(D, H, W)``, so both ranges span the whole volume), exactly as
:meth:`camanim.explanation.Explanation.upsampled` computes it (the paper's code min-max scaled each layer
before its "global" step, which made its global videos identical to its local ones).

``methods="fmgcam"`` animates FM-G-CAM, the top-K classes fused into one map per layer, one hue per class
(:func:`fused_options`: its ranges, legend and the treatment of ELU/GELU negatives).

This module holds :class:`Animation` (its ranges and normalisation) and :func:`animate`. Frames, figures,
the bundle and resuming are :mod:`camanim.outputs.animation`.

Example:
    >>> import camanim
    >>> anim = camanim.animate(image="chelsea", methods="gradcam")  # doctest: +SKIP
    >>> anim.save("out/chelsea")  # doctest: +SKIP
    >>> next(anim.frames()).shape  # doctest: +SKIP
    (368, 472, 3)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import matplotlib
import numpy as np
import torch
from torch import Tensor, nn

from camanim.compute.fusion import ACTIVATIONS, FusionError, check_base
from camanim.compute.layers import Layer, LayerSpec
from camanim.compute.methods import method_class
from camanim.compute.models import DEFAULT_MODEL, InputSize, LoadedModel, parse_input_size
from camanim.compute.normalize import Range
from camanim.compute.resize import shrink, upsample_by_size
from camanim.errors import CamanimError, OptionError, UnknownNameError
from camanim.pipelines.explain import Explanation, as_loaded, explain
from camanim.pipelines.fmgcam import FMGCAMResult

__all__ = ["LAYOUTS", "NORMS", "Animation", "FusedOptions", "LayerStats", "animate", "fused_options"]

logger = logging.getLogger(__name__)

NORMS = ("local", "global", "global-all")
LAYOUTS = ("side-by-side", "local", "global", "grid")
#: Layers upsampled at once: bounds memory to ~25 MB per method at 224x224.
CHUNK = 128
#: ...and at most this many map values at once (a 96^3 volume's upsampled map is 3.5 MB: 7 at a time).
CHUNK_VALUES = CHUNK * 224 * 224


@dataclass(frozen=True)
class LayerStats:
    """One map's values after the method's ReLU, upsampled to the input size: what normalisation scales.

    Attributes:
        min: smallest value, in the method's raw units.
        max: largest value.
        mean: mean value.
        flat: the map is constant (all zero included); it renders as the bottom colour under its local range.
    """

    min: float
    max: float
    mean: float
    flat: bool

    @property
    def range(self) -> Range:
        """The local normalisation range ``[min, max]``."""
        return Range(self.min, self.max)


def _parse_choice(value: str | Sequence[str], choices: Sequence[str], kind: str) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in (str(i).strip() for i in items):
        if not item:
            continue
        if item not in choices:
            raise UnknownNameError(kind, item, choices)
        if item not in out:
            out.append(item)
    if not out:
        raise OptionError(f"need at least one {kind}, one of {', '.join(choices)}")
    return tuple(out)


def check_animation_options(
    *,
    norm: str | Sequence[str] = ("local", "global"),
    layout: str | Sequence[str] = "side-by-side",
    cmap: str = "jet",
    size: int | tuple[int, int] | None = None,
    fps: int | None = None,
) -> None:
    """Check an animation's options before any model runs (the same parsers as the animation itself; the
    video formats are checked by :func:`camanim.outputs.animation.save_animation`).

    Raises:
        UnknownNameError: an unknown normalisation, layout or colour map.
        OptionError: an empty list, a tile size under 8 pixels or a frame rate under 1.
    """
    _parse_choice(norm, NORMS, "normalisation")
    _parse_choice(layout, LAYOUTS, "layout")
    check_colormap(cmap)
    if size is not None:
        tile_size(size, (224, 224))
    if fps is not None and not int(fps) >= 1:
        raise OptionError(f"fps must be at least 1, got {fps}")


def check_colormap(name: str) -> str:
    """``name`` when matplotlib has a colour map of that name (case-sensitive).

    Raises:
        UnknownNameError: no such colour map; the message lists close matches.
    """
    if name not in matplotlib.colormaps:
        raise UnknownNameError("colour map", name, sorted(matplotlib.colormaps))
    return name


def skip_reason(layer: Layer) -> str | None:
    """Why a sweep leaves ``layer`` out (non-spatial output, or a repeat of an earlier tensor), else None."""
    if not layer.is_spatial:
        shape = "x".join(str(s) for s in layer.shape) or "not a tensor"
        return f"non-spatial output ({shape}): its map would only show stripes"
    if layer.same_as is not None:
        return f"same tensor as {layer.same_as}"
    return None


def _layer_stats(
    ex: Explanation, fusion: FMGCAMResult | None, method: str, layers: Sequence[Layer], sample: int
) -> tuple[LayerStats, ...]:
    """Min, max, mean and flatness of every layer's upsampled map, a chunk of layers at a time."""
    out: list[LayerStats] = []
    n = len(layers)
    chunk = max(1, min(CHUNK, CHUNK_VALUES // math.prod(ex.grid)))  # a volume's maps hold many more values
    for start in range(0, n, chunk):
        pos = range(start, min(n, start + chunk))
        stack = method_stack(ex, fusion, method, layers, pos, sample).reshape(len(pos), -1)
        lo, hi = stack.min(axis=1), stack.max(axis=1)
        mean = stack.mean(axis=1, dtype=np.float64)
        for a, b, c in zip(lo, hi, mean, strict=True):
            r = Range(float(a), float(b))
            out.append(LayerStats(r.low, r.high, float(c), r.is_flat()))
    return tuple(out)


# ------------------------------------------------------------------------------------------ FM-G-CAM


#: The method name that asks an animation for FM-G-CAM frames.
FMGCAM = "fmgcam"
DEFAULT_K = 3


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
        ``(n, H_in, W_in)`` float32; for a volume ``(n, D_in, H_in, W_in)``, trilinearly.
    """
    maps = [ex.maps[method][layers[p].name][sample] for p in positions]
    return upsample_by_size(maps, ex.grid, relu=method_class(method).relu)


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
    ``(n, K, H_in, W_in)`` (:func:`fused_stack`)."""
    if fusion is not None:
        return fused_stack(fusion, [layers[p].name for p in positions], ex.grid)
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


@dataclass(frozen=True)
class Animation:
    """A CAManim animation of one explanation: what every frame shows and the range it is scaled by.

    Build it with :func:`animate` or :meth:`from_explanation`; nothing is rendered until frames are asked for.
    Rendering (``frames``, ``frame``, ``overlays``, ``caption``, ``strip``, ``layer_csv``, ``params_png``), the
    manifest section (``describe``), writing (``save``) and notebook display are attached by
    :mod:`camanim.outputs` (:mod:`camanim.outputs.animation`).

    Attributes:
        explanation: the raw maps (one capture for every method and layer).
        methods: methods animated, in order.
        layers: kept layers, one frame each, in forward order.
        skipped: layers of the forward pass left out, with the reason (non-spatial, repeated tensor).
        norms: normalisations shown side by side (``"local"``, ``"global"``, ``"global-all"``).
        layouts: videos to write: ``"side-by-side"`` (one tile per norm), ``"local"``, ``"global"``, ``"grid"``
            (methods x norms in one video).
        cmap: matplotlib colour map name.
        size: ``(H, W)`` of each tile in pixels.
        sample: which sample of the explanation's batch is animated.
        alpha: weight of the colour map over the image.
        stats: ``stats[method][i]``: values of layer ``i``'s map after ReLU, upsampled (:class:`LayerStats`).
        global_ranges: per method, the range over all its kept layers.
        global_all: the range over all methods and layers.
        road: optional per-method ROAD score per kept layer (ybROAD); drawn as a running curve.
        fps: frames per second of saved videos (default: about 10 s per video).
        style: frame look (a :class:`camanim.outputs.render.FrameStyle`; None: the default).
        request: what produced the explanation (model, image, methods, layers, target), used by ``reuse``.
        fusion: with ``methods == ("fmgcam",)``, FM-G-CAM of the explanation (a top-K capture): its fused
            ``(K, h, w)`` map per layer, classes and colours (see :func:`fused_options`); else None.
    """

    explanation: Explanation = field(repr=False)
    methods: tuple[str, ...]
    layers: tuple[Layer, ...] = field(repr=False)
    skipped: tuple[tuple[Layer, str], ...] = field(repr=False)
    norms: tuple[str, ...]
    layouts: tuple[str, ...]
    cmap: str
    size: tuple[int, int]
    sample: int
    alpha: float
    stats: Mapping[str, tuple[LayerStats, ...]] = field(repr=False)
    global_ranges: Mapping[str, Range]
    global_all: Range
    road: Mapping[str, tuple[float, ...]] | None = field(default=None, repr=False)
    fps: int = 10
    style: Any = field(default=None, repr=False)
    request: Mapping[str, Any] | None = field(default=None, repr=False)
    fusion: FMGCAMResult | None = field(default=None, repr=False, compare=False)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    # -------------------------------------------------------------------------------------- building

    @classmethod
    def from_explanation(
        cls,
        ex: Explanation,
        *,
        methods: str | Sequence[str] | None = None,
        norm: str | Sequence[str] = ("local", "global"),
        layout: str | Sequence[str] = "side-by-side",
        cmap: str = "jet",
        size: int | tuple[int, int] | None = None,
        sample: int = 0,
        alpha: float = 0.5,
        road: Mapping[str, Sequence[float]] | None = None,
        fps: int | None = None,
        style: Any = None,
        request: Mapping[str, Any] | None = None,
        base: str | None = None,
        activation: str | None = None,
        multilabel: bool = False,
    ) -> Animation:
        """Compute the normalisation ranges of an explanation's maps; frames render later, on demand.

        Args:
            ex: an explanation; every chosen layer becomes a frame.
            methods: a subset of ``ex.methods`` (default all), comma-separated or a list; or ``"fmgcam"``
                alone, for an explanation made with ``top_k`` (FM-G-CAM of its K classes).
            norm: normalisations shown side by side: ``"local"``, ``"global"``, ``"global-all"``.
            layout: one or more of ``"side-by-side"``, ``"local"``, ``"global"``, ``"grid"``.
            cmap: a matplotlib colour map name.
            size: tile size in pixels: an int for the longer side, ``(H, W)``, or None for the input size.
            sample: which sample of the batch to animate.
            alpha: weight of the colour map over the image, in ``[0, 1]``.
            road: per method, one ROAD score per kept layer (NaN for missing), shown in captions and as a
                running curve in the progress strip.
            fps: frames per second for saved videos; default plays the animation in about 10 s.
            style: frame look (:class:`camanim.outputs.render.FrameStyle`; None: the default).
            request: description of what produced ``ex`` (recorded, and compared by ``reuse``).
            base, activation: FM-G-CAM's base method (default ``"gradcam"``) and activation (default
                ``"relu"``); only with ``methods="fmgcam"``.
            multilabel: FM-G-CAM's legend shows sigmoid scores (a multi-label head) instead of softmax.

        Raises:
            UnknownNameError: an unknown method, normalisation, layout or colour map.
            CamanimError: no layer to animate, a method missing a layer's map, ``road`` of the wrong length,
                or ``fmgcam`` mixed with other methods (:class:`~camanim.methods.fused.FusionError`).
        """
        t0 = time.perf_counter()
        names = (
            tuple(ex.methods) if methods is None else _parse_choice(methods, (*ex.methods, FMGCAM), "method")
        )
        fused = fused_options(names, base=base, activation=activation)
        fusion = (
            None
            if fused is None
            else FMGCAMResult.from_explanation(ex, fused.base, fused.activation, multilabel=multilabel)
        )
        norms = _parse_choice(norm, NORMS, "normalisation")
        layouts = _parse_choice(layout, LAYOUTS, "layout")
        check_colormap(cmap)
        if not 0.0 <= alpha <= 1.0:
            raise OptionError(f"alpha must be in [0, 1], got {alpha}")
        b = ex.input.shape[0]
        if not 0 <= sample < b:
            raise OptionError(f"sample must be in 0..{b - 1}, got {sample}")
        layers = tuple(ex.chosen)
        if not layers:
            raise CamanimError("the explanation has no layer to animate")
        for m in names if fusion is None else (fusion.base,):
            missing = [layer.name for layer in layers if layer.name not in ex.maps[m]]
            if missing:
                raise CamanimError(f"method {m!r} has no map for layers {missing[:5]}: cannot animate it")
        chosen = {layer.name for layer in layers}
        skipped = tuple(
            sorted(
                [
                    (layer, reason)
                    for layer in ex.layers
                    if layer.name not in chosen and (reason := skip_reason(layer)) is not None
                ]
                + list(ex.passed_over),
                key=lambda item: item[0].index,
            )
        )
        road_t = None
        if road is not None:
            road_t = {}
            for m, scores in road.items():
                if m not in names:
                    raise UnknownNameError("method", m, names, hint="road scores for a method not animated")
                values = tuple(float(v) for v in scores)
                if len(values) != len(layers):
                    raise CamanimError(f"road[{m!r}] has {len(values)} scores for {len(layers)} kept layers")
                road_t[m] = values
        in_hw = (int(ex.input.shape[-2]), int(ex.input.shape[-1]))
        stats = {m: _layer_stats(ex, fusion, m, layers, sample) for m in names}
        granges = {m: Range(min(s.min for s in st), max(s.max for s in st)) for m, st in stats.items()}
        anim = cls(
            explanation=ex,
            methods=names,
            layers=layers,
            skipped=skipped,
            norms=norms,
            layouts=layouts,
            cmap=cmap,
            size=tile_size(size, in_hw),
            sample=sample,
            alpha=float(alpha),
            stats=stats,
            global_ranges=granges,
            global_all=Range(min(r.low for r in granges.values()), max(r.high for r in granges.values())),
            road=road_t,
            fps=int(fps) if fps else default_fps(len(layers)),
            style=style,
            request=dict(request) if request is not None else None,
            fusion=fusion,
        )
        anim._cache["timings"] = {"ranges": time.perf_counter() - t0}
        return anim

    # --------------------------------------------------------------------------------------- ranges

    def __len__(self) -> int:
        return len(self.layers)

    def local_ranges(self, method: str) -> tuple[Range, ...]:
        """Each kept layer's own range (local normalisation) for ``method``."""
        return tuple(s.range for s in self.stats[method])

    def range_for(self, method: str, norm: str, position: int) -> Range:
        """The range frame ``position`` of ``method`` is scaled by under ``norm``."""
        if norm == "local":
            return self.stats[method][position].range
        if norm == "global":
            return self.global_ranges[method]
        if norm == "global-all":
            return self.global_all
        raise UnknownNameError("normalisation", norm, NORMS)

    def flags(self, method: str, position: int) -> tuple[str, ...]:
        """Conditions of a frame's map: ``"flat"`` after ReLU, plus the explanation's flags (``no_gradient``...)."""
        source = method if self.fusion is None else self.fusion.base  # FM-G-CAM: its base maps' flags
        extra = self.explanation.flags.get(source, {}).get(self.layers[position].name, ())
        own = ("flat",) if self.stats[method][position].flat else ()
        return own + tuple(f for f in extra if f != "flat")

    def normalized(
        self,
        method: str,
        norm: str = "local",
        positions: Sequence[int] | slice | None = None,
        size: tuple[int, int] | None = None,
    ) -> np.ndarray:
        """Normalised maps, as shown in the frames.

        Args:
            method: an animated method.
            norm: ``"local"``, ``"global"`` or ``"global-all"``.
            positions: frame positions (default all; mind memory: ``N * H * W`` float32).
            size: output ``(H, W)``; default the tile size.

        Returns:
            ``(n, H, W)`` float32 in ``[0, 1]``; 1 only where a map reaches its range's maximum. FM-G-CAM:
            ``(n, K, H, W)``, each class's intensity.
        """
        pos = resolve_positions(len(self.layers), positions)
        stack = shrink(raw_stack(self, method, pos), size or self.size)
        return normalize_stack(stack, [self.range_for(method, norm, p) for p in pos])

    def videos(self) -> list[tuple[str | None, str]]:
        """``(method, layout)`` of every video :meth:`save` writes (method None for the grid)."""
        out: list[tuple[str | None, str]] = []
        for layout in self.layouts:
            if layout == "grid":
                out.append((None, layout))
            else:
                out.extend((m, layout) for m in self.methods)
        return out

    @staticmethod
    def video_name(method: str | None, layout: str, fmt: str) -> str:
        """Bundle-relative output name: ``<method>_<layout>.mp4``/``.gif``, ``<method>_<layout>_frames/``."""
        stem = f"{method}_{layout}" if method else layout
        return f"{stem}_frames" if fmt == "frames" else f"{stem}.{fmt}"

    def fingerprint(self) -> str:
        """A hash of everything the videos depend on (input, maps, targets, layers, render settings)."""
        if "fingerprint" not in self._cache:
            self._cache["fingerprint"] = fingerprint_of(self)
        return self._cache["fingerprint"]


def default_fps(n_frames: int, target_seconds: float = 10.0, lo: int = 2, hi: int = 30) -> int:
    """Frame rate that plays ``n_frames`` in about ``target_seconds``, clamped to ``[lo, hi]``.

    A 150-layer network gives 15 fps (10 s); an 8-layer AlexNet plays at ``lo`` fps so each layer stays
    readable.

    Args:
        n_frames: Number of frames (layers).
        target_seconds: Desired duration in seconds.
        lo: Slowest rate in frames per second.
        hi: Fastest rate in frames per second.
    """
    if target_seconds <= 0 or lo < 1 or hi < lo:
        raise ValueError(f"need target_seconds > 0 and 1 <= lo <= hi, got {target_seconds}, {lo}, {hi}")
    return int(min(hi, max(lo, round(n_frames / target_seconds))))


def _hash_arrays(h: Any, arrays: Sequence[np.ndarray]) -> None:
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.data)


def fingerprint_of(anim: Animation) -> str:
    """A SHA-1 hex digest of everything the videos depend on (input, maps, targets, layers, render settings)."""
    ex = anim.explanation
    h = hashlib.sha1()
    _hash_arrays(h, [ex.input.numpy()])
    for m in anim.methods if anim.fusion is None else (anim.fusion.base,):
        _hash_arrays(h, [ex.maps[m][layer.name].numpy() for layer in anim.layers])
    settings = {
        "methods": anim.methods,
        "layers": [layer.name for layer in anim.layers],
        "targets": ex.targets,
        "sample": anim.sample,
        "norms": anim.norms,
        "cmap": anim.cmap,
        "size": anim.size,
        "alpha": anim.alpha,
        "fps": anim.fps,
        "road": anim.road,
        "style": repr(anim.style),
    }
    if anim.fusion is not None:
        settings["fmgcam"] = [anim.fusion.base, anim.fusion.activation, anim.fusion.norm]
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


def animation_request(
    lm: LoadedModel,
    *,
    methods: str | Sequence[str],
    layers: LayerSpec,
    target: Any,
    score: str,
    keep_nonspatial: bool,
    fused: FusedOptions | None,
    input_size: InputSize = None,
    method_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What an animation asks of the model (recorded in the bundle and compared when a run resumes);
    ``method_options`` (seed, smoothing, per-method options) only when they differ from the defaults."""
    request = {
        "model": lm.name,
        "weights": lm.weights,
        "methods": methods if isinstance(methods, str) else list(methods),
        "layers": layers if isinstance(layers, (str, int)) or layers is None else repr(layers),
        "target": target
        if target is None or isinstance(target, (str, int))
        else target.describe()
        if hasattr(target, "describe")
        else list(target)
        if isinstance(target, (list, tuple))
        else repr(target),
        "score": score,
        "keep_nonspatial": keep_nonspatial,
    }
    if parse_input_size(input_size) is not None:
        request["input_size"] = str(input_size)
    if fused is not None:
        request |= fused.request()
    chosen = {k: v for k, v in (method_options or {}).items() if v != METHOD_DEFAULTS.get(k)}
    if chosen:
        request["method_options"] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in chosen.items()}
    return request


#: :func:`animate`'s method options and their defaults (those of :func:`camanim.explain`).
METHOD_DEFAULTS: dict[str, Any] = {"seed": 0, "eigen_smooth": False, "aug_smooth": False, "options": {}}


def animate(
    model: LoadedModel | nn.Module | str = DEFAULT_MODEL,
    image: Any = "chelsea",
    *,
    methods: str | Sequence[str] = "gradcam",
    target: int | str | Sequence[int | str] | None = None,
    layers: LayerSpec = "all",
    norm: str | Sequence[str] = ("local", "global"),
    layout: str | Sequence[str] = "side-by-side",
    cmap: str = "jet",
    size: int | tuple[int, int] | None = None,
    keep_nonspatial: bool = False,
    road: Mapping[str, Sequence[float]] | None = None,
    alpha: float = 0.5,
    sample: int = 0,
    score: str = "logit",
    fps: int | None = None,
    style: Any = None,
    device: str | torch.device | None = None,
    input_size: InputSize = None,
    explanation: Explanation | None = None,
    top_k: int | None = None,
    base: str | None = None,
    activation: str | None = None,
    seed: int = 0,
    eigen_smooth: bool = False,
    aug_smooth: bool = False,
    options: Mapping[str, Any] | None = None,
) -> Animation:
    """Explain every chosen layer with every method in one capture, and prepare its CAManim animation.

    Args:
        model: a :class:`~camanim.models.LoadedModel`, an ``nn.Module`` or a model name.
        image: an image source or a preprocessed tensor (see :func:`camanim.explain`).
        methods: method names (``"gradcam,hirescam"``), ``"all"`` or a list; or ``"fmgcam"`` alone:
            FM-G-CAM, the ``top_k`` most probable classes fused into one map per layer, each in its hue
            (every layer from the one K-class capture of ``explain(top_k=K)``; see :mod:`camanim.fused_frames`).
        target: the class to explain (index or name); default the top-1 class. Not with ``"fmgcam"``. Or a
            task target (see :func:`camanim.explain`); with ``K`` targets of the image (``each=True``, a list)
            the explanation's rows are the targets and ``sample`` picks the one animated.
        layers: layer selection (see :func:`camanim.layers.select_layers`); default every spatial layer.
        norm: normalisations shown side by side: ``"local"``, ``"global"``, ``"global-all"``.
        layout: ``"side-by-side"`` (default), ``"local"``, ``"global"``, ``"grid"``, or several.
        cmap: a matplotlib colour map name (``"jet"`` as in the paper).
        size: tile size in pixels (longer side) or ``(H, W)``; default the input size.
        keep_nonspatial: ask the engine for 1x1 layers too (they are otherwise recorded as skipped).
        road: per method, one ROAD score per kept layer (ybROAD), shown in captions and the progress strip.
        alpha: weight of the colour map over the image.
        sample: which sample of a batch to animate.
        score: what is differentiated: ``"logit"``, ``"probability"`` or ``"sigmoid"``.
        fps: frames per second of saved videos; default plays in about 10 s.
        style: frame look.
        device: where to run the model.
        input_size: the input size instead of the model's: ``N``, ``(H, W)``, ``"HxW"`` or ``"native"`` (see
            :func:`camanim.pipelines.explain.prepare_input`).
        explanation: the raw maps to animate, already computed for this request (e.g. read back from an
            interrupted run's bundle by :func:`camanim.outputs.animation.animate` with ``reuse``); the
            model is then not run.
        top_k, base, activation: FM-G-CAM only: number of classes (default 3), base method (default
            ``"gradcam"``) and Eq 6's activation (``"relu"``, the default, ``"elu"`` or ``"gelu"``).
        seed, eigen_smooth, aug_smooth, options: the methods' options, as :func:`camanim.explain` takes
            them (noise seed, grad-cam's two smoothings, per-method options such as ``samples``).

    Returns:
        An :class:`Animation`; call :meth:`Animation.save` to write the bundle.

    Raises:
        FusionError: ``"fmgcam"`` mixed with other methods or given a target, or FM-G-CAM options without it.
    """
    fused = fused_options(methods, top_k=top_k, base=base, activation=activation, target=target)
    check_animation_options(norm=norm, layout=layout, cmap=cmap, size=size, fps=fps)  # before the model runs
    lm = as_loaded(model, device)
    method_options = {"seed": seed, "eigen_smooth": eigen_smooth, "aug_smooth": aug_smooth}
    method_options["options"] = dict(options or {})
    request = animation_request(
        lm, methods=methods, layers=layers, target=target, score=score, keep_nonspatial=keep_nonspatial,
        fused=fused, input_size=input_size, method_options=method_options,
    )  # fmt: skip
    ex = explanation
    if ex is None:
        ex = explain(
            lm, image, methods=methods if fused is None else fused.base, layers=layers, target=target,
            top_k=None if fused is None else fused.k, score=score, keep_nonspatial=keep_nonspatial,
            device=device, input_size=input_size, **method_options,
        )  # fmt: skip
    return Animation.from_explanation(
        ex,
        methods=None if fused is None else FMGCAM,
        base=None if fused is None else fused.base,
        activation=None if fused is None else fused.activation,
        multilabel=score == "sigmoid",
        norm=norm,
        layout=layout,
        cmap=cmap,
        size=size,
        sample=sample,
        alpha=alpha,
        road=road,
        fps=fps,
        style=style,
        request=request,
    )
