"""Volumes and clips ``(B, C, D, H, W)``: layer kinds, every one-pass method in 3-D, parity with grad-cam's 3-D
path, a 3-D CNN trained here looking at its blob, 2-D models unchanged, and the 3-D ROAD imputer.

grad-cam (pytorch_grad_cam 1.5) handles 5-D activations: channel weights pooled over ``(d, h, w)``, maps
resized to the input with ``scipy.ndimage.zoom`` (cubic spline) in ``scale_cam_image``, clipped at 0 again
when it aggregates. Our maps are compared after that post-processing on both sides (:func:`_gradcam_post`); the eigen methods at the layer's
resolution against ``get_2d_projection`` on what grad-cam recorded, up to sign; above
:data:`EIGEN_MAX_POSITIONS` positions (where its full SVD builds a positions x positions matrix) against the
same projection with a thin float64 SVD (:func:`_thin_projection`).

Layer choice (grad-cam keeps the tensor a module returned without copying it, so an in-place operation
after the hook changes what it recorded; see the notes on references): in ``r3d_18`` every layer below feeds
only out-of-place operations: ``stem.2`` (the stem's ReLU; the next block keeps it as its residual and adds
to its own branch, ``out += residual``, which modifies ``out``, not it), ``layer2.0.relu`` and
``layer4.1.relu`` (block outputs, read by the next block or the pooling). ``conv2.1`` batch norms are not
used: ``out += residual`` acts on their output in place. The small CNN has no in-place operation.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg
import torch
from torch import nn

import camanim
from camanim.compute.layers import as_bchw, as_map, classify_shape, list_layers
from camanim.compute.methods import list_methods
from camanim.compute.methods.gradient import GradCAM
from camanim.compute.metrics.imputers3d import NoisyLinearImputer3D, assemble_system_3d
from camanim.compute.models import load_model
from camanim.compute.normalize import global_range, local_ranges
from camanim.compute.resize import resize_maps, upsample_by_size
from camanim.compute.volume_maps import volume_display
from camanim.errors import OptionError, WeightsError

from .volume_models import Small3DCNN, trained_blob_cnn

gradcam_pkg = pytest.importorskip("pytorch_grad_cam", reason="the grad-cam package is not installed")
pytest.importorskip("cv2", reason="grad-cam needs OpenCV (cv2)")

from pytorch_grad_cam.utils.image import scale_cam_image  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection  # noqa: E402

GRADIENT_METHODS = {
    "gradcam": gradcam_pkg.GradCAM,
    "hirescam": gradcam_pkg.HiResCAM,
    "gradcamelementwise": gradcam_pkg.GradCAMElementWise,
    "gradcam++": gradcam_pkg.GradCAMPlusPlus,
    "xgradcam": gradcam_pkg.XGradCAM,
    "layercam": gradcam_pkg.LayerCAM,
}
EIGEN_INPUTS = {"eigencam": lambda a, g: a, "eigengradcam": lambda a, g: g * a}
EIGEN_MAX_POSITIONS = 2048
MIN_PEARSON = 0.999


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


def _r3d() -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.video.r3d_18(weights=None).eval()


def _parity_cases():
    torch.manual_seed(1)
    small = Small3DCNN().eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        small.features[4].running_mean.uniform_(-0.2, 0.2)
        small.features[4].running_var.uniform_(0.5, 1.5)
    return {
        "small3d": (lambda: small, (1, 1, 16, 32, 32), ("features.1", "features.5", "features.8")),
        "r3d_18": (_r3d, (1, 3, 8, 64, 64), ("stem.2", "layer2.0.relu", "layer4.1.relu")),
    }


def _gradcam_post(cam: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    """grad-cam's steps after a map ``(1, d, h, w)`` (``compute_cam_per_layer`` and ``aggregate_multi_layers``
    for one layer): ReLU, min-max, cubic-spline ``zoom`` to ``(D, H, W)``, ReLU again (the spline overshoots
    below 0), min-max."""
    d, h, w = size
    return scale_cam_image(np.maximum(scale_cam_image(np.maximum(cam, 0), (w, h, d)), 0))[0]


@pytest.fixture(scope="module", params=["small3d", "r3d_18"])
def parity(request):
    """Our one-call explanation and grad-cam's results at each layer.

    grad-cam runs once per layer (its GradCAM: forward, ``loss.backward()``, its hooks record ``A`` and ``G``);
    every other method's reference is that method's own ``get_cam_image`` on what grad-cam recorded, followed
    by grad-cam's post-processing (:func:`_gradcam_post`), which is what its ``forward`` computes.
    """
    make, shape, layers = _parity_cases()[request.param]
    model = make()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    ex = camanim.explain(model, x, methods=[*GRADIENT_METHODS, *EIGEN_INPUTS], layers=list(layers))
    modules = dict(model.named_modules())
    targets = [ClassifierOutputTarget(ex.targets[0])]
    reference, recorded = {}, {}
    for layer in layers:
        target_layers = [modules[layer]]
        with gradcam_pkg.GradCAM(model=model, target_layers=target_layers) as cam:
            reference["gradcam", layer] = cam(input_tensor=x, targets=targets)[0]
            rec = cam.activations_and_grads
            a, g = rec.activations[0].numpy().copy(), rec.gradients[0].numpy().copy()
        recorded[layer] = (a, g)
        for method, cls in GRADIENT_METHODS.items():
            if method == "gradcam":
                continue
            with cls(model=model, target_layers=target_layers) as cam:
                raw = cam.get_cam_image(x, target_layers[0], targets, a, g, False)
            reference[method, layer] = _gradcam_post(raw, tuple(x.shape[2:]))
    for p in model.parameters():  # grad-cam calls loss.backward(); leave no .grad behind
        p.grad = None
    return ex, x, layers, reference, recorded


@pytest.mark.parametrize("position", range(3), ids=["first", "middle", "last"])
@pytest.mark.parametrize("method", list(GRADIENT_METHODS))
def test_gradient_methods_match_gradcam_in_3d(parity, method: str, position: int) -> None:
    ex, x, layers, reference, _ = parity
    layer = layers[position]
    raw = ex.raw(method, layer)
    assert raw.dim() == 4 and tuple(raw.shape[1:]) == ex.layer(layer).map_size
    ours = _gradcam_post(raw.numpy(), tuple(x.shape[2:]))
    ref = reference[method, layer]
    assert ours.shape == ref.shape == tuple(x.shape[2:])
    r = _pearson(ours, ref)
    assert r >= MIN_PEARSON, f"{method} at {layer}: Pearson {r:.6f} with grad-cam"


def _thin_projection(batch: np.ndarray) -> np.ndarray:
    """grad-cam's ``get_2d_projection`` in float64 with a thin SVD: the same centred positions x channels
    matrix and its first right singular vector, without the positions x positions ``U`` of its full SVD."""
    out = []
    for a in np.nan_to_num(batch.astype(np.float64)):
        m = a.reshape(a.shape[0], -1).T
        m = m - m.mean(axis=0)
        vt = np.linalg.svd(m, full_matrices=False)[2]
        out.append((m @ vt[0]).reshape(a.shape[1:]))
    return np.asarray(out)


@pytest.mark.parametrize("position", range(3), ids=["first", "middle", "last"])
@pytest.mark.parametrize("method", list(EIGEN_INPUTS))
def test_eigen_methods_match_gradcam_projection_in_3d(parity, method: str, position: int) -> None:
    ex, _, layers, _, recorded = parity
    layer = layers[position]
    acts, grads = recorded[layer]
    weighted = EIGEN_INPUTS[method](acts, grads)
    if np.prod(acts.shape[2:]) > EIGEN_MAX_POSITIONS:
        ref = _thin_projection(weighted)[0]
    else:
        ref = get_2d_projection(weighted)[0]
    ours = ex.raw(method, layer)[0].numpy()
    assert ours.shape == ref.shape and ours.ndim == 3
    r = _pearson(ours, ref)
    assert abs(r) >= MIN_PEARSON, f"{method} at {layer}: |Pearson| {abs(r):.6f} with get_2d_projection"


def test_every_volume_method_gives_finite_volume_maps_and_others_are_refused() -> None:
    torch.manual_seed(0)
    model = Small3DCNN().eval()
    x = torch.randn(2, 1, 8, 16, 16)
    methods = list_methods(volumes=True)
    assert {"gradcam", "hirescam", "gradcam++", "xgradcam", "layercam", "eigencam", "eigengradcam"} <= set(
        methods
    )
    ex = camanim.explain(model, x, methods=methods, layers="all")
    assert ex.is_volume and ex.display.shape == (2, 8, 16, 16, 3) and ex.display.dtype == np.uint8
    assert ex.image_info["volume"]["shape"] == [8, 16, 16]
    for method in methods:
        for layer in ex.chosen:
            m = ex.raw(method, layer.name)
            assert m.shape == (2, *layer.map_size) and m.dtype == torch.float32
            assert torch.isfinite(m).all()
            assert ex.upsampled(method, layer.name).shape == (2, 8, 16, 16)
    with pytest.raises(OptionError, match="not defined for volumes"):
        camanim.explain(model, x, methods="scorecam", layers="last")
    assert not any(hasattr(m, "_forward_hooks") and m._forward_hooks for m in model.modules())


def test_flattened_volume_equals_gradcam_on_the_volume() -> None:
    """``as_bchw`` + method + ``as_map`` equals Grad-CAM's formula written for ``(B, C, d, h, w)``."""
    layer = next(la for la in list_layers(Small3DCNN().eval(), (1, 1, 8, 16, 16)) if la.name == "features.5")
    a, g = torch.randn(1, 16, 4, 8, 8), torch.randn(1, 16, 4, 8, 8)
    ours = as_map(GradCAM()(as_bchw(a, layer), as_bchw(g, layer)), layer)
    expected = torch.einsum("bc,bcdhw->bdhw", g.mean(dim=(2, 3, 4)), a)
    torch.testing.assert_close(ours, expected)


