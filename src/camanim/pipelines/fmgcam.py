"""FM-G-CAM of one image: the top-K classes, or K task targets, fused into one map per layer, from one
capture.

Task targets (:mod:`camanim.compute.tasks`) fuse as classes do when they are ``K >= 2`` targets of the image:
several labels of a multi-label head (``MultiLabelTarget(labels, each=True)`` or ``top_k=K``: the FM-G-CAM
paper's chest X-ray case), several classes of a segmentation network, each over its own region
(``SegmentationTarget(classes, each=True)``), several detections (``BoxScoreTarget(top_n=N, each=True)``),
several regression outputs (a list of ``RegressionTarget``), or any list of targets reading the output the
same way (:class:`~camanim.compute.tasks.StackedTarget`). One forward pass, one backward pass per target. An
embedding similarity or a single regression output is one score: there is nothing to fuse, and it is refused.

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
from camanim.compute.tasks import StackedTarget
from camanim.errors import UnknownNameError
from camanim.pipelines.explain import as_loaded, explain


@dataclass(frozen=True)
class FMGCAMResult:
    """FM-G-CAM of one image at one or more layers.

    Its colours, legend, figures (``colors``, ``render``...) and writer (``save``) are attached by
    :mod:`camanim.outputs` (:mod:`camanim.outputs.fmgcam`).

    Attributes:
        classes: the top-K class indices, most probable first; for task targets, each target's label or class
            index where it has one (multi-label labels, segmentation classes), else its position.
        names: their names (for task targets, :attr:`~camanim.compute.tasks.TaskTarget.target_labels`).
        probabilities: their softmax probabilities (sigmoid scores with ``multilabel``; for task targets each
            target's score on the image).
        base: the base method; ``activation`` and ``norm`` as given to :func:`fuse`.
        multilabel: whether classes were ranked and scored by sigmoid.
        layers: the layer names, in forward order.
        fused: ``{layer: (K, h, w)}`` fused maps (float32, CPU).
        base_maps: ``{layer: (K, h, w)}`` the base method's raw map of each class.
        explanation: the underlying :class:`~camanim.explanation.Explanation` (input, display, timings; for
            task targets its ``task``, ``regions`` and ``boxes``).
        task: what was fused: ``{"kind": "classification"}``, or the task target's description.
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
    task: dict = field(default_factory=lambda: {"kind": "classification"}, repr=False)

    @property
    def is_task(self) -> bool:
        """Whether task targets (not a classifier's classes) were fused."""
        return self.task.get("kind", "classification") != "classification"

    @property
    def score_label(self) -> str:
        """What :attr:`probabilities` are, for legends: ``"p"``, ``"sigmoid"`` or ``"score"``."""
        if self.multilabel:
            return "sigmoid"
        return "score" if self.is_task else "p"

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
        task = dict(getattr(ex, "task", None) or {"kind": "classification"})
        if task.get("kind", "classification") != "classification":
            return cls._from_task_explanation(ex, base, activation, norm, fused, task)
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

    @classmethod
    def _from_task_explanation(
        cls, ex: Any, base: str, activation: str, norm: str, fused: dict[str, Tensor], task: dict
    ) -> FMGCAMResult:
        """The result of ``K`` task targets: rows in the targets' order, each named by its target label and
        scored by the target's own score (a multi-label target's sigmoid)."""
        k = int(ex.input.shape[0])
        if k < 2:
            raise FusionError(
                f"FM-G-CAM fuses the maps of several targets; this {task.get('kind')} explanation holds one "
                "target (give several labels, classes or detections, each=True)"
            )
        indices = _task_indices(task, k)
        return cls(
            classes=indices,
            names=tuple(ex.target_names),
            probabilities=tuple(float(v) for v in ex.probabilities[:, 0]),
            base=base,
            activation=activation,
            norm=norm,
            multilabel=task.get("kind") == "multilabel",
            layers=tuple(fused),
            fused=fused,
            base_maps=dict(ex.maps[base]),
            explanation=ex,
            task=task,
        )


def _task_indices(task: dict, k: int) -> tuple[int, ...]:
    """Each target's label or class index where the task names one per target, else its position."""
    kind = task.get("kind")
    found: Any = None
    if kind == "multilabel":
        found = task.get("labels")
    elif kind == "segmentation":
        found = task.get("class")
    elif kind == "regression" and "targets" in task:
        found = [t.get("index") for t in task["targets"]]
    if isinstance(found, list) and len(found) == k and all(isinstance(v, int) for v in found):
        return tuple(int(v) for v in found)
    return tuple(range(k))


def check_fusable(target: Any) -> Any:
    """``target`` as FM-G-CAM fuses it: a list of targets becomes one :class:`StackedTarget`.

    Raises:
        FusionError: a target that gives one score (an embedding similarity, one regression output, one
            summed score: nothing to fuse).
    """
    if isinstance(target, (list, tuple)):
        if len(target) < 2:
            raise FusionError("FM-G-CAM fuses the maps of several targets: give at least two")
        target = StackedTarget(target)
    kind = getattr(target, "kind", "custom")
    if kind == "embedding":
        raise FusionError(
            "FM-G-CAM fuses the maps of several targets; an embedding similarity is one score (the cosine to "
            "one reference): explain or animate it instead"
        )
    if kind == "regression" and not isinstance(target, StackedTarget):
        raise FusionError(
            "FM-G-CAM fuses the maps of several targets; one regression output is one score: give several "
            "outputs (a list of RegressionTarget) or explain it instead"
        )
    if not getattr(target, "each", False):
        raise FusionError(
            f"FM-G-CAM fuses the maps of several targets; this {kind} target gives one summed score: make it "
            "one target per label, class or detection (each=True) or give a list of targets"
        )
    return target


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
    target: Any = None,
) -> FMGCAMResult:
    """FM-G-CAM of the top-``k`` classes (or of ``K`` task targets) of one image at the chosen layers.

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
        target: instead of the top-``k`` classes, ``K >= 2`` task targets of the image, fused in their order
            (``k`` and ``multilabel`` are then unused): a task target giving ``K`` scores (``each=True``,
            ``MultiLabelTarget(top_k=K)``) or a list of targets (see the module docstring). One forward pass,
            one backward pass per target.

    Returns:
        An :class:`FMGCAMResult`.

    Raises:
        FusionError: a base method that is not class-discriminative, or a target with nothing to fuse (one
            score: an embedding similarity, one regression output, a summed score; one target found).

    Example:
        >>> res = fmgcam(image="chelsea", k=3)  # doctest: +SKIP
        >>> res.fused[res.layers[-1]].shape  # doctest: +SKIP
        torch.Size([3, 7, 7])
        >>> res = fmgcam(net, x, target=MultiLabelTarget(top_k=3))  # doctest: +SKIP
        >>> res.names  # doctest: +SKIP
        ('sigmoid of 4', 'sigmoid of 0', 'sigmoid of 2')
    """
    base = check_base(base)
    if activation not in ACTIVATIONS:
        raise UnknownNameError("activation", activation, ACTIVATIONS)
    lm = as_loaded(model, device)
    if target is not None:
        fusable = check_fusable(target)
        ex = explain(lm, image, methods=base, layers=layers, target=fusable, input_size=input_size)
        return FMGCAMResult.from_explanation(ex, base, activation, norm=norm)
    score = "sigmoid" if multilabel else "logit"
    ex = explain(lm, image, methods=base, layers=layers, top_k=k, score=score, input_size=input_size)
    return FMGCAMResult.from_explanation(ex, base, activation, norm=norm, multilabel=multilabel)
