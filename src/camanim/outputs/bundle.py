"""Output bundles: folders written atomically, described by ``manifest.json`` written last.

A bundle is staged in a hidden sibling folder (``.NAME.partial``, marked as camanim's by a
``.camanim-staging`` file) and renamed into place only when every artifact, then the manifest, then the
files derived from it (``report.html``, by the ``finalize`` callbacks) are written: ``NAME`` is never a
partial bundle, and its manifest lists every file in it.

What camanim may replace or delete is decided by :func:`check_output`, before any work starts:

* the current directory, the home directory, ``/`` and any ancestor of the current directory are refused
  as an output folder, as are mount points and paths below a regular file;
* an existing non-empty folder is used only when it is a camanim bundle (it has our manifest) holding
  nothing but the files that manifest lists; then ``force`` replaces it and ``resume`` continues it. Any
  other folder is refused and nothing in it changes;
* the folder the bundle is staged in must be writable (probed by creating a folder there) and have free
  space.

The replaced bundle stays intact until the new one is complete, and then only the files its manifest
lists are removed. A staging folder left by an interrupted run is kept for ``resume`` when the run says
it is resumable and it holds finished parts; otherwise it is removed. Files are created with the mode the
process umask gives (``0666 & ~umask``), like any other file the user makes.
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
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from camanim.errors import BundleExistsError, CamanimError, OutputError
from camanim.version import __version__

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
STAGING_MARK = ".camanim-staging"
REPORT = "report.html"
#: Free space below which an output location is refused before any work starts, in bytes.
MIN_FREE_BYTES = 20 * 2**20


def versions() -> dict[str, str]:
    """Versions of camanim and the libraries that shape its results."""
    out = {"camanim": __version__, "python": platform.python_version()}
    for mod in ("torch", "torchvision", "timm", "numpy"):
        m = sys.modules.get(mod)
        if m is None:
            with contextlib.suppress(ImportError):
                m = __import__(mod)
        if m is not None:
            out[mod] = getattr(m, "__version__", "?")
    return out


def file_mode() -> int:
    """The permission bits of a new file under the process umask (``0o666 & ~umask``), read at each call."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` at ``path`` through a temporary file in the same folder and ``os.replace``.

    Raises:
        OutputError: the write failed (full disk, read-only location...); the message names ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise write_error(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, file_mode())  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, CamanimError):
            raise write_error(path, exc) from exc
        raise


def write_error(path: str | os.PathLike, exc: OSError) -> OutputError:
    """An :class:`OutputError` naming ``path`` and the cause of ``exc`` (``No space left on device``...)."""
    cause = exc.strerror or str(exc) or type(exc).__name__
    err = OutputError(f"could not write {str(path)!r}: {cause}")
    err.errno = exc.errno
    return err


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
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(p.parent, exc) from exc
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

    def write_manifest(self) -> Path:
        """Write ``manifest.json`` into the staging folder (done by :func:`open_bundle`)."""
        data = json.dumps(_jsonable(self.manifest), indent=2, allow_nan=False) + "\n"
        atomic_write_bytes(self.path / MANIFEST, data.encode())
        return self.path / MANIFEST


def staging_path(root: Path) -> Path:
    """The hidden sibling folder where ``root`` is staged."""
    return root.parent / f".{root.name}.partial"


def _protected() -> set[Path]:
    cwd = Path.cwd().resolve()
    return {cwd, *cwd.parents, Path.home().resolve(), Path("/").resolve()}


def listed_files(manifest: Mapping[str, Any]) -> set[str]:
    """The bundle-relative paths a manifest says camanim wrote (the manifest itself included)."""
    files = manifest.get("files")
    listed = set(files) if isinstance(files, Mapping) else set()
    if manifest.get("schema_version") == 1:  # before version 2, report.html was written but not listed
        listed.add(REPORT)
    return listed | {MANIFEST}


def _bundle_manifest(root: Path) -> dict | None:
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or "schema_version" not in manifest or "files" not in manifest:
        return None
    return manifest


