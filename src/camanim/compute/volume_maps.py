"""Volumes and clips as model inputs: which arrays are volumes, and the grey (or RGB) volume shown under maps.

A volume model takes ``(B, C, D, H, W)``: a CT or MRI volume (``C = 1`` mostly; ``D`` slices of ``H x W``
voxels) or a video clip (``C = 3``, ``D = T`` frames). Its layers' maps are ``(B, d, h, w)`` at the layer's
own resolution (:mod:`camanim.compute.layers`, kind ``volume``) and are resized trilinearly to the input's
``(D, H, W)`` only for display and scoring (:func:`camanim.compute.resize.resize_maps`).

The display of a tensor or array input is what the maps are drawn over: ``(B, D, H, W, 3)`` uint8. A clip
normalised with a model's three-channel mean and standard deviation is shown in colour, as its frames;
anything else is grey, the channel mean scaled to ``[0, 255]`` by bounds ``(low, high)`` when given or else
by the sample's minimum and maximum over the whole volume. (A loaded volume, with its window, is shown by
:func:`camanim.compute.volumes.volume_display`.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["as_volume_batch", "is_volume_array", "volume_display"]


def is_volume_array(a: np.ndarray, volume_model: bool) -> bool:
    """Whether a NumPy array given as the image is a volume rather than a picture.

    ``(C, D, H, W)`` is always a volume; ``(D, H, W)`` is one for a volume model, or when its last axis
    cannot be a picture's channels (1, 3 or 4), since ``(H, W, 3)`` is how pictures come as arrays.
    """
    if a.ndim == 4:
        return True
    return a.ndim == 3 and (volume_model or a.shape[-1] not in (1, 3, 4))


def as_volume_batch(a: np.ndarray | Tensor) -> Tensor:
    """A volume ``(D, H, W)``, ``(C, D, H, W)`` or batch ``(B, C, D, H, W)`` as a float32 CPU tensor
    ``(B, C, D, H, W)``."""
    t = torch.as_tensor(np.asarray(a, dtype=np.float32) if isinstance(a, np.ndarray) else a)
    t = t.detach().float().cpu()
    if t.dim() == 3:
        t = t[None]
    if t.dim() == 4:
        t = t[None]
    if t.dim() != 5:
        raise ValueError(f"a volume must be (D, H, W), (C, D, H, W) or (B, C, D, H, W), got {list(t.shape)}")
    return t


def volume_display(
    x: Tensor,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    bounds: tuple[float, float] | None = None,
) -> np.ndarray:
    """What the maps of a volume input are drawn over: ``(B, D, H, W, 3)`` uint8.

    Args:
        x: the model input ``(B, C, D, H, W)``.
        mean, std: the model's per-channel normalisation; with three of each and ``C = 3`` (a video clip),
            the input is denormalised and shown in colour.
        bounds: the intensity window ``(low, high)`` of a grey volume in the input's units; default each
            sample's minimum and maximum.
    """
    x = x.detach().float().cpu()
    b, c = x.shape[:2]
    if (
        c == 3
        and mean is not None
        and std is not None
        and len(mean) == 3
        and len(std) == 3
        and bounds is None
    ):
        m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1, 1)
        s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1, 1)
        pixels = (x * s + m).clamp(0, 1)
    else:
        grey = x.mean(dim=1, keepdim=True)
        if bounds is not None:
            lo = torch.full((b, 1, 1, 1, 1), float(bounds[0]))
            hi = torch.full((b, 1, 1, 1, 1), float(bounds[1]))
        else:
            lo = grey.amin(dim=(2, 3, 4), keepdim=True)
            hi = grey.amax(dim=(2, 3, 4), keepdim=True)
        pixels = ((grey - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1).expand(-1, 3, -1, -1, -1)
    return (pixels.permute(0, 2, 3, 4, 1).numpy() * 255 + 0.5).astype(np.uint8)
