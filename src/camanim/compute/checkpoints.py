"""Checkpoints: state dicts read with ``torch.load(..., weights_only=True)``, and files that are not one
named for what they are (an image, text, a pickled whole model...) with the way to convert them."""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from camanim.errors import WeightsError

__all__ = ["load_state_dict_into", "read_state_dict"]


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


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
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
    state = read_state_dict(path)
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
