"""Perturbation methods: Score-CAM and Ablation-CAM weigh each channel by extra forward passes.

They cannot be computed from one layer's ``(A, G)`` alone: every channel costs a forward pass of the model
(batched, ``batch_size`` channels per pass). They are registered with ``cost = "per_channel"``, so
``"all"`` leaves them out; :func:`camanim.explain` runs them after its capture, from the activations it
recorded, when they are named explicitly. Their entry point is :meth:`PerturbationCAM.compute`.

Cost. One layer of ``C`` channels takes ``ceil(C / batch_size)`` batched forwards per image. ``max_channels``
scores only the ``N`` channels of largest mean ``|A|`` (an approximation: the others get weight 0; a channel
of small activation contributes little to ``sum_c w_c A_c`` whatever its weight).

Speed, compared with the ``grad-cam`` package at the same batch size:

* Ablation-CAM computes the network *before* the layer once per batch at batch size 1: a forward hook at
  the layer replaces its ``(1, ...)`` output by ``n`` copies, each with one channel zeroed, and only the layers
  after it process a batch (grad-cam recomputes the prefix for every copy). If the architecture does not
  allow it (an operation after the layer combining the batch with an earlier batch-1 tensor fails, or the
  scores of the first batch disagree with a whole-network check) it falls back to whole-network batches.
* On the CPU, forwards run on a ``channels_last`` copy of a convolutional model (oneDNN's faster layout);
  the user's model is never modified.
* Score-CAM scores an all-zero channel (its mask is 0, so the masked input is 0) with one shared forward,
  and runs on a copy whose batch norms are folded into the convolutions before them. With
  ``compile=True`` its forwards run through ``torch.compile`` (Inductor, weights frozen as constants;
  batches padded to one size so one graph serves them all; eager, with a warning, where compiling fails).
  On this 2-core CPU that made a batch of 32 ResNet-50 forwards ~1.3x faster (0.9 s against 1.2 s) but
  costs 13-15 s of compilation on a first run (3 s from Inductor's cache), so it is off by default: Score-CAM
  at ResNet-50's last layer took 69.5 s eagerly, 70.7-72.7 s compiled from a cold cache and 59.2 s compiled
  with a warm one (grad-cam: ~120 s).

Chunking. ``batch_size`` changes nothing in our computation (masks are upsampled plane by plane): the maps
are bitwise equal for any batch size whenever the model's per-sample outputs do not depend on the batch they
are computed in. BLAS and oneDNN kernels may break that in the last bits (1.7e-6 on ResNet-18's ``fc``
between batches of 7 and 64), which then shows in the maps at that relative level. Compiled forwards
(Score-CAM, above) differ from eager ones at the same level (~1e-5 relative on ResNet-50's logits).

Example:
    >>> import torch, torchvision
    >>> net = torchvision.models.resnet18(weights=None).eval()
    >>> x = torch.randn(1, 3, 64, 64)
    >>> ScoreCAM().compute(net, x, "layer4.1.relu#2", target=0, max_channels=8).shape  # doctest: +SKIP
    torch.Size([1, 2, 2])
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camanim.compute.capture import capture, frozen_eval
from camanim.compute.layers import Layer, list_layers
from camanim.compute.methods.base import CAMMethod, register_method
from camanim.compute.targets import TARGET_KINDS, ClassLogit, Target
from camanim.errors import LayerNotFoundError

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 32
SCORECAM_EPS = 1e-8  # grad-cam's epsilon in the mask's min-max normalisation
_CHANNEL_AXIS = {"spatial": 1, "channels_last": 3, "token": 2}  # in the layer's own output layout


# ----------------------------------------------------------------------------------------- helpers


def _call_number(layer: Layer) -> int:
    """Which call of its module ``layer`` is (``layer4.1.relu#2`` is the second call)."""
    suffix = layer.name[len(layer.module_name) :]
    return int(suffix[1:]) if suffix.startswith("#") else 1


class _ReplaceOutput:
    """Forward hook replacing the output of the ``call``-th call of a module by ``make(output)``."""

    def __init__(self, call: int, make: Callable[[Tensor], Tensor]) -> None:
        self.call, self.make, self.seen = call, make, 0

    def __call__(self, _module: nn.Module, _inputs: tuple, output: Tensor) -> Tensor | None:
        self.seen += 1
        return self.make(output) if self.seen == self.call else None


@contextlib.contextmanager
def _hook(module: nn.Module, hook: Callable) -> Iterator[None]:
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _wants_channels_last(model: nn.Module, device: torch.device, channels_last: bool | None) -> bool:
    if channels_last is not None:
        return channels_last
    return device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules())


