"""What a map means at transformer layers: the last layer that can show something, maps that are zero by
a LayerNorm's invariance, and every tiny architecture explained and animated by the kind rule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import camanim
from camanim.compute.capture import capture
from camanim.compute.layers import list_layers
from camanim.compute.methods import get_method, list_methods
from camanim.compute.methods.base import LayerTensors
from camanim.compute.models import Preprocessing, wrap_model
from camanim.compute.targets import ClassLogit
from camanim.pipelines.explain import describe

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=5).eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_last_is_the_last_layer_whose_map_can_show_something(vit, x):
    """A ViT's final norm and the last block after its attention reach the head only through the class
    token: their patch tokens' gradient is exactly zero, so ``last`` passes them over, and says so."""
    ex = camanim.explain(vit, x, methods="gradcam,hirescam", layers="last")
    assert [la.name for la in ex.chosen] == ["blocks.11.attn.qkv"]
    assert float(ex.raw("gradcam", "blocks.11.attn.qkv").abs().max()) > 0
    passed = [la.name for la, _ in ex.passed_over]
    assert passed[-1] == "norm" and "blocks.11" in passed
    r = capture(vit, x, ClassLogit((int(ex.targets[0]),)), lambda la: la.name in passed)
    assert all(not bool(r.gradients[n].any()) for n in passed)  # exactly zero, as the reason says
    sweep = camanim.explain(vit, x, methods="gradcam", layers="all")
    assert (
        sweep.chosen[-1].name == "blocks.11.attn.qkv" and [la.name for la, _ in sweep.passed_over] == passed
    )
    manifest = describe(sweep)
    assert [p["name"] for p in manifest["passed_over"]] == passed
    assert all("zero at every position" in p["reason"] for p in manifest["passed_over"])
    named = camanim.explain(vit, x, methods="gradcam", layers="norm")  # asked for by name: kept, flagged
    assert [la.name for la in named.chosen] == ["norm"] and "zero_gradient" in named.flags["gradcam"]["norm"]
    with_eigen = camanim.explain(vit, x, methods="gradcam,eigencam", layers="last")
    assert [la.name for la in with_eigen.chosen] == ["norm"]  # EigenCAM's map there is not blank


def test_animation_lists_the_passed_over_layers(vit, x, tmp_path):
    lm = wrap_model(vit, preprocessing=Preprocessing(size=(64, 64)))
    anim = camanim.animate(lm, x, methods="gradcam", layers="last", size=32)
    assert any(la.name == "norm" and "zero at every position" in r for la, r in anim.skipped)
    out = anim.save(tmp_path / "a", formats="frames")
    manifest = camanim.outputs.bundle.read_manifest(out)
    assert "norm" in [p["name"] for p in manifest["passed_over"]]
    assert "norm" in [s["name"] for s in manifest["animation"]["skipped"]]


def test_hirescam_before_a_layernorm_is_zero_and_flagged(vit, x):
    """Sum_c G*A at blocks.10 (whose patch tokens reach the output only through blocks.11.norm1) is zero
    by LayerNorm's invariance: float64 with the norms' eps set to 0 gives 1e-16 of its terms. Shown as
    zero and flagged; one block earlier it is a real map."""
    ex = camanim.explain(vit, x, methods="all", layers="blocks.9,blocks.10")
    assert "cancelled" in ex.flags["hirescam"]["blocks.10"]
    assert not bool(ex.raw("hirescam", "blocks.10").any())
    assert "cancelled" not in ex.flags["hirescam"]["blocks.9"] and bool(ex.raw("hirescam", "blocks.9").any())
    exact = _float64_without_eps(vit)
    r = capture(exact, x.double(), ClassLogit((int(ex.targets[0]),)), lambda la: la.name == "blocks.10")
    ga = r.gradients["blocks.10"] * r.values["blocks.10"]
    assert float(ga.sum(1).abs().max() / ga.abs().sum(1).max()) < 1e-12
    # every other method is far above the rounding level there (and is not flagged)
    for m in ex.methods:
        if m != "hirescam":
            assert "cancelled" not in ex.flags[m]["blocks.10"], m
    r32 = capture(vit, x, ClassLogit((int(ex.targets[0]),)), lambda la: la.name == "blocks.10")
    t = LayerTensors(r32.values["blocks.10"], r32.gradients["blocks.10"])
    for m in list_methods(one_pass=True, needs_gradients=True):
        method = get_method(m)
        if method.uses_channel_weights:
            w = method.channel_weights(t)
            terms = torch.einsum("bc,bchw->bhw", w.abs(), t.acts.abs())
            ratio = float(method(t.acts, t.grads).abs().max() / terms.max())
            assert ratio > 1e-3, (m, ratio)


def _float64_without_eps(model: nn.Module) -> nn.Module:
    import copy

    exact = copy.deepcopy(model).double()
    for mod in exact.modules():
        if isinstance(mod, nn.LayerNorm):
            mod.eps = 0.0
    return exact


