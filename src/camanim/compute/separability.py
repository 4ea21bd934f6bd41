"""How well a representation separates labelled classes: leave-one-out k-NN, a linear probe, silhouette.

Three views of the same question, all on the vectors as given (Euclidean geometry, float64):

* **k-NN accuracy**, leave-one-out: each image is classified by the majority label of its ``k`` nearest
  other images (ties go to the smallest class index, as scikit-learn's ``KNeighborsClassifier``); the
  fraction classified correctly. Local structure: are neighbours of the same class?
* **Linear-probe accuracy**, cross-validated: a ridge-regression classifier on one-hot targets (features
  standardised on each training fold; ``alpha`` = 1, as scikit-learn's ``RidgeClassifier``) trained on
  ``folds - 1`` stratified folds and scored on the held-out one; the mean over folds. Linear
  decodability: could one linear layer read the class out? Closed form, so every layer is probed exactly
  and fast (a logistic-regression probe ranks layers the same way in practice but needs an iterative
  solver per layer and fold).
* **Silhouette score** (Rousseeuw 1987): per image ``(b - a) / max(a, b)`` with ``a`` the mean distance to
  its own class and ``b`` the smallest mean distance to another class, averaged; in ``[-1, 1]``. Global
  geometry: are classes compact and apart? (An image alone in its class counts 0, as in scikit-learn.)

:func:`separability` computes all three, the distances once, in row blocks so that memory stays
``block x n`` whatever the number of images. :func:`check_labels` says, before any work, why labels cannot
be scored (fewer than two classes, fewer images than ``k + 1``, a class too small for the folds).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from camanim.errors import CamanimError

METRICS = ("knn", "probe", "silhouette")
METRIC_TITLES = {"knn": "k-NN accuracy", "probe": "linear-probe accuracy", "silhouette": "silhouette"}
#: Distance rows computed at once: memory ``BLOCK_ELEMENTS`` float64 numbers per block.
BLOCK_ELEMENTS = 2**24


class SeparabilityError(CamanimError, ValueError):
    """Labels that separability cannot be scored with (no labels, one class, too few images)."""


@dataclass(frozen=True)
class Separability:
    """Class separability of one representation.

    Attributes:
        knn: leave-one-out k-NN accuracy in ``[0, 1]``.
        probe: cross-validated linear-probe accuracy in ``[0, 1]``.
        silhouette: silhouette score in ``[-1, 1]``.
    """

    knn: float
    probe: float
    silhouette: float

    def __getitem__(self, metric: str) -> float:
        if metric not in METRICS:
            raise KeyError(f"unknown separability metric {metric!r}; valid: {', '.join(METRICS)}")
        return float(getattr(self, metric))

    def as_dict(self) -> dict[str, float]:
        return {m: self[m] for m in METRICS}


def encode_labels(labels: Sequence) -> tuple[np.ndarray, tuple[str, ...]]:
    """Labels as class indices ``(n,)`` int64 and the class names (sorted; numbers in numeric order)."""
    names = [str(v) for v in labels]
    distinct = set(names)
    if all(_is_int(v) for v in distinct):
        classes = tuple(sorted(distinct, key=int))
    else:
        classes = tuple(sorted(distinct))
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[v] for v in names], dtype=np.int64), classes


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


def check_labels(labels: Sequence | None, *, k: int = 5, folds: int = 5) -> int:
    """Check that ``labels`` can be scored; returns the number of folds the probe will use.

    The probe uses ``min(folds, smallest class size)`` stratified folds, at least 2.

    Raises:
        SeparabilityError: no labels, a single class, fewer than ``k + 1`` images, a class of one image,
            or ``k < 1`` / ``folds < 2``.
    """
    if labels is None:
        raise SeparabilityError(
            "separability needs labels: give one label per image (class sub-folders, a CSV with a label "
            "column, or labels=...)"
        )
    if k < 1:
        raise SeparabilityError(f"k must be at least 1, got {k}")
    if folds < 2:
        raise SeparabilityError(f"the linear probe needs at least 2 folds, got {folds}")
    names = [str(v) for v in labels]
    n = len(names)
    counts = Counter(names)
    if len(counts) < 2:
        only = next(iter(counts), "?")
        raise SeparabilityError(
            f"separability needs at least 2 classes; all {n} images have the label {only!r}"
        )
    if n < k + 1:
        raise SeparabilityError(
            f"k-NN with k={k} needs at least {k + 1} images (each is classified by {k} others), got {n}: "
            "give more images or a smaller k"
        )
    smallest, size = min(counts.items(), key=lambda kv: (kv[1], kv[0]))
    if size < 2:
        raise SeparabilityError(
            f"class {smallest!r} has a single image: the cross-validated linear probe needs at least 2 images "
            "per class (one to train on, one to test)"
        )
    return min(folds, size)


def stratified_folds(y: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """A fold index ``(n,)`` in ``0..folds-1`` per image: each class shuffled (seeded) and dealt round-robin,
    so every fold holds every class with at least ``folds`` images."""
    rng = np.random.default_rng(seed)
    out = np.empty(len(y), dtype=np.int64)
    start = 0
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        out[idx] = (start + np.arange(len(idx))) % folds
        start += len(idx)  # continue the deal, so folds stay balanced in size across classes
    return out


def _as64(x: Tensor | np.ndarray) -> Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).reshape(len(x), -1).double()


def _distance_blocks(x: Tensor):
    """Yield ``(start, rows of the Euclidean distance matrix (m, n))`` in blocks."""
    n = x.shape[0]
    sq = (x * x).sum(1)
    step = max(1, BLOCK_ELEMENTS // max(n, 1))
    for s in range(0, n, step):
        xb = x[s : s + step]
        d2 = sq[s : s + step, None] + sq[None, :] - 2 * xb @ x.T
        yield s, d2.clamp_min_(0).sqrt_()


def knn_silhouette(x: Tensor | np.ndarray, y: np.ndarray, k: int = 5) -> tuple[float, float]:
    """Leave-one-out k-NN accuracy and silhouette score of vectors ``(n, D)`` with class indices ``(n,)``."""
    x = _as64(x)
    y_t = torch.as_tensor(y, dtype=torch.long)
    n = x.shape[0]
    c = int(y_t.max()) + 1
    onehot = torch.nn.functional.one_hot(y_t, c).double()  # (n, C)
    sizes = onehot.sum(0)
    correct = 0
    sil = torch.zeros(n, dtype=torch.float64)
    kk = min(k, n - 1)
    for s, d in _distance_blocks(x):
        m = d.shape[0]
        rows = torch.arange(m)
        own = y_t[s : s + m]
        # silhouette: mean distance to each class (own class without the image itself)
        per_class = d @ onehot  # (m, C) summed distances
        own_size = sizes[own] - 1
        a = per_class[rows, own] / own_size.clamp_min(1)
        other = per_class / sizes
        other[rows, own] = math.inf
        b = other.min(1).values
        si = (b - a) / torch.maximum(a, b)
        si = torch.where((own_size > 0) & torch.isfinite(si), si, torch.zeros_like(si))
        sil[s : s + m] = si
        # k-NN: leave the image itself out
        d[rows, s + rows] = math.inf
        nn_idx = d.topk(kk, dim=1, largest=False).indices
        votes = torch.nn.functional.one_hot(y_t[nn_idx], c).sum(1)  # (m, C)
        correct += int((votes.argmax(1) == own).sum())
    return correct / n, float(sil.mean())


def probe_accuracy(
    x: Tensor | np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0, alpha: float = 1.0
) -> float:
    """Cross-validated accuracy of a ridge classifier on standardised vectors (see the module docstring).

    Args:
        x: vectors ``(n, D)``.
        y: class indices ``(n,)``.
        folds: stratified folds (:func:`stratified_folds`).
        seed: seed of the fold assignment.
        alpha: ridge penalty on the standardised features.
    """
    x = _as64(x)
    y_t = torch.as_tensor(y, dtype=torch.long)
    c = int(y_t.max()) + 1
    fold = torch.as_tensor(stratified_folds(np.asarray(y), folds, seed))
    accs = []
    for f in range(folds):
        test = fold == f
        train = ~test
        xt = x[train]
        mean = xt.mean(0)
        std = xt.std(0, unbiased=False)
        std = torch.where(std > 0, std, torch.ones_like(std))
        xs = (xt - mean) / std
        t = torch.nn.functional.one_hot(y_t[train], c).double() * 2 - 1
        intercept = t.mean(0)  # the class priors: x is centred on the training fold
        t = t - intercept
        d = xs.shape[1]
        if d <= xs.shape[0]:
            w = torch.linalg.solve(xs.T @ xs + alpha * torch.eye(d, dtype=torch.float64), xs.T @ t)
        else:  # more features than images: the dual form
            w = xs.T @ torch.linalg.solve(xs @ xs.T + alpha * torch.eye(xs.shape[0], dtype=torch.float64), t)
        pred = (((x[test] - mean) / std) @ w + intercept).argmax(1)
        accs.append(float((pred == y_t[test]).double().mean()))
    return float(np.mean(accs))


def separability(
    x: Tensor | np.ndarray, y: np.ndarray, *, k: int = 5, folds: int = 5, seed: int = 0
) -> Separability:
    """k-NN accuracy, linear-probe accuracy and silhouette of vectors ``(n, D)`` with class indices ``(n,)``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> y = np.repeat([0, 1], 20)
        >>> x = rng.normal(size=(40, 3)) + 4 * y[:, None]
        >>> s = separability(x, y)
        >>> s.knn, s.probe
        (1.0, 1.0)
    """
    y = np.asarray(y)
    folds = check_labels(y.tolist(), k=k, folds=folds)
    knn, sil = knn_silhouette(x, y, k)
    return Separability(knn=knn, probe=probe_accuracy(x, y, folds, seed), silhouette=sil)
