"""Layer-wise embeddings of a dataset: watch its classes separate, layer by layer.

One forward pass per batch records every chosen layer's output pooled to a vector per image
(:mod:`camanim.compute.embeddings`; no backward pass, no autograd graph). As the batches stream:

* each vector longer than ``max_dim`` (256) is reduced by a seeded random projection before it is kept
  (:class:`~camanim.compute.embeddings.RandomProjection`); ``keep_full=True`` keeps the full vectors too;
* the unbiased HSIC of every pair of layers is added up on the full pooled vectors, for linear CKA
  (:class:`~camanim.compute.similarity.MinibatchCKA`): memory ``L x L`` numbers, whatever the number of
  images. Batches are random samples of the images (a seeded permutation), as the estimator needs.

Then, per layer: class separability with labels (leave-one-out k-NN, a cross-validated linear probe,
silhouette; :mod:`camanim.compute.separability`) on the kept vectors, and a 2-D projection (PCA, UMAP or
t-SNE) aligned to the layer before (:mod:`camanim.compute.projections`).

Images are a folder (labels from its sub-folders), a CSV list (path, label), a list of image sources, a
preprocessed tensor ``(N, 3, H, W)``, or ``"digits"``: scikit-learn's 1,797 labelled 8x8 handwritten
digits (``load_digits``), upsampled to the model's input size (offline); see :mod:`camanim.pipelines.imageset`.

Example:
    >>> import camanim
    >>> emb = camanim.embed(images="digits", layers="last")  # doctest: +SKIP
    >>> emb.best_layer().name, emb.curve("knn")[-1]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from camanim.compute.embeddings import (
    TOKEN_POOLING,
    RandomProjection,
    embeddable,
    pooled_dim,
    pooled_forward,
)
from camanim.compute.layers import Layer, LayerSpec, list_layers, select_layers
from camanim.compute.models import DEFAULT_MODEL, InputSize, LoadedModel, parse_input_size
from camanim.compute.projections import check_projection, project_layers
from camanim.compute.separability import (
    METRIC_TITLES,
    METRICS,
    Separability,
    SeparabilityError,
    check_labels,
    encode_labels,
    separability,
)
from camanim.compute.similarity import MIN_BATCH, MinibatchCKA, hsic_matrix
from camanim.compute.targets import OutputSpec
from camanim.errors import LayerSelectionError, OptionError
from camanim.pipelines.explain import as_loaded
from camanim.pipelines.imageset import (
    DIGITS,
    THUMBNAIL,
    EmbedError,
    ImageSet,
    open_images,
    stratified_sample,
)

logger = logging.getLogger(__name__)

#: Images projected, drawn and given thumbnails at most (a seeded sample beyond).
MAX_POINTS = 5000
#: Images separability is scored on at most (a seeded sample beyond): k-NN and silhouette cost n^2.
MAX_METRIC_IMAGES = 5000


# --------------------------------------------------------------------------------------------------------
# Batches and their checkpoints.
# --------------------------------------------------------------------------------------------------------


@dataclass
class BatchResult:
    """What one forward batch gave, enough to rebuild the run without it (a resume's unit).

    Attributes:
        index: the batch's images, ``(B,)`` positions in the image set.
        stored: per layer name, the kept vectors ``(B, min(D, max_dim))`` float32.
        full: per layer name, the full pooled vectors ``(B, D)`` float32 (``keep_full`` only).
        hsic: the unbiased HSIC of every pair of layers on this batch ``(L, L)`` float64 (``None`` for a
            batch of fewer than 4 images).
        predictions: the model's top-1 class per image ``(B,)``; ``confidence`` its softmax probability.
        thumbnails: ``(b, t, t, 3)`` uint8 of the batch's images that are shown (``shown`` their positions).
    """

    index: np.ndarray
    stored: dict[str, np.ndarray]
    full: dict[str, np.ndarray] | None
    hsic: np.ndarray | None
    predictions: np.ndarray
    confidence: np.ndarray
    shown: np.ndarray
    thumbnails: np.ndarray


class BatchCheckpoint(Protocol):
    """Where finished batches are kept so an interrupted run can resume (see :mod:`camanim.outputs.embed`).

    Batches are read back one at a time, as the run reaches them, so a resumed run holds no more memory
    than an uninterrupted one.
    """

    def finished(self, fingerprint: Mapping[str, Any]) -> set[int]:
        """The numbers of the batches an earlier run with the same ``fingerprint`` finished (else none)."""

    def read(self, number: int) -> BatchResult | None:
        """Finished batch ``number``, or ``None`` when it cannot be read back (it then runs again)."""

    def save(self, number: int, result: BatchResult, fingerprint: Mapping[str, Any]) -> None:
        """Keep batch ``number``."""


# --------------------------------------------------------------------------------------------------------
# The result.
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Embeddings:
    """Every chosen layer's embedding of a set of images, with its separability, projection and CKA.

    Writing (``save``) and notebook display are attached by :mod:`camanim.outputs`.

    Attributes:
        model_name, weights, preprocessing: the model, as in :class:`~camanim.pipelines.explain.Explanation`.
        source: where the images came from; ``label_source`` where their labels came from.
        ids: one name per image; ``labels`` one label per image (``None`` without labels).
        classes: the distinct labels, sorted (numbers numerically); ``y`` each image's class index.
        layers: every layer of the forward pass; ``chosen`` the embedded layers, in forward order.
        dims: per chosen layer, the length ``D`` of its pooled vector.
        vectors: per layer name, the kept vectors ``(N, min(D, max_dim))`` float32 (a seeded random
            projection where ``D > max_dim``; see :class:`~camanim.compute.embeddings.RandomProjection`).
        full: per layer name, the full pooled vectors ``(N, D)`` float32, when ``keep_full``.
        projection: ``pca``, ``umap`` or ``tsne``; ``projections`` per layer name the aligned layout
            ``(M, 2)`` of the ``M`` images at ``shown`` (every image up to 5,000).
        separability: per layer name, its :class:`~camanim.compute.separability.Separability` (``None``
            without labels).
        cka: linear CKA between every pair of chosen layers ``(L, L)`` (minibatch, unbiased HSIC).
        predictions: the model's top-1 class per image ``(N,)``; ``confidence`` its softmax probability;
            ``prediction_names`` the names of the classes predicted.
        thumbnails: the images at ``shown`` as ``(M, t, t, 3)`` uint8.
        settings: how the run was made (batch size, seed, pooling, projection, metrics...).
        timings: seconds per stage.
    """

    model_name: str
    weights: str
    preprocessing: Any
    source: str
    label_source: str
    ids: tuple[str, ...] = field(repr=False)
    labels: tuple[str, ...] | None = field(repr=False)
    classes: tuple[str, ...]
    layers: tuple[Layer, ...] = field(repr=False)
    chosen: tuple[Layer, ...] = field(repr=False)
    dims: tuple[int, ...] = field(repr=False)
    vectors: dict[str, np.ndarray] = field(repr=False)
    full: dict[str, np.ndarray] | None = field(repr=False)
    projection: str
    shown: np.ndarray = field(repr=False)
    projections: dict[str, np.ndarray] = field(repr=False)
    separability: dict[str, Separability] | None = field(repr=False)
    cka: np.ndarray = field(repr=False)
    predictions: np.ndarray = field(repr=False)
    confidence: np.ndarray = field(repr=False)
    thumbnails: np.ndarray = field(repr=False)
    prediction_names: dict[int, str] = field(default_factory=dict, repr=False)
    settings: dict = field(default_factory=dict, repr=False)
    timings: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def names(self) -> tuple[str, ...]:
        """The chosen layers' names, in forward order."""
        return tuple(layer.name for layer in self.chosen)

    @property
    def y(self) -> np.ndarray | None:
        """Each image's class index into :attr:`classes` ``(N,)``, or ``None`` without labels."""
        if self.labels is None:
            return None
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[v] for v in self.labels], dtype=np.int64)

    def prediction_name(self, c: int) -> str:
        """The name of class ``c`` of the model's output (``class c`` when unknown)."""
        return self.prediction_names.get(int(c), f"class {int(c)}")

    def layer(self, name: str) -> Layer:
        """The chosen layer called ``name``."""
        for layer in self.chosen:
            if layer.name == name:
                return layer
        raise LayerSelectionError(f"layer {name!r} was not embedded; embedded: {len(self.chosen)} layers")

    def curve(self, metric: str = "knn") -> np.ndarray:
        """The separability ``metric`` (``knn``, ``probe`` or ``silhouette``) of every layer, in forward order."""
        if self.separability is None:
            raise SeparabilityError("these embeddings have no labels, so no separability: embed with labels")
        if metric not in METRICS:
            raise OptionError(f"unknown separability metric {metric!r}; valid: {', '.join(METRICS)}")
        return np.array([self.separability[n][metric] for n in self.names], dtype=np.float64)

    def best(self, metric: str = "knn") -> int:
        """The position (in :attr:`chosen`) of the most separable layer by ``metric`` (the first on ties)."""
        return int(np.nanargmax(self.curve(metric)))

    def best_layer(self, metric: str = "knn") -> Layer:
        """The most separable layer by ``metric``."""
        return self.chosen[self.best(metric)]

    def emergence(self, metric: str = "knn", fraction: float = 0.9) -> int:
        """The position of the first layer that reaches ``fraction`` of the way from the first layer's
        ``metric`` to the best layer's: where class information appears."""
        c = self.curve(metric)
        lo, hi = float(c[0]), float(np.nanmax(c))
        return int(np.flatnonzero(c >= lo + fraction * (hi - lo))[0])

    def describe(self) -> dict:
        """The manifest's ``embed`` section: settings, layers, scores, files are added by the writer."""
        per_layer = []
        for i, layer in enumerate(self.chosen):
            row = {
                "position": i,
                "index": layer.index,
                "name": layer.name,
                "type": layer.type,
                "kind": layer.kind,
                "dim": self.dims[i],
                "stored_dim": int(self.vectors[layer.name].shape[1]),
            }
            if self.separability is not None:
                row |= self.separability[layer.name].as_dict()
            per_layer.append(row)
        out: dict[str, Any] = {
            "images": len(self),
            "source": self.source,
            "labels": self.label_source or None,
            "classes": list(self.classes),
            "class_counts": _counts(self.labels, self.classes),
            "projection": self.projection,
            "shown": len(self.shown),
            "settings": dict(self.settings),
            "layers": per_layer,
            "timings": dict(self.timings),
        }
        if self.separability is not None:
            out["separability"] = {
                m: {
                    "title": METRIC_TITLES[m],
                    "best_position": self.best(m),
                    "best_layer": self.best_layer(m).name,
                    "max": float(np.nanmax(self.curve(m))),
                    "final": float(self.curve(m)[-1]),
                    "first": float(self.curve(m)[0]),
                    "emerges_at": self.emergence(m),
                }
                for m in METRICS
            }
        return out


