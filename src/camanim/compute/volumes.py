"""Load a volume (CT, MRI) or a short video clip as an array with its spacing, and turn it into a model input.

Sources (:func:`load_volume`):

* NIfTI (``.nii``, ``.nii.gz``) through nibabel, reoriented to the closest RAS canonical orientation and
  then laid out for display (below); ``scl_slope``/``scl_inter`` applied.
* A DICOM series folder through pydicom: the slices sorted along the slice normal by
  ``ImagePositionPatient`` (file names and file order do not matter), ``RescaleSlope``/``RescaleIntercept``
  applied (CT in Hounsfield units), spacing from ``PixelSpacing`` and the distance between slice positions.
  The series goes through the same reorientation as a NIfTI file.
* A ``.npy`` array ``(D, H, W)`` or ``(C, D, H, W)``, used as stored (spacing 1 mm, orientation unknown).
* A short video (``.mp4``, ``.avi``, ``.mov``, ``.mkv``, ``.webm``, ``.gif``) for video classifiers, decoded
  with the ffmpeg of ``imageio-ffmpeg`` to ``(3, T, H, W)`` (time plays the part of depth).

Layout of a scanned volume: ``array`` is ``(D, H, W)`` with axis 0 running from superior to inferior,
axis 1 from anterior to posterior and axis 2 from the patient's right to the left (MONAI's
``Orientation(axcodes="IPL")``). Each axial slice ``array[d]`` is then already in the radiological convention
(patient's right on the image's left, anterior at the top), a coronal slice ``array[:, h]`` has superior at
the top and right on the left, and a sagittal slice ``array[:, :, w]`` has superior at the top and anterior
on the left. ``spacing`` is the voxel size in mm along ``(D, H, W)``, i.e. ``(z, y, x)``.

Intensities stay raw (Hounsfield units for CT). :func:`volume_tensor` scales them for the model: with a
window ``(center, width)`` values are clipped to ``[center - width / 2, center + width / 2]`` and mapped
linearly to ``[0, 1]``; without, the volume's own minimum and maximum map to 0 and 1; a video's 0..255 values
are divided by 255. Then the volume is resampled (trilinear, ``align_corners=False``) to the model's grid.

Resampling and spacing: the model sees the volume resampled to its input size, whatever the spacing; maps
are kept at each layer's native resolution. Only the pictures resample by the spacing: a slice of the model
grid is drawn with the physical aspect of the scan (its extent in mm, :func:`grid_spacing`), so a coronal
slice of a 5 mm series is not squashed; see :mod:`camanim.outputs.volume_frames`.

Example:
    >>> vol = load_volume("scan.nii.gz", window="lung")  # doctest: +SKIP
    >>> vol.array.shape, vol.spacing  # doctest: +SKIP
    ((120, 512, 512), (2.5, 0.7, 0.7))
    >>> volume_tensor(vol, (96, 96, 96), channels=1).shape  # doctest: +SKIP
    torch.Size([1, 1, 96, 96, 96])
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from camanim.errors import ImageError, MissingExtraError, OptionError, UnknownNameError

__all__ = [
    "NIFTI_SUFFIXES",
    "VIDEO_SUFFIXES",
    "WINDOW_PRESETS",
    "LoadedVolume",
    "grid_spacing",
    "is_volume_source",
    "load_volume",
    "parse_window",
    "volume_display",
    "volume_tensor",
]

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif", ".m4v", ".mpg", ".mpeg")
#: Frames decoded at most from a video (a clip for a video classifier is 8 to 64 frames).
MAX_VIDEO_FRAMES = 512
#: Voxels accepted at most (a 1024 x 1024 x 1024 volume is 4 GB in float32).
MAX_VOXELS = 600_000_000
#: Common CT windows ``(center, width)`` in Hounsfield units.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "soft-tissue": (40.0, 400.0),
    "abdomen": (60.0, 400.0),
    "liver": (60.0, 160.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "stroke": (32.0, 8.0),
    "subdural": (75.0, 215.0),
}
#: Axis codes of the layout (see the module docstring): the direction each array axis runs towards.
AXCODES = ("I", "P", "L")

Window = tuple[float, float]


@dataclass
class LoadedVolume:
    """A volume or clip with its geometry and provenance.

    Attributes:
        array: raw intensities, ``(D, H, W)`` or ``(C, D, H, W)`` float32 (a video: ``(3, T, H, W)``, 0..255).
        spacing: voxel size in mm along ``(D, H, W)`` (``(z, y, x)``); ``(1, 1, 1)`` when unknown.
        window: the intensity window ``(center, width)`` to show and feed, or None (min-max).
        source: where it came from (a path, or ``"array"``).
        info: orientation, original shape, series description, notes; ``kind`` is ``"volume"`` or
            ``"video"`` (a video also has ``fps``).
    """

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    window: tuple[float, float] | None = None
    source: str = "array"
    info: dict = field(default_factory=dict)

    @property
    def is_video(self) -> bool:
        """Whether the volume is a video clip (time along ``D``)."""
        return self.info.get("kind") == "video"

    @property
    def grid(self) -> tuple[int, int, int]:
        """``(D, H, W)`` of the array."""
        return tuple(int(s) for s in self.array.shape[-3:])  # type: ignore[return-value]

    def describe(self) -> dict[str, Any]:
        """The manifest's ``image`` section for this volume (JSON-ready)."""
        return {
            "source": self.source,
            "kind": self.info.get("kind", "volume"),
            "original_shape": list(self.array.shape),
            "spacing": [float(s) for s in self.spacing],
            "window": None if self.window is None else [float(v) for v in self.window],
            "window_name": self.info.get("window_name"),
            "orientation": self.info.get("orientation"),
            "notes": list(self.info.get("notes", [])),
            **{
                k: v for k, v in self.info.items() if k in ("series_description", "modality", "fps", "format")
            },
        }


