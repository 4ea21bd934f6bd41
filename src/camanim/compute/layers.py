"""Layers: what a network's forward pass produces, in execution order, and how to pick among them.

A *layer* is one module call. Layers are listed in the order their forward hooks fire (a module's hook
fires when its forward returns, so a block comes after its children), never in ``named_modules()`` order.
A module called more than once in a forward (torchvision's ResNet reuses each block's ``relu``) gives one
layer per call: the first call is named after the module (``layer1.0.relu``), the k-th call for k >= 2 gets
a ``#k`` suffix (``layer1.0.relu#2``, ``layer1.0.relu#3``).

Each layer has a *kind*, decided from its output:

* ``spatial``: ``(B, C, h, w)`` with ``h * w > 1``;
* ``channels_last``: ``(B, h, w, C)`` (ConvNeXt, Swin and MaxViT blocks), permuted to ``(B, C, h, w)``;
* ``token``: ``(B, N, C)`` whose last ``N - P`` tokens form an ``h x w`` grid after ``P`` prefix
  (class, distillation, register) tokens (ViT, DeiT, Swin's last stage), reshaped to ``(B, C, h, w)``;
* ``volume``: ``(B, C, d, h, w)`` of a model whose input is a volume or a clip ``(B, C, D, H, W)``, with
  ``d * h * w > 1`` (MONAI's 3-D networks, torchvision's video classifiers); ``volume_channels_last``:
  ``(B, d, h, w, C)``, permuted to ``(B, C, d, h, w)``. A volume layer's map is ``(B, d, h, w)``; the methods see it as ``(B, C, d * h, w)`` (:func:`as_bchw`),
  which is exact for every method whose rule pools over positions or works position by position, and the
  map is reshaped back (:func:`as_map`). Every other output of such a model is ``nonspatial``;
* ``nonspatial``: anything else: ``(B, C)`` vectors, 1x1 maps, tuples, and tensors whose axes are not the
  image's (windows of tokens, attention probabilities, heads). These are listed but left out of sweeps:
  their maps carry no spatial information and only render as flat frames or stripes (CAManim, Fig 7).
  Vectors and 1x1 maps can still be kept on request (``keep_nonspatial``): they are read as
  ``(B, C, 1, 1)`` and give a 1x1 map.

The rule, for every model alike (no per-model exceptions): a pair of axes is a grid of the image when

1. the batch axis is the input's ``B`` (so Swin's ``(B * windows, ...)`` tensors are not);
2. both axes are the input's height and width divided by one integer stride ``s``, rounded either way
   (``|h * s - H| < s``, :func:`grid_stride`), as strided convolutions, pooling and patch embeddings make
   them; for tokens, ``N - P = h * w`` with such a grid and ``P`` the model's own prefix count if it
   declares one (timm's ``num_prefix_tokens``), else the smallest of 0..8 that fits (a patch embedding
   has no class token yet);
3. and, where the model also takes a second input size in the dry run (``H + 32`` by ``W + 32``), the
   same axes at that size either grow with the input by ``step / s`` (within one) while the channel axis
   stays, or stay exactly the same (adaptive pooling, whose fixed grid still covers the image). A grid
   that only the second size reveals (Inception's unpadded convolutions, 299 -> 149 -> 147) counts too;
4. and the values are not rows of probabilities: an output that is non-negative and sums to one along its
   last axis at every position (:func:`probability_rows`) is an attention table whatever its shape says.
   Without this, attention whose sizes happen to be a grid of the input passes 1-3: Swin-V2's 16 x 16
   windows give ``(1, heads, 256, 256)`` at a 256-pixel input whose last stage is a single window, XCiT's
   cross-covariance attention ``(1, heads, C/h, C/h)`` where ``C/h`` is an integer fraction of a small
   input. A class-probability map (softmax over channels, axis 1) is still a map.

For a volume ``(D, H, W)`` the same rule holds per grid: ``(h, w)`` is a grid of ``(H, W)`` with one stride
``s`` as above and ``d`` a grid of ``D`` with a stride of its own (a video network's temporal stride is not its
spatial one: torchvision's ``r3d_18`` keeps all 8 frames of a clip in its stem while halving the height and
width), and at the second size ``(D + 8, H + 32, W + 32)`` each of the two either follows the input or stays.

So torchvision MaxViT's window partitions ``(1, 49, 64, 64)`` (49 windows x 64 tokens x 64 channels:
224 / 64 is no integer stride) and Swin's attention probabilities ``(1, 24, 49, 49)`` are not maps, while
a ViT's ``patch_embed`` output ``(1, 196, C)`` is a 14 x 14 token grid with no prefix token. The capture
reuses the kinds the dry run decided (cached per model and input shape) and classifies only calls the dry
run did not see, from their output alone.

A layer whose output is the very same tensor, unmodified, as an earlier layer's (a container returning its
last child's output, an ``Identity``) records the earlier layer's name in ``same_as``; sweeps skip it unless
asked, so the same map is not shown twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import logging
import math
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from camanim.errors import CamanimError, LayerNotFoundError, LayerSelectionError, ModelRunError

logger = logging.getLogger(__name__)

VOLUME_KINDS = ("volume", "volume_channels_last")
SPATIAL_KINDS = ("spatial", "channels_last", "token", *VOLUME_KINDS)
_CHANNELS_LAST_TYPES = ("LayerNorm", "Linear", "Mlp", "LayerScale", "GlobalResponseNorm")


@dataclass(frozen=True)
class Layer:
    """One module call in a forward pass.

    Attributes:
        index: position in the execution-ordered list of all layers (0-based).
        name: unique name: the qualified module name, ``#k`` appended for the k-th call (k >= 2).
        module_name: qualified module name (shared by all calls of a reused module).
        type: the module's class name.
        kind: ``spatial``, ``channels_last``, ``token``, ``volume``, ``volume_channels_last`` or
            ``nonspatial``.
        shape: output shape including the batch axis (empty when the output is not a tensor).
        params: number of parameters of the module, its children included.
        map_size: ``(h, w)`` of the layer's map (``(d, h, w)`` for a ``volume`` layer): ``(1, 1)`` for vectors
            and 1x1 maps (``(1, 1, 1)`` in a volume model), ``None`` for outputs that cannot be read as a map
            (tuples, windowed tensors).
        prefix_tokens: tokens dropped before the grid reshape (``token`` layers only).
        same_as: name of an earlier layer whose output is this very tensor, else ``None``.
    """

    index: int
    name: str
    module_name: str
    type: str
    kind: str
    shape: tuple[int, ...]
    params: int
    map_size: tuple[int, ...] | None
    prefix_tokens: int = 0
    same_as: str | None = None

    @property
    def is_spatial(self) -> bool:
        """Whether the layer yields a map of the input's grid, 2-D or 3-D (any kind but ``nonspatial``)."""
        return self.kind in SPATIAL_KINDS

    @property
    def is_volume(self) -> bool:
        """Whether the layer yields a 3-D map ``(B, d, h, w)`` (kinds ``volume`` and ``volume_channels_last``)."""
        return self.kind in VOLUME_KINDS

    def to_dict(self) -> dict:
        """A JSON-ready description, as recorded in the manifest."""
        return {
            "index": self.index,
            "name": self.name,
            "module": self.module_name,
            "type": self.type,
            "kind": self.kind,
            "shape": list(self.shape),
            "params": self.params,
            "map_size": list(self.map_size) if self.map_size else None,
            "prefix_tokens": self.prefix_tokens,
            "same_as": self.same_as,
        }


