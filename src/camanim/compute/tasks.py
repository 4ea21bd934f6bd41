"""Targets beyond one class label: segmentation, detection, embeddings, multi-label and regression.

A target is any callable from the model's output to one score per sample ``(B,)``; the gradient methods
differentiate the summed scores. Classification targets (:mod:`camanim.compute.targets`) see the class
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

    @property
    def label(self) -> str:
        """A short text naming the target, for captions."""
        return self.kind

    def describe(self) -> dict[str, Any]:
        """What this target is, for the manifest."""
        return {"kind": self.kind}

    def region(self) -> Tensor | None:
        """The region the score is taken over, a mask ``(B, H, W)`` at the output's resolution, or None."""
        return None

    def boxes(self) -> list[list[tuple[float, float, float, float, str]]] | None:
        """Per sample, the boxes the score is taken over, ``(x1, y1, x2, y2, label)`` in input pixels."""
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
        category: the class.
        mask: the region: ``None`` (the pixels the model predicts as ``category``, decided at the first
            forward), a boolean or 0/1 array ``(H, W)`` or ``(B, H, W)`` at the output's resolution, or a box
            ``(x1, y1, x2, y2)`` in pixels.
        score: ``"logit"`` or ``"probability"`` (a softmax over the classes first).
    """

    kind = "segmentation"
    expect = "maps"

    def __init__(
        self, category: int, mask: np.ndarray | Tensor | Sequence[float] | None = None, score: str = "logit"
    ) -> None:
        if score not in ("logit", "probability"):
            raise TargetError(f"a segmentation target scores a logit or a probability, not {score!r}")
        self.category, self.score = int(category), score
        self.given = mask
        self._mask: Tensor | None = None

    @property
    def label(self) -> str:
        return f"class {self.category} over {'its predicted pixels' if self.given is None else 'the region'}"

    def describe(self) -> dict[str, Any]:
        given = self.given
        region = (
            "the pixels predicted as the class"
            if given is None
            else f"box {list(given)}"
            if _is_box(given)
            else "a mask given by the user"
        )
        return {"kind": self.kind, "class": self.category, "region": region, "score": self.score}

    def region(self) -> Tensor | None:
        return self._mask

    def fixed(self, sample: int = 0) -> SegmentationTarget:
        """The region of sample ``sample`` ``(1, H, W)``, the same for every image scored (not re-predicted:
        a perturbed image is scored over the region decided on the original)."""
        if self._mask is None:
            raise TargetError(
                "the segmentation region is decided at the first forward: score the original first"
            )
        twin = copy.copy(self)
        twin._mask = self._mask[sample : sample + 1]
        return twin

    def __call__(self, output: Any) -> Tensor:
        maps = _tensor(output, 4, "segmentation maps (B, K, H, W)")
        if not 0 <= self.category < maps.shape[1]:
            raise TargetError(
                f"class {self.category} is out of range: the model segments {maps.shape[1]} classes"
            )
        if self._mask is None:
            self._mask = self._make_mask(maps)
            if not bool(self._mask.any()):
                logger.warning(
                    "the region of class %d is empty: its score is 0 (give a region)", self.category
                )
        values = maps.softmax(dim=1) if self.score == "probability" else maps
        return (values[:, self.category] * self._mask.to(values.dtype)).sum(dim=(1, 2))

    def _make_mask(self, maps: Tensor) -> Tensor:
        b, _, h, w = maps.shape
        given = self.given
        if given is None:
            return maps.detach().argmax(dim=1) == self.category
        if _is_box(given):
            x1, y1, x2, y2 = (int(round(float(v))) for v in given)
            mask = torch.zeros(b, h, w, dtype=torch.bool, device=maps.device)
            mask[:, max(0, y1) : max(0, y2), max(0, x1) : max(0, x2)] = True
            return mask
        mask = torch.as_tensor(np.asarray(given)).to(maps.device).bool()
        mask = mask.expand(b, *mask.shape[-2:]) if mask.dim() == 2 else mask
        if tuple(mask.shape[-2:]) != (h, w):
            raise TargetError(
                f"the region mask is {tuple(mask.shape[-2:])} but the model's output is {h}x{w}: give a mask of "
                "the output's size"
            )
        return mask


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
    ) -> None:
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
        return f"{n} detection{'s' if n != 1 else ''}"

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "boxes": self.given_boxes,
            "labels": self.given_labels,
            "iou_threshold": self.iou_threshold,
            "top_n": self.top_n if self.given_boxes is None else None,
            "explained": None
            if self.chosen is None
            else [[{"box": list(b), "label": c} for b, c in sample] for sample in self.chosen],
        }

    def boxes(self) -> list[list[tuple[float, float, float, float, str]]] | None:
        if self.chosen is None:
            return None
        names = self.names or ()
        return [[(*b, names[c] if c < len(names) else str(c)) for b, c in sample] for sample in self.chosen]

    def __call__(self, output: Any) -> Tensor:
        if not isinstance(output, (list, tuple)) or not all(isinstance(o, Mapping) for o in output):
            raise TargetError(
                "a detection target needs the detector's list of dicts (boxes, labels, scores), one per image; "
                f"the model returned {type(output).__name__}"
            )
        if self._every is not None:
            return torch.stack([self._score(o, self._every) for o in output])
        if self.chosen is None:
            self.chosen = [self._choose(o) for o in output]
            if not any(self.chosen):
                logger.warning("no detection to explain (none above the detector's score threshold)")
        return torch.stack([self._score(o, chosen) for o, chosen in zip(output, self.chosen, strict=True)])

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

    def _score(self, out: Mapping[str, Tensor], chosen: list[tuple[tuple[float, ...], int]]) -> Tensor:
        boxes = out["boxes"]
        total = boxes.new_zeros(())
        if len(boxes) == 0:
            return total
        for box, label in chosen:
            ious = torchvision.ops.box_iou(torch.tensor([box], dtype=boxes.dtype, device=boxes.device), boxes)
            i = ious.argmax()
            if ious[0, i] > self.iou_threshold and int(out["labels"][i]) == label:
                total = total + ious[0, i] + out["scores"][i]
        return total


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
    """The summed sigmoid probabilities of one or several labels of a multi-label head ``(B, K)``.

    Args:
        labels: the label indices.
        names: all label names, for captions.
    """

    kind = "multilabel"
    expect = "scores"

    def __init__(self, labels: Sequence[int], names: Sequence[str] | None = None) -> None:
        if not labels:
            raise TargetError("a multi-label target needs at least one label")
        self.labels = tuple(int(v) for v in labels)
        self.names = names

    @property
    def label(self) -> str:
        names = [self.names[i] if self.names and i < len(self.names) else str(i) for i in self.labels]
        return "sigmoid of " + " + ".join(names)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "labels": list(self.labels), "score": "sigmoid"}

    def __call__(self, output: Any) -> Tensor:
        scores = _tensor(output, 2, "label scores (B, K)")
        if max(self.labels) >= scores.shape[1]:
            raise TargetError(
                f"label {max(self.labels)} is out of range: the model has {scores.shape[1]} labels"
            )
        return scores[:, list(self.labels)].sigmoid().sum(dim=1)


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