# ------------------------------------------------------------------------------------- kinds


def test_r3d_18_kinds() -> None:
    layers = {la.name: la for la in list_layers(_r3d(), (1, 3, 8, 64, 64))}
    assert layers["stem.2"].kind == "volume" and layers["stem.2"].map_size == (8, 32, 32)
    assert layers["layer3.1.relu"].map_size == (2, 8, 8)
    assert layers["layer4.1.relu"].kind == "volume" and layers["layer4.1.relu"].map_size == (1, 4, 4)
    assert layers["avgpool"].kind == "nonspatial" and layers["fc"].kind == "nonspatial"
    assert sum(la.is_volume for la in layers.values()) == 89


def test_monai_densenet121_kinds() -> None:
    nets = pytest.importorskip("monai.networks.nets", reason="MONAI (camanim[volume]) is not installed")
    torch.manual_seed(0)
    model = nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=2).eval()
    layers = {la.name: la for la in list_layers(model, (1, 1, 32, 64, 64))}
    assert layers["features.conv0"].kind == "volume" and layers["features.conv0"].map_size == (16, 32, 32)
    assert layers["features.norm5"].kind == "volume" and layers["features.norm5"].map_size == (1, 2, 2)
    assert layers["class_layers.relu"].kind == "volume"  # the ReLU before the pooling still has the grid
    for name in ("class_layers.pool", "class_layers.flatten", "class_layers.out"):
        assert layers[name].kind == "nonspatial", name
    assert sum(la.is_volume for la in layers.values()) == len(layers) - 4


