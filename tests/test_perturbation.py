"""Score-CAM and Ablation-CAM: parity with grad-cam, brute-force definitions, chunking, fallbacks, pipeline.

Parity: grad-cam's ScoreCAM / AblationCAM at the last spatial layer of a seeded random ResNet-18
(``layer4.1.relu#2`` here, the output of ``model.layer4[-1]`` there). The input is 64 px to keep the suite
fast (each side runs 512 forwards); since layer4 is then 2 x 2, the 512 channel weights are compared as
well as the maps, the maps after grad-cam's post-processing on both sides (ReLU, min-max, ``cv2.resize``:
``scale_cam_image``).
"""

from __future__ import annotations

import copy
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from torch import nn

import camanim
from camanim.compute.layers import default_layers, list_layers
from camanim.compute.methods import get_method, list_methods, parse_methods
from camanim.compute.methods.perturbation import AblationCAM, ScoreCAM, select_channels

from .conftest import TinyCNN, no_hooks

LAST = "layer4.1.relu#2"
PARITY_SIZE = 64
MIN_PEARSON = 0.99


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


# ----------------------------------------------------------------------------------------- grad-cam parity


@pytest.fixture(scope="module")
def parity_case(resnet18):
    torch.manual_seed(11)
    x = torch.randn(1, 3, PARITY_SIZE, PARITY_SIZE)
    with torch.no_grad():
        cls = int(resnet18(x).argmax())
    return resnet18, x, cls


def _recording(obj, attr: str, store: list) -> None:
    """Wrap ``obj.attr`` (a method) so that each return value is appended to ``store``."""
    original = getattr(obj, attr)

    def wrapper(*args, **kwargs):
        out = original(*args, **kwargs)
        store.append(np.asarray(torch.as_tensor(out)).ravel())
        return out

    setattr(obj, attr, wrapper)


@pytest.mark.parametrize("name", ["scorecam", "ablationcam"])
def test_parity_with_gradcam_package(parity_case, name):
    """Maps (after grad-cam's post-processing) and the 512 channel weights agree with grad-cam's.

    grad-cam runs on a channels_last copy of the model: its algorithm, unchanged, at our layout's speed.
    """
    pytest.importorskip("cv2", reason="grad-cam needs OpenCV (cv2)")
    gc = pytest.importorskip("pytorch_grad_cam", reason="the grad-cam package is not installed")
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model, x, cls = parity_case
    assert [layer.name for layer in camanim.explain(model, x, layers="last", target=cls).chosen] == [LAST]
    method, ours_w, theirs_w = get_method(name), [], []
    _recording(method, "channel_scores", ours_w)
    ours = method.compute(model, x, LAST, target=cls, batch_size=32)
    ref_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    if name == "scorecam":
        ref = gc.ScoreCAM(model=ref_model, target_layers=[ref_model.layer4[-1]])
        ref.batch_size = 32
    else:
        ref = gc.AblationCAM(model=ref_model, target_layers=[ref_model.layer4[-1]], batch_size=32)
    _recording(ref, "get_cam_weights", theirs_w)
    theirs = ref(
        input_tensor=x.contiguous(memory_format=torch.channels_last), targets=[ClassifierOutputTarget(cls)]
    )
    ref.activations_and_grads.release()
    assert len(ours_w) == len(theirs_w) == 1 and ours_w[0].shape == theirs_w[0].shape == (512,)
    assert _pearson(ours_w[0], theirs_w[0]) >= MIN_PEARSON
    ours_scaled = scale_cam_image(np.maximum(ours.numpy(), 0), (PARITY_SIZE, PARITY_SIZE))
    assert ours_scaled.shape == theirs.shape == (1, PARITY_SIZE, PARITY_SIZE)
    assert np.ptp(ours_scaled) > 0.5  # not a flat map, which would make the correlation meaningless
    assert _pearson(ours_scaled, theirs) >= MIN_PEARSON
    assert no_hooks(model)


# --------------------------------------------------------------------------------- brute-force references


def _acts_and_score(model: nn.Module, x: torch.Tensor, module: nn.Module, cls: int, zero: int | None = None):
    store = {}

    def hook(_m, _i, out):
        if zero is not None:
            out = out.clone()
            out[:, zero] = 0
        store["a"] = out.detach().clone()
        return out

    h = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            y = model(x)[:, cls]
    finally:
        h.remove()
    return store["a"], y


def _brute_ablation(model, x, module, cls, channels=None):
    a, y = _acts_and_score(model, x, module, cls)
    channels = range(a.shape[1]) if channels is None else channels
    w = torch.zeros(a.shape[1])
    for c in channels:
        _, yc = _acts_and_score(model, x, module, cls, zero=c)
        w[c] = (y - yc) / y
    return torch.einsum("c,chw->hw", w, a[0])[None]


