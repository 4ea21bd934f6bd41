"""ROAD and ybROAD on volumes ``(B, C, D, H, W)``: voxels ranked over the whole volume, imputed with the
26-neighbour 3-D imputer, checked against an independent computation (numpy ``argsort`` masks, ``spsolve``
imputation, a plain torch forward); a 3-D CNN trained here gives its last layer's Grad-CAM a better ROAD
than a random map; ``camanim road`` on a NIfTI writes a complete bundle; the commands that stay 2-D refuse a
volume in one line.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse.linalg
import torch
from torch import nn

import camanim
from camanim.cli import main
from camanim.compute.metrics.engine import blur, rise_kernel, rise_kernel_3d
from camanim.compute.metrics.faithfulness import faithfulness_scores
from camanim.compute.metrics.imputers import NoisyLinearImputer, SpsolveImputer
from camanim.compute.metrics.imputers3d import NoisyLinearImputer3D, assemble_system_3d
from camanim.compute.metrics.road import ROAD, RoadError, road_scores

from .volume_models import Small3DCNN, trained_blob_cnn

PERCENTAGES = (20.0, 40.0, 60.0, 80.0)


# ------------------------------------------------------------------------------ against a hand computation


def _reference_road(
    model: nn.Module, x: torch.Tensor, saliency: np.ndarray, target: int
) -> tuple[np.ndarray, np.ndarray]:
    """MoRF and LeRF ``(P,)`` without camanim's engine: ``argsort`` masks, ``spsolve``, a plain forward."""
    vol = x[0].double().numpy()  # (C, D, H, W)
    order = np.argsort(saliency.ravel(), kind="stable")  # least to most relevant
    n = order.size
    with torch.no_grad():
        clean = model(x).double().softmax(1)[0, target].item()
    out = []
    for top in (True, False):
        row = []
        for p in PERCENTAGES:
            k = int(round(p / 100 * n))
            mask = np.zeros(n, bool)
            mask[order[n - k :] if top else order[:k]] = True
            mask = mask.reshape(saliency.shape)
            mat, rhs = assemble_system_3d(mask, vol)
            solved = np.asarray(scipy.sparse.linalg.spsolve(mat.tocsc(), rhs)).reshape(-1, vol.shape[0])
            imputed = vol.copy()
            imputed[:, mask] = solved.T
            with torch.no_grad():
                prob = model(torch.from_numpy(imputed).float()[None]).double().softmax(1)[0, target].item()
            row.append(prob - clean)
        out.append(np.array(row))
    return out[0], out[1]


def test_road_3d_matches_an_independent_computation() -> None:
    torch.manual_seed(0)
    model = Small3DCNN(3).eval()
    x = torch.randn(1, 1, 6, 8, 10)
    res = camanim.ybroad(
        model, x, layers="all", target=2, imputer=NoisyLinearImputer3D(noise=0.0), batch_size=5
    )
    yb = res["gradcam"]
    assert res.imputer.startswith("NoisyLinearImputer3D") and res.imputation_space == "model"
    assert yb.morf.shape == (len(yb.layers), 4) and np.isfinite(yb.road).all()
    np.testing.assert_allclose(yb.removed, [round(p / 100 * 480) / 480 for p in PERCENTAGES])
    for i, layer in enumerate(yb.layers):
        up = res.explanation.upsampled("gradcam", layer.name)[0].numpy()
        if len(np.unique(up)) < up.size:  # ties: the engine's seeded tie-break is not argsort's order
            continue
        morf, lerf = _reference_road(model, x, up, 2)
        np.testing.assert_allclose(yb.morf[i], morf, atol=1e-5)
        np.testing.assert_allclose(yb.lerf[i], lerf, atol=1e-5)
    # a random map with distinct values, through the pure function and the stateful metric
    sal = np.random.default_rng(1).random((6, 8, 10))
    s = road_scores(model, x, torch.from_numpy(sal), 2, imputer=NoisyLinearImputer3D(noise=0.0))
    morf, lerf = _reference_road(model, x, sal, 2)
    np.testing.assert_allclose(s.morf[0], morf, atol=1e-5)
    np.testing.assert_allclose(s.lerf[0], lerf, atol=1e-5)
    metric = ROAD(model, imputer=NoisyLinearImputer(noise=0.0))  # the 2-D rule becomes the 3-D one
    metric.update(x, torch.from_numpy(sal)[None].float(), 2)
    np.testing.assert_allclose(metric.compute().morf[0], morf, atol=1e-5)


def test_volume_road_noise_ties_and_refusals() -> None:
    torch.manual_seed(0)
    model = Small3DCNN().eval()
    x = torch.randn(1, 1, 4, 6, 6)
    flat = torch.zeros(4, 6, 6)  # all ties: exactly k voxels removed anyway
    a = road_scores(model, x, {"flat": flat, "flat again": flat.clone()}, 1)
    b = road_scores(model, x, flat, 1, batch_size=1)
    # the noise is seeded by the mask; the batched conjugate gradients stop at 1e-8 of the residual
    np.testing.assert_allclose(a.morf[0], b.morf[0], atol=1e-7)
    np.testing.assert_array_equal(a.morf[0], a.morf[1])
    assert a.stats["unique_masks"] == 8 and a.stats["masks"] == 16
    with pytest.raises(RoadError, match="2-D images only"):
        road_scores(model, x, flat, 1, imputer=SpsolveImputer())
    with pytest.raises(RoadError, match="2-D images only"):
        road_scores(model, x, flat, 1, imputer="spsolve")
    with pytest.raises(RoadError, match=r"\(D, H, W\)"):
        road_scores(model, x, torch.zeros(6, 6), 1)
    with pytest.raises(RoadError, match="one volume"):
        road_scores(model, x.expand(2, -1, -1, -1, -1), flat, 1)


