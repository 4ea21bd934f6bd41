"""The methods from grad-cam 1.5.7 and torchcam 0.5 at every layer: parity, contract, seeds.

Parity. Each method is compared with its reference implementation at the first, a middle and the last
swept layer of two architectures (a torchvision ResNet-18 and timm's tiny EfficientNet, random weights with
randomised batch-norm statistics so that FullGrad's biases are not zero), on raw maps where the reference
exposes them (Pearson >= 0.999):

* grad-cam (FEM, SegEigenCAM, KPCA-CAM, Deep Feature Factorization, FullGrad, SESS). grad-cam keeps the
  tensor a module returned without copying it, so a later in-place operation would change what it recorded
  (``../shared/notes/references.md``); its ``save_activation`` is patched here to clone, which makes it
  agree with its own intent at every layer. Its raw maps are read with its own ``get_cam_image`` on what it
  recorded. SESS returns a normalised map at the input's size (ours is the same map before its final
  min-max, which the correlation ignores). grad-cam hooks modules, so a layer that is a module's second
  call (``layer1.0.relu#2``) is read from its second recorded activation.
* torchcam (CAM, SmoothGrad-CAM++, SS-CAM, IS-CAM, RefineCAM, LeGrad), whose maps come out after its ReLU
  where the method has one (``_relu``): ours are compared after the same ReLU. Seeded methods get the same
  noise: SmoothGrad-CAM++ draws with ``torch.manual_seed(seed)`` as ours, SS-CAM with
  ``torch.manual_seed(layer_seed(seed, layer))``. SmoothGrad-CAM++ is compared in its ``variant="torchcam"``
  (torchcam weights the last noisy copy's values by the last copy's gradient); the default variant uses the
  mean gradient and the clean values, and the test checks it differs from torchcam's only in those two
  factors. torchcam's RefineCAM is compared with base Grad-CAM, because its ``GradCAMpp`` never applies its
  alpha coefficient (a masked ``div_`` on a copy), so it is not Grad-CAM++; grad-cam's RefineCAM (base
  Grad-CAM++, maps multiplied at the input's resolution) is checked at >= 0.99 after upsampling.
* LeGrad: torchcam supports torchvision's ViT only. The second architecture is timm's ``test_vit``, compared
  with torchcam on a torchvision ViT holding the same weights (the two networks' logits agree first).

FullGrad's second architecture is timm's ``test_resnet`` (plain ``BatchNorm2d``, which grad-cam takes; it
leaves out timm's ``BatchNormAct2d``: see :mod:`camanim.compute.methods.fullgrad`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch import nn

import camanim
from camanim.compute.capture import capture
from camanim.compute.layers import default_layers, list_layers
from camanim.compute.methods import get_method
from camanim.compute.methods.classifier import MethodNotApplicableError
from camanim.compute.methods.factorization import kernel_first_component
from camanim.compute.methods.passes import PassContext
from camanim.compute.methods.score import layer_seed
from camanim.compute.models import LoadedModel, wrap_model

pytest.importorskip("cv2", reason="grad-cam needs OpenCV (cv2)")
gradcam_pkg = pytest.importorskip("pytorch_grad_cam", reason="the grad-cam package is not installed")
tcm = pytest.importorskip("torchcam.methods", reason="torchcam 0.5 is not installed (test extra)")
timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

from pytorch_grad_cam.activations_and_gradients import ActivationsAndGradients  # noqa: E402
from pytorch_grad_cam.feature_factorization.deep_feature_factorization import dff as gradcam_dff  # noqa: E402
from pytorch_grad_cam.utils.image import scale_accross_batch_and_channels  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

MIN_PEARSON = 0.999
SIZE = 96
NEW_METHODS = (
    "cam", "fem", "segeigencam", "kpcacam", "dff", "fullgrad", "smoothgradcam++", "sscam", "iscam",
    "refinecam", "sess", "legrad",
)  # fmt: skip


def pearson(a, b) -> float:
    a = np.ravel(np.asarray(a, dtype=np.float64))
    b = np.ravel(np.asarray(b, dtype=np.float64))
    return float(np.corrcoef(a, b)[0, 1])


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Batch norms with random statistics and affine parameters (fresh ones have zero biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.1)
    return model.eval()


@pytest.fixture
def cloning_gradcam(monkeypatch: pytest.MonkeyPatch) -> None:
    """grad-cam recording a copy of each activation (see the module docstring)."""

    def save_activation(self, module, inputs, output):
        activation = output if self.reshape_transform is None else self.reshape_transform(output)
        self.activations.append(activation.cpu().detach().clone())

    monkeypatch.setattr(ActivationsAndGradients, "save_activation", save_activation)


@dataclass
class Arch:
    name: str
    lm: LoadedModel
    x: torch.Tensor
    layers: tuple[str, str, str]  # first, middle, last swept layer
    target: int
    head: str  # the classifier's module name
    cache: dict = field(default_factory=dict)

    @property
    def model(self) -> nn.Module:
        return self.lm.model._camanim_module

    def module(self, layer: str) -> tuple[nn.Module, int]:
        """The module of a layer and which of its calls the layer is (0-based)."""
        name, _, call = layer.partition("#")
        return self.model.get_submodule(name), int(call) - 1 if call else 0


def _arch(name: str) -> Arch:
    torch.manual_seed(0)
    if name == "resnet18":
        model, head = torchvision.models.resnet18(weights=None, num_classes=10), "fc"
    else:
        model, head = timm.create_model(name, num_classes=10), "classifier" if "efficient" in name else "fc"
    lm = wrap_model(randomize_bn(model), name=name)
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    sweep = default_layers(list_layers(lm.model, x))
    layers = (sweep[0].name, sweep[len(sweep) // 2].name, sweep[-1].name)
    with torch.no_grad():
        target = int(lm.model(x).argmax())
    return Arch(name, lm, x, layers, target, head)


@pytest.fixture(scope="module", params=["resnet18", "test_efficientnet"])
def arch(request) -> Arch:
    return _arch(request.param)


def _ours(arch: Arch, methods: tuple[str, ...], **kwargs) -> camanim.Explanation:
    key = (methods, repr(sorted(kwargs.items())))
    if key not in arch.cache:
        arch.cache[key] = camanim.explain(
            arch.lm, arch.x, methods=list(methods), layers=list(arch.layers), **kwargs
        )
    return arch.cache[key]


def _gradcam_recorded(arch: Arch, cls, layer: str):
    """grad-cam's CAM object at ``layer`` with what it recorded: ``(cam, A, G)`` (numpy, of that call)."""
    module, call = arch.module(layer)
    cam = cls(model=arch.model, target_layers=[module])
    out = cam.activations_and_grads(arch.x)
    if cam.uses_gradients:
        arch.model.zero_grad()
        out[:, arch.target].sum().backward()
    rec = cam.activations_and_grads
    a = rec.activations[call].numpy()
    g = rec.gradients[call].numpy() if rec.gradients else None
    rec.release()
    for p in arch.model.parameters():
        p.grad = None
    return cam, module, a, g


