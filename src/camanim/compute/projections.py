"""2-D projections of every layer's embedding, aligned from layer to layer so an animation moves smoothly.

Each layer's vectors ``(n, D)`` are projected to ``(n, 2)`` by

* ``pca`` (the default): the two leading principal components (SVD of the centred vectors), exact and
  fast;
* ``umap``: UMAP (McInnes, Healy and Melville 2018; the ``umap-learn`` package, ``pip install
  'camanim[embed]'``), seeded, started from the previous layer's layout;
* ``tsne``: t-SNE (van der Maaten and Hinton 2008; scikit-learn's ``TSNE``), seeded, started from the
  previous layer's layout.

A projection is defined up to rotation, reflection and scale (PCA's axes flip sign from one layer to the
next; UMAP and t-SNE layouts rotate freely), so frames in forward order would jump. Every layout is
therefore centred and scaled to unit root-mean-square radius, then rotated (reflections allowed) onto the
previous layer's aligned layout by orthogonal Procrustes (Schönemann 1966): ``R = U V^T`` from the SVD
``U S V^T = Y^T Y_prev``, the rotation minimising ``||Y R - Y_prev||_F``. Only rigid motions and one scale
are applied, so each frame is still its layer's projection.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from camanim.errors import MissingExtraError, UnknownNameError

logger = logging.getLogger(__name__)

PROJECTIONS = ("pca", "umap", "tsne")


def check_projection(name: str) -> str:
    """The projection ``name`` normalised; its package must be importable.

    Raises:
        UnknownNameError: not one of :data:`PROJECTIONS`.
        MissingExtraError: ``umap`` without ``umap-learn`` installed.
    """
    key = str(name).strip().lower().replace("-", "")
    if key not in PROJECTIONS:
        raise UnknownNameError("projection", str(name), PROJECTIONS)
    if key == "umap" and importlib.util.find_spec("umap") is None:
        raise MissingExtraError(
            "the UMAP projection needs umap-learn: pip install 'camanim[embed]' (or use --projection pca or tsne)"
        )
    return key


def _as64(x: Tensor | np.ndarray) -> np.ndarray:
    x = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    return x.reshape(len(x), -1).astype(np.float64)


def pca_2d(x: Tensor | np.ndarray) -> np.ndarray:
    """The scores on the two leading principal components: ``(n, 2)`` float64 (zeros for a constant set)."""
    xc = torch.from_numpy(_as64(x))
    xc = xc - xc.mean(0)
    if xc.shape[1] < 2:
        xc = torch.cat([xc, torch.zeros(xc.shape[0], 2 - xc.shape[1], dtype=xc.dtype)], 1)
    # Through the smaller Gram matrix: (D, D) when n > D, else (n, n); eigh is stable in float64.
    if xc.shape[0] >= xc.shape[1]:
        _, vecs = torch.linalg.eigh(xc.T @ xc)
        return (xc @ vecs[:, -2:].flip(1)).numpy()
    vals, vecs = torch.linalg.eigh(xc @ xc.T)
    return (vecs[:, -2:].flip(1) * vals[-2:].flip(0).clamp_min(0).sqrt()).numpy()


def normalize_layout(y: np.ndarray) -> np.ndarray:
    """``y (n, 2)`` centred and scaled to unit root-mean-square radius (left as centred when constant)."""
    y = np.asarray(y, np.float64)
    y = y - y.mean(0)
    rms = float(np.sqrt((y**2).sum(1).mean()))
    return y / rms if rms > 0 else y


def procrustes(y: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``y (n, 2)`` rotated (reflection allowed) onto ``reference (n, 2)``: ``y R`` with the orthogonal ``R``
    minimising ``||y R - reference||_F`` (orthogonal Procrustes; both assumed centred)."""
    u, _, vt = np.linalg.svd(y.T @ reference)
    return y @ (u @ vt)


def _umap(x: np.ndarray, seed: int, init: np.ndarray | None) -> np.ndarray:
    try:
        import umap
    except ImportError as exc:  # pragma: no cover - checked by check_projection first
        raise MissingExtraError("the UMAP projection needs umap-learn: pip install 'camanim[embed]'") from exc
    n = x.shape[0]
    reducer = umap.UMAP(
        n_components=2,
        n_neighbors=min(15, n - 1),
        random_state=seed,
        init=init if init is not None else "spectral",
        n_jobs=1,
    )
    return reducer.fit_transform(x)


def _tsne(x: np.ndarray, seed: int, init: np.ndarray | None) -> np.ndarray:
    from sklearn.manifold import TSNE

    n = x.shape[0]
    start = "pca" if init is None else (init * (1e-4 / max(float(init[:, 0].std()), 1e-12)))
    return TSNE(
        n_components=2, perplexity=min(30.0, (n - 1) / 3), init=start, random_state=seed, max_iter=500
    ).fit_transform(x)


def project_layers(
    vectors: Sequence[Tensor | np.ndarray],
    method: str = "pca",
    *,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> list[np.ndarray]:
    """Project every layer's vectors to 2-D and align each layout to the previous one.

    Args:
        vectors: per layer, in forward order, ``(n, D_l)`` vectors of the same ``n`` images.
        method: ``pca``, ``umap`` or ``tsne`` (see the module docstring).
        seed: seed of UMAP and t-SNE.
        progress: called with ``(layers done, layers)`` after each layer.

    Returns:
        Per layer, ``(n, 2)`` float32: centred, unit RMS radius, Procrustes-aligned to the layer before.
    """
    method = check_projection(method)
    out: list[np.ndarray] = []
    previous: np.ndarray | None = None
    for i, v in enumerate(vectors):
        x = _as64(v)
        if method == "pca" or x.shape[0] < 5:
            y = pca_2d(x)
        elif method == "umap":
            y = _umap(x.astype(np.float32), seed, previous)
        else:
            y = _tsne(x.astype(np.float32), seed, previous)
        y = normalize_layout(y)
        if previous is not None:
            y = procrustes(y, previous)
        previous = y
        out.append(y.astype(np.float32))
        if progress is not None:
            progress(i + 1, len(vectors))
    return out