def _counts(labels: Sequence[str] | None, classes: Sequence[str]) -> dict[str, int]:
    if labels is None:
        return {}
    counts = dict.fromkeys(classes, 0)
    for v in labels:
        counts[v] += 1
    return counts


# --------------------------------------------------------------------------------------------------------
# The pipeline.
# --------------------------------------------------------------------------------------------------------


def embed_batch(
    net: nn.Module,
    x: Tensor,
    names: Sequence[str],
    projection: RandomProjection,
    *,
    tokens: str = "concat",
    keep_full: bool = False,
) -> BatchResult:
    """One forward pass of a batch ``x`` and everything the stream keeps of it: the layers ``names`` pooled,
    reduced by ``projection`` and moved to the CPU, their HSIC matrix for CKA, the model's top-1 class.

    The result's ``index``, ``shown`` and ``thumbnails`` are left empty for the caller.

    Raises:
        LayerSelectionError: the forward pass did not produce every layer of ``names`` (a model whose layers
            depend on its input).
    """
    wanted = set(names)
    pb = pooled_forward(net, x, lambda layer: layer.name in wanted, tokens=tokens)
    got = [layer.name for layer in pb.chosen]
    if got != list(names):
        missing = [nm for nm in names if nm not in got]
        raise LayerSelectionError(
            f"a forward pass did not produce the listed layers {missing[:5]}: a model whose layers depend on "
            "its input cannot be embedded in batches"
        )
    feats = [pb.pooled[nm] for nm in names]
    conf, pred = pb.output.float().softmax(dim=1).max(dim=1)
    empty = np.zeros(0, np.int64)
    return BatchResult(
        index=empty,
        stored={nm: projection(f).cpu().numpy() for nm, f in zip(names, feats, strict=True)},
        full={nm: f.cpu().numpy() for nm, f in zip(names, feats, strict=True)} if keep_full else None,
        hsic=hsic_matrix(feats).cpu().numpy() if x.shape[0] >= MIN_BATCH else None,
        predictions=pred.cpu().numpy(),
        confidence=conf.cpu().numpy(),
        shown=empty,
        thumbnails=np.zeros((0, 1, 1, 3), np.uint8),
    )


