"""The method base class and the registry by name.

A method turns one layer's value ``A`` and gradient ``G`` (both ``(B, C, h, w)``) into a *raw* map
``(B, h, w)``: before ReLU, before upsampling, before any normalisation. Those steps are separate
(:mod:`camanim.normalize`) so that global normalisation over layers stays exact.

Methods override one of two levels, as pytorch-grad-cam does: :meth:`CAMMethod.channel_weights` returns
``(B, C)`` weights and the base forms ``sum_c w_c A_c``; or :meth:`CAMMethod.raw_map` returns the whole map.
Both receive a :class:`LayerTensors`, which holds ``A``, ``G`` and intermediates shared between methods.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from typing import Any, ClassVar

import torch
from torch import Tensor

from camanim.compute.methods.projection import first_component_projection
from camanim.errors import MethodNotFoundError

_REGISTRY: dict[str, type[CAMMethod]] = {}
_ALIASES: dict[str, str] = {}


class LayerTensors:
    """One layer's value ``A`` and gradient ``G`` (``(B, C, h, w)``), with derived tensors computed once.

    Several methods need the same intermediate (``G * A``, per-channel sums); computing it once per layer
    for all of them keeps an all-method sweep close to the cost of the capture itself.

    Attributes:
        acts: ``A``, ``(B, C, h, w)``.
        grads: ``G``, ``(B, C, h, w)``, or ``None`` when no gradient reached the layer.
        key: the layer's name (seeded methods derive their draw from it).
        options: method options by name, as given to ``explain`` (``kernel`` of KPCA-CAM...).
    """

    def __init__(
        self, acts: Tensor, grads: Tensor | None, key: str = "", options: Mapping[str, Any] | None = None
    ) -> None:
        self.acts, self.grads, self.key = acts, grads, key
        self.options: Mapping[str, Any] = options or {}

    @cached_property
    def grads_times_acts(self) -> Tensor:
        """``G * A``, ``(B, C, h, w)``."""
        return self.grads * self.acts

    @cached_property
    def act_sums(self) -> Tensor:
        """``sum_ij A``, ``(B, C, 1, 1)``."""
        return self.acts.sum(dim=(2, 3), keepdim=True)


class CAMMethod:
    """Base of every CAM method.

    Class attributes (capabilities, read by callers instead of per-method ``if``s):
        name: registry name.
        paper: the paper the rule comes from.
        needs_gradients: whether the map uses the gradient.
        class_discriminative: whether the map depends on the target class.
        cost: ``"one_pass"`` (computed from the shared capture), ``"one_pass_quadratic"`` (from the shared
            capture too, but with time and memory quadratic in a layer's positions, so ``"all"`` leaves it
            out), ``"per_channel"`` (extra forwards per channel) or ``"multi_pass"`` (passes of its own:
            :mod:`.passes`).
        passes: the forward and backward passes it needs for ``N`` layers, in words (``camanim explain
            --help`` and the README show it); empty for the default of its cost class (:func:`pass_summary`).
        relu: whether the displayed map is the raw map after ReLU (true for every method here, as in grad-cam).
        volumes: whether the method is defined for volume layers ``(B, C, d, h, w)``. A volume layer reaches
            :meth:`raw_map` as ``(B, C, d * h, w)`` (:func:`camanim.compute.layers.as_bchw`), which gives the
            volume's map exactly for a rule that pools over all positions or works position by position
            (channel weights from sums or means over positions, products ``G * A``, principal components of
            the per-position vectors); methods whose rule uses the grid itself (upsampling to the input,
            masks, neighbourhoods) or extra passes leave it false and are refused for volumes.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    needs_gradients: ClassVar[bool] = True
    class_discriminative: ClassVar[bool] = True
    cost: ClassVar[str] = "one_pass"
    passes: ClassVar[str] = ""
    relu: ClassVar[bool] = True
    volumes: ClassVar[bool] = False

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    @property
    def uses_channel_weights(self) -> bool:
        """Whether the method defines its map through :meth:`channel_weights` (so maps can be batched)."""
        return type(self).raw_map is CAMMethod.raw_map

    def channel_weights(self, t: LayerTensors) -> Tensor:
        """Channel weights ``(B, C)`` of one layer."""
        raise NotImplementedError

    def weighted_terms(self, t: LayerTensors) -> Tensor | None:
        """The terms ``(B, C, h, w)`` whose sum over channels is the map (``w_c A_c`` for channel-weight
        methods); ``eigen_smooth`` projects them on their first principal component instead. None for maps
        that are no channel sum (EigenCAM's own projection)."""
        if self.uses_channel_weights:
            return self.channel_weights(t).to(t.acts.dtype)[:, :, None, None] * t.acts
        return None

    def term_magnitude(self, t: LayerTensors) -> Tensor | None:
        """``sum_c |term_c|`` ``(B, h, w)`` when the map is a signed sum over channels that can cancel to zero
        exactly (see :func:`rounding_noise`); None for maps that cannot (the default)."""
        return None

    def raw_map(self, t: LayerTensors) -> Tensor:
        """The raw map ``(B, h, w)``: by default ``sum_c w_c A_c`` with :meth:`channel_weights`."""
        return torch.einsum("bc,bchw->bhw", self.channel_weights(t).to(t.acts.dtype), t.acts)

    def __call__(
        self,
        acts: Tensor,
        grads: Tensor | None = None,
        layer_key: str = "",
        options: Mapping[str, Any] | None = None,
    ) -> Tensor:
        """The raw map ``(B, h, w)`` from ``acts`` and ``grads`` ``(B, C, h, w)``."""
        if self.needs_gradients and grads is None:
            raise ValueError(f"{self.name} needs gradients")
        return self.raw_map(LayerTensors(acts, grads, layer_key, options))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def compute_maps(
    methods: Mapping[str, CAMMethod], t: LayerTensors, *, eigen_smooth: bool = False
) -> dict[str, Tensor]:
    """Every method's raw map ``(B, h, w)`` at one layer.

    Shared intermediates are computed once (:class:`LayerTensors`), and the maps of all channel-weight
    methods come from one batched product with ``A`` rather than one pass over ``A`` each. With
    ``eigen_smooth`` each map is instead the projection of the method's weighted terms on their first
    principal component (grad-cam's ``eigen_smooth``; :meth:`CAMMethod.weighted_terms`); a method without
    such terms keeps its map.
    """
    if eigen_smooth:
        return {n: m for n, m in _eigen_smoothed(methods, t).items()}
    out: dict[str, Tensor] = {}
    weighted = [
        n
        for n, m in methods.items()
        if m.uses_channel_weights and not (m.needs_gradients and t.grads is None)
    ]
    if weighted:
        w = torch.stack(
            [methods[n].channel_weights(t).to(t.acts.dtype) for n in weighted], dim=1
        )  # (B, M, C)
        b, c, h, wd = t.acts.shape
        maps = torch.bmm(w, t.acts.reshape(b, c, h * wd)).reshape(b, len(weighted), h, wd)
        out.update({n: maps[:, i] for i, n in enumerate(weighted)})
    for n, m in methods.items():
        if n not in out and not (m.needs_gradients and t.grads is None):
            out[n] = m.raw_map(t)
    return {n: out[n] for n in methods if n in out}


