"""The 3-D noisy linear imputer against ``scipy.sparse.linalg.spsolve`` on the assembled system: a 24³
volume half removed, removed regions touching the border, a corner voxel by hand; its Galerkin coarse level
against ``P^T A P`` with explicit sparse matrices; invariances (batched == one by one, pool == calling
thread), the special cases and the noise.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg
import torch
from scipy import ndimage

from camanim.compute.metrics.imputers3d import (
    NoisyLinearImputer3D,
    _fine_level,
    _galerkin,
    _prolong,
    assemble_system_3d,
)


def _spsolve_reference(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``(C, D, H, W)`` float64: the removed voxels solved by spsolve on :func:`assemble_system_3d`."""
    mat, rhs = assemble_system_3d(mask, image)
    out = image.copy()
    out[:, mask] = np.asarray(scipy.sparse.linalg.spsolve(mat.tocsc(), rhs)).reshape(rhs.shape).T
    return out


def _smooth_mask(shape: tuple[int, int, int], fraction: float, seed: int) -> np.ndarray:
    """The top ``fraction`` of a smooth random map, as ROAD removes the most relevant voxels of a CAM."""
    rng = np.random.default_rng(seed)
    order = np.argsort(ndimage.gaussian_filter(rng.standard_normal(shape), 3).ravel(), kind="stable")
    mask = np.zeros(order.size, bool)
    mask[order[order.size - int(round(fraction * order.size)) :]] = True
    return mask.reshape(shape)


def _impute(image: np.ndarray, mask: np.ndarray, **kwargs: object) -> tuple[np.ndarray, NoisyLinearImputer3D]:
    imputer = NoisyLinearImputer3D(noise=0.0, **kwargs)  # type: ignore[arg-type]
    out = imputer.impute_clean(torch.from_numpy(image)[None], torch.from_numpy(mask)[None])
    return out[0].numpy(), imputer


@pytest.mark.parametrize("smooth", [True, False], ids=["smooth map", "random voxels"])
def test_24_cubed_half_removed_matches_spsolve(smooth: bool) -> None:
    rng = np.random.default_rng(3)
    image = ndimage.gaussian_filter(rng.random((2, 24, 24, 24)), (0, 1, 1, 1)) * 255
    mask = _smooth_mask((24, 24, 24), 0.5, 4) if smooth else rng.random((24, 24, 24)) < 0.5
    ours, imputer = _impute(image, mask)
    ref = _spsolve_reference(image, mask)
    assert imputer.last_fallbacks == 0, "the multigrid solve fell back to spsolve"
    assert np.abs(ours - ref).max() <= 1e-5 * np.ptp(image)
    assert (ours[:, ~mask] == image[:, ~mask]).all()


def test_isolated_regions_touching_the_border() -> None:
    rng = np.random.default_rng(5)
    image = rng.random((1, 12, 14, 16))
    mask = np.zeros((12, 14, 16), bool)
    mask[:4, :5, :3] = True  # a block in a corner
    mask[6:9, 13, 4:12] = True  # a slab on a face
    mask[11, 0, 15] = True  # a lone corner voxel
    mask[5:7, 6:8, 7:9] = True  # and one inside, for contrast
    ours, imputer = _impute(image, mask)
    ref = _spsolve_reference(image, mask)
    assert imputer.last_fallbacks == 0
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * np.ptp(image))
    # the lone corner voxel, by hand: its 3 face, 3 edge and 1 corner neighbours, all known
    nb = {(-1, 0, 0): 1 / 6, (0, 1, 0): 1 / 6, (0, 0, -1): 1 / 6}
    nb |= {(-1, 1, 0): 1 / 12, (-1, 0, -1): 1 / 12, (0, 1, -1): 1 / 12, (-1, 1, -1): 1 / 24}
    hand = sum(w * image[0, 11 + dz, dy, 15 + dx] for (dz, dy, dx), w in nb.items()) / sum(nb.values())
    assert ours[0, 11, 0, 15] == pytest.approx(hand, abs=1e-9)


