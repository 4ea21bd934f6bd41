"""Methods side by side: a grid with one row per method and one column per layer, from one capture.

As in the CAM framework project report (2024, Section 6), layers are picked among the *convolution* layers:
``first``, ``middle`` and ``last`` are counted in the list of convolution layers in forward order (the report
counts 155 of them in ResNet-152: every ``nn.Conv2d``, downsampling convolutions included), and integers
index that list. A convolution layer is a module that is a torch convolution (``nn.Conv1d/2d/3d`` and
subclasses such as timm's ``Conv2dSame``) or a leaf module whose class name contains ``Conv``; containers
such as ``ConvNormAct`` or ``DepthwiseSeparableConv`` blocks are not counted. A model without any falls
back to all spatial layers, with a warning.

Example:
    >>> import camanim.comparison as cmp
    >>> c = cmp.compare(image="chelsea")  # doctest: +SKIP
    >>> c.shape, c.image.shape  # doctest: +SKIP
    ((4, 3), (798, 728, 3))
    >>> c.save("compare.png")  # doctest: +SKIP
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
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from torch.nn.modules.conv import _ConvNd

from camanim.compute.layers import Layer, LayerSpec, list_layers, select_layers
from camanim.compute.normalize import Range, global_range, map_range, normalize
from camanim.errors import CamanimError

logger = logging.getLogger(__name__)

DEFAULT_METHODS = ("gradcam", "gradcam++", "eigencam", "xgradcam")
DEFAULT_LAYERS = "first,middle,last"
NORMS = ("local", "global")

Box = tuple[int, int, int, int]


class RoadSourceError(CamanimError, ValueError):
    """ROAD results that are missing, unreadable or computed for another model, image or target."""


# ------------------------------------------------------------------------------------------ layer choice


def is_conv_layer(model: nn.Module, layer: Layer) -> bool:
    """Whether ``layer`` is a spatial convolution layer (see the module docstring)."""
    if not layer.is_spatial:
        return False
    try:
        module = model.get_submodule(layer.module_name)
    except AttributeError:
        return False
    if isinstance(module, _ConvNd):
        return True
    return "Conv" in layer.type and next(module.children(), None) is None


def conv_layers(model: nn.Module, layers: Sequence[Layer]) -> list[Layer]:
    """The spatial convolution layers among ``layers``, in order."""
    return [layer for layer in layers if is_conv_layer(model, layer)]


def select_conv_layers(
    model: nn.Module, layers: Sequence[Layer], spec: LayerSpec = DEFAULT_LAYERS
) -> list[Layer]:
    """Pick layers among the convolution layers with :func:`camanim.layers.select_layers`.

    ``"first"``, ``"middle"``, ``"last"``, ``"all"``, an int N (the last N) and integer indices count
    convolution layers; names and glob patterns pick among them too.

    Args:
        model: the network the layers were listed from.
        layers: every layer (:func:`camanim.layers.list_layers`).
        spec: the selection.
    """
    pool = conv_layers(model, layers)
    if not pool:
        logger.warning("the model has no convolution layer; choosing among all spatial layers")
        pool = list(layers)
    return select_layers(pool, spec, keep_duplicates=True)


# ------------------------------------------------------------------------------------------ the result


def tile_title(method: str, layer: str, road: Mapping[tuple[str, str], float]) -> list[str]:
    """A tile's title lines: method, layer name, and its ROAD when known."""
    lines = [method, layer]
    if (method, layer) in road:
        lines.append(f"ROAD {road[(method, layer)]:.3f}")
    return lines


def _road_value(value: Any) -> float | None:
    """A ROAD result as one number: a number, or an object with a ``road``/``score``/``value`` attribute."""
    for v in (value, *(getattr(value, a, None) for a in ("road", "score", "value", "mean"))):
        if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool):
            return float(v)
    return None


@dataclass(frozen=True)
class Comparison:
    """A methods x layers grid of overlays of one image.

    Attributes:
        methods: row order; ``layers`` column order (execution order).
        norm: ``"local"`` (each tile by its own range) or ``"global"`` (one range per method, over its layers).
        tiles: ``tiles[(method, layer name)]`` the overlay ``(H, W, 3)`` uint8.
        ranges: the raw range (after ReLU, upsampled) each tile was normalised by.
        road: ROAD per ``(method, layer name)``, where given.
        image: the whole grid ``(Hg, Wg, 3)`` uint8 (what :meth:`save` writes).
        boxes: where each tile lies in ``image``: ``(top, left, bottom, right)``, exclusive ends.
        prediction: the line above the grid (top-1 class and probability).
        explanation: the one :class:`~camanim.explanation.Explanation` every tile comes from.
    """

    methods: tuple[str, ...]
    layers: tuple[Layer, ...]
    norm: str
    tiles: dict[tuple[str, str], np.ndarray] = field(repr=False)
    ranges: dict[tuple[str, str], Range] = field(repr=False)
    road: dict[tuple[str, str], float] = field(repr=False)
    image: np.ndarray = field(repr=False)
    boxes: dict[tuple[str, str], Box] = field(repr=False)
    prediction: str = ""
    explanation: Any = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, columns)`` = ``(methods, layers)``."""
        return len(self.methods), len(self.layers)

    def title(self, method: str, layer: str) -> list[str]:
        """A tile's title lines: method, layer name, and its ROAD when known."""
        return tile_title(method, layer, self.road)

    def figure(self, *, tile_inches: float = 2.4):
        """The grid as a matplotlib ``Figure`` (one axes per tile; no pyplot state, displays in notebooks)."""
        from matplotlib.figure import Figure

        rows, cols = self.shape
        fig = Figure(figsize=(cols * tile_inches, rows * (tile_inches + 0.4) + 0.4), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False)
        for r, m in enumerate(self.methods):
            for c, layer in enumerate(self.layers):
                ax = axes[r][c]
                ax.imshow(self.tiles[(m, layer.name)])
                ax.set_title("\n".join(self.title(m, layer.name)), fontsize=8)
                ax.set_axis_off()
        fig.suptitle(self.prediction, fontsize=10)
        return fig

    def save(self, path: str | os.PathLike) -> Path:
        """Write the grid image as a PNG (atomically)."""
        from camanim.outputs.render import save_png

        return save_png(path, self.image)


