"""The one-pass recorder: one forward and one backward give every chosen layer's value and gradient.

During the forward pass a hook on every module names the call (:class:`~camanim.layers.LayerTracker`),
and for each chosen layer copies its output *at hook time* and registers a tensor hook on it. A later
in-place operation (the in-place ReLU6 that timm's ``BatchNormAct2d`` applies after its ``drop``
submodule, ``out += identity`` in a ResNet block) then changes neither the copy nor the gradient: PyTorch
fires a tensor hook registered before an in-place change with the gradient of the pre-change value. One
``torch.autograd.grad`` of the summed target scores with respect to the input then fires every tensor hook;
no ``.backward()`` is called and no parameter's ``.grad`` is touched.

Each layer's value and gradient are handed to a *consumer* as soon as its gradient arrives (in reverse
execution order), so a consumer that reduces them to maps lets both be freed at once: peak memory then
holds the copies of the forward pass, not every layer's gradient as well.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from camanim.layers import Layer, LayerTracker, as_bchw
from camanim.targets import Target

logger = logging.getLogger(__name__)

Consumer = Callable[[Layer, Tensor, Tensor | None], None]
"""Called once per chosen layer with ``(layer, value (B, C, h, w), gradient (B, C, h, w) or None)``."""


@dataclass
class CaptureResult:
    """What one capture produced.

    Attributes:
        layers: every layer the forward pass went through, in execution order.
        chosen: the layers that were recorded, in execution order.
        output: the model output ``(B, K)``, detached.
        scores: the target scores ``(B,)`` the gradients refer to, detached.
        values: per chosen layer name, its output as ``(B, C, h, w)`` (empty when a consumer was given).
        gradients: per chosen layer name, the gradient of the summed scores with respect to that output,
            ``(B, C, h, w)``; ``None`` where no gradient path leads from the layer to the target.
        no_gradient: names of chosen layers that received no gradient.
    """

    layers: list[Layer]
    chosen: list[Layer]
    output: Tensor
    scores: Tensor
    values: dict[str, Tensor] = field(default_factory=dict)
    gradients: dict[str, Tensor | None] = field(default_factory=dict)
    no_gradient: list[str] = field(default_factory=list)


@contextmanager
def frozen_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode and frozen parameters for the duration; the model's own flags are restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    grads = {p: p.requires_grad for p in model.parameters()}
    try:
        model.eval()
        for p in grads:
            p.requires_grad_(False)
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode
        for p, flag in grads.items():
            p.requires_grad_(flag)


def capture(
    model: nn.Module,
    x: Tensor,
    target: Target,
    want: Callable[[Layer], bool],
    *,
    consumer: Consumer | None = None,
    gradients: bool = True,
) -> CaptureResult:
    """Run one forward and (if ``gradients``) one backward pass, recording the chosen layers.

    Args:
        model: the network; left exactly as found (training flags, ``requires_grad``, no hooks left).
        x: input ``(B, 3, H, W)`` on the model's device, normalised as the model expects.
        target: maps the model output ``(B, K)`` to one score per sample ``(B,)``.
        want: decides, per layer as it is produced, whether to record it.
        consumer: receives each chosen layer's ``(layer, value, gradient)`` as soon as it is complete;
            without one, values and gradients are kept in the result.
        gradients: ``False`` skips the backward pass (for gradient-free methods only).

    Returns:
        A :class:`CaptureResult`.
    """
    tracker = LayerTracker(model, x)
    chosen: list[Layer] = []
    values: dict[str, Tensor] = {}
    grads: dict[str, Tensor | None] = {}
    pending: dict[str, Layer] = {}
    result_values: dict[str, Tensor] = {}

    def deliver(layer: Layer, value: Tensor, grad: Tensor | None) -> None:
        if consumer is not None:
            consumer(layer, value, grad)
        else:
            result_values[layer.name] = value
            grads[layer.name] = grad

    def on_grad(layer: Layer, grad: Tensor) -> None:
        value = values.pop(layer.name, None)
        if value is None:  # a second gradient for one tensor cannot happen in one backward; be safe
            return
        pending.pop(layer.name, None)
        deliver(layer, value, as_bchw(grad.detach(), layer))

    def forward_hook(module: nn.Module, _inputs: tuple, output: object) -> None:
        layer = tracker.observe(module, output)
        if layer.map_size is None or not want(layer):
            return
        chosen.append(layer)
        values[layer.name] = as_bchw(output.detach(), layer).clone()
        if gradients and output.requires_grad:
            pending[layer.name] = layer
            output.register_hook(lambda g, layer=layer: on_grad(layer, g))

    handles = []
    try:
        with frozen_eval(model), torch.inference_mode(False), torch.enable_grad():
            for module in tracker.names:
                handles.append(module.register_forward_hook(forward_hook))
            inp = x.detach().clone().requires_grad_(gradients)
            output = model(inp)
            for h in handles:
                h.remove()
            handles.clear()
            scores = target(output)
            if gradients:
                torch.autograd.grad(scores.sum(), inp, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    no_grad = []
    for layer in chosen:
        if layer.name in values:  # never reached by the backward pass (or gradients were not asked for)
            if gradients:
                no_grad.append(layer.name)
                logger.warning(
                    "layer %s received no gradient: no path leads from it to the target", layer.name
                )
            deliver(layer, values.pop(layer.name), None)
    return CaptureResult(
        layers=tracker.layers,
        chosen=chosen,
        output=output.detach(),
        scores=scores.detach(),
        values=result_values,
        gradients=grads,
        no_gradient=no_grad,
    )
