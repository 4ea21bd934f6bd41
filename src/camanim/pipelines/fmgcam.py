"""FM-G-CAM of one image: the top-K classes fused into one map per layer, from one K-class capture.

The maths (Eqs 1-6 of Rammuni Silva & Bird, 2024) is :mod:`camanim.compute.fusion`; drawing and writing
are :mod:`camanim.outputs.fmgcam`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from camanim.compute.fusion import ACTIVATIONS, FusionError, check_base, fmgcam_sweep
from camanim.compute.models import InputSize
from camanim.errors import UnknownNameError
from camanim.pipelines.explain import as_loaded, explain


@dataclass(frozen=True)
class FMGCAMResult:
    """FM-G-CAM of one image at one or more layers.

    Its colours, legend, figures (``colors``, ``render``...) and writer (``save``) are attached by
    :mod:`camanim.outputs` (:mod:`camanim.outputs.fmgcam`).

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
            base: a class-discriminative method among the explanation's methods.
            activation, norm: see :func:`fuse`.
            multilabel: whether ``scores`` are sigmoid scores (the legend then says so).
            scores: ``(num_classes,)`` score of every class; default the explanation's softmax, or with
                ``multilabel`` the sigmoid of its logits.

        Raises:
            FusionError: ``base`` is not class-discriminative, the explanation is not a top-K capture, or
                it holds a volume.
        """
        ex = explanation
        if ex.input.dim() == 5:
            raise FusionError(
                "FM-G-CAM fuses 2-D maps; volumes and clips are not supported (explain, animate, road and "
                "faithfulness take them)"
            )
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
    input_size: InputSize = None,
) -> FMGCAMResult:
    """FM-G-CAM of the top-``k`` classes of one image at the chosen layers.

    The K class maps come from one :func:`camanim.explain` call with ``top_k=k``: one forward and K
    ``torch.autograd.grad`` calls on its graph, one per class, plus the no-grad forward that ranks the
    classes.

    Args:
        model: a :class:`~camanim.models.LoadedModel`, an ``nn.Module`` or a model name.
        image: one image source or a preprocessed ``(3, H, W)`` / ``(1, 3, H, W)`` tensor.
        k: number of classes, ``>= 1``.
        base: a registered class-discriminative method (``gradcam``, ``hirescam``, ``gradcam++``...).
        activation: ``"relu"``, ``"elu"`` or ``"gelu"`` (Eq 6).
        layers: a layer selection (see :func:`camanim.layers.select_layers`); the paper uses the last.
        multilabel: rank classes by sigmoid score and differentiate the sigmoid (multi-label heads).
        norm: see :func:`fuse`.
        device: move the model there first.
        input_size: the input size instead of the model's: ``N``, ``(H, W)``, ``"HxW"`` or ``"native"`` (see
            :func:`camanim.pipelines.explain.prepare_input`).

    Returns:
        An :class:`FMGCAMResult`.

    Example:
        >>> res = fmgcam(image="chelsea", k=3)  # doctest: +SKIP
        >>> res.fused[res.layers[-1]].shape  # doctest: +SKIP
        torch.Size([3, 7, 7])
    """
    base = check_base(base)
    if activation not in ACTIVATIONS:
        raise UnknownNameError("activation", activation, ACTIVATIONS)
    lm = as_loaded(model, device)
    score = "sigmoid" if multilabel else "logit"
    ex = explain(lm, image, methods=base, layers=layers, top_k=k, score=score, input_size=input_size)
    return FMGCAMResult.from_explanation(ex, base, activation, norm=norm, multilabel=multilabel)
