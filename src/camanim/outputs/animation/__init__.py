"""CAManim's outputs: frames, videos, the strip figure, the layer table and the resumable bundle.

An :class:`~camanim.pipelines.animate.Animation` holds what every frame shows and its ranges; this package
draws and writes it. :mod:`.frames` renders the frames of every layout, :mod:`.figures` makes
``strip.png``, ``params.png`` and ``layers.csv``, :mod:`.fused` adds FM-G-CAM's legend, :mod:`.resume`
stages what an interrupted save needs to go on, and this module writes the bundle
(:func:`save_animation`, also ``Animation.save``) with frames streamed into ffmpeg
(:mod:`camanim.outputs.video`). :func:`animate` is the pipeline's
:func:`~camanim.pipelines.animate.animate` that can also reuse an interrupted run's maps.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from camanim.errors import OptionError, UnknownNameError
from camanim.outputs.animation.figures import PERCENTILES, write_figures
from camanim.outputs.animation.frames import render
from camanim.outputs.animation.fused import describe_fusion
from camanim.outputs.animation.resume import load_staged, matches_staged, stage_explanation
from camanim.outputs.animation.volume import describe_volume, is_volume
from camanim.outputs.bundle import Bundle, open_bundle
from camanim.outputs.report.notebook import animation_html
from camanim.outputs.video import FORMATS, open_writer
from camanim.pipelines.animate import (
    METHOD_DEFAULTS,
    NORMS,
    Animation,
    animation_request,
    fused_options,
)
from camanim.pipelines.animate import animate as animate_maps
from camanim.pipelines.explain import as_loaded, prepare_input

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, str], None]


def parse_formats(formats: str | Sequence[str]) -> tuple[str, ...]:
    """Video formats from ``"mp4,gif"`` or a list, each one of :data:`~camanim.outputs.video.FORMATS`.

    Raises:
        UnknownNameError: an unknown format (close matches listed); OptionError: none given.
    """
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    out: list[str] = []
    for item in (str(i).strip() for i in items):
        if not item:
            continue
        if item not in FORMATS:
            raise UnknownNameError("video format", item, FORMATS)
        if item not in out:
            out.append(item)
    if not out:
        raise OptionError(f"need at least one video format, one of {', '.join(FORMATS)}")
    return tuple(out)


def animate(
    model: Any = "efficientnet_lite0",
    image: Any = "chelsea",
    *,
    reuse: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> Animation:
    """:func:`camanim.pipelines.animate.animate`, or with ``reuse`` the maps of an earlier run.

    Args:
        model, image, kwargs: as :func:`camanim.pipelines.animate.animate`.
        reuse: a bundle folder of an interrupted (or finished) run: its raw maps are loaded instead of
            running the model when they were made with the same model, weights, image, methods, layers,
            target and score.
    """
    if reuse is None:
        return animate_maps(model, image, **kwargs)
    fmgcam = {k: kwargs.get(k) for k in ("top_k", "base", "activation")}
    fused = fused_options(kwargs.get("methods", "gradcam"), target=kwargs.get("target"), **fmgcam)
    lm = as_loaded(model, kwargs.get("device"))
    request = animation_request(
        lm,
        methods=kwargs.get("methods", "gradcam"),
        layers=kwargs.get("layers", "all"),
        target=kwargs.get("target"),
        score=kwargs.get("score", "logit"),
        keep_nonspatial=kwargs.get("keep_nonspatial", False),
        fused=fused,
        input_size=kwargs.get("input_size"),
        method_options={k: kwargs.get(k, v) for k, v in METHOD_DEFAULTS.items()},
    )
    x, _, _ = prepare_input(image, lm, kwargs.get("input_size"))
    if fused is not None:  # a top-K explanation holds one row per class, each the same image
        x = x.expand(fused.k, *x.shape[1:])
    ex = load_staged(reuse, request, x)
    if ex is not None:
        logger.info("reusing the raw maps in %s: the model is not run", reuse)
    return animate_maps(lm, image, explanation=ex, **kwargs)


def describe_animation(anim: Animation) -> dict[str, Any]:
    """The manifest's ``animation`` section: settings, ranges per method and per frame, skipped layers."""
    return {
        "methods": list(anim.methods),
        "norms": list(anim.norms),
        "layouts": list(anim.layouts),
        "colormap": anim.cmap,
        "alpha": anim.alpha,
        "tile_size": list(anim.size),
        "sample": anim.sample,
        "fps": anim.fps,
        "frames": len(anim.layers),
        "normalisation": (
            "maps after the method's ReLU, bilinearly upsampled to the input size; local: each layer's "
            "own min/max; global: min/max over all kept layers of the method; global-all: over all methods"
        ),
        "global_ranges": {m: [r.low, r.high] for m, r in anim.global_ranges.items()},
        "global_all_range": [anim.global_all.low, anim.global_all.high],
        "per_frame": [
            {
                "frame": p,
                "layer": layer.name,
                "index": layer.index,
                "ranges": {
                    m: {nm: [anim.range_for(m, nm, p).low, anim.range_for(m, nm, p).high] for nm in NORMS}
                    for m in anim.methods
                },
                "flags": {m: list(anim.flags(m, p)) for m in anim.methods if anim.flags(m, p)},
            }
            for p, layer in enumerate(anim.layers)
        ],
        "skipped": [{"index": la.index, "name": la.name, "reason": r} for la, r in anim.skipped],
        "road": {m: list(v) for m, v in anim.road.items()} if anim.road else None,
        "fmgcam": describe_fusion(anim.fusion) if anim.fusion is not None else None,
        "fingerprint": anim.fingerprint(),
        "volume": describe_volume(anim) if is_volume(anim) else None,
    }


