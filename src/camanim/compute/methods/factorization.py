"""Factorization methods: a layer's per-position vectors decomposed, the map read from the decomposition.

* **SegEigenCAM**: the first principal component of ``|G| * A`` with a sign fixed by the map itself.
* **KPCA-CAM**: the first kernel principal component of ``A`` (scikit-learn's ``KernelPCA``, computed exactly
  the same way without building scikit-learn's float64 copy). Its kernel has one row and column per
  position, so time and memory grow with the square of a layer's positions: ``cost =
  "one_pass_quadratic"`` keeps it out of ``"all"`` (a 112x112 layer is a 12544 x 12544 kernel, 630 MB in
  float32). The ``kpca_positions`` option fits it on that many positions only and extends it to the others
  by the Nystroem formula (scikit-learn's ``transform``): an approximation, off by default.
* **Deep Feature Factorization**: a non-negative factorization of ``A`` into ``K`` concepts, each a
  channel vector with a map; per layer, the concepts' maps, and where the layer feeds the classifier
  directly (:func:`~.classifier.linear_heads`) each concept's class scores.

Each works on one sample at a time, so a batch gives the maps of its images explained one by one.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from camanim.compute.methods.base import CAMMethod, LayerTensors, register_method
from camanim.compute.methods.classifier import linear_heads, model_output
from camanim.compute.methods.passes import MultiPassMethod, PassContext
from camanim.compute.methods.projection import first_component_projection
from camanim.errors import OptionError

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ SegEigenCAM


def sign_corrected(maps: Tensor) -> Tensor:
    """Seg-Eigen-CAM's sign correction (Eq. 13): each map ``(B, h, w)`` negated where ``|min| > |max|``."""
    flat = maps.flatten(1)
    flip = flat.amin(dim=1).abs() > flat.amax(dim=1).abs()
    return torch.where(flip[:, None, None], -maps, maps)


@register_method("segeigencam")
class SegEigenCAM(CAMMethod):
    """Seg-Eigen-CAM (Chung & Ying, Applied Sciences 2025): the first principal component of ``|G| * A``.

    The element-wise product of the absolute gradient and the values (Eq. 10), centred per channel over the
    positions and projected on its first principal component (:func:`~.projection.first_component_projection`);
    the sign is then fixed by Eq. 13: the map is negated where its most negative value is larger in
    magnitude than its most positive. As grad-cam's ``SegEigenCAM``.
    """

    paper = "Chung and Ying, Seg-Eigen-CAM, Applied Sciences 15(13) 7562, 2025"
    volumes = True

    def raw_map(self, t: LayerTensors) -> Tensor:
        return sign_corrected(first_component_projection(t.grads.abs() * t.acts))


# --------------------------------------------------------------------------------------------- KPCA-CAM

KERNELS = ("sigmoid", "rbf", "poly", "linear", "cosine")
ARPACK_ABOVE = 200
"""Kernels larger than this get Lanczos (ARPACK, as scikit-learn's ``eigen_solver="auto"``), others ``eigh``."""
FLOAT64_UP_TO = 4096
"""Kernels up to this many positions are built in float64 (134 MB), larger ones in float32 (see
:func:`kernel_first_component`)."""


def _kernel(x: Tensor, y: Tensor, kernel: str, gamma: float) -> Tensor:
    """scikit-learn's pairwise kernels (``coef0 = 1``, ``degree = 3``, KernelPCA's defaults): ``(n, m)``."""
    if kernel == "rbf":
        d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * (x @ y.T)
        return d.clamp_min_(0).mul_(-gamma).exp_()
    if kernel == "cosine":
        xn = x / x.norm(dim=1, keepdim=True).clamp_min(1e-300 if x.dtype == torch.float64 else 1e-30)
        yn = y / y.norm(dim=1, keepdim=True).clamp_min(1e-300 if y.dtype == torch.float64 else 1e-30)
        return xn @ yn.T
    k = x @ y.T
    if kernel == "linear":
        return k
    if kernel == "sigmoid":
        return k.mul_(gamma).add_(1.0).tanh_()
    if kernel == "poly":
        return k.mul_(gamma).add_(1.0).pow_(3)
    raise OptionError(f"unknown kernel {kernel!r}; expected one of {', '.join(KERNELS)}")


def _top_eigenpair(k: Tensor) -> tuple[float, np.ndarray]:
    """The largest (algebraic) eigenvalue of a symmetric ``k`` and its unit eigenvector, as scikit-learn's
    ``KernelPCA`` finds them: ``eigh`` up to :data:`ARPACK_ABOVE` rows, Lanczos (``eigsh(which="LA")``) above."""
    from scipy.linalg import eigh
    from scipy.sparse.linalg import eigsh

    a = k.numpy()
    n = a.shape[0]
    if n <= ARPACK_ABOVE:
        vals, vecs = eigh(a, subset_by_index=(n - 1, n - 1))
    else:
        v0 = np.ones(n, dtype=a.dtype) / math.sqrt(n)  # deterministic start (scikit-learn's is random)
        vals, vecs = eigsh(a, k=1, which="LA", tol=0, v0=v0)
    return float(vals[-1]), vecs[:, -1]


