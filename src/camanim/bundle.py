"""Output bundles: folders written atomically, described by ``manifest.json`` written last.

A bundle is staged in a hidden sibling folder (``.NAME.partial``) and renamed into place only when every
artifact and then the manifest are written, so ``NAME`` is never a partial bundle. An existing non-empty
``NAME`` is refused unless ``force`` is given; with ``force`` the old folder is replaced only once the new
one is complete. A staging folder left by an interrupted run is kept for ``resume`` when the run says it
is resumable (its finished parts can be reused); otherwise it is removed.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from camanim.errors import BundleExistsError, CamanimError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def versions() -> dict[str, str]:
    """Versions of camanim and the libraries that shape its results."""
    import camanim

    out = {"camanim": camanim.__version__, "python": platform.python_version()}
    for mod in ("torch", "torchvision", "timm", "numpy"):
        m = sys.modules.get(mod)
        if m is None:
            with contextlib.suppress(ImportError):
                m = __import__(mod)
        if m is not None:
            out[mod] = getattr(m, "__version__", "?")
    return out


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` at ``path`` through a temporary file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


class Bundle:
    """A bundle being written. Paths given to its methods are relative to the bundle root.

    Attributes:
        root: the final location.
        path: where files are written now (the staging folder).
        manifest: the dictionary written as ``manifest.json`` on success; callers add their sections.
    """

    def __init__(self, root: Path, path: Path, manifest: dict) -> None:
        self.root = root
        self.path = path
        self.manifest = manifest
        self.files: dict[str, str] = manifest.setdefault("files", {})

    def file(self, rel: str, role: str = "") -> Path:
        """The absolute path to write ``rel`` at (parents created), recorded in the manifest's file list."""
        p = self.path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        self.files[rel] = role
        return p

    def write_bytes(self, rel: str, data: bytes, role: str = "") -> Path:
        """Write ``data`` atomically at ``rel``."""
        p = self.file(rel, role)
        atomic_write_bytes(p, data)
        return p

    def write_text(self, rel: str, text: str, role: str = "") -> Path:
        """Write UTF-8 text atomically at ``rel``."""
        return self.write_bytes(rel, text.encode("utf-8"), role)

    def write_json(self, rel: str, obj: Any, role: str = "") -> Path:
        """Write ``obj`` as indented JSON (NaN/inf as null) at ``rel``."""
        return self.write_text(rel, json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n", role)

    def save_npy(self, rel: str, array: np.ndarray, role: str = "") -> Path:
        """Save one array as ``.npy`` atomically."""
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        return self.write_bytes(rel, buf.getvalue(), role)

    def save_npz(
        self, rel: str, arrays: Mapping[str, np.ndarray], role: str = "", compress: bool = True
    ) -> Path:
        """Save named arrays as ``.npz`` atomically (keys may contain ``/``)."""
        buf = io.BytesIO()
        (np.savez_compressed if compress else np.savez)(buf, **{k: np.asarray(v) for k, v in arrays.items()})
        return self.write_bytes(rel, buf.getvalue(), role)

    def exists(self, rel: str) -> bool:
        """Whether ``rel`` already exists in the staging folder (for resumed runs)."""
        return (self.path / rel).exists()


def staging_path(root: Path) -> Path:
    """The hidden sibling folder where ``root`` is staged."""
    return root.parent / f".{root.name}.partial"


@contextlib.contextmanager
def open_bundle(
    out: str | os.PathLike,
    *,
    force: bool = False,
    resume: bool = False,
    resumable: bool = False,
    command: str = "",
) -> Iterator[Bundle]:
    """Stage a bundle at ``out`` and publish it atomically when the block succeeds.

    Args:
        out: the bundle folder.
        force: replace an existing non-empty folder (only once the new bundle is complete).
        resume: continue from an interrupted run's staging folder (or from the existing bundle's files).
        resumable: keep the staging folder if the block fails, so a later ``resume`` can reuse it.
        command: the command line or call that produced the bundle, recorded in the manifest.

    Raises:
        BundleExistsError: ``out`` exists, is not empty, and neither ``force`` nor ``resume`` was given.
    """
    root = Path(out).expanduser().absolute()
    if root.exists() and not root.is_dir():
        raise BundleExistsError(f"{str(root)!r} exists and is not a folder")
    if root.is_dir() and any(root.iterdir()) and not (force or resume):
        raise BundleExistsError(
            f"output folder {str(root)!r} exists and is not empty; pass --force to replace it or --resume to continue it"
        )
    stage = staging_path(root)
    if stage.exists() and not resume:
        shutil.rmtree(stage)
    if resume and not stage.exists() and root.is_dir():
        shutil.copytree(root, stage)  # continue from a finished bundle: work on a copy, publish atomically
        with contextlib.suppress(FileNotFoundError):
            (stage / MANIFEST).unlink()
    stage.mkdir(parents=True, exist_ok=True)
    previous = {}
    if resume and (root / MANIFEST).is_file():
        with contextlib.suppress(ValueError, OSError):
            previous = json.loads((root / MANIFEST).read_text())
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "command": command,
    }
    if previous:
        manifest = {**previous, **manifest}
    bundle = Bundle(root, stage, manifest)
    try:
        yield bundle
        atomic_write_bytes(
            stage / MANIFEST,
            (json.dumps(_jsonable(bundle.manifest), indent=2, allow_nan=False) + "\n").encode(),
        )
        _publish(stage, root)
    except BaseException:
        if resumable:
            logger.warning(
                "run interrupted; its finished parts are kept in %s: rerun with --resume to continue", stage
            )
        else:
            shutil.rmtree(stage, ignore_errors=True)
        raise


def _publish(stage: Path, root: Path) -> None:
    """Move the staging folder to ``root``, replacing an old bundle only after the new one is in place."""
    old = None
    if root.exists():
        old = root.parent / f".{root.name}.old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(root, old)
    try:
        os.replace(stage, root)
    except OSError:
        if old is not None:
            os.replace(old, root)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_manifest(out: str | os.PathLike) -> dict:
    """Read a bundle's manifest.

    Raises:
        CamanimError: the folder has no manifest (not a bundle, or an unfinished one).
    """
    p = Path(out) / MANIFEST
    if not p.is_file():
        raise CamanimError(f"{str(out)!r} is not a camanim bundle (no {MANIFEST})")
    return json.loads(p.read_text())


def load_maps(out: str | os.PathLike, name: str = "maps.npz") -> dict[str, np.ndarray]:
    """All raw maps of a bundle, keyed ``"<method>/<layer name>"``."""
    with np.load(Path(out) / name, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