def save_animation(
    anim: Animation,
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
    fmts = parse_formats(formats)
    fps = int(fps) if fps else anim.fps
    if fps != anim.fps:
        return dataclasses.replace(anim, fps=fps, _cache={}).save(
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
        same = resume and matches_staged(anim, bundle.path)
        t = time.perf_counter()
        stage_explanation(anim, bundle, keep=same)
        bundle.manifest.pop("overlays", None)
        timings["explanation_files"] = time.perf_counter() - t
        jobs = [(m, lay) for m, lay in anim.videos()]
        todo = []
        written = []
        for m, lay in jobs:
            rels = [anim.video_name(m, lay, f) for f in fmts]
            for rel, f in zip(rels, fmts, strict=True):
                bundle.file(rel, f"{f} video")
                written.append({"file": rel, "method": m, "layout": lay, "format": f, "frames": len(anim)})
            need = [(rel, f) for rel, f in zip(rels, fmts, strict=True) if not (same and bundle.exists(rel))]
            kept = [rel for rel in rels if rel not in {r for r, _ in need}]
            if kept:
                logger.info("kept from the earlier run: %s", ", ".join(kept))
            if need:
                todo.append((m, lay, need))
        t = time.perf_counter()
        _encode(anim, bundle, todo, fps, progress)
        timings["render_encode"] = time.perf_counter() - t
        t = time.perf_counter()
        if extras:
            write_figures(anim, bundle, skip_existing=same)
        if also is not None:
            also(bundle)
        timings["extras"] = time.perf_counter() - t
        bundle.manifest["animation"] = describe_animation(anim) | {
            "fps": fps,
            "videos": written,
            "frames_rendered": len(todo) * len(anim),
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
    anim._cache["last_timings"] = timings
    return bundle.root


def _encode(
    anim: Animation,
    bundle: Bundle,
    todo: Sequence[tuple[str | None, str, Sequence[tuple[str, str]]]],
    fps: int,
    progress: bool | ProgressCallback,
) -> None:
    total = len(todo) * len(anim)
    bar = _ProgressBar(total) if progress is True else None
    callback = progress if callable(progress) else None
    done = 0
    try:
        for m, lay, need in todo:
            writers = []
            try:
                for rel, f in need:
                    writers.append(open_writer(bundle.path / rel, fps, f))  # type: ignore[arg-type]
                for frame in render(anim, m, lay):
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


def animation_display_html(anim: Animation) -> str:
    """The interactive report viewer (layer slider, method selector, local/global) for Jupyter."""
    if "html" not in anim._cache:
        anim._cache["html"] = animation_html(anim)
    return anim._cache["html"]


def video_html(anim: Animation) -> str:
    """An inline HTML5 video (base64 MP4) of the first layout of the first method."""
    method, layout = anim.videos()[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "anim.mp4"
        with open_writer(path, anim.fps, "mp4") as w:
            for frame in render(anim, method, layout):
                w.write(frame)
        data = base64.b64encode(path.read_bytes()).decode("ascii")
    label = f"CAManim: {method or ', '.join(anim.methods)} · {layout} · {len(anim)} layers"
    return (
        f'<figure style="margin:0"><video controls loop autoplay muted playsinline '
        f'src="data:video/mp4;base64,{data}"></video><figcaption>{html.escape(label)}</figcaption></figure>'
    )


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