@contextlib.contextmanager
def working_model(
    model: nn.Module, x: Tensor, channels_last: bool | None = None, *, fold_batchnorm: bool = False
) -> Iterator[tuple[nn.Module, Tensor]]:
    """The network and input the perturbation forwards run on: eval mode, no gradients.

    With ``channels_last`` (default: on the CPU for models with 2-D convolutions) that is a deep copy in the
    ``channels_last`` memory format (oneDNN's faster layout: 1.3-1.7x on ResNet-50 here); with
    ``fold_batchnorm`` the copy's eval-mode batch norms are also folded into the convolutions before them
    (``torch.fx``; a further ~1.1x; skipped where the model cannot be traced, and never used with hooks,
    since a folded layer no longer exists). Otherwise the model itself, with its flags restored afterwards.
    Either way the user's model is left as found.

    Yields:
        ``(network, x)``, ``x`` in the matching memory format.
    """
    net = None
    if _wants_channels_last(model, x.device, channels_last) and x.dim() == 4:
        try:
            net = copy.deepcopy(model)
        except Exception as exc:  # a module holding something that cannot be copied
            logger.debug("cannot copy the model for channels_last (%s); using it as is", exc)
    if net is not None:
        net.eval().requires_grad_(False)
        if fold_batchnorm:
            net = _fold_batchnorm(net)
        net.to(memory_format=torch.channels_last)
        with torch.no_grad():
            yield net, x.contiguous(memory_format=torch.channels_last)
        return
    with frozen_eval(model), torch.no_grad():
        yield model, x


def _fold_batchnorm(net: nn.Module) -> nn.Module:
    """``net`` (a private eval-mode copy) with each batch norm that only follows a convolution folded into it."""
    try:
        from torch.fx.experimental.optimization import fuse

        return fuse(net, inplace=True)
    except Exception as exc:  # symbolic tracing fails on data-dependent control flow and the like
        logger.debug("batch norms not folded (%s: %s)", type(exc).__name__, exc)
        return net


class CompiledForward:
    """Forwards through ``torch.compile(net)``, every batch padded to ``batch`` inputs (one graph for all).

    Compilation happens at the first call; if it fails, this and every later call run ``net`` eagerly.
    """

    def __init__(self, net: nn.Module, batch: int) -> None:
        self.net, self.batch, self.failed = net, batch, False
        self.compiled = torch.compile(net, dynamic=False, options={"freezing": True})

    def __call__(self, inp: Tensor) -> Tensor:
        n = inp.shape[0]
        if self.failed or n > self.batch:
            return self.net(inp)
        if n < self.batch:
            cl = inp.dim() == 4 and inp.is_contiguous(memory_format=torch.channels_last)
            pad = inp.new_zeros((self.batch - n, *inp.shape[1:]))
            inp = torch.cat([inp, pad]).contiguous(
                memory_format=torch.channels_last if cl else torch.contiguous_format
            )
        try:
            out = self.compiled(inp)
        except Exception as exc:  # no C++ compiler, an operation Inductor cannot lower, ...
            logger.warning(
                "torch.compile failed (%s: %s); running the forwards eagerly", type(exc).__name__, exc
            )
            self.failed = True
            return self.net(inp[:n])
        return out[:n]


def resolve_layer(model: nn.Module, x: Tensor, layer: Layer | str) -> Layer:
    """``layer`` as a :class:`~camanim.layers.Layer` of ``model`` for inputs shaped like ``x``."""
    if isinstance(layer, Layer):
        return layer
    table = list_layers(model, x[:1])
    for candidate in table:
        if candidate.name == layer:
            return candidate
    raise LayerNotFoundError(layer, [c.name for c in table], "see `camanim layers`")


