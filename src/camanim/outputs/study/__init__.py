"""Studies: ybROAD over many images, models, methods and training checkpoints, locally or on Ray.

A study is a grid of units (image, model, checkpoint, method); each unit runs
:func:`camanim.pipelines.ybroad.ybroad` and its rows are committed atomically to a Parquet store, so a study resumes
after a crash and never holds a partial unit. ``--backend local`` runs units in this process or in
``--workers N`` spawned processes; ``--backend ray`` on Ray actors (``pip install 'camanim[ray]'``).

Example:
    >>> from camanim.outputs.study import run_study, load_study
    >>> res = run_study("photos/", "study-out", models="efficientnet_lite0",
    ...                 methods="gradcam,hirescam", layers="last-8")  # doctest: +SKIP
    >>> load_study("study-out").summary.to_pylist()[0]["max_ybroad"]  # doctest: +SKIP

Modules: :mod:`camanim.pipelines.study.units` (inputs, units, the per-unit computation),
:mod:`camanim.pipelines.study.executors` (local, process pool, Ray), :mod:`.store` (the Parquet store),
:mod:`.runner` (the driver), :mod:`.figures` (figures and ``study.html``); the ``camanim study`` subcommand
is :mod:`camanim.cli.study`. pyarrow and Ray are imported when first used.
"""

from camanim.outputs.study.figures import plot_study, write_study_report
from camanim.outputs.study.runner import Study, StudyResult, load_study, run_study
from camanim.outputs.study.store import StudyStore, is_study_dir
from camanim.pipelines.study.units import (
    ImageItem,
    ModelSpec,
    StudyError,
    StudySettings,
    Unit,
    list_images,
    unit_seed,
)

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
