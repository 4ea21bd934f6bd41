"""Robust model handling: the class count read from the output, output selectors, checkpoint errors,
failing fast offline, and the deadline of image downloads. Nothing here uses the network."""

from __future__ import annotations

import dataclasses
import http.server
import pickle
import socket
import threading
import time
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import camanim
import camanim.compute.downloads as downloads
import camanim.compute.models as models
from camanim.compute.images import load_image
from camanim.compute.layers import list_layers
from camanim.compute.models import load_model, load_state_dict_into, wrap_model
from camanim.errors import CamanimError, ImageError, ModelOutputError, TargetError, WeightsError

from .conftest import TinyCNN

# ----------------------------------------------------------------------------------------------------
# Models


class FullyConv(nn.Module):
    """conv -> 1x1 conv to 5 maps -> global average pool -> flatten: 5 logits and no ``nn.Linear``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 5, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.head(torch.relu(self.conv(x)))), 1)


class AuxHead(nn.Module):
    """A 10-way head with an auxiliary ``Linear(8, 3)`` registered after it (and unused in the forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)
        self.aux = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


class Only32(nn.Module):
    """Takes 32 x 32 inputs only: its 32 x 32 convolution gives 6 scores there, a map at 224 x 224."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 32)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.flatten(self.conv2(torch.relu(self.conv1(x))), 1)


class Backbone(nn.Module):
    """Features ``(B, 8, H, W)`` and 4 class scores; subclasses return them in various containers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.relu(self.conv(x))
        return f, self.fc(torch.flatten(self.pool(f), 1))


class TupleNet(Backbone):
    def forward(self, x):
        return self.parts(x)


class DictNet(Backbone):
    def forward(self, x):
        f, s = self.parts(x)
        return {"features": f, "logits": s}


class SegNet(Backbone):
    """torchvision segmentation style: ``{"out": (B, K, H, W)}``."""

    def forward(self, x):
        f, _ = self.parts(x)
        return {"out": f, "aux": f}


@dataclasses.dataclass
class Result:
    features: torch.Tensor
    scores: torch.Tensor


class DataclassNet(Backbone):
    def forward(self, x):
        return Result(*self.parts(x))


class HFOutput:
    """Like a Hugging Face ``ImageClassifierOutput`` read by attribute."""

    def __init__(self, logits: torch.Tensor, hidden: torch.Tensor) -> None:
        self.logits, self.hidden_states = logits, hidden


class HFNet(Backbone):
    def forward(self, x):
        f, s = self.parts(x)
        return HFOutput(s, f)


class NoScores(Backbone):
    def forward(self, x):
        f, _ = self.parts(x)
        return {"a": f, "b": "text"}


X32 = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------------------------------
# 1. The number of classes comes from the output


def test_fully_convolutional_model_has_its_output_classes():
    torch.manual_seed(0)
    ex = camanim.explain(model=FullyConv(), image=X32, target=3, layers="conv")
    assert ex.targets == (3,) and len(ex.class_names) == 5 and ex.probabilities.shape == (1, 5)
    model = FullyConv().train()
    # Asked before any forward: one probe at the preprocessing size, flags restored.
    assert wrap_model(model).class_names == tuple(f"class {i}" for i in range(5))
    assert all(m.training for m in model.modules())
    with pytest.raises(TargetError, match=r"5 classes \(valid indices are 0\.\.4\)"):
        camanim.explain(model=FullyConv(), image=X32, target=5, layers="conv")


def test_auxiliary_linear_after_the_head_does_not_set_the_class_count():
    torch.manual_seed(0)
    ex = camanim.explain(model=AuxHead(), image=X32, target=5, layers="conv")
    assert ex.targets == (5,) and len(ex.class_names) == 10
    assert len(wrap_model(AuxHead()).class_names) == 10
    with pytest.raises(TargetError, match=r"0\.\.9"):
        camanim.explain(model=AuxHead(), image=X32, target=12, layers="conv")


def test_class_count_from_the_real_input_without_a_224_forward():
    torch.manual_seed(0)
    model = Only32()
    lm = wrap_model(model)
    assert model.calls == 0  # wrapping runs nothing
    ex = camanim.explain(lm, image=X32, target=5, layers="conv1")
    assert ex.targets == (5,) and ex.probabilities.shape == (1, 6)
    assert lm.num_classes == 6 and len(lm.class_names) == 6
    # the cached dry run (at its two input sizes) and the capture; nothing at 224 x 224
    assert model.calls == 3
    fixed = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 32 * 32, 4))
    with pytest.raises(ModelOutputError, match=r"cannot tell how many classes .* \(1, 3, 224, 224\)"):
        wrap_model(fixed).class_names  # noqa: B018 (the property runs the probe)
    assert wrap_model(fixed, preprocessing=models.Preprocessing(size=(32, 32))).num_classes == 4


# ----------------------------------------------------------------------------------------------------
# 2. Output selectors