def per_sample_targets(
    target: Target | int | Sequence[int] | None, output: Tensor | None, batch: int, score: str = "logit"
) -> list[ClassLogit]:
    """One single-class target per sample.

    Args:
        target: a class index for every sample, one index per sample, a
            :class:`~camanim.targets.ClassLogit` (or its probability/sigmoid subclasses), or None for the
            top-1 class of ``output``.
        output: the model output ``(B, K)`` (needed only when ``target`` is None).
        batch: ``B``.
        score: ``"logit"``, ``"probability"`` or ``"sigmoid"`` for plain indices.
    """
    kind: type[ClassLogit] = TARGET_KINDS[score]
    if target is None:
        classes = [int(c) for c in output.argmax(dim=1)]
    elif isinstance(target, ClassLogit):
        kind = type(target)
        classes = list(target.classes) * (batch if len(target.classes) == 1 else 1)
    elif isinstance(target, int):
        classes = [target] * batch
    elif isinstance(target, Sequence) and not isinstance(target, str):
        classes = [int(c) for c in target]
    else:
        raise TypeError(
            "per-channel methods score each sample on its own: give class indices or a ClassLogit, "
            f"not {type(target).__name__}"
        )
    if len(classes) != batch:
        raise ValueError(f"{len(classes)} targets for a batch of {batch}")
    return [kind((c,)) for c in classes]


def select_channels(acts: Tensor, max_channels: int | None) -> Tensor:
    """Indices (ascending) of the channels scored for one sample's ``acts`` ``(C, h, w)``.

    All of them, or with ``max_channels`` the ``N`` of largest mean ``|A|`` over positions.
    """
    c = acts.shape[0]
    if max_channels is None or max_channels >= c:
        return torch.arange(c, device=acts.device)
    if max_channels < 1:
        raise ValueError(f"max_channels must be at least 1, got {max_channels}")
    strength = acts.abs().mean(dim=(1, 2))
    return strength.topk(max_channels).indices.sort().values


def forward_plan(
    channels: Sequence[int], batch_size: int, max_channels: int | None, samples: int = 1
) -> tuple[int, int]:
    """``(masked or ablated forwards, batched calls)`` for layers of the given channel counts."""
    scored = [min(c, max_channels) if max_channels else c for c in channels]
    return samples * sum(scored), samples * sum(math.ceil(c / batch_size) for c in scored)


# ------------------------------------------------------------------------------------------- methods