# ----------------------------------------------------------------------------------------------- options


def parse_window(window: str | Sequence[float] | None) -> tuple[tuple[float, float] | None, str | None]:
    """``((center, width), name)`` from ``"center,width"``, a preset name (:data:`WINDOW_PRESETS`) or a pair.

    Returns ``(None, None)`` for None, ``""`` or ``"none"``.

    Raises:
        UnknownNameError: an unknown preset (close matches listed).
        OptionError: not two numbers, or a width that is not positive.
    """
    if window is None:
        return None, None
    if isinstance(window, str):
        text = window.strip().lower()
        if text in ("", "none"):
            return None, None
        if text in WINDOW_PRESETS:
            return WINDOW_PRESETS[text], text
        parts = text.split(",")
        try:
            values = tuple(float(p) for p in parts)
        except ValueError:
            if len(parts) == 1:
                raise UnknownNameError(
                    "window", window, WINDOW_PRESETS, hint="or give CENTER,WIDTH, e.g. 40,400"
                ) from None
            raise OptionError(f"window {window!r}: give CENTER,WIDTH (e.g. -600,1500) or a preset") from None
    else:
        values = tuple(float(v) for v in window)
    if len(values) != 2 or not all(np.isfinite(values)):
        raise OptionError(f"window {window!r}: give two numbers, CENTER,WIDTH (e.g. 40,400), or a preset")
    if values[1] <= 0:
        raise OptionError(f"window {window!r}: the width must be positive, got {values[1]:g}")
    return (values[0], values[1]), None


def is_volume_source(source: Any) -> bool:
    """Whether ``source`` is something :func:`load_volume` reads rather than a 2-D picture: a NIfTI, ``.npy``
    or video path, a folder (a DICOM series), a :class:`LoadedVolume`, or an array with 3 or 4 axes whose last
    axis is not a colour axis (more than 4 long)."""
    if isinstance(source, LoadedVolume):
        return True
    if isinstance(source, np.ndarray):
        return source.ndim == 4 or (source.ndim == 3 and source.shape[-1] > 4)
    if isinstance(source, (str, os.PathLike)):
        text = str(source)
        if text.lower().startswith(("http://", "https://")):
            return False
        name = text.lower()
        if name.endswith(NIFTI_SUFFIXES + VIDEO_SUFFIXES + (".npy",)):
            return True
        return Path(text).is_dir()
    return False


