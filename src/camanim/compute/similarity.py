"""Linear CKA between layers' representations (Kornblith, Norouzi, Lee and Hinton, ICML 2019).

For two representations of the same ``n`` inputs, ``X (n, p)`` and ``Y (n, q)``, with linear kernels
``K = X X^T`` and ``L = Y Y^T``::

    CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))

It is 1 for a representation and itself, invariant to orthogonal transforms and isotropic scaling of
either, and symmetric.

**Minibatches.** The Gram matrices of all images do not fit in memory for large datasets (n x n per layer),
so CKA is accumulated over minibatches as in Nguyen, Raghu and Kornblith (ICLR 2021, "Do wide and deep
networks learn the same things?"): each minibatch of ``b >= 4`` images contributes the *unbiased* HSIC
estimator of Song et al. (JMLR 2012, Eq. 5),

    HSIC_1(K, L) = [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((b-1)(b-2)) - 2/(b-2) 1^T K~ L~ 1] / (b (b-3)),

``K~`` being ``K`` with its diagonal set to zero, and

    CKA_minibatch(X, Y) = sum_i HSIC_1(K_i, L_i) / sqrt(sum_i HSIC_1(K_i, K_i) sum_i HSIC_1(L_i, L_i)).

Being unbiased, the per-batch estimates average to the population HSIC whatever the batch size, so the
ratio converges to CKA as batches accrue (the biased estimator would drift with the batch size). Batches
must be random samples of the data (the embedding pipeline shuffles them). With one batch holding every
image, it is the full-batch unbiased CKA exactly (:func:`linear_cka` with ``unbiased=True``).

:func:`hsic_matrix` computes the HSIC of every pair of ``L`` layers on one minibatch at once (one
``(L, b^2) x (b^2, L)`` product, float64); :class:`MinibatchCKA` sums it over batches; :func:`cka_from_hsic`
normalises. The state is ``L x L`` numbers, whatever the number of images.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from camanim.errors import CamanimError

#: The smallest minibatch the unbiased HSIC estimator is defined for.
MIN_BATCH = 4


class CKAError(CamanimError, ValueError):
    """Representations that CKA cannot compare (too few images, mismatched sample counts)."""


def _gram(x: Tensor) -> Tensor:
    x = torch.as_tensor(x).reshape(x.shape[0], -1).to(torch.float64)
    return x @ x.T


def hsic_unbiased(k: Tensor, l: Tensor) -> Tensor:  # noqa: E741 - the paper's name
    """The unbiased HSIC estimator of two ``(n, n)`` kernel matrices (Song et al. 2012, Eq. 5), float64."""
    return hsic_matrix_from_grams([k, l])[0, 1]


def hsic_matrix_from_grams(grams: Sequence[Tensor]) -> Tensor:
    """Unbiased HSIC between every pair of ``L`` kernel matrices ``(n, n)`` of the same images: ``(L, L)``."""
    n = grams[0].shape[0]
    if n < MIN_BATCH:
        raise CKAError(f"the unbiased HSIC estimator needs at least {MIN_BATCH} images per batch, got {n}")
    g = torch.stack([torch.as_tensor(k, dtype=torch.float64) for k in grams])  # (L, n, n)
    g = g * (1 - torch.eye(n, dtype=torch.float64, device=g.device))  # K~: zero diagonal
    flat = g.reshape(g.shape[0], -1)
    trace = flat @ flat.T  # tr(K~ L~) (both symmetric)
    total = flat.sum(dim=1)  # 1^T K~ 1
    rows = g.sum(dim=2)  # K~ 1, (L, n)
    cross = rows @ rows.T  # 1^T K~ L~ 1
    hsic = trace + torch.outer(total, total) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * cross
    return hsic / (n * (n - 3))


def hsic_matrix(features: Sequence[Tensor]) -> Tensor:
    """Unbiased HSIC of the linear kernels of every pair of ``L`` representations of one minibatch.

    Args:
        features: ``L`` tensors ``(b, D_l)`` of the same ``b >= 4`` images (``D_l`` may differ).

    Returns:
        ``(L, L)`` float64, on the device of the features.
    """
    n = {int(f.shape[0]) for f in features}
    if len(n) != 1:
        raise CKAError(f"every representation must hold the same images; got batch sizes {sorted(n)}")
    return hsic_matrix_from_grams([_gram(f) for f in features])


def cka_from_hsic(hsic: Tensor) -> Tensor:
    """CKA ``(L, L)`` from summed HSIC ``(L, L)``; NaN where a layer's own HSIC is not positive (a constant
    representation)."""
    d = torch.diagonal(hsic).clone()
    d[d <= 0] = float("nan")
    scale = torch.sqrt(d)
    cka = hsic / torch.outer(scale, scale)
    return (cka + cka.T) / 2  # exactly symmetric


def minibatch_cka(batches: Iterable[Sequence[Tensor]]) -> Tensor:
    """CKA ``(L, L)`` of ``L`` representations accumulated over minibatches (Nguyen et al. 2021).

    Args:
        batches: per minibatch, the ``L`` representations ``(b, D_l)`` of its images.
    """
    acc = MinibatchCKA()
    for feats in batches:
        acc.update(feats)
    return acc.compute()


class MinibatchCKA:
    """Linear CKA of ``L`` layers accumulated over minibatches: :func:`minibatch_cka` as a running sum.

    Attributes:
        hsic: the summed unbiased HSIC ``(L, L)`` float64 on the CPU (``None`` before the first batch).
        batches: minibatches added; ``images`` their images.
    """

    higher_is_better = True

    def __init__(self) -> None:
        self.hsic: Tensor | None = None
        self.batches = 0
        self.images = 0

    def add(self, hsic: Tensor, images: int) -> None:
        """Add one minibatch's HSIC matrix (from :func:`hsic_matrix`) over ``images`` images."""
        hsic = torch.as_tensor(hsic, dtype=torch.float64).cpu()
        if self.hsic is not None and self.hsic.shape != hsic.shape:
            raise CKAError(f"HSIC of {hsic.shape[0]} layers added to a sum over {self.hsic.shape[0]}")
        self.hsic = hsic.clone() if self.hsic is None else self.hsic + hsic
        self.batches += 1
        self.images += int(images)

    def update(self, features: Sequence[Tensor]) -> Tensor:
        """Add one minibatch's representations ``(b, D_l)``; returns its HSIC matrix."""
        h = hsic_matrix(features)
        self.add(h, features[0].shape[0])
        return h

    def compute(self) -> Tensor:
        """CKA ``(L, L)`` float64 of everything added so far."""
        if self.hsic is None:
            raise CKAError("no minibatch was added")
        return cka_from_hsic(self.hsic)


def linear_cka(x: Tensor, y: Tensor, *, unbiased: bool = False) -> float:
    """Full-batch linear CKA of two representations ``(n, p)`` and ``(n, q)`` of the same images.

    ``unbiased=False`` is Kornblith et al.'s estimator, ``||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F
    ||Y_c^T Y_c||_F)`` with column-centred features; ``unbiased=True`` uses the unbiased HSIC (what
    :func:`minibatch_cka` computes on each batch).
    """
    x = torch.as_tensor(x).reshape(x.shape[0], -1).to(torch.float64)
    y = torch.as_tensor(y).reshape(y.shape[0], -1).to(torch.float64)
    if x.shape[0] != y.shape[0]:
        raise CKAError(f"CKA compares representations of the same images; got {x.shape[0]} and {y.shape[0]}")
    if unbiased:
        return float(cka_from_hsic(hsic_matrix([x, y]))[0, 1])
    xc, yc = x - x.mean(0), y - y.mean(0)
    num = torch.linalg.matrix_norm(yc.T @ xc) ** 2
    den = torch.linalg.matrix_norm(xc.T @ xc) * torch.linalg.matrix_norm(yc.T @ yc)
    return float(num / den)
