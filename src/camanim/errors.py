"""Exceptions raised by camanim.

Every error subclasses :class:`CamanimError` and a builtin, so callers may catch either. Errors about a
name the user typed (model, layer, method, class) list the closest valid names.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class CamanimError(Exception):
    """Base class of every camanim error."""


def close_matches(name: str, choices: Iterable[str], n: int = 5) -> list[str]:
    """Return up to ``n`` entries of ``choices`` that look like ``name`` (case-insensitive)."""
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    hits = difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.6)
    # Substring hits help for long names such as "layer4.1.conv2" when the user typed "conv2".
    subs = [c for c in choices if name.lower() in c.lower() and c not in hits]
    return ([lowered[h] for h in hits] + subs)[:n]


class UnknownNameError(CamanimError, KeyError):
    """A name the user gave does not exist; the message lists close matches."""

    def __init__(self, kind: str, name: str, choices: Iterable[str], hint: str = "") -> None:
        choices = list(choices)
        self.kind, self.name, self.matches = kind, name, close_matches(str(name), choices)
        msg = f"unknown {kind} {name!r}"
        if self.matches:
            msg += "; did you mean: " + ", ".join(repr(m) for m in self.matches) + "?"
        elif choices and len(choices) <= 20:
            msg += "; valid: " + ", ".join(repr(c) for c in choices)
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)

    def __str__(self) -> str:  # KeyError would otherwise quote the whole message
        return str(self.args[0])


class ModelNotFoundError(UnknownNameError):
    """Unknown model name."""

    def __init__(self, name: str, choices: Iterable[str], hint: str = "") -> None:
        super().__init__("model", name, choices, hint)


class LayerNotFoundError(UnknownNameError):
    """Unknown layer name or pattern."""

    def __init__(self, name: str, choices: Iterable[str], hint: str = "") -> None:
        super().__init__("layer", name, choices, hint)


class MethodNotFoundError(UnknownNameError):
    """Unknown CAM method name."""

    def __init__(self, name: str, choices: Iterable[str], hint: str = "") -> None:
        super().__init__("method", name, choices, hint)


class ClassNotFoundError(UnknownNameError):
    """Unknown target class name."""

    def __init__(self, name: str, choices: Iterable[str], hint: str = "") -> None:
        super().__init__("class", name, choices, hint)


class LayerSelectionError(CamanimError, IndexError):
    """A layer index outside the valid range, or a malformed selection."""


class TargetError(CamanimError, IndexError):
    """A class index outside the model's classes, or targets that do not fit the batch."""


class ImageError(CamanimError, ValueError):
    """An image that cannot be read or is refused (not an image, truncated, too large)."""


class WeightsError(CamanimError, RuntimeError):
    """Weights that cannot be obtained or do not fit the architecture."""


class ModelOutputError(CamanimError, ValueError):
    """A model output from which no class scores ``(B, K)`` can be read (see ``output=``/``--output``)."""


class BundleExistsError(CamanimError, FileExistsError):
    """The output folder exists and is not empty: it is refused, or replaced only when it is a camanim bundle
    holding nothing but what its manifest lists and ``force=True`` (``--force``) is given."""


class OutputError(CamanimError, OSError):
    """The output location cannot be used (protected folder, mount point, read-only, full disk, a file in
    the way) or writing to it failed; the message names the path and the cause."""


class OptionError(CamanimError, ValueError):
    """An option value outside its valid range or an invalid combination of options."""


class DeviceError(CamanimError, ValueError):
    """A device that does not exist on this machine; the message lists the ones that do."""


class MissingExtraError(CamanimError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""


class ModelRunError(CamanimError, RuntimeError):
    """The model's forward pass failed on the input it was given (often an input size it does not take)."""
