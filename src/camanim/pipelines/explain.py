"""The pipeline: model + image + layers -> one capture -> every method's raw map at every chosen layer.

Example:
    >>> import camanim
    >>> ex = camanim.explain(image="chelsea", methods="gradcam,hirescam", layers="last")  # doctest: +SKIP
    >>> ex.target_names  # doctest: +SKIP
    ('Egyptian cat',)
    >>> ex.raw("gradcam", ex.chosen[-1].name).shape  # doctest: +SKIP
    torch.Size([1, 7, 7])
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from camanim.compute import volumes
from camanim.compute.capture import capture, frozen_eval
from camanim.compute.images import LoadedImage, load_image
from camanim.compute.layers import (
    Layer,
    LayerSpec,
    as_map,
    default_layers,
    list_layers,
    model_errors,
    select_layers,
    split_spec,
)
from camanim.compute.methods import get_method, list_methods, method_class, parse_methods
from camanim.compute.methods.base import LayerTensors, compute_maps, rounding_noise
from camanim.compute.methods.passes import PassContext, run_multi_pass
from camanim.compute.methods.perturbation import run_per_channel
from camanim.compute.models import (
    DEFAULT_MODEL,
    InputSize,
    LoadedModel,
    OutputSpec,
    Preprocessing,
    class_names_for,
    load_model,
    parse_input_size,
    wrap_model,
)
from camanim.compute.resize import resize_maps
from camanim.compute.targets import TARGET_KINDS, resolve_class
from camanim.compute.tasks import StackedTarget
from camanim.compute.volume_maps import as_volume_batch, is_volume_array, volume_display
from camanim.errors import (
    ImageError,
    LayerNotFoundError,
    LayerSelectionError,
    OptionError,
    TargetError,
    UnknownNameError,
)

logger = logging.getLogger(__name__)

FLAT_RTOL = 1e-6
#: ``"last"`` is the last of this many final spatial layers whose gradient is not zero everywhere.
LAST_CANDIDATES = 16
NO_GRADIENT = "no path leads from it to the target: every gradient map is blank (a detector's proposal head)"
ZERO_GRADIENT = (
    "its gradient is zero at every position, so every gradient map is blank: the output depends on it only "
    "through positions that are not part of its map (a ViT's final norm reaches the head only through the "
    "class token)"
)


@dataclass(frozen=True)
class Explanation:
    """Raw maps of every chosen method at every chosen layer, from one capture.

    Writing (``save``) and notebook display are attached by :mod:`camanim.outputs` (see
    :func:`camanim.outputs.explanation.save_explanation`).

    Attributes:
        model_name: the model's name; ``weights`` where its weights came from.
        preprocessing: how the image became ``input`` (a :class:`~camanim.models.Preprocessing`).
        input: the exact tensor given to the model, ``(B, 3, H, W)`` float32 on the CPU; for a volume or clip
            ``(B, C, D, H, W)``.
        display: the resized picture the model saw, ``(B, H, W, 3)`` uint8, for overlays; for a volume the
            volume itself, ``(B, D, H, W, 3)`` uint8 (grey, or a clip's colours: see
            :func:`camanim.compute.volume_maps.volume_display`).
        probabilities: softmax of the model output, ``(B, K)``.
        targets: the explained class per sample (per row: with ``top_k`` or ``K`` task targets the rows are the
            ``K`` targets of the one image); ``target_names`` their names.
        class_names: names of all ``K`` classes.
        layers: every layer of the forward pass, in execution order.
        chosen: the layers explained, in execution order.
        methods: method names, in the order asked.
        maps: ``maps[method][layer name]`` is the raw map ``(B, h, w)`` float32 on the CPU, at feature-map
            resolution, before ReLU and before any normalisation; ``(B, d, h, w)`` at a volume layer. With
            ``top_k`` classes or ``K`` task targets of one image, ``B`` is ``K``: row ``k`` is target ``k``'s.
        flags: ``flags[method][layer name]`` lists conditions of that map: ``"flat"`` (constant, including
            all zero), ``"zero"`` (all zero), ``"no_gradient"`` (no path from the layer to the target),
            ``"zero_gradient"`` (a path, but the gradient is zero at every position), ``"cancelled"`` (a sum of
            signed terms below the rounding level of its terms, zero by invariance before a LayerNorm:
            shown as zero; :func:`camanim.compute.methods.base.rounding_noise`), ``"nonfinite"`` (NaN/inf
            replaced by 0).
        image_info: where the image came from (source, original size and mode, conversions); for a volume,
            ``image_info["volume"]`` holds its ``spacing`` (mm, ``(z, y, x)``; None when unknown) and ``shape``.
        timings: seconds per stage.
        logits: the raw model output ``(B, K)`` on the CPU (None for an explanation read back from a bundle).
        output: how the class scores ``(B, K)`` were read from what the network returned.
        task: what was explained (the manifest's ``target``): ``{"kind": "classification", ...}``, or a task
            target's description (segmentation, detection, embedding, multi-label, regression, custom). For
            a task other than classification, ``probabilities`` holds each row's target score ``(B, 1)``,
            ``targets`` is 0 for every row, ``class_names`` the task's label and ``target_names`` each row's
            (for ``K`` targets, the target's :attr:`~camanim.compute.tasks.TaskTarget.target_labels`).
        regions: the region a segmentation score is taken over, ``(B, h, w)`` bool at the output's
            resolution (one per row); None for other tasks.
        boxes: per row, the detections explained, ``(x1, y1, x2, y2, label)`` in input pixels; or None.
        method_options: the methods' options as asked (``seed``, ``eigen_smooth``, ``aug_smooth``, ``options``),
            recorded so a run can be repeated; empty for an explanation read back from an older bundle.
        extras: what a method computes beside its maps, by method (e.g. Deep Feature Factorization's concepts
            per layer, FullGrad's input term and single full map): see each method's ``extras``.
        passed_over: layers a sweep or ``"last"`` would have ended with but left out, with the reason: the
            trailing layers whose gradient is zero at every position, whose maps can only be blank (a ViT's
            final norm reaches the head only through the class token); see :data:`LAST_CANDIDATES`.
    """

    model_name: str
    weights: str
    preprocessing: Any
    input: Tensor
    display: np.ndarray
    probabilities: Tensor
    targets: tuple[int, ...]
    target_names: tuple[str, ...]
    class_names: tuple[str, ...] = field(repr=False)
    layers: tuple[Layer, ...] = field(repr=False)
    chosen: tuple[Layer, ...] = field(repr=False)
    methods: tuple[str, ...] = ()
    maps: dict[str, dict[str, Tensor]] = field(default_factory=dict, repr=False)
    flags: dict[str, dict[str, tuple[str, ...]]] = field(default_factory=dict, repr=False)
    image_info: dict = field(default_factory=dict, repr=False)
    timings: dict[str, float] = field(default_factory=dict)
    logits: Tensor | None = field(default=None, repr=False)
    output: str = "the output itself"
    passed_over: tuple[tuple[Layer, str], ...] = field(default=(), repr=False)
    task: dict = field(default_factory=lambda: {"kind": "classification"}, repr=False)
    regions: Tensor | None = field(default=None, repr=False)
    boxes: list | None = field(default=None, repr=False)
    extras: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    method_options: dict[str, Any] = field(default_factory=dict, repr=False)

    def layer(self, name: str) -> Layer:
        """The chosen layer called ``name``."""
        for layer in self.chosen:
            if layer.name == name:
                return layer
        raise LayerNotFoundError(
            name, [layer.name for layer in self.chosen], "not among the explained layers"
        )

    @property
    def is_volume(self) -> bool:
        """Whether the input is a volume or clip ``(B, C, D, H, W)`` (its maps are ``(B, d, h, w)``)."""
        return self.input.dim() == 5

    @property
    def grid(self) -> tuple[int, ...]:
        """The input's grid: ``(H, W)`` in pixels, or ``(D, H, W)`` in voxels (frames) for a volume."""
        return tuple(int(v) for v in self.input.shape[2:])

    def raw(self, method: str, layer: str) -> Tensor:
        """The raw map ``(B, h, w)`` (``(B, d, h, w)`` at a volume layer) of ``method`` at ``layer``."""
        return self.maps[method][layer]

    def upsampled(
        self, method: str, layer: str, *, relu: bool = True, size: tuple[int, ...] | None = None
    ) -> Tensor:
        """The map after the method's ReLU, bilinearly upsampled to the input size: ``(B, H, W)``, unnormalised;
        for a volume trilinearly to ``(B, D, H, W)`` (:func:`camanim.compute.resize.resize_maps`)."""
        m = self.maps[method][layer]
        if relu and get_method(method).relu:
            m = m.clamp_min(0)
        return resize_maps(m, size or self.grid)

    def top(self, k: int = 5, sample: int = 0) -> list[tuple[int, str, float]]:
        """The ``k`` most probable classes of ``sample`` as ``(index, name, probability)``."""
        p, i = self.probabilities[sample].topk(min(k, self.probabilities.shape[1]))
        return [(int(c), self.class_names[int(c)], float(v)) for v, c in zip(p, i, strict=True)]


def map_flags(m: Tensor, lo: float | None = None, hi: float | None = None) -> list[str]:
    """Conditions of a raw map ``(B, h, w)`` worth telling a user (see :class:`Explanation`); the map must
    be finite. ``lo`` and ``hi``, its minimum and maximum, are computed when not given."""
    flags = []
    if lo is None or hi is None:
        lo, hi = (float(v) for v in torch.aminmax(m))
    scale = max(abs(lo), abs(hi))
    if hi - lo <= FLAT_RTOL * scale or scale == 0:
        flags.append("flat")
    if scale == 0:
        flags.append("zero")
    return flags


def as_loaded(
    model: LoadedModel | nn.Module | str, device: str | torch.device | None, output: OutputSpec = None
) -> LoadedModel:
    """A :class:`LoadedModel` for a model, module or name; ``output`` (if given) replaces its output selector."""
    if isinstance(model, LoadedModel):
        lm = model if output is None else model.with_output(output)
    elif isinstance(model, nn.Module):
        lm = wrap_model(model, output=output)
    else:
        lm = load_model(model, device=device or "cpu", output=output)
    if device is not None and lm.device != torch.device(device):
        lm.model.to(device)
    return lm


def prepare_input(
    image: Any, lm: LoadedModel, input_size: InputSize = None
) -> tuple[Tensor, np.ndarray, dict]:
    """Turn an image source into ``(input (B, 3, H, W), display (B, H, W, 3) uint8, image info)``.

    ``image`` is a tensor already preprocessed (``(3, H, W)`` or ``(B, 3, H, W)``), or anything
    :func:`camanim.images.load_image` accepts (path, URL, sample name, PIL image, array), or a list of those.
    ``input_size`` (images only) overrides the model's input size: ``N``, ``(H, W)``, ``"HxW"`` or
    ``"native"`` (the image's own size, no resizing: the CAManim paper's advice for images where detail
    matters, such as medical ones); the info records it, and the preprocessing used under
    ``"preprocessing"``. Volumes and clips go through :func:`prepare_volume`.
    """
    volume = prepare_volume(image, lm, input_size)
    if volume is not None:
        return volume
    prep = lm.preprocessing
    if isinstance(image, Tensor):
        if parse_input_size(input_size) is not None:
            raise OptionError("input_size resizes images; a preprocessed tensor is used at its own size")
        x = image[None] if image.dim() == 3 else image
        if x.dim() != 4:
            raise ImageError(f"an input tensor must be (C, H, W) or (B, C, H, W), got {list(image.shape)}")
        x = x.detach().float().cpu()
        if x.shape[1] == 3:
            pixels = prep.denormalize(x).clamp(0, 1)
        else:  # not an RGB model input: show the channel mean, min-max scaled
            grey = x.mean(dim=1, keepdim=True)
            lo = grey.amin(dim=(2, 3), keepdim=True)
            pixels = ((grey - lo) / (grey.amax(dim=(2, 3), keepdim=True) - lo).clamp_min(1e-12)).expand(
                -1, 3, -1, -1
            )
        display = (pixels.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)
        return x, display, {"source": "tensor", "shape": list(x.shape)}
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    tensors, displays, infos = [], [], []
    for item in items:
        loaded = item if isinstance(item, LoadedImage) else load_image(item)
        pil: Image.Image = loaded.image
        if not tensors:  # the first image sets the native size of the batch
            prep = lm.preprocessing.sized(input_size, (pil.height, pil.width))
        tensors.append(prep(pil))
        displays.append(np.asarray(prep.resize_image(pil.convert("RGB")), dtype=np.uint8))
        infos.append(
            {
                "source": str(loaded.source),
                "original_size": list(loaded.original_size),
                "original_mode": loaded.original_mode,
                "notes": list(loaded.notes),
            }
        )
    info = infos[0] if len(infos) == 1 else {"images": infos}
    info["input_size"] = _size_label(input_size, prep)
    info["preprocessing"] = prep.to_dict()
    return torch.stack(tensors), np.stack(displays), info


def prepare_volume(
    image: Any, lm: LoadedModel, input_size: InputSize = None
) -> tuple[Tensor, np.ndarray, dict] | None:
    """``(input (B, C, D, H, W), display (B, D, H, W, 3) uint8, image info)`` when ``image`` is a volume or a
    clip, else None (a picture, for :func:`prepare_input`).

    A volume is a tensor ``(B, C, D, H, W)`` used as it is (already preprocessed); a NumPy array ``(C, D, H,
    W)``, or ``(D, H, W)`` (see :func:`~camanim.compute.volume_maps.is_volume_array`), given to the model as
    float32 values; or a :class:`~camanim.compute.volumes.LoadedVolume`, made into the model's input by
    :func:`~camanim.compute.volumes.volume_tensor` at its own grid (windowed or scaled to ``[0, 1]``; with the
    channels of a volume model named by :func:`~camanim.compute.models.load_model`, and a video model's mean
    and standard deviation for a clip) and shown by :func:`~camanim.compute.volumes.volume_display`.
    ``image_info["volume"]`` records the spacing (mm, ``(z, y, x)``; None when unknown) and the grid.
    """
    prep = lm.preprocessing
    # a volume or video model by name: its channels and normalisation are known
    named = prep.depth is not None
    if isinstance(image, volumes.LoadedVolume):
        video = named and image.is_video and len(prep.mean) == 3
        x = volumes.volume_tensor(
            image,
            None,
            len(prep.mean) if named else None,
            mean=prep.mean if video else None,
            std=prep.std if video else None,
        )
        display = volumes.volume_display(image, None)[None]
        info = image.describe()
        spacing: list[float] | None = [float(v) for v in image.spacing]
    elif isinstance(image, Tensor) and image.dim() == 5:
        x = image.detach().float().cpu()
        display, info, spacing = volume_display(x, prep.mean, prep.std), {"source": "tensor"}, None
    elif isinstance(image, np.ndarray) and is_volume_array(image, named):
        x = as_volume_batch(image)
        display, info, spacing = volume_display(x), {"source": "array"}, None
    else:
        return None
    if input_size is not None:
        raise OptionError("input_size resizes pictures; a volume is used at its own grid (D, H, W)")
    info["shape"] = list(x.shape)
    info["volume"] = {"spacing": spacing, "shape": list(x.shape[2:])}
    return x, display, info


def _size_label(input_size: InputSize, prep: Preprocessing) -> str:
    spec = parse_input_size(input_size)
    h, w = prep.size
    return f"{h}x{w}" + (" (native)" if spec == "native" else " (the model's)" if spec is None else "")


def _target_specs(target: Any, b: int) -> list[int | str]:
    """One class spec (index or name) per sample of a batch of ``b`` from a given target (list, "a,b")."""
    if isinstance(target, (list, tuple)):
        if len(target) != b:
            raise TargetError(f"{len(target)} targets given for a batch of {b} images")
        return list(target)
    if isinstance(target, str) and "," in target:
        return _target_specs(target.split(","), b)
    return [target] * b


def _resolve_targets(
    target: Any, b: int, class_names: Sequence[str], num_classes: int | None = None
) -> list[int]:
    """One class index per sample of a batch of ``b`` from a given target (index, name, list, "a,b"), each
    below ``num_classes`` (the size ``K`` of the model output; default ``len(class_names)``)."""
    return [resolve_class(t, class_names, num_classes) for t in _target_specs(target, b)]


def explain(
    model: LoadedModel | nn.Module | str = DEFAULT_MODEL,
    image: Any = "chelsea",
    *,
    methods: str | Sequence[str] = "gradcam",
    layers: LayerSpec = "all",
    target: int | str | Sequence[int | str] | None = None,
    top_k: int | None = None,
    score: str = "logit",
    keep_nonspatial: bool = False,
    keep_duplicates: bool = False,
    device: str | torch.device | None = None,
    seed: int = 0,
    batch_size: int = 32,
    max_channels: int | None = None,
    compile: bool = False,
    output: OutputSpec = None,
    input_size: InputSize = None,
    eigen_smooth: bool = False,
    aug_smooth: bool = False,
    options: Mapping[str, Any] | None = None,
) -> Explanation:
    """Compute every method's raw map at every chosen layer from one forward and one backward pass.

    Per-channel methods (Score-CAM, Ablation-CAM) and multi-pass methods (ShapleyCAM, FinerCAM, guided
    backpropagation...; never part of ``"all"``) run after that capture, for every chosen layer at once,
    with the extra passes they need (see :mod:`camanim.compute.methods.perturbation` and
    :mod:`camanim.compute.methods.passes`); what they cost is logged before they run.

    Args:
        model: a :class:`~camanim.models.LoadedModel`, a plain ``nn.Module`` (ImageNet preprocessing
            assumed unless the input is a tensor) or a model name for :func:`~camanim.models.load_model`.
        image: a preprocessed tensor ``(B, 3, H, W)``, or an image source (path, URL, sample name, PIL
            image, array) or a list of sources forming a batch.
        methods: names (``"gradcam,hirescam"``), ``"all"`` or a list; see :func:`camanim.list_methods`.
        layers: a selection (see :func:`camanim.layers.select_layers`); default every spatial layer.
        target: the class to explain: an index, a name, or one per sample; default the top-1 class. Or any
            callable from the model's output to one score per sample ``(B,)``: a task target of
            :mod:`camanim.compute.tasks` (segmentation, detection, embedding similarity, multi-label,
            regression), which also says how to read the model's output, or one of your own, which sees
            the output after the model's output selector (``output``). A callable giving ``K`` scores per
            sample ``(B, K)`` (a task target with ``each=True``, ``MultiLabelTarget(top_k=K)``), or a list of
            callables (stacked by :class:`~camanim.compute.tasks.StackedTarget`), makes ``K`` targets of one
            image: one forward pass, one backward pass each, the rows of every map the ``K`` targets (as
            ``top_k``), named by ``target_names``.
        top_k: explain each of the top ``k`` classes of a single image (the batch axis then holds classes):
            the classes share the capture's forward, which ranks them, and get one backward pass each.
        score: what is differentiated: ``"logit"`` (default), ``"probability"`` or ``"sigmoid"``.
        keep_nonspatial: include 1x1 layers in an ``"all"`` sweep.
        keep_duplicates: include layers whose output repeats an earlier layer's tensor.
        device: move the model there first (``"cpu"``, ``"cuda"``).
        seed: seed of seeded methods (RandomCAM).
        batch_size: inputs per extra forward of a per-channel method.
        max_channels: per-channel methods score at most this many channels per layer (an approximation).
        compile: run Score-CAM's forwards through ``torch.compile`` (see :mod:`camanim.methods.perturbation`).
        output: how to read the class scores ``(B, K)`` from what the model returns (a key, an index or a
            callable; default: the tensor itself, else ``logits``, ``out`` or the first ``(B, K)`` tensor).
        input_size: the images' input size instead of the model's: ``N``, ``(H, W)``, ``"HxW"`` or
            ``"native"`` (the image's own size; see :func:`prepare_input`).
        eigen_smooth: every method's map is the first principal component of its weighted activations (the
            terms its channel sum adds up) instead of their sum, as grad-cam's ``eigen_smooth``
            (:meth:`~camanim.compute.methods.base.CAMMethod.weighted_terms`).
        aug_smooth: average every map over the six test-time augmentations of grad-cam's ``aug_smooth``
            (horizontal flip, intensity x0.9, x1, x1.1), flipped back at the layer's resolution; all six
            go through one capture as one batch (see :data:`AUGMENTATIONS`).
        options: options of methods that take them, by name (``alpha`` and ``comparison`` of FinerCAM,
            ``samples`` and ``noise`` of the sampling methods...; see each method's docstring).

    Returns:
        An :class:`Explanation` with raw maps on the CPU.
    """
    if aug_smooth:
        return _aug_smoothed(
            model, image, device=device, output=output, input_size=input_size, target=target, top_k=top_k,
            score=score, methods=methods, layers=layers, keep_nonspatial=keep_nonspatial,
            keep_duplicates=keep_duplicates, seed=seed, batch_size=batch_size, max_channels=max_channels,
            compile=compile, eigen_smooth=eigen_smooth, options=options,
        )  # fmt: skip
    t0 = time.perf_counter()
    lm = as_loaded(model, device, output)
    net = lm.model
    dev = lm.device
    if top_k is not None and target is not None:
        raise OptionError("top_k explains the K most probable classes and target one class: give one of them")
    if _is_task_list(target):
        target = StackedTarget(target)
    task = target if _is_task(target) else None
    if task is not None and hasattr(task, "expect"):
        lm = lm.with_output(
            getattr(task, "output", None) or output, task.expect, getattr(lm.model, "tap", None)
        )
        net = lm.model
    names = parse_methods(methods)
    per_channel = {n: get_method(n, seed=seed) for n in names if method_class(n).cost == "per_channel"}
    multi = {n: get_method(n, seed=seed) for n in names if method_class(n).cost == "multi_pass"}
    instances = {n: get_method(n, seed=seed) for n in names if n not in per_channel and n not in multi}
    bases = {b: get_method(b, seed=seed) for m in multi.values() for b in m.bases if b not in instances}
    if score not in TARGET_KINDS:
        raise UnknownNameError("score", score, TARGET_KINDS)
    x, display, image_info = prepare_input(image, lm, input_size)
    if x.dim() == 5:
        _check_volume_methods(names, bases)
    x = x.to(dev)
    preprocessing = Preprocessing(**_tuples(image_info.pop("preprocessing", lm.preprocessing.to_dict())))
    timings = {"load": time.perf_counter() - t0}

    t = time.perf_counter()
    last_pool: list[str] = []  # the candidates of "last", beyond what was asked
    if layers in (None, "all") and not callable(layers):
        allowed = None
    else:
        table = list_layers(net, x[:1])
        allowed = {
            layer.name
            for layer in select_layers(
                table, layers, keep_nonspatial=keep_nonspatial, keep_duplicates=keep_duplicates
            )
        }
        if isinstance(layers, (str, list, tuple)) and "last" in split_spec(layers):
            pool = default_layers(table, keep_nonspatial=keep_nonspatial, keep_duplicates=keep_duplicates)
            last_pool = [layer.name for layer in pool[-LAST_CANDIDATES:]]
    asked = None if allowed is None else set(allowed)
    if allowed is not None:
        allowed |= set(last_pool)

    def want(layer: Layer) -> bool:
        if allowed is not None:
            return layer.name in allowed
        return (keep_duplicates or layer.same_as is None) and (keep_nonspatial or layer.is_spatial)

    passes = 1
    specs = None  # the given target per sample (index or name)
    if top_k is not None:
        # The K classes share the capture's forward, which also ranks them; one backward pass per class.
        if x.shape[0] != 1:
            raise TargetError(f"--top-k explains several classes of one image; got a batch of {x.shape[0]}")
        if top_k < 1:
            raise TargetError(f"top-k must be at least 1, got {top_k}")
        classes = None
        passes = top_k
        display = np.repeat(display, passes, axis=0)
    elif task is not None:
        classes = None
    elif target is not None:
        classes = None  # resolved against the size K of the capture's own output, the class count
        specs = _target_specs(target, x.shape[0])
    else:
        classes = None  # the top-1 class, read from the capture's own forward
    timings["layers"] = time.perf_counter() - t

    # parts[method][layer][k]: the map of backward pass k (one pass per class with top_k, else one).
    parts: dict[str, dict[str, list]] = {n: {} for n in names}
    flags: dict[str, dict[str, tuple[str, ...]]] = {n: {} for n in names}
    need_grads = any(m.needs_gradients for m in (*instances.values(), *bases.values()))
    class_free = {n: m for n, m in instances.items() if not m.needs_gradients}
    with_grads = {n: m for n, m in instances.items() if m.needs_gradients}

    kept: dict[str, Tensor] = {}  # per-chosen-layer values, for per-channel and multi-pass methods
    keep_values = bool(per_channel) or any(m.needs_values for m in multi.values())
    base_parts: dict[str, dict[str, list]] = {b: {} for b in bases}
    zero_grad: dict[str, bool] = {}  # per layer: the gradient was zero everywhere, in every pass
    no_grad: set[str] = set()  # layers no gradient reached
    cancelled: dict[str, set[str]] = {n: set() for n in names}

    def consumer(layer: Layer, value: Tensor, grad: Tensor | None, k: int) -> None:
        if keep_values and k == 0:
            kept[layer.name] = value
        if grad is not None:
            zero_grad[layer.name] = zero_grad.get(layer.name, True) and not bool(grad.any())
        elif need_grads:
            no_grad.add(layer.name)
        # Gradient-free maps do not depend on the pass: computed at the first and repeated.
        todo = instances if k == 0 else with_grads
        tensors = LayerTensors(value, grad, layer.name, options)
        computed = compute_maps(todo, tensors, eigen_smooth=eigen_smooth)
        if bases and grad is not None:
            for b, m in compute_maps(bases, tensors, eigen_smooth=eigen_smooth).items():
                _put(base_parts[b].setdefault(layer.name, []), k, m.detach())
        for n, noise in rounding_noise(todo, tensors, computed).items():
            computed[n] = computed[n].masked_fill(noise[:, None, None], 0.0)
            cancelled[n].add(layer.name)
        for n in instances:
            per_pass = parts[n].setdefault(layer.name, [])
            if n in class_free and k > 0:
                _put(per_pass, k, per_pass[0])
                continue
            m = computed.get(n)
            if m is None:  # a gradient method at a layer the gradient never reached
                blank = torch.zeros(value.shape[0], *value.shape[2:], device=value.device)
                _put(per_pass, k, as_map(blank, layer))
                flags[n][layer.name] = ("no_gradient", "flat", "zero")
                continue
            # NaN/inf are replaced (and flagged) on the way to the CPU
            _put(per_pass, k, as_map(m.detach(), layer))
            flags[n].setdefault(layer.name, ())

    lazy_target = task or _LazyTarget(classes, score, top_k=top_k, specs=specs, names=lambda: lm.class_names)
    t = time.perf_counter()
    checked = lazy_target if task is None else _OneImageIfSeveral(task)
    result = capture(net, x, checked, want, consumer=consumer, gradients=need_grads)
    timings["capture"] = time.perf_counter() - t
    if task is not None and result.scores.dim() == 2 and result.scores.shape[1] > 1:
        # K task targets of one image: one backward pass each; the batch axis holds the targets from here on
        passes = result.scores.shape[1]
        display = np.repeat(display, passes, axis=0)
    if not result.chosen:
        raise LayerSelectionError(
            f"no layer of {lm.name} has a map to explain (no spatial layer was produced; see `camanim layers`)"
        )
    # a layer is blank for every method only when every map here needs the gradient
    blank: dict[str, str] = {}  # layers whose every map is blank, and why
    if need_grads and not class_free and not per_channel and not multi:
        blank = {n: ZERO_GRADIENT for n, zero in zero_grad.items() if zero} | {
            n: NO_GRADIENT for n in no_grad
        }
    chosen, passed_over = _pass_over_blank_ends(list(result.chosen), asked, last_pool, blank)
    maps: dict[str, dict[str, Tensor]] = {
        n: {name: p[0] if passes == 1 else torch.cat(p) for name, p in parts[n].items()} for n in names
    }
    parts.clear()
    output = result.output
    if passes > 1:  # the batch axis holds the classes from here on
        x = x.expand(passes, *x.shape[1:]).contiguous()
        output = output.expand(passes, *output.shape[1:]) if isinstance(output, Tensor) else output
        kept = {name: v.expand(passes, *v.shape[1:]) for name, v in kept.items()}
    if per_channel:
        t = time.perf_counter()
        target_obj = TARGET_KINDS[score](tuple(lazy_target.classes))
        done = run_per_channel(
            per_channel,
            net,
            x,
            chosen,
            kept,
            target_obj,
            batch_size=batch_size,
            max_channels=max_channels,
            compile=compile,
        )
        for n, per_layer in done.items():
            maps[n].update(per_layer)
            flags[n].update({k: () for k in per_layer})
        timings["per_channel"] = time.perf_counter() - t
    extras: dict[str, dict[str, Any]] = {}
    if multi:
        t = time.perf_counter()
        ctx = PassContext(
            model=net,
            x=x,
            layers=chosen,
            classes=tuple(lazy_target.classes),
            score=score,
            seed=seed,
            batch_size=batch_size,
            options=({} if max_channels is None else {"max_channels": max_channels}) | dict(options or {}),
            values=kept,
            base_maps={
                b: {name: p[0] if passes == 1 else torch.cat(p) for name, p in per.items()}
                for b, per in base_parts.items()
            }
            | {b: maps[b] for m in multi.values() for b in m.bases if b in maps},
        )
        for n, method in multi.items():
            forwards, backwards = method.plan(len(chosen), x.shape[0], ctx.options)
            logger.info(
                "%s: %d forward and %d backward passes for %d layer(s) x %d sample(s)",
                n,
                forwards,
                backwards,
                len(chosen),
                x.shape[0],
            )
        for n, per_layer in run_multi_pass(multi, ctx).items():
            maps[n].update(per_layer)
            flags[n].update({k: () for k in per_layer})
            if getattr(multi[n], "extras", None):
                extras[n] = multi[n].extras
        kept.clear()
        timings["multi_pass"] = time.perf_counter() - t

    t = time.perf_counter()
    for n in names:
        for name, m in maps[n].items():
            m = m.float().cpu()
            if "no_gradient" in flags[n][name]:
                maps[n][name] = m
                continue
            extra = flags[n][name]
            lo, hi = (float(v) for v in torch.aminmax(m))
            if not (math.isfinite(lo) and math.isfinite(hi)):  # min/max propagate NaN
                m = torch.nan_to_num(m, nan=0.0, posinf=0.0, neginf=0.0)
                extra = ("nonfinite",) + extra
                lo, hi = (float(v) for v in torch.aminmax(m))
            maps[n][name] = m
            if zero_grad.get(name) and method_class(n).needs_gradients:
                extra += ("zero_gradient",)
            if name in cancelled[n]:
                extra += ("cancelled",)
            flags[n][name] = tuple(map_flags(m, lo, hi)) + extra
    # Keep forward order in the dicts (the backward delivered them in reverse).
    order = [layer.name for layer in chosen]
    maps = {n: {k: maps[n][k] for k in order} for n in names}
    flags = {n: {k: flags[n][k] for k in order} for n in names}
    timings["methods_to_cpu"] = time.perf_counter() - t
    if task is not None:  # the target's score as the one "class" (see Explanation.task)
        label = str(getattr(task, "label", getattr(task, "__name__", "custom target")))
        probs = result.scores.detach().float().reshape(-1, 1).cpu()  # (B, 1), or (K, 1) for K targets
        targets = (0,) * probs.shape[0]
        class_names = (label,)
        row_names = tuple(str(v) for v in getattr(task, "target_labels", None) or ())
        if len(row_names) != passes:
            row_names = (label,) if passes == 1 else tuple(f"{label} [{k}]" for k in range(passes))
        logits = output.detach().float().cpu() if isinstance(output, Tensor) else None
        task_info = task.describe() if hasattr(task, "describe") else {"kind": "custom", "target": label}
        regions = task.region() if hasattr(task, "region") else None
        boxes = task.boxes() if hasattr(task, "boxes") else None
    else:
        probs = output.float().softmax(dim=1).cpu()
        targets = tuple(lazy_target.classes)
        class_names = lm.class_names
        logits = output.detach().float().cpu()
        task_info = {"kind": "classification", "score": score}
        regions = boxes = None
        row_names = ()
    timings["total"] = time.perf_counter() - t0
    return Explanation(
        model_name=lm.name,
        weights=lm.weights,
        preprocessing=preprocessing,
        input=x.detach().float().cpu(),
        display=display,
        probabilities=probs,
        targets=targets,
        target_names=tuple(class_names[c] if c < len(class_names) else str(c) for c in targets)
        if task is None
        else row_names * (len(targets) // passes),
        class_names=class_names,
        layers=tuple(result.layers),
        chosen=tuple(chosen),
        methods=tuple(names),
        maps=maps,
        flags=flags,
        image_info=image_info,
        timings=timings,
        logits=logits,
        output=lm.output,
        task=task_info,
        regions=None if regions is None else regions.detach().cpu(),
        boxes=boxes,
        passed_over=tuple(passed_over),
        extras=extras,
        method_options={
            "seed": seed,
            "eigen_smooth": eigen_smooth,
            "aug_smooth": False,
            "options": {k: v for k, v in (options or {}).items()},
        },
    )


#: grad-cam's default test-time augmentations (ttach's ``HorizontalFlip`` x ``Multiply([0.9, 1, 1.1])``), in
#: its order: ``(flip, factor)``; the factor multiplies the model's input.
AUGMENTATIONS = tuple((flip, factor) for flip in (False, True) for factor in (0.9, 1.0, 1.1))


def _aug_smoothed(
    model: Any, image: Any, *, device: Any, output: OutputSpec, input_size: InputSize, target: Any,
    top_k: int | None, **kwargs: Any,
) -> Explanation:  # fmt: skip
    """:func:`explain` averaged over :data:`AUGMENTATIONS`: one capture of the six augmented copies."""
    if top_k is not None:
        raise OptionError("aug_smooth explains one class per image; it does not combine with top_k")
    if _is_task(target) or _is_task_list(target):
        raise OptionError(
            "aug_smooth explains a classifier's classes; it does not combine with a task target"
        )
    lm = as_loaded(model, device, output)
    x, display, info = prepare_input(image, lm, input_size)
    b = x.shape[0]
    if target is None:  # the classes of the image itself, not of each augmented copy
        with frozen_eval(lm.model), torch.no_grad(), model_errors(x):
            target = [int(c) for c in lm.model(x.to(lm.device)).argmax(dim=1)]
    specs = _target_specs(target, b)
    xs = torch.cat([(x.flip(-1) if flip else x) * factor for flip, factor in AUGMENTATIONS])
    ex = explain(lm, xs, target=specs * len(AUGMENTATIONS), **kwargs)
    n = len(AUGMENTATIONS)

    def average(m: Tensor) -> Tensor:
        parts = m.reshape(n, b, *m.shape[1:])
        return torch.stack(
            [p.flip(-1) if flip else p for p, (flip, _) in zip(parts, AUGMENTATIONS, strict=True)]
        ).mean(0)

    identity = AUGMENTATIONS.index((False, 1.0))
    rows = slice(identity * b, (identity + 1) * b)
    return dataclasses.replace(
        ex,
        input=x.float().cpu(),
        display=display,
        probabilities=ex.probabilities[rows],
        targets=ex.targets[rows],
        target_names=ex.target_names[rows],
        maps={m: {name: average(t) for name, t in per.items()} for m, per in ex.maps.items()},
        image_info={
            **{k: v for k, v in info.items() if k != "preprocessing"},
            "aug_smooth": list(AUGMENTATIONS),
        },
        method_options={**ex.method_options, "aug_smooth": True},
        logits=None if ex.logits is None else ex.logits[rows],
        preprocessing=Preprocessing(**_tuples(info.get("preprocessing", lm.preprocessing.to_dict()))),
    )


def _check_volume_methods(names: Sequence[str], bases: Mapping[str, Any]) -> None:
    """Refuse, for a volume input, the methods not defined for volumes (``CAMMethod.volumes``)."""
    bad = [n for n in (*names, *bases) if not method_class(n).volumes]
    if bad:
        raise OptionError(
            f"{', '.join(bad)}: not defined for volumes (their rule uses the 2-D grid or passes of their own); "
            f"methods for volumes: {', '.join(list_methods(volumes=True))}"
        )


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def _pass_over_blank_ends(
    chosen: list[Layer], asked: set[str] | None, last_pool: list[str], blank: dict[str, str]
) -> tuple[list[Layer], list[tuple[Layer, str]]]:
    """Leave out the layers a sweep (``asked`` None) or ``"last"`` would end with although every map there is
    blank (``blank``: a gradient zero everywhere, or none at all), with the reason; ``"last"`` becomes the
    last of ``last_pool`` that is not blank. Layers asked for by name or index are kept."""
    passed: list[tuple[Layer, str]] = []
    if asked is None:
        while len(chosen) > 1 and chosen[-1].name in blank:
            layer = chosen.pop()
            passed.insert(0, (layer, blank[layer.name]))
        return chosen, passed
    if not last_pool:
        return chosen, passed
    pool = [layer for layer in chosen if layer.name in last_pool]
    live = [layer for layer in pool if layer.name not in blank]
    last = live[-1] if live else pool[-1]
    passed = [(layer, blank.get(layer.name, ZERO_GRADIENT)) for layer in pool if layer.index > last.index]
    keep = asked - set(last_pool[-1:]) | {last.name}
    return [layer for layer in chosen if layer.name in keep], passed


def _is_task(target: Any) -> bool:
    """Whether ``target`` is a callable target (a task's, or the user's own) rather than classes."""
    return callable(target) and not isinstance(target, (str, int, list, tuple))


def _is_task_list(target: Any) -> bool:
    """Whether ``target`` is a list of callable targets (``K`` targets of one capture)."""
    return isinstance(target, (list, tuple)) and bool(target) and all(_is_task(t) for t in target)


def _put(per_pass: list, k: int, value: Any) -> None:
    """Set ``per_pass[k]``, growing the list (the number of backward passes of a task target is known only
    once it has scored the capture's output)."""
    per_pass.extend([None] * (k + 1 - len(per_pass)))
    per_pass[k] = value


class _OneImageIfSeveral:
    """A task target as the capture sees it: its scores ``(B,)`` or ``(B, K)``, checked before any backward
    pass (``K`` targets explain one image)."""

    def __init__(self, task: Callable[[Any], Tensor]) -> None:
        self.task = task

    def __call__(self, output: Any) -> Tensor:
        scores = self.task(output)
        if not isinstance(scores, Tensor) or scores.dim() not in (1, 2):
            shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise TargetError(f"a target gives one score per sample (B,) or K scores (B, K), got {shape}")
        if scores.dim() == 2 and scores.shape[1] > 1 and scores.shape[0] != 1:
            raise TargetError(
                f"{scores.shape[1]} targets per image explain one image; got a batch of {scores.shape[0]}"
            )
        return scores


class _LazyTarget:
    """The target class per sample, decided from the capture's own output ``(B, K)``.

    Given targets (``specs``: an index or a class name per sample) are resolved there, against ``K`` and the
    class names ``names()`` (read once ``K`` is known), so the class count is the model's real one and no
    extra forward pass is needed; without them, the top-1 class. With ``top_k``, the ``k`` highest-scoring
    classes of the single sample (by logit, which ranks them as the softmax and the sigmoid do), each scored
    on it: ``(1, K)`` scores, one backward pass each.
    """

    def __init__(
        self,
        classes: list[int] | None,
        score: str,
        top_k: int | None = None,
        *,
        specs: Sequence[int | str] | None = None,
        names: Callable[[], Sequence[str]] | None = None,
    ) -> None:
        self.classes = classes
        self.score = score
        self.top_k = top_k
        self.specs = specs
        self.names = names

    def __call__(self, output: Tensor) -> Tensor:
        kind = TARGET_KINDS[self.score]
        k = output.shape[1]
        if self.classes is None and self.specs is not None:
            names = self.names() if self.names is not None else class_names_for(k)
            self.classes = [resolve_class(s, names, k) for s in self.specs]
        elif self.classes is not None and not all(0 <= c < k for c in self.classes):
            bad = next(c for c in self.classes if not 0 <= c < k)
            raise TargetError(f"class index {bad} is out of range: the model has {k} classes (0..{k - 1})")
        if self.top_k is None:
            if self.classes is None:
                self.classes = [int(i) for i in output.detach().argmax(dim=1)]
            return kind(tuple(self.classes))(output)
        if self.classes is None:
            if not self.top_k <= output.shape[1]:
                raise TargetError(f"top-k must be between 1 and {output.shape[1]}, got {self.top_k}")
            self.classes = [int(i) for i in output.detach()[0].float().topk(self.top_k).indices]
        return torch.stack([kind((c,))(output) for c in self.classes], dim=1)


def method_info(name: str) -> dict:
    """A method's registry entry as recorded in manifests."""
    cls = method_class(name)
    return {
        "name": name,
        "class": cls.__name__,
        "paper": cls.paper,
        "needs_gradients": cls.needs_gradients,
        "class_discriminative": cls.class_discriminative,
        "cost": cls.cost,
    }


def describe(ex: Explanation, score: str = "logit") -> dict:
    """The manifest sections describing an explanation: model, image, targets, layers, methods, flags."""
    return {
        "model": {
            "name": ex.model_name,
            "weights": ex.weights,
            "output": ex.output,
            "preprocessing": ex.preprocessing.to_dict(),
        },
        "image": ex.image_info,
        "input": {"file": "input.npy", "shape": list(ex.input.shape), "dtype": "float32"},
        "task": dict(ex.task),
        "targets": [
            {
                "sample": b,
                "class": c,
                "name": ex.target_names[b],
                "probability": float(ex.probabilities[b, c]),
                "score": score,
            }
            for b, c in enumerate(ex.targets)
        ]
        if ex.task.get("kind") == "classification"
        else [
            {
                "sample": b,
                "name": ex.target_names[b],
                "value": float(ex.probabilities[b, 0]),
                "score": "target",
            }
            for b in range(ex.input.shape[0])
        ],
        "top5": [
            [{"class": i, "name": n, "probability": p} for i, n, p in ex.top(5, b)]
            for b in range(ex.input.shape[0])
        ]
        if ex.task.get("kind") == "classification"
        else [],
        "boxes": ex.boxes,
        "layers": [layer.to_dict() for layer in ex.layers],
        "chosen_layers": [layer.name for layer in ex.chosen],
        "passed_over": [{"index": la.index, "name": la.name, "reason": r} for la, r in ex.passed_over],
        "methods": [method_info(n) for n in ex.methods],
        "method_options": _plain(ex.method_options),
        "maps": {
            "file": "maps.npz",
            "key": "<method>/<layer name>",
            "shape": "(B, d, h, w) raw, before ReLU" if ex.is_volume else "(B, h, w) raw, before ReLU",
        },
        "flags": {m: {k: list(v) for k, v in f.items() if v} for m, f in ex.flags.items()},
        "timings": dict(ex.timings),
    }


def _plain(value: Any) -> Any:
    """``value`` as JSON's types (mappings, sequences, numbers, strings); anything else as its ``repr``."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)
