"""FM-G-CAM (Fused Multi-class Grad-CAM; Rammuni Silva & Bird, 2024): one map for the top-K classes.

Eqs 1-6 of the paper, for the top-K classes ``n_1..n_K`` by predicted probability (Eq 1) at one layer:

* Eqs 2-3: each class's map ``R_k`` from the base method (Grad-CAM in the paper; any registered
  class-discriminative one-pass method here). The paper's ``1/C`` in Eq 3 is a common positive factor of
  every ``R_k``; Eq 6 divides it out, so it is omitted.
* Eq 4 (filtering): at each position only the class whose map is largest keeps its value; the others are
  set to 0. On an exact tie the most probable class keeps it (the reference implementation's ``argmax``;
  the equation would keep both), so every position carries at most one class.
* Eqs 5-6 (L2 normalisation, activation): ``S' = [S_1 .. S_K]`` in ``R^(I x J x K)`` and
  ``S_FM-G-CAM = act(S' / ||S'||_2)``, where ``||S'||_2`` is the L2 (Frobenius) norm of the whole stack: all
  ``K x I x J`` entries, one number. Why that axis: Eq 6 writes the norm of the 3-D tensor with no axis,
  which by convention is the entrywise norm; a per-position norm across the K maps cannot be meant,
  because after Eq 4 a position has at most one non-zero entry, so it would turn every position into
  ``sign(S)`` (a binary map, unlike the paper's figures); and a norm per class map would change the
  relative strength of the classes, which Eq 6 does not. ``norm="class"`` (each map by its own L2 norm over
  ``I x J``, the reading of the paper's remark that the normalisation lifts weaker classes) and
  ``norm="none"`` are offered as options. With ``"stack"`` every fused map has unit norm before the
  activation (comparable across layers and images); a display min-max cancels the scale under ReLU, not
  under ELU/GELU, whose curvature acts near 0.

Differences from the reference package ``xai-inference-engine`` 0.1.4 (the paper's code): its K activation
tensors are one tensor multiplied in place, so only the top-1 map is right (class ``k`` is weighted by the
product of the channel weights of classes ``1..k``); it L2-normalises along the height axis
(``F.normalize(maps, dim=1)`` on ``(K, h, w)``) instead of over the stack; it min-max normalises the
result for display (done here at rendering); it runs K backward passes with ``.backward()``, leaving
``.grad`` filled and every parameter with ``requires_grad = False``. Here the K classes share one forward
pass and their K backward passes are ``torch.autograd.grad`` calls on its retained graph
(:func:`camanim.explain` with ``top_k``; cheaper on a CPU than one pass over a batch of K copies of the
image, see benchmarks/RESULTS.md), and the model is left as found.

Every layer of a network, one video frame each: ``camanim animate --method fmgcam`` (:mod:`camanim.fused_frames`).

Example:
    >>> import torch
    >>> maps = torch.tensor([[[1.0, -2.0]], [[0.5, 3.0]]])  # K=2 classes, 1x2 map
    >>> fuse(maps)
    tensor([[[0.3162, 0.0000]],
    <BLANKLINE>
            [[0.0000, 0.9487]]])
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from camanim.errors import CamanimError, UnknownNameError

logger = logging.getLogger(__name__)

ACTIVATIONS = {"relu": F.relu, "elu": F.elu, "gelu": F.gelu}
NORMS = ("stack", "class", "none")
PALETTE = "tab10"
# tab10 without its grey (index 7), which does not read as a class colour over a photograph.
_PALETTE_INDICES = (0, 1, 2, 3, 4, 5, 6, 8, 9)
MAX_DISTINCT_COLORS = len(_PALETTE_INDICES)
_EPS = 1e-12


class FusionError(CamanimError, ValueError):
    """FM-G-CAM cannot be made as asked: a base method that is not class-discriminative, an explanation
    that is not a top-K capture of one image, or options that do not fit together."""


def check_base(base: str) -> str:
    """The registry name of ``base`` when it can serve FM-G-CAM (a class-discriminative one-pass method).

    Raises:
        MethodNotFoundError: an unknown method.
        FusionError: a method that is not class-discriminative or needs extra forwards.
    """
    from camanim.compute.methods import method_class

    cls = method_class(base)
    if cls.cost != "one_pass" or not cls.class_discriminative:
        raise FusionError(f"FM-G-CAM needs a class-discriminative one-pass base method, not {cls.name!r}")
    return cls.name


# ------------------------------------------------------------------------------------------- the maths


def fuse(maps: Tensor | np.ndarray, activation: str = "relu", *, norm: str = "stack") -> Tensor:
    """Fuse K class maps at one layer (Eqs 4-6; see the module docstring for the norm's axis).

    Args:
        maps: raw per-class maps ``(K, h, w)`` of the base method, most probable class first.
        activation: ``"relu"`` (the paper's default), ``"elu"`` or ``"gelu"``.
        norm: ``"stack"`` (Eq 6: one L2 norm over all ``K x h x w`` entries), ``"class"`` (each class map
            by its own L2 norm over ``h x w``) or ``"none"``.

    Returns:
        ``(K, h, w)`` float32; at each position at most one class is non-zero before the activation.
    """
    if activation not in ACTIVATIONS:
        raise UnknownNameError("activation", activation, ACTIVATIONS)
    if norm not in NORMS:
        raise UnknownNameError("FM-G-CAM norm", norm, NORMS)
    m = torch.as_tensor(maps).float()
    if m.dim() != 3:
        raise ValueError(f"maps must be (K, h, w), got {tuple(m.shape)}")
    m = torch.nan_to_num(m, nan=0.0, posinf=0.0, neginf=0.0)
    winner = m.argmax(dim=0, keepdim=True)  # (1, h, w); the first (most probable) class on a tie
    keep = torch.arange(m.shape[0], device=m.device)[:, None, None] == winner
    s = torch.where(keep, m, torch.zeros_like(m))
    if norm == "stack":
        s = s / s.square().sum().sqrt().clamp_min(_EPS)
    elif norm == "class":
        s = s / s.square().sum(dim=(1, 2), keepdim=True).sqrt().clamp_min(_EPS)
    return ACTIVATIONS[activation](s)


def fmgcam_sweep(
    explanation: Any, base: str | None = None, activation: str = "relu", *, norm: str = "stack"
) -> dict[str, Tensor]:
    """FM-G-CAM at every layer of an explanation made with ``top_k`` (its batch axis holds the classes).

    Args:
        explanation: a :class:`~camanim.explanation.Explanation` from ``explain(..., top_k=K)``.
        base: which of its methods to fuse (default: the first class-discriminative one).
        activation, norm: see :func:`fuse`.

    Returns:
        ``{layer name: fused (K, h, w)}`` in forward order.
    """
    from camanim.compute.methods import method_class

    ex = explanation
    if base is None:
        base = next((m for m in ex.methods if method_class(m).class_discriminative), None)
        if base is None:
            raise FusionError(f"none of the explanation's methods {list(ex.methods)} is class-discriminative")
    if base not in ex.maps:
        raise UnknownNameError("method", base, list(ex.maps), "not in this explanation")
    one_image = bool((ex.input == ex.input[:1]).all()) if ex.input.shape[0] > 0 else False
    if len(set(ex.targets)) != len(ex.targets) or not one_image:
        raise FusionError(
            "FM-G-CAM needs an explanation made with top_k (one image, one distinct class per batch row)"
        )
    return {name: fuse(maps, activation, norm=norm) for name, maps in ex.maps[base].items()}


# -------------------------------------------------------------------------------------------- colours


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
    import matplotlib
    import matplotlib.colors as mcolors

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
    from camanim.compute.resize import resize_maps

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
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=font_size)
    line = int(font.getbbox("Ág|")[3]) + 4
    img = Image.new("RGB", (width, line * len(names) + 8), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for i, (name, value, color) in enumerate(zip(names, values, colors, strict=True)):
        y = 4 + i * line
        draw.rectangle([8, y + 2, 8 + line - 6, y + line - 4], fill=tuple(int(c) for c in color))
        draw.text((8 + line, y), f"{i + 1}. {name}  {label}={value:.3f}", font=font, fill=(0, 0, 0))
    return np.asarray(img)


# ----------------------------------------------------------------------------------------- the result


@dataclass(frozen=True)
class FMGCAMResult:
    """FM-G-CAM of one image at one or more layers.

    Attributes:
        classes: the top-K class indices, most probable first.
        names: their names.
        probabilities: their softmax probabilities (sigmoid scores with ``multilabel``).
        base: the base method; ``activation`` and ``norm`` as given to :func:`fuse`.
        multilabel: whether classes were ranked and scored by sigmoid.
        layers: the layer names, in forward order.
        fused: ``{layer: (K, h, w)}`` fused maps (float32, CPU).
        base_maps: ``{layer: (K, h, w)}`` the base method's raw map of each class.
        explanation: the underlying :class:`~camanim.explanation.Explanation` (input, display, timings).
    """

    classes: tuple[int, ...]
    names: tuple[str, ...]
    probabilities: tuple[float, ...]
    base: str
    activation: str
    norm: str
    multilabel: bool
    layers: tuple[str, ...]
    fused: dict[str, Tensor] = field(repr=False)
    base_maps: dict[str, Tensor] = field(repr=False)
    explanation: Any = field(repr=False)

    @classmethod
    def from_explanation(
        cls,
        explanation: Any,
        base: str = "gradcam",
        activation: str = "relu",
        *,
        norm: str = "stack",
        multilabel: bool = False,
        scores: Tensor | None = None,
    ) -> FMGCAMResult:
        """FM-G-CAM at every layer of an explanation made with ``top_k`` (no model is run).

        Args:
            explanation: from ``explain(..., top_k=K)``: one image, one class per batch row.
            base: a class-discriminative one-pass method among the explanation's methods.
            activation, norm: see :func:`fuse`.
            multilabel: whether ``scores`` are sigmoid scores (the legend then says so).
            scores: ``(num_classes,)`` score of every class; default the explanation's softmax, or with
                ``multilabel`` the sigmoid of its logits.

        Raises:
            FusionError: ``base`` is not class-discriminative, or the explanation is not a top-K capture.
        """
        ex = explanation
        base = check_base(base)
        fused = fmgcam_sweep(ex, base, activation, norm=norm)
        classes = tuple(int(c) for c in ex.targets)
        if scores is None:
            # An explanation read back from a bundle has no logits: its softmax is all there is.
            multilabel = multilabel and ex.logits is not None
            scores = ex.logits[0].sigmoid() if multilabel else ex.probabilities[0]
        return cls(
            classes=classes,
            names=tuple(ex.target_names),
            probabilities=tuple(float(scores[c]) for c in classes),
            base=base,
            activation=activation,
            norm=norm,
            multilabel=multilabel,
            layers=tuple(fused),
            fused=fused,
            base_maps=dict(ex.maps[base]),
            explanation=ex,
        )

    @property
    def colors(self) -> np.ndarray:
        """``(K, 3)`` uint8 class colours."""
        return class_colors(len(self.classes))

    def class_table(self) -> list[dict[str, Any]]:
        """One manifest entry per class: rank, class index, name, probability and RGB colour."""
        return [
            {"rank": i + 1, "class": c, "name": n, "probability": p, "color": [int(v) for v in col]}
            for i, (c, n, p, col) in enumerate(
                zip(self.classes, self.names, self.probabilities, self.colors, strict=True)
            )
        ]

    def describe(self) -> dict[str, Any]:
        """The manifest entries every FM-G-CAM output shares: paper, classes and settings."""
        return {
            "paper": "Rammuni Silva and Bird, FM-G-CAM, 2024 (Eqs 1-6)",
            "k": len(self.classes),
            "classes": self.class_table(),
            "probability": "sigmoid" if self.multilabel else "softmax",
            "base": self.base,
            "activation": self.activation,
            "norm": self.norm,
        }

    def legend_strip(self, width: int, *, font_size: int = 12) -> np.ndarray:
        """The legend (swatch, name, probability per class) ``(h, width, 3)`` uint8, ``h`` even."""
        label = "sigmoid" if self.multilabel else "p"
        strip = legend(self.names, self.probabilities, self.colors, width, label=label, font_size=font_size)
        return strip if strip.shape[0] % 2 == 0 else np.concatenate([strip, strip[-1:]], axis=0)

    def with_legend(self, figure: np.ndarray, *, font_size: int = 12) -> np.ndarray:
        """``figure`` ``(H, W, 3)`` with :meth:`legend_strip` below it: ``(H + h, W, 3)`` uint8."""
        return np.concatenate([figure, self.legend_strip(figure.shape[1], font_size=font_size)], axis=0)

    def overlay(self, layer: str | None = None, **kwargs: Any) -> np.ndarray:
        """The fused overlay ``(H, W, 3)`` uint8 at ``layer`` (default the last); see :func:`fused_overlay`."""
        layer = layer or self.layers[-1]
        return fused_overlay(self.fused[layer], self.explanation.display[0], colors=self.colors, **kwargs)

    def render(self, layer: str | None = None, *, panels: bool = True, alpha: float = 0.7) -> np.ndarray:
        """The figure: the fused overlay with a legend, and (``panels``) each class's base-method overlay
        beside it (the paper's Figs 6-7 layout). Returns ``(H', W', 3)`` uint8."""
        from camanim.compute.normalize import normalize
        from camanim.outputs.render import grid, overlay

        layer = layer or self.layers[-1]
        display = self.explanation.display[0]
        tiles = [self.overlay(layer, alpha=alpha)]
        titles = [f"FM-G-CAM ({self.base}, {self.activation})"]
        if panels:
            up = self.explanation.upsampled(self.base, layer)  # (K, H, W) after ReLU
            for k, name in enumerate(self.names):
                tiles.append(overlay(display, normalize(up[k].numpy()), "jet"))
                titles.append(f"{self.base}: {name}")
        figure = grid([tiles], col_titles=titles, title=f"{self.explanation.model_name} - layer {layer}")
        return self.with_legend(figure)  # grid's height is even, so the figure's stays even

    def save(
        self,
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
        from camanim.outputs.bundle import open_bundle

        with open_bundle(out, force=force, command=command, finalize=finalize) as bundle:
            write_fmgcam(self, bundle, panels=panels)
        return bundle.root


def write_fmgcam(result: FMGCAMResult, bundle: Any, *, panels: bool = True) -> None:
    """Write ``result`` into an open bundle (see :meth:`FMGCAMResult.save`).

    ``fmgcam.png`` shows the last layer; with several layers each also gets ``fmgcam/<index>_<layer>.png``.
    """
    from camanim.outputs.explanation import overlay_path
    from camanim.outputs.render import save_png
    from camanim.pipelines.explain import describe

    ex = result.explanation
    bundle.save_npy("input.npy", ex.input[:1].numpy(), "input tensor (1, 3, H, W) float32")
    arrays = {f"fmgcam/{layer}": result.fused[layer].numpy() for layer in result.layers}
    arrays.update({f"{result.base}/{layer}": result.base_maps[layer].numpy() for layer in result.layers})
    bundle.save_npz("maps.npz", arrays, "raw maps (K, h, w): fused and base per class")
    manifest = describe(ex, "sigmoid" if result.multilabel else "logit")
    manifest["input"] = {"file": "input.npy", "shape": [1, *ex.input.shape[1:]], "dtype": "float32"}
    manifest["maps"] = {
        "file": "maps.npz",
        "key": "fmgcam/<layer> (fused, after the activation) and <base>/<layer> (raw base map per class)",
        "shape": "(K, h, w), K classes, most probable first",
    }
    bundle.manifest.update(manifest)
    save_png(bundle.file("fmgcam.png", "FM-G-CAM figure"), result.render(panels=panels))
    pngs = {}
    if len(result.layers) > 1:
        by_name = {layer.name: layer for layer in ex.chosen}
        for name in result.layers:
            rel = overlay_path("fmgcam", by_name[name]).replace("overlays/", "", 1)
            save_png(
                bundle.file(rel, "FM-G-CAM figure"), result.render(name, panels=panels), compress_level=3
            )
            pngs[name] = rel
    bundle.manifest["fmgcam"] = {
        **result.describe(),
        "layers": list(result.layers),
        "figure": "fmgcam.png",
        "figures": pngs,
        "timings": dict(ex.timings),
    }


def fmgcam(
    model: Any = "efficientnet_lite0",
    image: Any = "chelsea",
    *,
    k: int = 3,
    base: str = "gradcam",
    activation: str = "relu",
    layers: Any = "last",
    multilabel: bool = False,
    norm: str = "stack",
    device: str | torch.device | None = None,
) -> FMGCAMResult:
    """FM-G-CAM of the top-``k`` classes of one image at the chosen layers.

    The K class maps come from one :func:`camanim.explain` call with ``top_k=k``: one forward and K
    ``torch.autograd.grad`` calls on its graph, one per class, plus the no-grad forward that ranks the
    classes.

    Args:
        model: a :class:`~camanim.models.LoadedModel`, an ``nn.Module`` or a model name.
        image: one image source or a preprocessed ``(3, H, W)`` / ``(1, 3, H, W)`` tensor.
        k: number of classes, ``>= 1``.
        base: a registered class-discriminative one-pass method (``gradcam``, ``hirescam``, ``gradcam++``...).
        activation: ``"relu"``, ``"elu"`` or ``"gelu"`` (Eq 6).
        layers: a layer selection (see :func:`camanim.layers.select_layers`); the paper uses the last.
        multilabel: rank classes by sigmoid score and differentiate the sigmoid (multi-label heads).
        norm: see :func:`fuse`.
        device: move the model there first.

    Returns:
        An :class:`FMGCAMResult`.

    Example:
        >>> res = fmgcam(image="chelsea", k=3)  # doctest: +SKIP
        >>> res.fused[res.layers[-1]].shape  # doctest: +SKIP
        torch.Size([3, 7, 7])
    """
    from camanim.pipelines.explain import as_loaded, explain

    base = check_base(base)
    if activation not in ACTIVATIONS:
        raise UnknownNameError("activation", activation, ACTIVATIONS)
    lm = as_loaded(model, device)
    ex = explain(lm, image, methods=base, layers=layers, top_k=k, score="sigmoid" if multilabel else "logit")
    return FMGCAMResult.from_explanation(ex, base, activation, norm=norm, multilabel=multilabel)