# ----------------------------------------------------------------------------- one-pass, grad-cam


@pytest.mark.usefixtures("cloning_gradcam")
@pytest.mark.parametrize("position", range(3), ids=["first", "middle", "last"])
@pytest.mark.parametrize("method", ["fem", "segeigencam", "kpcacam"])
def test_one_pass_methods_match_gradcam(arch: Arch, method: str, position: int) -> None:
    classes = {
        "fem": gradcam_pkg.FEM,
        "segeigencam": gradcam_pkg.SegEigenCAM,
        "kpcacam": gradcam_pkg.KPCA_CAM,
    }
    layer = arch.layers[position]
    ours = _ours(arch, ("fem", "segeigencam", "kpcacam")).raw(method, layer)[0].numpy()
    cam, module, a, g = _gradcam_recorded(arch, classes[method], layer)
    ref = cam.get_cam_image(arch.x, module, None, a, g, False)[0]
    if np.ptp(ref) == 0 or np.ptp(ours) == 0:  # FEM with no channel above its threshold
        assert np.ptp(ref) == np.ptp(ours) == 0 and np.allclose(ours, ref)
        return
    assert pearson(ours, ref) >= MIN_PEARSON, f"{method} at {layer}"  # SegEigenCAM's sign included


def test_kpca_float32_and_nystroem_option() -> None:
    """Large kernels are built in float32 (close to scikit-learn's float64); ``kpca_positions`` fits on a
    subset and extends (an approximation, still close on smooth data)."""
    from sklearn.decomposition import KernelPCA

    g = torch.Generator().manual_seed(0)
    grid = torch.linspace(-1, 1, 70)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    feats = torch.stack([xx, yy, xx * yy, xx.square()] + [torch.randn(70, 70, generator=g) * 0.1] * 4)
    x = feats.reshape(feats.shape[0], -1).T  # 4900 positions x 8 channels: above FLOAT64_UP_TO
    x = x - x.mean(dim=0)
    ref = KernelPCA(n_components=1, kernel="sigmoid").fit_transform(x.double().numpy())[:, 0]
    assert pearson(kernel_first_component(x), ref) >= 0.9999
    approx = kernel_first_component(x, fit_positions=600)  # 1/8 of the positions: 0.975 measured
    assert pearson(approx, ref) >= 0.95


