"""Targets beyond one class label: segmentation, detection, embeddings, multi-label and regression.

A target is any callable from the model's output to one score per sample ``(B,)``, or to ``K`` scores per
sample ``(B, K)``: ``K`` targets sharing one forward pass, each differentiated by a backward pass of its own
(:func:`camanim.explain` then explains one image, and the batch axis of its maps holds the targets, as with
``top_k`` classes). The gradient methods differentiate the summed scores of each target. Classification targets (:mod:`camanim.compute.targets`) see the class
scores ``(B, K)``. The targets here say what they need to see with two attributes, read by
:func:`camanim.explain`:

* ``output``: how the output selector reads the model's output (:class:`~camanim.compute.targets.
  OutputSelector`): ``None`` (automatic: a tensor, else its ``logits`` or ``out``), a key, an index, or
  :func:`raw_output` for the output exactly as the model returns it (a detector's list of dicts);
* ``expect``: the shape the selected output must have: ``"scores"`` ``(B, K)``, ``"maps"``
  ``(B, K, H, W)``, ``"vector"`` ``(B,)`` or ``(B, D)``, or ``"any"``.

Each also has ``kind`` (``"segmentation"``, ``"detection"``...), a ``label`` for captions, ``describe()``
for the manifest (enough to reproduce it), and what frames draw over the image: :meth:`TaskTarget.region`
(a mask ``(B, H, W)``) and :meth:`TaskTarget.boxes` (per sample, ``(x1, y1, x2, y2, label)`` in input
pixels). A user's own callable works too: it sees the output after the model's output selector.

Several targets at once: ``each=True`` makes the targets of several labels (:class:`MultiLabelTarget`), boxes
or detections (:class:`BoxScoreTarget`) or classes (:class:`SegmentationTarget`) ``K`` targets, one score each
``(B, K)``, instead of one summed score; :class:`MultiLabelTarget` with ``top_k`` explains the ``k`` labels of
highest sigmoid score, each; :class:`StackedTarget` (what ``explain`` makes of a list of targets) stacks the
scores of any targets reading the same output. :attr:`TaskTarget.target_labels` names each of the ``K``;
:meth:`TaskTarget.region` and :meth:`TaskTarget.boxes` then give one entry per target.

The perturbation metrics (ROAD, deletion, the confidence metrics: :mod:`camanim.compute.metrics`) score a
target on many perturbed copies of one image at once; :meth:`TaskTarget.fixed` gives the target as decided
on the original (its region, its chosen detections) for batches of any size. A user's callable is used as
it is there and must give one score per image of whatever batch it sees.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torchvision
from torch import Tensor

from camanim.errors import TargetError

logger = logging.getLogger(__name__)

__all__ = [
    "BoxScoreTarget",
    "MultiLabelTarget",
    "RegressionTarget",
    "SegmentationTarget",
    "SimilarityTarget",
    "StackedTarget",
    "TaskTarget",
    "raw_output",
]


def raw_output(out: Any) -> Any:
    """The model's output exactly as it returns it (an output selector for detectors' lists of dicts)."""
    return out


class TaskTarget:
    """Base of the task targets (see the module docstring)."""

    kind: str = "custom"
    output: Any = None
    expect: str = "any"
    #: Whether the target gives one score per part (label, box, class) ``(B, K)`` rather than their sum ``(B,)``.
    each: bool = False

    @property
    def label(self) -> str:
        """A short text naming the target, for captions."""
        return self.kind

    @property
    def target_labels(self) -> tuple[str, ...]:
        """The label of each target the scores hold: ``(label,)`` for one score per sample, else one per
        column of the ``(B, K)`` scores (known once the target has seen the output, for a target that decides
        at the first forward)."""
        return (self.label,)

    def describe(self) -> dict[str, Any]:
        """What this target is, for the manifest."""
        return {"kind": self.kind}

    def region(self) -> Tensor | None:
        """The region the score is taken over, a mask ``(B, H, W)`` at the output's resolution, or None; for
        ``K`` targets one mask per target and sample, ``(K * B, H, W)`` target-major."""
        return None

    def boxes(self) -> list[list[tuple[float, float, float, float, str]]] | None:
        """Per sample, the boxes the score is taken over, ``(x1, y1, x2, y2, label)`` in input pixels; for ``K``
        targets one list per target and sample (``K * B``, target-major)."""
        return None

    def fixed(self, sample: int = 0) -> TaskTarget:
        """The target as decided for sample ``sample`` at its first forward, scoring every image of any
        batch as a copy of that sample (for the perturbation metrics' batches of perturbed copies). A target
        with nothing to decide is itself.

        Raises:
            TargetError: the target has not seen the original image yet (nothing is decided).
        """
        return self

    def __call__(self, output: Any) -> Tensor:
        raise NotImplementedError


class SegmentationTarget(TaskTarget):
    """The summed logit (or probability) of one class over a region (grad-cam's ``SemanticSegmentationTarget``).

    Args:
        category: the class, or several classes: each over its own region (its predicted pixels, or the
            region given), their scores summed, or with ``each`` one target per class ``(B, K)``.
        mask: the region: ``None`` (the pixels the model predicts as ``category``, decided at the first
            forward), a boolean or 0/1 array ``(H, W)`` or ``(B, H, W)`` at the output's resolution, or a box
            ``(x1, y1, x2, y2)`` in pixels.
        score: ``"logit"`` or ``"probability"`` (a softmax over the classes first).
        each: one target per class (see the module docstring).

    Example:
        >>> t = SegmentationTarget([1, 2], each=True)
        >>> t(torch.zeros(1, 3, 4, 4)).shape
        torch.Size([1, 2])
    """

    kind = "segmentation"
    expect = "maps"

    def __init__(
        self,
        category: int | Sequence[int],
        mask: np.ndarray | Tensor | Sequence[float] | None = None,
        score: str = "logit",
        *,
        each: bool = False,
    ) -> None:
        if score not in ("logit", "probability"):
            raise TargetError(f"a segmentation target scores a logit or a probability, not {score!r}")
        categories = (category,) if np.isscalar(category) else tuple(category)  # type: ignore[arg-type]
        if not categories:
            raise TargetError("a segmentation target needs at least one class")
        self.categories = tuple(int(c) for c in categories)
        self.category, self.score, self.each = self.categories[0], score, bool(each)
        self.given = mask
        self._masks: Tensor | None = None  # (B, K, H, W): the region of each class

    def _where(self) -> str:
        return "its predicted pixels" if self.given is None else "the region"

    @property
    def label(self) -> str:
        if len(self.categories) == 1:
            return f"class {self.category} over {self._where()}"
        joined = ", ".join(str(c) for c in self.categories)
        return f"classes {joined} over {'their predicted pixels' if self.given is None else 'the region'}"

    @property
    def target_labels(self) -> tuple[str, ...]:
        if not self.each:
            return (self.label,)
        return tuple(f"class {c} over {self._where()}" for c in self.categories)

    def describe(self) -> dict[str, Any]:
        given = self.given
        region = (
            "the pixels predicted as the class"
            if given is None
            else f"box {list(given)}"
            if _is_box(given)
            else "a mask given by the user"
        )
        cls: int | list[int] = self.category if len(self.categories) == 1 else list(self.categories)
        return {"kind": self.kind, "class": cls, "region": region, "score": self.score} | (
            {"each": True} if self.each else {}
        )

    def region(self) -> Tensor | None:
        masks = self._masks
        if masks is None:
            return None
        if self.each:
            return masks.transpose(0, 1).reshape(-1, *masks.shape[2:])
        return masks.any(dim=1)

    def fixed(self, sample: int = 0) -> SegmentationTarget:
        """The region of sample ``sample`` ``(1, H, W)``, the same for every image scored (not re-predicted:
        a perturbed image is scored over the region decided on the original)."""
        if self._masks is None:
            raise TargetError(
                "the segmentation region is decided at the first forward: score the original first"
            )
        twin = copy.copy(self)
        twin._masks = self._masks[sample : sample + 1]
        return twin

    def __call__(self, output: Any) -> Tensor:
        maps = _tensor(output, 4, "segmentation maps (B, K, H, W)")
        bad = [c for c in self.categories if not 0 <= c < maps.shape[1]]
        if bad:
            raise TargetError(f"class {bad[0]} is out of range: the model segments {maps.shape[1]} classes")
        if self._masks is None:
            self._masks = self._make_masks(maps)
            for c, empty in zip(self.categories, ~self._masks.flatten(2).any(dim=2).any(dim=0), strict=True):
                if bool(empty):
                    logger.warning("the region of class %d is empty: its score is 0 (give a region)", c)
        values = maps.softmax(dim=1) if self.score == "probability" else maps
        scores = (values[:, list(self.categories)] * self._masks.to(values.dtype)).sum(dim=(2, 3))
        return scores if self.each else scores.sum(dim=1)

    def _make_masks(self, maps: Tensor) -> Tensor:
        """The region of each class ``(B, K, H, W)``."""
        b, _, h, w = maps.shape
        k = len(self.categories)
        given = self.given
        if given is None:
            predicted = maps.detach().argmax(dim=1)
            return torch.stack([predicted == c for c in self.categories], dim=1)
        if _is_box(given):
            x1, y1, x2, y2 = (int(round(float(v))) for v in given)
            mask = torch.zeros(b, h, w, dtype=torch.bool, device=maps.device)
            mask[:, max(0, y1) : max(0, y2), max(0, x1) : max(0, x2)] = True
            return mask[:, None].expand(b, k, h, w)
        mask = torch.as_tensor(np.asarray(given)).to(maps.device).bool()
        mask = mask.expand(b, *mask.shape[-2:]) if mask.dim() == 2 else mask
        if tuple(mask.shape[-2:]) != (h, w):
            raise TargetError(
                f"the region mask is {tuple(mask.shape[-2:])} but the model's output is {h}x{w}: give a mask of "
                "the output's size"
            )
        return mask[:, None].expand(mask.shape[0], k, h, w)


class BoxScoreTarget(TaskTarget):
    """The score of detections (grad-cam's ``FasterRCNNBoxScoreTarget``): for each given box and label, the
    detection of that label overlapping it most, when its IoU exceeds ``iou_threshold``, adds its IoU and its
    class score; without boxes, the ``top_n`` most confident detections of the first forward are the given
    ones. The output is the detector's list of dicts (``boxes``, ``labels``, ``scores``), one per sample.

    Args:
        boxes: ``(x1, y1, x2, y2)`` per box, in input pixels (the same boxes for every sample), or None.
        labels: the class of each box (None: the labels the first forward detected there).
        iou_threshold: the least IoU for a detection to count.
        top_n: how many of the most confident detections, when no box is given.
        names: class names, for captions.
        each: one target per box or detection ``(B, N)`` (one backward pass each) instead of their summed
            score; a sample with fewer matches than another scores 0 for the missing ones.
    """

    kind = "detection"
    output = staticmethod(raw_output)
    expect = "any"

    def __init__(
        self,
        boxes: Sequence[Sequence[float]] | None = None,
        labels: Sequence[int] | None = None,
        *,
        iou_threshold: float = 0.5,
        top_n: int = 1,
        names: Sequence[str] | None = None,
        each: bool = False,
    ) -> None:
        self.each = bool(each)
        self.given_boxes = None if boxes is None else [tuple(float(v) for v in b) for b in boxes]
        self.given_labels = None if labels is None else [int(v) for v in labels]
        if self.given_boxes is not None and self.given_labels is not None:
            if len(self.given_boxes) != len(self.given_labels):
                raise TargetError(f"{len(self.given_boxes)} boxes but {len(self.given_labels)} labels")
        self.iou_threshold, self.top_n = float(iou_threshold), int(top_n)
        self.names = names
        self.chosen: list[list[tuple[tuple[float, ...], int]]] | None = None
        self._every: list[tuple[tuple[float, ...], int]] | None = None  # fixed(): one choice for all images

    @property
    def label(self) -> str:
        n = len(self.given_boxes) if self.given_boxes is not None else self.top_n
        return f"{n} detection{'s' if n != 1 else ''}" + (", each" if self.each and n != 1 else "")

    @property
    def target_labels(self) -> tuple[str, ...]:
        if not self.each:
            return (self.label,)
        boxes = self.boxes()
        if boxes is None:
            return tuple(f"detection {k}" for k in range(self._count()))
        return tuple(
            f"{b[0][4]} at ({b[0][0]:.0f}, {b[0][1]:.0f}, {b[0][2]:.0f}, {b[0][3]:.0f})" for b in boxes
        )

    def _count(self) -> int:
        """How many boxes each sample scores (the most of any sample once chosen)."""
        if self.chosen is not None:
            return max((len(c) for c in self.chosen), default=0)
        return len(self.given_boxes) if self.given_boxes is not None else self.top_n

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "boxes": self.given_boxes,
            "labels": self.given_labels,
            "iou_threshold": self.iou_threshold,
            "top_n": self.top_n if self.given_boxes is None else None,
            **({"each": True} if self.each else {}),
            "explained": None
            if self.chosen is None
            else [[{"box": list(b), "label": c} for b, c in sample] for sample in self.chosen],
        }

    def boxes(self) -> list[list[tuple[float, float, float, float, str]]] | None:
        if self.chosen is None:
            return None
        names = self.names or ()
        per_sample = [
            [(*b, names[c] if c < len(names) else str(c)) for b, c in sample] for sample in self.chosen
        ]
        if not self.each:
            return per_sample
        return [[one[k]] if k < len(one) else [] for k in range(self._count()) for one in per_sample]

    def __call__(self, output: Any) -> Tensor:
        if not isinstance(output, (list, tuple)) or not all(isinstance(o, Mapping) for o in output):
            raise TargetError(
                "a detection target needs the detector's list of dicts (boxes, labels, scores), one per image; "
                f"the model returned {type(output).__name__}"
            )
        if self._every is not None:
            parts = [self._parts(o, self._every) for o in output]
        else:
            if self.chosen is None:
                self.chosen = [self._choose(o) for o in output]
                if not any(self.chosen):
                    logger.warning("no detection to explain (none above the detector's score threshold)")
            parts = [self._parts(o, chosen) for o, chosen in zip(output, self.chosen, strict=True)]
        if not self.each:
            return torch.stack([p.sum() for p in parts])
        n = max(len(p) for p in parts)
        return torch.stack([torch.cat([p, p.new_zeros(n - len(p))]) for p in parts])

    def fixed(self, sample: int = 0) -> BoxScoreTarget:
        """The boxes and labels chosen for sample ``sample``, matched in every image scored: in a perturbed
        image each is re-matched by IoU (the best-overlapping detection of its label above
        ``iou_threshold`` adds its IoU and score; none adds 0)."""
        if self.chosen is None:
            raise TargetError("the detections are chosen at the first forward: score the original first")
        twin = copy.copy(self)
        twin._every = list(self.chosen[sample])
        return twin

    def _choose(self, out: Mapping[str, Tensor]) -> list[tuple[tuple[float, ...], int]]:
        boxes, labels, scores = out["boxes"].detach(), out["labels"].detach(), out["scores"].detach()
        if self.given_boxes is None:
            order = scores.argsort(descending=True)[: self.top_n]
            return [(tuple(float(v) for v in boxes[i]), int(labels[i])) for i in order]
        chosen = []
        for k, box in enumerate(self.given_boxes):
            label = None if self.given_labels is None else self.given_labels[k]
            if label is None:  # the label the detector gives its best match
                if len(boxes) == 0:
                    raise TargetError("no detection to take the label from: give the labels of the boxes")
                ious = torchvision.ops.box_iou(torch.tensor([box], dtype=boxes.dtype), boxes)[0]
                label = int(labels[ious.argmax()])
            chosen.append((box, label))
        return chosen

    def _parts(self, out: Mapping[str, Tensor], chosen: list[tuple[tuple[float, ...], int]]) -> Tensor:
        """The score of each chosen box ``(N,)``: IoU + class score of its best match, or 0."""
        boxes = out["boxes"]
        parts = []
        for box, label in chosen:
            part = boxes.new_zeros(())
            if len(boxes):
                ious = torchvision.ops.box_iou(
                    torch.tensor([box], dtype=boxes.dtype, device=boxes.device), boxes
                )
                i = ious.argmax()
                if ious[0, i] > self.iou_threshold and int(out["labels"][i]) == label:
                    part = ious[0, i] + out["scores"][i]
            parts.append(part)
        return torch.stack(parts) if parts else boxes.new_zeros(0)


class SimilarityTarget(TaskTarget):
    """The cosine similarity of the model's embedding ``(B, D)`` to a reference ``(D,)`` (grad-cam's
    tutorial ``SimilarityToConceptTarget``): for retrieval, verification and feature extractors.

    Args:
        reference: the vector ``(D,)`` (another image's embedding, or a concept's).
        name: what the reference is, for captions.
    """

    kind = "embedding"
    expect = "vector"

    def __init__(self, reference: Tensor | np.ndarray, name: str = "the reference") -> None:
        self.reference = torch.as_tensor(np.asarray(reference), dtype=torch.float32).flatten()
        self.name = name

    @property
    def label(self) -> str:
        return f"similarity to {self.name}"

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "reference": self.name, "dimensions": int(self.reference.numel())}

    def __call__(self, output: Any) -> Tensor:
        emb = _tensor(output, None, "an embedding (B, D)").flatten(1)
        if emb.shape[1] != self.reference.numel():
            raise TargetError(
                f"the model's embedding has {emb.shape[1]} dimensions, the reference {self.reference.numel()}"
            )
        return torch.nn.functional.cosine_similarity(emb, self.reference.to(emb)[None], dim=1)


class MultiLabelTarget(TaskTarget):
    """The summed sigmoid probabilities of one or several labels of a multi-label head ``(B, K)``; with
    ``each``, one target per label (the sigmoid of each, ``(B, K)``, one backward pass each); with ``top_k``,
    the ``k`` labels of highest sigmoid score of the first forward's first sample, each (FM-G-CAM's top-K
    over sigmoid scores; :func:`camanim.fmgcam` with ``multilabel=True`` fuses a classifier's).

    Args:
        labels: the label indices (None with ``top_k``).
        names: all label names, for captions.
        each: one target per label instead of their summed sigmoid.
        top_k: explain the ``k`` most probable labels, each (implies ``each``).

    Example:
        >>> MultiLabelTarget([0, 2], each=True)(torch.zeros(1, 3)).tolist()
        [[0.5, 0.5]]
    """

    kind = "multilabel"
    expect = "scores"

    def __init__(
        self,
        labels: Sequence[int] | None = None,
        names: Sequence[str] | None = None,
        *,
        each: bool = False,
        top_k: int | None = None,
    ) -> None:
        if top_k is not None and (labels is not None or int(top_k) < 1):
            raise TargetError("a multi-label target takes labels or top_k (at least 1), not both")
        if top_k is None and not labels:
            raise TargetError("a multi-label target needs at least one label (or top_k)")
        self.top_k = None if top_k is None else int(top_k)
        self.labels: tuple[int, ...] = () if labels is None else tuple(int(v) for v in labels)
        self.names = names
        self.each = bool(each) or top_k is not None

    def _name(self, i: int) -> str:
        return self.names[i] if self.names and i < len(self.names) else str(i)

    @property
    def label(self) -> str:
        if not self.labels:
            return f"sigmoid of the top {self.top_k} labels"
        joined = (", " if self.each else " + ").join(self._name(i) for i in self.labels)
        return ("sigmoid of each of " if self.each and len(self.labels) > 1 else "sigmoid of ") + joined

    @property
    def target_labels(self) -> tuple[str, ...]:
        if not self.each:
            return (self.label,)
        if not self.labels:
            return tuple(f"label ranked {k + 1}" for k in range(self.top_k or 0))
        return tuple(f"sigmoid of {self._name(i)}" for i in self.labels)

    def describe(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"each": True} if self.each else {}
        if self.top_k is not None:
            extra["top_k"] = self.top_k
        return {"kind": self.kind, "labels": list(self.labels), "score": "sigmoid"} | extra

    def __call__(self, output: Any) -> Tensor:
        scores = _tensor(output, 2, "label scores (B, K)")
        if not self.labels:  # top_k: ranked on the first forward's first sample
            if self.top_k > scores.shape[1]:  # type: ignore[operator]
                raise TargetError(f"top_k is {self.top_k} but the model has {scores.shape[1]} labels")
            self.labels = tuple(int(i) for i in scores.detach()[0].float().topk(self.top_k).indices)
        if max(self.labels) >= scores.shape[1]:
            raise TargetError(
                f"label {max(self.labels)} is out of range: the model has {scores.shape[1]} labels"
            )
        values = scores[:, list(self.labels)].sigmoid()
        return values if self.each else values.sum(dim=1)


class StackedTarget(TaskTarget):
    """Several targets as ``K`` targets of one capture: their scores stacked ``(B, K)`` (a target that gives
    ``(B, K_i)`` contributes its ``K_i`` columns), one backward pass each over the shared forward. What
    :func:`camanim.explain` makes of a list of targets. They must read the model's output the same way
    (their ``output`` and ``expect``).

    Args:
        targets: task targets, or callables of one's own (which see the output after the output selector).

    Example:
        >>> t = StackedTarget([MultiLabelTarget([0]), MultiLabelTarget([2])])
        >>> t(torch.zeros(1, 3)).shape
        torch.Size([1, 2])
    """

    each = True

    def __init__(self, targets: Sequence[Any]) -> None:
        self.targets = tuple(targets)
        if not self.targets or not all(callable(t) for t in self.targets):
            raise TargetError("a list of targets holds callables (task targets): at least one")
        reads = {(id(getattr(t, "output", None)), getattr(t, "expect", "any")) for t in self.targets}
        if len(reads) > 1:
            raise TargetError(
                "the targets of one capture must read the model's output the same way (their output and "
                "expect): explain the others in a call of their own"
            )
        first = self.targets[0]
        self.output = getattr(first, "output", None)
        self.expect = getattr(first, "expect", "any")
        kinds = {getattr(t, "kind", "custom") for t in self.targets}
        self.kind = kinds.pop() if len(kinds) == 1 else "several"
        self._columns: list[int] | None = None  # how many scores each target gave

    @property
    def label(self) -> str:
        return " | ".join(_label_of(t) for t in self.targets)

    @property
    def target_labels(self) -> tuple[str, ...]:
        labels: list[str] = []
        for t in self.targets:
            labels += list(getattr(t, "target_labels", None) or (_label_of(t),))
        return tuple(labels)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "targets": [
                t.describe() if hasattr(t, "describe") else {"kind": "custom", "target": _label_of(t)}
                for t in self.targets
            ],
        }

    def region(self) -> Tensor | None:
        regions = [t.region() if hasattr(t, "region") else None for t in self.targets]
        if all(r is None for r in regions) or self._columns is None:
            return None
        r0, n0 = next((r, n) for r, n in zip(regions, self._columns, strict=True) if r is not None)
        b = r0.shape[0] // n0  # samples
        return torch.cat(
            [
                r.bool() if r is not None else r0.new_zeros(n * b, *r0.shape[1:], dtype=torch.bool)
                for r, n in zip(regions, self._columns, strict=True)
            ]
        )

    def boxes(self) -> list[list[tuple[float, float, float, float, str]]] | None:
        per = [t.boxes() if hasattr(t, "boxes") else None for t in self.targets]
        if all(b is None for b in per) or self._columns is None:
            return None
        out: list[list[tuple[float, float, float, float, str]]] = []
        for b, n in zip(per, self._columns, strict=True):
            out += b if b is not None else [[] for _ in range(n)]
        return out

    def fixed(self, sample: int = 0) -> StackedTarget:
        twin = StackedTarget([t.fixed(sample) if hasattr(t, "fixed") else t for t in self.targets])
        twin._columns = self._columns
        return twin

    def __call__(self, output: Any) -> Tensor:
        columns = []
        for t in self.targets:
            score = t(output)
            columns.append(score[:, None] if score.dim() == 1 else score)
        self._columns = [c.shape[1] for c in columns]
        return torch.cat(columns, dim=1)


def _label_of(target: Any) -> str:
    return str(getattr(target, "label", getattr(target, "__name__", "custom target")))


class RegressionTarget(TaskTarget):
    """A regression output: the scalar ``(B,)`` or ``(B, 1)``, or element ``index`` of ``(B, D)``.

    Args:
        index: which output element (None: the output must be one value per sample).
    """

    kind = "regression"
    expect = "vector"

    def __init__(self, index: int | None = None) -> None:
        self.index = None if index is None else int(index)

    @property
    def label(self) -> str:
        return "the output" if self.index is None else f"output {self.index}"

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "index": self.index}

    def __call__(self, output: Any) -> Tensor:
        values = _tensor(output, None, "a regression output (B,) or (B, D)").flatten(1)
        if self.index is None:
            if values.shape[1] != 1:
                raise TargetError(
                    f"the model outputs {values.shape[1]} values per sample: give the index of the one to explain"
                )
            return values[:, 0]
        if not -values.shape[1] <= self.index < values.shape[1]:
            raise TargetError(
                f"output index {self.index} is out of range: the model outputs {values.shape[1]}"
            )
        return values[:, self.index]


def _tensor(output: Any, dims: int | None, what: str) -> Tensor:
    if not isinstance(output, Tensor) or (dims is not None and output.dim() != dims):
        shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise TargetError(f"this target needs {what}; the model's output is {shape}: choose it with output=")
    return output


def _is_box(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 4 and all(np.isscalar(v) for v in value)