# ----------------------------------------------------------------------------------------------- loading


def load_volume(
    path_or_array: str | os.PathLike[str] | np.ndarray | LoadedVolume,
    *,
    window: str | Sequence[float] | None = None,
) -> LoadedVolume:
    """Read a NIfTI file, a DICOM series folder, a ``.npy`` array or a short video (see the module docstring).

    Args:
        path_or_array: a path, an array ``(D, H, W)`` / ``(C, D, H, W)``, or a :class:`LoadedVolume` (its
            window replaced when ``window`` is given).
        window: ``(center, width)``, ``"center,width"`` or a preset name (:data:`WINDOW_PRESETS`); None uses
            the volume's min and max.

    Returns:
        The :class:`LoadedVolume`.

    Raises:
        ImageError: a missing, unreadable, empty or corrupt file, a folder without a DICOM series, slices of
            different sizes, an array of the wrong shape, or a volume over :data:`MAX_VOXELS`.
        MissingExtraError: nibabel or pydicom is not installed (the ``camanim[volume]`` extra).
        OptionError, UnknownNameError: a bad window.
    """
    win, win_name = parse_window(window)
    if isinstance(path_or_array, LoadedVolume):
        vol = path_or_array
        if window is not None:
            vol = LoadedVolume(vol.array, vol.spacing, win, vol.source, {**vol.info, "window_name": win_name})
        return vol
    if isinstance(path_or_array, np.ndarray):
        vol = _from_array(path_or_array, "array")
    else:
        vol = _from_path(Path(path_or_array).expanduser())
    if vol.array.size > MAX_VOXELS:
        raise ImageError(
            f"volume {vol.source!r} has {vol.array.size:,} voxels, more than {MAX_VOXELS:,}: crop or downsample it"
        )
    if not np.isfinite(vol.array).all():
        vol.array = np.nan_to_num(vol.array, nan=0.0, posinf=0.0, neginf=0.0)
        vol.info.setdefault("notes", []).append("non-finite values replaced by 0")
    vol.window = win
    vol.info["window_name"] = win_name
    return vol


def _from_path(path: Path) -> LoadedVolume:
    name = path.name.lower()
    if path.is_dir():
        return _read_dicom_series(path)
    if not path.exists():
        raise ImageError(f"cannot read volume {str(path)!r}: no such file or folder")
    if path.stat().st_size == 0:
        raise ImageError(f"cannot read volume {str(path)!r}: file is empty (0 bytes)")
    if name.endswith(NIFTI_SUFFIXES):
        return _read_nifti(path)
    if name.endswith(".npy"):
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ImageError(f"cannot read volume {str(path)!r}: not a valid .npy array ({exc})") from None
        return _from_array(arr, str(path))
    if name.endswith(VIDEO_SUFFIXES):
        return _read_video(path)
    raise ImageError(
        f"cannot read volume {str(path)!r}: expected a NIfTI file (.nii, .nii.gz), a DICOM series folder, a "
        f".npy array or a video ({', '.join(VIDEO_SUFFIXES)})"
    )


def _from_array(arr: np.ndarray, source: str) -> LoadedVolume:
    if arr.dtype.kind not in "biuf":
        raise ImageError(f"volume {source!r}: the array must hold numbers, got dtype {arr.dtype}")
    if arr.ndim not in (3, 4) or min(arr.shape) < 1:
        raise ImageError(
            f"volume {source!r}: the array must be (D, H, W) or (C, D, H, W), got shape {list(arr.shape)}"
        )
    if arr.ndim == 4 and arr.shape[0] > 4:
        raise ImageError(
            f"volume {source!r}: a 4-D array is (C, D, H, W) with at most 4 channels, got shape {list(arr.shape)}"
        )
    return LoadedVolume(
        np.ascontiguousarray(arr, np.float32),
        (1.0, 1.0, 1.0),
        None,
        source,
        {"kind": "volume", "format": "npy", "orientation": "as stored", "original_shape": list(arr.shape)},
    )