def test_galerkin_level_is_pt_a_p() -> None:
    shape = (7, 8, 9)  # odd and even sides
    mask = np.random.default_rng(6).random(shape) < 0.6
    fine = _fine_level(torch.from_numpy(mask)[None], torch.float64, 0.9)
    coarse = _galerkin(fine.coefficients())[0].numpy()  # (27, 4, 5, 5)
    cshape = coarse.shape[1:]
    n_coarse = int(np.prod(cshape))
    # P: columns are prolonged unit vectors; keep the rows of the removed voxels (the unknowns of A)
    eye = torch.eye(n_coarse, dtype=torch.float64).reshape(1, n_coarse, *cshape)
    p = _prolong(eye, shape)[0].reshape(n_coarse, -1).T.numpy()[mask.ravel()]
    mat, _ = assemble_system_3d(mask, np.zeros((1, *shape)))
    ref = (sp.csr_matrix(p).T @ mat @ sp.csr_matrix(p)).toarray()
    ours = np.zeros((n_coarse, n_coarse))
    for k, (dz, dy, dx) in enumerate(np.ndindex(3, 3, 3)):
        for i, (z, y, x) in enumerate(np.ndindex(*cshape)):
            q = (z + dz - 1, y + dy - 1, x + dx - 1)
            if all(0 <= c < n for c, n in zip(q, cshape, strict=True)):
                ours[i, np.ravel_multi_index(q, cshape)] = coarse[k, z, y, x]
    np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_batched_pooled_and_one_by_one_agree() -> None:
    rng = np.random.default_rng(7)
    images = torch.from_numpy(rng.random((3, 1, 10, 11, 12))).float()
    masks = torch.from_numpy(
        np.stack([_smooth_mask((10, 11, 12), f, i) for i, f in enumerate((0.2, 0.5, 0.8))])
    )
    pooled = NoisyLinearImputer3D(noise=0.0, workers=2).impute_clean(images, masks)
    inline = NoisyLinearImputer3D(noise=0.0, workers=0, batch_size=3).impute_clean(images, masks)
    single = torch.cat(
        [NoisyLinearImputer3D(noise=0.0).impute_clean(images[i : i + 1], masks[i : i + 1]) for i in range(3)]
    )
    torch.testing.assert_close(pooled, single, rtol=0, atol=1e-6)
    torch.testing.assert_close(inline, single, rtol=0, atol=1e-6)


def test_special_cases_thin_volumes_and_noise() -> None:
    rng = np.random.default_rng(8)
    # a volume too thin for the hierarchy is solved by spsolve
    image = rng.random((1, 2, 70, 70))
    mask = rng.random((2, 70, 70)) < 0.5
    ours, imputer = _impute(image, mask)
    assert imputer.last_fallbacks == 1
    np.testing.assert_allclose(ours, _spsolve_reference(image, mask), atol=1e-9)
    # nothing removed: unchanged; everything removed: the per-channel mean
    x = torch.from_numpy(rng.random((2, 2, 4, 5, 6))).float()
    m = torch.zeros(2, 4, 5, 6, dtype=torch.bool)
    m[1] = True
    out = NoisyLinearImputer3D(noise=0.0).impute_clean(x, m)
    assert torch.equal(out[0], x[0])
    torch.testing.assert_close(out[1], x[1].mean(dim=(1, 2, 3), keepdim=True).expand_as(x[1]))
    # noise: N(0, sigma^2) drawn for the whole batch from the generator, added to removed voxels only
    m = torch.from_numpy(rng.random((2, 4, 5, 6)) < 0.3)
    imputer = NoisyLinearImputer3D(noise=0.05)
    noisy = imputer(x, m, generator=torch.Generator().manual_seed(9))
    clean = imputer.impute_clean(x, m)
    expected = torch.where(
        m[:, None], clean + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(9)), x
    )
    torch.testing.assert_close(noisy, expected)
    assert torch.equal(noisy[~m[:, None].expand_as(x)], x[~m[:, None].expand_as(x)])
