"""The method base class and the registry by name.

A method turns one layer's value ``A`` and gradient ``G`` (both ``(B, C, h, w)``) into a *raw* map
``(B, h, w)``: before ReLU, before upsampling, before any normalisation. Those steps are separate
(:mod:`camanim.normalize`) so that global normalisation over layers stays exact.

Methods override one of two levels, as pytorch-grad-cam does: :meth:`CAMMethod.channel_weights` returns
``(B, C)`` weights and the base forms ``sum_c w_c A_c``; or :meth:`CAMMethod.raw_map` returns the whole map.
"""

from __future__ import annotations

import importlib
from typing import ClassVar

import torch
from torch import Tensor

from camanim.errors import MethodNotFoundError

_REGISTRY: dict[str, type[CAMMethod]] = {}
_ALIASES: dict[str, str] = {}


class CAMMethod:
    """Base of every CAM method.

    Class attributes (capabilities, read by callers instead of per-method ``if``s):
        name: registry name.
        paper: the paper the rule comes from.
        needs_gradients: whether the map uses the gradient.
        class_discriminative: whether the map depends on the target class.
        cost: ``"one_pass"`` (computed from the shared capture) or ``"per_channel"`` (extra forwards).
        relu: whether the displayed map is the raw map after ReLU (true for every method here, as in grad-cam).
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    needs_gradients: ClassVar[bool] = True
    class_discriminative: ClassVar[bool] = True
    cost: ClassVar[str] = "one_pass"
    relu: ClassVar[bool] = True

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def channel_weights(self, acts: Tensor, grads: Tensor | None, layer_key: str = "") -> Tensor:
        """Channel weights ``(B, C)`` from ``acts`` and ``grads`` ``(B, C, h, w)``."""
        raise NotImplementedError

    def raw_map(self, acts: Tensor, grads: Tensor | None, layer_key: str = "") -> Tensor:
        """The raw map ``(B, h, w)``: by default ``sum_c w_c A_c`` with :meth:`channel_weights`."""
        weights = self.channel_weights(acts, grads, layer_key)
        return torch.einsum("bc,bchw->bhw", weights.to(acts.dtype), acts)

    def __call__(self, acts: Tensor, grads: Tensor | None, layer_key: str = "") -> Tensor:
        if self.needs_gradients and grads is None:
            raise ValueError(f"{self.name} needs gradients")
        return self.raw_map(acts, grads, layer_key)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


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


_FAMILIES = ("gradient", "eigen")


def _load_families() -> None:
    # Importing the family modules runs their @register_method decorators; the order sets the listing order.
    for family in _FAMILIES:
        importlib.import_module(f"camanim.methods.{family}")


def list_methods(*, one_pass: bool | None = None, needs_gradients: bool | None = None) -> list[str]:
    """Registered method names, in registration order, optionally filtered by capability."""
    _load_families()
    return [
        n
        for n, cls in _REGISTRY.items()
        if (one_pass is None or (cls.cost == "one_pass") == one_pass)
        and (needs_gradients is None or cls.needs_gradients == needs_gradients)
    ]


def method_class(name: str) -> type[CAMMethod]:
    """The registered class for ``name`` (case-insensitive; aliases such as ``gradcam++`` accepted)."""
    _load_families()
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