@pytest.mark.parametrize(
    ("net", "found"),
    [
        (TupleNet, "item 1 of a tuple"),
        (DictNet, "key 'logits' of a dict"),
        (DataclassNet, "field 'scores' of a Result"),
        (HFNet, "attribute 'logits' of a HFOutput"),
    ],
)
def test_automatic_output_selection(net, found):
    torch.manual_seed(0)
    model = net()
    lm = wrap_model(model)
    ex = camanim.explain(lm, image=X32, target=2, methods="gradcam,scorecam", layers="conv")
    assert ex.probabilities.shape == (1, 4) and len(ex.class_names) == 4
    assert ex.maps["gradcam"]["conv"].shape == (1, 32, 32) and ex.maps["scorecam"]["conv"].shape == (
        1,
        32,
        32,
    )
    assert lm.output == f"auto: {found}"
    expected = Backbone.parts(model, X32)[1]
    torch.testing.assert_close(ex.logits, expected.detach())


def test_explicit_selectors_key_index_callable_and_cli_spelling():
    torch.manual_seed(0)
    model = TupleNet()
    _, scores = model.parts(X32)
    for output, described in [(1, "index 1"), (lambda out: out[1], "callable")]:
        lm = wrap_model(model, output=output)
        torch.testing.assert_close(lm.model(X32), scores)
        assert lm.output.startswith(described)
    lm = wrap_model(DictNet(), output="logits")
    assert lm.model(X32).shape == (1, 4) and lm.output == "key 'logits'"
    ex = camanim.explain(model=model, image=X32, output="1", target=0, layers="conv")  # digits: an index
    assert ex.logits.shape == (1, 4)
    assert load_model("timm:resnet10t", "none", num_classes=3, output="0").model.selector.spec == 0
    assert (
        load_model("timm:resnet10t", "none", num_classes=3, output="logits").model.selector.spec == "logits"
    )


def test_output_errors_say_what_the_model_returned():
    with pytest.raises(ModelOutputError) as e:
        camanim.explain(model=NoScores(), image=X32, layers="conv")
    msg = str(e.value)
    assert "a dict with keys 'a' (tensor (1, 8, 32, 32)), 'b' (str)" in msg and "output='a'" in msg
    with pytest.raises(ModelOutputError, match=r"shape \(1, 8, 32, 32\), not \(B, K\)"):
        camanim.explain(model=SegNet(), image=X32, layers="conv")  # 'out' is a (B, K, H, W) map
    with pytest.raises(ModelOutputError, match="no 'nope'"):
        wrap_model(DictNet(), output="nope").model(X32)
    with pytest.raises(ModelOutputError, match="not an index"):
        wrap_model(TupleNet(), output=5).model(X32)
    with pytest.raises(ModelOutputError, match="returned a tensor"):
        wrap_model(FullyConv(), output="logits").model(X32)
    with pytest.raises(ModelOutputError, match="must be a key"):
        wrap_model(FullyConv(), output=2.5)
    assert issubclass(ModelOutputError, CamanimError)


def test_every_forward_gets_the_selected_tensor_and_the_module_is_left_as_found():
    torch.manual_seed(0)
    model = DictNet()
    model.train()
    model.fc.eval()
    model.conv.weight.requires_grad_(False)
    flags = {n: m.training for n, m in model.named_modules()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    lm = wrap_model(model)
    # Layer names, parameters and state dict keys are the module's own.
    assert [layer.name for layer in list_layers(lm.model, X32)] == [
        layer.name for layer in list_layers(model, X32)
    ]
    assert list(lm.model.state_dict()) == list(model.state_dict())
    assert lm.model.get_submodule("conv") is model.conv and lm.model.fc is model.fc
    ex = camanim.explain(lm, image=X32, methods="gradcam,scorecam,ablationcam", layers="conv", target=1)
    assert set(ex.maps) == {"gradcam", "scorecam", "ablationcam"}
    res = camanim.ybroad(lm, X32, layers="conv", percentages=(0.5,), batch_size=4)  # ROAD's forwards
    assert np.isfinite(res.results["gradcam"].road).all()
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks) for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_capture_of_a_plain_module_returning_a_tuple():
    from camanim.compute.capture import capture
    from camanim.compute.targets import ClassLogit

    torch.manual_seed(0)
    res = capture(TupleNet(), X32, ClassLogit((1,)), lambda layer: layer.name == "conv")
    assert res.output.shape == (1, 4) and res.gradients["conv"].shape == (1, 8, 32, 32)


# ----------------------------------------------------------------------------------------------------
# 3. Checkpoint errors


