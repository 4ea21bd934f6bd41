"""Eigen methods: EigenCAM (the first principal component of the activations) and EigenGradCAM (of
the gradient-weighted activations), computed by :mod:`.projection`."""

from __future__ import annotations

from torch import Tensor

from camanim.compute.methods.base import CAMMethod, LayerTensors, register_method
from camanim.compute.methods.projection import first_component_projection


@register_method("eigencam")
class EigenCAM(CAMMethod):
    """Eigen-CAM (Muhammad & Yeasin, IJCNN 2020): first principal component of ``A``; no gradient."""

    paper = "Muhammad and Yeasin, Eigen-CAM, IJCNN 2020"
    volumes = True
    needs_gradients = False
    class_discriminative = False

    def raw_map(self, t: LayerTensors) -> Tensor:
        return first_component_projection(t.acts)


@register_method("eigengradcam")
class EigenGradCAM(CAMMethod):
    """EigenGrad-CAM (grad-cam package): first principal component of ``G * A``; class-discriminative."""

    paper = "pytorch-grad-cam's EigenGradCAM"
    volumes = True

    def raw_map(self, t: LayerTensors) -> Tensor:
        return first_component_projection(t.grads_times_acts)
