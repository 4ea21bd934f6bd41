"""The results store of a study: a Parquet dataset committed one unit at a time.

Layout of ``STUDY_DIR``::

    study.json           settings, inputs and versions (written at the start; checked on resume)
    layers/<uid>.parquet one row per scored layer of one unit
    summary/<uid>.parquet the unit's summary row; its presence marks the unit done
    failures.json        units that failed, with their error and attempts
    summary.csv          CSV export of the summary table (rewritten at the end of a run)
    figures/*.png        study figures; study.html the report

A unit is committed by writing both its files under temporary hidden names (``.tmp-*``, which Parquet
readers skip), flushing them to disk, then renaming the layer file and finally the summary file into
place. Renames are atomic, so a crash leaves either nothing, a finished unit, or (between the two renames)
a layer file without its summary: that unit is not done, is recomputed on resume and its layer file is
replaced by the same name, never duplicated. Readers keep only the layer rows of units whose summary exists.
Only the driver writes the store; one driver per folder.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from camanim.errors import CamanimError, MissingExtraError
from camanim.outputs.bundle import _jsonable, atomic_write_bytes, refuse_protected, versions
from camanim.pipelines.study.units import StudyError, StudySettings, Unit, UnitOutcome, score_columns

log = logging.getLogger(__name__)

STUDY_FILE = "study.json"
FAILURES_FILE = "failures.json"
SUMMARY_CSV = "summary.csv"
SCHEMA_VERSION = 1
#: Settings whose change makes stored numbers incomparable; a resumed study must keep them.
FROZEN_SETTINGS = (
    "layers",
    "percentages",
    "seed",
    "imputer",
    "imputation_space",
    "score",
    "keep_nonspatial",
    "input_size",
    "task",
)
KEY_COLUMNS = ("model", "checkpoint_index", "checkpoint", "image", "method")


def pyarrow_modules() -> tuple[Any, Any]:
    """``(pyarrow, pyarrow.parquet)``, or a :class:`~camanim.errors.MissingExtraError` naming the extra."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise MissingExtraError(
            "studies store their results with pyarrow: pip install 'camanim[study]' (or camanim[ray])"
        ) from exc
    return pa, pq