def test_other_metrics_and_the_3d_blur() -> None:
    torch.manual_seed(0)
    model = Small3DCNN().eval()
    x = torch.randn(1, 1, 4, 6, 6)
    sal = torch.rand(2, 4, 6, 6)
    s = faithfulness_scores(model, x, sal, 1, steps=4)
    assert all(np.isfinite(v).all() and v.shape == (2,) for v in s.values.values())
    # the insertion substrate: RISE's kernel in 3-D, separable, its middle plane the 2-D kernel's shape
    k3 = rise_kernel_3d()
    assert k3.shape == (11, 11, 11) and math.isclose(k3.sum(), 1.0)
    k2 = k3.sum(axis=0)
    np.testing.assert_allclose(k2, rise_kernel(), atol=1e-12)
    from scipy.ndimage import convolve

    v = torch.rand(2, 5, 7, 9, dtype=torch.float64)
    ref = np.stack([convolve(c, k3, mode="constant") for c in v.numpy()])
    np.testing.assert_allclose(blur(v).numpy(), ref, atol=1e-12)


# ------------------------------------------------------------------------------ a 3-D CNN trained here

BLOB = (slice(2, 6), slice(10, 15), slice(3, 8))  # (z, y, x) voxels of class 1's blob in a 8x16x16 volume


def test_trained_3d_cnn_gradcam_beats_a_random_map() -> None:
    model, xt, yt, accuracy = trained_blob_cnn((8, 16, 16), BLOB, steps=40, n_test=12)
    assert accuracy >= 0.9, f"the 3-D CNN did not learn the blob (accuracy {accuracy:.2f})"
    samples = xt[yt == 1][:5]
    ex = camanim.explain(model, samples, methods="gradcam", layers="last", target=1)
    up = ex.upsampled("gradcam", ex.chosen[-1].name)  # (5, 8, 16, 16)
    rng = torch.Generator().manual_seed(7)
    wins, gaps = 0, []
    for i in range(samples.shape[0]):
        maps = {"gradcam": up[i], "random": torch.rand(8, 16, 16, generator=rng)}
        s = road_scores(model, samples[i : i + 1], maps, 1, seed=i)
        gaps.append(s["gradcam"] - s["random"])
        wins += s["gradcam"] > s["random"]
    assert wins >= 4, f"Grad-CAM beat the random map on {wins} of 5 volumes (ROAD gaps {gaps})"


# ------------------------------------------------------------------------------ the command line


@pytest.fixture(scope="module")
def nifti(tmp_path_factory) -> tuple[Path, Path]:
    """A small NIfTI with a bright box and a MONAI 3-D ResNet checkpoint (random weights)."""
    nib = pytest.importorskip("nibabel", reason="nibabel is in the extra camanim[volume]")
    pytest.importorskip("monai", reason="MONAI is in the extra camanim[volume]")
    from camanim.compute import models

    folder = tmp_path_factory.mktemp("nifti")
    torch.manual_seed(0)
    net, _ = models.build_monai("resnet10")
    torch.save(net.state_dict(), folder / "resnet10.pt")
    data = np.random.default_rng(0).normal(size=(16, 12, 10)).astype(np.float32) * 50
    data[4:10, 3:8, 2:6] += 400
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.5, 1.0])), folder / "scan.nii.gz")
    return folder / "scan.nii.gz", folder / "resnet10.pt"


def _model_args(nifti: tuple[Path, Path]) -> list[str]:
    return ["--image", str(nifti[0]), "--model", "monai:resnet10", "--checkpoint", str(nifti[1])]


def test_cli_road_on_a_nifti(nifti, tmp_path: Path, capsys) -> None:
    out = tmp_path / "road"
    code = main(
        ["--quiet", "road", *_model_args(nifti), "--layers", "2", "--window", "100,800", "--out", str(out)]
    )
    assert code == 0, capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    assert {"ybroad.csv", "ybroad.json", "ybroad.png", "summary.csv", "maps.npz", "input.npy"} <= set(
        m["files"]
    )
    assert m["image"]["window"] == [100.0, 800.0] and m["input"]["shape"] == [1, 1, 10, 12, 16]
    with (out / "ybroad.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    values = [float(v) for r in rows for k, v in r.items() if k.startswith(("road", "morf", "lerf"))]
    assert values and all(math.isfinite(v) for v in values)
    summary = json.loads((out / "ybroad.json").read_text())
    assert summary["imputer"].startswith("NoisyLinearImputer3D")
    assert math.isfinite(summary["methods"]["gradcam"]["max_ybroad"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["compare", "--layers", "last"], "compare draws a grid of 2-D overlays"),
        (["fmgcam", "--top-k", "2"], "FM-G-CAM fuses 2-D maps"),
        (["sanity", "--layers", "last", "--depths", "1"], "randomisation check compares 2-D maps"),
        (["road", "--layers", "last", "--imputer", "spsolve"], "imputes 2-D images only"),
    ],
)
def test_cli_refuses_what_stays_2d_in_one_line(nifti, tmp_path: Path, capsys, args, message) -> None:
    code = main(["--quiet", args[0], *_model_args(nifti), *args[1:], "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("camanim: error: ") and message in err, err


def test_cli_study_refuses_volumes(nifti, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "scans"
    folder.mkdir()
    (folder / "scan.nii.gz").write_bytes(nifti[0].read_bytes())
    code = main(
        [
            "--quiet",
            "study",
            "--images",
            str(folder),
            "--model",
            "monai:resnet10",
            "--out",
            str(tmp_path / "s"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "scores 2-D images" in err, err