#: The dry run's second input is ``(H + PROBE_DH, W + PROBE_DW)``: a multiple of 32, the largest stride of
#: most CNNs, the same on both sides, so that a model resizing its input inside (a detector's transform to a
#: fixed shorter side) sees the same aspect ratio and keeps its grids the same size.
PROBE_DH, PROBE_DW = 32, 32
#: For a volume or clip, the depth (frames) grows by 8: a short clip (8 frames) would cost five times its
#: forward pass at 8 + 32. A depth stride above 8 may then keep its depth at the second size, which the rule
#: accepts for a depth that is a grid at the first size (module docstring).
PROBE_DD = 8
#: Prefix tokens (class, distillation, registers) looked for when the model does not say how many it has.
MAX_PREFIX_TOKENS = 8

Shape = tuple[int, ...]
Probe = tuple[Shape, tuple[int, ...]]
"""What the dry run saw of one layer at the second input size: ``(output shape, (H2, W2))``, or
``(output shape, (D2, H2, W2))`` for a volume model."""
Kind = tuple[str, tuple[int, ...] | None, int]
"""A layer's ``(kind, map_size, prefix_tokens)``."""


def grid_stride(h: int, w: int, in_h: int, in_w: int) -> int | None:
    """The integer stride ``s`` that makes ``h x w`` a grid of an ``in_h x in_w`` input, or None.

    Both axes must be ``size / s`` for one ``s``, rounded either way (``|h * s - in_h| < s``), as strided
    convolutions, pooling and patch embeddings produce.
    """
    if h < 1 or w < 1 or h > in_h or w > in_w:
        return None
    guess = max(1, round(in_h / h))
    for s in (guess, guess - 1, guess + 1):
        if s >= 1 and abs(h * s - in_h) < s and abs(w * s - in_w) < s:
            return s
    return None


