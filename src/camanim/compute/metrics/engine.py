"""The machinery every perturbation metric shares: orderings, masks, perturbed images, batched forwards.

A perturbation metric (ROAD, deletion and insertion, the confidence metrics) scores a saliency map by the
target's score on images perturbed according to the map: for a class index, the model's softmax probability
of that class; for a target callable (:mod:`camanim.compute.tasks`: a segmentation region, a detection box,
an embedding similarity, multi-label or regression outputs, or the user's own), the callable's value on the
model's output (see :func:`readout`). Scoring many maps of one
image (every layer of every method) repeats perturbations: layers whose maps rank pixels alike give the same
masks, every deletion curve ends on the same all-baseline image. :func:`score_units` therefore takes each
map's perturbations as :class:`Perturbation` requests keyed by what the perturbed image *is* (kind + digest of
the mask or map), makes each distinct image once and forwards it once, in batches, the making of the next
batch (imputation, blending) overlapped with the forward of the previous one in a background thread.

Kinds of perturbed image (built by :class:`PerturbationContext`):

* ``"impute"``: the mask's pixels removed and imputed by the imputer (ROAD's noisy linear imputation), with
  noise seeded by ``(seed, digest of the mask)``: the same mask gives the same image whatever the batching,
  order, layer or metric asking for it (ROAD's MoRF masks and a deletion curve with the ROAD baseline share
  images).
* ``"replace"``: the mask's pixels replaced by a fixed baseline image (``"zero"``: the model input's zero,
  i.e. the normalisation mean colour; ``"blur"``: RISE's blurred copy of the input).
* ``"multiply"``: the input multiplied by a map in [0, 1] (the explanation map ``E * x`` of Grad-CAM++'s
  Average Drop; torchcam and grad-cam do it on the model input).

Example:
    >>> import torch
    >>> from camanim.compute.metrics.engine import removal_order
    >>> removal_order(torch.tensor([[0.1, 0.9], [0.5, 0.2]])).tolist()  # least to most relevant
    [0, 3, 2, 1]
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from camanim.compute.capture import frozen_eval
from camanim.compute.metrics.imputers import IMPUTERS, NoisyLinearImputer, get_imputer
from camanim.compute.metrics.imputers3d import NoisyLinearImputer3D
from camanim.errors import CamanimError, UnknownNameError

__all__ = [
    "OPTIMIZE_ATOL",
    "MetricError",
    "Perturbation",
    "PerturbationContext",
    "Target",
    "as_target",
    "readout",
    "removal_order",
    "resolve_imputer",
    "rise_kernel",
    "rise_kernel_3d",
    "score_units",
    "spatial_size",
]

log = logging.getLogger(__name__)

MapsLike = Tensor | np.ndarray | Mapping[Any, Tensor | np.ndarray] | Sequence[Tensor | np.ndarray]
ProgressCallback = Callable[[int, int], None]
#: What a metric scores: a class index (its softmax probability), or a callable from the model's output to
#: one score per image ``(N,)`` (a task target of :mod:`camanim.compute.tasks`, or the user's own).
Target = int | Callable[[Any], Tensor]

#: Largest change of a softmax probability accepted from the optimised copy (checked on the clean image);
#: for a target callable, the largest change relative to ``max(1, |score|)``.
OPTIMIZE_ATOL = 1e-4


class MetricError(CamanimError, ValueError):
    """Inputs of the wrong shape or values out of range for a perturbation metric (ROAD's ``RoadError``)."""


# --------------------------------------------------------------------------------------------------------
# Orderings and masks.
# --------------------------------------------------------------------------------------------------------


def _tie_keys(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng([int(seed), n, 0x70AD]).random(n)


def removal_order(saliency: Tensor | np.ndarray, seed: int = 0) -> np.ndarray:
    """Pixel indices (row-major) from least to most relevant, ties broken by a seeded random key.

    Args:
        saliency: ``(H, W)`` map at input resolution.
        seed: seed of the tie-break keys (the same keys for every map of that size).

    Returns:
        ``(H * W,)`` int64 permutation.
    """
    m = saliency.detach().cpu().numpy() if isinstance(saliency, Tensor) else np.asarray(saliency)
    flat = np.nan_to_num(m.astype(np.float64, copy=False).ravel(), nan=0.0)
    return np.lexsort((_tie_keys(flat.size, seed), flat))


def _counts(n: int, percentages: Sequence[float]) -> list[int]:
    return [int(round(p / 100.0 * n)) for p in percentages]


def _mask_digest(mask: np.ndarray) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(str(mask.shape).encode())
    h.update(np.packbits(mask).tobytes())
    return h.digest()


def _array_digest(a: np.ndarray) -> bytes:
    a = np.ascontiguousarray(a)
    h = hashlib.blake2b(digest_size=16)
    h.update(str((a.dtype, a.shape)).encode())
    h.update(a.tobytes())
    return h.digest()


def _noise_generator(seed: int, digest: bytes) -> torch.Generator:
    h = hashlib.blake2b(f"road-noise/{int(seed)}/".encode() + digest, digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(h, "little") & (2**63 - 1))


# --------------------------------------------------------------------------------------------------------
# The model's forwards.
# --------------------------------------------------------------------------------------------------------


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    if p is None:
        p = next(model.buffers(), None)
    return p.device if p is not None else torch.device("cpu")


def _forward_copy(
    model: nn.Module, optimize: bool | None, example: Tensor, target: Target | None = None
) -> tuple[nn.Module, bool]:
    """The module to run the perturbed forwards with, and whether inputs go channels-last.

    On the CPU a private inference copy is faster than the model as given: channels-last memory lets
    oneDNN's convolutions run about 1.5x faster, and folding each BatchNorm into the convolution before it
    (``torch.fx``, where the model traces) saves about 1.25x more on ResNet-50. The user's model is never
    changed. The copy must give the model's softmax on ``example`` (1, C, H, W) within
    :data:`OPTIMIZE_ATOL` (for a target callable: the target's score within :data:`OPTIMIZE_ATOL` times
    ``max(1, |score|)``); otherwise, or when it cannot be built, the model runs as it is.

    Args:
        model: the user's model.
        optimize: ``None`` = auto (CPU models with a ``Conv2d``, unless the target reads a raw output such
            as a detector's list of dicts, whose thresholded detections a rounding change can flip), or
            force on/off. A volume model (``example`` 5-D) runs as it is unless forced (channels_last_3d).
        example: one input ``(1, C, H, W)`` or ``(1, C, D, H, W)``, for the check.
        target: what is scored (``None`` or a class index: the softmax; a callable: its score).
    """
    scored = None if target is None or isinstance(target, int) else target
    if optimize is None:
        optimize = (
            example.dim() == 4
            and _device(model).type == "cpu"
            and any(isinstance(m, nn.Conv2d) for m in model.modules())
            and getattr(scored, "expect", None) != "any"
        )
    if not optimize:
        return model, False
    import copy

    try:
        twin = copy.deepcopy(model).eval()
        for p in twin.parameters():
            p.requires_grad_(False)
    except Exception as exc:  # any model-specific failure: run the model as it is
        log.debug("no private copy of the model (%s): running it as it is", exc)
        return model, False
    try:
        from torch.fx.experimental.optimization import fuse

        twin = fuse(twin, inplace=True)
    except Exception as exc:  # not traceable by torch.fx: keep the unfused copy
        log.debug("no Conv-BN folding (%s)", exc)
    device = _device(model)
    try:
        twin = twin.to(memory_format=_channels_last_format(example))
        with frozen_eval(model), torch.inference_mode():
            if scored is None:
                ref = model(example.to(device)).double().softmax(dim=1)
                got = twin(_channels_last(example.to(device))).double().softmax(dim=1)
                scale = 1.0
            else:
                ref = readout(scored, model(example.to(device)), 1)
                got = readout(scored, twin(_channels_last(example.to(device))), 1)
                scale = max(1.0, float(ref.abs().max()))
    except RuntimeError as exc:  # e.g. parameters of another rank than the memory format's
        log.debug("no channels-last copy of the model (%s): running it as it is", exc)
        return model, False
    err = float((ref - got).abs().max()) / scale if ref.shape == got.shape else float("inf")
    if not err <= OPTIMIZE_ATOL:
        log.info(
            "the optimised copy of the model differs by %.2g on the image: running the model as it is", err
        )
        return model, False
    return twin, True


def _channels_last_format(x: Tensor) -> torch.memory_format:
    """``channels_last`` for images ``(N, C, H, W)``, ``channels_last_3d`` for volumes ``(N, C, D, H, W)``."""
    return torch.channels_last_3d if x.dim() == 5 else torch.channels_last


def _channels_last(x: Tensor) -> Tensor:
    return x.contiguous(memory_format=_channels_last_format(x))


def as_target(target: Any) -> Target:
    """A class index as an ``int``; a target callable as it is.

    Raises:
        MetricError: neither.
    """
    if callable(target) and not isinstance(target, (int, np.integer, Tensor)):
        return target
    try:
        return int(target)
    except (TypeError, ValueError):
        raise MetricError(
            f"a target is a class index or a callable scoring the model's output, got {target!r}"
        ) from None


def readout(target: Callable[[Any], Tensor], output: Any, n: int) -> Tensor:
    """A target callable's score of a model output for ``n`` images: ``(n,)`` float64 on the CPU.

    The callable sees the output as the model gives it (for a :class:`~camanim.compute.models.LoadedModel`,
    after its output selector): the same thing it saw when the maps were computed.

    Raises:
        MetricError: the callable returned something else than one number per image.
    """
    s = target(output)
    if not isinstance(s, Tensor) or s.reshape(-1).shape[0] != n:
        got = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
        raise MetricError(f"the target must give one score per image ({n},), got {got}")
    return s.detach().reshape(-1).double().cpu()


def _per_image(target: Target) -> Target:
    """The target for batches of perturbed copies of one image: a task target as decided on the original
    (its region, its chosen detections: :meth:`camanim.compute.tasks.TaskTarget.fixed`); others as given."""
    fixed = getattr(target, "fixed", None)
    return fixed(0) if callable(fixed) else target


def _probabilities(
    model: nn.Module, x: Tensor, target: Target, batch_size: int, channels_last: bool = False
) -> Tensor:
    """The target's score for every image of ``x`` ``(N, C, H, W)`` (or volume ``(N, C, D, H, W)``): the softmax probability of a class
    index, or a target callable's value (:func:`readout`); ``(N,)`` float64 CPU."""
    out = []
    for i in range(0, x.shape[0], batch_size):
        xb = x[i : i + batch_size]
        if channels_last:
            xb = _channels_last(xb)
        logits = model(xb)
        if not isinstance(target, int):
            out.append(readout(target, logits, xb.shape[0]))
            continue
        if not isinstance(logits, Tensor) or logits.ndim != 2:
            raise MetricError(
                f"the model must return (B, K) logits, got {getattr(logits, 'shape', type(logits))}"
            )
        if not 0 <= target < logits.shape[1]:
            raise MetricError(f"target class {target} is out of range for {logits.shape[1]} outputs")
        out.append(logits.double().softmax(dim=1)[:, target].cpu())
    return torch.cat(out)


# --------------------------------------------------------------------------------------------------------
# Inputs.
# --------------------------------------------------------------------------------------------------------


def _as_image(x: Tensor) -> Tensor:
    """One image ``(C, H, W)`` from ``(C, H, W)`` or ``(1, C, H, W)``, or one volume ``(C, D, H, W)`` from
    ``(1, C, D, H, W)``: a volume comes with its batch axis, since ``(1, D, H, W)`` reads as an image of
    ``D`` channels. Float32, detached."""
    if not isinstance(x, Tensor):
        raise MetricError(f"the image must be a tensor, got {type(x).__name__}")
    if x.ndim == 5 and x.shape[0] == 1:
        return x[0].detach().float()
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 3:
        raise MetricError(
            "a metric scores one image (C, H, W) or (1, C, H, W), or one volume (1, C, D, H, W), got "
            f"{tuple(x.shape)}"
        )
    return x.detach().float()


def spatial_size(x: Tensor) -> int:
    """Pixels (or voxels) of one input ``(C, H, W)`` or ``(C, D, H, W)``: ``H W`` or ``D H W``."""
    return int(np.prod(x.shape[1:]))


def _as_maps(maps: MapsLike, hw: tuple[int, ...]) -> tuple[tuple[Any, ...], list[Tensor]]:
    """Keys and float maps of the input's spatial shape ``hw`` (``(H, W)``, or ``(D, H, W)`` for a volume)
    from a stack, a sequence or a mapping."""
    k = len(hw)
    name = "(H, W)" if k == 2 else "(D, H, W)"

    def one(m: Tensor | np.ndarray) -> Tensor:
        t = m if isinstance(m, Tensor) else torch.from_numpy(np.asarray(m))
        t = t.detach()
        while t.ndim > k and t.shape[0] == 1:
            t = t[0]
        if tuple(t.shape) != hw:
            raise MetricError(
                f"a map must be {name} = {hw} (upsampled to the input size), got {tuple(m.shape)}"
            )
        return t.float().cpu()

    if isinstance(maps, Mapping):
        keys = tuple(maps)
        return keys, [one(maps[k]) for k in keys]
    if isinstance(maps, (Tensor, np.ndarray)):
        if maps.ndim == k:
            return (0,), [one(maps)]
        if maps.ndim != k + 1:
            raise MetricError(f"maps must be {name} or (L, {name[1:]}, got {tuple(maps.shape)}")
        return tuple(range(maps.shape[0])), [one(m) for m in maps]
    items = list(maps)
    return tuple(range(len(items))), [one(m) for m in items]


def resolve_imputer(imputer: Any, spatial_dims: int = 2) -> Any:
    """The imputer of ``impute`` perturbations for inputs of ``spatial_dims`` spatial axes.

    Images (2): ``None`` is ``NoisyLinearImputer()``, a name one of :data:`~.imputers.IMPUTERS`, an object
    itself. Volumes (3): ``None``, ``"noisy_linear"`` and a 2-D ``NoisyLinearImputer`` become
    :class:`~.imputers3d.NoisyLinearImputer3D` with the same noise (the same rule with the 26-neighbour
    stencil); any other 2-D imputer is refused; an object that is not one of the 2-D imputers is used as it
    is (it must take ``(B, C, D, H, W)`` volumes and ``(B, D, H, W)`` masks).

    Raises:
        UnknownNameError: an unknown name.
        MetricError: a 2-D-only imputer for a volume.
    """
    if spatial_dims != 3:
        if imputer is None:
            return NoisyLinearImputer()
        return get_imputer(imputer) if isinstance(imputer, str) else imputer
    if imputer is None or imputer == "noisy_linear":
        return NoisyLinearImputer3D()
    if isinstance(imputer, str):
        if imputer not in IMPUTERS:
            raise UnknownNameError("imputer", imputer, IMPUTERS)
        raise MetricError(
            f"the imputer {imputer!r} imputes 2-D images only; volumes are imputed by 'noisy_linear' "
            "(the 26-neighbour 3-D stencil of NoisyLinearImputer3D)"
        )
    if isinstance(imputer, NoisyLinearImputer):
        return NoisyLinearImputer3D(noise=imputer.noise)
    if type(imputer) in IMPUTERS.values():
        raise MetricError(
            f"{imputer!r} imputes 2-D images only; volumes are imputed by NoisyLinearImputer3D "
            "(imputer='noisy_linear' or None)"
        )
    return imputer


# --------------------------------------------------------------------------------------------------------
# Perturbed images.
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Perturbation:
    """One perturbed image asked for by a metric.

    Attributes:
        key: what the image is (kind + digest): equal keys are made and forwarded once.
        kind: ``"impute"``, ``"replace"`` or ``"multiply"`` (see the module docstring).
        payload: what the kind needs: ``(mask digest, (H * W,) bool mask)`` for ``impute``;
            ``(baseline name, (H * W,) bool mask)`` for ``replace``; the ``(H, W)`` map for ``multiply``
            (for a volume: ``(D * H * W,)`` masks and a ``(D, H, W)`` map).
    """

    key: bytes
    kind: str
    payload: Any


def impute(mask: np.ndarray) -> Perturbation:
    """The image with the ``True`` pixels of ``mask`` ``(H * W,)`` imputed."""
    d = _mask_digest(mask)
    return Perturbation(b"impute/" + d, "impute", (d, mask))


def replace(mask: np.ndarray, baseline: str) -> Perturbation:
    """The image with the ``True`` pixels of ``mask`` ``(H * W,)`` taken from the baseline ``baseline``."""
    return Perturbation(f"replace/{baseline}/".encode() + _mask_digest(mask), "replace", (baseline, mask))


def multiply(weights: Tensor) -> Perturbation:
    """The image times ``weights`` ``(H, W)`` (one weight per pixel, all channels)."""
    return Perturbation(b"multiply/" + _array_digest(weights.numpy()), "multiply", weights)


def _rise_1d(size: int, nsig: float) -> np.ndarray:
    from scipy.stats import norm

    return np.diff(norm.cdf(np.linspace(-nsig, nsig, size + 1)))


def rise_kernel(size: int = 11, nsig: float = 5.0) -> np.ndarray:
    """The blur kernel of RISE's evaluation code (Petsiuk et al. 2018, ``gkern(11, 5)``): a normalised 2D
    Gaussian sampled by differences of the normal CDF over ``linspace(-nsig, nsig, size + 1)`` (sigma =
    size / (2 nsig) pixels = 1.1 px by default). ``(size, size)`` float64."""
    k1 = _rise_1d(size, nsig)
    k2 = np.outer(k1, k1)
    return k2 / k2.sum()


def rise_kernel_3d(size: int = 11, nsig: float = 5.0) -> np.ndarray:
    """:func:`rise_kernel` in three dimensions, for volumes: the outer product of the same 1-D weights along
    depth, height and width, normalised (sigma 1.1 voxels by default). ``(size, size, size)`` float64."""
    k1 = _rise_1d(size, nsig)
    k3 = np.einsum("i,j,k->ijk", k1, k1, k1)
    return k3 / k3.sum()


def blur(x: Tensor) -> Tensor:
    """RISE's insertion substrate: ``x`` ``(C, H, W)`` convolved per channel with :func:`rise_kernel`,
    zero padding, in the space of ``x`` (RISE blurs the normalised model input). A volume ``(C, D, H, W)``
    is convolved with :func:`rise_kernel_3d`."""
    volume = x.dim() == 4
    k = torch.from_numpy(rise_kernel_3d() if volume else rise_kernel()).to(dtype=x.dtype, device=x.device)
    c = x.shape[0]
    w = k.expand(c, 1, *k.shape).contiguous()
    conv = nn.functional.conv3d if volume else nn.functional.conv2d
    return conv(x[None], w, padding=k.shape[-1] // 2, groups=c)[0]


#: Baselines of ``replace``, computed from the model input ``(C, H, W)``.
BASELINES: dict[str, Callable[[Tensor], Tensor]] = {"zero": torch.zeros_like, "blur": blur}


class PerturbationContext:
    """Everything needed to make one image's perturbed images: the image, the imputer, the baselines.

    Args:
        x: the model input ``(C, H, W)``, or a volume ``(C, D, H, W)``, on the model's device.
        imputer: the imputer of ``impute`` (with ``impute_clean`` and ``noise``, or ``impute_one``).
        preprocessing: impute in [0, 1] pixel space through it (``denormalize`` -> impute -> ``normalize``);
            ``None`` imputes in the space of ``x``.
        seed: seed of the imputation noise (with the mask's digest).
    """

    def __init__(self, x: Tensor, imputer: Any = None, preprocessing: Any = None, seed: int = 0) -> None:
        self.x = x
        self.imputer = imputer
        self.preprocessing = preprocessing
        self.seed = int(seed)
        self.pixels = preprocessing.denormalize(x) if preprocessing is not None else x
        self.use_clean = hasattr(imputer, "impute_clean") and hasattr(imputer, "noise")
        self.sigma = float(getattr(imputer, "noise", 0.0))
        self._baselines: dict[str, Tensor] = {}
        self.seconds = 0.0

    def baseline(self, name: str) -> Tensor:
        """The baseline image ``name`` of :data:`BASELINES`, computed once."""
        if name not in self._baselines:
            if name not in BASELINES:
                raise MetricError(f"unknown baseline {name!r}; expected one of {', '.join(BASELINES)}")
            self._baselines[name] = BASELINES[name](self.x)
        return self._baselines[name]

    def build(self, items: Sequence[Perturbation]) -> Tensor:
        """The perturbed images of ``items`` ``(n, C, H, W)`` (volumes ``(n, C, D, H, W)``), model space, on the model's device, in order."""
        t0 = time.perf_counter()
        out: list[Tensor | None] = [None] * len(items)
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(items):
            groups.setdefault(p.kind, []).append(i)
        with torch.no_grad():
            for kind, idx in groups.items():
                made = getattr(self, f"_{kind}")([items[i].payload for i in idx])
                for i, img in zip(idx, made, strict=True):
                    out[i] = img
        self.seconds += time.perf_counter() - t0
        return torch.stack(out) if len(out) > 1 else out[0][None]  # type: ignore[index]

    def _masks(self, flat: Sequence[np.ndarray]) -> Tensor:
        return torch.from_numpy(np.stack(flat).reshape(-1, *self.x.shape[1:])).to(self.x.device)

    def _impute(self, payloads: Sequence[tuple[bytes, np.ndarray]]) -> Tensor:
        shape = tuple(self.x.shape)
        digests = [d for d, _ in payloads]
        masks = self._masks([m for _, m in payloads])
        if self.use_clean:
            imputed = self.imputer.impute_clean(self.pixels.expand(len(digests), *shape), masks)
            if self.sigma > 0:
                noise = torch.stack(
                    [torch.randn(shape, generator=_noise_generator(self.seed, d)) for d in digests]
                ).to(device=self.x.device, dtype=imputed.dtype)
                imputed = imputed + self.sigma * noise * masks.unsqueeze(1)
        else:
            imputed = torch.stack(
                [
                    self.imputer.impute_one(self.pixels, masks[i], generator=_noise_generator(self.seed, d))
                    for i, d in enumerate(digests)
                ]
            )
        out = self.preprocessing.normalize(imputed) if self.preprocessing is not None else imputed
        return out.to(self.x.device, self.x.dtype)

    def _replace(self, payloads: Sequence[tuple[str, np.ndarray]]) -> Tensor:
        masks = self._masks([m for _, m in payloads]).unsqueeze(1)
        base = torch.stack([self.baseline(name) for name, _ in payloads])
        return torch.where(masks, base, self.x.expand_as(base))

    def _multiply(self, payloads: Sequence[Tensor]) -> Tensor:
        weights = torch.stack(list(payloads)).to(self.x.device, self.x.dtype)
        return self.x[None] * weights[:, None]


# --------------------------------------------------------------------------------------------------------
# The shared loop.
# --------------------------------------------------------------------------------------------------------

Unit = Sequence[Perturbation | None]


def score_units(
    model: nn.Module,
    ctx: PerturbationContext,
    units: Iterable[Unit],
    target: Target,
    *,
    n_units: int,
    batch_size: int,
    clean_probability: float | None = None,
    on_units: Callable[[list[int], list[np.ndarray]], None] | None = None,
    progress: ProgressCallback | None = None,
    channels_last: bool = False,
    overlap: bool = True,
) -> tuple[list[np.ndarray], float, dict[str, float]]:
    """The target's score on every perturbed image of every unit (one unit per scored map).

    Units are read one at a time (so their masks are made while earlier batches are forwarded); their
    perturbations are deduplicated by key; when ``batch_size`` distinct images are pending they are made
    (in a background thread when ``overlap``) and forwarded in batches of ``batch_size``. A ``None``
    perturbation stands for the original image (its probability is the clean one). ``on_units(positions,
    probabilities)`` is called as soon as units are complete.

    Args:
        model: the module to forward (eval mode and inference mode are set here, flags restored).
        ctx: makes the perturbed images.
        units: per unit, its perturbations.
        target: the class whose softmax probability is scored, or a target callable (:data:`Target`). The
            clean forward comes first, so a task target that decides what it scores at its first forward (a
            segmentation region of the predicted pixels, the detections to match) decides on the original
            image; the perturbed images are then scored as copies of it (``target.fixed(0)``). Give
            ``clean_probability`` only with such a target already decided.
        n_units: number of units (for ``progress``).
        batch_size: perturbed images per forward.
        clean_probability: the target's score on the original when known.
        on_units: called with finished units' positions and their ``(n_i,)`` float64 scores.
        progress: called with ``(units done, n_units)``.
        channels_last: feed the model channels-last inputs.
        overlap: make the next batch while the previous one is forwarded.

    Returns:
        ``(per unit (n_i,) scores, clean score, stats)``; stats count ``masks`` (perturbations
        asked), ``unique_masks``, ``forwards`` and seconds ``t_order`` (reading units), ``t_impute`` (making
        images), ``t_forward``, ``t_clean`` and ``t_total``.
    """
    if batch_size < 1:
        raise MetricError(f"batch_size must be at least 1, got {batch_size}")
    t_start = time.perf_counter()
    device = _device(model)
    stats = dict.fromkeys(
        ("masks", "unique_masks", "forwards", "t_order", "t_impute", "t_forward", "t_clean"), 0.0
    )
    ctx.seconds = 0.0
    results: list[np.ndarray | None] = []
    with frozen_eval(model), torch.inference_mode():
        t = time.perf_counter()
        if clean_probability is None:
            clean_probability = float(
                _probabilities(model, ctx.x[None].to(device), target, 1, channels_last)[0]
            )
        stats["t_clean"] = time.perf_counter() - t
        clean = float(clean_probability)
        per_image = _per_image(target)

        probs: dict[bytes, float] = {}
        pending: dict[bytes, Perturbation] = {}
        unit_keys: list[list[bytes | None]] = []
        queued: set[bytes] = set()
        waiting: set[int] = set()
        in_flight: list[tuple[list[bytes], Any]] = []
        pool = ThreadPoolExecutor(1, thread_name_prefix="camanim-perturb") if overlap else None
        n_done = 0

        def forward_one() -> None:
            keys, job = in_flight.pop(0)
            perturbed = job.result() if pool is not None else job
            t1 = time.perf_counter()
            p = _probabilities(model, perturbed, per_image, batch_size, channels_last)
            stats["t_forward"] += time.perf_counter() - t1
            stats["forwards"] += len(keys)
            for k, v in zip(keys, p.tolist(), strict=True):
                probs[k] = v

        def flush(final: bool = False) -> None:
            if pending:
                keys = list(pending)
                items = [pending[k] for k in keys]
                pending.clear()
                if pool is not None:  # make this batch while the previous one is forwarded
                    in_flight.append((keys, pool.submit(ctx.build, items)))
                else:
                    in_flight.append((keys, ctx.build(items)))
            while len(in_flight) > (0 if final or pool is None else 1):
                forward_one()

        def emit() -> None:
            nonlocal n_done
            ready = sorted(i for i in waiting if all(k is None or k in probs for k in unit_keys[i]))
            if not ready:
                return
            vals = []
            for i in ready:
                waiting.discard(i)
                v = np.array([clean if k is None else probs[k] for k in unit_keys[i]], dtype=np.float64)
                results[i] = v
                vals.append(v)
            n_done += len(ready)
            if on_units is not None:
                on_units(ready, vals)
            if progress is not None:
                progress(n_done, n_units)

        try:
            it = iter(units)
            while True:
                t = time.perf_counter()
                try:
                    unit = next(it)
                except StopIteration:
                    stats["t_order"] += time.perf_counter() - t
                    break
                keys: list[bytes | None] = []
                for p in unit:
                    if p is None:
                        keys.append(None)
                        continue
                    stats["masks"] += 1
                    if p.key not in queued:
                        pending[p.key] = p
                        queued.add(p.key)
                        stats["unique_masks"] += 1
                    keys.append(p.key)
                unit_keys.append(keys)
                results.append(None)
                waiting.add(len(unit_keys) - 1)
                stats["t_order"] += time.perf_counter() - t
                if len(pending) >= batch_size:
                    flush()
                    emit()
            flush(final=True)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        emit()
    stats["t_impute"] = ctx.seconds
    stats["t_total"] = time.perf_counter() - t_start
    return [r if r is not None else np.zeros(0) for r in results], clean, stats


# --------------------------------------------------------------------------------------------------------
# Stateful metrics (torchmetrics style): batches split into images.
# --------------------------------------------------------------------------------------------------------


def split_batch(
    images: Tensor, maps: MapsLike, targets: int | Sequence[int] | Tensor
) -> list[tuple[Tensor, MapsLike, int]]:
    """``(image, its maps, its target)`` per image of a batch given to a stateful metric's ``update``: the
    image ``(C, H, W)``, a volume ``(1, C, D, H, W)`` (as :func:`_as_image` reads it).

    Args:
        images: ``(B, C, H, W)`` or one ``(C, H, W)`` image; or volumes ``(B, C, D, H, W)``.
        maps: ``(B, H, W)`` one map per image; ``(B, L, H, W)`` L maps per image; or a mapping from a key to
            ``(B, H, W)`` (volumes: ``(B, D, H, W)``, ``(B, L, D, H, W)``). For a single ``(C, H, W)`` image,
            anything the pure functions take.
        targets: one class for all images, or one per image.

    Raises:
        MetricError: shapes that do not fit.
    """
    if images.ndim == 3:
        per_image: list[MapsLike] = [maps]
        images = images[None]
    else:
        b = images.shape[0]
        if isinstance(maps, Mapping):
            per_image = [{k: v[i] for k, v in maps.items()} for i in range(b)]
        else:
            t = maps if isinstance(maps, Tensor) else torch.as_tensor(np.asarray(maps))
            k = images.ndim - 2
            if t.ndim not in (k + 1, k + 2) or t.shape[0] != b:
                sp = "H, W" if k == 2 else "D, H, W"
                raise MetricError(
                    f"maps must be (B, {sp}) or (B, L, {sp}) for B = {b} images, got {tuple(t.shape)}"
                )
            per_image = [t[i] for i in range(b)]
    if isinstance(targets, Tensor):
        targets = targets.tolist()
    tlist = [int(targets)] * images.shape[0] if isinstance(targets, int) else [int(t) for t in targets]
    if len(tlist) != images.shape[0]:
        raise MetricError(f"{len(tlist)} targets for {images.shape[0]} images")
    per_input = list(images) if images.ndim == 4 else [v[None] for v in images]  # volumes keep (1, ...)
    return list(zip(per_input, per_image, tlist, strict=True))
