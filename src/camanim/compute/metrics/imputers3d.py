"""ROAD's noisy linear imputation for volumes ``(C, D, H, W)``: the 2-D rule of :mod:`.imputers` in 3-D.

Every removed voxel takes the weighted mean of its in-bounds 26 neighbours, all removed voxels solved
jointly, known voxels as boundary data. The weights extend the 2-D ones (1/6 for the 4 direct, 1/12 for the
4 diagonal neighbours: each diagonal step halves the weight) to three dimensions:

* 1/6 for the 6 face neighbours (one axis differs by one),
* 1/12 for the 12 edge neighbours (two axes differ),
* 1/24 for the 8 corner neighbours (all three differ),

normalised by the sum ``s_p`` of the in-bounds weights. Scaled by ``s_p`` the system is symmetric positive
definite: ``s_p u_p - sum_{q removed} w_pq u_q = sum_{q known} w_pq x_q``, one matrix for all channels.
Gaussian noise (``noise`` = sigma, in the volume's units) is added to the imputed voxels only; known voxels
are returned unchanged, bit for bit. A mask removing every voxel leaves no boundary data: it is filled with
the per-channel mean.

:func:`assemble_system_3d` builds the sparse system (the reference, solved by ``scipy.sparse.linalg.spsolve``
in the tests); :class:`NoisyLinearImputer3D` solves it without a matrix: conjugate gradients with a Jacobi
(``s_p``) preconditioner, the operator one 3x3x3 convolution restricted to the mask, batched over masks and
channels, in float64 (each column to ``||f - A u|| <= tol * ||f||``).
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import Tensor

from camanim.compute.metrics.imputers import ImputationError

__all__ = ["NEIGHBOUR_WEIGHTS_3D", "NoisyLinearImputer3D", "assemble_system_3d", "neighbour_kernel"]

log = logging.getLogger(__name__)

#: ``(dz, dy, dx, weight)`` of the 26 neighbours of a voxel: 1/6 face, 1/12 edge, 1/24 corner.
NEIGHBOUR_WEIGHTS_3D: tuple[tuple[int, int, int, float], ...] = tuple(
    (dz, dy, dx, (1 / 6) / 2 ** (abs(dz) + abs(dy) + abs(dx) - 1))
    for dz, dy, dx in itertools.product((-1, 0, 1), repeat=3)
    if (dz, dy, dx) != (0, 0, 0)
)


def neighbour_kernel(dtype: torch.dtype = torch.float64) -> Tensor:
    """The weights as a ``(1, 1, 3, 3, 3)`` convolution kernel (centre 0)."""
    k = torch.zeros(3, 3, 3, dtype=dtype)
    for dz, dy, dx, w in NEIGHBOUR_WEIGHTS_3D:
        k[dz + 1, dy + 1, dx + 1] = w
    return k[None, None]


def assemble_system_3d(mask: np.ndarray, image: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
    """The sparse system of one volume: ``A`` ``(n, n)`` and the right-hand sides ``(n, C)``.

    Args:
        mask: ``(D, H, W)`` bool, ``True`` = removed; its ``n`` removed voxels are the unknowns, in C order.
        image: ``(C, D, H, W)`` values.
    """
    d, h, w = mask.shape
    index = -np.ones(mask.shape, dtype=np.int64)
    removed = np.flatnonzero(mask)
    index.flat[removed] = np.arange(removed.size)
    z, y, x = np.unravel_index(removed, mask.shape)
    rows, cols, vals = [], [], []
    diag = np.zeros(removed.size)
    rhs = np.zeros((removed.size, image.shape[0]))
    for dz, dy, dx, wt in NEIGHBOUR_WEIGHTS_3D:
        qz, qy, qx = z + dz, y + dy, x + dx
        inside = (qz >= 0) & (qz < d) & (qy >= 0) & (qy < h) & (qx >= 0) & (qx < w)
        diag[inside] += wt
        p = np.flatnonzero(inside)
        q = index[qz[inside], qy[inside], qx[inside]]
        unknown = q >= 0
        rows.append(p[unknown])
        cols.append(q[unknown])
        vals.append(np.full(int(unknown.sum()), -wt))
        known = ~unknown
        rhs[p[known]] += wt * image[:, qz[inside][known], qy[inside][known], qx[inside][known]].T
    rows.append(np.arange(removed.size))
    cols.append(np.arange(removed.size))
    vals.append(diag)
    mat = sp.coo_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(removed.size,) * 2
    )
    return mat.tocsr(), rhs


class NoisyLinearImputer3D:
    """ROAD's noisy linear imputation of volumes (module docstring), batched over volumes and channels.

    Args:
        noise: standard deviation of the Gaussian noise added to imputed voxels, in the volume's units.
        tol: relative residual each (volume, channel) column must reach.
        max_iter: conjugate-gradient iterations before giving up (:class:`ImputationError`).
    """

    def __init__(self, noise: float = 0.01, tol: float = 1e-8, max_iter: int = 5000) -> None:
        self.noise, self.tol, self.max_iter = float(noise), float(tol), int(max_iter)

    def __repr__(self) -> str:
        return f"NoisyLinearImputer3D(noise={self.noise})"

    def __call__(self, images: Tensor, masks: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Impute ``images`` ``(B, C, D, H, W)`` where ``masks`` ``(B, D, H, W)`` is True, then add noise there."""
        out = self.impute_clean(images, masks)
        if self.noise > 0:
            noise = torch.randn(out.shape, generator=generator, dtype=torch.float32).to(out.device, out.dtype)
            out = torch.where(masks[:, None].to(out.device), out + self.noise * noise, out)
        return out

    def impute_clean(self, images: Tensor, masks: Tensor) -> Tensor:
        """The noiseless imputation ``(B, C, D, H, W)``, in the images' dtype."""
        if images.dim() != 5 or masks.shape != (images.shape[0], *images.shape[2:]):
            raise ImputationError(
                f"volumes must be (B, C, D, H, W) with masks (B, D, H, W), got {list(images.shape)} and "
                f"{list(masks.shape)}"
            )
        m = masks.to(device=images.device, dtype=torch.bool)
        b, c = images.shape[:2]
        x = images.to(torch.float64)
        kernel = neighbour_kernel().to(images.device)
        rm = m[:, None].expand_as(x).to(torch.float64)  # 1 where removed
        known = x * (1 - rm)

        def neighbours(u: Tensor) -> Tensor:
            return F.conv3d(u.reshape(b * c, 1, *u.shape[2:]), kernel, padding=1).reshape(u.shape)

        s = neighbours(torch.ones_like(x)) * rm  # in-bounds weight sums at removed voxels
        f = neighbours(known) * rm

        def apply(u: Tensor) -> Tensor:
            return (s * u - neighbours(u)) * rm

        inv = torch.where(rm > 0, 1 / s.clamp_min(1e-12), torch.zeros_like(s))
        u = f * inv
        r = f - apply(u)
        z = r * inv
        p = z.clone()
        rz = (r * z).flatten(2).sum(2)
        fnorm = f.flatten(2).norm(dim=2)
        for _ in range(self.max_iter):
            if bool((r.flatten(2).norm(dim=2) <= self.tol * fnorm).all()):
                break
            ap = apply(p)
            pap = (p * ap).flatten(2).sum(2)
            alpha = torch.where(pap > 0, rz / pap.clamp_min(1e-300), torch.zeros_like(pap))
            u = u + alpha[..., None, None, None] * p
            r = r - alpha[..., None, None, None] * ap
            z = r * inv
            rz_new = (r * z).flatten(2).sum(2)
            beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-300), torch.zeros_like(rz))
            p = z + beta[..., None, None, None] * p
            rz = rz_new
        else:
            raise ImputationError(f"the 3-D imputation did not converge in {self.max_iter} iterations")
        out = known + u * rm
        full = m.flatten(1).all(dim=1)  # no boundary data: the per-channel mean
        if bool(full.any()):
            out[full] = x[full].mean(dim=(2, 3, 4), keepdim=True).expand_as(x[full])
        out = out.to(images.dtype)
        return torch.where(m[:, None], out, images)