def foreign_entries(root: Path, manifest: Mapping[str, Any]) -> list[str]:
    """Entries under ``root`` that ``manifest`` does not list (folders holding listed files excepted)."""
    listed = listed_files(manifest)
    parents = {p.as_posix() for rel in listed for p in Path(rel).parents if p.as_posix() != "."}

    def ours(rel: str) -> bool:
        return rel in listed or any(p.as_posix() in listed for p in Path(rel).parents)

    out = []
    for here, dirs, files in os.walk(root, followlinks=False):
        base = Path(here).relative_to(root)
        for d in list(dirs):
            rel = (base / d).as_posix()
            if ours(rel) or (rel in parents and not (Path(here) / d).is_symlink()):
                continue
            out.append(rel + "/")
            dirs.remove(d)
        out.extend(rel for rel in ((base / f).as_posix() for f in files) if not ours(rel))
    return sorted(out)


def refuse_protected(root: Path) -> None:
    """Refuse the current directory, the home directory, ``/`` and any ancestor of the current directory.

    Raises:
        OutputError: ``root`` is one of them (symbolic links resolved).
    """
    real = Path(root).resolve()
    if real in _protected():
        what = (
            "your home folder" if real == Path.home().resolve() else "the current directory or a parent of it"
        )
        raise OutputError(
            f"refusing to write into {str(root)!r}: it is {what}; camanim writes each result into a "
            "folder of its own: give a new folder, e.g. --out camanim-out/run1"
        )


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output(out: str | os.PathLike, *, force: bool = False, resume: bool = False) -> Path:
    """Check that a bundle may be written at ``out``, before any work starts; return its absolute path.

    Raises:
        OutputError: ``out`` is the current directory, the home directory, ``/``, an ancestor of the
            current directory, a mount point, or lies below a regular file; or where it would be staged is
            not writable or has less than :data:`MIN_FREE_BYTES` free.
        BundleExistsError: ``out`` exists and is not a folder; or is a non-empty folder that is not a
            camanim bundle, holds files its manifest does not list, or neither ``force`` nor ``resume`` is
            given; or its staging folder exists and was not made by camanim.
    """
    root = Path(out).expanduser().absolute()
    refuse_protected(root)
    existing = _nearest_existing(root)
    if existing != root and not existing.is_dir():
        raise OutputError(f"cannot create {str(root)!r}: {str(existing)!r} is a file, not a folder")
    if root.exists():
        if not root.is_dir():
            raise BundleExistsError(f"{str(root)!r} exists and is not a folder; give a folder path for --out")
        if os.path.ismount(root):
            raise OutputError(
                f"{str(root)!r} is a mount point: a bundle is published by renaming a folder into place; "
                "give a folder inside it, e.g. --out " + str(root / "camanim-run")
            )
        if any(root.iterdir()):
            manifest = _bundle_manifest(root)
            if manifest is None:
                raise BundleExistsError(
                    f"output folder {str(root)!r} is not empty and is not a camanim bundle (no {MANIFEST} of "
                    "camanim's): nothing in it was changed; give a new folder for --out"
                )
            foreign = foreign_entries(root, manifest)
            if foreign:
                shown = ", ".join(repr(f) for f in foreign[:3]) + (" ..." if len(foreign) > 3 else "")
                raise BundleExistsError(
                    f"output folder {str(root)!r} is a camanim bundle but also holds {len(foreign)} "
                    f"file(s) camanim did not write ({shown}): nothing in it was changed; move them away "
                    "or give a new folder for --out"
                )
            if not (force or resume):
                raise BundleExistsError(
                    f"output folder {str(root)!r} already holds a camanim bundle; pass --force to replace "
                    "it or --resume to continue it, or give a new folder for --out"
                )
    stage = staging_path(root)
    if stage.exists() and not _is_stage(stage):
        raise BundleExistsError(
            f"{str(stage)!r} exists and was not made by camanim (it stages bundles there); move it away"
        )
    _probe_writable(_nearest_existing(root.parent))
    return root


def _probe_writable(folder: Path) -> None:
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".camanim-probe-", dir=folder))
    except OSError as exc:
        raise OutputError(
            f"cannot write in {str(folder)!r}: {exc.strerror or exc}; give an --out folder where you can write"
        ) from exc
    free = shutil.disk_usage(folder).free
    if free < MIN_FREE_BYTES:
        raise OutputError(
            f"only {free / 2**20:.1f} MB free in {str(folder)!r}; a bundle needs more: free some space or "
            "give another --out"
        )