def _brute_scorecam(model, x, module, cls, channels=None):
    a, _ = _acts_and_score(model, x, module, cls)
    channels = list(range(a.shape[1])) if channels is None else list(channels)
    scores = []
    for c in channels:
        up = torch.nn.functional.interpolate(
            a[:, c : c + 1], size=x.shape[-2:], mode="bilinear", align_corners=True
        )
        mask = (up - up.min()) / (up.max() - up.min() + 1e-8)
        with torch.no_grad():
            scores.append(float(model(x * mask)[0, cls]))
    w = torch.zeros(a.shape[1])
    w[torch.tensor(channels)] = torch.tensor(scores).softmax(0)
    return torch.einsum("c,chw->hw", w, a[0])[None]


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    model = TinyCNN(classes=5).eval()
    x = torch.randn(1, 3, 48, 48)
    return model, x


@pytest.mark.parametrize("channels_last", [False, True])
def test_ablation_equals_brute_force(tiny, channels_last):
    model, x = tiny
    ref = _brute_ablation(model, x, model.features[8], 3)
    ours = AblationCAM().compute(model, x, "features.8", target=3, batch_size=5, channels_last=channels_last)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_scorecam_equals_brute_force(tiny, channels_last):
    model, x = tiny
    ref = _brute_scorecam(model, x, model.features[8], 2)
    ours = ScoreCAM().compute(model, x, "features.8", target=2, batch_size=5, channels_last=channels_last)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)


def test_scorecam_compiled_equals_brute_force(tiny, monkeypatch):
    """With ``compile=True`` the forwards go through one Inductor graph (batches padded to one size)."""
    from camanim.compute.methods import perturbation

    made = []
    real = perturbation.CompiledForward

    def spy(net, batch):
        made.append(real(net, batch))
        return made[-1]

    monkeypatch.setattr(perturbation, "CompiledForward", spy)
    model, x = tiny
    ref = _brute_scorecam(model, x, model.features[8], 2)
    ours = ScoreCAM().compute(model, x, "features.8", target=2, batch_size=7, compile=True)
    assert len(made) == 1
    # Compiled (32 channels = 4 full batches + 1 padded) wherever Inductor has a C++ compiler to call.
    assert made[0].failed == (shutil.which(os.environ.get("CXX", "g++")) is None)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_scorecam_compile_failure_falls_back_to_eager(tiny, monkeypatch, caplog):
    def broken(*_args, **_kwargs):
        def fail(*_a, **_k):
            raise RuntimeError("no C++ compiler")

        return fail

    monkeypatch.setattr(torch, "compile", broken)
    model, x = tiny
    ref = _brute_scorecam(model, x, model.features[8], 2)
    with caplog.at_level(logging.WARNING):
        ours = ScoreCAM().compute(model, x, "features.8", target=2, batch_size=7, compile=True)
    assert "torch.compile failed" in caplog.text
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)


def test_max_channels_scores_only_the_strongest(tiny):
    model, x = tiny
    a, _ = _acts_and_score(model, x, model.features[8], 1)
    keep = select_channels(a[0], 6)
    strength = a[0].abs().mean(dim=(1, 2))
    assert set(keep.tolist()) == set(strength.argsort(descending=True)[:6].tolist())
    ours = ScoreCAM().compute(model, x, "features.8", target=1, max_channels=6)
    torch.testing.assert_close(
        ours, _brute_scorecam(model, x, model.features[8], 1, keep), rtol=1e-4, atol=1e-6
    )
    ours = AblationCAM().compute(model, x, "features.8", target=1, max_channels=6)
    torch.testing.assert_close(
        ours, _brute_ablation(model, x, model.features[8], 1, keep), rtol=1e-4, atol=1e-5
    )


