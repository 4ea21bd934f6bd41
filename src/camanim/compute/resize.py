"""Resizing maps: bilinear, as ``torch.nn.functional.interpolate`` with ``align_corners=False``; maps of a
volume ``(d, h, w)`` are resized to a ``(D, H, W)`` size the same way in three dimensions (trilinear).

Maps are resized to the input size for display and for ROAD's pixel ranking, and shrunk to a tile size for
frames; every output value is a convex combination of input values, so a map stays inside the range it was
normalised by.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["resize_map", "resize_maps", "shrink", "upsample_by_size"]


#: The interpolation by the number of grid axes: maps ``(h, w)`` and volumes ``(d, h, w)``.
MODES = {2: "bilinear", 3: "trilinear"}


def resize_maps(maps: Any, size: tuple[int, ...]) -> Any:
    """Bilinear resize of a stack of maps (``torch.nn.functional.interpolate``, ``align_corners=False``), or
    trilinear of a stack of volume maps.

    Args:
        maps: ``(N, h, w)`` (or ``(N, d, h, w)``) NumPy array or torch tensor.
        size: Target ``(H, W)`` in pixels (``(D, H, W)`` in voxels for volume maps).

    Returns:
        ``(N, H, W)`` (``(N, D, H, W)``) float32, a NumPy array for NumPy input and a tensor (same device) for
        tensor input.
    """
    is_tensor = isinstance(maps, torch.Tensor)
    t = maps.detach() if is_tensor else torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))
    if len(size) not in MODES or t.ndim != len(size) + 1:
        raise ValueError(f"maps must be (N, h, w) or (N, d, h, w) for a size of as many axes, got "
                         f"{tuple(t.shape)} and size {tuple(size)}")  # fmt: skip
    size = tuple(int(v) for v in size)
    t = t.to(torch.float32)
    if tuple(t.shape[1:]) != size:
        mode = MODES[len(size)]
        t = torch.nn.functional.interpolate(t[:, None], size=size, mode=mode, align_corners=False)[:, 0]
    elif not is_tensor:
        t = t.clone()  # never hand back a view of the caller's array
    return t if is_tensor else t.numpy()


def upsample_by_size(maps: Sequence[Any], size: tuple[int, ...], *, relu: bool = False) -> np.ndarray:
    """Bilinear resize of maps of mixed native sizes (one per layer), one :func:`resize_maps` call per size;
    trilinear for volume maps and a ``(D, H, W)`` size.

    Each output plane equals ``resize_maps`` of that plane alone (the interpolation is per plane).

    Args:
        maps: ``n`` torch tensors, each ``(h, w)`` or each ``(K, h, w)`` (the same ``K``); ``h, w`` may differ.
            With a 3-axis ``size``: each ``(d, h, w)`` or ``(K, d, h, w)``.
        size: target ``(H, W)`` (or ``(D, H, W)``).
        relu: clamp at 0 before resizing.

    Returns:
        ``(n, H, W)`` or ``(n, K, H, W)`` float32 (``(n, D, H, W)`` or ``(n, K, D, H, W)``).
    """
    axes = len(size)
    lead = tuple(maps[0].shape[:-axes]) if len(maps) else ()
    out = np.empty((len(maps), *lead, *(int(v) for v in size)), np.float32)
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, m in enumerate(maps):
        if tuple(m.shape[:-axes]) != lead:
            raise ValueError(f"maps must share their leading shape {lead}, got {tuple(m.shape)}")
        groups.setdefault(tuple(m.shape), []).append(k)
    for shape, ks in groups.items():
        raw = torch.stack([maps[k] for k in ks]).reshape(-1, *shape[-axes:])
        if relu:
            raw = raw.clamp_min(0)
        out[ks] = resize_maps(raw.float(), size).numpy().reshape(len(ks), *out.shape[1:])
    return out


def resize_map(m: Any, size: tuple[int, ...]) -> Any:
    """Bilinear resize of one map (trilinear of one volume map); see :func:`resize_maps`.

    Args:
        m: ``(h, w)`` (or ``(d, h, w)``) NumPy array or torch tensor.
        size: Target ``(H, W)`` in pixels (``(D, H, W)`` in voxels).

    Returns:
        ``(H, W)`` (``(D, H, W)``) float32, of the same kind as ``m``.
    """
    if len(m.shape) != len(size) or len(size) not in MODES:
        raise ValueError(f"map must be (h, w) or (d, h, w) as its size, got {tuple(m.shape)} and {tuple(size)}; "
                         "use resize_maps for (N, h, w)")  # fmt: skip
    return resize_maps(m[None], size)[0]


def shrink(stack: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize ``(N, H, W)`` (or ``(N, K, H, W)``) to ``size``; antialiased when shrinking. Every output value is a
    convex combination of input values, so it stays inside the range the input was normalised by."""
    if stack.shape[-2:] == tuple(size):
        return stack
    t = torch.from_numpy(stack.reshape(-1, 1, *stack.shape[-2:]))
    shrinking = size[0] < stack.shape[-2] or size[1] < stack.shape[-1]
    out = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=shrinking)
    return out.numpy().reshape(*stack.shape[:-2], *size)
