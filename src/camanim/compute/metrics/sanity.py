"""The model-randomisation sanity check's maths (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS
2018): which modules are randomised in what order, how, and how alike two maps are.

* **Order**: the modules that own parameters, in the order the forward pass runs them (recorded with hooks
  on one dry forward); the cascade randomises them from the top (the logits) down: depth ``k`` = the last
  ``k`` of them randomised.
* **Randomisation**: a module's ``reset_parameters()`` (its own initialisation, as Quantus 0.6's MPRT
  does; a BatchNorm's resets its running statistics too), or, for a module without one, each of its own
  parameters redrawn from ``N(0, std of the original)``; under ``torch.manual_seed`` of a seed derived from
  the run's seed and the module's position, inside ``torch.random.fork_rng`` (the caller's random state is
  left as it was). Always on a copy (:func:`randomise_cascade` never touches the model it is given).
* **Similarity** of two maps (ReLU'd, upsampled to the input size): ``spearman`` = Spearman rank correlation
  of the pixels (scipy's ``rankdata`` with average ranks, then Pearson); ``ssim`` = scikit-image's
  ``structural_similarity`` of the maps min-max scaled to [0, 1] (``data_range=1``, default window);
  ``hog`` = Pearson correlation of the two maps' histograms of oriented gradients (scikit-image ``hog``,
  9 orientations, 8 x 8 cells, 3 x 3 blocks, of the scaled maps), as the paper. A constant map has no
  ranking: its Spearman and HOG similarity are NaN (SSIM is defined).

Example:
    >>> import numpy as np
    >>> from camanim.compute.metrics.sanity import similarity
    >>> a = np.random.default_rng(0).random((2, 32, 32))
    >>> {k: v.round(3).tolist() for k, v in similarity(a, a).items()}
    {'spearman': [1.0, 1.0], 'ssim': [1.0, 1.0], 'hog': [1.0, 1.0]}
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from camanim.errors import CamanimError, UnknownNameError

__all__ = [
    "MEASURES",
    "SanityError",
    "parameterised_modules",
    "randomise_cascade",
    "randomise_module",
    "similarity",
]

#: Similarity measures, in the order reported.
MEASURES = ("spearman", "ssim", "hog")


class SanityError(CamanimError, ValueError):
    """Bad settings of the randomisation check (depths, measures)."""


def parse_measures(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``"spearman,ssim"``, ``"all"`` or a list to measure names (order of :data:`MEASURES`)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names = {str(i).strip().lower() for i in items if str(i).strip()}
    if "all" in names:
        return MEASURES
    for n in names:
        if n not in MEASURES:
            raise UnknownNameError("similarity measure", n, list(MEASURES) + ["all"])
    if not names:
        raise SanityError("no similarity measure given")
    return tuple(m for m in MEASURES if m in names)


def parameterised_modules(model: nn.Module, example: Tensor) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every module owning parameters, in the order one forward on ``example`` runs
    them (a module run twice counts once, at its first run); modules the forward never runs come last, in
    definition order. The model runs in eval mode under ``torch.no_grad``; its flags are restored."""
    owners = [(n, m) for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    seen: list[int] = []
    hooks = []

    def hook(mod: nn.Module, _inp: object, _out: object) -> None:
        if id(mod) not in seen:
            seen.append(id(mod))

    modes = {m: m.training for m in model.modules()}
    try:
        for _, m in owners:
            hooks.append(m.register_forward_hook(hook))
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    rank = {i: k for k, i in enumerate(seen)}
    return sorted(owners, key=lambda nm: (rank.get(id(nm[1]), len(rank)), 0))


def _module_seed(seed: int, position: int, name: str) -> int:
    h = hashlib.blake2b(f"sanity/{int(seed)}/{position}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2**63 - 1)


def randomise_module(module: nn.Module, seed: int) -> None:
    """Re-initialise ``module``'s own parameters in place (see the module docstring), seeded."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        if hasattr(module, "reset_parameters") and callable(module.reset_parameters):
            module.reset_parameters()
            return
        for p in module.parameters(recurse=False):
            std = float(p.float().std()) if p.numel() > 1 else float(p.float().abs().mean())
            p.normal_(0.0, std if std > 0 else 1e-2)


def randomise_cascade(
    model: nn.Module, order: Sequence[tuple[str, nn.Module]], depths: Sequence[int], seed: int = 0
) -> Iterator[tuple[int, nn.Module]]:
    """A private copy of ``model`` randomised deeper and deeper from the top.

    Args:
        model: the model (never changed).
        order: its parameterised modules in forward order (:func:`parameterised_modules`).
        depths: increasing numbers of top modules randomised, each in ``1..len(order)``.
        seed: base seed of the re-initialisations.

    Yields:
        ``(depth, the copy with its last depth modules randomised)``; the copy is the same object each
        time, randomised further in place (use it before taking the next one).
    """
    ds = list(depths)
    if any(b <= a for a, b in zip(ds, ds[1:], strict=False)) or (
        ds and not 1 <= ds[0] <= ds[-1] <= len(order)
    ):
        raise SanityError(f"depths must increase within 1..{len(order)}, got {ds}")
    names = {id(m): n for n, m in model.named_modules()}
    twin = copy.deepcopy(model)
    by_name = dict(twin.named_modules())
    top_down = [by_name[names[id(m)]] for _, m in reversed(order)]
    labels = [n for n, _ in reversed(order)]
    done = 0
    for d in ds:
        for k in range(done, d):
            randomise_module(top_down[k], _module_seed(seed, k, labels[k]))
        done = d
        yield d, twin


def default_depths(n_modules: int, steps: int | None) -> list[int]:
    """``steps`` cascade depths spread evenly over ``1..n_modules`` (the top module alone first, every module
    last); all of them when ``steps`` is None or at least ``n_modules``."""
    if n_modules < 1:
        raise SanityError("the model has no parameters to randomise")
    if steps is None or steps >= n_modules:
        return list(range(1, n_modules + 1))
    if steps < 1:
        raise SanityError(f"the number of depths must be at least 1, got {steps}")
    if steps == 1:
        return [n_modules]
    return sorted({int(round(v)) for v in np.linspace(1, n_modules, steps)})


# --------------------------------------------------------------------------------------------------------
# Similarity.
# --------------------------------------------------------------------------------------------------------


def _scaled(maps: np.ndarray) -> np.ndarray:
    """Each ``(H, W)`` of ``(L, H, W)`` min-max scaled to [0, 1] (zeros for a constant map)."""
    m = np.nan_to_num(np.asarray(maps, dtype=np.float64))
    lo = m.min(axis=(1, 2), keepdims=True)
    span = m.max(axis=(1, 2), keepdims=True) - lo
    return np.where(span > 0, (m - lo) / np.where(span > 0, span, 1.0), 0.0)


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(1) / np.where(den > 0, den, 1.0), np.nan)


def ranks(maps: np.ndarray) -> np.ndarray:
    """``(L, H * W)`` average ranks of each map's pixels (scipy ``rankdata``), for :func:`similarity`."""
    from scipy.stats import rankdata

    flat = np.nan_to_num(np.asarray(maps, dtype=np.float64)).reshape(len(maps), -1)
    return rankdata(flat, axis=1)


def hog_features(maps: np.ndarray) -> np.ndarray:
    """``(L, F)`` HOG features of each scaled map (9 orientations, 8 x 8 cells, 3 x 3 blocks)."""
    from skimage.feature import hog

    scaled = _scaled(maps)
    return np.stack(
        [
            hog(m, orientations=9, pixels_per_cell=(8, 8), cells_per_block=(3, 3), feature_vector=True)
            for m in scaled
        ]
    )


def similarity(
    a: np.ndarray,
    b: np.ndarray,
    measures: Sequence[str] = MEASURES,
    *,
    a_ranks: np.ndarray | None = None,
    a_hog: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """How alike map ``a[i]`` and ``b[i]`` are, per measure (definitions in the module docstring).

    Args:
        a, b: ``(L, H, W)`` maps.
        measures: names of :data:`MEASURES`.
        a_ranks, a_hog: :func:`ranks` and :func:`hog_features` of ``a`` when already computed.

    Returns:
        Per measure, ``(L,)`` float64 (NaN where undefined).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 3:
        raise SanityError(f"maps must be two (L, H, W) stacks of one shape, got {a.shape} and {b.shape}")
    out: dict[str, np.ndarray] = {}
    for name in measures:
        if name == "spearman":
            ra = ranks(a) if a_ranks is None else a_ranks
            out[name] = _pearson_rows(ra, ranks(b))
        elif name == "ssim":
            from skimage.metrics import structural_similarity

            sa, sb = _scaled(a), _scaled(b)
            win = min(7, *a.shape[1:])
            win -= 1 - win % 2
            out[name] = np.array(
                [
                    structural_similarity(x, y, data_range=1.0, win_size=win)
                    for x, y in zip(sa, sb, strict=True)
                ]
            )
        elif name == "hog":
            ha = hog_features(a) if a_hog is None else a_hog
            out[name] = _pearson_rows(ha, hog_features(b))
        else:
            raise UnknownNameError("similarity measure", name, list(MEASURES))
    return out
