"""The one-pass recorder: one forward and one backward give every chosen layer's value and gradient.

During the forward pass a hook on every module names the call (:class:`~camanim.layers.LayerTracker`),
and for each chosen layer keeps its output *as it is at hook time* and registers a tensor hook on it. A
later in-place operation (the in-place ReLU6 that timm's ``BatchNormAct2d`` applies after its ``drop``
submodule, ``out += identity`` in a ResNet block) then changes neither the kept value nor the gradient:
outputs that the forward pass modifies in place later (found by the dry run,
:func:`~camanim.layers.modified_in_place`) are copied at hook time, the others are held by reference,
which costs no memory where autograd saves the tensor anyway; and PyTorch fires a tensor hook registered
before an in-place change with the gradient of the pre-change value. Version counters confirm, before
the backward pass, that no referenced output changed; if one did (a forward pass that took another path
than the dry run), the capture is run again with every output copied. One
``torch.autograd.grad`` of the summed target scores with respect to the input then fires every tensor hook;
no ``.backward()`` is called and no parameter's ``.grad`` is touched.

Each layer's value and gradient are handed to a *consumer* as soon as its gradient arrives (in reverse
execution order), so a consumer that reduces them to maps lets both be freed at once: peak memory then
holds the forward pass's values, not every layer's gradient as well.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from camanim.compute.layers import Layer, LayerTracker, as_bchw, list_layers, model_errors, modified_in_place
from camanim.compute.targets import OutputSelector, Target

logger = logging.getLogger(__name__)

Consumer = Callable[[Layer, Tensor, Tensor | None, int], None]
"""Called once per chosen layer and backward pass with ``(layer, value (B, C, h, w), gradient (B, C, h, w)
or None, pass index)``."""


@dataclass
class CaptureResult:
    """What one capture produced.

    Attributes:
        layers: every layer the forward pass went through, in execution order.
        chosen: the layers that were recorded, in execution order.
        output: the model output (``(B, K)`` class scores, or what a task's target reads), detached.
        scores: the target scores ``(B,)`` or ``(B, K)`` the gradients refer to, detached.
        values: per chosen layer name, its output as ``(B, C, h, w)`` (empty when a consumer was given).
        gradients: per chosen layer name, the gradient of the summed scores with respect to that output,
            ``(B, C, h, w)`` (of the last pass when there are several); ``None`` where no gradient path
            leads from the layer to the target.
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


def _detached(value: object) -> object:
    """``value`` with every tensor in it detached (a detector's list of dicts, say)."""
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(v) for v in value)
    return value