def _follows(d1: int, d2: int, x1: int, x2: int) -> bool:
    """Whether an axis of size ``d1`` at input size ``x1`` and ``d2`` at ``x2`` follows the input grid: it grows
    by the input's step divided by its own stride ``x1 / d1`` (within one, for rounding)."""
    if d1 < 1 or d2 <= d1 or x2 <= x1:
        return False
    expected = (x2 - x1) * d1 / x1
    return abs((d2 - d1) - expected) <= max(1.0, 0.1 * expected)


def _grid_kind(
    h: int, w: int, c: int, in_hw: tuple[int, int], other: tuple[int, int, int, tuple[int, int]] | None
) -> bool:
    """Whether ``(h, w)`` with ``c`` channels is a grid of the input (see :func:`classify_output`);
    ``other`` is ``(h2, w2, c2, (H2, W2))`` at the second input size, when the model took one."""
    single = grid_stride(h, w, *in_hw) is not None
    if other is None:
        return single
    h2, w2, c2, (in_h2, in_w2) = other
    if c2 != c:
        return False
    scales = _follows(h, h2, in_hw[0], in_h2) and _follows(w, w2, in_hw[1], in_w2)
    return scales or (single and (h2, w2) == (h, w))


def _token_grid(
    n: int, in_hw: tuple[int, int], prefixes: Sequence[int], other: tuple[int, tuple[int, int]] | None
) -> tuple[tuple[int, int], int] | None:
    """The grid ``(gh, gw)`` and prefix-token count ``P`` of ``n`` tokens, ``n = P + gh * gw``, or None."""
    in_h, in_w = in_hw
    for p in prefixes:
        m = n - p
        if m < 4:
            continue
        # the stride s with round(in_h / s) * round(in_w / s) == m
        s0 = math.sqrt(in_h * in_w / m)
        for s in {max(1, math.floor(s0)), max(1, math.ceil(s0))}:
            gh, gw = round(in_h / s), round(in_w / s)
            if gh * gw != m or grid_stride(gh, gw, in_h, in_w) is None:
                continue
            if other is not None:
                n2, (in_h2, in_w2) = other
                gh2, gw2 = round(in_h2 / s), round(in_w2 / s)
                if n2 != p + gh2 * gw2:
                    continue
            return (gh, gw), p
    return None


def classify_output(
    output: object,
    module: nn.Module,
    batch: int,
    in_hw: tuple[int, ...],
    prefix_tokens: int | None = None,
    other: Probe | None = None,
) -> Kind:
    """Decide a layer's kind from its output (the rule is in the module docstring).

    Args:
        output: what the module returned.
        module: the module (its type breaks a tie between ``(B, C, H, W)`` and ``(B, H, W, C)``).
        batch: the input's batch size ``B``.
        in_hw: the input's ``(H, W)`` in pixels, or ``(D, H, W)`` in voxels (frames) for a volume model.
        prefix_tokens: the model's number of prefix tokens when known (timm's ``num_prefix_tokens``); tried
            first, then 0, 1, ... :data:`MAX_PREFIX_TOKENS`.
        other: the same layer's output shape at the dry run's second input size, and that size, when the
            model took it.

    Returns:
        ``(kind, map_size, prefix_tokens)``.
    """
    shape = tuple(output.shape) if isinstance(output, Tensor) else ()
    kind = classify_shape(shape, type(module).__name__, batch, in_hw, prefix_tokens, other)
    if kind[0] in ("spatial", "channels_last") and probability_rows(output):
        return "nonspatial", None, 0
    return kind


