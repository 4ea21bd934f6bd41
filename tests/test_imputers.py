"""Tests of camanim.road.imputers: the fast imputer against the spsolve reference and grad-cam."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from scipy import ndimage

from camanim.compute.metrics import imputers as imp
from camanim.compute.metrics.imputers import (
    IMPUTERS,
    CachedImputer,
    ImputationError,
    Imputer,
    NoisyLinearImputer,
    SpsolveImputer,
    get_imputer,
)
from camanim.errors import UnknownNameError

ATOL = 1e-4  # required agreement with the reference, pixel units
SOLVER_ATOL = 2e-5  # agreement of two runs of the iterative solver that batch masks differently


def smooth_image(c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A (c, h, w) float32 image in [0, 1] with structure at several scales."""
    rng = np.random.default_rng(seed)
    chans = [ndimage.gaussian_filter(rng.random((h, w)), s) for s in (0.7, 2.0, 5.0)[:c]]
    while len(chans) < c:
        chans.append(rng.random((h, w)))
    img = np.stack(chans)
    lo, hi = img.min(axis=(1, 2), keepdims=True), img.max(axis=(1, 2), keepdims=True)
    return torch.from_numpy((img - lo) / (hi - lo)).float()


def ranked_masks(h: int, w: int, fractions=(0.2, 0.4, 0.6, 0.8), seed: int = 0) -> torch.Tensor:
    """ROAD-style masks: MoRF and LeRF of a smooth random map at each fraction; (2 * len, h, w) bool."""
    rng = np.random.default_rng(seed)
    order = np.argsort(ndimage.gaussian_filter(rng.standard_normal((h, w)), max(h, w) / 20).ravel())
    out = []
    for frac in fractions:
        k = int(round(frac * h * w))
        for idx in (order[-k:], order[:k]):
            m = np.zeros(h * w, dtype=bool)
            m[idx] = True
            out.append(m.reshape(h, w))
    return torch.from_numpy(np.stack(out))