class _PerSample(nn.Module):
    """Runs its module on each sample alone (fresh memory), so a sample's result cannot depend on its batch."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.inner(x[i : i + 1].clone()) for i in range(x.shape[0])])


def test_chunked_equals_unchunked_exactly():
    """Our chunking changes nothing: exact on a model whose per-sample outputs are batch-independent.

    (On an ordinary model, BLAS and oneDNN kernels can differ in the last bits between batch sizes, e.g.
    1.7e-6 on ResNet-18's ``fc`` between batches 7 and 64; see the ResNet-18 test below.)
    """
    torch.manual_seed(0)
    tiny = TinyCNN(classes=5).eval()
    model = nn.Sequential(
        _PerSample(tiny.features), _PerSample(nn.Sequential(tiny.pool, nn.Flatten(), tiny.fc))
    )
    x = torch.randn(1, 3, 48, 48)
    acts, _ = _acts_and_score(model, x, model[0].inner[8], 0)
    layer = "0.inner.8"  # the last ReLU, 32 channels
    for method in (ScoreCAM(), AblationCAM()):
        maps = [method.compute(model, x, layer, 1, acts, batch_size=bs) for bs in (7, 64, 1)]
        assert torch.equal(maps[0], maps[1]), method.name
        assert torch.equal(maps[2], maps[1]), method.name
        assert float(maps[1].abs().max()) > 0
    assert method.paths == {layer: "batch-1 prefix"}


def test_chunked_close_on_resnet18(parity_case):
    model, x, cls = parity_case
    x = x[..., :64, :64]
    for method in (ScoreCAM(), AblationCAM()):
        a = method.compute(model, x, LAST, target=cls, batch_size=7, max_channels=40)
        b = method.compute(model, x, LAST, target=cls, batch_size=64, max_channels=40)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


class _DenseLike(nn.Module):
    """Concatenates a layer's output with an earlier tensor: a batch-1 prefix cannot feed a wider batch."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        return self.head(torch.cat([s, self.block(s)], dim=1).mean(dim=(2, 3)))


def test_ablation_falls_back_to_whole_network_batches(caplog):
    torch.manual_seed(1)
    model = _DenseLike().eval()
    x = torch.randn(1, 3, 16, 16)
    method = AblationCAM()
    with caplog.at_level(logging.INFO, logger="camanim.compute.methods.perturbation"):
        ours = method.compute(model, x, "block.1", target=2, batch_size=3)
    assert method.paths == {"block.1": "whole-network batches"}
    assert "whole-network batches" in caplog.text
    torch.testing.assert_close(ours, _brute_ablation(model, x, model.block[1], 2), rtol=1e-4, atol=1e-6)


def test_ablation_uses_batch_one_prefix_on_resnet(parity_case):
    model, x, cls = parity_case
    method = AblationCAM()
    method.compute(model, x[..., :64, :64], "layer4.0.bn2", target=cls, max_channels=8)  # inside a block
    assert method.paths == {"layer4.0.bn2": "batch-1 prefix"}


# ----------------------------------------------------------------------------------------------- contract


def test_registry_capabilities():
    for name in ("scorecam", "ablationcam"):
        cls = type(get_method(name))
        assert cls.cost == "per_channel" and cls.needs_gradients is False
        assert name in list_methods() and name not in list_methods(one_pass=True)
        assert name not in parse_methods("all")
        with pytest.raises(NotImplementedError, match="compute"):
            get_method(name)(torch.rand(1, 4, 3, 3))


@pytest.mark.parametrize("channels_last", [False, True])
def test_model_left_as_found(tiny, channels_last):
    model, x = tiny
    model.train()
    model.features[0].weight.requires_grad_(False)
    state = copy.deepcopy(model.state_dict())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for method in (ScoreCAM(), AblationCAM()):
        method.compute(model, x, "features.8", target=0, channels_last=channels_last)
    assert model.training and all(m.training for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert no_hooks(model)


def test_explain_runs_per_channel_methods_after_the_capture(tiny, caplog):
    model, x = tiny
    x = torch.cat([x, x.flip(-1)])
    with caplog.at_level(logging.INFO, logger="camanim.compute.methods.perturbation"):
        ex = camanim.explain(
            model, x, methods="scorecam,gradcam,ablationcam", layers="last", target=[1, 2], batch_size=6
        )
    layer = ex.chosen[-1].name
    assert ex.methods == ("scorecam", "gradcam", "ablationcam")
    assert (
        "scorecam: 64 forwards (32 channels over 1 layer(s) x 2 sample(s)) in 12 batched calls" in caplog.text
    )
    assert "estimated" in caplog.text
    for name in ("scorecam", "ablationcam"):
        direct = get_method(name).compute(model, x, layer, target=[1, 2])
        torch.testing.assert_close(ex.raw(name, layer), direct, rtol=1e-5, atol=1e-6)
        assert ex.flags[name][layer] == ()
        assert ex.upsampled(name, layer).shape == (2, 48, 48)
    assert no_hooks(model)


def test_explain_all_layers_with_max_channels(tiny):
    model, x = tiny
    ex = camanim.explain(model, x, methods="ablationcam", layers="all", target=0, max_channels=4)
    assert [layer.name for layer in ex.chosen] == [
        layer.name for layer in default_layers(list_layers(model, x))
    ]
    for layer in ex.chosen:
        assert ex.raw("ablationcam", layer.name).shape == (1, *layer.map_size)
        assert torch.isfinite(ex.raw("ablationcam", layer.name)).all()


def test_cli_explain_scorecam(tmp_path, capsys):
    from camanim.cli import main
    from camanim.outputs.bundle import load_maps, read_manifest

    out = tmp_path / "b"
    args = ["explain", "--model", "resnet18", "--weights", "none", "--method", "scorecam", "--layers", "last"]
    assert main([*args, "--max-channels", "6", "--batch-size", "4", "--out", str(out)]) == 0
    manifest = read_manifest(out)
    assert [m["name"] for m in manifest["methods"]] == ["scorecam"]
    assert manifest["methods"][0]["cost"] == "per_channel"
    assert load_maps(out)[f"scorecam/{LAST}"].shape == (1, 7, 7)