def test_convnext_stem_hirescam_is_cancelled():
    """ConvNeXt's stem convolution feeds only a LayerNorm (the measured case of the notes)."""
    torch.manual_seed(0)
    model = timm.create_model("test_convnext", pretrained=False, num_classes=4).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    ex = camanim.explain(model, x, methods="hirescam,gradcam", layers="stem.0")
    assert "cancelled" in ex.flags["hirescam"]["stem.0"] and "cancelled" not in ex.flags["gradcam"]["stem.0"]


TINY = [
    "test_vit",
    "test_vit2",
    "test_vit3",
    "test_vit4",
    "test_convnext",
    "test_convnext2",
    "test_convnext3",
    "test_maxvit",
    "test_coatnet",
    "test_efficientnet",
    "test_byobnet",
    "test_nfnet",
    "test_resnet",
]


@pytest.mark.parametrize("name", [n for n in TINY if n in set(timm.list_models("test_*"))])
def test_tiny_architectures_explain_and_animate_by_the_rule(name, tmp_path):
    """Every tiny timm family: its layer kinds are what the rule says, and it explains and animates."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=3).eval()
    size = model.pretrained_cfg.get("input_size", (3, 64, 64))[1:]
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    layers = list_layers(model, x)
    for la in layers:
        if la.kind == "spatial":
            assert la.shape[0] == 1 and la.map_size == la.shape[2:]
        elif la.kind == "channels_last":
            assert la.map_size == la.shape[1:3]
        elif la.kind == "token":
            h, w = la.map_size
            assert la.shape[1] == la.prefix_tokens + h * w and 0 <= la.prefix_tokens <= 8
        if la.is_spatial:  # a grid of the input: one integer stride for both axes
            h, w = la.map_size
            assert round(size[0] / h) == round(size[1] / w)
    lm = wrap_model(model, preprocessing=Preprocessing(size=tuple(size)))
    anim = camanim.animate(lm, x, methods="gradcam,hirescam", layers="all", size=32)
    assert len(anim) == len(anim.explanation.chosen) > 0
    frame = anim.frame(-1)
    assert frame.ndim == 3 and frame.shape[2] == 3


@pytest.mark.parametrize(
    "name", ["squeezenet1_1", "mobilenet_v3_small", "shufflenet_v2_x0_5", "regnet_x_400mf"]
)
def test_small_torchvision_models_explain_and_animate(name):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=3).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    layers = list_layers(model, x)
    assert all(la.kind in ("spatial", "nonspatial") for la in layers)  # CNNs: no tokens, no channels-last
    assert all(la.map_size == la.shape[2:] for la in layers if la.kind == "spatial")
    lm = wrap_model(model, preprocessing=Preprocessing(size=(64, 64)))
    anim = camanim.animate(lm, x, methods="gradcam", layers="all", size=32)
    assert len(anim) > 5 and anim.frame(0).shape[2] == 3


class _RowAttention(nn.Module):
    """Attention among the rows of a feature map: with a 16 x 16 input its probabilities ``(B, 2, 16, 16)``
    have the input's grid by shape (and grow with it), yet are rows x rows, not a picture. ``classes`` is a
    softmax over channels (a class-probability map), which is a picture."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.classes = nn.Softmax(dim=1)
        self.attend = nn.Softmax(dim=-1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.conv(x)
        p = self.classes(f)
        rows = f.mean(3).transpose(1, 2).reshape(x.shape[0], -1, 2, 4).transpose(1, 2)  # (B, 2, H, 4)
        a = self.attend(rows @ rows.transpose(-1, -2))  # (B, 2, H, H)
        mixed = (a @ rows).transpose(1, 2).reshape(x.shape[0], -1, 8)  # (B, H, 8)
        return self.head(mixed.mean(1) + p.mean((2, 3)))


def test_attention_probabilities_are_never_maps_whatever_their_shape():
    torch.manual_seed(0)
    model = _RowAttention().eval()
    kinds = {la.name: la.kind for la in list_layers(model, torch.randn(1, 3, 16, 16))}
    assert kinds["attend"] == "nonspatial"  # (1, 2, 16, 16) rows of probabilities
    assert kinds["classes"] == "spatial" and kinds["conv"] == "spatial"
    ex = camanim.explain(model, torch.randn(1, 3, 16, 16), methods="gradcam", layers="all")
    assert "attend" not in [la.name for la in ex.chosen] and "classes" in [la.name for la in ex.chosen]


@pytest.mark.parametrize(("name", "size"), [("xcit_nano_12_p8_224", 64), ("edgenext_xx_small", 64)])
def test_cross_covariance_attention_is_not_a_map(name, size):
    """XCiT's and EdgeNeXt's attention across channels ``(1, heads, C/h, C/h)`` is a grid of a small input
    by its sizes; its values (rows summing to one) say it is not."""
    model = timm.create_model(name, pretrained=False).eval()
    table = list_layers(model, torch.zeros(1, 3, size, size))
    attention = [la for la in table if la.name.endswith(("attn_drop", "softmax"))]
    assert attention and all(la.kind == "nonspatial" for la in attention)
    assert any(la.kind == "token" for la in table) and any(la.kind == "spatial" for la in table)
