"""Score-CAM variants with samples: SS-CAM (noisy masks) and IS-CAM (integrated masks).

Like Score-CAM, each channel's upsampled activation masks the input and the masked input's class score weighs
the channel, but every channel is scored ``samples`` times: ``samples x C`` forwards per layer and image.
All of them, for every chosen layer, image and sample, go through one stream of batched forwards (a batch
may mix layers and samples), on the working copy of the network Score-CAM uses
(:func:`~.perturbation.working_model`: ``channels_last``, batch norms folded). ``max_channels`` scores only
the channels of largest mean ``|A|`` (an approximation, as for Score-CAM; the others get weight 0).

Both follow torchcam 0.5 (``SSCAM``, ``ISCAM``): each channel is min-max scaled at the layer's resolution
(``(A - min) / (max - min + 1e-8)``), then upsampled bilinearly (``align_corners=False``) to the input size;
the weights are the softmax over channels of the mean score (torchcam subtracts the clean input's score,
which the softmax ignores, so its forward is skipped here); the map is ``sum_c w_c A_c``.

SS-CAM's noise is seeded per layer: layer ``l``'s draws come from a generator seeded with a hash of ``seed``
and the layer's name (:func:`layer_seed`), so a layer gets the same noise whichever other layers are
explained; with ``torch.manual_seed(layer_seed(seed, name))`` torchcam draws the same noise.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from camanim.compute.methods.base import register_method
from camanim.compute.methods.passes import MultiPassMethod, PassContext
from camanim.compute.methods.perturbation import select_channels, working_model
from camanim.compute.methods.sampling import non_negative, positive_int
from camanim.compute.targets import TARGET_KINDS

logger = logging.getLogger(__name__)

NORM_EPS = 1e-8  # torchcam's _normalize


def layer_seed(seed: int, key: str) -> int:
    """A 63-bit seed from a method's ``seed`` and a layer's name (the same derivation as RandomCAM's)."""
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def upsampled_masks(acts: Tensor, size: tuple[int, int]) -> Tensor:
    """One sample's channels ``(C, h, w)`` min-max scaled per channel, then upsampled to ``size``: ``(C, H, W)``."""
    flat = acts.float().flatten(1)
    lo = flat.amin(dim=1, keepdim=True)
    shifted = flat - lo
    scaled = (shifted / (shifted.amax(dim=1, keepdim=True) + NORM_EPS)).reshape(acts.shape)
    return F.interpolate(scaled[None], size=size, mode="bilinear", align_corners=False)[0]


class ScoreStream:
    """Batched forwards of masked inputs, each scored for its image's class and added to one weight slot.

    ``add(inputs, slots, classes)`` queues ``n`` inputs ``(n, 3, H, W)``; every full batch of ``batch_size``
    runs at once (inputs from different layers and samples share batches) and ``scores[slot] += score``.
    """

    def __init__(
        self, net: Callable[[Tensor], Tensor], score: str, batch_size: int, slots: int, device: torch.device
    ) -> None:
        self.net, self.kind, self.batch_size = net, TARGET_KINDS[score], batch_size
        self.scores = torch.zeros(slots, dtype=torch.float64, device=device)
        self.pending: list[tuple[Tensor, Tensor, Tensor]] = []
        self.queued = 0
        self.forwards = 0

    def add(self, inputs: Tensor, slots: Tensor, classes: Tensor) -> None:
        self.pending.append((inputs, slots, classes))
        self.queued += inputs.shape[0]
        while self.queued >= self.batch_size:
            self._run(self.batch_size)

    def flush(self) -> Tensor:
        while self.queued:
            self._run(self.queued)
        return self.scores

    def _run(self, n: int) -> None:
        inputs, slots, classes, taken = [], [], [], 0
        while taken < n:
            inp, slot, cls = self.pending[0]
            k = min(n - taken, inp.shape[0])
            inputs.append(inp[:k])
            slots.append(slot[:k])
            classes.append(cls[:k])
            if k == inp.shape[0]:
                self.pending.pop(0)
            else:
                self.pending[0] = (inp[k:], slot[k:], cls[k:])
            taken += k
        self.queued -= n
        batch = torch.cat(inputs)
        cl = batch.dim() == 4 and inputs[0].is_contiguous(memory_format=torch.channels_last)
        if cl:
            batch = batch.contiguous(memory_format=torch.channels_last)
        out = self.net(batch)
        scores = self.kind(tuple(int(c) for c in torch.cat(classes)))(out).double()
        self.scores.index_add_(0, torch.cat(slots).to(self.scores.device), scores)
        self.forwards += n


class SampledScoreCAM(MultiPassMethod):
    """Base of SS-CAM and IS-CAM: per layer, image and sample, every (selected) channel's masked input is
    scored (see the module docstring); subclasses define the masked inputs of one sample."""

    needs_gradients = False
    needs_values = True
    resolution = "layer"
    default_samples = 10

    def masked_inputs(
        self, x: Tensor, masks: Tensor, sample: int, samples: int, noise: Tensor | None
    ) -> Tensor:
        """The inputs ``(n, 3, H, W)`` of one sample for ``masks`` ``(n, H, W)`` and one image ``x``."""
        raise NotImplementedError

    def noise_std(self, options: Mapping[str, Any]) -> float | None:
        """Standard deviation of the mask noise, or None for a method without noise."""
        return None

    def plan(self, layers: int, batch: int, options: Mapping[str, Any]) -> tuple[int, int]:
        # The channel counts are not known here; compute_layers logs the exact count before it runs.
        return 0, 0

    def compute_layers(self, ctx: PassContext) -> dict[str, Tensor]:
        samples = positive_int(ctx.options, "samples", self.default_samples)
        std = self.noise_std(ctx.options)
        max_channels = ctx.options.get("max_channels")
        max_channels = None if max_channels is None else positive_int(ctx.options, "max_channels", 1)
        x = ctx.x
        size = tuple(x.shape[-2:])
        layers = [layer for layer in ctx.layers if layer.name in ctx.values]
        picked = {
            layer.name: [select_channels(ctx.values[layer.name][b], max_channels) for b in range(x.shape[0])]
            for layer in layers
        }
        total = samples * sum(len(ch) for per in picked.values() for ch in per)
        offsets, slots = {}, 0
        for layer in layers:
            c = ctx.values[layer.name].shape[1]
            offsets[layer.name] = slots
            slots += x.shape[0] * c
        with working_model(ctx.model, x, None, fold_batchnorm=True) as (net, xw):
            t0 = time.perf_counter()
            n = min(ctx.batch_size, max(1, total))
            net(torch.cat([xw[:1]] * n))
            per_call = time.perf_counter() - t0
            logger.info(
                "%s: %d forwards (%d sample(s) x %d channel(s) over %d layer(s) x %d image(s)%s), batches of "
                "<= %d; estimated %.0f s",
                self.name,
                total,
                samples,
                sum(len(ch) for per in picked.values() for ch in per),
                len(layers),
                x.shape[0],
                f", <= {max_channels} per layer" if max_channels else "",
                ctx.batch_size,
                -(-total // ctx.batch_size) * per_call,
            )
            stream = ScoreStream(net, ctx.score, ctx.batch_size, slots, x.device)
            for layer, b, _s, inputs, chans in self._inputs(ctx, xw, layers, picked, samples, std, size):
                c = ctx.values[layer.name].shape[1]
                slot = offsets[layer.name] + b * c + chans
                cls = torch.full((len(chans),), ctx.classes[b], dtype=torch.long)
                stream.add(inputs, slot, cls)
            scores = stream.flush()
        out: dict[str, Tensor] = {}
        for layer in layers:
            a = ctx.values[layer.name]
            b_, c = a.shape[:2]
            s = scores[offsets[layer.name] : offsets[layer.name] + b_ * c].reshape(b_, c) / samples
            weights = torch.zeros(b_, c, dtype=torch.float32, device=a.device)
            for b in range(b_):
                ch = picked[layer.name][b].to(s.device)
                weights[b, ch.to(a.device)] = s[b, ch].softmax(dim=0).float().to(a.device)
            out[layer.name] = torch.einsum("bc,bchw->bhw", weights.to(a.dtype), a)
        return out

    def _inputs(
        self,
        ctx: PassContext,
        xw: Tensor,
        layers: list,
        picked: Mapping[str, list[Tensor]],
        samples: int,
        std: float | None,
        size: tuple[int, int],
    ) -> Iterator[tuple[Any, int, int, Tensor, Tensor]]:
        """``(layer, image, sample, inputs (n, 3, H, W), channel indices (n,))``, in chunks of channels."""
        chunk = max(1, ctx.batch_size)
        for layer in layers:
            a = ctx.values[layer.name]
            for b in range(a.shape[0]):
                chans = picked[layer.name][b].to(a.device)
                masks = upsampled_masks(a[b, chans], size).to(xw.device)  # (n, H, W): the scored channels
                full = (a.shape[1], *size)  # torchcam draws the noise of every channel: so do we, in order
                gen = torch.Generator().manual_seed(layer_seed(ctx.seed, layer.name))
                for s in range(samples):
                    noise = None
                    if std is not None:
                        noise = torch.normal(torch.zeros(full), torch.full(full, std), generator=gen)
                        noise = noise[chans.cpu()].to(masks.device)
                    for start in range(0, len(chans), chunk):
                        part = slice(start, start + chunk)
                        inputs = self.masked_inputs(
                            xw[b], masks[part], s, samples, None if noise is None else noise[part]
                        )
                        idx = chans[part].to(xw.device)
                        yield layer, b, s, inputs, idx


@register_method("sscam")
class SSCAM(SampledScoreCAM):
    """SS-CAM (Wang et al., 2020): Score-CAM with noisy masks, smoothed over samples.

    Sample ``s`` of channel ``c`` scores ``x * (M_c + n_sc)``, ``M_c`` the scaled, upsampled activation and
    ``n_sc ~ N(0, noise^2)`` at the input's resolution (35 samples, ``noise = 2.0`` by default, as torchcam);
    ``w = softmax_c(mean_s score)``. Options: ``samples``, ``noise``, ``max_channels``; seeded (see the
    module docstring).
    """

    paper = (
        "Wang et al., SS-CAM: Smoothed Score-CAM for Sharper Visual Feature Localization, arXiv:2006.14255"
    )
    passes = "samples x sum over the N layers of C_l forwards per image (batched), no backward; default 35"
    default_samples = 35
    default_noise = 2.0

    def noise_std(self, options: Mapping[str, Any]) -> float | None:
        return non_negative(options, "noise", self.default_noise)

    def masked_inputs(
        self, x: Tensor, masks: Tensor, sample: int, samples: int, noise: Tensor | None
    ) -> Tensor:
        return (masks + noise)[:, None] * x[None]


@register_method("iscam")
class ISCAM(SampledScoreCAM):
    """IS-CAM (Naidu et al., 2020): Score-CAM integrated along a path of scaled masks.

    Sample ``s`` (0-based) of channel ``c`` scores ``k_s x M_c`` with ``k_s = sum_{j<=s} (j + 1) / N`` (torchcam's
    running coefficient, ``N = samples``, 10 by default); ``w = softmax_c(mean_s score)``. Deterministic.
    Options: ``samples``, ``max_channels``.
    """

    paper = "Naidu et al., IS-CAM: Integrated Score-CAM for axiomatic-based explanations, arXiv:2010.03023"
    passes = "samples x sum over the N layers of C_l forwards per image (batched), no backward; default 10"
    default_samples = 10

    def masked_inputs(
        self, x: Tensor, masks: Tensor, sample: int, samples: int, noise: Tensor | None
    ) -> Tensor:
        coeff = sum((j + 1) / samples for j in range(sample + 1))
        return coeff * (masks[:, None] * x[None])
