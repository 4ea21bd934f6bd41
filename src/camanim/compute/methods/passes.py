"""Methods that need passes of their own, beyond the shared capture, run once for all chosen layers.

The one-pass methods turn each layer's ``(A, G)`` of the shared capture into a map. Some methods need
more: a second-order term (ShapleyCAM's Hessian-vector products), another target (FinerCAM), another
backward rule (guided backpropagation), or averages over noisy inputs (SmoothGrad-CAM++). Each is a
:class:`MultiPassMethod`: it says what its passes cost for ``N`` layers (:meth:`~MultiPassMethod.plan`,
logged before it runs and shown in ``camanim explain --help``), and :meth:`~MultiPassMethod.compute_layers`
runs them once for every chosen layer together (batched over layers and samples where the method allows),
from a :class:`PassContext`.

The context carries what the shared capture already knows: the model, the input, the chosen layers, the
explained class of every sample, the layers' values (``values``, kept when a method asks for them with
``needs_values``) and the maps of one-pass methods they build on (``base_maps``, for the methods named in
``bases``). So Guided Grad-CAM multiplies the capture's own Grad-CAM maps by one guided backward pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from camanim.compute.layers import Layer, LayerTracker, list_layers, modified_in_place
from camanim.compute.methods.base import CAMMethod
from camanim.compute.targets import TARGET_KINDS, Target

__all__ = ["MultiPassMethod", "PassContext", "hooked_outputs", "run_multi_pass"]


@dataclass
class PassContext:
    """What a :class:`MultiPassMethod` gets from the pipeline.

    Attributes:
        model: the network (its forward returns the class scores ``(B, K)``); use it under
            :func:`camanim.compute.capture.frozen_eval` and leave it as found.
        x: the input ``(B, 3, H, W)`` on the model's device.
        layers: the chosen layers, in forward order.
        classes: the explained class of every sample, ``(B,)`` indices.
        score: what is differentiated: ``"logit"``, ``"probability"`` or ``"sigmoid"``.
        seed: seed of noise and sampling.
        batch_size: inputs per extra forward.
        options: method options by name (``alpha``, ``samples``, ``noise``...), as given to ``explain``.
        values: per layer name, its value ``(B, C, h, w)`` in the shared capture (methods with
            ``needs_values``).
        base_maps: ``base_maps[method][layer name]``: raw maps ``(B, h, w)`` of the one-pass methods named in
            the methods' ``bases``.
    """

    model: nn.Module
    x: Tensor
    layers: Sequence[Layer]
    classes: tuple[int, ...]
    score: str = "logit"
    seed: int = 0
    batch_size: int = 32
    options: Mapping[str, Any] = field(default_factory=dict)
    values: Mapping[str, Tensor] = field(default_factory=dict)
    base_maps: Mapping[str, Mapping[str, Tensor]] = field(default_factory=dict)

    def target(self) -> Target:
        """The explained classes' scores, ``(B,)``."""
        return TARGET_KINDS[self.score](self.classes)


class MultiPassMethod(CAMMethod):
    """Base of the methods that run passes of their own (see the module docstring).

    Class attributes:
        bases: one-pass methods whose maps the pipeline computes from the shared capture and hands over in
            :attr:`PassContext.base_maps`.
        needs_values: whether the layers' values of the shared capture are needed.
        resolution: ``"layer"`` (maps at the layer's own resolution) or ``"input"`` (at the input's, like
            Guided Grad-CAM).
    """

    cost = "multi_pass"
    bases: ClassVar[tuple[str, ...]] = ()
    needs_values: ClassVar[bool] = False
    resolution: ClassVar[str] = "layer"

    def plan(self, layers: int, batch: int, options: Mapping[str, Any]) -> tuple[int, int]:
        """``(forward passes, backward passes)`` for ``layers`` layers and ``batch`` samples."""
        raise NotImplementedError

    def compute_layers(self, ctx: PassContext) -> dict[str, Tensor]:
        """The raw map ``(B, h, w)`` of every layer of ``ctx.layers``, by layer name."""
        raise NotImplementedError

    def raw_map(self, *args: Any, **kwargs: Any) -> Tensor:
        raise NotImplementedError(
            f"{self.name} runs passes of its own: use camanim.explain(methods={self.name!r})"
        )


def run_multi_pass(methods: Mapping[str, MultiPassMethod], ctx: PassContext) -> dict[str, dict[str, Tensor]]:
    """Every multi-pass method at every layer of ``ctx``: ``maps[method][layer name]`` raw ``(B, h, w)``."""
    return {name: method.compute_layers(ctx) for name, method in methods.items()}


@contextlib.contextmanager
def hooked_outputs(
    model: nn.Module, x: Tensor, names: Sequence[str]
) -> Iterator[dict[str, tuple[Tensor, Layer]]]:
    """While the block runs a forward of ``model``, collect the outputs of the layers ``names`` as they are
    in the graph (not detached, in the module's own layout: differentiate with respect to them, then read
    them and their gradients as ``(B, C, h, w)`` with :func:`~camanim.compute.layers.as_bchw`), with their
    :class:`~camanim.compute.layers.Layer`.

    An output a later operation modifies in place (found by the dry run) is replaced, for the rest of the
    forward, by a copy, so the collected tensor keeps its value at hook time and its gradient is that of
    this value (second-order methods differentiate through it). Hooks are removed when the block ends.
    """
    wanted = set(names)
    known = list_layers(model, x[:1])
    modified = modified_in_place(model, x[:1]) or frozenset(wanted)
    tracker = LayerTracker(model, x, known)
    outputs: dict[str, tuple[Tensor, Layer]] = {}

    def hook(module: nn.Module, _inputs: tuple, output: object) -> object:
        layer = tracker.observe(module, output)
        if layer.name not in wanted or not isinstance(output, Tensor):
            return None
        outputs[layer.name] = (output, layer)
        return output.clone() if layer.name in modified else None

    handles = [m.register_forward_hook(hook) for m in tracker.names]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()
