"""Old module paths, kept working with a ``DeprecationWarning``.

camanim's modules moved into four floors (``compute``, ``pipelines``, ``outputs``, ``cli``; see
docs/architecture.md). ``import camanim.explanation`` and ``from camanim.road import ybroad`` still work:
a finder on ``sys.meta_path`` answers each old name with a module whose attributes are looked up, in
order, in the new modules that took over its contents, and warns once per old module.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from collections.abc import Sequence
from typing import Any

#: old module -> the new modules its names now live in, searched in this order.
MOVED: dict[str, tuple[str, ...]] = {
    "camanim.animation": (
        "camanim.outputs.animation",
        "camanim.pipelines.animate",
        "camanim.outputs.animation.figures",
        "camanim.outputs.animation.resume",
        "camanim.outputs.animation.frames",
    ),
    "camanim.bundle": ("camanim.outputs.bundle",),
    "camanim.capture": ("camanim.compute.capture",),
    "camanim.comparison": (
        "camanim.pipelines.compare",
        "camanim.outputs.compare",
    ),
    "camanim.devices": ("camanim.compute.devices",),
    "camanim.explanation": (
        "camanim.pipelines.explain",
        "camanim.outputs.explanation",
    ),
    "camanim.figures": ("camanim.outputs.animation.figures",),
    "camanim.frames": (
        "camanim.outputs.animation.frames",
        "camanim.pipelines.animate",
        "camanim.compute.resize",
    ),
    "camanim.fused_frames": (
        "camanim.pipelines.animate",
        "camanim.outputs.animation.fused",
    ),
    "camanim.images": ("camanim.compute.images",),
    "camanim.layers": ("camanim.compute.layers",),
    "camanim.methods": ("camanim.compute.methods",),
    "camanim.methods.base": ("camanim.compute.methods.base",),
    "camanim.methods.eigen": ("camanim.compute.methods.eigen",),
    "camanim.methods.fused": (
        "camanim.compute.fusion",
        "camanim.pipelines.fmgcam",
        "camanim.outputs.fmgcam",
    ),
    "camanim.methods.gradient": ("camanim.compute.methods.gradient",),
    "camanim.methods.perturbation": ("camanim.compute.methods.perturbation",),
    "camanim.models": ("camanim.compute.models",),
    "camanim.normalize": ("camanim.compute.normalize",),
    "camanim.render": (
        "camanim.outputs.render",
        "camanim.compute.resize",
    ),
    "camanim.report": (
        "camanim.outputs.report",
        "camanim.outputs.report.notebook",
    ),
    "camanim.report.fused": ("camanim.outputs.report.fused",),
    "camanim.report.notebook": ("camanim.outputs.report.notebook",),
    "camanim.report.sections": ("camanim.outputs.report.sections",),
    "camanim.report.source": ("camanim.outputs.report.source",),
    "camanim.report.tiles": ("camanim.outputs.report.tiles",),
    "camanim.report.viewer": ("camanim.outputs.report.viewer",),
    "camanim.resume": (
        "camanim.outputs.animation.resume",
        "camanim.pipelines.animate",
    ),
    "camanim.road": (
        "camanim.pipelines.ybroad",
        "camanim.outputs.ybroad",
        "camanim.compute.metrics.road",
        "camanim.compute.metrics.imputers",
    ),
    "camanim.road.imputers": ("camanim.compute.metrics.imputers",),
    "camanim.road.metric": ("camanim.compute.metrics.road",),
    "camanim.road.ybroad": (
        "camanim.pipelines.ybroad",
        "camanim.outputs.ybroad",
    ),
    "camanim.study": (
        "camanim.outputs.study",
        "camanim.outputs.study.runner",
        "camanim.outputs.study.store",
        "camanim.outputs.study.figures",
        "camanim.pipelines.study.units",
    ),
    "camanim.study.cli": ("camanim.cli.study",),
    "camanim.study.executors": ("camanim.pipelines.study.executors",),
    "camanim.study.figures": ("camanim.outputs.study.figures",),
    "camanim.study.runner": ("camanim.outputs.study.runner",),
    "camanim.study.store": ("camanim.outputs.study.store",),
    "camanim.study.units": ("camanim.pipelines.study.units",),
    "camanim.targets": ("camanim.compute.targets",),
    "camanim.video": ("camanim.outputs.video",),
}


class _MovedModule(types.ModuleType):
    """An old module path: attribute reads go to the new modules, and so do writes (monkeypatching)."""

    def __init__(self, name: str, targets: Sequence[str]) -> None:
        super().__init__(name, f"Deprecated alias of {', '.join(targets)}.")
        object.__setattr__(self, "_targets", tuple(targets))

    def _modules(self) -> list[types.ModuleType]:
        return [importlib.import_module(t) for t in object.__getattribute__(self, "_targets")]

    def __getattr__(self, attr: str) -> Any:
        for module in self._modules():
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(f"module {self.__name__!r} has no attribute {attr!r}")

    def __setattr__(self, attr: str, value: Any) -> None:
        # The import system binds an old sub-module path (camanim.road.ybroad) to its parent: keep that here.
        if attr.startswith("__") or isinstance(value, types.ModuleType):
            object.__setattr__(self, attr, value)
            return
        for module in self._modules():
            if hasattr(module, attr):
                setattr(module, attr, value)
                return
        object.__setattr__(self, attr, value)

    def __dir__(self) -> list[str]:
        return sorted({n for m in self._modules() for n in dir(m)})


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        targets = MOVED[spec.name]
        warnings.warn(
            f"{spec.name} has moved to {' and '.join(targets)}; import from there (or from camanim)",
            DeprecationWarning,
            stacklevel=4,
        )
        module = _MovedModule(spec.name, targets)
        module.__path__ = []  # a package, so that old sub-module paths resolve through this finder too
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        return None


def install() -> None:
    """Put the finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
