"""Methods side by side: a grid with one row per method and one column per layer, from one capture.

As in the CAM framework project report (2024, Section 6), layers are picked among the *convolution* layers:
``first``, ``middle`` and ``last`` are counted in the list of convolution layers in forward order (the report
counts 155 of them in ResNet-152: every ``nn.Conv2d``, downsampling convolutions included), and integers
index that list. A convolution layer is a module that is a torch convolution (``nn.Conv1d/2d/3d`` and
subclasses such as timm's ``Conv2dSame``) or a leaf module whose class name contains ``Conv``; containers
such as ``ConvNormAct`` or ``DepthwiseSeparableConv`` blocks are not counted. A model without any falls
back to all spatial layers, with a warning.

The overlays and the grid image are drawn by :mod:`camanim.outputs.compare`.

Example:
    >>> import camanim
    >>> c = camanim.compare(image="chelsea")  # doctest: +SKIP
    >>> c.shape, c.image.shape  # doctest: +SKIP
    ((4, 3), (798, 728, 3))
    >>> c.save("compare.png")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn
from torch.nn.modules.conv import _ConvNd

from camanim.compute.layers import Layer, LayerSpec, list_layers, select_layers
from camanim.compute.methods import parse_methods
from camanim.compute.models import InputSize
from camanim.compute.normalize import Range, global_range, map_range
from camanim.errors import ImageError, OptionError, UnknownNameError
from camanim.pipelines.animate import check_colormap
from camanim.pipelines.explain import as_loaded, explain, prepare_input

logger = logging.getLogger(__name__)

DEFAULT_METHODS = ("gradcam", "gradcam++", "eigencam", "xgradcam")
DEFAULT_LAYERS = "first,middle,last"
NORMS = ("local", "global")


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
    convolution layers; names and glob patterns pick among them too. A layer named exactly that is not a
    convolution joins the pool (methods defined elsewhere: CAM at the layer the head pools, LeGrad at a
    ViT's blocks).

    Args:
        model: the network the layers were listed from.
        layers: every layer (:func:`camanim.layers.list_layers`).
        spec: the selection.
    """
    pool = conv_layers(model, layers)
    if not pool:
        logger.warning("the model has no convolution layer; choosing among all spatial layers")
        pool = list(layers)
    items = spec.split(",") if isinstance(spec, str) else spec if isinstance(spec, (list, tuple)) else ()
    named = {item.strip() for item in items if isinstance(item, str)}
    in_pool = {layer.name for layer in pool}
    if named - in_pool:
        pool = [layer for layer in layers if layer.name in in_pool or layer.name in named]  # forward order
    return select_layers(pool, spec, keep_duplicates=True)


# ------------------------------------------------------------------------------------------ the result


def tile_title(method: str, layer: str, road: Mapping[tuple[str, str], float]) -> list[str]:
    """A tile's title lines: method, layer name, and its ROAD when known."""
    lines = [method, layer]
    if (method, layer) in road:
        lines.append(f"ROAD {road[(method, layer)]:.3f}")
    return lines


def road_value(value: Any) -> float | None:
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
        ranges: the raw range (after ReLU, upsampled) each tile was normalised by.
        road: ROAD per ``(method, layer name)``, where given.
        prediction: the line above the grid (top-1 class and probability).
        explanation: the one :class:`~camanim.pipelines.explain.Explanation` every tile comes from.
        cmap, alpha: the colour map of the overlays and their opacity.

    The overlays and the grid (``tiles``, ``image``, ``boxes``, ``figure()``, ``save()``) are drawn by
    :mod:`camanim.outputs.compare` and attached by :mod:`camanim.outputs`.
    """

    methods: tuple[str, ...]
    layers: tuple[Layer, ...]
    norm: str
    ranges: dict[tuple[str, str], Range] = field(repr=False)
    road: dict[tuple[str, str], float] = field(repr=False)
    prediction: str = ""
    explanation: Any = field(default=None, repr=False)
    cmap: str = "jet"
    alpha: float = 0.5
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, columns)`` = ``(methods, layers)``."""
        return len(self.methods), len(self.layers)

    def title(self, method: str, layer: str) -> list[str]:
        """A tile's title lines: method, layer name, and its ROAD when known."""
        return tile_title(method, layer, self.road)


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
    input_size: InputSize = None,
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
        input_size: the input size instead of the model's: ``N``, ``(H, W)``, ``"HxW"`` or ``"native"`` (see
            :func:`camanim.pipelines.explain.prepare_input`).

    Returns:
        A :class:`Comparison`.
    """
    if norm not in NORMS:
        raise UnknownNameError("normalisation", norm, NORMS)
    lm = as_loaded(model, device)
    names = parse_methods(methods)
    x, _, _ = prepare_input(image, lm, input_size)
    if x.shape[0] != 1:
        raise OptionError(f"compare explains one image, got a batch of {x.shape[0]}")
    if x.dim() == 5:
        raise ImageError(
            "compare draws a grid of 2-D overlays; volumes and clips are not supported (draw them with "
            "camanim explain or animate --view, score them with camanim road or faithfulness)"
        )
    table = list_layers(lm.model, x[:1].to(lm.device))
    chosen = select_conv_layers(lm.model, table, layers)
    ex = explain(
        lm,
        image,
        methods=names,
        layers=[layer.name for layer in chosen],
        target=target,
        score=score,
        input_size=input_size,
    )
    ups = {(m, layer.name): ex.upsampled(m, layer.name)[0].numpy() for m in names for layer in ex.chosen}
    ranges: dict[tuple[str, str], Range] = {}
    for m in names:
        row = [ups[(m, layer.name)] for layer in ex.chosen]
        shared = global_range(row) if norm == "global" else None
        for layer, up in zip(ex.chosen, row, strict=True):
            ranges[(m, layer.name)] = shared or map_range(up)
    if road is not None and hasattr(road, "results"):  # a camanim.road.ybroad.YbRoadResult
        road = {(m, name): v for m, r in road.results.items() for name, v in r.as_dict().items()}
    road_values: dict[tuple[str, str], float] = {}
    for key, value in (road or {}).items():
        v = road_value(value)
        if v is not None:
            road_values[(str(key[0]), str(key[1]))] = v
    c, name = ex.targets[0], ex.target_names[0]
    top1 = int(ex.probabilities[0].argmax())
    prediction = (
        f"{ex.model_name}: prediction {ex.class_names[top1]} (p={float(ex.probabilities[0, top1]):.3f})"
        + ("" if c == top1 else f"; explaining {name} (p={float(ex.probabilities[0, c]):.3f})")
        + f"; {norm} normalisation"
    )
    check_colormap(cmap)
    return Comparison(
        methods=tuple(names),
        layers=tuple(ex.chosen),
        norm=norm,
        ranges=ranges,
        road=road_values,
        prediction=prediction,
        explanation=ex,
        cmap=cmap,
        alpha=float(alpha),
    )