def _nibabel() -> Any:
    try:
        import nibabel  # optional and slow to import: only for NIfTI and DICOM volumes
    except ImportError:
        raise MissingExtraError(
            "reading NIfTI or DICOM volumes needs nibabel: pip install 'camanim[volume]'"
        ) from None
    return nibabel


def _reoriented(img: Any, source: str, fmt: str, info: dict) -> LoadedVolume:
    """A nibabel image laid out as the module docstring says: RAS canonical, then ``(z, y, x)`` flipped to
    run superior->inferior, anterior->posterior, right->left."""
    nib = _nibabel()
    before = "".join(nib.aff2axcodes(img.affine))
    canonical = nib.as_closest_canonical(img)
    data = canonical.get_fdata(dtype=np.float32)  # scl_slope and scl_inter applied
    zooms = tuple(float(z) for z in canonical.header.get_zooms()[:3])
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 3:
        arr = data.transpose(2, 1, 0)[::-1, ::-1, ::-1]
    elif data.ndim == 4 and data.shape[3] <= 4:  # (X, Y, Z, C): channels first
        arr = data.transpose(3, 2, 1, 0)[:, ::-1, ::-1, ::-1]
    else:
        raise ImageError(
            f"volume {source!r}: expected 3 axes (or 4 with at most 4 channels), got shape {list(data.shape)}"
        )
    return LoadedVolume(
        np.ascontiguousarray(arr, np.float32),
        (zooms[2], zooms[1], zooms[0]),
        None,
        source,
        {
            "kind": "volume",
            "format": fmt,
            "orientation": f"stored {before}; shown superior->inferior, anterior->posterior, right->left (IPL)",
            "original_shape": list(data.shape),
            **info,
        },
    )


def _read_nifti(path: Path) -> LoadedVolume:
    nib = _nibabel()
    try:
        img = nib.load(str(path))
        img.get_fdata(dtype=np.float32)  # decode now: a truncated file fails here, not later
    except Exception as exc:  # nibabel raises many types (ImageFileError, EOFError, zlib.error, ValueError)
        raise ImageError(
            f"cannot read volume {str(path)!r}: not a readable NIfTI file ({type(exc).__name__}: {exc})"
        ) from None
    return _reoriented(img, str(path), "nifti", {})