class PerturbationCAM(CAMMethod):
    """Base of the per-channel methods: channel weights from extra forwards, map ``= sum_c w_c A_c``."""

    needs_gradients = False
    cost = "per_channel"
    fold_batchnorm: ClassVar[bool] = False
    """Whether its forwards may run on a network with folded batch norms (no hooks inside the network)."""
    compilable: ClassVar[bool] = False
    """Whether its forwards may run through ``torch.compile`` (only the model's output is used)."""

    def raw_map(self, *args, **kwargs) -> Tensor:
        raise NotImplementedError(
            f"{self.name} needs extra forward passes of the model: call "
            f"{type(self).__name__}().compute(model, x, layer, target, acts)"
        )

    def compute(
        self,
        model: nn.Module,
        x: Tensor,
        layer: Layer | str,
        target: Target | int | Sequence[int] | None = None,
        acts: Tensor | None = None,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_channels: int | None = None,
        score: str = "logit",
        channels_last: bool | None = None,
        compile: bool = False,
    ) -> Tensor:
        """The raw map ``(B, h, w)`` of ``layer`` (before ReLU and upsampling, as every method's raw map).

        Args:
            model: the network; left as found.
            x: the input ``(B, 3, H, W)``, on the model's device, normalised as the model expects.
            layer: a :class:`~camanim.layers.Layer` or a layer name (see ``camanim layers``).
            target: class index (for every sample), one index per sample, a
                :class:`~camanim.targets.ClassLogit`-like target, or None for each sample's top-1 class.
            acts: the layer's values ``(B, C, h, w)`` as recorded by the capture; recorded here when None.
            batch_size: channels per forward pass (bounds memory: ``batch_size`` inputs at a time).
            max_channels: score only this many channels per sample (see the module docstring).
            score: what a plain class index scores: ``"logit"`` (grad-cam's default), ``"probability"``
                or ``"sigmoid"``.
            channels_last: run on a ``channels_last`` copy (default: on the CPU for conv models).
            compile: run the forwards through ``torch.compile`` (methods with ``compilable`` only; see
                the module docstring).

        Returns:
            ``(B, h, w)`` float32 on ``x``'s device.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        layer = resolve_layer(model, x, layer)
        output = None
        if acts is None or target is None:
            rec = capture(model, x, lambda o: o[:, 0], lambda lay: lay.name == layer.name, gradients=False)
            if layer.name not in rec.values:
                raise LayerNotFoundError(layer.name, [lay.name for lay in rec.layers], "not reached")
            acts = rec.values[layer.name] if acts is None else acts
            output = rec.output
        targets = per_sample_targets(target, output, x.shape[0], score)
        with working_model(model, x, channels_last, fold_batchnorm=self.fold_batchnorm) as (net, xw):
            if self.compilable and compile:
                net = CompiledForward(net, min(batch_size, acts.shape[1]))
            return self.compute_on(
                net, xw, layer, targets, acts, batch_size=batch_size, max_channels=max_channels
            )

    def compute_on(
        self,
        net: nn.Module,
        x: Tensor,
        layer: Layer,
        targets: Sequence[Target],
        acts: Tensor,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_channels: int | None = None,
    ) -> Tensor:
        """:meth:`compute` on a network already prepared by :func:`working_model`, one target per sample."""
        acts = acts.to(device=x.device, dtype=torch.float32)
        out = torch.zeros(acts.shape[0], *acts.shape[2:], device=x.device)
        for b in range(acts.shape[0]):
            channels = select_channels(acts[b], max_channels)
            t0 = time.perf_counter()
            weights = self.channel_scores(
                net, x[b : b + 1], layer, targets[b], acts[b : b + 1], channels, batch_size
            )
            logger.debug(
                "%s at %s, sample %d: %d channels in %.2f s",
                self.name,
                layer.name,
                b,
                len(channels),
                time.perf_counter() - t0,
            )
            out[b] = torch.einsum("c,chw->hw", weights.to(acts.dtype), acts[b, channels])
        return out

    def channel_scores(
        self,
        net: nn.Module,
        x: Tensor,
        layer: Layer,
        target: Target,
        acts: Tensor,
        channels: Tensor,
        batch_size: int,
    ) -> Tensor:
        """Weights ``(N,)`` of ``channels`` for one sample ``x`` ``(1, 3, H, W)`` with ``acts`` ``(1, C, h, w)``."""
        raise NotImplementedError


@register_method("scorecam")
class ScoreCAM(PerturbationCAM):
    """Score-CAM (Wang et al., CVPR Workshops 2020): each channel's upsampled activation masks the input.

    For channel ``c``: ``M_c = (U_c - min U_c) / (max U_c - min U_c + 1e-8)`` with ``U_c`` the activation
    upsampled bilinearly to the input size with ``align_corners=True``; ``s_c = target(f(x * M_c))``;
    ``w = softmax_c(s)``; map ``= sum_c w_c A_c``.

    Where the paper is vague this follows grad-cam 1.5 exactly: ``torch.nn.UpsamplingBilinear2d`` (which
    is ``align_corners=True``), the ``1e-8`` in the mask normalisation, the target's output as the score
    (the logit by default; ``score="probability"`` gives the softmax probability the paper speaks of) and a
    softmax over the channels of those scores (the paper's baseline ``f(x_b)`` cancels in that softmax).
    With ``max_channels`` the softmax runs over the scored channels only.
    """

    paper = "Wang et al., Score-CAM, CVPR Workshops 2020"
    fold_batchnorm = True
    compilable = True

    def channel_scores(
        self,
        net: nn.Module,
        x: Tensor,
        layer: Layer,
        target: Target,
        acts: Tensor,
        channels: Tensor,
        batch_size: int,
    ) -> Tensor:
        scores = torch.empty(len(channels), dtype=torch.float32, device=x.device)
        a = acts[:, channels]
        zero = (a == 0).flatten(2).all(dim=2)[0]  # their mask is 0 everywhere: the masked input is 0
        live = (~zero).nonzero()[:, 0]
        size = tuple(x.shape[-2:])
        fmt = (
            torch.channels_last
            if x.is_contiguous(memory_format=torch.channels_last)
            else torch.contiguous_format
        )
        for start in range(0, len(live), batch_size):
            idx = live[start : start + batch_size]
            # The planes as a batch of one-channel images: per plane, the CPU kernel's result then does not
            # depend on how many planes go together (as channels of one image it does), so chunking is exact.
            up = F.interpolate(a[0, idx][:, None], size=size, mode="bilinear", align_corners=True)[:, 0]
            lo = up.amin(dim=(1, 2), keepdim=True)
            hi = up.amax(dim=(1, 2), keepdim=True)
            masks = (up - lo) / (hi - lo + SCORECAM_EPS)
            inp = (x * masks[:, None]).contiguous(memory_format=fmt)
            scores[idx] = target(net(inp)).float()
        if bool(zero.any()):
            scores[zero] = target(net(torch.zeros_like(x))).float()
        return scores.softmax(dim=0)


@register_method("ablationcam")
class AblationCAM(PerturbationCAM):
    """Ablation-CAM (Desai & Ramaswamy, WACV 2020): the relative score drop when a channel is zeroed.

    ``w_c = (y - y_c) / y`` with ``y`` the target score and ``y_c`` the score with channel ``c`` of the layer's
    output set to 0; map ``= sum_c w_c A_c``. As the paper, and as grad-cam on layers whose minimum is 0; on
    layers with negative values grad-cam instead sets the channel to ``min - 1e7``, which we do not.

    See the module docstring for the batch-1 prefix (and its whole-network fallback).
    """

    paper = "Desai and Ramaswamy, Ablation-CAM, WACV 2020"

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        # network -> {layer: whether the batch-1 prefix works}, decided once per network and layer.
        self._prefix_ok: weakref.WeakKeyDictionary[nn.Module, dict[str, bool]] = weakref.WeakKeyDictionary()
        self.paths: dict[str, str] = {}
        """Per layer name, how its last run went: ``"batch-1 prefix"`` or ``"whole-network batches"``."""

    def channel_scores(
        self,
        net: nn.Module,
        x: Tensor,
        layer: Layer,
        target: Target,
        acts: Tensor,
        channels: Tensor,
        batch_size: int,
    ) -> Tensor:
        module = net.get_submodule(layer.module_name)
        call, axis = _call_number(layer), _CHANNEL_AXIS[layer.kind]
        y = target(net(x)).float()[0]
        scores = torch.empty(len(channels), dtype=torch.float32, device=x.device)
        decided = self._prefix_ok.setdefault(net, {})
        for start in range(0, len(channels), batch_size):
            idx = channels[start : start + batch_size]
            if layer.name not in decided:
                decided[layer.name] = self._prefix_works(net, x, module, call, axis, target, idx, layer.name)
                self.paths[layer.name] = "batch-1 prefix" if decided[layer.name] else "whole-network batches"
            scores[start : start + len(idx)] = self._ablated(
                net, x, module, call, axis, target, idx, decided[layer.name]
            )
        return (y - scores) / y

    @staticmethod
    def _ablated(
        net: nn.Module,
        x: Tensor,
        module: nn.Module,
        call: int,
        axis: int,
        target: Target,
        idx: Tensor,
        prefix: bool,
    ) -> Tensor:
        """Scores ``(n,)`` with channel ``idx[i]`` zeroed in copy ``i``.

        ``prefix``: feed ``x`` at batch 1 and let the hook widen the layer's output to the batch; otherwise
        feed ``n`` copies of ``x`` and replace the layer's output.
        """
        n = len(idx)

        def make(output: Tensor) -> Tensor:
            one = output[:1]
            cl = one.dim() == 4 and one.is_contiguous(memory_format=torch.channels_last)
            batch = one.expand(n, *one.shape[1:]).contiguous(
                memory_format=torch.channels_last if cl else torch.contiguous_format
            )
            index: list = [slice(None)] * batch.dim()
            index[0], index[axis] = torch.arange(n, device=batch.device), idx.to(batch.device)
            batch[tuple(index)] = 0
            return batch

        hook = _ReplaceOutput(call, make)
        with _hook(module, hook):
            out = net(x if prefix else x.expand(n, *x.shape[1:]))
        if hook.seen < call:
            raise RuntimeError(f"the layer's module was called {hook.seen} times, fewer than {call}")
        if out.shape[0] != n:
            raise RuntimeError(f"the model returned a batch of {out.shape[0]} for {n} ablated copies")
        return target(out).float()

    def _prefix_works(
        self,
        net: nn.Module,
        x: Tensor,
        module: nn.Module,
        call: int,
        axis: int,
        target: Target,
        idx: Tensor,
        name: str,
    ) -> bool:
        """Whether the batch-1 prefix works here: it runs, and its scores for the first batch match
        whole-network forwards of (two of) the same ablations where those run."""
        try:
            fast = self._ablated(net, x, module, call, axis, target, idx, True)
        except RuntimeError as exc:  # e.g. a concatenation with an earlier batch-1 tensor
            logger.info("ablationcam at %s: whole-network batches (the batch-1 prefix failed: %s)", name, exc)
            return False
        try:
            check = self._ablated(net, x, module, call, axis, target, idx[:2], False)
        except RuntimeError as exc:  # the model cannot take a batch of copies: the prefix is the only way
            logger.info(
                "ablationcam at %s: batch-1 prefix, unchecked (whole-network batches fail: %s)", name, exc
            )
            return True
        scale = float(check.abs().max()) + 1e-12
        if not torch.allclose(fast[: len(check)], check, rtol=1e-4, atol=1e-4 * scale):
            logger.warning(
                "ablationcam at %s: the batch-1 prefix disagrees with whole-network forwards; using those",
                name,
            )
            return False
        return True


# ---------------------------------------------------------------------------------------- pipeline


def run_per_channel(
    methods: Mapping[str, PerturbationCAM],
    model: nn.Module,
    x: Tensor,
    layers: Sequence[Layer],
    acts: Mapping[str, Tensor],
    target: Target,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_channels: int | None = None,
    channels_last: bool | None = None,
    compile: bool = False,
) -> dict[str, dict[str, Tensor]]:
    """Every per-channel method at every layer, from the activations a capture recorded.

    Logs the number of forwards (channels x layers x samples) and an estimated time before running; the
    estimate times one batched forward.

    Args:
        methods: name -> method instance.
        model: the network.
        x: the captured input ``(B, 3, H, W)`` on the model's device.
        layers: the layers, each with its values in ``acts[layer.name]`` ``(B, C, h, w)``.
        target: the capture's target (a :class:`~camanim.targets.ClassLogit`-like target).
        batch_size, max_channels, channels_last, compile: see :meth:`PerturbationCAM.compute`.

    Returns:
        ``maps[method][layer name]`` raw ``(B, h, w)``.
    """
    layers = [layer for layer in layers if layer.name in acts]
    targets = per_sample_targets(target, None, x.shape[0])
    out: dict[str, dict[str, Tensor]] = {n: {} for n in methods}
    if not layers or not methods:
        return out
    channels = [acts[layer.name].shape[1] for layer in layers]
    forwards, calls = forward_plan(channels, batch_size, max_channels, x.shape[0])
    logged = False
    n = min(batch_size, max(channels))
    for name, method in methods.items():
        with working_model(model, x, channels_last, fold_batchnorm=method.fold_batchnorm) as (net, xw):
            if not logged:  # the plan of every method, before any runs
                t0 = time.perf_counter()
                net(torch.cat([xw[:1]] * n))  # times one batched forward for the estimate
                per_call = time.perf_counter() - t0
                for planned in methods:
                    logger.info(
                        "%s: %d forwards (%d channels over %d layer(s) x %d sample(s)%s) in %d batched calls "
                        "of <= %d; estimated %s%.0f s",
                        planned,
                        forwards,
                        sum(channels),
                        len(layers),
                        x.shape[0],
                        f", <= {max_channels} per layer" if max_channels else "",
                        calls,
                        batch_size,
                        "at most " if planned == "ablationcam" else "",
                        calls * per_call,
                    )
                logged = True
            if method.compilable and compile:
                net = CompiledForward(net, n)
            for layer in layers:
                out[name][layer.name] = method.compute_on(
                    net,
                    xw,
                    layer,
                    targets,
                    acts[layer.name],
                    batch_size=batch_size,
                    max_channels=max_channels,
                )
    return out