def _eigen_smoothed(methods: Mapping[str, CAMMethod], t: LayerTensors) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for n, m in methods.items():
        if m.needs_gradients and t.grads is None:
            continue
        terms = m.weighted_terms(t)
        out[n] = m.raw_map(t) if terms is None else first_component_projection(terms)
    return out


def rounding_noise(
    methods: Mapping[str, CAMMethod], t: LayerTensors, maps: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Samples whose map is only the rounding noise of its terms: ``{method: (B,) bool}``.

    A map that sums signed terms over the ``C`` channels is below the rounding level of its terms when at
    every position ``|sum_c x_c| <= C * eps * sum_c |x_c|`` (``eps`` of the map's dtype: the worst case of a
    float sum). It happens for ``sum_c G * A`` (HiResCAM) at a layer that feeds only a LayerNorm: LayerNorm
    ignores shifts and scales of its input along the channels, so its input gradient satisfies
    ``sum_c G_c = 0`` and ``sum_c G_c A_c = 0`` (ConvNeXt's stem; in a ViT the input of the last block,
    whose patch tokens reach the class token only through ``norm1``). What is left comes from rounding and
    from the LayerNorm's ``eps`` (measured on a ViT-Tiny's ``blocks.10``: 5e-7 of the terms in float32 and
    in float64 alike, 6e-17 in float64 with ``eps = 0``): no evidence, so such maps are shown as zero and
    flagged. Methods whose :meth:`CAMMethod.term_magnitude` is None are not checked: channel-weighted maps
    such as Grad-CAM's are not zero there (the tests measure every method at such layers).
    """
    out: dict[str, Tensor] = {}
    for n, m in maps.items():
        magnitude = methods[n].term_magnitude(t)
        if magnitude is None:
            continue
        level = t.acts.shape[1] * torch.finfo(m.dtype).eps * magnitude
        noise = (m.abs() <= level).flatten(1).all(dim=1)
        if bool(noise.any()):
            out[n] = noise
    return out


def register_method(name: str, *aliases: str):
    """Class decorator adding a :class:`CAMMethod` subclass to the registry under ``name`` (and aliases)."""

    def wrap(cls: type[CAMMethod]) -> type[CAMMethod]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        for alias in aliases:
            _ALIASES[alias] = name
        return cls

    return wrap


#: Listing order of the method families (modules of :mod:`camanim.compute.methods`); others come last.
FAMILY_ORDER = (
    "gradient",
    "eigen",
    "second_order",
    "finer",
    "guided",
    "perturbation",
    "classifier",
    "activation",
    "factorization",
    "fullgrad",
    "sampling",
    "score",
    "refine",
    "scale",
    "attention",
)

#: What a method of each cost class needs for ``N`` layers, unless it says more (:attr:`CAMMethod.passes`).
PASSES_BY_COST = {
    "one_pass": "the shared capture: 1 forward + 1 backward for all N layers",
    "one_pass_quadratic": "the shared capture: 1 forward + 1 backward for all N layers",
    "per_channel": "sum over the N layers of C_l forwards per image (batched), no backward",
    "multi_pass": "passes of its own (see its docstring)",
}


def pass_summary(cls: type[CAMMethod]) -> str:
    """The passes a method needs for ``N`` layers, in words: its own :attr:`~CAMMethod.passes` or its cost
    class's default."""
    return cls.passes or PASSES_BY_COST.get(cls.cost, cls.cost)