def test_channels_last_volume_and_other_shapes() -> None:
    dhw = (16, 64, 64)
    assert classify_shape((1, 8, 16, 16, 32), "LayerNorm", 1, dhw)[:2] == (
        "volume_channels_last",
        (8, 16, 16),
    )
    assert classify_shape((1, 32, 8, 16, 16), "Conv3d", 1, dhw)[:2] == ("volume", (8, 16, 16))
    assert classify_shape((1, 32, 16, 16), "Conv2d", 1, dhw)[0] == "nonspatial"  # 4-D in a volume model
    assert classify_shape((1, 32, 1, 1, 1), "AdaptiveAvgPool3d", 1, dhw)[:2] == ("nonspatial", (1, 1, 1))
    assert classify_shape((1, 32, 7, 16, 16), "Conv3d", 1, dhw)[0] == "nonspatial"  # 16 / 7: no stride


# ------------------------------------------------------------------------------------- 2-D unchanged


def test_two_d_models_are_unaffected() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()  # fmt: skip
    x = torch.randn(1, 3, 20, 20)
    ex = camanim.explain(model, x, methods="gradcam", layers="all")
    assert not ex.is_volume and ex.grid == (20, 20) and ex.display.shape == (1, 20, 20, 3)
    assert [la.kind for la in ex.chosen] == ["spatial"] * 4
    acts = {}
    model[3].register_forward_hook(lambda m, i, o: acts.setdefault("a", o))
    xr = x.clone().requires_grad_(True)
    out = model(xr)
    (g,) = torch.autograd.grad(out[0, ex.targets[0]], acts["a"])
    expected = torch.einsum("bc,bchw->bhw", g.mean(dim=(2, 3)), acts["a"].detach())
    torch.testing.assert_close(ex.raw("gradcam", "3"), expected, rtol=1e-5, atol=1e-6)
    assert classify_shape((1, 8, 4, 5, 5), "Conv3d", 1, (20, 20))[0] == "nonspatial"  # 5-D in a 2-D model


# ------------------------------------------------------------------------------------- resize, ranges


