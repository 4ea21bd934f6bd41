"""The comparison grid drawn and written: overlays of every (method, layer), laid out under their titles.

:func:`tiles`, :func:`grid_image` and :func:`figure` draw a :class:`~camanim.pipelines.compare.Comparison`
(also its ``tiles``, ``image``, ``boxes``, ``figure()`` and ``save()``); :func:`read_road_source` and
:func:`check_road_source` bring ROAD values of a ``camanim road`` bundle to the tiles, refusing values
computed for another model, image or target.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from camanim.compute.normalize import normalize
from camanim.compute.targets import resolve_class
from camanim.errors import CamanimError
from camanim.outputs.render import colormap_lut, overlay, save_png
from camanim.pipelines.compare import Comparison, road_value, tile_title
from camanim.pipelines.explain import prepare_input

logger = logging.getLogger(__name__)

Box = tuple[int, int, int, int]


class RoadSourceError(CamanimError, ValueError):
    """ROAD results that are missing, unreadable or computed for another model, image or target."""


def tiles(comparison: Comparison) -> dict[tuple[str, str], np.ndarray]:
    """``tiles[(method, layer name)]``: the overlay ``(H, W, 3)`` uint8 of each map, scaled by its range."""
    if "tiles" not in comparison._cache:
        ex = comparison.explanation
        lut = colormap_lut(comparison.cmap)
        comparison._cache["tiles"] = {
            (m, layer.name): overlay(
                ex.display[0],
                normalize(ex.upsampled(m, layer.name)[0].numpy(), comparison.ranges[(m, layer.name)]),
                lut,
                comparison.alpha,
            )
            for m in comparison.methods
            for layer in comparison.layers
        }
    return comparison._cache["tiles"]


def grid_image(comparison: Comparison) -> tuple[np.ndarray, dict[tuple[str, str], Box]]:
    """The whole grid ``(Hg, Wg, 3)`` uint8 and where each tile lies in it: ``(top, left, bottom, right)``,
    exclusive ends."""
    if "grid" not in comparison._cache:
        t = tiles(comparison)
        titles = {key: tile_title(*key, comparison.road) for key in t}
        names = [layer.name for layer in comparison.layers]
        comparison._cache["grid"] = _compose(comparison.methods, names, t, titles, comparison.prediction)
    return comparison._cache["grid"]


def save(comparison: Comparison, path: str | os.PathLike) -> Path:
    """Write the grid image as a PNG (atomically)."""
    return save_png(path, grid_image(comparison)[0])


def figure(comparison: Comparison, *, tile_inches: float = 2.4) -> Figure:
    """The grid as a matplotlib ``Figure`` (one axes per tile; no pyplot state, displays in notebooks)."""
    rows, cols = comparison.shape
    fig = Figure(figsize=(cols * tile_inches, rows * (tile_inches + 0.4) + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for r, m in enumerate(comparison.methods):
        for c, layer in enumerate(comparison.layers):
            ax = axes[r][c]
            ax.imshow(tiles(comparison)[(m, layer.name)])
            ax.set_title("\n".join(comparison.title(m, layer.name)), fontsize=8)
            ax.set_axis_off()
    fig.suptitle(comparison.prediction, fontsize=10)
    return fig


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _compose(
    methods: Sequence[str],
    layers: Sequence[str],
    tiles: Mapping[tuple[str, str], np.ndarray],
    titles: Mapping[tuple[str, str], list[str]],
    header: str,
    font_size: int = 12,
    pad: int = 8,
    gap: int = 8,
) -> tuple[np.ndarray, dict[tuple[str, str], Box]]:
    """Lay the tiles out in a grid, each under its title lines, the header above; returns the image and boxes."""
    font = ImageFont.load_default(size=font_size)
    line = int(font.getbbox("Ág|")[3]) + 2
    th, tw = next(iter(tiles.values())).shape[:2]
    n_lines = max(len(t) for t in titles.values())
    cell_h = n_lines * line + 2 + th
    width = 2 * pad + len(layers) * tw + (len(layers) - 1) * gap
    top = pad + line + gap
    height = top + len(methods) * cell_h + (len(methods) - 1) * gap + pad
    width, height = width + width % 2, height + height % 2
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text(
        (width // 2, pad), _fit(draw, header, font, width - 2 * pad), font=font, fill=(0, 0, 0), anchor="ma"
    )
    boxes: dict[tuple[str, str], Box] = {}
    for r, m in enumerate(methods):
        y = top + r * (cell_h + gap)
        for c, layer in enumerate(layers):
            x = pad + c * (tw + gap)
            for i, text in enumerate(titles[(m, layer)]):
                draw.text(
                    (x + tw // 2, y + i * line),
                    _fit(draw, text, font, tw),
                    font=font,
                    fill=(0, 0, 0),
                    anchor="ma",
                )
            ty = y + n_lines * line + 2
            canvas.paste(Image.fromarray(tiles[(m, layer)]), (x, ty))
            boxes[(m, layer)] = (ty, x, ty + th, x + tw)
    return np.asarray(canvas).copy(), boxes


# --------------------------------------------------------------------------------------------- compare


@dataclass(frozen=True)
class RoadSource:
    """ROAD values read from a ybROAD bundle or JSON file, with what they were computed for.

    Attributes:
        path: where they were read from.
        values: ROAD per ``(method, layer name)``.
        model, weights: the model and weights they were computed with (None when the file does not say).
        target: the explained class index (None when not recorded).
        image: the image source as recorded (a path or sample name).
        input: the exact input tensor ``(B, 3, H, W)`` from the bundle's ``input.npy`` (None for a JSON file).
    """

    path: Path
    values: dict[tuple[str, str], float]
    model: str | None = None
    weights: str | None = None
    target: int | None = None
    image: str | None = None
    input: np.ndarray | None = field(default=None, repr=False)


def read_road_source(path: str | os.PathLike) -> RoadSource:
    """Read ROAD values and their provenance (see :func:`load_road` for the accepted shapes).

    Raises:
        RoadSourceError: the path does not exist, cannot be read, or holds no ROAD values.
    """
    p = Path(path)
    if not p.exists():
        raise RoadSourceError(f"--road {str(p)!r} does not exist: give a bundle written by `camanim road`")
    try:
        values = load_road(p)
        doc = json.loads((p / "manifest.json" if p.is_dir() else p).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RoadSourceError(
            f"cannot read ROAD results from {str(p)!r} ({exc}): give a bundle written by `camanim road` "
            "or its ybroad.json"
        ) from exc
    if not values:
        raise RoadSourceError(f"{str(p)!r} holds no ROAD values (written by `camanim road`?)")
    doc = doc if isinstance(doc, dict) else {}
    road = doc.get("road", doc) if isinstance(doc.get("road", doc), dict) else {}
    recorded = doc.get("model") if isinstance(doc.get("model"), dict) else {}
    model = road.get("model") or recorded.get("name")
    weights = road.get("weights") or recorded.get("weights")
    target = (road.get("target") or {}).get("class")
    if target is None and doc.get("targets"):
        target = doc["targets"][0].get("class")
    x = None
    if p.is_dir() and (p / "input.npy").is_file():
        x = np.load(p / "input.npy", allow_pickle=False)
    return RoadSource(
        path=p,
        values=values,
        model=model if isinstance(model, str) else None,
        weights=weights if isinstance(weights, str) else None,
        target=None if target is None else int(target),
        image=road.get("image"),
        input=x,
    )


def check_road_source(
    src: RoadSource, lm: Any, image: Any, target: Any = None, *, input_size: Any = None
) -> int | None:
    """Check that ROAD values were computed for this model, weights, input and target; return the target
    the comparison must explain (the ROAD run's own, unless one is given and equal).

    Raises:
        RoadSourceError: any of them differs (the message says which and how).
    """
    problems = []
    if src.model is not None and src.model != lm.name:
        problems.append(f"model {src.model!r}, not {lm.name!r}")
    if src.weights is not None and src.weights != lm.weights:
        problems.append(f"weights {src.weights!r}, not {lm.weights!r}")
    if src.input is not None:
        x, _, _ = prepare_input(image, lm, input_size)
        if src.input.shape != tuple(x.shape) or not np.allclose(src.input, x.numpy(), atol=1e-6):
            problems.append(f"another input image ({src.image or 'recorded in input.npy'})")
    else:
        logger.warning(
            "%s has no input.npy: cannot check that its ROAD values were computed on this image", src.path
        )
    if target is not None and src.target is not None and resolve_class(target, lm.class_names) != src.target:
        problems.append(f"target class {src.target}, not {resolve_class(target, lm.class_names)}")
    if problems:
        raise RoadSourceError(
            f"the ROAD results in {str(src.path)!r} were computed for "
            + "; ".join(problems)
            + ": they would "
            "be shown on maps they do not describe; run `camanim road` with this model, image and target"
        )
    return src.target if target is None else target


def load_road(path: str | os.PathLike) -> dict[tuple[str, str], float]:
    """ROAD results from a ybROAD bundle (its manifest's ``road.results``) or a JSON file.

    Accepted shapes: ``{"<method>/<layer>": number | {"road"|"score": number}}`` (what ``camanim road``
    writes under ``road.results``), or a list of ``{"method": ..., "layer": ..., "road"|"score": number}``,
    either possibly under ``"road"`` and/or ``"results"`` keys.
    """
    p = Path(path)
    data = json.loads((p / "manifest.json" if p.is_dir() else p).read_text())
    if p.is_dir() or (isinstance(data, dict) and "road" in data):
        data = data.get("road", {})
    if isinstance(data, dict) and "results" in data:
        data = data["results"]
    out: dict[tuple[str, str], float] = {}
    items = data.items() if isinstance(data, dict) else ((None, v) for v in data)
    for key, value in items:
        if key is None and isinstance(value, dict):
            key = f"{value.get('method')}/{value.get('layer')}"
        if not isinstance(key, str) or "/" not in key:
            continue
        number = (
            road_value(value)
            if not isinstance(value, dict)
            else next(
                (
                    float(value[k])
                    for k in ("road", "score", "value")
                    if isinstance(value.get(k), (int, float))
                ),
                None,
            )
        )
        if number is not None:
            method, layer = key.split("/", 1)
            out[(method, layer)] = number
    return out
