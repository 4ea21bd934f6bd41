"""What the outputs floor adds to the pipelines' results: their writers, renderers and notebook display.

The results (:class:`~camanim.pipelines.explain.Explanation` and the others) are data and the computations
on it; the methods that write a bundle, draw or display (``save``, ``_repr_html_``) are set on their classes
here, once, when :mod:`camanim.outputs` is imported (``import camanim`` does it on first use of its public
names). So no pipeline imports an output, and every result still has its ``save``.
"""

from __future__ import annotations

import os
from pathlib import Path

import camanim.outputs.animation as an
import camanim.outputs.animation.figures as afig
import camanim.outputs.animation.frames as afr
import camanim.outputs.compare as cmp
import camanim.outputs.embed as emb
import camanim.outputs.faithfulness as fa
import camanim.outputs.fmgcam as fm
import camanim.outputs.sanity as sa
import camanim.outputs.ybroad as yb
from camanim.outputs.explanation import save_explanation
from camanim.outputs.report.notebook import embed_html, explanation_html, ybroad_html
from camanim.pipelines.animate import Animation
from camanim.pipelines.compare import Comparison
from camanim.pipelines.embed import Embeddings
from camanim.pipelines.explain import Explanation
from camanim.pipelines.faithfulness import FaithfulnessResult
from camanim.pipelines.fmgcam import FMGCAMResult
from camanim.pipelines.sanity import SanityResult
from camanim.pipelines.ybroad import YbRoadResult


def _explanation_save(
    self: Explanation, out: str | os.PathLike, *, force: bool = False, overlays: bool = True
) -> Path:
    """Write this explanation as a bundle (manifest, ``input.npy``, ``maps.npz``, overlay PNGs)."""
    return save_explanation(self, out, force=force, overlays=overlays)


def _explanation_html(self: Explanation) -> str:
    """Jupyter display: an overlay grid, methods x layers (local normalisation)."""
    return explanation_html(self)


def attach() -> None:
    """Set the writers, renderers and notebook display on the results' classes."""
    Explanation.save = _explanation_save
    Explanation._repr_html_ = _explanation_html
    FMGCAMResult.colors = property(fm.result_colors, doc="``(K, 3)`` uint8 class colours.")
    FMGCAMResult.class_table = fm.class_table
    FMGCAMResult.describe = fm.describe_result
    FMGCAMResult.legend_strip = fm.legend_strip
    FMGCAMResult.with_legend = fm.with_legend
    FMGCAMResult.overlay = fm.result_overlay
    FMGCAMResult.render = fm.render_result
    FMGCAMResult.save = fm.save_result
    YbRoadResult.save = yb.save_result
    YbRoadResult._repr_html_ = _ybroad_html
    FaithfulnessResult.save = fa.save_result
    SanityResult.save = sa.save_result
    Animation.overlays = afr.overlays
    Animation.target_text = afr.target_text
    Animation.caption = afr.caption
    Animation.frames = afr.render
    Animation._composers = afr.composers
    Animation.frame = _animation_frame
    Animation.strip = afig.strip
    Animation.layer_table = afig.layer_table
    Animation.layer_csv = afig.layer_csv
    Animation.params_png = afig.params_png
    Animation.describe = an.describe_animation
    Animation.save = an.save_animation
    Animation.video_html = an.video_html
    Animation._repr_html_ = an.animation_display_html
    Comparison.tiles = property(
        cmp.tiles, doc="``tiles[(method, layer name)]``: each overlay, (H, W, 3) uint8."
    )
    Comparison.image = property(lambda c: cmp.grid_image(c)[0], doc="The whole grid (Hg, Wg, 3) uint8.")
    Comparison.boxes = property(lambda c: cmp.grid_image(c)[1], doc="Each tile's (top, left, bottom, right).")
    Comparison.figure = cmp.figure
    Comparison.save = cmp.save
    Embeddings.save = emb.save_embeddings
    Embeddings._repr_html_ = embed_html


def _animation_frame(self: Animation, position: int, method: str | None = None, layout: str | None = None):
    """Render the single frame at ``position`` (negative counts from the end): ``(Hf, Wf, 3)`` uint8."""
    return next(afr.render(self, method, layout, [position]))


def _ybroad_html(self: YbRoadResult) -> str:
    """The ybROAD plot and summary table, for Jupyter."""
    return ybroad_html(self)