def _zip(path, names):
    with zipfile.ZipFile(path, "w") as z:
        for n in names:
            z.writestr(n, "x")


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda p: p.write_bytes(b""), "it is empty (0 bytes)"),
        (lambda p: p.write_text("epoch 3, accuracy 0.91\n"), "it is a text file (it starts with 'epoch 3"),
        (
            lambda p: p.write_bytes(b"\x07" + np.random.default_rng(0).bytes(999)),
            "binary data of 1,000 bytes",
        ),
        (lambda p: Image.new("RGB", (4, 4)).save(p, format="PNG"), "it is a PNG image"),
        (lambda p: _zip(p, ["a.txt", "b.txt"]), "a ZIP archive that is not a PyTorch checkpoint"),
        (lambda p: np.save(p.open("wb"), np.zeros(3)), "a NumPy .npy array"),
    ],
)
def test_a_file_that_is_not_a_checkpoint_says_what_it_is(tmp_path, make, says):
    path = tmp_path / "weights.pt"
    make(path)
    with pytest.raises(WeightsError) as e:
        load_state_dict_into(TinyCNN(), path)
    msg = str(e.value)
    assert "is not a PyTorch checkpoint" in msg and says in msg
    assert "torch.save(model.state_dict(), PATH)" in msg and "'model_state_dict'" in msg
    assert "101" not in msg.replace("1,000", "")


def test_a_pickled_module_is_refused_with_how_to_convert_it(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(TinyCNN(), path)
    with pytest.raises(WeightsError) as e:
        load_model("timm:resnet10t", path)
    msg = str(e.value)
    assert "pickled Python objects" in msg and "tests.conftest.TinyCNN" in msg
    assert "weights_only=True" in msg and "torch.save(obj.state_dict(), 'weights.pt')" in msg
    assert "add_safe_globals" not in msg  # not torch's advice, which the CLI cannot follow
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"fc.weight": np.zeros((2, 32))}, protocol=4))
    with pytest.raises(WeightsError, match="is a Python pickle, not a PyTorch checkpoint"):
        load_state_dict_into(TinyCNN(), plain)


def test_head_mismatch_suggests_num_classes(tmp_path):
    path = tmp_path / "three.pt"
    torch.save(TinyCNN(classes=3).state_dict(), path)
    with pytest.raises(WeightsError) as e:
        load_state_dict_into(TinyCNN(classes=10), path)
    assert "fc.weight: (3, 32) vs (10, 32)" in str(e.value) and "--num-classes 3" in str(e.value)
    # Mismatches that disagree on the count get no suggestion.
    state = TinyCNN(classes=3).state_dict()
    state["features.0.weight"] = torch.zeros(8, 3, 3, 3)
    torch.save(state, path)
    with pytest.raises(WeightsError) as e:
        load_state_dict_into(TinyCNN(classes=10), path)
    assert "--num-classes" not in str(e.value)


# ----------------------------------------------------------------------------------------------------
# 4. Failing fast offline


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Empty weight caches and a resolver that hangs (as without a network) for 6 s, then fails."""
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))

    def hanging(*args, **kwargs):
        time.sleep(6)
        raise socket.gaierror("no network")

    monkeypatch.setattr(socket, "getaddrinfo", hanging)


@pytest.mark.parametrize("name", ["timm:resnet10t", "torchvision:resnet18"])
def test_uncached_pretrained_weights_fail_fast_offline(offline, name):
    t0 = time.perf_counter()
    with pytest.raises(WeightsError) as e:
        load_model(name)
    assert time.perf_counter() - t0 < 4.5
    msg = str(e.value)
    assert "not cached" in msg and "no network was reachable" in msg
    assert "--weights none" in msg and "--checkpoint PATH" in msg


def test_cached_weights_are_not_probed(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    monkeypatch.setattr(downloads, "reachable", lambda *a, **k: pytest.fail("probed"))
    url = "https://download.pytorch.org/models/resnet18-f37072fd.pth"
    source = downloads.hub_checkpoint_source(url)
    assert not source.cached
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "resnet18-f37072fd.pth").write_bytes(b"x")
    source = downloads.hub_checkpoint_source(url)
    assert source.cached
    downloads.require_download("torchvision:resnet18", source)  # no probe, no error


def test_reachable_probe():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert downloads.reachable(f"http://127.0.0.1:{port}/x", timeout=2)
    t0 = time.perf_counter()
    assert not downloads.reachable(f"http://127.0.0.1:{port}/x", timeout=2)  # closed now
    assert time.perf_counter() - t0 < 2.5


# ----------------------------------------------------------------------------------------------------
# 5. The deadline of an image download


class _Trickle(http.server.BaseHTTPRequestHandler):
    """Announces a 1000-byte PNG, then sends one byte every 0.2 s."""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", "1000")
        self.end_headers()
        try:
            for _ in range(1000):
                self.wfile.write(b"\x89")
                self.wfile.flush()
                time.sleep(0.2)
        except OSError:  # the client gave up
            pass

    def log_message(self, *args):
        pass


def test_url_download_has_an_overall_deadline():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/cat.png"
        t0 = time.perf_counter()
        with pytest.raises(ImageError, match=r"took longer than 1 s \(url_deadline\)"):
            load_image(url, url_timeout=5, url_deadline=1.0)
        assert time.perf_counter() - t0 < 2.5
    finally:
        server.shutdown()
        server.server_close()
