"""Studies: ybROAD over many images, models, methods and training checkpoints, locally or on Ray.

A study is a grid of units (image, model, checkpoint, method); each unit runs
:func:`camanim.road.ybroad` and its rows are committed atomically to a Parquet store, so a study resumes
after a crash and never holds a partial unit. ``--backend local`` runs units in this process or in
``--workers N`` spawned processes; ``--backend ray`` on Ray actors (``pip install 'camanim[ray]'``).

Example:
    >>> from camanim.study import run_study, load_study
    >>> res = run_study("photos/", "study-out", models="efficientnet_lite0",
    ...                 methods="gradcam,hirescam", layers="last-8")  # doctest: +SKIP
    >>> load_study("study-out").summary.to_pylist()[0]["max_ybroad"]  # doctest: +SKIP

Modules: :mod:`.units` (inputs, units, the per-unit computation), :mod:`.store` (the Parquet store),
:mod:`.executors` (local, process pool, Ray), :mod:`.runner` (the driver), :mod:`.figures` (figures and
``study.html``), :mod:`.cli` (the ``camanim study`` subcommand). Heavy imports (pyarrow, Ray, torch) are
deferred until used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "run_study": "camanim.study.runner",
    "load_study": "camanim.study.runner",
    "Study": "camanim.study.runner",
    "StudyResult": "camanim.study.runner",
    "write_study_report": "camanim.study.figures",
    "plot_study": "camanim.study.figures",
    "is_study_dir": "camanim.study.store",
    "StudyStore": "camanim.study.store",
    "StudyError": "camanim.study.units",
    "StudySettings": "camanim.study.units",
    "ModelSpec": "camanim.study.units",
    "ImageItem": "camanim.study.units",
    "Unit": "camanim.study.units",
    "list_images": "camanim.study.units",
    "unit_seed": "camanim.study.units",
}

__all__ = [
    "ImageItem",
    "ModelSpec",
    "Study",
    "StudyError",
    "StudyResult",
    "StudySettings",
    "StudyStore",
    "Unit",
    "is_study_dir",
    "list_images",
    "load_study",
    "plot_study",
    "run_study",
    "unit_seed",
    "write_study_report",
]

if TYPE_CHECKING:  # pragma: no cover
    from camanim.study.figures import plot_study, write_study_report
    from camanim.study.runner import Study, StudyResult, load_study, run_study
    from camanim.study.store import StudyStore, is_study_dir
    from camanim.study.units import (
        ImageItem,
        ModelSpec,
        StudyError,
        StudySettings,
        Unit,
        list_images,
        unit_seed,
    )


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'camanim.study' has no attribute {name!r}")