def _read_dicom_series(folder: Path) -> LoadedVolume:
    try:
        import pydicom  # optional: only for DICOM series
    except ImportError:
        raise MissingExtraError("reading DICOM series needs pydicom: pip install 'camanim[volume]'") from None
    nib = _nibabel()
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    slices = []
    for p in files:
        try:
            ds = pydicom.dcmread(p)
        except Exception:  # not a DICOM file (pydicom's InvalidDicomError, or a truncated header)
            continue
        if "PixelData" in ds:
            slices.append((p, ds))
    if not slices:
        raise ImageError(f"cannot read volume {str(folder)!r}: the folder holds no DICOM image files")
    series = {str(getattr(ds, "SeriesInstanceUID", "")) for _, ds in slices}
    if len(series) > 1:
        raise ImageError(
            f"cannot read volume {str(folder)!r}: the folder mixes {len(series)} DICOM series; give one series "
            "per folder"
        )
    ref = slices[0][1]
    try:
        iop = np.array([float(v) for v in ref.ImageOrientationPatient], np.float64)
        row, col = iop[:3], iop[3:]
        normal = np.cross(row, col)
        keyed = sorted(
            ((float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])), p, ds) for p, ds in slices),
            key=lambda t: t[0],
        )
        planes = []
        for _, _p, ds in keyed:
            px = ds.pixel_array.astype(np.float32)
            px = px * float(getattr(ds, "RescaleSlope", 1) or 1) + float(
                getattr(ds, "RescaleIntercept", 0) or 0
            )
            planes.append(px)
        dr, dc = (float(v) for v in ref.PixelSpacing)  # between rows, between columns
    except AttributeError as exc:
        raise ImageError(
            f"cannot read volume {str(folder)!r}: a DICOM slice lacks the geometry of a series ({exc})"
        ) from None
    except Exception as exc:  # pixel data that pydicom cannot decode
        raise ImageError(f"cannot read volume {str(folder)!r}: {type(exc).__name__}: {exc}") from None
    shapes = {pl.shape for pl in planes}
    if len(shapes) > 1:
        raise ImageError(f"cannot read volume {str(folder)!r}: slices of different sizes {sorted(shapes)}")
    positions = [np.array([float(v) for v in ds.ImagePositionPatient]) for _, _, ds in keyed]
    if len(planes) > 1:
        step = (positions[-1] - positions[0]) / (len(planes) - 1)
        if np.linalg.norm(step) == 0:
            raise ImageError(f"cannot read volume {str(folder)!r}: every slice has the same position")
    else:
        step = normal * float(getattr(ref, "SliceThickness", 1.0) or 1.0)
    vol = np.stack(planes)  # (k, rows, cols)
    affine = np.eye(4)  # voxel (col, row, k) -> patient LPS, then RAS
    affine[:3, 0] = row * dc
    affine[:3, 1] = col * dr
    affine[:3, 2] = step
    affine[:3, 3] = positions[0]
    affine[:2] *= -1  # LPS -> RAS
    img = nib.Nifti1Image(vol.transpose(2, 1, 0), affine)
    info = {
        "modality": str(getattr(ref, "Modality", "")),
        "series_description": str(getattr(ref, "SeriesDescription", "")),
        "slices": len(planes),
        "notes": ["RescaleSlope/RescaleIntercept applied"] if hasattr(ref, "RescaleSlope") else [],
    }
    return _reoriented(img, str(folder), "dicom", info)


def _read_video(path: Path) -> LoadedVolume:
    try:
        import imageio_ffmpeg  # a core dependency, imported only for videos (finds the ffmpeg binary)
    except ImportError:
        raise MissingExtraError("reading videos needs imageio-ffmpeg: pip install imageio-ffmpeg") from None
    frames = []
    try:
        reader = imageio_ffmpeg.read_frames(str(path))
        meta = next(reader)
        w, h = meta["size"]
        for k, raw in enumerate(reader):
            if k >= MAX_VIDEO_FRAMES:
                raise ImageError(
                    f"video {str(path)!r} has more than {MAX_VIDEO_FRAMES} frames: cut a short clip first"
                )
            frames.append(np.frombuffer(raw, np.uint8).reshape(h, w, 3))
        reader.close()
    except ImageError:
        raise
    except (RuntimeError, OSError, StopIteration, KeyError, ValueError, subprocess.SubprocessError) as exc:
        why = " ".join(str(exc).split())[:200]
        raise ImageError(f"cannot read video {str(path)!r}: ffmpeg could not decode it ({why})") from None
    if not frames:
        raise ImageError(f"cannot read video {str(path)!r}: no frame could be decoded")
    arr = np.stack(frames).transpose(3, 0, 1, 2).astype(np.float32)  # (3, T, H, W)
    return LoadedVolume(
        np.ascontiguousarray(arr),
        (1.0, 1.0, 1.0),
        None,
        str(path),
        {
            "kind": "video",
            "format": "video",
            "fps": float(meta.get("fps") or 0.0),
            "orientation": "frames in time order, rows top to bottom",
            "original_shape": list(arr.shape),
        },
    )


# -------------------------------------------------------------------------------------- model input, display


