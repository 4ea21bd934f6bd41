"""The model-randomisation sanity check, layer by layer (Adebayo et al., NeurIPS 2018), from one capture per
randomisation depth.

A private copy of the model is randomised cascading from the top (the logits) down
(:func:`camanim.compute.metrics.sanity.randomise_cascade`); at each depth one capture
(:func:`camanim.pipelines.explain.explain`) gives every chosen layer's map for every method, for the
original's input and target class. Each map is compared with the original model's map of the same method and
layer (:func:`camanim.compute.metrics.sanity.similarity`: Spearman rank correlation, SSIM, HOG similarity): a
depth x layer table per method and measure.

A method passes when its maps change once the weights behind them are random: at full randomisation the
similarity of its maps to the original's is low. One that fails (an edge detector, a map of the input alone)
keeps showing the same map however much of the model is destroyed. :attr:`SanityResult.verdicts` applies
one rule: the median over layers of the Spearman similarity at full randomisation is below ``threshold``
(0.5 by default).

Example:
    >>> from camanim.pipelines.sanity import sanity
    >>> res = sanity("efficientnet_lite0", "chelsea", methods="gradcam,eigencam", depths=8)  # doctest: +SKIP
    >>> res.similarity["spearman"].shape  # (methods, depths + 1, layers)  # doctest: +SKIP
    >>> res.verdicts()  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from camanim.compute.layers import Layer, LayerSpec
from camanim.compute.metrics.sanity import (
    MEASURES,
    SanityError,
    default_depths,
    hog_features,
    parameterised_modules,
    parse_measures,
    randomise_cascade,
    ranks,
    similarity,
)
from camanim.compute.models import DEFAULT_MODEL, InputSize
from camanim.errors import UnknownNameError
from camanim.pipelines.explain import as_loaded, explain
from camanim.pipelines.ybroad import _image_label

__all__ = ["DEFAULT_DEPTHS", "SanityResult", "sanity"]

log = logging.getLogger(__name__)

#: Default number of randomisation depths (spread over the parameterised modules).
DEFAULT_DEPTHS = 12
#: Default verdict threshold on the median Spearman similarity at full randomisation.
THRESHOLD = 0.5


@dataclass(frozen=True)
class SanityResult:
    """The cascading randomisation check of one image.

    Its files, heat maps and animation (``save``) are attached by :mod:`camanim.outputs`
    (:mod:`camanim.outputs.sanity`).

    Attributes:
        explanation: the original model's :class:`~camanim.pipelines.explain.Explanation`.
        methods: method names.
        layers: the map layers compared, in forward order.
        modules: the parameterised modules in forward order (randomised from the last).
        depths: ``(D + 1,)`` numbers of top modules randomised; ``depths[0] = 0`` is the original.
        measures: the similarity measures.
        similarity: per measure, ``(methods, D + 1, layers)`` similarity to the original's map (row 0: the
            original against itself).
        maps: ``maps[d][method][layer name]``: the raw map ``(h, w)`` at depth ``depths[d]`` (float32).
        target: the class explained at every depth (the original's); ``target_name`` its name.
        probabilities: ``(D + 1,)`` the target's softmax probability at each depth.
        seed: the randomisation seed.
        timings: seconds per stage.
    """

    explanation: Any = field(repr=False)
    methods: tuple[str, ...]
    layers: tuple[Layer, ...] = field(repr=False)
    modules: tuple[str, ...] = field(repr=False)
    depths: tuple[int, ...]
    measures: tuple[str, ...]
    similarity: dict[str, np.ndarray] = field(repr=False)
    maps: tuple[dict[str, dict[str, np.ndarray]], ...] = field(repr=False)
    target: int = 0
    target_name: str = ""
    probabilities: tuple[float, ...] = ()
    seed: int = 0
    timings: dict[str, float] = field(default_factory=dict, repr=False)

    @property
    def model_name(self) -> str:
        """The model's name."""
        return self.explanation.model_name

    @property
    def image_name(self) -> str:
        """A short name of the image."""
        return _image_label(self.explanation.image_info)

    def depth_label(self, d: int) -> str:
        """What depth position ``d`` means: ``"original"``, or how many modules are random and the deepest."""
        k = self.depths[d]
        if k == 0:
            return "original"
        return f"top {k}/{len(self.modules)} random (down to {self.modules[len(self.modules) - k]})"

    def table(self, method: str, measure: str = "spearman") -> np.ndarray:
        """``(D + 1, layers)`` similarity of ``method``'s maps by ``measure``."""
        if method not in self.methods:
            raise UnknownNameError("method", method, list(self.methods))
        if measure not in self.similarity:
            raise UnknownNameError("similarity measure", measure, list(self.similarity))
        return self.similarity[measure][self.methods.index(method)]

    def final_similarity(self, method: str, measure: str = "spearman") -> np.ndarray:
        """``(layers,)`` similarity at full randomisation (the last depth)."""
        return self.table(method, measure)[-1]

    def verdicts(self, threshold: float = THRESHOLD, measure: str = "spearman") -> dict[str, dict[str, Any]]:
        """Per method: the median over layers of ``measure`` at the deepest randomisation, and whether it is
        below ``threshold`` (the maps depend on the weights: passes)."""
        out = {}
        for m in self.methods:
            v = self.final_similarity(m, measure)
            med = float(np.nanmedian(v)) if np.isfinite(v).any() else float("nan")
            out[m] = {
                "measure": measure,
                "depth": self.depths[-1],
                "median": med,
                "threshold": threshold,
                "passes": bool(med < threshold) if np.isfinite(med) else False,
                "layers_changed": int(np.sum(v < threshold)),
                "layers": int(v.size),
            }
        return out

    def rows(self) -> list[dict[str, Any]]:
        """One row per method, depth and layer: the similarity by every measure."""
        out = []
        for i, m in enumerate(self.methods):
            for d, k in enumerate(self.depths):
                deepest = "" if k == 0 else self.modules[len(self.modules) - k]
                for j, layer in enumerate(self.layers):
                    row = {
                        "method": m,
                        "depth": k,
                        "randomised_down_to": deepest,
                        "position": j,
                        "index": layer.index,
                        "layer": layer.name,
                    }
                    row.update({s: float(self.similarity[s][i, d, j]) for s in self.measures})
                    out.append(row)
        return out

    def describe(self) -> dict[str, Any]:
        """The summary written as ``sanity.json`` and in the manifest."""
        return {
            "definition": {
                "check": "cascading model-parameter randomisation (Adebayo et al., NeurIPS 2018), on a copy",
                "order": "modules owning parameters in forward order, randomised from the last (the logits) "
                "down; depth k = the last k randomised",
                "randomisation": "reset_parameters() of each module (as Quantus 0.6 MPRT), else N(0, std of "
                "the original) per parameter; seeded per module",
                "maps": "every chosen layer's map from one capture per depth, target = the original's class",
                "spearman": "Spearman rank correlation of the upsampled maps' pixels",
                "ssim": "scikit-image structural_similarity of the maps min-max scaled to [0, 1]",
                "hog": "Pearson correlation of the scaled maps' HOG features (9 orientations, 8x8 cells, 3x3 "
                "blocks)",
                "verdict": "passes when the median over layers of the Spearman similarity at full "
                "randomisation is below the threshold",
            },
            "model": self.model_name,
            "weights": self.explanation.weights,
            "image": self.image_name,
            "target": {"class": self.target, "name": self.target_name},
            "methods": list(self.methods),
            "layers": [layer.name for layer in self.layers],
            "modules": len(self.modules),
            "depths": list(self.depths),
            "depth_labels": [self.depth_label(d) for d in range(len(self.depths))],
            "measures": list(self.measures),
            "probabilities": list(self.probabilities),
            "seed": self.seed,
            "verdicts": self.verdicts(),
            "timings": dict(self.timings),
        }


def sanity(
    model: Any = None,
    image: Any = "chelsea",
    *,
    methods: str | Sequence[str] = "gradcam",
    layers: LayerSpec = "all",
    depths: int | Sequence[int] | None = DEFAULT_DEPTHS,
    measures: str | Sequence[str] = MEASURES,
    target: int | str | None = None,
    seed: int = 0,
    score: str = "logit",
    keep_nonspatial: bool = False,
    device: str | torch.device | None = None,
    input_size: InputSize = None,
    progress: Any = None,
) -> SanityResult:
    """Randomise a copy of the model from the top down and compare every layer's map with the original's.

    Args:
        model: a :class:`~camanim.models.LoadedModel`, an ``nn.Module`` or a model name (default: the
            embedded default model); never changed (a deep copy is randomised).
        image: one image source or a preprocessed ``(1, 3, H, W)`` tensor.
        methods: method names or a list.
        layers: the map layers (see :func:`camanim.layers.select_layers`); default every spatial layer.
        depths: how many cascade depths: an int (spread evenly from the top module alone to every module;
            default 12), ``None`` for every module one at a time, or explicit increasing numbers of top
            modules randomised.
        measures: ``"spearman"``, ``"ssim"``, ``"hog"`` (comma-separated) or ``"all"`` (default all).
        target: the class explained at every depth; default the original's top-1 class.
        seed: seed of the re-initialisations (and of seeded methods).
        score: what the CAM differentiates.
        keep_nonspatial: include 1x1 layers.
        device: where to run.
        input_size: the input size instead of the model's.
        progress: called with ``(depths done, depths total)``.

    Returns:
        A :class:`SanityResult`.
    """
    t0 = time.perf_counter()
    names = parse_measures(measures)
    lm = as_loaded(model if model is not None else DEFAULT_MODEL, device)
    ex = explain(
        lm, image, methods=methods, layers=layers, target=target, score=score,
        keep_nonspatial=keep_nonspatial, device=device, seed=seed, input_size=input_size,
    )  # fmt: skip
    timings = {"explain": time.perf_counter() - t0}
    if ex.input.shape[0] != 1:
        raise UnknownNameError("image", "a batch", ["one image"])
    if ex.input.dim() == 5:
        raise SanityError(
            "the randomisation check compares 2-D maps (SSIM, HOG, its figures); volumes and clips are not "
            "supported (camanim road and faithfulness score them)"
        )
    x = ex.input
    tgt = int(ex.targets[0])
    chosen = tuple(ex.chosen)
    layer_names = [layer.name for layer in chosen]
    meths = tuple(ex.methods)
    dev = next(lm.model.parameters()).device
    order = parameterised_modules(lm.model, x.to(dev))
    ds = default_depths(len(order), depths) if depths is None or isinstance(depths, int) else list(depths)

    def upsampled(e: Any) -> np.ndarray:  # (methods * layers, H, W)
        return np.stack([e.upsampled(m, n)[0].numpy() for m in meths for n in layer_names]).astype(np.float64)

    t = time.perf_counter()
    ref = upsampled(ex)
    ref_ranks = ranks(ref) if "spearman" in names else None
    ref_hog = hog_features(ref) if "hog" in names else None
    # the original against itself: 1, or NaN where the measure is undefined (a constant map)
    first = similarity(ref, ref, names, a_ranks=ref_ranks, a_hog=ref_hog)
    sims = {s: [first[s]] for s in names}
    maps = [{m: {n: ex.maps[m][n][0].numpy() for n in layer_names} for m in meths}]
    probs = [float(ex.probabilities[0, tgt])]
    timings["similarity"] = time.perf_counter() - t
    timings["randomised captures"] = 0.0
    if progress is not None:
        progress(0, len(ds))
    for i, (k, twin) in enumerate(randomise_cascade(lm.model, order, ds, seed)):
        t = time.perf_counter()
        rl = dataclasses.replace(lm, model=twin)
        e = explain(
            rl, x, methods=meths, layers=layer_names, target=tgt, score=score, keep_nonspatial=True,
            keep_duplicates=True, seed=seed,
        )  # fmt: skip
        timings["randomised captures"] += time.perf_counter() - t
        t = time.perf_counter()
        got = upsampled(e)
        sim = similarity(ref, got, names, a_ranks=ref_ranks, a_hog=ref_hog)
        for s in names:
            sims[s].append(sim[s])
        maps.append({m: {n: e.maps[m][n][0].numpy() for n in layer_names} for m in meths})
        probs.append(float(e.probabilities[0, tgt]))
        timings["similarity"] += time.perf_counter() - t
        log.debug("sanity: depth %d (%d of %d) done", k, i + 1, len(ds))
        if progress is not None:
            progress(i + 1, len(ds))
    n_m, n_l = len(meths), len(layer_names)
    similarity_ = {s: np.stack(v).reshape(len(ds) + 1, n_m, n_l).transpose(1, 0, 2) for s, v in sims.items()}
    timings["total"] = time.perf_counter() - t0
    log.info("sanity: %d depths x %d layers x %d methods in %.1f s", len(ds), n_l, n_m, timings["total"])
    return SanityResult(
        explanation=ex,
        methods=meths,
        layers=chosen,
        modules=tuple(n for n, _ in order),
        depths=(0, *ds),
        measures=names,
        similarity=similarity_,
        maps=tuple(maps),
        target=tgt,
        target_name=ex.target_names[0],
        probabilities=tuple(probs),
        seed=int(seed),
        timings=timings,
    )