def random_masks(h: int, w: int, fractions=(0.2, 0.4, 0.6, 0.8), seed: int = 1) -> torch.Tensor:
    """I.i.d. random pixel masks; (len, h, w) bool."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.rand(h, w, generator=g) < f for f in fractions])


def structured_masks(h: int, w: int) -> dict[str, torch.Tensor]:
    """Named (h, w) bool masks with awkward geometry."""
    z = torch.zeros(h, w, dtype=torch.bool)
    masks = {}
    m = z.clone()
    m[: h // 2, w // 4 : 3 * w // 4] = True  # block touching the top border
    masks["border_block"] = m
    m = z.clone()
    m[h - h // 3 :, w - w // 3 :] = True  # block in the bottom-right corner
    masks["corner_block"] = m
    m = z.clone()
    m[::3] = True  # horizontal stripes
    masks["row_stripes"] = m
    m = z.clone()
    m[:, 1::2] = True  # vertical stripes, every other column
    masks["col_stripes"] = m
    ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    masks["checkerboard"] = (ii + jj) % 2 == 0
    masks["checker_4x4"] = ((ii // 4) + (jj // 4)) % 2 == 0
    m = ~z
    m[h // 3, w // 5] = False  # all but one pixel removed
    masks["all_but_one"] = m
    m = ~z
    m[0, 0] = False
    masks["all_but_corner"] = m
    m = z.clone()
    m[h // 2, w // 2] = True
    masks["single_pixel"] = m
    m = ~z
    m[0, :] = False
    m[-1, :] = False
    masks["interior"] = m
    return masks


def reference(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    return SpsolveImputer(noise=0.0)(images, masks)


def test_registry_and_protocol() -> None:
    assert set(IMPUTERS) >= {"noisy_linear", "spsolve"}
    assert isinstance(get_imputer("noisy_linear"), NoisyLinearImputer)
    assert get_imputer("spsolve", noise=0.0).noise == 0.0
    assert isinstance(NoisyLinearImputer(), Imputer)
    assert isinstance(SpsolveImputer(), Imputer)
    assert isinstance(CachedImputer(NoisyLinearImputer()), Imputer)
    with pytest.raises(UnknownNameError, match="noisy_linear") as info:
        get_imputer("noisy_linaer")
    assert isinstance(info.value, KeyError)


@pytest.mark.parametrize("kind", ["ranked", "random"])
def test_matches_spsolve_at_road_fractions(kind: str) -> None:
    h, w = 96, 96
    masks = ranked_masks(h, w) if kind == "ranked" else random_masks(h, w)
    images = smooth_image(3, h, w).expand(len(masks), -1, -1, -1)
    fast = NoisyLinearImputer(noise=0.0)
    out = fast(images, masks)
    assert (out - reference(images, masks)).abs().max().item() <= ATOL
    assert fast.last_fallbacks == 0


def test_matches_spsolve_structured_masks() -> None:
    h, w = 64, 64
    named = structured_masks(h, w)
    masks = torch.stack(list(named.values()))
    images = smooth_image(3, h, w, seed=2).expand(len(masks), -1, -1, -1)
    fast = NoisyLinearImputer(noise=0.0)
    out, ref = fast(images, masks), reference(images, masks)
    for i, name in enumerate(named):
        assert (out[i] - ref[i]).abs().max().item() <= ATOL, name
    assert fast.last_fallbacks == 0


@pytest.mark.parametrize("shape", [(37, 50), (50, 37), (17, 9), (5, 6), (4, 300), (3, 600)])
def test_matches_spsolve_odd_and_small_shapes(shape: tuple[int, int]) -> None:
    h, w = shape
    masks = torch.cat([ranked_masks(h, w, (0.3, 0.7)), random_masks(h, w, (0.5,))])
    images = smooth_image(2, h, w, seed=3).expand(len(masks), -1, -1, -1)
    out = NoisyLinearImputer(noise=0.0)(images, masks)
    assert (out - reference(images, masks)).abs().max().item() <= ATOL


def test_matches_spsolve_224_rgb() -> None:
    masks = ranked_masks(224, 224, seed=5)[::2]  # MoRF at 20 / 40 / 60 / 80 %
    images = smooth_image(3, 224, 224, seed=4).expand(len(masks), -1, -1, -1)
    out = NoisyLinearImputer(noise=0.0)(images, masks)
    assert (out - reference(images, masks)).abs().max().item() <= ATOL


@pytest.mark.parametrize("where", [(10, 17), (0, 0), (0, 9), (15, 31)])
def test_single_removed_pixel_is_weighted_neighbour_mean(where: tuple[int, int]) -> None:
    h, w = 16, 32
    image = smooth_image(3, h, w, seed=6)
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[where] = True
    out = NoisyLinearImputer(noise=0.0).impute_one(image, mask)
    i, j = where
    num, den = torch.zeros(3), 0.0
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            if (di, dj) != (0, 0) and 0 <= i + di < h and 0 <= j + dj < w:
                wt = 1 / 6 if di == 0 or dj == 0 else 1 / 12
                num += wt * image[:, i + di, j + dj]
                den += wt
    torch.testing.assert_close(out[:, i, j], num / den, atol=1e-6, rtol=0)


def test_known_pixels_unchanged_exactly_and_dtype_kept() -> None:
    masks = ranked_masks(48, 40, (0.5,))
    for dtype in (torch.float32, torch.float64):
        images = smooth_image(3, 48, 40).to(dtype).expand(len(masks), -1, -1, -1)
        for imputer in (NoisyLinearImputer(), SpsolveImputer()):
            out = imputer(images, masks, torch.Generator().manual_seed(0))
            assert out.dtype == dtype and out.shape == images.shape
            keep = ~masks.unsqueeze(1).expand_as(images)
            assert torch.equal(out[keep], images[keep])


def test_noise_statistics() -> None:
    h, w = 96, 96
    masks = ranked_masks(h, w, (0.5,))
    images = smooth_image(3, h, w).expand(len(masks), -1, -1, -1)
    clean = NoisyLinearImputer(noise=0.0)(images, masks)
    noisy = NoisyLinearImputer(noise=0.01)(images, masks, torch.Generator().manual_seed(1))
    diff = noisy - clean
    removed = masks.unsqueeze(1).expand_as(images)
    d = diff[removed]
    assert d.numel() > 20000
    assert abs(d.std().item() - 0.01) < 0.0005
    assert abs(d.mean().item()) < 0.0005
    assert torch.count_nonzero(diff[~removed]) == 0


def test_determinism_from_generator() -> None:
    masks = random_masks(40, 40, (0.3, 0.7))
    images = smooth_image(3, 40, 40).expand(len(masks), -1, -1, -1)
    fast = NoisyLinearImputer()
    a = fast(images, masks, torch.Generator().manual_seed(123))
    b = fast(images, masks, torch.Generator().manual_seed(123))
    c = fast(images, masks, torch.Generator().manual_seed(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    removed = masks.unsqueeze(1).expand_as(images)
    assert torch.equal(a[~removed], c[~removed])


def test_all_removed_fills_channel_mean_and_none_removed_is_identity() -> None:
    h, w = 24, 24
    image = smooth_image(3, h, w)
    full = torch.ones(1, h, w, dtype=torch.bool)
    empty = torch.zeros(1, h, w, dtype=torch.bool)
    for imputer in (NoisyLinearImputer(noise=0.0), SpsolveImputer(noise=0.0)):
        out = imputer(image[None], full)[0]
        torch.testing.assert_close(out, image.mean(dim=(1, 2), keepdim=True).expand_as(image))
    noisy = NoisyLinearImputer(noise=0.01)(image[None], full, torch.Generator().manual_seed(0))[0]
    assert abs((noisy - image.mean(dim=(1, 2), keepdim=True)).std().item() - 0.01) < 0.001
    same = NoisyLinearImputer(noise=0.01)(image[None], empty, torch.Generator().manual_seed(0))[0]
    assert torch.equal(same, image)
    # Mixed in one batch with ordinary masks.
    masks = torch.cat([full, random_masks(h, w, (0.5,)), empty])
    out = NoisyLinearImputer(noise=0.0)(image.expand(3, -1, -1, -1), masks)
    assert torch.equal(out[2], image)
    assert (out - reference(image.expand(3, -1, -1, -1), masks)).abs().max().item() <= ATOL


def test_batched_equals_per_image() -> None:
    masks = torch.cat([ranked_masks(56, 64, (0.2, 0.8)), random_masks(56, 64, (0.5,))])
    images = torch.stack([smooth_image(3, 56, 64, seed=s) for s in range(len(masks))])
    for imputer in (NoisyLinearImputer(batch_size=4), SpsolveImputer()):
        batched = imputer(images, masks, torch.Generator().manual_seed(7))
        gen = torch.Generator().manual_seed(7)
        single = torch.stack([imputer.impute_one(images[i], masks[i], gen) for i in range(len(masks))])
        torch.testing.assert_close(batched, single, atol=SOLVER_ATOL, rtol=0)


def test_thread_pool_matches_single_thread_and_leaves_caller_threads() -> None:
    masks = ranked_masks(64, 64)
    images = smooth_image(3, 64, 64).expand(len(masks), -1, -1, -1)
    before = torch.get_num_threads()
    pooled = NoisyLinearImputer(noise=0.0, workers=2, batch_size=2)(images, masks)
    assert torch.get_num_threads() == before
    single = NoisyLinearImputer(noise=0.0, workers=1)(images, masks)
    # Other batch shapes change float32 rounding inside CG, so agreement is to solver accuracy.
    torch.testing.assert_close(pooled, single, atol=SOLVER_ATOL, rtol=0)


def test_cross_check_against_grad_cam() -> None:
    road = pytest.importorskip("pytorch_grad_cam.metrics.road")
    h, w = 48, 56
    image = smooth_image(3, h, w, seed=9)
    mask = ranked_masks(h, w, (0.4,))[0]
    # grad-cam's mask is a *keep* mask: it imputes where mask == 0 and keeps where mask == 1, so it gets
    # ~mask. Its matrix is ours times -1 (diagonal -sum of in-bounds weights, +w off the diagonal, and
    # b = -sum w x_known), so the solution is the same; it works in whatever space the image is given.
    theirs = road.NoisyLinearImputer(noise=0.0)(image, (~mask).float())
    ours = NoisyLinearImputer(noise=0.0).impute_one(image, mask)
    assert (ours - theirs).abs().max().item() <= ATOL


def test_cached_imputer_reuses_solutions_and_draws_fresh_noise() -> None:
    h, w = 40, 40
    image = smooth_image(3, h, w)
    masks = random_masks(h, w, (0.3, 0.6))
    masks = torch.cat([masks, masks[:1]])  # a repeat inside one batch
    images = image.expand(len(masks), -1, -1, -1)
    inner = NoisyLinearImputer()
    cached = CachedImputer(inner, max_entries=8)
    first = cached(images, masks, torch.Generator().manual_seed(3))
    assert (cached.misses, cached.hits) == (2, 1)
    second = cached(images, masks, torch.Generator().manual_seed(3))
    assert (cached.misses, cached.hits) == (2, 4)
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    plain = inner(images, masks, torch.Generator().manual_seed(3))
    torch.testing.assert_close(first, plain, atol=SOLVER_ATOL, rtol=0)
    other = cached(images, masks, torch.Generator().manual_seed(4))
    assert not torch.equal(first, other)
    # Another image with the same masks is a miss.
    cached(smooth_image(3, h, w, seed=1).expand(len(masks), -1, -1, -1), masks)
    assert cached.misses == 4
    small = CachedImputer(inner, max_entries=1)
    small(images, masks)
    assert len(small._cache) == 1


def test_unconverged_masks_fall_back_to_spsolve(caplog: pytest.LogCaptureFixture) -> None:
    masks = ranked_masks(32, 32, (0.8,))
    images = smooth_image(3, 32, 32).expand(len(masks), -1, -1, -1)
    lazy = NoisyLinearImputer(noise=0.0, tol=1e-12, max_iter=1, refinements=0)
    with caplog.at_level(logging.WARNING, logger=imp.__name__):
        out = lazy(images, masks)
    assert "spsolve" in caplog.text
    assert lazy.last_fallbacks == len(masks)
    assert (out - reference(images, masks)).abs().max().item() <= 1e-6


def test_bad_inputs_raise() -> None:
    image = smooth_image(3, 8, 8)
    good = torch.zeros(1, 8, 8, dtype=torch.bool)
    fast = NoisyLinearImputer()
    with pytest.raises(ImputationError):
        fast(image, good)  # not batched
    with pytest.raises(ImputationError):
        fast(image[None], torch.zeros(1, 8, 9, dtype=torch.bool))
    with pytest.raises(ImputationError):
        fast(image[None], good.float())
    with pytest.raises(ImputationError):
        fast((image[None] * 255).to(torch.uint8), good)
    with pytest.raises(ImputationError):
        NoisyLinearImputer(omega=1.5)


def test_assemble_system_is_symmetric_positive_definite() -> None:
    mask = random_masks(12, 10, (0.6,))[0].numpy()
    a, b = imp.assemble_system(mask, smooth_image(2, 12, 10).double().numpy())
    dense = a.toarray()
    assert b.shape == (int(mask.sum()), 2)
    np.testing.assert_allclose(dense, dense.T)
    assert np.linalg.eigvalsh(dense).min() > 0