def _unit(vol: LoadedVolume) -> np.ndarray:
    """The array scaled to ``[0, 1]``: the window, else a video's 0..255, else min-max. Same shape."""
    a = vol.array
    if vol.window is not None:
        c, w = vol.window
        lo = c - w / 2.0
        return np.clip((a - np.float32(lo)) / np.float32(w), 0.0, 1.0).astype(np.float32)
    if vol.is_video:
        return np.clip(a / np.float32(255.0), 0.0, 1.0).astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    return ((a - np.float32(lo)) / np.float32(hi - lo if hi > lo else 1.0)).astype(np.float32)


def _resample(x: torch.Tensor, size: Sequence[int] | None) -> torch.Tensor:
    """``(1, C, D, H, W)`` resampled trilinearly (``align_corners=False``) to ``size`` (kept when None)."""
    if size is None or tuple(x.shape[-3:]) == tuple(int(s) for s in size):
        return x
    return F.interpolate(x, size=tuple(int(s) for s in size), mode="trilinear", align_corners=False)


def volume_tensor(
    vol: LoadedVolume,
    size: tuple[int, int, int] | None,
    channels: int | None = None,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> torch.Tensor:
    """The model input: ``(1, C, D, H, W)`` float32.

    The intensities are scaled to ``[0, 1]`` (the window, a video's 0..255, or min-max: see the module
    docstring), the channels matched to ``channels`` (a single channel repeated, or several averaged into
    one; None keeps the volume's), the grid resampled trilinearly to ``size`` ``(D, H, W)`` (None keeps the volume's), and with
    ``mean``/``std`` (a video model's normalisation, one value per channel) standardised.

    Raises:
        ImageError: the volume's channels cannot become ``channels`` (e.g. 2 channels for a 3-channel model).
    """
    unit = _unit(vol)
    x = torch.from_numpy(unit if unit.ndim == 4 else unit[None])
    have = x.shape[0]
    channels = have if channels is None else int(channels)
    if have != channels:
        if have == 1:
            x = x.expand(channels, *x.shape[1:])
        elif channels == 1:
            x = x.mean(0, keepdim=True)
        else:
            raise ImageError(f"volume {vol.source!r} has {have} channels; the model takes {channels}")
    x = _resample(x[None].float().contiguous(), size)
    if mean is not None or std is not None:
        m = torch.tensor(list(mean) if mean is not None else [0.0] * channels, dtype=torch.float32)
        s = torch.tensor(list(std) if std is not None else [1.0] * channels, dtype=torch.float32)
        x = (x - m.view(1, -1, 1, 1, 1)) / s.view(1, -1, 1, 1, 1)
    return x.contiguous()


def volume_display(vol: LoadedVolume, size: tuple[int, int, int] | None) -> np.ndarray:
    """What the overlays are drawn on: ``(D, H, W, 3)`` uint8 on the model's grid ``size`` (None: the
    volume's own), the windowed grey volume (a video: its colour frames; several channels: their mean)."""
    unit = _unit(vol)
    x = torch.from_numpy(unit if unit.ndim == 4 else unit[None])
    if not (vol.is_video and x.shape[0] == 3):
        x = x.mean(0, keepdim=True)
    x = _resample(x[None].float(), size)[0].clamp(0, 1)
    rgb = x.expand(3, *x.shape[1:]) if x.shape[0] == 1 else x
    return np.ascontiguousarray((rgb.permute(1, 2, 3, 0).numpy() * 255 + 0.5).astype(np.uint8))


def grid_spacing(
    spacing: Sequence[float], shape: Sequence[int], size: Sequence[int]
) -> tuple[float, float, float]:
    """The voxel size in mm of the model's grid ``size`` ``(D, H, W)`` over a volume of ``shape`` (its last 3
    axes) and ``spacing``: the same physical extent, divided into ``size`` voxels."""
    d, h, w = (int(s) for s in shape[-3:])
    return tuple(float(sp) * n / int(m) for sp, n, m in zip(spacing, (d, h, w), size, strict=True))  # type: ignore[return-value]
