"""CAManim: the class activation map of every layer, animated in forward order.

CAManim (Kaczmarek et al., PLOS ONE 2024) shows one frame per layer so a viewer sees how the network arrives
at its final map. Each frame shows the map twice (paper, "Global- vs. Local-Level Normalization"):

* **local**: scaled by the layer's own minimum and maximum (where does this layer look?);
* **global**: scaled by the minimum and maximum over every kept layer of the method (which layer activates
  most strongly?), so only the layer holding the network-wide maximum reaches the top colour; optionally
  **global-all**, one range across all methods.

Both start from the method's raw map after its ReLU, bilinearly upsampled to the input size, exactly as
:meth:`camanim.explanation.Explanation.upsampled` computes it (the paper's code min-max scaled each layer
before its "global" step, which made its global videos identical to its local ones).

``methods="fmgcam"`` animates FM-G-CAM, the top-K classes fused into one map per layer, one hue per class
(:mod:`camanim.fused_frames`: its ranges, legend and the treatment of ELU/GELU negatives).

This module holds :class:`Animation` (its ranges and normalisation, the bundle writer) and :func:`animate`.
The rest lives beside it: :mod:`camanim.frames` renders the frames of every layout (vectorised: all layers
of one native size upsampled in one call, normalised and coloured as arrays, a
:class:`~camanim.render.FrameComposer` built once per video); :mod:`camanim.figures` makes ``strip.png``,
``params.png`` and ``layers.csv``; :mod:`camanim.resume` stages what an interrupted save needs to go on.
Frames stream into ffmpeg (:mod:`camanim.video`).

Example:
    >>> import camanim
    >>> anim = camanim.animate(image="chelsea", methods="gradcam")  # doctest: +SKIP
    >>> anim.save("out/chelsea")  # doctest: +SKIP
    >>> next(anim.frames()).shape  # doctest: +SKIP
    (368, 472, 3)
"""

from __future__ import annotations

import base64
import dataclasses
import html
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from camanim import figures, frames
from camanim.compute.layers import Layer, LayerSpec
from camanim.compute.models import DEFAULT_MODEL, LoadedModel
from camanim.compute.normalize import Range
from camanim.compute.resize import shrink
from camanim.errors import CamanimError, OptionError, UnknownNameError
from camanim.figures import PERCENTILES, Strip
from camanim.frames import CHUNK, LAYOUTS, method_stack, normalize_stack, raw_stack, resolve_positions
from camanim.fused_frames import FMGCAM, describe_fusion, fused_options
from camanim.outputs.bundle import Bundle, open_bundle
from camanim.outputs.render import FrameComposer, FrameStyle, colormap_lut
from camanim.outputs.video import FORMATS, default_fps, open_writer
from camanim.pipelines.explain import Explanation, as_loaded, explain, prepare_input
from camanim.pipelines.fmgcam import FMGCAMResult
from camanim.resume import STATE_FILE as STATE_FILE
from camanim.resume import fingerprint_of, load_staged, matches_staged, stage_explanation

__all__ = ["LAYOUTS", "NORMS", "PERCENTILES", "Animation", "LayerStats", "Strip", "animate"]

logger = logging.getLogger(__name__)

NORMS = ("local", "global", "global-all")
ProgressCallback = Callable[[int, int, str], None]


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


# ------------------------------------------------------------------------------------------------ helpers


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
    formats: str | Sequence[str] = ("mp4",),
    cmap: str = "jet",
    size: int | tuple[int, int] | None = None,
    fps: int | None = None,
) -> None:
    """Check an animation's rendering options before any model runs (the same parsers as the renderer).

    Raises:
        UnknownNameError: an unknown normalisation, layout, video format or colour map.
        OptionError: an empty list, a tile size under 8 pixels or a frame rate under 1.
    """
    _parse_choice(norm, NORMS, "normalisation")
    _parse_choice(layout, LAYOUTS, "layout")
    _parse_choice(formats, FORMATS, "video format")
    colormap_lut(cmap)
    if size is not None:
        frames.tile_size(size, (224, 224))
    if fps is not None and not int(fps) >= 1:
        raise OptionError(f"fps must be at least 1, got {fps}")


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
    for start in range(0, n, CHUNK):
        pos = range(start, min(n, start + CHUNK))
        stack = method_stack(ex, fusion, method, layers, pos, sample).reshape(len(pos), -1)
        lo, hi = stack.min(axis=1), stack.max(axis=1)
        mean = stack.mean(axis=1, dtype=np.float64)
        for a, b, c in zip(lo, hi, mean, strict=True):
            r = Range(float(a), float(b))
            out.append(LayerStats(r.low, r.high, float(c), r.is_flat()))
    return tuple(out)


