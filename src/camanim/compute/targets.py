"""Targets: callables from the model output ``(B, K)`` to one score per sample ``(B,)``.

The gradient-based methods differentiate the summed scores; since samples do not interact in eval mode,
each sample's gradients are those of its own score. The output ``(B, K)`` itself is read from whatever the
network returns (a tensor, tuple, dict or dataclass) by an :class:`OutputSelector`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from camanim.errors import ClassNotFoundError, ModelOutputError, TargetError


class Target(Protocol):
    """Anything that maps the model output ``(B, K)`` to scores ``(B,)``."""

    def __call__(self, output: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class ClassLogit:
    """The logit of one class per sample (grad-cam's ``ClassifierOutputTarget``).

    Attributes:
        classes: one class index per sample (``len == B``), or a single index for every sample.
    """

    classes: tuple[int, ...]

    def __call__(self, output: Tensor) -> Tensor:
        idx = torch.as_tensor(self.classes, device=output.device).expand(output.shape[0])
        return output.gather(1, idx[:, None])[:, 0]


@dataclass(frozen=True)
class ClassProbability(ClassLogit):
    """The softmax probability of one class per sample (grad-cam's ``ClassifierOutputSoftmaxTarget``)."""

    def __call__(self, output: Tensor) -> Tensor:
        return super().__call__(output.softmax(dim=1))


@dataclass(frozen=True)
class ClassSigmoid(ClassLogit):
    """The sigmoid score of one class per sample, for multi-label heads."""

    def __call__(self, output: Tensor) -> Tensor:
        return super().__call__(output.sigmoid())


TARGET_KINDS = {"logit": ClassLogit, "probability": ClassProbability, "sigmoid": ClassSigmoid}


def _valid(n: int) -> str:
    return f"valid indices are 0..{n - 1}" if n > 0 else "it has no class scores"


def resolve_class(spec: int | str, class_names: Sequence[str], num_classes: int | None = None) -> int:
    """Turn a class index or name (``"tiger cat"``, case-insensitive) into an index.

    Args:
        spec: an index (or a string of digits) or a class name.
        class_names: the model's class names, for names.
        num_classes: ``K``, the size of the model's output ``(B, K)``; default ``len(class_names)``.

    Raises:
        ClassNotFoundError: an unknown name (lists close names).
        TargetError: an index out of range, or a name whose index is not below ``num_classes``.
    """
    n = len(class_names) if num_classes is None else num_classes
    if isinstance(spec, int) or (isinstance(spec, str) and spec.strip().lstrip("-").isdigit()):
        idx = int(spec)
        if not 0 <= idx < n:
            raise TargetError(f"class index {idx} is out of range: the model has {n} classes ({_valid(n)})")
        return idx
    lowered = [c.lower() for c in class_names]
    key = spec.strip().lower()
    if key in lowered:
        idx = lowered.index(key)
        if idx >= n:
            raise TargetError(
                f"class {spec!r} is index {idx} of the class names, but the model outputs {n} classes ({_valid(n)})"
            )
        return idx
    raise ClassNotFoundError(spec, class_names)


OutputSpec = str | int | Callable[[Any], Tensor] | None
"""How the class scores are read from a model's output: ``None`` (automatic), a key, an index or a callable."""


def _is_scores(value: Any) -> bool:
    """Whether ``value`` is a tensor shaped like class scores ``(B, K)``."""
    return isinstance(value, Tensor) and value.dim() == 2


def _kind(value: Any) -> str:
    """A short description of one item of a model's output, for messages."""
    if isinstance(value, Tensor):
        return f"tensor {tuple(value.shape)}"
    return "None" if value is None else type(value).__name__


def _entries(out: Any) -> list[tuple[str | int, Any]] | None:
    """The named or numbered items of a mapping, tuple/list or dataclass instance; None for anything else."""
    if isinstance(out, Mapping):
        return list(out.items())
    if isinstance(out, (tuple, list)):
        return list(enumerate(out))
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return [(f.name, getattr(out, f.name)) for f in dataclasses.fields(out)]
    return None


def _summary(out: Any) -> str:
    """What a model returned, as ``a dict with keys 'a' (tensor (1, 8)), 'b' (str)``."""
    items = _entries(out)
    name = type(out).__name__
    if items is None:
        return f"a {_kind(out)}" if isinstance(out, Tensor) else f"a {name}"
    shown = items[:8]
    more = f", ... ({len(items)} in all)" if len(items) > len(shown) else ""
    if isinstance(out, (tuple, list)) and not isinstance(out, Mapping):
        body = ", ".join(f"[{k}] {_kind(v)}" for k, v in shown)
        return f"a {name} of {len(items)} items: {body}{more}" if items else f"an empty {name}"
    what = "keys" if isinstance(out, Mapping) else "fields"
    body = ", ".join(f"{k!r} ({_kind(v)})" for k, v in shown)
    return f"a {name} with {what} {body}{more}" if items else f"an empty {name}"


def _suggestion(out: Any) -> str:
    """How to point the selector at the most likely tensor of ``out`` (a key or index), for messages."""
    items = _entries(out) or []
    pick = next((k for k, v in items if _is_scores(v)), None)
    if pick is None:
        pick = next((k for k, v in items if isinstance(v, Tensor)), None)
    if pick is None:
        return "pass output=<a callable> that returns the (B, K) class scores from it"
    return (
        f"pass output={pick!r} (CLI: --output {pick}) to use that tensor, another key or index, "
        "or a callable that returns the (B, K) class scores"
    )


ScoresPath = tuple[str, str | int]
"""Where the scores sit in a model's output: ``("self", "")``, ``("key", k)``, ``("attr", name)``,
``("item", i)`` or ``("field", name)``."""


def _follow(out: Any, path: ScoresPath) -> Any:
    kind, key = path
    if kind == "self":
        return out
    return out[key] if kind in ("key", "item") else getattr(out, key)


class OutputSelector:
    """Reads the class scores ``(B, K)`` out of whatever a model returns.

    Args:
        spec: ``None`` (automatic): the output itself if it is a tensor; else its ``logits`` (key or
            attribute); else a mapping's ``out``; else the first ``(B, K)`` tensor of a tuple/list or of a
            dataclass's fields. A ``str`` is a key (mapping) or attribute name; an ``int`` an index into a
            tuple/list, a mapping's values or a dataclass's fields; a callable maps the raw output to the
            scores.

    Under ``torch.fx`` symbolic tracing (camanim's Conv-BN folding) nothing can be checked: the automatic
    mode then follows the path it found at the last real forward.

    Raises:
        ModelOutputError: ``spec`` is of another type; or, when called, nothing fits or the scores chosen
            are not a ``(B, K)`` tensor (the message says what the model returned).
    """

    #: What the selected output must be: class scores ``(B, K)``, maps ``(B, K, H, W)``, a vector ``(B,)`` or
    #: ``(B, D)``, or anything (the task's target checks it).
    EXPECT = {"scores": (2,), "maps": (4,), "vector": (1, 2), "any": None}

    def __init__(self, spec: OutputSpec = None, expect: str = "scores") -> None:
        if expect not in self.EXPECT:
            raise ModelOutputError(f"expect must be one of {', '.join(self.EXPECT)}, got {expect!r}")
        self.expect = expect
        if isinstance(spec, bool) or not (spec is None or isinstance(spec, (str, int)) or callable(spec)):
            raise ModelOutputError(
                f"output must be a key (str), an index (int) or a callable returning the (B, K) class "
                f"scores, got {type(spec).__name__} {spec!r}"
            )
        self.spec = spec
        self.found: str | None = None  # automatic mode: how the last output was read ...
        self.path: ScoresPath | None = None  # ... and where the scores were in it

    def describe(self) -> str:
        """How the scores are chosen, for manifests: ``auto: key 'logits' of a dict``, ``index 0``, ..."""
        if self.spec is None:
            return "auto" + (f": {self.found}" if self.found else "")
        if isinstance(self.spec, str):
            return f"key {self.spec!r}"
        if isinstance(self.spec, int):
            return f"index {self.spec}"
        return f"callable {getattr(self.spec, '__qualname__', None) or repr(self.spec)}"

    def __repr__(self) -> str:
        return f"OutputSelector({self.describe()})"

    def __call__(self, out: Any) -> Tensor:
        """The class scores ``(B, K)`` of a raw model output."""
        if self.spec is None:
            if _traced(out):
                if self.path is None and not isinstance(out, torch.fx.Proxy):
                    raise ModelOutputError(
                        "cannot trace the model's output before a forward pass has read it"
                    )
                return _follow(out, self.path or ("self", ""))
            scores, how, path = self._auto(out)
        else:
            scores, how = self._pick(out)
            if _traced(out):
                return scores
        dims = self.EXPECT[self.expect]
        if dims is not None:
            if not isinstance(scores, Tensor):
                raise ModelOutputError(
                    f"the output chosen from the model's output ({how}) is {_kind(scores)}, not a tensor; "
                    f"the model returned {_summary(out)}"
                )
            if scores.dim() not in dims:
                raise ModelOutputError(
                    f"the output chosen from the model's output ({how}) has shape {tuple(scores.shape)}, "
                    + (
                        "not (B, K): camanim explains a classifier's scores here; pass output= the key or index "
                        "of a (B, K) tensor, or a callable that reduces this one (for (B, K, H, W) maps, a mean "
                        "over H and W, say), or a target for the task (segmentation, regression...)"
                        if self.expect == "scores"
                        else f"not the {self.expect} this target needs"
                    )
                    + (f"; the model returned {_summary(out)}" if not isinstance(out, Tensor) else "")
                )
        if self.spec is None and not torch.compiler.is_compiling():
            self.found, self.path = how, path
        return scores

    def _auto(self, out: Any) -> tuple[Any, str, ScoresPath]:
        name = type(out).__name__
        if isinstance(out, Tensor):
            return out, "the output itself", ("self", "")
        if isinstance(out, Mapping):
            for key in ("logits", "out"):
                if isinstance(out.get(key), Tensor):
                    return out[key], f"key {key!r} of a {name}", ("key", key)
        elif isinstance(getattr(out, "logits", None), Tensor):
            return out.logits, f"attribute 'logits' of a {name}", ("attr", "logits")
        if isinstance(out, (tuple, list)) or (dataclasses.is_dataclass(out) and not isinstance(out, type)):
            for key, value in _entries(out) or []:
                if _is_scores(value):
                    if isinstance(key, int):
                        return value, f"item {key} of a {name}", ("item", key)
                    return value, f"field {key!r} of a {name}", ("field", key)
        what = "no 'logits' or 'out' entry" if isinstance(out, Mapping) else "no tensor of shape (B, K)"
        raise ModelOutputError(
            f"the model returned {_summary(out)} ({what}), and camanim needs its class scores (B, K): "
            + _suggestion(out)
        )

    def _pick(self, out: Any) -> tuple[Any, str]:
        spec, name = self.spec, type(out).__name__
        if callable(spec) and not isinstance(spec, (str, int)):
            return spec(out), self.describe()
        if isinstance(out, torch.fx.Proxy):
            return (getattr(out, spec) if isinstance(spec, str) else out[spec]), self.describe()
        if isinstance(out, Tensor):
            raise ModelOutputError(
                f"output={spec!r} picks from a tuple, dict or dataclass, but the model returned {_summary(out)} "
                "itself; leave output unset (no --output)"
            )
        if isinstance(spec, str):
            if isinstance(out, Mapping):
                if spec in out:
                    return out[spec], f"key {spec!r} of a {name}"
            elif hasattr(out, spec):
                return getattr(out, spec), f"attribute {spec!r} of a {name}"
            raise ModelOutputError(
                f"the model returned {_summary(out)}: it has no {spec!r}; " + _suggestion(out)
            )
        items = _entries(out)
        if items is not None and -len(items) <= spec < len(items):
            key, value = items[spec]
            label = f"item {spec}" if isinstance(key, int) else f"item {spec} ({key!r})"
            return value, f"{label} of a {name}"
        raise ModelOutputError(
            f"output={spec} is not an index of what the model returned, {_summary(out)}; " + _suggestion(out)
        )


def _traced(out: Any) -> bool:
    """Whether ``out`` is (or holds) a ``torch.fx`` proxy: the model is being traced symbolically."""
    if isinstance(out, torch.fx.Proxy):
        return True
    items = _entries(out)
    if items is None:
        items = [("logits", getattr(out, "logits", None))]
    return any(isinstance(v, torch.fx.Proxy) for _, v in items)