def capture(
    model: nn.Module,
    x: Tensor,
    target: Target,
    want: Callable[[Layer], bool],
    *,
    consumer: Consumer | None = None,
    gradients: bool = True,
    copy_all: bool = False,
) -> CaptureResult:
    """Run one forward and (if ``gradients``) one backward pass, recording the chosen layers.

    Args:
        model: the network; left exactly as found (training flags, ``requires_grad``, no hooks left). Its
            class scores ``(B, K)`` are its output, read as :class:`~camanim.targets.OutputSelector` does by
            default when that is not a tensor (an :class:`~camanim.models.OutputAdapter` applies its own).
        x: input ``(B, 3, H, W)`` on the model's device, normalised as the model expects.
        target: maps the model output to one score per sample ``(B,)``, or to ``K`` scores per sample
            ``(B, K)``: then the forward pass is shared and ``K`` backward passes follow (the graph is
            retained between them), the ``k``-th differentiating ``scores[:, k]``. For K = 3 on a 2-core
            CPU one forward and three backward passes measured 1.3x (EfficientNet-Lite0) and 2.0x
            (ResNet-50) a single forward+backward, one pass over a batch of 3 copies 2.1x and 2.5x, and
            ``autograd.grad(..., is_grads_batched=True)`` (vmap over the 3 backward passes) 1.5x and 2.1x.
        want: decides, per layer as it is produced, whether to record it.
        consumer: receives each chosen layer's ``(layer, value, gradient, pass index)`` as soon as the
            gradient of that pass arrives (layers without a gradient: once per pass, at the end, with
            ``None``); without one, values and gradients are kept in the result.
        gradients: ``False`` skips the backward pass (for gradient-free methods only).
        copy_all: copy every chosen output at hook time instead of only those modified in place later.

    Returns:
        A :class:`CaptureResult`.
    """
    known = list_layers(model, x[:1])  # kinds decided by the dry run (cached), with its second input size
    modified = None if copy_all else modified_in_place(model, x[:1])
    tracker = LayerTracker(model, x, known)
    chosen: list[Layer] = []
    values: dict[str, Tensor] = {}
    grads: dict[str, Tensor | None] = {}
    done: dict[str, set[int]] = {}  # per layer, the backward passes whose gradient it received
    passes = 1
    current = 0  # the backward pass under way
    result_values: dict[str, Tensor] = {}
    referenced: list[tuple[str, Tensor, int]] = []  # outputs held without a copy, and their versions

    def deliver(layer: Layer, value: Tensor, grad: Tensor | None, k: int) -> None:
        if consumer is not None:
            consumer(layer, value, grad, k)
        else:
            result_values[layer.name] = value
            grads[layer.name] = grad

    def on_grad(layer: Layer, grad: Tensor) -> None:
        value = values.get(layer.name)
        if value is None or current in done[layer.name]:  # at most one gradient per pass
            return
        done[layer.name].add(current)
        if current == passes - 1:
            del values[layer.name]
        deliver(layer, value, as_bchw(grad.detach(), layer), current)

    def forward_hook(module: nn.Module, _inputs: tuple, output: object) -> None:
        layer = tracker.observe(module, output)
        if layer.map_size is None or not want(layer):
            return
        chosen.append(layer)
        value = as_bchw(output.detach(), layer)
        if modified is None or layer.name in modified:
            value = value.clone()
        else:
            referenced.append((layer.name, value, value._version))
        values[layer.name] = value
        if gradients and output.requires_grad:
            done[layer.name] = set()
            output.register_hook(lambda g, layer=layer: on_grad(layer, g))

    handles = []
    changed: list[str] = []
    try:
        with frozen_eval(model), torch.inference_mode(False), torch.enable_grad():
            for module in tracker.names:
                handles.append(module.register_forward_hook(forward_hook))
            inp = x.detach().clone().requires_grad_(gradients)
            with model_errors(x):
                output = model(inp)
            if not isinstance(output, Tensor) and getattr(model, "_camanim_module", None) is None:
                output = OutputSelector()(output)  # a plain module returning a tuple, dict or dataclass
            for h in handles:
                h.remove()
            handles.clear()
            changed = [name for name, t, version in referenced if t._version != version]
            referenced.clear()
            if not changed:
                scores = target(output)
                passes = scores.shape[1] if scores.dim() == 2 else 1
                per_pass = scores if scores.dim() == 2 else scores[:, None]
                if gradients and not per_pass.requires_grad:
                    logger.warning("the target's score does not depend on the input (nothing to explain)")
                for current in range(passes if gradients and per_pass.requires_grad else 0):
                    torch.autograd.grad(
                        per_pass[:, current].sum(), inp, allow_unused=True, retain_graph=current < passes - 1
                    )
    finally:
        for h in handles:
            h.remove()
    if changed:
        logger.debug("outputs of %s changed after their hooks; capturing again with copies", changed)
        values.clear()
        del output, inp
        return capture(model, x, target, want, consumer=consumer, gradients=gradients, copy_all=True)
    no_grad = []
    for layer in chosen:
        if layer.name in values:  # never reached by a backward pass (or gradients were not asked for)
            got = done.get(layer.name, set())
            if gradients and not got:
                no_grad.append(layer.name)
            value = values.pop(layer.name)
            for k in range(passes):
                if k not in got:
                    deliver(layer, value, None, k)
    if no_grad:
        shown = ", ".join(no_grad[:4]) + (f" and {len(no_grad) - 4} more" if len(no_grad) > 4 else "")
        logger.warning(
            "%d layer(s) received no gradient: no path leads from them to the target (%s)",
            len(no_grad),
            shown,
        )
    return CaptureResult(
        layers=tracker.layers,
        chosen=chosen,
        output=_detached(output),
        scores=scores.detach(),
        values=result_values,
        gradients=grads,
        no_gradient=no_grad,
    )