#: How far from one a row may sum and still count as probabilities (float32 softmax rows of 256 entries sum
#: to one within ~1e-6; a feature map that sums to one along its width by chance is not this close everywhere).
PROBABILITY_ATOL = 1e-4


def probability_rows(output: object) -> bool:
    """Whether ``output`` is a floating tensor of at least 3 axes whose last axis holds probability rows:
    every entry >= 0 and every row summing to one within :data:`PROBABILITY_ATOL` (a softmax's output, e.g.
    attention probabilities ``(B, heads, N, N)``)."""
    if not isinstance(output, Tensor) or output.dim() < 3 or not output.is_floating_point():
        return False
    if output.shape[-1] < 2 or output.numel() == 0:
        return False
    with torch.no_grad():
        t = output.detach()
        if float(t.min()) < 0:
            return False
        return bool(((t.sum(-1, dtype=torch.float64) - 1).abs() <= PROBABILITY_ATOL).all())


def classify_shape(
    shape: Shape,
    type_name: str,
    batch: int,
    in_hw: tuple[int, ...],
    prefix_tokens: int | None = None,
    other: Probe | None = None,
) -> Kind:
    """:func:`classify_output` from the output's shape (``()`` when it is not a tensor) and module type."""
    if len(shape) < 2 or shape[0] != batch:
        return "nonspatial", None, 0
    if len(shape) == 2:
        return "nonspatial", (1,) * len(in_hw), 0
    shape2, hw2 = other if other is not None and len(other[0]) == len(shape) else (None, None)
    if len(in_hw) == 3:
        return _volume_kind(shape, type_name, in_hw, shape2, hw2)
    if len(shape) == 4:
        _, a, b, c = shape
        first = _grid_kind(b, c, a, in_hw, None if shape2 is None else (shape2[2], shape2[3], shape2[1], hw2))
        last = _grid_kind(a, b, c, in_hw, None if shape2 is None else (shape2[1], shape2[2], shape2[3], hw2))
        if last and (not first or type_name in _CHANNELS_LAST_TYPES):
            return ("channels_last", (a, b), 0) if a * b > 1 else ("nonspatial", None, 0)
        if first:
            return ("spatial", (b, c), 0) if b * c > 1 else ("nonspatial", (1, 1), 0)
        return "nonspatial", None, 0
    if len(shape) == 3:
        _, n, c = shape
        if shape2 is not None and shape2[2] != c:
            return "nonspatial", None, 0
        known = [prefix_tokens] if prefix_tokens is not None else []
        prefixes = known + [p for p in range(MAX_PREFIX_TOKENS + 1) if p not in known]
        found = _token_grid(n, in_hw, prefixes, None if shape2 is None else (shape2[1], hw2))
        if found is not None:
            grid, p = found
            return "token", grid, p
    return "nonspatial", None, 0