def _class_names(lm: LoadedModel, predictions: np.ndarray) -> dict[int, str]:
    names = lm.class_names
    return {int(c): str(names[c]) if c < len(names) else f"class {c}" for c in np.unique(predictions)}


def _batches(n: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """The images in a seeded random order, split into ``ceil(n / batch_size)`` batches of nearly equal
    size (so no batch is left too small for the HSIC estimator)."""
    order = np.random.default_rng(seed).permutation(n)
    return [np.asarray(b) for b in np.array_split(order, max(1, math.ceil(n / batch_size)))]


def _fingerprint(lm: LoadedModel, imgs: ImageSet, names: Sequence[str], settings: Mapping[str, Any]) -> dict:
    digest = hashlib.sha1("\n".join(imgs.ids).encode()).hexdigest()
    return {
        "model": lm.name,
        "weights": lm.weights,
        "images": len(imgs),
        "ids_sha1": digest,
        "layers": list(names),
        **{
            k: settings[k]
            for k in (
                "input_size",
                "batch_size",
                "seed",
                "max_dim",
                "tokens",
                "keep_full",
                "thumbnail",
                "max_points",
            )
        },
    }


def embed(
    model: LoadedModel | nn.Module | str = DEFAULT_MODEL,
    images: Any = DIGITS,
    labels: str | os.PathLike[str] | Sequence | None = None,
    *,
    layers: LayerSpec = "all",
    projection: str = "pca",
    batch_size: int = 64,
    keep_full: bool = False,
    max_dim: int | None = 256,
    seed: int = 0,
    k: int = 5,
    folds: int = 5,
    tokens: str = "concat",
    keep_duplicates: bool = False,
    limit: int | None = None,
    max_points: int = MAX_POINTS,
    metric_images: int = MAX_METRIC_IMAGES,
    thumbnail: int = THUMBNAIL,
    device: str | torch.device | None = None,
    output: OutputSpec = None,
    input_size: InputSize = None,
    checkpoint: BatchCheckpoint | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> Embeddings:
    """Embed a set of images at every chosen layer, from one forward pass per batch.

    Args:
        model: a :class:`~camanim.models.LoadedModel`, an ``nn.Module`` or a model name.
        images: ``"digits"`` (default), a folder, a CSV list, a list of image sources or a preprocessed
            tensor ``(N, C, H, W)`` (see :func:`open_images`), or an :class:`ImageSet`.
        labels: where labels come from (see :func:`open_images`); without labels there is no separability.
        layers: a selection (see :func:`camanim.layers.select_layers`); ``"all"``: every layer with a map or
            a vector (1x1 layers and the head's vectors included), without repeats of the same tensor.
        projection: ``pca`` (default), ``umap`` (``pip install 'camanim[embed]'``) or ``tsne``.
        batch_size: images per forward pass (at least 4: each batch is also a CKA minibatch).
        keep_full: keep the full pooled vectors too (``Embeddings.full``).
        max_dim: vectors longer than this are reduced by a seeded random projection; ``None`` keeps all.
        seed: seed of the batch order, the random projection, the probe's folds, samples and UMAP/t-SNE.
        k: neighbours of the leave-one-out k-NN.
        folds: folds of the cross-validated linear probe (fewer when a class is smaller).
        tokens: pooling of token layers: ``concat`` (class token and patch mean), ``average`` or ``patches``.
        keep_duplicates: include layers whose output repeats an earlier layer's tensor.
        limit: embed a seeded sample of this many images.
        max_points: images projected and drawn at most (a seeded sample beyond).
        metric_images: images separability is scored on at most (a seeded sample beyond).
        thumbnail: side of the thumbnails kept for display, in pixels.
        device: move the model there first.
        output: how to read the class scores from what the model returns (as in :func:`camanim.explain`).
        input_size: the images' input size instead of the model's: ``N``, ``(H, W)`` or ``"HxW"`` (not
            ``"native"``: a batch is one tensor, so its images share one size).
        checkpoint: keeps finished batches and gives them back on a resumed run.
        progress: called with ``(stage, done, total)``; stages ``batches``, ``separability``, ``projection``.

    Returns:
        An :class:`Embeddings`.

    Raises:
        EmbedError, SeparabilityError: images or labels that cannot be embedded or scored (checked before
            any forward pass).
    """
    t0 = time.perf_counter()
    if batch_size < MIN_BATCH:
        raise OptionError(
            f"batch_size must be at least {MIN_BATCH} (each batch is a CKA minibatch), got {batch_size}"
        )
    if tokens not in TOKEN_POOLING:
        raise OptionError(f"tokens must be one of {', '.join(TOKEN_POOLING)}, got {tokens!r}")
    if thumbnail < 4 or max_points < 1 or metric_images < 2:
        raise OptionError(
            "thumbnail must be at least 4 pixels, max_points at least 1, metric_images at least 2"
        )
    projection = check_projection(projection)
    imgs = images if isinstance(images, ImageSet) else open_images(images, labels, limit=limit, seed=seed)
    n = len(imgs)
    if imgs.labels is not None:
        check_labels(imgs.labels, k=k, folds=folds)
    else:
        logger.warning(
            "no labels: the embeddings get no separability scores (give class sub-folders or a CSV)"
        )
    if n < MIN_BATCH:
        raise EmbedError(f"embedding needs at least {MIN_BATCH} images (CKA's estimator), got {n}")
    lm = as_loaded(model, device, output)
    size = parse_input_size(input_size)
    if size == "native":
        raise OptionError(
            "embedding batches images into one tensor, so they share one size: give N or HxW, not native"
        )
    if size is not None:
        if imgs.kind == "tensor":
            raise OptionError("input_size resizes images; a preprocessed tensor is used at its own size")
        lm = dataclasses.replace(lm, preprocessing=lm.preprocessing.sized(size))
    net = lm.model
    timings = {"load": time.perf_counter() - t0}

    t = time.perf_counter()
    table = list_layers(net, imgs.input_shape(lm))
    picked = select_layers(table, layers, keep_nonspatial=True, keep_duplicates=keep_duplicates)
    chosen = [layer for layer in picked if embeddable(layer)]
    if len(chosen) < len(picked):
        left = [layer.name for layer in picked if not embeddable(layer)]
        logger.warning(
            "left out %d layer(s) whose output is neither a map nor a vector: %s", len(left), left[:5]
        )
    if not chosen:
        raise LayerSelectionError(
            "no chosen layer has an output that pools to a vector (see `camanim layers`)"
        )
    names = [layer.name for layer in chosen]
    dims = tuple(pooled_dim(layer, tokens) for layer in chosen)
    rp = RandomProjection(max_dim, seed)
    settings: dict[str, Any] = {
        "input_size": "x".join(str(v) for v in imgs.input_shape(lm)[2:]),
        "batch_size": batch_size,
        "seed": seed,
        "max_dim": max_dim,
        "tokens": tokens,
        "keep_full": keep_full,
        "thumbnail": thumbnail,
        "max_points": max_points,
        "k": k,
        "folds": folds,
        "metric_images": metric_images,
        "keep_duplicates": keep_duplicates,
        "pooling": {
            "spatial": "global average over space",
            "token": {
                "concat": "[class token, mean of patch tokens]",
                "average": "(class token + mean of patch tokens) / 2",
                "patches": "mean of patch tokens",
            }[tokens],  # fmt: skip
            "vector": "the vector itself",
        },
        "random_projection": rp.describe(),
        "cka": "linear CKA, unbiased HSIC summed over the forward batches (Nguyen et al. 2021), on the full pooled vectors",
    }
    timings["layers"] = time.perf_counter() - t

    # ---- the stream: one forward per batch
    t = time.perf_counter()
    batches = _batches(n, batch_size, seed)
    shown = np.arange(n) if n <= max_points else stratified_sample(imgs.labels, n, max_points, seed + 2)
    is_shown = np.zeros(n, bool)
    is_shown[shown] = True
    fingerprint = _fingerprint(lm, imgs, names, settings)
    done = checkpoint.finished(fingerprint) if checkpoint is not None else set()
    if done:
        logger.info("resuming: %d of %d batches already done", len(done), len(batches))
    resumed = 0
    vectors = {nm: np.zeros((n, rp.out_dim(d)), np.float32) for nm, d in zip(names, dims, strict=True)}
    full = (
        {nm: np.zeros((n, d), np.float32) for nm, d in zip(names, dims, strict=True)} if keep_full else None
    )
    predictions = np.zeros(n, np.int64)
    confidence = np.zeros(n, np.float32)
    thumbs = np.zeros((len(shown), thumbnail, thumbnail, 3), np.uint8)
    where_shown = np.full(n, -1)
    where_shown[shown] = np.arange(len(shown))
    cka = MinibatchCKA()
    forwards = 0

    for number, index in enumerate(batches):
        res = checkpoint.read(number) if checkpoint is not None and number in done else None
        resumed += res is not None
        if res is None:
            x, th = imgs.load(index, lm, thumbnail)
            res = embed_batch(net, x.to(lm.device), names, rp, tokens=tokens, keep_full=keep_full)
            res.index = np.asarray(index)
            res.shown = res.index[is_shown[index]]
            res.thumbnails = th[is_shown[index]]
            forwards += 1
            if checkpoint is not None:
                checkpoint.save(number, res, fingerprint)
        for nm in names:
            vectors[nm][res.index] = res.stored[nm]
            if full is not None and res.full is not None:
                full[nm][res.index] = res.full[nm]
        if res.hsic is not None:
            cka.add(torch.from_numpy(res.hsic), len(res.index))
        predictions[res.index] = res.predictions
        confidence[res.index] = res.confidence
        if len(res.shown):
            thumbs[where_shown[res.shown]] = res.thumbnails
        if progress is not None:
            progress("batches", number + 1, len(batches))
    timings["forward"] = time.perf_counter() - t
    settings["forwards"] = forwards
    settings["batches"] = len(batches)
    settings["resumed_batches"] = resumed

    # ---- per layer: separability and projection
    t = time.perf_counter()
    seps: dict[str, Separability] | None = None
    classes: tuple[str, ...] = ()
    if imgs.labels is not None:
        y, classes = encode_labels(imgs.labels)
        scored = (
            np.arange(n) if n <= metric_images else stratified_sample(imgs.labels, n, metric_images, seed + 1)
        )
        settings["metric_images_used"] = len(scored)
        seps = {}
        for i, nm in enumerate(names):
            seps[nm] = separability(vectors[nm][scored], y[scored], k=k, folds=folds, seed=seed)
            if progress is not None:
                progress("separability", i + 1, len(names))
    timings["separability"] = time.perf_counter() - t

    t = time.perf_counter()
    layouts = project_layers(
        [vectors[nm][shown] for nm in names],
        projection,
        seed=seed,
        progress=None if progress is None else (lambda d, total: progress("projection", d, total)),
    )
    timings["projection"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    return Embeddings(
        model_name=lm.name,
        weights=lm.weights,
        preprocessing=lm.preprocessing,
        source=imgs.source,
        label_source=imgs.label_source,
        ids=imgs.ids,
        labels=imgs.labels,
        classes=classes,
        layers=tuple(table),
        chosen=tuple(chosen),
        dims=dims,
        vectors=vectors,
        full=full,
        projection=projection,
        shown=shown,
        projections=dict(zip(names, layouts, strict=True)),
        separability=seps,
        cka=cka.compute().numpy() if cka.hsic is not None else np.full((len(names),) * 2, np.nan),
        predictions=predictions,
        confidence=confidence,
        thumbnails=thumbs,
        prediction_names=_class_names(lm, predictions),
        settings=settings,
        timings=timings,
    )
