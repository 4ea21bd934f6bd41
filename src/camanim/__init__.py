"""camanim: class activation maps at every layer of a PyTorch image classifier.

The public API is imported lazily so that ``import camanim`` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from camanim import _compat
from camanim.version import __version__

_compat.install()  # old module paths (camanim.explanation, camanim.road...) keep working, with a warning

_LAZY = {
    "animate": "camanim.outputs.animation",
    "Animation": "camanim.pipelines.animate",
    "explain": "camanim.pipelines.explain",
    "Explanation": "camanim.pipelines.explain",
    "load_model": "camanim.compute.models",
    "load_image": "camanim.compute.images",
    "list_layers": "camanim.compute.layers",
    "list_methods": "camanim.compute.methods",
    "get_method": "camanim.compute.methods",
    "ybroad": "camanim.pipelines.ybroad",
    "road_scores": "camanim.compute.metrics.road",
    "YbRoadResult": "camanim.pipelines.ybroad",
    "fmgcam": "camanim.pipelines.fmgcam",
    "FMGCAMResult": "camanim.pipelines.fmgcam",
    "compare": "camanim.pipelines.compare",
    "Comparison": "camanim.pipelines.compare",
    "embed": "camanim.pipelines.embed",
    "Embeddings": "camanim.pipelines.embed",
    "write_report": "camanim.outputs.report",
    "run_study": "camanim.outputs.study.runner",
    "faithfulness": "camanim.pipelines.faithfulness",
    "FaithfulnessResult": "camanim.pipelines.faithfulness",
    "faithfulness_scores": "camanim.compute.metrics.faithfulness",
    "sanity": "camanim.pipelines.sanity",
    "SanityResult": "camanim.pipelines.sanity",
}

__all__ = [
    "__version__",
    "Animation",
    "animate",
    "Explanation",
    "explain",
    "get_method",
    "list_layers",
    "list_methods",
    "load_image",
    "load_model",
    "ybroad",
    "road_scores",
    "YbRoadResult",
    "fmgcam",
    "FMGCAMResult",
    "compare",
    "Comparison",
    "embed",
    "Embeddings",
    "write_report",
    "run_study",
    "faithfulness",
    "FaithfulnessResult",
    "faithfulness_scores",
    "sanity",
    "SanityResult",
]

if TYPE_CHECKING:  # pragma: no cover
    from camanim.compute.images import load_image
    from camanim.compute.layers import list_layers
    from camanim.compute.methods import get_method, list_methods
    from camanim.compute.metrics.faithfulness import faithfulness_scores
    from camanim.compute.metrics.road import road_scores
    from camanim.compute.models import load_model
    from camanim.outputs.animation import animate
    from camanim.outputs.report import write_report
    from camanim.outputs.study.runner import run_study
    from camanim.pipelines.animate import Animation
    from camanim.pipelines.compare import Comparison, compare
    from camanim.pipelines.embed import Embeddings, embed
    from camanim.pipelines.explain import Explanation, explain
    from camanim.pipelines.faithfulness import FaithfulnessResult, faithfulness
    from camanim.pipelines.fmgcam import FMGCAMResult, fmgcam
    from camanim.pipelines.sanity import SanityResult, sanity
    from camanim.pipelines.ybroad import YbRoadResult, ybroad


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        importlib.import_module("camanim.outputs")  # attaches the results' writers and notebook display
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'camanim' has no attribute {name!r}")