def _family_rank(cls: type[CAMMethod]) -> int:
    family = cls.__module__.rsplit(".", 1)[-1]
    return FAMILY_ORDER.index(family) if family in FAMILY_ORDER else len(FAMILY_ORDER)


def list_methods(
    *, one_pass: bool | None = None, needs_gradients: bool | None = None, volumes: bool | None = None
) -> list[str]:
    """Registered method names, family by family (:data:`FAMILY_ORDER`) and in registration order within a
    family, optionally filtered by capability (``volumes``: defined for volume layers)."""
    ordered = sorted(_REGISTRY.items(), key=lambda item: _family_rank(item[1]))  # stable within a family
    return [
        n
        for n, cls in ordered
        if (one_pass is None or (cls.cost == "one_pass") == one_pass)
        and (needs_gradients is None or cls.needs_gradients == needs_gradients)
        and (volumes is None or cls.volumes == volumes)
    ]


def method_class(name: str) -> type[CAMMethod]:
    """The registered class for ``name`` (case-insensitive; aliases such as ``gradcam++`` accepted)."""
    key = name.strip().lower().replace("-", "").replace("_", "")
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise MethodNotFoundError(name, list(_REGISTRY) + list(_ALIASES))
    return _REGISTRY[key]


def get_method(name: str, **kwargs) -> CAMMethod:
    """An instance of the method registered as ``name``."""
    return method_class(name)(**kwargs)


def parse_methods(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"gradcam,hirescam"``, ``"all"`` or a list of names to canonical registry names (order kept)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        names = list_methods(one_pass=True) if item.lower() == "all" else [method_class(item).name]
        out += [n for n in names if n not in out]
    if not out:
        raise MethodNotFoundError(str(spec), list_methods())
    return out