def _base_fields(pa: Any) -> list[Any]:
    return [
        pa.field("unit", pa.string()),
        pa.field("image", pa.string()),
        pa.field("model", pa.string()),
        pa.field("checkpoint", pa.string()),
        pa.field("checkpoint_index", pa.int32()),
        pa.field("epoch", pa.int64()),
        pa.field("method", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("label", pa.string()),
        pa.field("target", pa.int32()),
        pa.field("target_name", pa.string()),
        pa.field("target_source", pa.string()),
        pa.field("target_probability", pa.float64()),
        pa.field("top1", pa.int32()),
        pa.field("top1_name", pa.string()),
        pa.field("top1_probability", pa.float64()),
        pa.field("task", pa.string()),
        pa.field("target_score", pa.float64()),
    ]


def layer_schema(percentages: Sequence[float]) -> Any:
    """Arrow schema of the layer table (one row per image, model, checkpoint, method and layer)."""
    pa, _ = pyarrow_modules()
    return pa.schema(
        _base_fields(pa)
        + [
            pa.field("position", pa.int32()),
            pa.field("layer_index", pa.int32()),
            pa.field("layer_name", pa.string()),
            pa.field("layer_type", pa.string()),
            pa.field("layer_kind", pa.string()),
            pa.field("layer_shape", pa.string()),
            pa.field("map_h", pa.int32()),
            pa.field("map_w", pa.int32()),
            pa.field("is_best", pa.bool_()),
            pa.field("is_final", pa.bool_()),
            pa.field("road", pa.float64()),
            pa.field("raw_min", pa.float64()),
            pa.field("raw_max", pa.float64()),
            pa.field("raw_mean", pa.float64()),
            pa.field("raw_std", pa.float64()),
            pa.field("raw_positive", pa.float64()),
            pa.field("flags", pa.string()),
        ]
        + [pa.field(c, pa.float64()) for c in score_columns(percentages)]
    )


def summary_schema() -> Any:
    """Arrow schema of the summary table (one row per image, model, checkpoint and method)."""
    pa, _ = pyarrow_modules()
    return pa.schema(
        _base_fields(pa)
        + [
            pa.field("layers", pa.int32()),
            pa.field("mean_layerwise_road", pa.float64()),
            pa.field("max_ybroad", pa.float64()),
            pa.field("best_position", pa.int32()),
            pa.field("best_layer_index", pa.int32()),
            pa.field("best_layer_name", pa.string()),
            pa.field("final_position", pa.int32()),
            pa.field("final_layer_index", pa.int32()),
            pa.field("final_layer_name", pa.string()),
            pa.field("final_layer_road", pa.float64()),
            pa.field("difference", pa.float64()),
        ]
    )


def _write_json_atomic(path: Path, obj: Any) -> None:

    atomic_write_bytes(path, (json.dumps(_jsonable(obj), indent=1) + "\n").encode())


@dataclass
class StudyStore:
    """A study folder: commit units, record failures, read the tables back.

    Args:
        root: the study folder (created when missing).
    """

    root: Path
    _failures: dict[str, Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    @property
    def layers_dir(self) -> Path:
        return self.root / "layers"

    @property
    def summary_dir(self) -> Path:
        return self.root / "summary"

    def create(self) -> None:
        """Make the folders and remove temporary files an interrupted driver left behind.

        Raises:
            StudyError: the folder is a protected location (see :func:`camanim.bundle.refuse_protected`),
                or exists, is not empty and holds no study (nothing in it is changed).
        """
        check_study_folder(self.root)
        self.layers_dir.mkdir(parents=True, exist_ok=True)
        self.summary_dir.mkdir(parents=True, exist_ok=True)
        for d in (self.layers_dir, self.summary_dir):
            for tmp in d.glob(".tmp-*"):
                with contextlib.suppress(OSError):
                    tmp.unlink()

    # -- configuration ---------------------------------------------------------------------------------

    def read_config(self) -> dict[str, Any] | None:
        """``study.json``, or ``None`` for a new folder."""
        path = self.root / STUDY_FILE
        if not path.exists():
            return None
        return json.loads(path.read_text())

    def write_config(
        self, settings: StudySettings, inputs: dict[str, Any], *, extra: dict | None = None
    ) -> None:
        """Write ``study.json``; a resumed study must keep its :data:`FROZEN_SETTINGS`.

        Raises:
            StudyError: the folder holds a study run with other settings.
        """

        old = self.read_config()
        new = settings.to_dict()
        if old is not None:
            prev = old.get("settings", {})
            changed = [k for k in FROZEN_SETTINGS if k in prev and prev[k] != new[k]]
            if changed:
                diff = ", ".join(f"{k}: {prev[k]!r} -> {new[k]!r}" for k in changed)
                raise StudyError(
                    f"{str(self.root)!r} holds a study run with other settings ({diff}); "
                    "use another --out folder or the same settings to resume it"
                )
        cfg = {
            "schema": SCHEMA_VERSION,
            "kind": "camanim-study",
            "created": (old or {}).get("created") or _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "settings": new,
            "inputs": inputs,
            "versions": versions(),
            "files": {
                "layers": "layers/*.parquet",
                "summary": "summary/*.parquet",
                "summary_csv": SUMMARY_CSV,
                "failures": FAILURES_FILE,
            },
        } | (extra or {})
        _write_json_atomic(self.root / STUDY_FILE, cfg)

    def update_config(self, **entries: Any) -> None:
        """Merge ``entries`` into ``study.json``."""
        cfg = self.read_config() or {}
        cfg.update(entries)
        _write_json_atomic(self.root / STUDY_FILE, cfg)

    # -- units -----------------------------------------------------------------------------------------

    def done(self) -> set[str]:
        """Ids of committed units."""
        if not self.summary_dir.is_dir():
            return set()
        return {p.stem for p in self.summary_dir.glob("*.parquet") if not p.name.startswith(".")}

    def commit(self, unit: Unit, outcome: UnitOutcome, settings: StudySettings, attempts: int = 1) -> None:
        """Write one finished unit's rows atomically (see the module docstring)."""
        pa, pq = pyarrow_modules()
        meta = {
            "camanim.unit": json.dumps(
                {
                    "key": unit.key,
                    "seconds": outcome.seconds,
                    "worker": outcome.worker,
                    "attempts": attempts,
                    "committed": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                }
            )
        }
        layers = pa.Table.from_pylist(outcome.layers, schema=layer_schema(settings.percentages))
        summary = pa.Table.from_pylist([outcome.summary], schema=summary_schema())
        staged = []
        try:
            for table, folder in ((layers, self.layers_dir), (summary, self.summary_dir)):
                tmp = folder / f".tmp-{unit.uid}-{os.getpid()}.parquet"
                staged.append((tmp, folder / f"{unit.uid}.parquet"))
                with open(tmp, "wb") as f:
                    pq.write_table(table.replace_schema_metadata(meta), f)
                    f.flush()
                    os.fsync(f.fileno())
            for tmp, final in staged:  # summary last: it marks the unit done
                os.replace(tmp, final)
        except BaseException:
            for tmp, _ in staged:
                with contextlib.suppress(OSError):
                    tmp.unlink()
            raise
        if unit.uid in self.failures():
            self._failures.pop(unit.uid)  # type: ignore[union-attr]
            _write_json_atomic(self.root / FAILURES_FILE, self._failures)

    def failures(self) -> dict[str, Any]:
        """``{uid: {key, image, model, checkpoint, method, error, traceback, attempts, worker}}``."""
        if self._failures is None:
            path = self.root / FAILURES_FILE
            self._failures = json.loads(path.read_text()) if path.exists() else {}
        return self._failures

    def record_failure(self, unit: Unit, outcome: UnitOutcome, attempts: int) -> None:
        """Record (atomically) that ``unit`` failed ``attempts`` times in this run."""
        failures = self.failures()
        prev = failures.get(unit.uid, {})
        failures[unit.uid] = {
            "key": unit.key,
            "image": unit.image.id,
            "model": unit.model.name,
            "checkpoint": unit.checkpoint,
            "method": unit.method,
            "error": outcome.error,
            "traceback": outcome.traceback,
            "worker": outcome.worker,
            "attempts": int(prev.get("attempts", 0)) + attempts,
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        }
        _write_json_atomic(self.root / FAILURES_FILE, failures)

    # -- reading ---------------------------------------------------------------------------------------

    def _read(self, folder: Path, schema: Any, units: set[str] | None) -> Any:
        pyarrow_modules()
        files = sorted(p for p in folder.glob("*.parquet") if not p.name.startswith("."))
        if units is not None:
            files = [p for p in files if p.stem in units]
        if not files:
            return schema.empty_table()
        import pyarrow.dataset as ds

        table = ds.dataset([str(p) for p in files], schema=schema, format="parquet").to_table()
        order = [(c, "ascending") for c in KEY_COLUMNS]
        if "position" in table.column_names:
            order.append(("position", "ascending"))
        return table.sort_by(order)

    def read_summary(self) -> Any:
        """The summary table (``pyarrow.Table``), sorted by model, checkpoint, image, method."""
        return self._read(self.summary_dir, summary_schema(), None)

    def read_layers(self) -> Any:
        """The layer table of committed units (``pyarrow.Table``), sorted as the summary, then by position."""
        cfg = self.read_config() or {}
        ps = cfg.get("settings", {}).get("percentages", StudySettings().percentages)
        return self._read(self.layers_dir, layer_schema(ps), self.done())

    def unit_metadata(self) -> list[dict[str, Any]]:
        """Per committed unit: its key, seconds, worker and attempts (from the Parquet metadata)."""
        _, pq = pyarrow_modules()
        out = []
        for p in sorted(self.summary_dir.glob("*.parquet")):
            if p.name.startswith("."):
                continue
            meta = pq.read_schema(p).metadata or {}
            raw = meta.get(b"camanim.unit")
            if raw:
                out.append({"uid": p.stem} | json.loads(raw))
        return out

    def export_csv(self) -> Path:
        """Write ``summary.csv`` (atomically) from the summary table; returns its path."""

        table = self.read_summary()
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(table.column_names)
        cols = [table.column(c).to_pylist() for c in table.column_names]
        for row in zip(*cols, strict=True):
            writer.writerow(["" if v is None else f"{v:.9g}" if isinstance(v, float) else v for v in row])
        path = self.root / SUMMARY_CSV
        atomic_write_bytes(path, buf.getvalue().encode())
        return path


def check_study_folder(path: str | os.PathLike[str]) -> Path:
    """Check, before any work, that a study may be written or resumed at ``path``; return it, absolute.

    Raises:
        StudyError: ``path`` is the current directory, home, ``/`` or an ancestor of the current
            directory, a file, or a non-empty folder that holds no study.
    """
    root = Path(path).expanduser().absolute()
    try:
        refuse_protected(root)
    except CamanimError as exc:
        raise StudyError(str(exc)) from None
    if root.exists() and not root.is_dir():
        raise StudyError(f"{str(root)!r} is a file; give a folder for the study (--out)")
    if root.is_dir() and any(root.iterdir()) and not is_study_dir(root):
        raise StudyError(
            f"{str(root)!r} is not empty and holds no study (no {STUDY_FILE}): nothing in it was changed; "
            "give a new folder, or the folder of an earlier study to resume it"
        )
    return root


def is_study_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a study folder (holds a ``study.json`` of kind ``camanim-study``)."""
    p = Path(path) / STUDY_FILE
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("kind") == "camanim-study"
    except (OSError, ValueError):
        return False
