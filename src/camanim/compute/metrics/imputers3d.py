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
in the tests). :class:`NoisyLinearImputer3D` solves it without a matrix, as the 2-D
:class:`~.imputers.NoisyLinearImputer` does: conjugate gradients preconditioned by a geometric multigrid
V-cycle, batched over masks and channels on dense ``(B, C, D, H, W)`` tensors. The weights are separable
(``(1/3) [1/2, 1, 1/2]^3`` without its centre), so the fine operator is three 1-D passes; coarse levels are
Galerkin products ``R A P`` with trilinear ``P`` (27-point stencils, computed by probing with 27 colour
classes), smoothed by damped Jacobi; the coarsest is solved densely. CG runs in float32 and every (mask,
channel) column must pass ``||f - A u|| <= tol * ||f||`` on its true residual in float64 (refinement rounds
make up what float32 cannot); a mask that does not, or a volume too thin for the hierarchy, is solved with
``spsolve``.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import spsolve
from torch import Tensor

from camanim.compute.metrics.imputers import ImputationError, _prolong1d, _restrict1d, _single_threaded_pool

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


def _spsolve_one(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Noiseless imputation of one ``(C, D, H, W)`` float64 volume; ``mask`` removes some, not all."""
    mat, rhs = assemble_system_3d(mask, image)
    out = image.copy()
    out[:, mask] = np.asarray(spsolve(mat.tocsc(), rhs)).reshape(rhs.shape).T
    return out


# --------------------------------------------------------------------------------------------------------
# Multigrid-preconditioned CG on dense (B, C, D, H, W) stencils.
# --------------------------------------------------------------------------------------------------------

# Stencil slots k = 9 (dz + 1) + 3 (dy + 1) + (dx + 1); slot 13 is the centre.
_OFFSETS = tuple(itertools.product((-1, 0, 1), repeat=3))
_CENTRE = 13
# Largest coarsest grid solved densely; only thin volumes (a side <= 3 voxels) come near it.
_MAX_DENSE = 4096


def _tent(u: Tensor) -> Tensor:
    """The separable ``[1, 2, 1]^3`` filter over the last three dims, zero outside."""
    for dim in (-3, -2, -1):
        n = u.shape[dim]
        t = u * 2
        t.narrow(dim, 1, n - 1).add_(u.narrow(dim, 0, n - 1))
        t.narrow(dim, 0, n - 1).add_(u.narrow(dim, 1, n - 1))
        u = t
    return u


def _apply_stencil(c: Tensor, u: Tensor) -> Tensor:
    """General 27-point stencil: ``out[p] = sum_k c[:, k, p] u[p + offset_k]`` (zero outside).

    Args:
        c: ``(B, 27, d, h, w)`` coefficients.
        u: ``(B, C, d, h, w)``.
    """
    shape = u.shape[-3:]
    out = c[:, _CENTRE : _CENTRE + 1] * u
    for k, off in enumerate(_OFFSETS):
        if k == _CENTRE:
            continue
        dst = tuple(slice(max(0, -o), n - max(0, o)) for o, n in zip(off, shape, strict=True))
        src = tuple(slice(max(0, o), n - max(0, -o)) for o, n in zip(off, shape, strict=True))
        out[(..., *dst)].addcmul_(c[(slice(None), slice(k, k + 1), *dst)], u[(..., *src)])
    return out


def _coarse_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(n // 2 + 1 for n in shape)


def _prolong(c: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Trilinear prolongation ``(B, C, d, h, w)`` -> ``(B, C, D, H, W)``, ``d = D // 2 + 1``."""
    for i, n in enumerate(shape):
        c = _prolong1d(c, n, 2 + i)
    return c


def _restrict(f: Tensor) -> Tensor:
    """Full-weighting restriction, the exact transpose of :func:`_prolong`."""
    for dim in (2, 3, 4):
        f = _restrict1d(f, dim)
    return f


def _hat(d: int) -> float:
    """The 1-D prolongation weight of a fine point ``d`` fine steps from a coarse point."""
    return (1.0, 0.5)[abs(d)] if abs(d) <= 1 else 0.0


def _galerkin(c: Tensor) -> Tensor:
    """The coarse stencil ``P^T A P`` ``(B, 27, d, h, w)`` of a fine stencil ``c`` ``(B, 27, D, H, W)``.

    ``P`` is the trilinear prolongation of :func:`_prolong` (coarse point ``I`` at fine ``2 I``, weights 1 and
    1/2), so ``A_c(I, I + j) = sum_{a, o} phi(a) c_o(2 I + a) phi(a + o - 2 j)`` with separable ``phi``: the
    sum runs over one axis at a time, ``a`` the fine point's offset from ``2 I``, ``o`` the stencil offset.
    Fine points beyond the volume carry zero coefficients (padding by 2).
    """
    b, shape = c.shape[0], tuple(c.shape[2:])
    c = F.pad(c, (2, 2, 2, 2, 2, 2)).reshape(b, 3, 3, 3, *(n + 4 for n in shape))
    for axis, n in enumerate(shape):
        nc = n // 2 + 1
        cdim, sdim = 1 + axis, 4 + axis
        out_shape = list(c.shape)
        out_shape[sdim] = nc
        out = c.new_zeros(out_shape)
        for o in (-1, 0, 1):
            src = c.select(cdim, o + 1)
            for a in (-1, 0, 1):
                idx: list[slice] = [slice(None)] * src.ndim
                idx[sdim - 1] = slice(a + 2, a + 3 + 2 * (nc - 1), 2)
                part = src[tuple(idx)]
                for j in (-1, 0, 1):
                    wt = _hat(a) * _hat(a + o - 2 * j)
                    if wt:
                        out.select(cdim, j + 1).add_(part, alpha=wt)
        c = out
    return c.reshape(b, 27, *c.shape[4:])


def _coarsen_more(shape: tuple[int, ...], coarsest_size: int) -> bool:
    return int(np.prod(shape)) > coarsest_size and min(shape) > 3


def _coarsest_points(shape: tuple[int, ...], coarsest_size: int) -> int:
    while _coarsen_more(shape, coarsest_size):
        shape = _coarse_shape(shape)
    return int(np.prod(shape))


class _Level:
    """One grid for a batch of B masks: ``active`` and the damped inverse diagonal ``dinv`` ``(B, 1, ...)``.

    The fine level applies ``a * u - m24 * tent(u)``; coarse levels their ``(B, 27, ...)`` ``stencil``.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        active: Tensor,
        dinv: Tensor,
        stencil: Tensor | None = None,
        a: Tensor | None = None,
        m24: Tensor | None = None,
    ) -> None:
        self.shape, self.active, self.dinv, self.stencil, self.a, self.m24 = (
            shape,
            active,
            dinv,
            stencil,
            a,
            m24,
        )

    def coefficients(self) -> Tensor:
        """The operator as a ``(B, 27, ...)`` stencil: slot ``k`` holds ``A(p, p + offset_k)`` at ``p``."""
        if self.stencil is not None:
            return self.stencil
        assert self.a is not None
        m = self.active
        b, (d, h, w) = m.shape[0], self.shape
        padded = F.pad(m, (1, 1, 1, 1, 1, 1))
        out = m.new_empty(b, 27, d, h, w)
        for k, (dz, dy, dx) in enumerate(_OFFSETS):
            if k == _CENTRE:
                out[:, k : k + 1] = self.a - m / 3  # m s: the in-bounds weight sum
                continue
            wt = (1 / 6) / 2 ** (abs(dz) + abs(dy) + abs(dx) - 1)
            shifted = padded[:, :, 1 + dz : 1 + dz + d, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
            torch.mul(m, shifted, out=out[:, k : k + 1]).mul_(-wt)
        return out

    def apply(self, u: Tensor) -> Tensor:
        """The level operator on ``u`` ``(B, C, ...)``, zero off the unknowns."""
        if self.stencil is None:
            assert self.a is not None and self.m24 is not None
            return torch.addcmul(self.a * u, self.m24, _tent(u), value=-1.0)
        return _apply_stencil(self.stencil, u)


def _fine_level(masks: Tensor, dtype: torch.dtype, omega: float) -> _Level:
    """The finest level for ``(B, D, H, W)`` masks: ``A u = m ((s + 1/3) u - tent(u) / 24)``."""
    shape = tuple(masks.shape[-3:])
    m = masks.to(dtype).unsqueeze(1)
    s = (_tent(torch.ones(1, 1, *shape, dtype=dtype, device=masks.device)) - 8) / 24  # in-bounds weights
    return _Level(shape, m, m * (omega / s), a=m * (s + 1.0 / 3.0), m24=m / 24.0)


class _Hierarchy:
    """Multigrid hierarchy for B masks; :meth:`vcycle` is a symmetric positive definite preconditioner."""

    def __init__(
        self, masks: Tensor, dtype: torch.dtype, omega: float, nu: int, nu_coarse: int, coarsest_size: int
    ) -> None:
        self.nu, self.nu_coarse = nu, nu_coarse
        cur = _fine_level(masks, dtype, omega)
        self.levels = [cur]
        while _coarsen_more(cur.shape, coarsest_size):
            cur = self._coarsen(cur, omega)
            self.levels.append(cur)
        self.coarse_inv = self._coarsest_inverse(cur)

    @staticmethod
    def _coarsen(fine: _Level, omega: float) -> _Level:
        """The Galerkin level ``P^T A P`` of ``fine``, contracted from its coefficients axis by axis."""
        stencil = _galerkin(fine.coefficients())
        dtype, shape = stencil.dtype, tuple(stencil.shape[2:])
        d = stencil[:, _CENTRE : _CENTRE + 1]
        # Gershgorin-safe scaling keeps lambda_max(D^-1 A) <= 2, so damped Jacobi with omega < 1 converges
        # and the V-cycle stays symmetric positive definite.
        bound = torch.maximum(d, 0.5 * stencil.abs().sum(1, keepdim=True))
        dinv = torch.where(d > 0, omega / bound.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(d))
        return _Level(shape, (d > 0).to(dtype), dinv, stencil=stencil)

    @staticmethod
    def _coarsest_inverse(lvl: _Level) -> Tensor:
        """Dense pseudo-inverse ``(B, n, n)`` of the coarsest operator, by eigendecomposition in float64."""
        b, dtype, device = lvl.active.shape[0], lvl.active.dtype, lvl.active.device
        n = int(np.prod(lvl.shape))
        eye = torch.eye(n, dtype=torch.float64, device=device).view(1, n, *lvl.shape)
        if lvl.stencil is None:
            assert lvl.a is not None and lvl.m24 is not None
            act = lvl.active.double()
            cols = _Level(lvl.shape, act, act, a=lvl.a.double(), m24=lvl.m24.double()).apply(eye * act)
        else:
            cols = _apply_stencil(lvl.stencil.double(), eye.expand(b, n, *lvl.shape))
        a = cols.reshape(b, n, n)
        a = 0.5 * (a + a.transpose(1, 2))
        evals, evecs = torch.linalg.eigh(a)
        cut = evals.abs().amax(-1, keepdim=True) * 1e-10
        inv = torch.where(evals > cut, 1.0 / evals.clamp_min(1e-300), torch.zeros_like(evals))
        return ((evecs * inv.unsqueeze(1)) @ evecs.transpose(1, 2)).to(dtype)

    def vcycle(self, r: Tensor, level: int = 0) -> Tensor:
        """Approximate ``A^-1 r`` for ``r`` ``(B, C, ...)`` (zero off the unknowns): a Jacobi V-cycle."""
        lvl = self.levels[level]
        if level == len(self.levels) - 1:
            b, c = r.shape[:2]
            flat = r.reshape(b, c, -1).transpose(1, 2)
            return (self.coarse_inv @ flat).transpose(1, 2).reshape(r.shape)
        nu = self.nu if level == 0 else self.nu_coarse
        e = lvl.dinv * r
        for _ in range(nu - 1):
            e += lvl.dinv * (r - lvl.apply(e))
        ec = self.vcycle(_restrict(r - lvl.apply(e)), level + 1)
        e += lvl.active * _prolong(ec, lvl.shape)
        for _ in range(nu):
            e += lvl.dinv * (r - lvl.apply(e))
        return e


def _norm(t: Tensor) -> Tensor:
    return t.flatten(2).norm(dim=2)


def _pcg(hier: _Hierarchy, f: Tensor, thresh: Tensor, max_iter: int) -> tuple[Tensor, int]:
    """Preconditioned CG from zero on every (mask, channel) column of ``f``; a column stops at ``thresh``."""
    fine = hier.levels[0]
    tiny = torch.finfo(f.dtype).tiny
    x = torch.zeros_like(f)
    r = f.clone()
    active = _norm(r) > thresh
    it = 0
    if max_iter < 1 or not bool(active.any()):
        return x, it
    z = hier.vcycle(r)
    p = z.clone()
    rz = (r * z).flatten(2).sum(2)
    while it < max_iter:
        it += 1
        ap = fine.apply(p)
        pap = (p * ap).flatten(2).sum(2)
        alpha = torch.where(active & (pap > 0), rz / pap.clamp_min(tiny), torch.zeros_like(rz))
        x.addcmul_(alpha[..., None, None, None], p)
        r.addcmul_(alpha[..., None, None, None], ap, value=-1.0)
        active &= _norm(r) > thresh
        if not bool(active.any()):
            break
        z = hier.vcycle(r)
        rz_new = (r * z).flatten(2).sum(2)
        beta = torch.where(active & (rz > 0), rz_new / rz.clamp_min(tiny), torch.zeros_like(rz))
        p = torch.addcmul(z, beta[..., None, None, None], p)
        rz = rz_new
    return x, it


class NoisyLinearImputer3D:
    """ROAD's noisy linear imputation of volumes (module docstring), batched over volumes and channels.

    Args:
        noise: standard deviation of the Gaussian noise added to imputed voxels, in the volume's units.
        tol: relative residual each (volume, channel) column must reach, checked in float64.
        max_iter: CG iterations (all refinement rounds) before a volume is solved with ``spsolve`` instead.
        batch_size: masks per batched solve (building a coarse level holds 27 fine volumes per mask).
        dtype: dtype of the CG iterations; ``None`` = float32.
        smoothing_steps: damped-Jacobi sweeps before and after each coarse correction, finest grid.
        smoothing_steps_coarse: the same on the coarse grids.
        omega: Jacobi damping, in (0, 1).
        coarsest_size: coarsen until a grid has at most this many points, then solve it densely.
        refinements: extra CG rounds on the float64 residual when a round ends above ``tol``.
        workers: CPU only: batches solved concurrently by a pool of threads that each run torch with one
            intra-op thread (the 2-D imputer's pool); ``None`` = ``torch.get_num_threads()``; ``0`` = no pool,
            the calling thread with torch's intra-op threads. The many small ops of a solve stall on OpenMP
            barriers when other processes share the cores; single-threaded workers do not.
    """

    def __init__(
        self,
        noise: float = 0.01,
        tol: float = 1e-8,
        max_iter: int = 200,
        batch_size: int = 2,
        dtype: torch.dtype | None = None,
        smoothing_steps: int = 1,
        smoothing_steps_coarse: int = 2,
        omega: float = 0.9,
        coarsest_size: int = 512,
        refinements: int = 3,
        workers: int | None = None,
    ) -> None:
        if tol <= 0 or min(max_iter, batch_size, smoothing_steps, smoothing_steps_coarse) < 1:
            raise ImputationError("tol must be > 0; max_iter, batch_size and smoothing steps >= 1")
        if not 0 < omega < 1:
            raise ImputationError(f"omega must lie in (0, 1), got {omega}")
        if workers is not None and workers < 0:
            raise ImputationError(f"workers must be >= 0 (or None), got {workers}")
        self.noise, self.tol, self.max_iter = float(noise), float(tol), int(max_iter)
        self.batch_size, self.dtype = int(batch_size), dtype
        self.smoothing_steps, self.smoothing_steps_coarse = int(smoothing_steps), int(smoothing_steps_coarse)
        self.omega, self.coarsest_size, self.refinements = float(omega), int(coarsest_size), int(refinements)
        self.workers = workers
        #: Statistics of the last call: CG iterations per batch, volumes solved with spsolve instead.
        self.last_iterations: list[int] = []
        self.last_fallbacks = 0

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
        x = images.detach().to(torch.float64)
        out = x.clone()
        n_removed = m.flatten(1).sum(1)
        full = n_removed == m[0].numel()
        if bool(full.any()):  # no boundary data: the per-channel mean
            out[full] = x[full].mean(dim=(2, 3, 4), keepdim=True).expand_as(x[full])
        todo = torch.nonzero((n_removed > 0) & ~full).flatten()
        self.last_iterations, self.last_fallbacks = [], 0
        if todo.numel():
            # Batches of alike difficulty: sorted by the number of removed voxels; every worker gets one.
            todo = todo[torch.argsort(n_removed[todo], stable=True)]
            workers = self.workers if self.workers is not None else torch.get_num_threads()
            workers = min(workers, todo.numel()) if images.device.type == "cpu" else 0
            size = min(self.batch_size, -(-todo.numel() // max(workers, 1)))
            chunks = [todo[i : i + size] for i in range(0, todo.numel(), size)]

            def run(idx: Tensor) -> tuple[Tensor, int, int]:
                return self._solve_batch(x[idx], m[idx])

            if workers > 0:
                results = list(_single_threaded_pool(workers).map(run, chunks))
            else:
                results = [run(idx) for idx in chunks]
            for idx, (solved, iterations, fallbacks) in zip(chunks, results, strict=True):
                out[idx] = solved
                self.last_iterations.append(iterations)
                self.last_fallbacks += fallbacks
        out = out.to(images.dtype)
        return torch.where(m[:, None], out, images)

    def _solve_batch(self, x: Tensor, masks: Tensor) -> tuple[Tensor, int, int]:
        """Noiseless imputation of ``x`` ``(B, C, D, H, W)`` float64 under masks removing some voxels.

        Returns:
            ``(out, iterations, fallbacks)``: the CG iterations run and the volumes solved with spsolve.
        """
        if _coarsest_points(tuple(masks.shape[-3:]), self.coarsest_size) > _MAX_DENSE:
            log.info("volume %s too thin for the multigrid hierarchy; using spsolve", tuple(masks.shape[-3:]))
            return self._spsolve(x, masks), 0, x.shape[0]
        dtype = self.dtype or torch.float32
        hier = _Hierarchy(
            masks, dtype, self.omega, self.smoothing_steps, self.smoothing_steps_coarse, self.coarsest_size
        )
        removed = masks.to(torch.float64).unsqueeze(1)
        known = x * (1 - removed)
        f = removed * (_tent(known) - 8 * known) / 24  # weighted sum of the known neighbours
        thresh = self.tol * _norm(f)
        fine64 = _fine_level(masks, torch.float64, 1.0)
        u = torch.zeros_like(f)
        r = f
        ok = _norm(r) <= thresh
        iterations = 0
        for _ in range(1 + self.refinements):
            du, it = _pcg(hier, r.to(dtype), thresh.to(dtype), self.max_iter - iterations)
            iterations += it
            u += du.to(torch.float64)
            r = f - fine64.apply(u)
            ok = _norm(r) <= thresh
            if bool(ok.all()) or iterations >= self.max_iter:
                break
        out = known + u
        bad = torch.nonzero(~ok.all(dim=1)).flatten()
        if bad.numel():
            log.warning(
                "3-D noisy linear imputation: %d of %d masks missed tol=%g in %d iterations; using spsolve",
                bad.numel(),
                x.shape[0],
                self.tol,
                self.max_iter,
            )
            out[bad] = self._spsolve(x[bad], masks[bad])
        return out, iterations, bad.numel()

    @staticmethod
    def _spsolve(x: Tensor, masks: Tensor) -> Tensor:
        xs, ms = x.cpu().numpy(), masks.cpu().numpy()
        return torch.from_numpy(np.stack([_spsolve_one(xs[i], ms[i]) for i in range(len(xs))])).to(x.device)