def kernel_first_component(
    x: Tensor, *, kernel: str = "sigmoid", gamma: float | None = None, fit_positions: int | None = None
) -> Tensor:
    """The first kernel principal component of the rows of ``x`` ``(n, C)``, as ``KernelPCA(n_components=1)
    .fit_transform(x)``: ``(n,)``.

    The kernel matrix is centred in feature space, its top eigenpair ``(lambda, v)`` found, and the
    component is ``sqrt(max(lambda, 0)) * v`` with scikit-learn's sign (``svd_flip``: the entry of largest
    magnitude positive). Kernels of at most :data:`FLOAT64_UP_TO` rows are built in float64, larger ones in
    float32 in place (one ``n x n`` buffer); the Pearson correlation with scikit-learn's float64 result
    stays above 0.9999 at 112x112 (the tests measure it).

    With ``fit_positions`` below ``n``, the component is fitted on that many evenly spaced rows and the
    others are projected on it by the Nystroem extension (scikit-learn's ``transform``).
    """
    n, c = x.shape
    gamma = 1.0 / c if gamma is None else float(gamma)
    dtype = torch.float64 if n <= FLOAT64_UP_TO and fit_positions is None else torch.float32
    x = x.detach().cpu().to(dtype)
    fit = x
    if fit_positions is not None and fit_positions < n:
        idx = torch.linspace(0, n - 1, fit_positions).round().long().unique()
        fit = x[idx].to(torch.float64)
    k = _kernel(fit, fit, kernel, gamma)
    rows = k.mean(dim=0)
    total = rows.mean()
    k.sub_(rows[:, None]).sub_(rows[None, :]).add_(total)  # centred in feature space, in place
    lam, v = _top_eigenpair(k)
    del k
    v = torch.from_numpy(np.ascontiguousarray(v)).to(fit.dtype)
    v = v * (1.0 if float(v[v.abs().argmax()]) >= 0 else -1.0)  # svd_flip
    lam = max(lam, 0.0)
    if fit is x:
        return (v * math.sqrt(lam)).to(torch.float32)
    if lam == 0.0:
        return torch.zeros(n)
    # Nystroem: centre k(x, fit) with the fit's statistics, project on v / sqrt(lambda).
    out = torch.empty(n, dtype=torch.float64)
    step = max(1, (1 << 24) // max(1, fit.shape[0]))
    for s in range(0, n, step):
        kx = _kernel(x[s : s + step].to(torch.float64), fit, kernel, gamma)
        kx = kx - rows[None, :] - kx.mean(dim=1, keepdim=True) + total
        out[s : s + step] = kx @ (v / math.sqrt(lam))
    return out.to(torch.float32)


@register_method("kpcacam", "kpca")
class KPCACAM(CAMMethod):
    """KPCA-CAM (Karmani et al., 2024): the first kernel principal component of a layer's values; no gradient.

    Per sample, the values ``A`` ``(C, h, w)`` as ``h*w`` vectors of ``C`` channels, centred per channel,
    then ``KernelPCA(n_components=1, kernel="sigmoid", gamma=1/C)`` (:func:`kernel_first_component`), as
    grad-cam's ``KPCA_CAM``. Options: ``kernel`` (``sigmoid``, ``rbf``, ``poly``, ``linear``, ``cosine``),
    ``gamma``, and ``kpca_positions`` (an approximation; see the module docstring). Quadratic in the
    positions: see the module docstring.
    """

    paper = "Karmani et al., KPCA-CAM: Visual Explainability of Deep Computer Vision Models using Kernel PCA, 2024"
    needs_gradients = False
    class_discriminative = False
    cost = "one_pass_quadratic"
    volumes = True
    passes = "the shared capture (1 forward for all N layers); an (h*w)^2 kernel per layer and image"

    def raw_map(self, t: LayerTensors) -> Tensor:
        kernel = str(t.options.get("kernel", "sigmoid"))
        if kernel not in KERNELS:
            raise OptionError(f"unknown kernel {kernel!r}; expected one of {', '.join(KERNELS)}")
        gamma = t.options.get("gamma")
        gamma = None if gamma is None else float(gamma)
        fit_positions = t.options.get("kpca_positions")
        fit_positions = None if fit_positions is None else int(fit_positions)
        a = torch.nan_to_num(t.acts.detach(), nan=0.0)
        b, c, h, w = a.shape
        out = []
        for i in range(b):
            x = a[i].reshape(c, h * w).T
            x = x - x.mean(dim=0, keepdim=True)
            comp = kernel_first_component(x, kernel=kernel, gamma=gamma, fit_positions=fit_positions)
            out.append(comp.reshape(h, w))
        return torch.stack(out).to(device=t.acts.device)


# --------------------------------------------------------------------------- Deep Feature Factorization

DFF_CONCEPTS = 5
"""Concepts per layer by default (grad-cam's ``dff`` and ``run_dff_on_image``)."""


def factorize(acts: Tensor, concepts: int = DFF_CONCEPTS, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Deep Feature Factorization of one sample's values ``(C, h, w)``, as grad-cam's ``dff``.

    NaNs become 0; each channel is shifted by its minimum (``offset``) so the ``C x h*w`` matrix is
    non-negative; scikit-learn's ``NMF(n_components=K, init="random", random_state=seed)`` factors it as
    ``W H``. Returns the concepts ``W + offset`` ``(C, K)`` and their maps ``H`` ``(K, h, w)``.
    """
    from sklearn.decomposition import NMF
    from sklearn.exceptions import ConvergenceWarning

    c, h, w = acts.shape
    v = torch.nan_to_num(acts.detach().float(), nan=0.0).reshape(c, h * w).cpu().numpy()
    offset = v.min(axis=1)
    v = v - offset[:, None]
    model = NMF(n_components=concepts, init="random", random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        wmat = model.fit_transform(v)
    hmat = model.components_
    return (
        torch.from_numpy(np.float32(wmat + offset[:, None])),
        torch.from_numpy(np.float32(hmat)).reshape(concepts, h, w),
    )


@register_method("dff", "deepfeaturefactorization")
class DeepFeatureFactorization(MultiPassMethod):
    """Deep Feature Factorization (Collins et al., ECCV 2018): ``K`` concepts per layer by NMF; no gradient.

    Per layer and sample, :func:`factorize` gives ``K`` concepts (channel vectors ``(C, K)``) and their maps
    ``H`` ``(K, h, w)``. Where the layer's spatial mean feeds the classifier directly
    (:func:`~.classifier.linear_heads`), each concept's class scores are the classifier applied to its
    vector, as grad-cam's ``run_dff_on_image``; elsewhere a concept has no class scores. Not
    class-discriminative: the concepts are the same whatever class is explained.

    The raw map (what is normalised, scored and animated like any method's) is each position's strongest
    concept, ``max_k H_k / max H_k``: where the layer's activity is explained by some concept. The concepts
    themselves are kept in :attr:`extras` (``extras[layer]``: ``"concepts"`` ``(B, K, h, w)``, ``"labels"``
    ``(B, h, w)`` the strongest concept per position, ``"vectors"`` ``(B, C, K)``, and ``"scores"``
    ``(B, K, classes)`` where the layer feeds the classifier) for frames that colour each concept as
    FM-G-CAM colours its classes.

    Options: ``concepts`` (``K``, default 5). The NMF's random start is seeded with ``seed``
    (grad-cam: 0, the default).
    """

    paper = "Collins et al., Deep Feature Factorization for Concept Discovery, ECCV 2018"
    needs_gradients = False
    class_discriminative = False
    needs_values = True
    passes = (
        "the shared capture's values + 1 forward (no backward) to find the classifier, for all N layers; "
        "an NMF per layer and image"
    )

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.extras: dict[str, dict[str, Tensor]] = {}

    def plan(self, layers: int, batch: int, options: Mapping[str, Any]) -> tuple[int, int]:
        return 1, 0

    def compute_layers(self, ctx: PassContext) -> dict[str, Tensor]:
        k = int(ctx.options.get("concepts", DFF_CONCEPTS))
        if k < 1:
            raise OptionError(f"concepts must be at least 1, got {k}")
        values = {layer.name: ctx.values[layer.name] for layer in ctx.layers if layer.name in ctx.values}
        heads = linear_heads(ctx.model, values, model_output(ctx.model, ctx.x))
        out: dict[str, Tensor] = {}
        self.extras = {}
        for name, a in values.items():
            vectors, maps = zip(*(factorize(a[b], k, self.seed) for b in range(a.shape[0])), strict=True)
            h = torch.stack(maps)  # (B, K, h, w)
            peak = h.flatten(2).amax(dim=2).clamp_min(1e-12)[:, :, None, None]
            strength, labels = (h / peak).max(dim=1)
            out[name] = strength.to(a.device)
            extra = {"concepts": h, "labels": labels, "vectors": torch.stack(vectors)}
            lin = heads.get(name)
            if lin is not None:
                with torch.no_grad():
                    vec = extra["vectors"].transpose(1, 2).to(lin.weight)  # (B, K, C)
                    extra["scores"] = torch.nn.functional.linear(vec, lin.weight, lin.bias).float().cpu()
            self.extras[name] = extra
        return out