# ---------------------------------------------------------------------------------------------- Animation


@dataclass(frozen=True)
class Animation:
    """A CAManim animation of one explanation: ranges, frames, strip figure, layer table and bundle writer.

    Build it with :func:`animate` or :meth:`from_explanation`; nothing is rendered until frames are asked for.

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
        style: frame look.
        request: what produced the explanation (model, image, methods, layers, target), used by ``reuse``.
        fusion: with ``methods == ("fmgcam",)``, FM-G-CAM of the explanation (a top-K capture): its fused
            ``(K, h, w)`` map per layer, classes and colours (see :mod:`camanim.fused_frames`); else None.
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
    style: FrameStyle = field(default_factory=FrameStyle, repr=False)
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
        style: FrameStyle | None = None,
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
            style: frame look (:class:`~camanim.render.FrameStyle`).
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
        colormap_lut(cmap)  # fail early on an unknown colour map
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        b = ex.input.shape[0]
        if not 0 <= sample < b:
            raise ValueError(f"sample must be in 0..{b - 1}, got {sample}")
        layers = tuple(ex.chosen)
        if not layers:
            raise CamanimError("the explanation has no layer to animate")
        for m in names if fusion is None else (fusion.base,):
            missing = [layer.name for layer in layers if layer.name not in ex.maps[m]]
            if missing:
                raise CamanimError(f"method {m!r} has no map for layers {missing[:5]}: cannot animate it")
        chosen = {layer.name for layer in layers}
        skipped = tuple(
            (layer, reason)
            for layer in ex.layers
            if layer.name not in chosen and (reason := skip_reason(layer)) is not None
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
            size=frames.tile_size(size, in_hw),
            sample=sample,
            alpha=float(alpha),
            stats=stats,
            global_ranges=granges,
            global_all=Range(min(r.low for r in granges.values()), max(r.high for r in granges.values())),
            road=road_t,
            fps=int(fps) if fps else default_fps(len(layers)),
            style=style or FrameStyle(),
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

    # ------------------------------------------------------------------------------------- rendering

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

    def overlays(
        self,
        method: str,
        norm: str = "local",
        positions: Sequence[int] | slice | None = None,
        size: tuple[int, int] | None = None,
    ) -> np.ndarray:
        """The coloured maps over the image, as the tiles of the frames: ``(n, H, W, 3)`` uint8."""
        return frames.overlays(self, method, norm, positions, size)

    def target_text(self) -> str:
        """``"target <name> (p=<probability>)"`` of the animated sample (FM-G-CAM: its K classes' summary)."""
        return frames.target_text(self)

    def caption(self, method: str | None, position: int) -> list[str]:
        """Caption lines of frame ``position``: layer index/total and name; module type and native map size;
        method(s), target class and probability; flags and ROAD (:func:`camanim.frames.caption`)."""
        return frames.caption(self, method, position)

    def _composers(self, method: str | None, layout: str) -> list[tuple[str, FrameComposer]]:
        """One composer per video row (:func:`camanim.frames.composers`)."""
        return frames.composers(self, method, layout)

    def frames(
        self, method: str | None = None, layout: str | None = None, positions: Sequence[int] | None = None
    ) -> Iterator[np.ndarray]:
        """Render frames one by one, in forward order.

        Args:
            method: an animated method (default the first); ignored by the ``"grid"`` layout.
            layout: ``"side-by-side"``, ``"local"``, ``"global"`` or ``"grid"`` (default the first of
                ``layouts``).
            positions: frame positions to render (default all).

        Yields:
            ``(Hf, Wf, 3)`` uint8 RGB frames of one fixed, even size.
        """
        return frames.render(self, method, layout, positions)

    def frame(self, position: int, method: str | None = None, layout: str | None = None) -> np.ndarray:
        """Render the single frame at ``position`` (negative counts from the end)."""
        return next(self.frames(method, layout, [position]))

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

    # ---------------------------------------------------------------------------------- figures

    def strip(self, tile: int = 112) -> Strip:
        """The strip figure: layers at depth 0, 10, ..., 100 %, one row per method and normalisation.

        Args:
            tile: tile size in pixels (longer side).

        Returns:
            A :class:`Strip`; its ``image`` has 11 columns per row.
        """
        return figures.strip(self, tile)

    def layer_table(self) -> list[dict[str, Any]]:
        """One row per layer of ``layers.csv`` (columns: :func:`camanim.figures.layer_table`)."""
        return figures.layer_table(self)

    def layer_csv(self) -> str:
        """:meth:`layer_table` as CSV text."""
        return figures.layer_csv(self)

    def params_png(self, dpi: int = 110) -> bytes:
        """The parameters of each kept layer on a log scale (paper Fig 3), as PNG bytes (matplotlib)."""
        return figures.params_png(self, dpi)

    # -------------------------------------------------------------------------------------- saving

    def fingerprint(self) -> str:
        """A hash of everything the videos depend on (input, maps, targets, layers, render settings)."""
        if "fingerprint" not in self._cache:
            self._cache["fingerprint"] = fingerprint_of(self)
        return self._cache["fingerprint"]

    def describe(self) -> dict[str, Any]:
        """The manifest's ``animation`` section: settings, ranges per method and per frame, skipped layers."""
        return {
            "methods": list(self.methods),
            "norms": list(self.norms),
            "layouts": list(self.layouts),
            "colormap": self.cmap,
            "alpha": self.alpha,
            "tile_size": list(self.size),
            "sample": self.sample,
            "fps": self.fps,
            "frames": len(self.layers),
            "normalisation": (
                "maps after the method's ReLU, bilinearly upsampled to the input size; local: each layer's "
                "own min/max; global: min/max over all kept layers of the method; global-all: over all methods"
            ),
            "global_ranges": {m: [r.low, r.high] for m, r in self.global_ranges.items()},
            "global_all_range": [self.global_all.low, self.global_all.high],
            "per_frame": [
                {
                    "frame": p,
                    "layer": layer.name,
                    "index": layer.index,
                    "ranges": {
                        m: {nm: [self.range_for(m, nm, p).low, self.range_for(m, nm, p).high] for nm in NORMS}
                        for m in self.methods
                    },
                    "flags": {m: list(self.flags(m, p)) for m in self.methods if self.flags(m, p)},
                }
                for p, layer in enumerate(self.layers)
            ],
            "skipped": [{"index": la.index, "name": la.name, "reason": r} for la, r in self.skipped],
            "road": {m: list(v) for m, v in self.road.items()} if self.road else None,
            "fmgcam": describe_fusion(self.fusion) if self.fusion is not None else None,
            "fingerprint": self.fingerprint(),
        }

    def save(
        self,
        out: str | os.PathLike[str],
        *,
        formats: str | Sequence[str] = ("mp4",),
        fps: int | None = None,
        force: bool = False,
        resume: bool = False,
        progress: bool | ProgressCallback = False,
        extras: bool = True,
        command: str = "",
        also: Callable[[Bundle], None] | None = None,
        finalize: Callable[[Bundle], None] | None = None,
    ) -> Path:
        """Write the animation bundle.

        Contents: ``manifest.json`` (written last; sections of :func:`camanim.explanation.describe` plus
        ``animation``), ``input.npy``, ``maps.npz`` (raw maps), ``input.png``, the videos
        (``<method>_<layout>.mp4``/``.gif`` or ``<method>_<layout>_frames/``; the grid is ``grid.*``),
        ``strip.png``, ``layers.csv`` and ``params.png``.

        Args:
            out: bundle folder.
            formats: any of ``"mp4"``, ``"gif"`` (~25x slower to encode, ~40x larger), ``"frames"``.
            fps: frames per second (default :attr:`fps`).
            force: replace an existing non-empty folder (once the new bundle is complete).
            resume: continue an interrupted run (its staging folder ``.NAME.partial``): videos already
                there are kept when they were rendered from the same maps and settings.
            progress: True draws a progress bar (rich) on stderr; a callable gets
                ``(frames done, frames total, current file)``.
            extras: write ``strip.png``, ``layers.csv`` and ``params.png``.
            command: the command line recorded in the manifest.
            also: writes more artifacts into the same bundle before its manifest (e.g. ybROAD files).
            finalize: writes files derived from the staged bundle and its manifest (``report.html``) before
                it is published (see :func:`camanim.bundle.open_bundle`).

        Returns:
            The bundle's path.

        Raises:
            BundleExistsError: ``out`` exists and is not empty, and neither ``force`` nor ``resume`` is given.
        """
        fmts = _parse_choice(formats, FORMATS, "video format")
        fps = int(fps) if fps else self.fps
        if fps != self.fps:
            return dataclasses.replace(self, fps=fps, _cache={}).save(
                out,
                formats=fmts,
                force=force,
                resume=resume,
                progress=progress,
                extras=extras,
                command=command,
                also=also,
                finalize=finalize,
            )
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        with open_bundle(
            out, force=force, resume=resume, resumable=True, command=command, finalize=finalize
        ) as bundle:
            same = resume and matches_staged(self, bundle.path)
            t = time.perf_counter()
            stage_explanation(self, bundle, keep=same)
            bundle.manifest.pop("overlays", None)
            timings["explanation_files"] = time.perf_counter() - t
            jobs = [(m, lay) for m, lay in self.videos()]
            todo = []
            written = []
            for m, lay in jobs:
                rels = [self.video_name(m, lay, f) for f in fmts]
                for rel, f in zip(rels, fmts, strict=True):
                    bundle.file(rel, f"{f} video")
                    written.append(
                        {"file": rel, "method": m, "layout": lay, "format": f, "frames": len(self)}
                    )
                need = [
                    (rel, f) for rel, f in zip(rels, fmts, strict=True) if not (same and bundle.exists(rel))
                ]
                kept = [rel for rel in rels if rel not in {r for r, _ in need}]
                if kept:
                    logger.info("kept from the earlier run: %s", ", ".join(kept))
                if need:
                    todo.append((m, lay, need))
            t = time.perf_counter()
            self._encode(bundle, todo, fps, progress)
            timings["render_encode"] = time.perf_counter() - t
            t = time.perf_counter()
            if extras:
                figures.write_figures(self, bundle, skip_existing=same)
            if also is not None:
                also(bundle)
            timings["extras"] = time.perf_counter() - t
            bundle.manifest["animation"] = self.describe() | {
                "fps": fps,
                "videos": written,
                "frames_rendered": len(todo) * len(self),
                "strip": (
                    {"file": "strip.png", "percentiles": list(PERCENTILES), "columns": len(PERCENTILES)}
                    if extras
                    else None
                ),
                "table": "layers.csv" if extras else None,
                "params_plot": "params.png" if extras else None,
                "timings": timings | {"total": time.perf_counter() - t0},
            }
            bundle.manifest.setdefault("timings", {})["animation"] = time.perf_counter() - t0
        self._cache["last_timings"] = timings
        return bundle.root

    def _encode(
        self,
        bundle: Bundle,
        todo: Sequence[tuple[str | None, str, Sequence[tuple[str, str]]]],
        fps: int,
        progress: bool | ProgressCallback,
    ) -> None:
        total = len(todo) * len(self)
        bar = _ProgressBar(total) if progress is True else None
        callback = progress if callable(progress) else None
        done = 0
        try:
            for m, lay, need in todo:
                writers = []
                try:
                    for rel, f in need:
                        writers.append(open_writer(bundle.path / rel, fps, f))  # type: ignore[arg-type]
                    for frame in self.frames(m, lay):
                        for w in writers:
                            w.write(frame)
                        done += 1
                        if bar is not None:
                            bar.advance(need[0][0])
                        if callback is not None:
                            callback(done, total, need[0][0])
                    for w in writers:
                        w.close()
                except BaseException:
                    for w in writers:
                        w.abort()
                    raise
        finally:
            if bar is not None:
                bar.close()

    # -------------------------------------------------------------------------------------- notebook

    def _repr_html_(self) -> str:
        """The interactive report viewer (layer slider, method selector, local/global) for Jupyter."""
        if "html" not in self._cache:
            from camanim.outputs.report import animation_html

            self._cache["html"] = animation_html(self)
        return self._cache["html"]

    def video_html(self) -> str:
        """An inline HTML5 video (base64 MP4) of the first layout of the first method."""
        method, layout = self.videos()[0]
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "anim.mp4"
            with open_writer(path, self.fps, "mp4") as w:
                for frame in self.frames(method, layout):
                    w.write(frame)
            data = base64.b64encode(path.read_bytes()).decode("ascii")
        label = f"CAManim: {method or ', '.join(self.methods)} · {layout} · {len(self)} layers"
        return (
            f'<figure style="margin:0"><video controls loop autoplay muted playsinline '
            f'src="data:video/mp4;base64,{data}"></video><figcaption>{html.escape(label)}</figcaption></figure>'
        )


# ------------------------------------------------------------------------------------------- progress


class _ProgressBar:
    """A rich progress bar over frames, on stderr."""

    def __init__(self, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._p = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            transient=True,
        )
        self._task = self._p.add_task("rendering", total=total)
        self._p.start()

    def advance(self, label: str) -> None:
        self._p.update(self._task, advance=1, description=label)

    def close(self) -> None:
        self._p.stop()


# ---------------------------------------------------------------------------------------------- animate


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
    style: FrameStyle | None = None,
    device: str | torch.device | None = None,
    reuse: str | os.PathLike[str] | None = None,
    top_k: int | None = None,
    base: str | None = None,
    activation: str | None = None,
) -> Animation:
    """Explain every chosen layer with every method in one capture, and prepare its CAManim animation.

    Args:
        model: a :class:`~camanim.models.LoadedModel`, an ``nn.Module`` or a model name.
        image: an image source or a preprocessed tensor (see :func:`camanim.explain`).
        methods: method names (``"gradcam,hirescam"``), ``"all"`` or a list; or ``"fmgcam"`` alone:
            FM-G-CAM, the ``top_k`` most probable classes fused into one map per layer, each in its hue
            (every layer from the one K-class capture of ``explain(top_k=K)``; see :mod:`camanim.fused_frames`).
        target: the class to explain (index or name); default the top-1 class. Not with ``"fmgcam"``.
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
        reuse: a bundle folder of an interrupted (or finished) run: its raw maps are loaded instead of
            running the model when they were made with the same model, weights, image, methods, layers,
            target and score.
        top_k, base, activation: FM-G-CAM only: number of classes (default 3), base method (default
            ``"gradcam"``) and Eq 6's activation (``"relu"``, the default, ``"elu"`` or ``"gelu"``).

    Returns:
        An :class:`Animation`; call :meth:`Animation.save` to write the bundle.

    Raises:
        FusionError: ``"fmgcam"`` mixed with other methods or given a target, or FM-G-CAM options without it.
    """
    fused = fused_options(methods, top_k=top_k, base=base, activation=activation, target=target)
    check_animation_options(norm=norm, layout=layout, cmap=cmap, size=size, fps=fps)  # before the model runs
    k = None if fused is None else fused.k
    lm = as_loaded(model, device)
    request = {
        "model": lm.name,
        "weights": lm.weights,
        "methods": methods if isinstance(methods, str) else list(methods),
        "layers": layers if isinstance(layers, (str, int)) or layers is None else repr(layers),
        "target": target if target is None or isinstance(target, (str, int)) else list(target),
        "score": score,
        "keep_nonspatial": keep_nonspatial,
    }
    if fused is not None:
        request |= fused.request()
    ex = None
    if reuse is not None:
        x, _, _ = prepare_input(image, lm)
        if k is not None:  # a top-K explanation holds one row per class, each the same image
            x = x.expand(k, *x.shape[1:])
        ex = load_staged(reuse, request, x)
        if ex is not None:
            logger.info("reusing the raw maps in %s: the model is not run", reuse)
    if ex is None:
        ex = explain(
            lm, image, methods=methods if fused is None else fused.base, layers=layers, target=target,
            top_k=k, score=score, keep_nonspatial=keep_nonspatial, device=device,
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
