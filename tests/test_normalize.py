"""Local and global normalisation of raw maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from camanim.compute.normalize import Range, global_range, is_flat, local_ranges, normalize, normalize_maps


def test_constant_map_normalises_to_zeros_and_is_flagged() -> None:
    m = np.full((5, 7), 3.25, np.float32)
    out = normalize(m)
    assert out.dtype == np.float32 and out.shape == (5, 7)
    assert np.all(out == 0) and np.isfinite(out).all()
    assert is_flat(m)
    assert is_flat(np.zeros((3, 3)))
    assert not is_flat(np.array([[0.0, 1e-3]]))


def test_near_constant_map_within_float32_noise_is_flat() -> None:
    m = np.full((4, 4), 1000.0, np.float32)
    m[0, 0] += 1e-4  # 1e-7 relative: rounding noise, not signal
    assert is_flat(m)
    assert np.all(normalize(m) == 0)


def test_global_range_halves_the_smaller_map() -> None:
    small = np.array([[0.0, 0.5, 1.0]], np.float32)
    large = np.array([[0.0, 1.0, 2.0]], np.float32)
    g = global_range([small, large])
    assert g == Range(0.0, 2.0)
    assert normalize(small, g).max() == pytest.approx(0.5)
    assert normalize(large, g).max() == pytest.approx(1.0)
    lo_small, lo_large = local_ranges([small, large])
    assert normalize(small, lo_small).max() == pytest.approx(1.0)
    assert lo_large == Range(0.0, 2.0)


def test_normalize_maps_scopes() -> None:
    maps = [np.array([[1.0, 3.0]]), np.array([[0.0, 6.0]])]
    local, lranges = normalize_maps(maps, "local")
    glob, granges = normalize_maps(maps, "global")
    np.testing.assert_allclose(local[0], [[0.0, 1.0]])
    np.testing.assert_allclose(glob[0], [[1 / 6, 0.5]], rtol=1e-6)
    assert lranges[0] == Range(1.0, 3.0) and granges == [Range(0.0, 6.0)] * 2
    with pytest.raises(ValueError):
        normalize_maps(maps, "layer")  # type: ignore[arg-type]


def test_values_outside_range_clip_and_nan_becomes_zero() -> None:
    m = np.array([[-1.0, 0.5, 3.0, np.nan]])
    out = normalize(m, Range(0.0, 1.0))
    np.testing.assert_array_equal(out, [[0.0, 0.5, 1.0, 0.0]])


def test_range_ignores_non_finite_values() -> None:
    assert local_ranges([np.array([np.nan, 1.0, 4.0, np.inf])]) == [Range(1.0, 4.0)]


def test_torch_input_gives_torch_output() -> None:
    t = torch.tensor([[0.0, 2.0], [4.0, 8.0]])
    out = normalize(t, global_range([t, t * 2]))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.125], [0.25, 0.5]]))
    assert torch.all(normalize(torch.ones(3, 3)) == 0)
    assert is_flat(torch.ones(2, 2)) and global_range(torch.stack([t, t])) == Range(0.0, 8.0)


def test_range_validation_and_helpers() -> None:
    with pytest.raises(ValueError):
        Range(2.0, 1.0)
    r = Range(np.float32(1.0), 3.0)  # type: ignore[arg-type]
    assert type(r.low) is float and r.span == 2.0 and r.scale(2.0) == 0.5
    assert r.union(Range(-1.0, 0.0)) == Range(-1.0, 3.0)
    with pytest.raises(ValueError):
        global_range([])