def _is_stage(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and (path / STAGING_MARK).is_file()


def _remove_stage(stage: Path) -> None:
    if _is_stage(stage):
        shutil.rmtree(stage, ignore_errors=True)


def _has_work(stage: Path) -> bool:
    return any(p.name != STAGING_MARK for p in stage.iterdir()) if stage.is_dir() else False


@contextlib.contextmanager
def open_bundle(
    out: str | os.PathLike,
    *,
    force: bool = False,
    resume: bool = False,
    resumable: bool = False,
    command: str = "",
    finalize: Callable[[Bundle], None] | None = None,
) -> Iterator[Bundle]:
    """Stage a bundle at ``out`` and publish it atomically when the block succeeds.

    Args:
        out: the bundle folder (see :func:`check_output` for what is refused).
        force: replace an existing camanim bundle (only once the new bundle is complete).
        resume: continue from an interrupted run's staging folder (or from the existing bundle's files).
        resumable: keep the staging folder if the block fails, so a later ``resume`` can reuse it.
        command: the command line or call that produced the bundle, recorded in the manifest.
        finalize: called once the artifacts and a first manifest are staged, to write files derived from
            them (``report.html``); what it adds with :meth:`Bundle.file` is listed in the final manifest.

    Raises:
        BundleExistsError, OutputError: see :func:`check_output`; OutputError also when writing fails.
    """
    root = check_output(out, force=force, resume=resume)
    stage = staging_path(root)
    if stage.exists() and not resume:
        _remove_stage(stage)
    try:
        if resume and not stage.exists() and root.is_dir() and any(root.iterdir()):
            # continue from a finished bundle: work on a copy, publish atomically
            shutil.copytree(root, stage, symlinks=True)
            with contextlib.suppress(FileNotFoundError):
                (stage / MANIFEST).unlink()
        stage.mkdir(parents=True, exist_ok=True)
        (stage / STAGING_MARK).touch()
    except OSError as exc:
        _remove_stage(stage)
        raise write_error(stage, exc) from exc
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
        bundle.write_manifest()
        if finalize is not None:
            finalize(bundle)
            bundle.write_manifest()
        _drop_unlisted(stage, bundle.manifest)
        _publish(stage, root)
    except BaseException:
        if resumable and _has_work(stage):
            (stage / STAGING_MARK).touch()
            logger.warning(
                "run interrupted; its finished parts are kept in %s: rerun with --resume to continue", stage
            )
        else:
            _remove_stage(stage)
        raise


def _drop_unlisted(stage: Path, manifest: Mapping[str, Any]) -> None:
    """Remove what the staged manifest does not list (temporary files of an interrupted write), so that a
    published bundle holds exactly its manifest's files."""
    for rel in foreign_entries(stage, manifest):
        if rel == STAGING_MARK:
            continue
        name = Path(rel.rstrip("/")).name
        if not (name.startswith(".") and name.endswith((".tmp", ".part", ".part/"))):
            logger.warning("left %s out of the bundle: its manifest does not list it", rel)
        p = stage / rel.rstrip("/")
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _publish(stage: Path, root: Path) -> None:
    """Move the staging folder to ``root``; an old bundle there is replaced only after the new one is in
    place, and then only the files its manifest lists are removed."""
    old = manifest = None
    if root.exists() and any(root.iterdir()):
        manifest = _bundle_manifest(root)
        if manifest is None or foreign_entries(root, manifest):  # changed since check_output
            raise BundleExistsError(
                f"{str(root)!r} changed while the bundle was computed and now holds files camanim did not "
                f"write; the new bundle is kept in {str(stage)!r}"
            )
        old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
        os.replace(root, old)  # onto the new, empty folder
    (stage / STAGING_MARK).unlink()
    try:
        os.replace(stage, root)
    except OSError as exc:
        (stage / STAGING_MARK).touch()
        if old is not None:
            os.replace(old, root)
        raise write_error(root, exc) from exc
    if old is not None:
        _remove_listed(old, manifest)


def _remove_listed(folder: Path, manifest: Mapping[str, Any]) -> None:
    """Delete what ``manifest`` lists under ``folder``, then the folders left empty; keep anything else."""
    for rel in sorted(listed_files(manifest), key=len, reverse=True):
        p = folder / rel
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)
    for here, _dirs, _files in sorted(os.walk(folder), key=lambda w: len(w[0]), reverse=True):
        with contextlib.suppress(OSError):
            os.rmdir(here)
    if folder.exists():
        logger.warning("kept %s: it holds files the old bundle's manifest did not list", folder)


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
