"""The images of an embedding run and their labels: a folder, a CSV list, a list of sources, a tensor, or the
digits.

:func:`open_images` lists and checks them (files exist, labels complete, a stratified sample with ``limit``)
without decoding any; :meth:`ImageSet.load` turns a batch of them into the model's input and thumbnails.
``"digits"`` is scikit-learn's 1,797 labelled 8x8 handwritten digits (``load_digits``, offline), white on
black, bilinearly upsampled to the model's input size.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from camanim.compute.models import LoadedModel
from camanim.errors import CamanimError, OptionError
from camanim.pipelines.explain import prepare_input
from camanim.pipelines.study.units import ImageItem, list_images

DIGITS = "digits"
THUMBNAIL = 48
LABEL_SOURCES = ("auto", "subfolders", "none")


class EmbedError(CamanimError, ValueError):
    """Images or labels that cannot be embedded (no images, unreadable label list, mismatched labels)."""


@dataclass(frozen=True, eq=False)
class ImageSet:
    """The images of an embedding run and their labels; nothing is loaded until :meth:`load`.

    Attributes:
        ids: one name per image (a path relative to the folder, as listed, or ``digits/0042``).
        labels: one label per image, or ``None``.
        source: where the images came from, for the manifest.
        label_source: where the labels came from (``subfolders``, a CSV, ``digits``...).
        items: image sources per image (paths, PIL images, arrays), or a tensor ``(N, C, H, W)`` already
            preprocessed, or digit arrays ``(N, 8, 8)``.
        kind: ``files``, ``tensor`` or ``digits``.
    """

    ids: tuple[str, ...]
    labels: tuple[str, ...] | None
    source: str
    label_source: str
    items: Any = field(repr=False)
    kind: str = "files"

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: Sequence[int]) -> ImageSet:
        """The images at ``index`` (in that order)."""
        index = [int(i) for i in index]
        if self.kind == "files":
            items: Any = [self.items[i] for i in index]
        else:
            items = self.items[torch.as_tensor(index) if self.kind == "tensor" else np.asarray(index)]
        return ImageSet(
            ids=tuple(self.ids[i] for i in index),
            labels=None if self.labels is None else tuple(self.labels[i] for i in index),
            source=self.source,
            label_source=self.label_source,
            items=items,
            kind=self.kind,
        )

    def load(
        self, index: Sequence[int], lm: LoadedModel, thumbnail: int = THUMBNAIL
    ) -> tuple[Tensor, np.ndarray]:
        """The model input ``(B, C, H, W)`` of the images at ``index`` and their thumbnails
        ``(B, thumbnail, thumbnail, 3)`` uint8."""
        index = [int(i) for i in index]
        if self.kind == "digits":
            return _digit_batch(self.items[np.asarray(index)], lm, thumbnail)
        if self.kind == "tensor":
            x, display, _ = prepare_input(self.items[torch.as_tensor(index)], lm)
        else:
            x, display, _ = prepare_input([self.items[i] for i in index], lm)
        return x, _thumbnails(display, thumbnail)

    def input_shape(self, lm: LoadedModel) -> tuple[int, ...]:
        """The shape of one image's model input, ``(1, C, H, W)``."""
        if self.kind == "tensor":
            return (1, *self.items.shape[1:])
        return (1, 3, *lm.preprocessing.size)