# ------------------------------------------------------------------------------------------ CAM, DFF


def test_cam_matches_torchcam_where_the_head_is(arch: Arch) -> None:
    last = arch.layers[-1]
    ex = _ours(arch, ("cam", "dff"))
    with tcm.CAM(arch.model, arch.module(last)[0], arch.head) as extractor:
        with torch.no_grad():
            arch.model(arch.x)
        ref = extractor(class_idx=arch.target, normalized=False)[0][0]
    assert pearson(ex.raw("cam", last)[0], ref) >= MIN_PEARSON
    # the logit is the map's mean plus the class's bias: the structure the method checks
    head = arch.model.get_submodule(arch.head)
    logit = ex.logits[0, arch.target]
    assert float(ex.raw("cam", last)[0].mean() + head.bias[arch.target].detach()) == pytest.approx(
        float(logit), rel=1e-4
    )
    for layer in arch.layers[:-1]:
        assert "zero" in ex.flags["cam"][layer]


def test_cam_refuses_layers_without_the_structure(arch: Arch) -> None:
    with pytest.raises(MethodNotApplicableError, match="global average pooling"):
        camanim.explain(arch.lm, arch.x, methods="cam", layers=list(arch.layers[:2]))


@pytest.mark.parametrize("position", range(3), ids=["first", "middle", "last"])
def test_dff_matches_gradcam(arch: Arch, position: int) -> None:
    layer = arch.layers[position]
    ours = _ours(arch, ("cam", "dff")).raw("dff", layer)[0].numpy()
    rec = capture(arch.lm.model, arch.x, lambda o: o[:, 0], lambda la: la.name == layer, gradients=False)
    concepts, maps = gradcam_dff(rec.values[layer].numpy().copy(), n_components=5)
    h = maps[0]
    ref = (h / np.maximum(h.reshape(5, -1).max(axis=1), 1e-12)[:, None, None]).max(axis=0)
    assert pearson(ours, ref) >= MIN_PEARSON
    method = get_method("dff")
    ctx = PassContext(
        model=arch.lm.model, x=arch.x, layers=[rec.chosen[0]], classes=(arch.target,), values=rec.values
    )
    method.compute_layers(ctx)
    extra = method.extras[layer]
    np.testing.assert_allclose(extra["concepts"][0].numpy(), maps[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(extra["vectors"][0].numpy(), concepts, rtol=1e-4, atol=1e-5)
    if position == 2:  # the layer feeds the classifier: grad-cam's run_dff_on_image scores the concepts
        head = arch.model.get_submodule(arch.head)
        with torch.no_grad():
            ref_scores = head(torch.from_numpy(np.float32(concepts.T)))
        np.testing.assert_allclose(extra["scores"][0].numpy(), ref_scores.numpy(), rtol=1e-4, atol=1e-4)
    else:
        assert "scores" not in extra


# -------------------------------------------------------------------------------------------- FullGrad


@pytest.mark.parametrize("name", ["resnet18", "test_resnet"])
def test_fullgrad_terms_and_full_map_match_gradcam(name: str) -> None:
    """Each bias layer's term equals grad-cam's term of that layer, and the input term plus every term
    upsampled equals grad-cam's single FullGrad map."""
    a = _arch(name)
    layers = [la for la in list_layers(a.lm.model, a.x) if la.type == "BatchNorm2d"]
    method = get_method("fullgrad")
    maps = method.compute_layers(PassContext(model=a.lm.model, x=a.x, layers=layers, classes=(a.target,)))
    cam = gradcam_pkg.FullGrad(a.model, [])
    ref = cam(a.x, [ClassifierOutputTarget(a.target)])[0]
    grads = [g.numpy() for g in cam.activations_and_grads.gradients]
    cam.activations_and_grads.release()
    assert len(method.extras["terms"]) == len(cam.bias_data) == len(layers)
    assert pearson(method.extras["full"][0], ref) >= MIN_PEARSON
    for i in (0, len(layers) // 2, len(layers) - 1):
        term = np.abs(cam.bias_data[i][None, :, None, None] * grads[i])
        h, w = term.shape[-2:]
        ref_term = scale_accross_batch_and_channels(term, (w, h)).sum(axis=1)[0]
        assert pearson(maps[layers[i].name][0], ref_term) >= MIN_PEARSON, layers[i].name


def test_fullgrad_takes_timm_bn_act_at_its_affine_output() -> None:
    """On timm's EfficientNet (no convolution bias; every batch norm a ``BatchNormAct2d``) the terms are at
    the ``drop`` outputs, one per ``BatchNormAct2d``; every other layer has none."""
    torch.manual_seed(0)
    net = randomize_bn(timm.create_model("test_efficientnet", num_classes=4))
    x = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    ex = camanim.explain(wrap_model(net), x, methods="fullgrad", layers="all")
    bn_act = [
        n for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d) and type(m) is not nn.BatchNorm2d
    ]
    for layer in ex.chosen:
        has_term = layer.name.endswith(".drop")
        assert ("zero" not in ex.flags["fullgrad"][layer.name]) == has_term, layer.name
    assert sum(la.name.endswith(".drop") for la in ex.chosen) == len(bn_act)


# ------------------------------------------------------------------------------------------- RefineCAM


@pytest.mark.parametrize("position", range(3), ids=["first", "middle", "last"])
def test_refinecam_matches_torchcam(arch: Arch, position: int) -> None:
    layer, last = arch.layers[position], arch.layers[-1]
    ours = _ours(arch, ("refinecam",), options={"base": "gradcam"}).raw("refinecam", layer)[0]
    targets = [arch.module(layer)[0]] + ([arch.module(last)[0]] if layer != last else [])
    if len(targets) == 1:  # torchcam refines two layers or more; one layer is its scaled map
        with tcm.GradCAM(arch.model, targets) as extractor:
            ref = extractor(class_idx=arch.target, scores=arch.model(arch.x))[0][0]
    else:
        with tcm.RefineCAM(arch.model, targets, base_method=tcm.GradCAM) as extractor:
            ref = extractor(class_idx=arch.target, scores=arch.model(arch.x), normalized=False)[0][0]
    assert pearson(ours, ref.detach()) >= MIN_PEARSON


# --------------------------------------------------------------------------------- sampling methods


@pytest.mark.parametrize("position", range(3), ids=["first", "middle", "last"])
def test_smoothgradcampp_matches_torchcam_with_the_same_noise(arch: Arch, position: int) -> None:
    layer = arch.layers[position]
    ex = _ours(arch, ("smoothgradcam++",), seed=5, options={"samples": 3, "variant": "torchcam"})
    torch.manual_seed(5)
    with tcm.SmoothGradCAMpp(arch.model, arch.module(layer)[0], num_samples=3) as extractor:
        arch.model(arch.x)
        ref = extractor(class_idx=arch.target, normalized=False)[0][0]
    assert pearson(ex.raw("smoothgradcam++", layer)[0].clamp_min(0), ref) >= MIN_PEARSON


def test_smoothgradcampp_default_uses_mean_gradient_and_clean_values() -> None:
    """The default variant: ``w = sum_ij alpha ReLU(mean_s G_s)`` on the clean values, by hand from the
    gradients of the same noisy copies; with one noiseless copy both variants are equal."""
    arch = _arch("test_efficientnet")
    layer = arch.layers[1]
    opts = {"samples": 1, "noise": 0.0}
    a = _ours(arch, ("smoothgradcam++",), options=opts)
    b = _ours(arch, ("smoothgradcam++",), options=opts | {"variant": "torchcam"})
    torch.testing.assert_close(a.raw("smoothgradcam++", layer), b.raw("smoothgradcam++", layer))
    ex = _ours(arch, ("smoothgradcam++",), seed=7, options={"samples": 3})
    from camanim.compute.methods.sampling import gaussian_noise

    noise = gaussian_noise(tuple(arch.x.shape[1:]), 3, 0.3, 7)
    want = lambda la: la.name == layer  # noqa: E731
    score = lambda o: o[:, arch.target]  # noqa: E731
    grads = [capture(arch.lm.model, arch.x + n, score, want).gradients[layer] for n in noise]
    clean = capture(arch.lm.model, arch.x, score, want).values[layer]
    d1, d2, d3 = (torch.stack([g**p for g in grads]).mean(0) for p in (1, 2, 3))
    alpha = d2 / (2 * d2 + (d3 * clean).sum(dim=(2, 3), keepdim=True) + 1e-8)
    ref = torch.einsum("bc,bchw->bhw", (alpha * d1.clamp_min(0)).sum(dim=(2, 3)), clean)
    assert pearson(ex.raw("smoothgradcam++", layer), ref) >= MIN_PEARSON


@pytest.mark.parametrize("method", ["sscam", "iscam"])
def test_sampled_score_cams_match_torchcam(method: str) -> None:
    """At the first, middle and last layer of two tiny timm networks (few channels: the references score
    every channel ``samples`` times, layer by layer), with the same noise for SS-CAM."""
    cls = {"sscam": tcm.SSCAM, "iscam": tcm.ISCAM}[method]
    for name in ("test_efficientnet", "test_resnet"):
        a = _arch(name)
        x = a.x[:, :, :48, :48]
        sweep = default_layers(list_layers(a.lm.model, x))
        layers = [sweep[0].name, sweep[len(sweep) // 2].name, sweep[-1].name]
        ex = camanim.explain(
            a.lm, x, methods=method, layers=layers, seed=3, batch_size=64, options={"samples": 2}
        )
        with torch.no_grad():
            target = int(a.model(x).argmax())
        assert ex.targets[0] == target
        for layer in layers:
            torch.manual_seed(layer_seed(3, layer))
            with cls(a.model, layer, num_samples=2, batch_size=64) as extractor:
                with torch.no_grad():
                    a.model(x)
                ref = extractor(class_idx=target, normalized=False)[0][0]
            ours = ex.raw(method, layer)[0].clamp_min(0)
            assert pearson(ours, ref) >= MIN_PEARSON, f"{name} {layer}"


# ------------------------------------------------------------------------------------------------ SESS


@pytest.mark.usefixtures("cloning_gradcam")
def test_sess_matches_gradcam(arch: Arch) -> None:
    """Two scales (5 patches; grad-cam's defaults otherwise); layers that are a module's first call
    (grad-cam's base CAM reads the first)."""
    layers = [la for la in arch.layers if "#" not in la]
    ex = camanim.explain(arch.lm, arch.x, methods="sess", layers=layers, options={"num_scales": 2})
    for layer in layers:
        with gradcam_pkg.SESS(arch.model, [arch.module(layer)[0]], num_scales=2) as sess:
            ref = sess(arch.x, [ClassifierOutputTarget(arch.target)])[0]
        ours = ex.raw("sess", layer)[0]
        assert ours.shape == ref.shape
        assert pearson(ours, ref) >= MIN_PEARSON, layer


# ---------------------------------------------------------------------------------------------- LeGrad


def _torchvision_vit(timm_vit: nn.Module) -> nn.Module:
    """A torchvision ``VisionTransformer`` holding the weights of a plain timm ViT."""
    from torchvision.models import VisionTransformer

    blocks = timm_vit.blocks
    tv = VisionTransformer(
        image_size=SIZE,
        patch_size=timm_vit.patch_embed.patch_size[0],
        num_layers=len(blocks),
        num_heads=blocks[0].attn.num_heads,
        hidden_dim=timm_vit.embed_dim,
        mlp_dim=blocks[0].mlp.fc1.out_features,
        num_classes=timm_vit.num_classes,
    )
    with torch.no_grad():
        tv.conv_proj.load_state_dict(timm_vit.patch_embed.proj.state_dict())
        tv.class_token.copy_(timm_vit.cls_token)
        tv.encoder.pos_embedding.copy_(timm_vit.pos_embed)
        for blk, enc in zip(blocks, tv.encoder.layers, strict=True):
            enc.ln_1.load_state_dict(blk.norm1.state_dict())
            enc.ln_2.load_state_dict(blk.norm2.state_dict())
            enc.self_attention.in_proj_weight.copy_(blk.attn.qkv.weight)
            enc.self_attention.in_proj_bias.copy_(blk.attn.qkv.bias)
            enc.self_attention.out_proj.load_state_dict(blk.attn.proj.state_dict())
            enc.mlp[0].load_state_dict(blk.mlp.fc1.state_dict())
            enc.mlp[3].load_state_dict(blk.mlp.fc2.state_dict())
        tv.encoder.ln.load_state_dict(timm_vit.norm.state_dict())
        tv.heads.head.load_state_dict(timm_vit.head.state_dict())
    return tv.eval()


@pytest.mark.parametrize("source", ["torchvision", "timm"])
def test_legrad_matches_torchcam(source: str) -> None:
    torch.manual_seed(0)
    tvit = timm.create_model("test_vit", num_classes=10, img_size=SIZE).eval()
    with torch.no_grad():
        tvit.head.weight.normal_(0, 0.5)
    reference = _torchvision_vit(tvit)
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reference(x), tvit(x), rtol=1e-4, atol=1e-4)
    model = tvit if source == "timm" else reference
    blocks = (
        [f"blocks.{i}" for i in (0, 3, 5)]
        if source == "timm"
        else [f"encoder.layers.encoder_layer_{i}" for i in (0, 3, 5)]
    )
    ex = camanim.explain(wrap_model(model), x, methods="legrad", layers=blocks)
    target = ex.targets[0]
    ref_blocks = [f"encoder.layers.encoder_layer_{i}" for i in (0, 3, 5)]
    for ours_name, ref_name in zip(blocks, ref_blocks, strict=True):
        with tcm.LeGrad(reference, [ref_name]) as extractor:
            reference(x)
            ref = extractor(class_idx=target, normalized=False)[0][0]
        assert pearson(ex.raw("legrad", ours_name)[0], ref.detach()) >= MIN_PEARSON, ours_name


def test_legrad_on_a_cnn_says_what_it_needs() -> None:
    net = timm.create_model("test_efficientnet", num_classes=3).eval()
    with pytest.raises(MethodNotApplicableError, match="self-attention"):
        camanim.explain(wrap_model(net), torch.randn(1, 3, 48, 48), methods="legrad", layers="last")


# ------------------------------------------------------------------------------- contract and seeds


def _snapshot(model: nn.Module):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: m.training for n, m in model.named_modules()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


@pytest.mark.parametrize("method", NEW_METHODS)
def test_contract(method: str) -> None:
    """Finite maps of the right shape at every swept layer; no hook, flag, parameter or gradient left behind."""
    vit = method == "legrad"
    torch.manual_seed(0)
    net = timm.create_model("test_vit" if vit else "test_efficientnet", num_classes=4)
    randomize_bn(net).train()  # a model in training mode: the call must restore it
    fused = [m.fused_attn for m in net.modules() if hasattr(m, "fused_attn")]
    before = _snapshot(net)
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    opts = {"samples": 1, "max_channels": 2, "num_scales": 2, "concepts": 3}
    ex = camanim.explain(wrap_model(net), x, methods=method, layers="all", options=opts, batch_size=8)
    after = _snapshot(net)
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1:] == after[1:]
    assert fused == [m.fused_attn for m in net.modules() if hasattr(m, "fused_attn")]
    assert all(p.grad is None for p in net.parameters())
    for m in net.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    for layer in ex.chosen:
        m = ex.raw(method, layer.name)
        assert m.shape[0] == 2 and torch.isfinite(m).all()
        expected = tuple(x.shape[-2:]) if method == "sess" else layer.map_size
        assert tuple(m.shape[1:]) == expected, layer.name


@pytest.mark.parametrize("method", ["smoothgradcam++", "sscam", "dff"])
def test_seeded_methods_are_reproducible_and_batch_equals_one_by_one(method: str) -> None:
    torch.manual_seed(0)
    net = randomize_bn(timm.create_model("test_efficientnet", num_classes=4))
    lm = wrap_model(net)
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(3))
    opts = {"samples": 2, "max_channels": 3, "concepts": 3}
    kw = dict(methods=method, layers="first,middle,last", options=opts)
    a = camanim.explain(lm, x, seed=1, **kw)
    b = camanim.explain(lm, x, seed=1, **kw)
    c = camanim.explain(lm, x, seed=2, **kw)
    one = camanim.explain(lm, x[1:], seed=1, **kw)
    for layer in a.maps[method]:
        torch.testing.assert_close(a.raw(method, layer), b.raw(method, layer))
        # Grad-CAM++'s alpha divides by sums that nearly cancel in these random networks: it amplifies the
        # last-bit differences of batched kernels to ~0.3% of the map (Grad-CAM itself: 1e-7).
        scale = float(one.raw(method, layer).abs().max())
        torch.testing.assert_close(
            a.raw(method, layer)[1:], one.raw(method, layer), rtol=0, atol=1e-2 * scale
        )
    assert any(not torch.allclose(a.raw(method, la), c.raw(method, la)) for la in a.maps[method])


def test_registry_metadata() -> None:
    from camanim.compute.methods.base import method_class, pass_summary

    for name in NEW_METHODS:
        cls = method_class(name)
        assert cls.paper and pass_summary(cls)
    assert {"fem", "segeigencam"} <= set(camanim.list_methods(one_pass=True))
    assert "kpcacam" not in camanim.list_methods(one_pass=True)  # quadratic in positions: not in "all"
    assert not method_class("fem").needs_gradients and not method_class("fem").class_discriminative
    assert method_class("legrad").cost == "multi_pass"