def test_trilinear_resize_and_volume_ranges() -> None:
    m = torch.rand(2, 3, 4, 5)
    up = resize_maps(m, (6, 8, 10))
    expected = torch.nn.functional.interpolate(m[:, None], size=(6, 8, 10), mode="trilinear")[:, 0]
    torch.testing.assert_close(up, expected)
    stack = upsample_by_size([m[0], torch.rand(1, 2, 2)], (6, 8, 10), relu=True)
    assert stack.shape == (2, 6, 8, 10) and stack.min() >= 0
    a, b = np.zeros((2, 3, 3)), np.zeros((2, 3, 3))
    a[1, 2, 2], b[0, 0, 0] = 1.0, 4.0
    assert [(r.low, r.high) for r in local_ranges([a, b])] == [(0.0, 1.0), (0.0, 4.0)]
    assert (global_range([a, b]).low, global_range([a, b]).high) == (0.0, 4.0)


def test_volume_display_is_windowed_grey_or_clip_colours() -> None:
    x = torch.linspace(-1000, 1000, 2 * 3 * 4).reshape(1, 1, 2, 3, 4)
    grey = volume_display(x, bounds=(-100.0, 100.0))
    assert grey.shape == (1, 2, 3, 4, 3) and grey.min() == 0 and grey.max() == 255
    assert (grey[..., 0] == grey[..., 2]).all()
    clip = volume_display(torch.zeros(1, 3, 2, 3, 4), mean=(0.2, 0.5, 0.8), std=(1.0, 1.0, 1.0))
    assert tuple(clip[0, 0, 0, 0]) == (51, 128, 204)


def test_numpy_volume_input() -> None:
    torch.manual_seed(0)
    vol = np.random.default_rng(0).normal(size=(8, 16, 16)).astype(np.float32)
    ex = camanim.explain(Small3DCNN().eval(), vol, methods="gradcam", layers="last")
    assert ex.input.shape == (1, 1, 8, 16, 16) and ex.raw("gradcam", ex.chosen[-1].name).shape == (1, 2, 4, 4)


# ------------------------------------------------------------------------------------- trained


BLOB = (slice(3, 8), slice(14, 20), slice(4, 10))  # (z, y, x) voxels of class 1's blob in a 12x24x24 volume


def test_trained_3d_cnn_looks_at_the_blob() -> None:
    model, xt, _, accuracy = trained_blob_cnn((12, 24, 24), BLOB, steps=30, n_test=16)
    assert accuracy >= 0.9, f"the 3-D CNN did not learn the blob (accuracy {accuracy:.2f})"
    ex = camanim.explain(model, xt[1::2][:4], methods="gradcam", layers=2, target=1)
    assert len(ex.chosen) == 2
    lo = np.array([s.start for s in BLOB]) - 2
    hi = np.array([s.stop for s in BLOB]) + 2
    for layer in ex.chosen:
        up = ex.upsampled("gradcam", layer.name)
        for sample in up:
            peak = np.unravel_index(int(sample.argmax()), sample.shape)
            assert ((lo <= peak) & (peak < hi)).all(), f"{layer.name}: peak {peak} outside the blob {BLOB}"


# ------------------------------------------------------------------------------------- 3-D imputer


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_3d_imputer_matches_spsolve(fraction: float) -> None:
    rng = np.random.default_rng(int(fraction * 10))
    image = rng.random((2, 6, 10, 12)).astype(np.float32)
    mask = rng.random((6, 10, 12)) < fraction
    mat, rhs = assemble_system_3d(mask, image.astype(np.float64))
    ref = image.astype(np.float64).copy()
    solved = scipy.sparse.linalg.spsolve(mat.tocsc(), rhs)
    ref[:, mask] = np.asarray(solved).reshape(-1, image.shape[0]).T
    ours = NoisyLinearImputer3D(noise=0.0).impute_clean(
        torch.from_numpy(image)[None], torch.from_numpy(mask)[None]
    )
    np.testing.assert_allclose(ours[0].numpy(), ref, atol=1e-4)
    assert (ours[0].numpy()[:, ~mask] == image[:, ~mask]).all()


# ------------------------------------------------------------------------------------- models by name


def test_video_and_monai_models_by_name() -> None:
    lm = load_model("r3d_18", "none")
    assert lm.preprocessing.input_shape() == (1, 3, 16, 112, 112)
    assert lm.name == "torchvision:r3d_18" and len(lm.labels) == 400  # Kinetics-400 names
    assert lm.preprocessing.to_dict()["depth"] == 16
    pytest.importorskip("monai", reason="MONAI (camanim[volume]) is not installed")
    with pytest.raises(WeightsError, match="no pretrained weights"):
        load_model("monai:DenseNet121")
    net = load_model("monai:resnet18", "none", num_classes=3)
    assert net.preprocessing.input_shape((16, 16)) == (1, 1, 96, 16, 16)
    assert net.module.fc.out_features == 3 and net.module.conv1.in_channels == 1
