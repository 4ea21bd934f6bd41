"""Local- and global-level normalisation of raw class activation maps.

CAManim (Kaczmarek et al., PLOS ONE 2024, "Global- vs. Local-Level Normalization") shows every layer's map
twice: scaled by that layer's own minimum and maximum (*local*: where does this layer look?) and by the
minimum and maximum over all layers (*global*: which layer activates most strongly overall?). Under the
global range a weak layer looks dim, under its local range it fills the whole colour scale.

Maps are raw values, already ReLU'd and upsampled by the caller. Functions accept NumPy arrays or torch
tensors; :func:`normalize` returns the same kind it was given, everything else returns plain Python or NumPy.

Example:
    >>> import numpy as np
    >>> a, b = np.array([[0.0, 1.0]]), np.array([[0.0, 2.0]])
    >>> [normalize(m, r).tolist() for m, r in zip([a, b], local_ranges([a, b]))]
    [[[0.0, 1.0]], [[0.0, 1.0]]]
    >>> normalize(a, global_range([a, b])).tolist()
    [[0.0, 0.5]]
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np

__all__ = [
    "DEFAULT_RTOL",
    "Range",
    "global_range",
    "is_flat",
    "local_ranges",
    "map_range",
    "normalize",
    "normalize_maps",
]

#: Relative span under which a map counts as constant. float32 carries about 7 significant digits, so a
#: smaller span is rounding noise that normalisation would blow up into a full-scale pattern.
DEFAULT_RTOL = 1e-6

ArrayT = TypeVar("ArrayT")


@dataclass(frozen=True)
class Range:
    """A closed value interval ``[low, high]`` used to scale maps to ``[0, 1]``.

    Attributes:
        low: Value mapped to 0 (the bottom of the colour bar), in the map's raw units.
        high: Value mapped to 1 (the top of the colour bar), in the map's raw units.
    """

    low: float
    high: float

    def __post_init__(self) -> None:
        # Plain floats keep ranges hashable-by-value and JSON-serialisable even when built from np.float32.
        object.__setattr__(self, "low", float(self.low))
        object.__setattr__(self, "high", float(self.high))
        if math.isnan(self.low) or math.isnan(self.high):
            raise ValueError(f"Range bounds must not be NaN, got low={self.low}, high={self.high}")
        if self.high < self.low:
            raise ValueError(f"Range needs low <= high, got low={self.low}, high={self.high}")

    @property
    def span(self) -> float:
        """``high - low`` in raw units."""
        return self.high - self.low

    def is_flat(self, rtol: float = DEFAULT_RTOL) -> bool:
        """Whether the span is zero or negligible next to the bounds' magnitude.

        Args:
            rtol: Relative tolerance: flat when ``span <= rtol * max(|low|, |high|)``.
        """
        return self.span <= rtol * max(abs(self.low), abs(self.high))

    def union(self, other: Range) -> Range:
        """The smallest range holding both ``self`` and ``other``."""
        return Range(min(self.low, other.low), max(self.high, other.high))

    def scale(self, value: float) -> float:
        """Where ``value`` falls in the range, as a fraction in ``[0, 1]`` (0 for a flat range)."""
        if self.is_flat():
            return 0.0
        return min(1.0, max(0.0, (value - self.low) / self.span))

    def __str__(self) -> str:
        return f"[{self.low:.4g}, {self.high:.4g}]"


def _is_tensor(x: Any) -> bool:
    # torch is only ever imported by the caller; checking sys.modules keeps this module light.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _min_max(m: Any) -> tuple[float, float]:
    """Minimum and maximum over the finite values of ``m`` (``(0, 0)`` when none are finite)."""
    if _is_tensor(m):
        m = m.detach()
        if m.numel() == 0:
            raise ValueError("cannot take the range of an empty map")
        lo, hi = float(m.min()), float(m.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            finite = m[m.isfinite()]
            lo, hi = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 0.0)
        return lo, hi
    a = np.asarray(m)
    if a.size == 0:
        raise ValueError("cannot take the range of an empty map")
    lo, hi = float(a.min()), float(a.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        finite = a[np.isfinite(a)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    return lo, hi


def map_range(m: Any) -> Range:
    """The range of one map: its own minimum and maximum over finite values.

    Args:
        m: A map of any shape, typically ``(H, W)``, as a NumPy array or torch tensor.

    Returns:
        ``Range(min, max)``; ``Range(0, 0)`` when the map holds no finite value.
    """
    return Range(*_min_max(m))


def local_ranges(maps: Iterable[Any]) -> list[Range]:
    """One range per map, each from that map's own minimum and maximum (local-level normalisation).

    Args:
        maps: Maps (NumPy arrays or torch tensors), e.g. one ``(H, W)`` map per layer.

    Returns:
        A list of :class:`Range`, in the order of ``maps``.
    """
    return [map_range(m) for m in maps]


def global_range(maps: Iterable[Any]) -> Range:
    """One range over all maps together (global-level normalisation).

    Args:
        maps: Maps (NumPy arrays or torch tensors), e.g. one ``(H, W)`` map per layer. May also be a
            single stacked ``(N, H, W)`` array.

    Returns:
        ``Range(min over all maps, max over all maps)``.

    Raises:
        ValueError: If ``maps`` is empty.
    """
    if isinstance(maps, np.ndarray) or _is_tensor(maps):
        return map_range(maps)
    ranges = local_ranges(maps)
    if not ranges:
        raise ValueError("global_range needs at least one map")
    return Range(min(r.low for r in ranges), max(r.high for r in ranges))


def is_flat(m: Any, rtol: float = DEFAULT_RTOL) -> bool:
    """Whether a map is constant (to within ``rtol`` of its magnitude), so normalising it shows nothing.

    An all-zero map (a layer whose gradients vanished after ReLU) is flat.

    Args:
        m: A map (NumPy array or torch tensor).
        rtol: Relative tolerance; see :meth:`Range.is_flat`.
    """
    return map_range(m).is_flat(rtol)


def normalize(m: ArrayT, rng: Range | None = None, rtol: float = DEFAULT_RTOL) -> ArrayT:
    """Scale a map to ``[0, 1]``: ``(m - low) / (high - low)``, clipped.

    Values outside the range clip to 0 or 1; NaN becomes 0. A flat range (``high == low``, or a span within
    ``rtol``) gives all zeros rather than dividing by zero.

    Args:
        m: A raw map of any shape, typically ``(H, W)``; NumPy array or torch tensor.
        rng: The range to scale by; the map's own range (local normalisation) when None.
        rtol: Relative tolerance for flatness; see :meth:`Range.is_flat`.

    Returns:
        float32 values in ``[0, 1]`` with the shape of ``m``: a NumPy array for NumPy input, a tensor on the
        same device for tensor input.
    """
    if rng is None:
        rng = map_range(m)
    if _is_tensor(m):
        torch = sys.modules["torch"]
        t = m.detach().to(torch.float32)
        if rng.is_flat(rtol):
            return torch.zeros_like(t)
        out = ((t - rng.low) / rng.span).clamp_(0.0, 1.0)
        return torch.nan_to_num_(out, nan=0.0)
    a = np.asarray(m, dtype=np.float32)
    if rng.is_flat(rtol):
        return np.zeros_like(a)
    # float64 scalars would promote the whole map; keep the arithmetic in float32.
    out = (a - np.float32(rng.low)) * np.float32(1.0 / rng.span)
    np.clip(out, 0.0, 1.0, out=out)
    np.nan_to_num(out, copy=False, nan=0.0)
    return out


def normalize_maps(
    maps: Sequence[ArrayT], scope: Literal["local", "global"] = "local", rtol: float = DEFAULT_RTOL
) -> tuple[list[ArrayT], list[Range]]:
    """Normalise a sequence of maps locally (each by its own range) or globally (all by one range).

    Args:
        maps: Raw maps, e.g. one ``(H, W)`` map per layer.
        scope: ``"local"`` or ``"global"``.
        rtol: Relative tolerance for flatness; see :meth:`Range.is_flat`.

    Returns:
        ``(normalised maps, range used for each map)``; under ``"global"`` every range is the same.
    """
    if scope == "local":
        ranges = local_ranges(maps)
    elif scope == "global":
        ranges = [global_range(maps)] * len(maps)
    else:
        raise ValueError(f"scope must be 'local' or 'global', got {scope!r}")
    return [normalize(m, r, rtol) for m, r in zip(maps, ranges, strict=True)], ranges