def _depth_follows(d: int, in_d: int, d2: int | None, in_d2: int | None) -> bool:
    """Whether ``d`` is a grid of a volume's depth ``in_d``: ``in_d / s`` for an integer stride ``s`` (rounded
    either way), and at the second size ``d2`` follows the input or stays the same."""
    single = 1 <= d <= in_d and any(
        abs(d * s - in_d) < s for s in range(max(1, in_d // d - 1), in_d // d + 3)
    )
    if d2 is None or in_d2 is None:
        return single
    return _follows(d, d2, in_d, in_d2) or (single and d2 == d)


def _volume_grid(
    grid: Shape, c: int, in_dhw: tuple[int, ...], other: tuple[Shape, int, tuple[int, ...]] | None
) -> bool:
    """Whether ``grid = (d, h, w)`` with ``c`` channels is a grid of a ``(D, H, W)`` input (module docstring);
    ``other`` is ``((d2, h2, w2), c2, (D2, H2, W2))`` at the second input size, when the model took one."""
    d, h, w = grid
    if other is None:
        return _depth_follows(d, in_dhw[0], None, None) and _grid_kind(h, w, c, in_dhw[1:], None)
    (d2, h2, w2), c2, in2 = other
    return _depth_follows(d, in_dhw[0], d2, in2[0]) and _grid_kind(h, w, c, in_dhw[1:], (h2, w2, c2, in2[1:]))


def _volume_kind(
    shape: Shape, type_name: str, in_dhw: tuple[int, ...], shape2: Shape | None, dhw2: tuple[int, ...] | None
) -> Kind:
    """The kind of an output of a volume model: ``volume`` for ``(B, C, d, h, w)``, ``volume_channels_last``
    for ``(B, d, h, w, C)``, ``nonspatial`` for everything else (the type breaks a tie, as in 2-D)."""
    if len(shape) != 5:
        return "nonspatial", None, 0
    _, a, b, c, e = shape
    first = _volume_grid((b, c, e), a, in_dhw, None if shape2 is None else (shape2[2:], shape2[1], dhw2))
    last = _volume_grid((a, b, c), e, in_dhw, None if shape2 is None else (shape2[1:4], shape2[4], dhw2))
    if last and (not first or type_name in _CHANNELS_LAST_TYPES):
        return ("volume_channels_last", (a, b, c), 0) if a * b * c > 1 else ("nonspatial", None, 0)
    if first:
        return ("volume", (b, c, e), 0) if b * c * e > 1 else ("nonspatial", (1, 1, 1), 0)
    return "nonspatial", None, 0


def as_map(m: Tensor, layer: Layer) -> Tensor:
    """A method's map ``(B, h, w)`` in the layer's own grid: ``(B, d, h, w)`` for a volume layer (whose
    methods saw ``(B, C, d * h, w)``, see :func:`as_bchw`), unchanged otherwise."""
    if layer.map_size is not None and len(layer.map_size) == 3:
        return m.reshape(m.shape[0], *layer.map_size)
    return m


def as_bchw(t: Tensor, layer: Layer) -> Tensor:
    """Reshape a layer's output (or its gradient) to ``(B, C, h, w)`` by the layer's kind (a view if possible).

    A volume layer's ``(B, C, d, h, w)`` becomes ``(B, C, d * h, w)``: its positions in the same order, so a
    method that pools over positions or works position by position computes the volume's map exactly, and
    :func:`as_map` reshapes the ``(B, d * h, w)`` result to ``(B, d, h, w)``.
    """
    if layer.kind == "spatial":
        return t
    if layer.kind in VOLUME_KINDS:
        if layer.kind == "volume_channels_last":
            t = t.permute(0, 4, 1, 2, 3)
        d, h, w = layer.map_size
        return t.reshape(t.shape[0], t.shape[1], d * h, w)
    if layer.kind == "channels_last":
        return t.permute(0, 3, 1, 2)
    if layer.kind == "token":
        h, w = layer.map_size
        grid = t[:, layer.prefix_tokens :, :]
        return grid.reshape(t.shape[0], h, w, t.shape[-1]).permute(0, 3, 1, 2)
    if layer.map_size in ((1, 1), (1, 1, 1)):  # a vector (B, C) or a 1x1 map, read as (B, C, 1, 1)
        return t.reshape(t.shape[0], t.shape[1], 1, 1)
    raise LayerSelectionError(
        f"layer {layer.name!r} is non-spatial (output shape {list(layer.shape)}) and has no map"
    )


class LayerTracker:
    """Names and classifies module calls as forward hooks fire; shared by the dry run and the capture.

    One tracker serves one forward pass. ``observe`` returns the :class:`Layer` of a call. A call that the
    dry run saw (same name, same output shape but for the batch) takes the kind the dry run decided with
    its second input size (``known``); any other is classified from its output alone.
    """

    def __init__(self, model: nn.Module, x: Tensor, known: Sequence[Layer] = ()) -> None:
        self.known = {layer.name: layer for layer in known}
        self.names = {m: n for n, m in model.named_modules() if n}
        self.batch = x.shape[0]
        # the input's grid: (H, W), or (D, H, W) for a volume or clip (B, C, D, H, W)
        self.in_hw = tuple(x.shape[-3:]) if x.dim() == 5 else (x.shape[-2], x.shape[-1])
        self.prefix = getattr(model, "num_prefix_tokens", None)
        self.prefix = self.prefix if isinstance(self.prefix, int) else None
        self.calls: dict[str, int] = {}
        self.layers: list[Layer] = []
        # names of the calls whose output was rows of probabilities (attention), never maps
        self.probabilities: set[str] = set()
        # id(tensor) -> (tensor version, layer name, weak ref) of outputs seen so far.
        self._seen: dict[int, tuple[int, str, weakref.ref]] = {}
        self._params: dict[nn.Module, int] = {}

    def _param_count(self, module: nn.Module) -> int:
        if module not in self._params:
            self._params[module] = sum(p.numel() for p in module.parameters())
        return self._params[module]

    def observe(self, module: nn.Module, output: object) -> Layer:
        """Record one module call and return its layer."""
        module_name = self.names[module]
        k = self.calls.get(module_name, 0) + 1
        self.calls[module_name] = k
        name = module_name if k == 1 else f"{module_name}#{k}"
        seen_before = self.known.get(name)
        out_shape = tuple(output.shape) if isinstance(output, Tensor) else ()
        if seen_before is not None and seen_before.shape[1:] == out_shape[1:] and out_shape:
            kind, map_size, prefix = seen_before.kind, seen_before.map_size, seen_before.prefix_tokens
        elif probability_rows(output):  # rule 4: kept through the second size's shape-only reclassification
            self.probabilities.add(name)
            kind, map_size, prefix = "nonspatial", None, 0
        else:
            kind, map_size, prefix = classify_output(output, module, self.batch, self.in_hw, self.prefix)
        same_as = None
        if isinstance(output, Tensor):
            seen = self._seen.get(id(output))
            if seen is not None and seen[2]() is output and seen[0] == output._version:
                same_as = seen[1]
            else:
                self._seen[id(output)] = (output._version, name, weakref.ref(output))
        shape = tuple(output.shape) if isinstance(output, Tensor) else ()
        layer = Layer(
            index=len(self.layers),
            name=name,
            module_name=module_name,
            type=type(module).__name__,
            kind=kind,
            shape=shape,
            params=self._param_count(module),
            map_size=map_size,
            prefix_tokens=prefix,
            same_as=same_as,
        )
        self.layers.append(layer)
        return layer


@contextlib.contextmanager
def model_errors(x: Tensor) -> Iterator[None]:
    """Turn a failure of the model's own forward pass on ``x`` into a :class:`ModelRunError` that says so.

    Errors camanim raises itself and running out of memory pass through unchanged.
    """
    try:
        yield
    except CamanimError:
        raise
    except (RuntimeError, ValueError, AssertionError, IndexError, TypeError, KeyError) as exc:
        if isinstance(exc, torch.OutOfMemoryError):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ModelRunError(
            f"the model's forward pass failed on an input of shape {tuple(x.shape)} ({type(exc).__name__}: "
            f"{first}); does it take this input size and number of channels?"
        ) from exc


_CACHE: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def list_layers(
    model: nn.Module, x: Tensor | Sequence[int] = (1, 3, 224, 224), *, cache: bool = True
) -> list[Layer]:
    """Enumerate every layer of ``model`` by a dry forward run, in execution order.

    Args:
        model: the network. Its training flags are not changed (the dry run uses eval mode and restores).
        x: an input tensor ``(B, 3, H, W)`` (a volume or clip: ``(B, C, D, H, W)``) or its shape; only its
            shape, dtype and device matter.
        cache: reuse the enumeration of an earlier call with the same model and input shape.

    Returns:
        All layers, each with its kind, output shape, parameter count and ``same_as`` mark.
    """
    return list(_dry_run(model, x, cache)[0])


def modified_in_place(
    model: nn.Module, x: Tensor | Sequence[int] = (1, 3, 224, 224)
) -> frozenset[str] | None:
    """Names of the layers whose output a later operation of the forward pass modifies in place.

    Found in the dry run of :func:`list_layers` (cached with it): each output's version counter is read
    when its hook fires and again after the forward pass. ``bn1`` of a torchvision ResNet block is one
    (its output goes through ``ReLU(inplace=True)``), as is the ``drop`` output of timm's
    ``BatchNormAct2d``. ``None`` when it could not be determined (inference tensors keep no versions).
    The capture copies only these outputs at hook time and holds plain references to the others.
    """
    return _dry_run(model, x, True)[1]


def _dry_run(
    model: nn.Module, x: Tensor | Sequence[int], cache: bool
) -> tuple[tuple[Layer, ...], frozenset[str] | None]:
    model = getattr(model, "_camanim_module", model)  # a camanim.models.OutputAdapter: its user's module
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if not isinstance(x, Tensor):
        x = torch.zeros(tuple(x), device=device)
    key = (tuple(x.shape), x.dtype, str(x.device))
    if cache and key in _CACHE.get(model, {}):
        return _CACHE[model][key]
    tracker = LayerTracker(model, x)
    handles = []
    modes = {m: m.training for m in model.modules()}
    outputs: list[tuple[str, Tensor, int]] = []
    untracked = False
    try:

        def hook(module: nn.Module, _inputs: tuple, output: object) -> None:
            nonlocal untracked
            layer = tracker.observe(module, output)  # a hook's return value would replace the output
            if isinstance(output, Tensor):
                if output.is_inference():  # inference tensors keep no version counter
                    untracked = True
                else:
                    outputs.append((layer.name, output, output._version))

        for m in tracker.names:
            handles.append(m.register_forward_hook(hook))
        model.eval()
        with torch.inference_mode(False), torch.no_grad(), model_errors(x):
            model(x.clone() if x.is_inference() else x)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    mutated = None if untracked else frozenset(name for name, t, version in outputs if t._version != version)
    outputs.clear()
    probes = _second_size(model, x, modes)
    layers = tuple(tracker.layers)
    if probes:
        layers = tuple(_reclassified(layer, tracker, probes.get(layer.name)) for layer in layers)
    entry = (layers, mutated)
    if cache:
        _CACHE.setdefault(model, {})[key] = entry
    return entry


def _second_size(model: nn.Module, x: Tensor, modes: dict[nn.Module, bool]) -> dict[str, Probe]:
    """Every layer's output shape at the second input size ``(H + PROBE_DH, W + PROBE_DW)`` (for a volume or
    clip ``(B, C, D, H, W)``: ``(D + PROBE_DD, H + PROBE_DH, W + PROBE_DW)``), by name; empty when the model
    does not take that size (a fixed position embedding, windows that must tile the input)."""
    hw2 = (x.shape[-2] + PROBE_DH, x.shape[-1] + PROBE_DW)
    if x.dim() == 5:
        hw2 = (x.shape[-3] + PROBE_DD, *hw2)
    x2 = torch.zeros((*x.shape[: -len(hw2)], *hw2), dtype=x.dtype, device=x.device)
    tracker = LayerTracker(model, x2)
    shapes: dict[str, Probe] = {}

    def hook(module: nn.Module, _inputs: tuple, output: object) -> None:
        layer = tracker.observe(module, output)
        shapes[layer.name] = (layer.shape, hw2)

    handles = [m.register_forward_hook(hook) for m in tracker.names]
    try:
        model.eval()
        with torch.inference_mode(False), torch.no_grad():
            model(x2)
    except Exception as exc:  # noqa: BLE001 - any failure only means the model keeps one input size
        size = "x".join(str(v) for v in hw2)
        logger.debug("the model does not take a %s input (%s); layer kinds from one size", size, exc)
        return {}
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return shapes


def _reclassified(layer: Layer, tracker: LayerTracker, other: Probe | None) -> Layer:
    if layer.name in tracker.probabilities:
        return layer
    kind, map_size, prefix = classify_shape(
        layer.shape, layer.type, tracker.batch, tracker.in_hw, tracker.prefix, other
    )
    return dataclasses.replace(layer, kind=kind, map_size=map_size, prefix_tokens=prefix)


def final_spatial_position(layers: Sequence[Layer]) -> int:
    """Position in ``layers`` of the last spatial one (the usual single-layer choice); the last position when
    none is spatial."""
    spatial = [i for i, layer in enumerate(layers) if layer.is_spatial]
    return spatial[-1] if spatial else len(layers) - 1


def default_layers(
    layers: Iterable[Layer], *, keep_nonspatial: bool = False, keep_duplicates: bool = False
) -> list[Layer]:
    """The layers a sweep covers by default: spatial kinds, without repeats of the same tensor."""
    return [
        layer
        for layer in layers
        if (layer.is_spatial or (keep_nonspatial and layer.map_size is not None))
        and (keep_duplicates or layer.same_as is None)
    ]


LayerSpec = str | int | Sequence[int | str] | Callable[[Layer], bool] | None


def split_spec(spec: str | Sequence[int | str]) -> list[int | str]:
    """The items of a layer selection: ``"first,3,layer4.*"`` -> ``["first", 3, "layer4.*"]``."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[int | str] = []
    for item in items:
        if isinstance(item, str):
            item = item.strip()
            if not item:
                continue
            if item.lstrip("-").isdigit():
                item = int(item)
        out.append(item)
    return out


def select_layers(
    layers: Sequence[Layer],
    spec: LayerSpec = "all",
    *,
    keep_nonspatial: bool = False,
    keep_duplicates: bool = False,
) -> list[Layer]:
    """Pick layers the way timm's ``feature_take_indices`` does, plus names and glob patterns.

    ``spec`` may be:

    * ``None`` or ``"all"``: every spatial layer (no repeats of the same tensor);
    * an ``int`` N: the last N of those;
    * ``"first"``, ``"middle"``, ``"last"``: the first, middle or last of those;
    * indices (``Layer.index`` as listed by ``camanim layers``; negative counts from the end of that list);
    * layer names or glob patterns (``layer4.*``, ``*conv2``);
    * a comma-separated string or a sequence mixing the above; or a predicate ``Layer -> bool``.

    Explicitly named or indexed layers are kept even when they repeat an earlier tensor.

    Returns:
        The chosen layers in execution order, without duplicates.

    Raises:
        LayerNotFoundError: a name or pattern matching nothing (lists close names).
        LayerSelectionError: an index out of range, or a non-spatial layer asked for by name.
    """
    pool = default_layers(layers, keep_nonspatial=keep_nonspatial, keep_duplicates=keep_duplicates)
    if callable(spec) and not isinstance(spec, str):
        picked = [layer for layer in layers if spec(layer)]
        if not picked:
            raise LayerSelectionError("the layer predicate chose no layer")
        return picked
    if spec is None:
        if not pool:
            raise LayerSelectionError("the model has no spatial layer to explain (see `camanim layers`)")
        return pool
    if isinstance(spec, int) and not isinstance(spec, bool):
        if spec < 1:
            raise LayerSelectionError(f"the number of last layers must be at least 1, got {spec}")
        if spec > len(pool):
            raise LayerSelectionError(
                f"asked for the last {spec} layers but the model has {len(pool)} spatial layers"
            )
        return pool[-spec:]
    chosen: dict[int, Layer] = {}
    by_name = {layer.name: layer for layer in layers}
    for item in split_spec(spec):
        if isinstance(item, int):
            n = len(layers)
            if not -n <= item < n:
                raise LayerSelectionError(
                    f"layer index {item} is out of range: valid indices are {-n}..{n - 1}"
                )
            picked = [layers[item]]
        elif item == "all":
            picked = pool
        elif item in ("first", "middle", "last"):
            if not pool:
                raise LayerSelectionError("the model has no spatial layer")
            picked = [pool[{"first": 0, "middle": (len(pool) - 1) // 2, "last": -1}[item]]]
        elif item in by_name:
            picked = [by_name[item]]
        elif any(ch in item for ch in "*?["):
            picked = [layer for layer in layers if fnmatch.fnmatchcase(layer.name, item)]
            picked = [layer for layer in picked if layer.is_spatial or keep_nonspatial]
            if not picked:
                raise LayerNotFoundError(item, by_name, "the pattern matches no spatial layer")
        else:
            raise LayerNotFoundError(item, by_name, "see `camanim layers`")
        for layer in picked:
            if not layer.is_spatial and not keep_nonspatial:
                raise LayerSelectionError(
                    f"layer {layer.name!r} is non-spatial (output shape {list(layer.shape)}): it has no map"
                )
            chosen[layer.index] = layer
    if not chosen:
        raise LayerSelectionError(
            f"the layer selection {spec!r} chose no layer: give all, last, first,middle,last, N (the last N), "
            "indices, names or glob patterns (see `camanim layers`)"
        )
    return [chosen[i] for i in sorted(chosen)]
