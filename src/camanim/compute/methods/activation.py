"""Activation-statistics methods: maps from a layer's values alone, no gradient, no extra pass.

FEM weighs each channel by how often it is unusually strong (its k-sigma rule), from the shared capture.
"""

from __future__ import annotations

from torch import Tensor

from camanim.compute.methods.base import CAMMethod, LayerTensors, register_method

FEM_K = 2.0
"""FEM's ``k`` in ``mean + k * std`` (the paper's and grad-cam's default)."""


@register_method("fem")
class FEM(CAMMethod):
    """FEM, the Feature Explanation Method (Fuad et al., IPTA 2020): a gradient-free k-sigma rule.

    Per channel ``c``: the threshold ``t_c = mean_ij A_c + k * std_ij A_c`` (population standard deviation,
    ``k = 2``), the weight ``w_c = mean_ij [A_cij > t_c]`` (the share of positions above it) and the map
    ``sum_c w_c A_c``, as grad-cam's ``FEM``. Not class-discriminative: every class gets the same map.

    Example:
        >>> import torch
        >>> FEM()(torch.rand(1, 4, 7, 7)).shape
        torch.Size([1, 7, 7])
    """

    paper = "Fuad et al., Features understanding in 3D CNNs for actions recognition in video, IPTA 2020"
    volumes = True
    needs_gradients = False
    class_discriminative = False

    def channel_weights(self, t: LayerTensors) -> Tensor:
        a = t.acts.flatten(2)
        threshold = a.mean(dim=2, keepdim=True) + FEM_K * a.std(dim=2, correction=0, keepdim=True)
        return (a > threshold).to(a.dtype).mean(dim=2)