def _thumbnails(display: np.ndarray, size: int) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(display)).permute(0, 3, 1, 2).float()
    t = F.interpolate(t, size=(size, size), mode="area" if t.shape[-1] >= size else "bilinear")
    return t.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _digit_batch(digits: np.ndarray, lm: LoadedModel, thumbnail: int) -> tuple[Tensor, np.ndarray]:
    """Digits ``(B, 8, 8)`` in 0..16: white on black, bilinearly upsampled to the model's input size and
    normalised as the model expects; thumbnails upsampled by nearest neighbour (crisp pixels)."""
    pixels = torch.from_numpy(np.asarray(digits, np.float32) / 16.0)[:, None]  # (B, 1, 8, 8) in [0, 1]
    h, w = lm.preprocessing.size
    up = F.interpolate(pixels, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)
    x = lm.preprocessing.normalize(up.expand(-1, 3, -1, -1))
    small = F.interpolate(pixels, size=(thumbnail, thumbnail), mode="nearest")
    thumbs = (small * 255 + 0.5).to(torch.uint8).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()
    return x, np.ascontiguousarray(thumbs)


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def _read_label_csv(path: Path) -> dict[str, str]:
    """``{path or id: label}`` from a CSV with a path column and a label column."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [c.strip() for c in (reader.fieldnames or [])]
            lower = {c.lower(): c for c in fields}
            path_col = next(
                (lower[c] for c in ("path", "image", "file", "filename", "id") if c in lower), None
            )
            label_col = next((lower[c] for c in ("label", "target", "class") if c in lower), None)
            if path_col is None or label_col is None:
                raise EmbedError(
                    f"label list {str(path)!r} needs a header with a path column (path, image, file, filename "
                    f"or id) and a label column (label, target or class); found {fields or 'no header'}"
                )
            out = {}
            for row in reader:
                row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
                if row.get(path_col) and row.get(label_col):
                    out[row[path_col]] = row[label_col]
            return out
    except OSError as exc:
        raise EmbedError(f"cannot read the label list {str(path)!r}: {exc.strerror or exc}") from exc


def _labels_from_csv(items: Sequence[ImageItem], path: Path) -> tuple[str, ...]:
    table = _read_label_csv(path)
    by_path = {str((path.parent / k).resolve()) if not Path(k).is_absolute() else str(Path(k).resolve()): v
               for k, v in table.items()}  # fmt: skip
    labels, missing = [], []
    for item in items:
        label = table.get(item.id) or by_path.get(item.path) or table.get(Path(item.path).name)
        if label is None:
            missing.append(item.id)
        labels.append(label)
    if missing:
        shown = ", ".join(repr(m) for m in missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise EmbedError(f"{len(missing)} image(s) have no label in {str(path)!r}: {shown}")
    return tuple(labels)


def open_images(
    images: Any,
    labels: str | os.PathLike[str] | Sequence | None = None,
    *,
    limit: int | None = None,
    seed: int = 0,
) -> ImageSet:
    """The images to embed and their labels, checked (files exist, labels complete); nothing is decoded.

    Args:
        images: ``"digits"``; a folder (every image below it, recursively); a CSV list with a path column
            and an optional label column; a list of image sources (paths, PIL images, arrays); or a tensor
            ``(N, C, H, W)`` already preprocessed for the model.
        labels: ``None`` or ``"auto"``: the digits' classes, a CSV list's label column, or the sub-folder
            of each image when every image of a folder sits in one (else no labels); ``"subfolders"``:
            the sub-folders, required; ``"none"``: no labels; a path to a CSV (a path column, or ``id``,
            and a label column) matched to the images by relative path, absolute path or file name; or one
            label per image.
        limit: embed a seeded random sample of this many images (all when ``None``), stratified by label:
            each label keeps its share of the images.
        seed: seed of that sample.

    Raises:
        EmbedError: no images, unreadable lists, labels that do not fit the images.
    """
    spec = labels
    if isinstance(spec, str) and spec.strip().lower() in LABEL_SOURCES:
        spec = spec.strip().lower()
    if spec is None:
        spec = "auto"
    if isinstance(images, str) and images.strip().lower() == DIGITS:
        arr, target = _load_digits()
        ids = tuple(f"digits/{i:04d}" for i in range(len(arr)))
        found: tuple[str, ...] | None = tuple(str(int(t)) for t in target)
        imgset = ImageSet(ids, found, "digits (scikit-learn load_digits, 8x8)", "digits", arr, "digits")
    elif isinstance(images, Tensor):
        if images.dim() != 4:
            raise EmbedError(f"an image tensor must be (N, C, H, W), got {list(images.shape)}")
        imgset = ImageSet(
            tuple(f"tensor/{i}" for i in range(images.shape[0])),
            None,
            "tensor",
            "",
            images.detach().cpu(),
            "tensor",
        )
    elif isinstance(images, (str, os.PathLike)):
        root = Path(images).expanduser()
        if not root.exists():
            raise EmbedError(
                f"--images {str(images)!r} does not exist: give a folder of images, a CSV list or 'digits'"
            )
        try:
            items = list_images(root)
        except CamanimError as exc:
            raise EmbedError(str(exc)) from exc
        found = None
        where = ""
        if root.is_dir():
            if all("/" in it.id for it in items):
                found, where = tuple(it.id.split("/", 1)[0] for it in items), "subfolders"
            elif spec == "subfolders":
                loose = [it.id for it in items if "/" not in it.id]
                raise EmbedError(
                    f"--labels subfolders: {len(loose)} image(s) of {str(root)!r} are not in a class sub-folder "
                    f"(e.g. {loose[0]!r}); put each image in a folder named after its class"
                )
        elif any(it.label for it in items):
            if not all(it.label for it in items):
                gap = next(it.id for it in items if not it.label)
                raise EmbedError(f"{str(root)!r}: image {gap!r} has an empty label; label every row or none")
            found, where = tuple(str(it.label) for it in items), f"label column of {root.name}"
        imgset = ImageSet(tuple(it.id for it in items), found, str(root), where, [it.path for it in items])
        if isinstance(spec, (str, os.PathLike)) and spec not in LABEL_SOURCES:
            path = Path(spec).expanduser()
            if not path.is_file():
                raise EmbedError(
                    f"--labels {str(spec)!r} is not a file: give subfolders, none or a CSV of path,label"
                )
            imgset = _with_labels(imgset, _labels_from_csv(items, path), str(path))
    else:
        items_in = list(images)
        if not items_in:
            raise EmbedError("no images given")
        imgset = ImageSet(tuple(f"image/{i}" for i in range(len(items_in))), None, "list", "", items_in)
    if spec == "subfolders" and imgset.label_source != "subfolders":
        raise EmbedError(
            "--labels subfolders needs --images to be a folder whose images sit in class sub-folders"
        )
    if spec == "none":
        imgset = _with_labels(imgset, None, "")
    elif not isinstance(spec, (str, os.PathLike)):
        imgset = _with_labels(imgset, tuple(str(v) for v in spec), "given")
    if len(imgset) == 0:
        raise EmbedError(f"no images in {imgset.source!r}")
    if limit is not None:
        if limit < 1:
            raise OptionError(f"limit must be at least 1, got {limit}")
        if limit < len(imgset):
            imgset = imgset.subset(stratified_sample(imgset.labels, len(imgset), limit, seed))
    return imgset


def stratified_sample(labels: Sequence[str] | None, n: int, size: int, seed: int) -> np.ndarray:
    """``size`` of ``n`` positions, seeded and sorted; stratified by label (each label keeps its share, within
    one image) when there are labels."""
    rng = np.random.default_rng(seed)
    if labels is None:
        return np.sort(rng.choice(n, size, replace=False))
    key = np.empty(n)
    y = np.asarray(labels)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        key[idx[rng.permutation(len(idx))]] = (np.arange(len(idx)) + rng.random()) / len(idx)
    return np.sort(np.argsort(key, kind="stable")[:size])


def _with_labels(imgset: ImageSet, labels: tuple[str, ...] | None, source: str) -> ImageSet:
    if labels is not None and len(labels) != len(imgset):
        raise EmbedError(f"{len(labels)} labels given for {len(imgset)} images")
    return ImageSet(imgset.ids, labels, imgset.source, source, imgset.items, imgset.kind)
