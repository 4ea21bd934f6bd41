"""Volumes and clips in and out: NIfTI, DICOM series, .npy and video loading (orientation, spacing, HU),
windowing, the CLI's refusals, slice frames that put a map's maximum where it is, the report's slice viewer
in Chromium, and ``camanim animate`` on a NIfTI volume end to end.

The browser test uses Playwright with Debian's ``chromium`` and skips with a reason where either is missing;
its screenshots are kept under ``$CAMANIM_ARTIFACTS`` (or the test's tmp folder).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from camanim.cli import main
from camanim.compute.layers import Layer
from camanim.compute.models import Preprocessing
from camanim.compute.volumes import (
    WINDOW_PRESETS,
    LoadedVolume,
    load_volume,
    parse_window,
    volume_display,
    volume_tensor,
)
from camanim.errors import ImageError, OptionError, UnknownNameError
from camanim.outputs.animation.volume import volume_settings
from camanim.outputs.render import FrameStyle, overlay_batch
from camanim.outputs.report import write_report
from camanim.outputs.volume_frames import (
    View,
    VolumeGeometry,
    parse_view,
    peak_point,
    upsample_volume,
    view_image,
)
from camanim.pipelines.animate import Animation
from camanim.pipelines.explain import Explanation

CHROMIUM = os.environ.get("CAMANIM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
]


# ------------------------------------------------------------------------------------------------ loading


def test_nifti_orientation_and_spacing(tmp_path: Path) -> None:
    nib = pytest.importorskip("nibabel", reason="nibabel is in the extra camanim[volume]")
    X, Y, Z = 5, 6, 7
    data = np.arange(X * Y * Z, dtype=np.float32).reshape(X, Y, Z)
    affine = np.diag([-2.0, 1.0, 3.0, 1.0])  # i runs towards the patient's left, 2 mm; k up, 3 mm
    affine[:3, 3] = (10.0, -5.0, 20.0)
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "scan.nii.gz")
    vol = load_volume(tmp_path / "scan.nii.gz")
    assert vol.array.shape == (Z, Y, X) and vol.array.dtype == np.float32
    assert vol.spacing == (3.0, 1.0, 2.0)
    # (0, 0, 0) is the most superior, anterior, right voxel: k = Z-1, j = Y-1 and i = 0 (i runs to the left)
    assert vol.array[0, 0, 0] == data[0, Y - 1, Z - 1]
    assert vol.array[Z - 1, Y - 1, X - 1] == data[X - 1, 0, 0]
    for z, y, x in [(1, 2, 3), (6, 0, 4)]:
        assert vol.array[z, y, x] == data[x, Y - 1 - y, Z - 1 - z]
    assert "LAS" in vol.info["orientation"] and vol.info["format"] == "nifti"


def _dicom_series(folder: Path, hu: np.ndarray, z0: float = -40.0, dz: float = 2.5) -> None:
    """Write ``hu`` ``(k, rows, cols)`` as an axial series (slice i at z0 + i * dz), shuffled file names,
    stored with RescaleSlope 2 and RescaleIntercept -1024."""
    pydicom = pytest.importorskip("pydicom", reason="pydicom is in the extra camanim[volume]")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir()
    series = generate_uid()
    order = list(range(hu.shape[0]))
    random.Random(3).shuffle(order)
    for name_index, i in enumerate(order):
        meta = FileMetaDataset()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = series
        ds.Modality = "CT"
        ds.SeriesDescription = "chest"
        ds.Rows, ds.Columns = hu.shape[1:]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation, ds.SamplesPerPixel = 0, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelSpacing = [0.5, 0.75]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-20.0, -30.0, z0 + i * dz]
        ds.RescaleSlope, ds.RescaleIntercept = 2, -1024
        ds.PixelData = ((hu[i] + 1024) / 2).astype(np.uint16).tobytes()
        ds.save_as(folder / f"IM{name_index:04d}", enforce_file_format=True)
    (folder / "README.txt").write_text("not a DICOM file")
    assert pydicom is not None


def test_dicom_series_sorted_by_position_with_hounsfield_units(tmp_path: Path) -> None:
    pytest.importorskip("nibabel", reason="nibabel is in the extra camanim[volume]")
    k, rows, cols = 4, 6, 5
    hu = (np.arange(k)[:, None, None] * 100 + np.arange(rows)[None, :, None] * 10 + np.arange(cols)).astype(
        np.float32
    ) * 2 - 1000  # even values: exact after slope 2
    _dicom_series(tmp_path / "series", hu)
    vol = load_volume(tmp_path / "series")
    assert vol.array.shape == (k, rows, cols)
    assert vol.spacing == pytest.approx((2.5, 0.5, 0.75))
    # index 0 is the most superior slice (the highest z), rows run anterior -> posterior, columns right -> left
    np.testing.assert_array_equal(vol.array, hu[::-1])
    assert vol.info["format"] == "dicom" and vol.info["modality"] == "CT" and vol.info["slices"] == k


def test_npy_and_bad_arrays(tmp_path: Path) -> None:
    a = np.random.default_rng(0).normal(size=(2, 4, 5, 6)).astype(np.float32)
    np.save(tmp_path / "v.npy", a)
    vol = load_volume(tmp_path / "v.npy")
    np.testing.assert_array_equal(vol.array, a)
    assert vol.spacing == (1.0, 1.0, 1.0) and vol.info["orientation"] == "as stored"
    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 4, 5, 6)))
    with pytest.raises(ImageError, match=r"\(D, H, W\) or \(C, D, H, W\)"):
        load_volume(tmp_path / "bad.npy")
    (tmp_path / "broken.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ImageError, match="not a valid .npy"):
        load_volume(tmp_path / "broken.npy")


def test_video_decoded_to_channels_time_height_width(tmp_path: Path) -> None:
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    t, h, w = 6, 32, 48
    path = tmp_path / "clip.mp4"
    writer = imageio_ffmpeg.write_frames(str(path), (w, h), fps=8, quality=10, macro_block_size=16)
    writer.send(None)
    for k in range(t):
        frame = np.zeros((h, w, 3), np.uint8)
        frame[..., 0] = 40 * k  # red grows over time
        frame[:, w // 2 :, 2] = 200  # right half blue
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    vol = load_volume(path)
    assert vol.is_video and vol.array.shape == (3, t, h, w)
    red = vol.array[0].mean(axis=(1, 2))
    np.testing.assert_allclose(red, 40 * np.arange(t), atol=8)
    assert vol.array[2, :, :, : w // 2 - 4].mean() < 20 and vol.array[2, :, :, w // 2 + 4 :].mean() > 180
    x = volume_tensor(vol, (4, 16, 24), 3)
    assert x.shape == (1, 3, 4, 16, 24) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert volume_display(vol, (4, 16, 24)).shape == (4, 16, 24, 3)


def test_windowing_is_exact() -> None:
    hu = np.array([-1400, -1000, -600, -100, 150, 1000], np.float32).reshape(1, 2, 3)
    vol = load_volume(hu, window="lung")
    c, w = WINDOW_PRESETS["lung"]
    assert vol.window == (c, w)
    expected = np.clip((hu - (c - w / 2)) / w, 0, 1)
    x = volume_tensor(vol, None, 1)
    np.testing.assert_allclose(x[0, 0].numpy(), expected, rtol=0, atol=1e-7)
    assert x[0, 0, 0, 0, 0] == 0.0 and x[0, 0, 0, 1, 2] == 1.0  # -1400 below, 1000 above the window
    x = volume_tensor(load_volume(hu, window="40,400"), None, 3)
    assert x.shape == (1, 3, 1, 2, 3)
    np.testing.assert_allclose(x[0, 2].numpy(), np.clip((hu + 160) / 400, 0, 1), atol=1e-7)
    plain = volume_tensor(LoadedVolume(hu), None, 1)[0, 0].numpy()  # no window: min-max
    np.testing.assert_allclose(plain, (hu + 1400) / 2400, atol=1e-7)
    grey = volume_display(vol, None)
    np.testing.assert_array_equal(grey[..., 0], (expected * 255 + 0.5).astype(np.uint8))
    assert parse_window("-600,1500") == ((-600.0, 1500.0), None)
    with pytest.raises(UnknownNameError, match="did you mean: 'lung'"):
        parse_window("lungs")
    with pytest.raises(OptionError, match="width must be positive"):
        parse_window("40,0")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["explain", "--image", "{bad}"], "cannot read volume"),
        (["animate", "--image", "{empty}"], "holds no DICOM image files"),
        (["explain", "--image", "chelsea", "--window", "lung"], "--window applies only to volumes"),
        (["animate", "--image", "{bad}", "--view", "sagital:3"], "did you mean: 'sagittal'"),
        (["animate", "--image", "{bad}", "--slice-at", "1,2"], "three whole numbers"),
    ],
)
def test_cli_refuses_in_one_line(tmp_path: Path, capsys, args: list[str], message: str) -> None:
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti file")
    (tmp_path / "empty").mkdir()
    names = {"{bad}": str(tmp_path / "bad.nii.gz"), "{empty}": str(tmp_path / "empty")}
    code = main([names.get(a, a) for a in args] + ["--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("camanim: error: ") and message in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ frames


def test_views_parse() -> None:
    assert parse_view("axial:12") == View("axial", 12) and parse_view("mip") == View("mip")
    assert parse_view(None) is None and parse_view("auto") is None
    with pytest.raises(OptionError):
        parse_view("coronal")


def _peak_map(
    grid: tuple[int, int, int], peak: tuple[int, int, int], native: tuple[int, int, int]
) -> np.ndarray:
    """A smooth map at ``native`` resolution whose trilinear upsampling to ``grid`` peaks at ``peak``."""
    axes = [(np.arange(n) + 0.5) * g / n - 0.5 for n, g in zip(native, grid, strict=True)]
    zz, yy, xx = np.meshgrid(*axes, indexing="ij")
    return np.exp(-((zz - peak[0]) ** 2 + (yy - peak[1]) ** 2 + (xx - peak[2]) ** 2) / 8.0).astype(np.float32)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (3.0, 1.0, 0.5)])
def test_slice_frames_put_the_maximum_at_the_point(spacing) -> None:
    grid, peak = (20, 24, 28), (13, 7, 19)
    m = _peak_map(grid, peak, grid)
    up = upsample_volume(m, grid)
    assert peak_point(up) == peak
    geo = VolumeGeometry(grid, spacing)
    norm = up / up.max()
    black = np.zeros((*grid, 3), np.uint8)
    img = view_image(norm, black, geo, View("slices"), peak, longest=160, lut="gray", alpha=1.0)
    gap = 4  # FrameStyle().gap // 2
    x0 = 0
    for plane, (r, c) in zip(
        ("axial", "coronal", "sagittal"),
        [(peak[1], peak[2]), (peak[0], peak[2]), (peak[0], peak[1])],
        strict=True,
    ):
        ph, pw = geo.panel_size(plane, 160)
        rows, cols = geo.plane_shape(plane)
        eh, ew = geo.plane_extent(plane)
        assert ph / pw == pytest.approx(eh / ew, rel=0.05)  # the physical aspect, from the spacing
        y0 = (img.shape[0] - ph) // 2
        panel = img[y0 : y0 + ph, x0 : x0 + pw, 0].astype(float)
        edge = min(ph, pw) // 16 + 2  # the white ticks on the edges mark the point too: left out
        panel[:, :edge] = panel[:, -edge:] = 0
        panel[:edge, :] = panel[-edge:, :] = 0
        got = np.unravel_index(int(np.argmax(panel)), panel.shape)
        want = ((r + 0.5) * ph / rows, (c + 0.5) * pw / cols)
        assert abs(got[0] - want[0]) <= ph / rows + 1 and abs(got[1] - want[1]) <= pw / cols + 1, (
            plane,
            got,
            want,
        )
        x0 += pw + gap


def _layer(i: int, size: tuple[int, int, int]) -> Layer:
    return Layer(i, f"block{i}", f"block{i}", "Conv3d", "volume", (1, 4, *size), 10, size)


def _volume_explanation(
    grid=(16, 20, 24), peak=(4, 12, 17), spacing=(2.5, 1.0, 1.0), video=False
) -> Explanation:
    """A hand-made explanation of a volume: three layers at full, half and quarter resolution, all peaking at
    ``peak``; the grey volume is a bright box."""
    sizes = [tuple(g // f for g in grid) for f in (1, 2, 4)]
    layers = tuple(_layer(i, s) for i, s in enumerate(sizes))
    maps = {
        la.name: torch.from_numpy(_peak_map(grid, peak, s) * (i + 1))[None]
        for i, (la, s) in enumerate(zip(layers, sizes, strict=True))
    }
    grey = np.zeros(grid, np.float32)
    grey[2:-2, 3:-3, 3:-3] = 0.6
    info = {
        "source": "synthetic",
        "kind": "video" if video else "volume",
        "format": "video" if video else "nifti",
        "orientation": "IPL",
        "volume": {"spacing": list(spacing), "shape": list(grid)},
    }
    return Explanation(
        model_name="tiny3d",
        weights="none",
        preprocessing=Preprocessing(
            size=grid[1:], resize="none", crop_pct=1.0, interpolation="bilinear", mean=(0.0,), std=(1.0,)
        ),
        input=torch.from_numpy(grey[None, None]),
        display=(np.repeat(grey[..., None], 3, -1) * 255).astype(np.uint8)[None],
        probabilities=torch.tensor([[0.2, 0.8]]),
        targets=(1,),
        target_names=("lesion",),
        class_names=("normal", "lesion"),
        layers=layers,
        chosen=layers,
        methods=("gradcam",),
        maps={"gradcam": maps},
        flags={"gradcam": {la.name: () for la in layers}},
        image_info=info,
    )


def _animation(ex: Explanation, style=None) -> Animation:
    """The animation of ``ex``; its ranges are over the whole volume (checked against a trilinear upsampling)."""
    anim = Animation.from_explanation(ex, style=style)
    grid = tuple(ex.input.shape[-3:])
    for p, la in enumerate(ex.chosen):
        up = upsample_volume(ex.maps["gradcam"][la.name][0], grid)
        assert anim.range_for("gradcam", "local", p).high == pytest.approx(float(up.max()), rel=1e-5)
    return anim


def test_animation_slices_default_to_the_final_peak_and_write_a_bundle(tmp_path: Path) -> None:
    ex = _volume_explanation()
    anim = _animation(ex)
    view, point = volume_settings(anim)
    final = upsample_volume(ex.maps["gradcam"]["block2"][0], (16, 20, 24))
    assert view == View("slices") and point == peak_point(final)
    assert max(abs(a - b) for a, b in zip(point, (4, 12, 17), strict=True)) <= 1  # a quarter-resolution map
    frame = anim.frame(-1)
    assert frame.ndim == 3 and frame.shape[0] % 2 == 0 and frame.shape[1] % 2 == 0
    assert len({f.shape for f in anim.frames()}) == 1
    out = anim.save(tmp_path / "b")
    m = json.loads((out / "manifest.json").read_text())
    assert {"maps.npz", "display.npz", "input.npy", "gradcam_side-by-side.mp4", "strip.png"} <= set(
        m["files"]
    )
    assert (
        m["animation"]["volume"]["slice_at"] == list(point) and m["animation"]["volume"]["view"] == "slices"
    )
    with np.load(out / "maps.npz") as z:
        assert z["gradcam/block2"].shape == (1, 4, 5, 6)  # native resolution
    mip = _animation(ex, style=FrameStyle(view="mip")).frame(0)
    assert mip.shape[0] > 0 and not np.array_equal(mip[: frame.shape[0] // 2], frame[: mip.shape[0] // 2])


# ------------------------------------------------------------------------------------------------ report


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the Python package playwright is not installed"
    )
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"no chromium browser at {CHROMIUM} (apt-get install -y chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def test_report_slice_slider_in_browser(browser, tmp_path: Path) -> None:
    ex = _volume_explanation()
    anim = _animation(ex)
    z, y, x = volume_settings(anim)[1]  # the final layer's peak
    out = anim.save(tmp_path / "b")
    write_report(out)
    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    errors: list[str] = []
    requests: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("request", lambda req: requests.append(req.url))
    page.goto((out / "report.html").as_uri())

    def wait_shown(value: str) -> None:
        page.wait_for_function(
            "v => document.getElementById('view').dataset.shown === v", arg=value, timeout=5000
        )

    def pixels() -> str:
        return page.eval_on_selector("#view", "c => c.toDataURL()")

    wait_shown(f"gradcam|local|2|axial|{z}")  # the last layer, axial slice through the final peak
    assert page.text_content("#slice-label").startswith(f"axial z = {z} / 15")
    axial = pixels()
    # The page's slice equals the frames' drawing of it: the map upsampled to the grid, scaled by the local
    # range over the whole volume, coloured over the grey slice (read at the centre of each voxel's cell).
    cells = np.array(
        page.evaluate(
            """([rows, cols]) => { const c = document.getElementById('view'); const d = c.getContext('2d')
                 .getImageData(0, 0, c.width, c.height).data; const out = [];
                 for (let r = 0; r < rows; r++) for (let k = 0; k < cols; k++) {
                   const i = 4 * (Math.floor((r + 0.5) * c.height / rows) * c.width + Math.floor((k + 0.5) * c.width / cols));
                   out.push([d[i], d[i + 1], d[i + 2]]); }
                 return out; }""",
            [20, 24],
        ),
        np.uint8,
    ).reshape(20, 24, 3)
    up = upsample_volume(ex.maps["gradcam"]["block2"][0], (16, 20, 24))
    norm = (up - up.min()) / (up.max() - up.min())
    want = overlay_batch(ex.display[0, z], norm[z][None], "jet", 0.5)[0]
    inner = (slice(2, -2), slice(2, -2))  # the labels and ticks sit on the edges
    diff = np.abs(cells[inner].astype(int) - want[inner])  # 8-bit maps in the page, smoothing on screen
    assert diff.mean() < 1.5 and diff.max() <= 16
    assert np.unravel_index(int(np.argmax(norm[z])), (20, 24)) == (y, x)

    page.click("#planes button[data-plane=coronal]")
    wait_shown(f"gradcam|local|2|coronal|{y}")
    w, h = page.eval_on_selector("#view", "c => [c.width, c.height]")
    assert h / w == pytest.approx(16 * 2.5 / 24, rel=0.05)  # 40 mm tall, 24 mm wide
    coronal = pixels()
    page.eval_on_selector("#slice", "s => { s.value = '3'; s.dispatchEvent(new Event('input')); }")
    wait_shown("gradcam|local|2|coronal|3")
    assert pixels() != coronal and page.text_content("#slice-label").startswith("coronal y = 3")
    page.keyboard.press("PageUp")
    wait_shown("gradcam|local|2|coronal|4")
    page.focus("#slider")
    page.keyboard.press("Home")
    wait_shown("gradcam|local|0|coronal|4")
    assert page.text_content("#layer-name") == "block0"
    page.click("#norms button[data-norm=global]")
    wait_shown("gradcam|global|0|coronal|4")
    page.click("#planes button[data-plane=axial]")
    wait_shown(f"gradcam|global|0|axial|{z}")  # each plane keeps its slice
    assert pixels() != axial  # layer 0 under the global range is dimmer than the last layer
    folder = Path(os.environ.get("CAMANIM_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    page.locator(".viewer").screenshot(path=str(folder / "report_volume.png"))
    assert not errors, errors
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    page.close()


# ---------------------------------------------------------------------------------------------- end to end


def test_cli_animate_on_a_nifti_volume(tmp_path: Path, capsys) -> None:
    """``camanim animate`` on a small NIfTI with a MONAI 3-D ResNet (its checkpoint saved here): a complete
    bundle with the volume's window and spacing, native maps, the video, the strip and the report."""
    nib = pytest.importorskip("nibabel", reason="nibabel is in the extra camanim[volume]")
    pytest.importorskip("monai", reason="MONAI is in the extra camanim[volume]")
    from camanim.compute import models

    if not hasattr(models, "build_monai"):
        pytest.skip("this build does not load MONAI networks by name")
    torch.manual_seed(0)
    net, _ = models.build_monai("resnet10")
    torch.save(net.state_dict(), tmp_path / "resnet10.pt")
    data = np.random.default_rng(0).normal(size=(24, 20, 16)).astype(np.float32) * 50
    data[4:10, 6:12, 8:12] += 400  # a bright box: i 4..9, j 6..11, k 8..11
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.5, 1.0])), tmp_path / "scan.nii.gz")
    out = tmp_path / "bundle"
    code = main(
        ["--quiet", "animate", "--image", str(tmp_path / "scan.nii.gz"), "--model", "monai:resnet10",
         "--checkpoint", str(tmp_path / "resnet10.pt"), "--window", "100,800", "--out", str(out)]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    files = set(m["files"])
    assert {
        "maps.npz",
        "display.npz",
        "input.npy",
        "input.png",
        "strip.png",
        "layers.csv",
        "report.html",
    } <= files
    assert "gradcam_side-by-side.mp4" in files and (out / "gradcam_side-by-side.mp4").stat().st_size > 1000
    assert m["image"]["volume"]["window"] == [100.0, 800.0]
    assert m["animation"]["volume"]["grid_spacing_mm"] == [2.5, 1.0, 1.0]
    assert m["input"]["shape"] == [1, 1, 16, 20, 24]
    with np.load(out / "display.npz") as z:
        grey = z["display"][0, ..., 0].astype(float)
    # the box, reoriented: z = 15 - k, y = 19 - j, x = 23 - i, brighter than the rest
    assert grey[4:8, 8:14, 14:20].mean() > grey.mean() + 60
    layers = [la for la in m["layers"] if la["name"] in m["chosen_layers"]]
    with np.load(out / "maps.npz") as z:
        for la in layers:
            assert z[f"gradcam/{la['name']}"].shape == (1, *la["map_size"])  # native resolution
    assert len(m["animation"]["per_frame"]) == len(layers) > 5
    page = (out / "report.html").read_text()
    assert '"volume":' in page and 'id="slice"' in page