# ---------------------------------------------------------------------------------------------- layout


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


def compare(
    model: Any = "efficientnet_lite0",
    image: Any = "chelsea",
    *,
    methods: str | Sequence[str] = DEFAULT_METHODS,
    layers: LayerSpec = DEFAULT_LAYERS,
    norm: str = "local",
    road: Mapping[tuple[str, str], Any] | None = None,
    target: int | str | None = None,
    score: str = "logit",
    cmap: str = "jet",
    alpha: float = 0.5,
    device: Any = None,
) -> Comparison:
    """Compare methods at a few layers of one image, every map from ONE :func:`camanim.explain` call.

    Args:
        model: a :class:`~camanim.models.LoadedModel`, an ``nn.Module`` or a model name.
        image: one image source or a preprocessed ``(1, 3, H, W)`` tensor.
        methods: method names (a comma-separated string or a sequence).
        layers: a selection among the convolution layers (see :func:`select_conv_layers`).
        norm: ``"local"`` (each tile by its own min/max) or ``"global"`` (one min/max per method, over the
            layers of its row: depths compared on one scale).
        road: ROAD results per ``(method, layer name)`` (a number, or an object with a ``road``/``score``
            attribute), or a :class:`~camanim.road.ybroad.YbRoadResult`; written under each tile's title.
        target: the class to explain (default the top-1 class).
        score: ``"logit"``, ``"probability"`` or ``"sigmoid"``.
        cmap: the colour map of the overlays; ``alpha`` their opacity.
        device: move the model there first.

    Returns:
        A :class:`Comparison`.
    """
    from camanim.compute.methods import parse_methods
    from camanim.outputs.render import colormap_lut, overlay
    from camanim.pipelines.explain import as_loaded, explain, prepare_input

    if norm not in NORMS:
        from camanim.errors import UnknownNameError

        raise UnknownNameError("normalisation", norm, NORMS)
    lm = as_loaded(model, device)
    names = parse_methods(methods)
    x, _, _ = prepare_input(image, lm)
    if x.shape[0] != 1:
        raise ValueError(f"compare explains one image, got a batch of {x.shape[0]}")
    table = list_layers(lm.model, x[:1].to(lm.device))
    chosen = select_conv_layers(lm.model, table, layers)
    ex = explain(
        lm, image, methods=names, layers=[layer.name for layer in chosen], target=target, score=score
    )
    display = ex.display[0]
    lut = colormap_lut(cmap)
    ups = {(m, layer.name): ex.upsampled(m, layer.name)[0].numpy() for m in names for layer in ex.chosen}
    ranges: dict[tuple[str, str], Range] = {}
    for m in names:
        row = [ups[(m, layer.name)] for layer in ex.chosen]
        shared = global_range(row) if norm == "global" else None
        for layer, up in zip(ex.chosen, row, strict=True):
            ranges[(m, layer.name)] = shared or map_range(up)
    tiles = {key: overlay(display, normalize(up, ranges[key]), lut, alpha) for key, up in ups.items()}
    if road is not None and hasattr(road, "results"):  # a camanim.road.ybroad.YbRoadResult
        road = {(m, name): v for m, r in road.results.items() for name, v in r.as_dict().items()}
    road_values: dict[tuple[str, str], float] = {}
    for key, value in (road or {}).items():
        v = _road_value(value)
        if v is not None:
            road_values[(str(key[0]), str(key[1]))] = v
    c, name = ex.targets[0], ex.target_names[0]
    top1 = int(ex.probabilities[0].argmax())
    prediction = (
        f"{ex.model_name}: prediction {ex.class_names[top1]} (p={float(ex.probabilities[0, top1]):.3f})"
        + ("" if c == top1 else f"; explaining {name} (p={float(ex.probabilities[0, c]):.3f})")
        + f"; {norm} normalisation"
    )
    layer_names = [layer.name for layer in ex.chosen]
    titles = {key: tile_title(*key, road_values) for key in tiles}
    grid_image, boxes = _compose(names, layer_names, tiles, titles, prediction)
    return Comparison(
        methods=tuple(names),
        layers=tuple(ex.chosen),
        norm=norm,
        tiles=tiles,
        ranges=ranges,
        road=road_values,
        image=grid_image,
        boxes=boxes,
        prediction=prediction,
        explanation=ex,
    )


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


def check_road_source(src: RoadSource, lm: Any, image: Any, target: Any = None) -> int | None:
    """Check that ROAD values were computed for this model, weights, input and target; return the target
    the comparison must explain (the ROAD run's own, unless one is given and equal).

    Raises:
        RoadSourceError: any of them differs (the message says which and how).
    """
    from camanim.compute.targets import resolve_class
    from camanim.pipelines.explain import prepare_input

    problems = []
    if src.model is not None and src.model != lm.name:
        problems.append(f"model {src.model!r}, not {lm.name!r}")
    if src.weights is not None and src.weights != lm.weights:
        problems.append(f"weights {src.weights!r}, not {lm.weights!r}")
    if src.input is not None:
        x, _, _ = prepare_input(image, lm)
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
            _road_value(value)
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
