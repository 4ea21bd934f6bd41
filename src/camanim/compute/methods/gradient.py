"""Gradient-weighted methods: each defines only its rule on ``A`` (values) and ``G`` (gradients), ``(B, C, h, w)``.

Formulas follow the papers; where a paper leaves a detail open (epsilons, where a ReLU sits) they follow the
``grad-cam`` package (pytorch-grad-cam 1.5), against which the test suite checks parity.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from camanim.compute.methods.base import CAMMethod, LayerTensors, register_method


@register_method("gradcam")
class GradCAM(CAMMethod):
    """Grad-CAM (Selvaraju et al., ICCV 2017): ``w_c = mean_{ij} G_cij``, map ``= sum_c w_c A_c``.

    Example:
        >>> import torch
        >>> a = torch.rand(1, 4, 7, 7); g = torch.randn(1, 4, 7, 7)
        >>> GradCAM()(a, g).shape
        torch.Size([1, 7, 7])
    """

    paper = "Selvaraju et al., Grad-CAM, ICCV 2017"
    volumes = True

    def channel_weights(self, t: LayerTensors) -> Tensor:
        return t.grads.mean(dim=(2, 3))


@register_method("hirescam")
class HiResCAM(CAMMethod):
    """HiResCAM (Draelos & Carin, 2020): map ``= sum_c G_c * A_c`` (element-wise, no spatial averaging).

    At a layer that feeds only a LayerNorm this sum is zero in exact arithmetic; a map below the rounding
    level of its terms is returned as zero and flagged ``cancelled`` (:func:`~.base.rounding_noise`).
    """

    paper = "Draelos and Carin, HiResCAM, arXiv:2011.08891"
    volumes = True

    def raw_map(self, t: LayerTensors) -> Tensor:
        return t.grads_times_acts.sum(dim=1)

    def weighted_terms(self, t: LayerTensors) -> Tensor:
        return t.grads_times_acts

    def term_magnitude(self, t: LayerTensors) -> Tensor:
        """``sum_c |G_c * A_c|``: the sum cancels exactly before a LayerNorm (see ``rounding_noise``)."""
        return t.grads_times_acts.abs().sum(dim=1)


@register_method("gradcamelementwise", "gradcamew")
class GradCAMElementWise(CAMMethod):
    """Element-wise Grad-CAM (grad-cam package): map ``= sum_c ReLU(G_c * A_c)``."""

    paper = "pytorch-grad-cam's GradCAMElementWise (Gildenblat et al.)"
    volumes = True

    def raw_map(self, t: LayerTensors) -> Tensor:
        return t.grads_times_acts.clamp_min(0).sum(dim=1)

    def weighted_terms(self, t: LayerTensors) -> Tensor:
        return t.grads_times_acts.clamp_min(0)


@register_method("gradcam++", "gradcamplusplus", "gradcampp")
class GradCAMPlusPlus(CAMMethod):
    """Grad-CAM++ (Chattopadhay et al., WACV 2018), Eq. 19 with the exponential-output simplification.

    ``alpha = G^2 / (2 G^2 + sum_{ij} A * G^3 + 1e-6)`` (zero where ``G == 0``),
    ``w_c = sum_{ij} alpha * ReLU(G)``, map ``= sum_c w_c A_c``.
    """

    paper = "Chattopadhay et al., Grad-CAM++, WACV 2018"
    volumes = True

    def channel_weights(self, t: LayerTensors) -> Tensor:
        g = t.grads
        # alpha * ReLU(G) = G^2 ReLU(G) / (G^2 (2 + sum A * G) + 1e-6): 0 wherever G <= 0, which covers
        # grad-cam's G == 0 mask. Built in place on two buffers: the layer's largest temporaries.
        g2 = g.square()
        den = torch.mul(g, t.act_sums).add_(2).mul_(g2).add_(1e-6)
        return g.clamp_min(0).mul_(g2).div_(den).sum(dim=(2, 3))


@register_method("xgradcam")
class XGradCAM(CAMMethod):
    """XGrad-CAM (Fu et al., BMVC 2020): ``w_c = sum_{ij} G_cij A_cij / (sum_{ij} A_cij + 1e-7)``."""

    paper = "Fu et al., Axiom-based Grad-CAM, BMVC 2020"
    volumes = True

    def channel_weights(self, t: LayerTensors) -> Tensor:
        # The denominator is constant per channel, so it comes out of the spatial sum.
        return t.grads_times_acts.sum(dim=(2, 3)) / (t.act_sums[:, :, 0, 0] + 1e-7)


@register_method("layercam")
class LayerCAM(CAMMethod):
    """LayerCAM (Jiang et al., TIP 2021): map ``= sum_c ReLU(G_c) * A_c``."""

    paper = "Jiang et al., LayerCAM, IEEE TIP 2021"
    volumes = True

    def raw_map(self, t: LayerTensors) -> Tensor:
        return (t.grads.clamp_min(0) * t.acts).sum(dim=1)

    def weighted_terms(self, t: LayerTensors) -> Tensor:
        return t.grads.clamp_min(0) * t.acts


@register_method("randomcam")
class RandomCAM(CAMMethod):
    """A baseline: channel weights drawn uniformly from ``[-1, 1]`` (as grad-cam's RandomCAM), seeded.

    The draw depends only on ``seed`` and the layer key, so a layer gets the same weights whatever other
    layers are computed, in whatever order, and for every sample of a batch (grad-cam draws one row per
    sample, which would make a batch differ from its images explained one by one).
    """

    paper = "baseline (pytorch-grad-cam's RandomCAM)"
    volumes = True
    needs_gradients = False
    class_discriminative = False

    def channel_weights(self, t: LayerTensors) -> Tensor:
        acts = t.acts
        digest = hashlib.sha256(f"{self.seed}/{t.key}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        w = torch.rand(acts.shape[1], generator=gen, dtype=torch.float64) * 2 - 1
        return w.to(device=acts.device, dtype=acts.dtype).expand(acts.shape[0], -1)
