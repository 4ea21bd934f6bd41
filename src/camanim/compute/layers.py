"""Layers: what a network's forward pass produces, in execution order, and how to pick among them.

A *layer* is one module call. Layers are listed in the order their forward hooks fire (a module's hook
fires when its forward returns, so a block comes after its children), never in ``named_modules()`` order.
A module called more than once in a forward (torchvision's ResNet reuses each block's ``relu``) gives one
layer per call: the first call is named after the module (``layer1.0.relu``), the k-th call for k >= 2 gets
a ``#k`` suffix (``layer1.0.relu#2``, ``layer1.0.relu#3``).

Each layer has a *kind*, decided from its output:

* ``spatial``: ``(B, C, H, W)`` with ``H * W > 1``;
* ``channels_last``: ``(B, H, W, C)`` (ConvNeXt, Swin and MaxViT blocks), permuted to ``(B, C, H, W)``;
* ``token``: ``(B, N, C)`` whose last ``N - P`` tokens form a square grid after ``P`` prefix
  (class/distillation/register) tokens (ViT, DeiT), reshaped to ``(B, C, g, g)``;
* ``nonspatial``: anything else (``(B, C)`` vectors, 1x1 maps, windowed tensors whose batch axis is not the
  input's, tuples). These are listed but left out of sweeps: their maps carry no spatial information and
  only render as flat frames or stripes (CAManim, Fig 7). Vectors and 1x1 maps can still be kept on
  request (``keep_nonspatial``): they are read as ``(B, C, 1, 1)`` and give a 1x1 map.

A layer whose output is the very same tensor, unmodified, as an earlier layer's (a container returning its
last child's output, an ``Identity``) records the earlier layer's name in ``same_as``; sweeps skip it unless
asked, so the same map is not shown twice.
"""

from __future__ import annotations

import contextlib
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

SPATIAL_KINDS = ("spatial", "channels_last", "token")
_CHANNELS_LAST_TYPES = ("LayerNorm", "Linear", "Mlp", "LayerScale", "GlobalResponseNorm")


@dataclass(frozen=True)
class Layer:
    """One module call in a forward pass.

    Attributes:
        index: position in the execution-ordered list of all layers (0-based).
        name: unique name: the qualified module name, ``#k`` appended for the k-th call (k >= 2).
        module_name: qualified module name (shared by all calls of a reused module).
        type: the module's class name.
        kind: ``spatial``, ``channels_last``, ``token`` or ``nonspatial``.
        shape: output shape including the batch axis (empty when the output is not a tensor).
        params: number of parameters of the module, its children included.
        map_size: ``(h, w)`` of the layer's map: ``(1, 1)`` for vectors and 1x1 maps, ``None`` for outputs
            that cannot be read as a map (tuples, windowed tensors).
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
    map_size: tuple[int, int] | None
    prefix_tokens: int = 0
    same_as: str | None = None

    @property
    def is_spatial(self) -> bool:
        """Whether the layer yields a 2-D map (any kind but ``nonspatial``)."""
        return self.kind in SPATIAL_KINDS

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


def _fits_grid(h: int, w: int, in_h: int, in_w: int) -> bool:
    """Whether an ``h x w`` grid is a plausible down-sampling of an ``in_h x in_w`` input."""
    if h < 1 or w < 1 or h > in_h or w > in_w:
        return False
    # Convolutions round sizes up (ceil(in / stride)), so the two strides agree up to that rounding.
    return abs(in_h / h - in_w / w) <= 0.05 * max(in_h / h, in_w / w) + 1e-9


def classify_output(
    output: object, module: nn.Module, batch: int, in_hw: tuple[int, int], prefix_tokens: int | None = None
) -> tuple[str, tuple[int, int] | None, int]:
    """Decide a layer's kind from its output.

    Args:
        output: what the module returned.
        module: the module (its type breaks ties between ``(B, C, H, W)`` and ``(B, H, W, C)``).
        batch: the input's batch size ``B``.
        in_hw: the input's ``(H, W)`` in pixels.
        prefix_tokens: the model's number of prefix tokens when known (timm's ``num_prefix_tokens``).

    Returns:
        ``(kind, map_size, prefix_tokens)``.
    """
    if not isinstance(output, Tensor) or output.dim() < 2 or output.shape[0] != batch:
        return "nonspatial", None, 0
    if output.dim() == 2:
        return "nonspatial", (1, 1), 0
    in_h, in_w = in_hw
    if output.dim() == 4:
        _, a, b, c = output.shape
        first = _fits_grid(b, c, in_h, in_w)
        last = _fits_grid(a, b, in_h, in_w)
        if last and (not first or type(module).__name__ in _CHANNELS_LAST_TYPES):
            return ("channels_last", (a, b), 0) if a * b > 1 else ("nonspatial", None, 0)
        if first:
            return ("spatial", (b, c), 0) if b * c > 1 else ("nonspatial", (1, 1), 0)
        return "nonspatial", None, 0
    if output.dim() == 3:
        n = output.shape[1]
        candidates = [prefix_tokens] if prefix_tokens is not None else range(0, 9)
        for p in candidates:
            g = math.isqrt(max(n - p, 0))
            if g > 1 and g * g == n - p and _fits_grid(g, g, in_h, in_w):
                return "token", (g, g), p
    return "nonspatial", None, 0


def as_bchw(t: Tensor, layer: Layer) -> Tensor:
    """Reshape a layer's output (or its gradient) to ``(B, C, h, w)`` by the layer's kind (a view if possible)."""
    if layer.kind == "spatial":
        return t
    if layer.kind == "channels_last":
        return t.permute(0, 3, 1, 2)
    if layer.kind == "token":
        h, w = layer.map_size
        grid = t[:, layer.prefix_tokens :, :]
        return grid.reshape(t.shape[0], h, w, t.shape[-1]).permute(0, 3, 1, 2)
    if layer.map_size == (1, 1):  # a vector (B, C) or a 1x1 map, read as (B, C, 1, 1)
        return t.reshape(t.shape[0], t.shape[1], 1, 1)
    raise LayerSelectionError(
        f"layer {layer.name!r} is non-spatial (output shape {list(layer.shape)}) and has no map"
    )


class LayerTracker:
    """Names and classifies module calls as forward hooks fire; shared by the dry run and the capture.

    One tracker serves one forward pass. ``observe`` returns the :class:`Layer` of a call.
    """

    def __init__(self, model: nn.Module, x: Tensor) -> None:
        self.names = {m: n for n, m in model.named_modules() if n}
        self.batch = x.shape[0]
        self.in_hw = (x.shape[-2], x.shape[-1])
        self.prefix = getattr(model, "num_prefix_tokens", None)
        self.prefix = self.prefix if isinstance(self.prefix, int) else None
        self.calls: dict[str, int] = {}
        self.layers: list[Layer] = []
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
        x: an input tensor ``(B, 3, H, W)`` or its shape; only its shape, dtype and device matter.
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
    entry = (tuple(tracker.layers), mutated)
    if cache:
        _CACHE.setdefault(model, {})[key] = entry
    return entry


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


def _split(spec: str | Sequence[int | str]) -> list[int | str]:
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
    for item in _split(spec):
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
