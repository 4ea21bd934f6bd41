"""Sampling methods: gradients averaged over noisy copies of the input (SmoothGrad-CAM++).

The noisy copies of every image run through the shared recorder (:func:`camanim.compute.capture.capture`) in
batches, and each batch's one backward pass gives the gradient at every chosen layer at once: ``samples``
forward and backward passes for all ``N`` layers (batched ``batch_size`` copies at a time), not one set per
layer as a per-layer reference loop needs.

Noise is seeded: sample ``s`` adds the ``s``-th draw of ``torch.normal(0, noise)`` from a generator seeded with
``seed``, the same draws for every image of a batch (so a batch gives the maps of its images explained one
by one).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from camanim.compute.capture import capture
from camanim.compute.layers import Layer
from camanim.compute.methods.base import register_method
from camanim.compute.methods.passes import MultiPassMethod, PassContext
from camanim.compute.targets import TARGET_KINDS
from camanim.errors import OptionError

logger = logging.getLogger(__name__)

MAX_GRADIENT_BATCH = 16
"""At most this many inputs per forward and backward pass: a backward keeps every layer's values of the
batch, and on the CPU larger batches gain little."""


def gaussian_noise(shape: tuple[int, ...], samples: int, std: float, seed: int) -> Tensor:
    """``samples`` seeded draws of ``N(0, std^2)`` noise of ``shape``, ``(samples, *shape)``.

    Draw ``s`` is the ``s``-th ``torch.normal`` call on a CPU generator seeded with ``seed``: with
    ``torch.manual_seed(seed)``, ``torch.distributions.Normal(0, std).sample(shape)`` called ``samples`` times
    gives the same tensors (torchcam's draws).
    """
    gen = torch.Generator().manual_seed(int(seed))
    mean, scale = torch.zeros(shape), torch.full(shape, float(std))
    return torch.stack([torch.normal(mean, scale, generator=gen) for _ in range(samples)])


def positive_int(options: Mapping[str, Any], key: str, default: int) -> int:
    """``options[key]`` as an integer of at least 1 (``default`` when absent)."""
    value = options.get(key, default)
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise OptionError(f"{key} must be a whole number, got {value!r}") from None
    if n < 1:
        raise OptionError(f"{key} must be at least 1, got {n}")
    return n


def non_negative(options: Mapping[str, Any], key: str, default: float) -> float:
    """``options[key]`` as a number of at least 0 (``default`` when absent)."""
    value = options.get(key, default)
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise OptionError(f"{key} must be a number, got {value!r}") from None
    if not v >= 0:
        raise OptionError(f"{key} must be at least 0, got {v}")
    return v


def noisy_gradients(
    ctx: PassContext, samples: int, std: float, *, keep_last: bool = False
) -> tuple[dict[str, list[Tensor]], dict[str, tuple[Tensor, Tensor]]]:
    """Sums of ``G``, ``G^2`` and ``G^3`` over ``samples`` noisy copies of each image, at every chosen layer.

    Returns:
        ``sums[layer] = [sum G, sum G^2, sum G^3]``, each ``(B, C, h, w)``; and with ``keep_last`` the
        values and gradient of the last noisy copy of each image, ``last[layer] = (A, G)``.
    """
    x = ctx.x
    b = x.shape[0]
    noise = gaussian_noise(tuple(x.shape[1:]), samples, std, ctx.seed).to(device=x.device, dtype=x.dtype)
    items = [(s, i) for s in range(samples) for i in range(b)]  # input k is image i plus draw s
    names = {layer.name for layer in ctx.layers}
    sums: dict[str, list[Tensor]] = {}
    last: dict[str, tuple[Tensor, Tensor]] = {}
    kind = TARGET_KINDS[ctx.score]
    step = max(1, min(ctx.batch_size, MAX_GRADIENT_BATCH))
    for start in range(0, len(items), step):
        chunk = items[start : start + step]
        s_idx = torch.tensor([s for s, _ in chunk], device=x.device)
        i_idx = torch.tensor([i for _, i in chunk], device=x.device)
        inp = x[i_idx] + noise[s_idx]
        is_last = (s_idx == samples - 1).nonzero()[:, 0]

        def consumer(
            layer: Layer,
            value: Tensor,
            grad: Tensor | None,
            _k: int,
            i_idx: Tensor = i_idx,
            last_rows=is_last,
        ) -> None:
            if grad is None:
                return
            g = grad.detach().float()
            acc = sums.get(layer.name)
            if acc is None:
                shape = (b, *g.shape[1:])
                acc = sums[layer.name] = [g.new_zeros(shape) for _ in range(3)]
            acc[0].index_add_(0, i_idx, g)
            acc[1].index_add_(0, i_idx, g.square())
            acc[2].index_add_(0, i_idx, g.pow(3))
            if keep_last and len(last_rows):
                a_last, g_last = last.get(layer.name, (None, None))
                if a_last is None:
                    a_last = value.new_zeros((b, *value.shape[1:]))
                    g_last = g.new_zeros((b, *g.shape[1:]))
                a_last[i_idx[last_rows]] = value[last_rows].detach()
                g_last[i_idx[last_rows]] = g[last_rows]
                last[layer.name] = (a_last, g_last)

        target = kind(tuple(ctx.classes[i] for _, i in chunk))
        capture(ctx.model, inp, target, lambda layer: layer.name in names, consumer=consumer)
    return sums, last


@register_method("smoothgradcam++", "smoothgradcampp", "smoothgradcamplusplus")
class SmoothGradCAMPlusPlus(MultiPassMethod):
    """Smooth Grad-CAM++ (Omeiza et al., 2019): Grad-CAM++ with its derivatives averaged over noisy inputs.

    With ``D_p = mean_s G_s^p`` over ``samples`` noisy copies ``x + N(0, noise^2)`` (4 copies of standard
    deviation 0.3 by default, as torchcam):
    ``alpha = D_2 / (2 D_2 + sum_ij A D_3 + 1e-8)``, ``w_c = sum_ij alpha ReLU(D_1)`` and the map
    ``sum_c w_c A_c``, ``A`` the clean input's values from the shared capture. That is torchcam's
    ``SmoothGradCAMpp`` (its ``alpha`` numerator is ``D_2``, as here), except that torchcam takes the ReLU
    of the last noisy copy's gradient and weights the last noisy copy's values, where this takes the mean
    gradient and the clean values: the expectation the paper means, and the same map for the same input
    whatever the last draw was. ``variant="torchcam"`` reproduces torchcam exactly (the parity tests use it).

    Options: ``samples``, ``noise`` (standard deviation, in the model's input units), ``variant``
    (``"mean"`` or ``"torchcam"``). Seeded by ``seed`` (see the module docstring).
    """

    paper = "Omeiza et al., Smooth Grad-CAM++, arXiv:1908.01224, 2019"
    needs_values = True
    passes = "samples x (1 forward + 1 backward) per image for all N layers (batched), default 4"
    default_samples = 4
    default_noise = 0.3

    def plan(self, layers: int, batch: int, options: Mapping[str, Any]) -> tuple[int, int]:
        n = positive_int(options, "samples", self.default_samples) * batch
        return n, n

    def compute_layers(self, ctx: PassContext) -> dict[str, Tensor]:
        samples = positive_int(ctx.options, "samples", self.default_samples)
        std = non_negative(ctx.options, "noise", self.default_noise)
        variant = str(ctx.options.get("variant", "mean"))
        if variant not in ("mean", "torchcam"):
            raise OptionError(f"variant must be 'mean' or 'torchcam', got {variant!r}")
        sums, last = noisy_gradients(ctx, samples, std, keep_last=variant == "torchcam")
        out: dict[str, Tensor] = {}
        for layer in ctx.layers:
            clean = ctx.values[layer.name]
            if layer.name not in sums:  # no gradient reaches the layer
                out[layer.name] = clean.new_zeros(clean.shape[0], *clean.shape[2:])
                continue
            a = clean.float()
            d1, d2, d3 = (t / samples for t in sums[layer.name])
            alpha = d2 / (2 * d2 + (d3 * a).sum(dim=(2, 3), keepdim=True) + 1e-8)
            if variant == "torchcam":
                a, d1 = last[layer.name][0].float(), last[layer.name][1]
            weights = (alpha * d1.clamp_min(0)).sum(dim=(2, 3))
            out[layer.name] = torch.einsum("bc,bchw->bhw", weights, a)
        return out
