"""Layer-wise embeddings (``camanim embed``): pooling, CKA, separability, projections, the bundle, the CLI.

A small CNN is trained in the session on scikit-learn's digits (upsampled to 32x32; a few seconds): its
last layers must separate the ten classes far better than its first. CKA is checked against an independent
float64 implementation, k-NN, the probe and silhouette against scikit-learn.
"""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import camanim
import camanim.cli.embed
import camanim.compute.projections
from camanim.cli import main
from camanim.compute.embeddings import RandomProjection, pool, pooled_forward
from camanim.compute.layers import Layer, list_layers
from camanim.compute.models import Preprocessing, wrap_model
from camanim.compute.projections import check_projection, normalize_layout, pca_2d, procrustes, project_layers
from camanim.compute.separability import (
    SeparabilityError,
    check_labels,
    knn_silhouette,
    probe_accuracy,
    stratified_folds,
)
from camanim.compute.similarity import MinibatchCKA, hsic_matrix, linear_cka, minibatch_cka
from camanim.errors import MissingExtraError, ModelRunError, UnknownNameError
from camanim.outputs.bundle import MANIFEST, read_manifest, staging_path
from camanim.outputs.embed import BATCHES, run_embed
from camanim.outputs.report import write_report
from camanim.outputs.video import count_frames
from camanim.pipelines.imageset import EmbedError, open_images, stratified_sample

from .conftest import no_hooks

SIZE = 32


class DigitsCNN(nn.Module):
    """Two strided convolutions, a 4x4 pooling, a hidden layer and a linear head, for 32x32 digits; counts
    its forward calls and whether autograd was on."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.act2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.flat = nn.Flatten()
        self.hidden = nn.Linear(256, 32)
        self.act3 = nn.ReLU()
        self.fc = nn.Linear(32, 10)
        self.calls = 0
        self.grad_enabled: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.grad_enabled.append(torch.is_grad_enabled())
        x = self.act2(self.conv2(self.act1(self.stem(x))))
        return self.fc(self.act3(self.hidden(self.flat(self.pool(x)))))


def loaded(model: nn.Module, name: str = "digits-cnn"):
    return wrap_model(
        model, name=name, preprocessing=Preprocessing(size=(SIZE, SIZE), mean=(0.5,) * 3, std=(0.5,) * 3)
    )


@pytest.fixture(scope="module")
def digits_model():
    """A DigitsCNN trained on all 1,797 digits for 6 epochs (seeded; about 2 s on 2 idle cores)."""
    torch.manual_seed(0)
    model = DigitsCNN()
    lm = loaded(model)
    imgs = open_images("digits")
    x, _ = imgs.load(range(len(imgs)), lm)
    y = torch.tensor([int(v) for v in imgs.labels])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(6):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    return lm


@pytest.fixture(scope="module")
def digits_emb(digits_model):
    """Every layer of the trained CNN on every digit, full vectors kept."""
    return camanim.embed(digits_model, "digits", batch_size=128, keep_full=True)


# ------------------------------------------------------------------------------------ the science


def test_separability_rises_with_depth(digits_emb):
    knn, probe = digits_emb.curve("knn"), digits_emb.curve("probe")
    names = digits_emb.names
    assert names[0] == "stem" and names[-1] == "fc"
    assert knn[0] < 0.5 and probe[0] < 0.6  # 8 global means of a linear filter: mostly "how much ink"
    assert knn[-1] > 0.9 and probe[-1] > 0.9
    assert knn[-3:].min() > knn[0] + 0.4
    assert digits_emb.best("knn") >= len(names) // 2
    assert 0 < digits_emb.emergence("knn") <= digits_emb.best("knn")


def test_cka_is_one_on_the_diagonal_and_symmetric(digits_emb):
    cka = digits_emb.cka
    assert cka.shape == (len(digits_emb.chosen),) * 2
    np.testing.assert_allclose(np.diag(cka), 1.0, atol=1e-12)
    np.testing.assert_array_equal(cka, cka.T)
    assert np.nanmin(cka) > -0.1 and np.nanmax(cka) <= 1 + 1e-9


def _hsic1_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Song et al. (2012) Eq. 5, written out in float64 NumPy, independently of camanim's matrix form."""
    n = x.shape[0]
    k = x @ x.T
    l = y @ y.T  # noqa: E741
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    one = np.ones(n)
    return float(
        (
            np.trace(k @ l)
            + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * (one @ k @ l @ one)
        )
        / (n * (n - 3))
    )


def _cka_reference(batches: list[tuple[np.ndarray, np.ndarray]]) -> float:
    xy = sum(_hsic1_reference(x, y) for x, y in batches)
    xx = sum(_hsic1_reference(x, x) for x, _ in batches)
    yy = sum(_hsic1_reference(y, y) for _, y in batches)
    return xy / math.sqrt(xx * yy)


def test_cka_equals_a_float64_reference():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(90, 12))
    b = a @ rng.normal(size=(12, 7)) + 0.5 * rng.normal(size=(90, 7))
    chunks = [slice(0, 30), slice(30, 61), slice(61, 90)]
    batches = [(a[s], b[s]) for s in chunks]
    got = minibatch_cka([torch.from_numpy(a[s]).float(), torch.from_numpy(b[s]).float()] for s in chunks)
    assert float(got[0, 1]) == pytest.approx(_cka_reference(batches), rel=1e-5)
    # the HSIC matrix itself, pair by pair
    h = hsic_matrix([torch.from_numpy(a), torch.from_numpy(b)])
    assert float(h[0, 1]) == pytest.approx(_hsic1_reference(a, b), rel=1e-10)
    # Kornblith's biased estimator against HSIC = tr(K H L H) with the centring matrix H
    n = len(a)
    hmat = np.eye(n) - 1 / n
    k, l = a @ a.T, b @ b.T  # noqa: E741
    ref = np.trace(k @ hmat @ l @ hmat) / math.sqrt(
        np.trace(k @ hmat @ k @ hmat) * np.trace(l @ hmat @ l @ hmat)
    )
    assert linear_cka(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(ref, rel=1e-10)


def test_cka_invariances():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(size=(64, 10)))
    y = torch.from_numpy(rng.normal(size=(64, 6))) + x[:, :6]
    q, _ = torch.linalg.qr(torch.from_numpy(rng.normal(size=(10, 10))))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x))
    assert linear_cka(x @ q * 3.0, y) == pytest.approx(linear_cka(x, y))  # rotation and scale
    assert linear_cka(x, x, unbiased=True) == pytest.approx(1.0)


def test_minibatch_cka_equals_full_batch(digits_emb):
    full = digits_emb.full
    a, b = full["conv2"], full["hidden"]
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    # one batch holding every image: exactly the full-batch unbiased CKA
    one = minibatch_cka([[ta, tb]])
    assert float(one[0, 1]) == pytest.approx(linear_cka(ta, tb, unbiased=True), rel=1e-9)
    # the running sum is the same whatever the order of the batches it is given
    chunks = np.array_split(np.random.default_rng(0).permutation(len(a)), 7)
    acc, rev = MinibatchCKA(), MinibatchCKA()
    for c in chunks:
        acc.update([ta[c], tb[c]])
    for c in reversed(chunks):
        rev.update([ta[c], tb[c]])
    np.testing.assert_allclose(acc.compute().numpy(), rev.compute().numpy(), rtol=1e-12)
    # minibatches of ~128 random images estimate the full-batch value
    i, j = digits_emb.names.index("conv2"), digits_emb.names.index("hidden")
    assert digits_emb.cka[i, j] == pytest.approx(linear_cka(ta, tb, unbiased=True), abs=0.03)
    assert digits_emb.cka[i, j] == pytest.approx(float(acc.compute()[0, 1]), abs=0.03)


def test_separability_matches_scikit_learn():
    from sklearn.linear_model import RidgeClassifier
    from sklearn.metrics import silhouette_score
    from sklearn.model_selection import PredefinedSplit, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 240)
    x = rng.normal(size=(240, 16)) + 0.8 * rng.normal(size=(4, 16))[y]
    for k in (1, 5):
        knn, sil = knn_silhouette(x, y, k)
        neighbours = KNeighborsClassifier(k + 1).fit(x, y).kneighbors(x, return_distance=False)[:, 1:]
        expected = np.mean(
            [np.bincount(y[r], minlength=4).argmax() == t for r, t in zip(neighbours, y, strict=True)]
        )
        assert knn == pytest.approx(expected)
        assert sil == pytest.approx(silhouette_score(x, y), rel=1e-6)
    folds = stratified_folds(y, 5, seed=0)
    assert all(np.bincount(y[folds == f], minlength=4).min() >= 8 for f in range(5))  # stratified
    for d in (16, 400):  # fewer and more features than images
        xd = x if d == 16 else np.concatenate([x, rng.normal(size=(240, d - 16))], 1)
        ridge = make_pipeline(StandardScaler(), RidgeClassifier(alpha=1.0))
        expected = cross_val_score(ridge, xd, y, cv=PredefinedSplit(folds)).mean()
        assert probe_accuracy(xd, y, 5, seed=0) == pytest.approx(expected)


# ------------------------------------------------------------------------------------- the pooling


def test_pooled_vectors_equal_a_hand_computation(digits_model, digits_emb):
    net = digits_model.module
    imgs = open_images("digits")
    x, _ = imgs.load(range(5), digits_model)
    with torch.no_grad():
        stem = net.stem(x)
        conv2 = net.conv2(net.act1(stem))
    np.testing.assert_allclose(
        digits_emb.vectors["stem"][:5], stem.mean((2, 3)).numpy(), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(digits_emb.full["conv2"][:5], conv2.mean((2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    assert digits_emb.dims[digits_emb.names.index("fc")] == 10


def test_pooling_by_layer_kind():
    t = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # (B, N, C): 1 class token + 2x2 grid
    token = Layer(0, "blk", "blk", "Block", "token", (2, 5, 3), 0, (2, 2), prefix_tokens=1)
    patch_mean = t[:, 1:].mean(1)
    torch.testing.assert_close(pool(t, token), torch.cat([t[:, 0], patch_mean], 1))
    torch.testing.assert_close(pool(t, token, "average"), (t[:, 0] + patch_mean) / 2)
    torch.testing.assert_close(pool(t, token, "patches"), patch_mean)
    cl = torch.randn(2, 3, 3, 4)  # (B, H, W, C)
    last = Layer(0, "n", "n", "LayerNorm", "channels_last", (2, 3, 3, 4), 0, (3, 3))
    torch.testing.assert_close(pool(cl, last), cl.mean((1, 2)))
    vec = Layer(0, "fc", "fc", "Linear", "nonspatial", (2, 7), 0, (1, 1))
    v = torch.randn(2, 7)
    torch.testing.assert_close(pool(v, vec), v)


def test_token_layers_of_a_tiny_vit_pool_class_token_and_patches():
    class TinyViT(nn.Module):
        num_prefix_tokens = 1

        def __init__(self) -> None:
            super().__init__()
            self.patch = nn.Conv2d(3, 6, 8, stride=8)
            self.cls = nn.Parameter(torch.randn(1, 1, 6))
            self.block = nn.Linear(6, 6)
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            tokens = self.patch(x).flatten(2).transpose(1, 2)
            tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], 1)
            return self.head(self.block(tokens)[:, 0])

    torch.manual_seed(0)
    vit = TinyViT().eval()
    x = torch.randn(4, 3, 32, 32)
    batch = pooled_forward(vit, x, lambda layer: True)
    kinds = {layer.name: layer.kind for layer in batch.chosen}
    assert kinds["block"] == "token"
    with torch.no_grad():
        tokens = torch.cat([vit.cls.expand(4, -1, -1), vit.patch(x).flatten(2).transpose(1, 2)], 1)
        out = vit.block(tokens)
    torch.testing.assert_close(batch.pooled["block"], torch.cat([out[:, 0], out[:, 1:].mean(1)], 1))


def test_random_projection_is_seeded_and_shared():
    rp = RandomProjection(k=16, seed=3)
    x = torch.randn(8, 300)
    torch.testing.assert_close(rp(x), RandomProjection(k=16, seed=3)(x))
    assert not torch.allclose(rp(x), RandomProjection(k=16, seed=4)(x))
    torch.testing.assert_close(rp.matrix(100), rp.matrix(300)[:100])  # the rows do not depend on D
    small = torch.randn(8, 16)
    assert rp(small) is small  # D <= k: stored as it is
    # inner products are kept on average: E[R R^T] = I
    big = RandomProjection(k=256, seed=0).matrix(40)
    assert float((big @ big.T - torch.eye(40)).abs().mean()) < 0.1


# --------------------------------------------------------------------------------- the forward passes


def test_one_forward_per_batch_and_no_backward(digits_model):
    net = digits_model.module
    list_layers(digits_model.model, (1, 3, SIZE, SIZE))  # the dry run that lists the layers, cached
    before = net.calls
    net.grad_enabled.clear()
    emb = camanim.embed(digits_model, "digits", limit=100, batch_size=32)
    assert net.calls - before == math.ceil(100 / 32) == emb.settings["forwards"]
    assert not any(net.grad_enabled)
    assert all(p.grad is None for p in net.parameters())


def test_input_size_resizes_every_image(digits_model):
    net = digits_model.module
    list_layers(digits_model.model, (1, 3, 48, 48))  # the dry run at the new size, cached
    before = net.calls
    emb = camanim.embed(digits_model, "digits", limit=40, batch_size=40, input_size=48)
    assert emb.preprocessing.size == (48, 48) and emb.settings["input_size"] == "48x48"
    assert net.calls - before == 1
    assert digits_model.preprocessing.size == (SIZE, SIZE)  # the loaded model itself is unchanged


def test_samples_are_stratified_and_capped(digits_model):
    labels = ["a"] * 100 + ["b"] * 50 + ["c"] * 10
    pick = stratified_sample(labels, 160, 32, seed=0)
    counts = {c: sum(labels[i] == c for i in pick) for c in "abc"}
    assert len(pick) == len(set(pick)) == 32 and all(abs(counts[c] - 32 * n / 160) <= 1 for c, n in
                                                      (("a", 100), ("b", 50), ("c", 10)))  # fmt: skip
    emb = camanim.embed(digits_model, "digits", limit=200, batch_size=50, max_points=50, metric_images=60)
    assert emb.settings["metric_images_used"] == 60 and len(emb.shown) == 50
    assert emb.projections["fc"].shape == (50, 2) and emb.thumbnails.shape[0] == 50
    assert emb.vectors["fc"].shape == (200, 10)
    assert sorted({emb.labels[i] for i in emb.shown}) == [str(d) for d in range(10)]


def test_model_left_as_found_even_when_it_raises():
    torch.manual_seed(0)
    model = DigitsCNN().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    camanim.embed(loaded(model), "digits", limit=40, batch_size=8, projection="pca")
    assert model.training and all(m.training for m in model.modules())
    assert all(p.requires_grad == f for p, f in flags.items()) and no_hooks(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())

    class Breaks(DigitsCNN):
        def forward(self, x):
            if self.calls >= 2:  # the dry run and the first batch pass, the second batch fails
                raise RuntimeError("boom")
            return super().forward(x)

    broken = Breaks().train()
    with pytest.raises(ModelRunError, match="boom"):
        camanim.embed(loaded(broken), "digits", limit=40, batch_size=8)
    assert broken.training and no_hooks(broken) and all(p.requires_grad for p in broken.parameters())


def test_projection_alignment_is_a_rigid_motion():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(50, 2))
    rot = np.array([[0.0, -1.0], [1.0, 0.0]]) @ np.diag([1.0, -1.0])  # a rotation and a flip
    moved = normalize_layout(y) @ rot
    np.testing.assert_allclose(procrustes(moved, normalize_layout(y)), normalize_layout(y), atol=1e-12)
    layouts = project_layers([y @ rng.normal(size=(2, 5)), -(y @ rng.normal(size=(2, 5)))])
    for lay in layouts:
        np.testing.assert_allclose(np.sqrt((lay.astype(np.float64) ** 2).sum(1).mean()), 1.0, rtol=1e-5)
    # PCA's first axis is the direction of largest variance
    pts = np.stack([np.linspace(-5, 5, 40), rng.normal(0, 0.1, 40), np.zeros(40)], 1)
    assert np.abs(pca_2d(pts)[:, 0]).max() > 4


def test_tsne_layouts_are_aligned_and_umap_names_its_extra(monkeypatch):
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 20)
    xs = [rng.normal(size=(60, 8)) + 3 * rng.normal(size=(3, 8))[y] for _ in range(2)]
    layouts = project_layers(xs, "t-SNE", seed=0)
    assert [lay.shape for lay in layouts] == [(60, 2), (60, 2)]
    assert np.isfinite(layouts[1]).all()
    monkeypatch.setattr(camanim.compute.projections.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingExtraError, match=r"camanim\[embed\]"):
        check_projection("umap")
    with pytest.raises(UnknownNameError, match="did you mean: 'pca'"):
        check_projection("pcaa")


# --------------------------------------------------------------------------------------- bad inputs


def test_bad_labels_get_clear_messages():
    with pytest.raises(SeparabilityError, match="at least 2 classes"):
        check_labels(["a"] * 10)
    with pytest.raises(SeparabilityError, match=r"k=5 needs at least 6 images"):
        check_labels(["a", "b", "a", "b"], k=5)
    with pytest.raises(SeparabilityError, match="single image"):
        check_labels(["a", "a", "a", "b", "b", "c"], k=1)
    with pytest.raises(SeparabilityError, match="needs labels"):
        check_labels(None)
    assert check_labels(["a", "a", "b", "b", "b", "b"], k=1, folds=5) == 2


def test_python_refuses_one_class_before_any_forward():
    model = DigitsCNN()
    x = torch.randn(12, 3, SIZE, SIZE)
    with pytest.raises(SeparabilityError, match="at least 2 classes"):
        camanim.embed(loaded(model), x, labels=["cat"] * 12)
    assert model.calls == 0


def _fake_loader(monkeypatch) -> list[str]:
    asked: list[str] = []

    def fake(name="efficientnet_lite0", weights="default", **_):
        asked.append(name)
        torch.manual_seed(0)
        return loaded(DigitsCNN().eval(), name=name)

    monkeypatch.setattr(camanim.cli.embed, "load_model", fake)
    return asked


def _folder(root, classes: dict[str, int]):
    rng = np.random.default_rng(0)
    for cls, n in classes.items():
        d = root / cls if cls else root
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
                d / f"{cls or 'x'}{i}.png"
            )
    return root


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--images", "{flat}"], "no labels for"),
        (["--images", "{one}"], "at least 2 classes"),
        (["--images", "digits", "--limit", "4"], "k=5 needs at least 6 images"),
        (["--images", "{tmp}/missing"], "does not exist"),
        (["--images", "{flat}", "--labels", "subfolders"], "not in a class sub-folder"),
        (["--images", "digits", "--batch-size", "2"], "must be at least 4"),
        (["--images", "digits", "--input-size", "native"], "share one size"),
    ],
)
def test_cli_bad_inputs_one_line_before_the_model(argv, expected, tmp_path, monkeypatch, capsys):
    asked = _fake_loader(monkeypatch)
    flat = _folder(tmp_path / "flat", {"": 6})
    one = _folder(tmp_path / "one", {"cat": 6})
    argv = [a.format(flat=flat, one=one, tmp=tmp_path) for a in argv]
    rc = main(["embed", *argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("camanim: error:") and expected in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert asked == [] and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- bundle, report, CLI


def test_cli_end_to_end_on_digits(tmp_path, monkeypatch, capsys):
    asked = _fake_loader(monkeypatch)
    out = tmp_path / "emb"
    argv = [
        "embed",
        "--images",
        "digits",
        "--limit",
        "300",
        "--batch-size",
        "50",
        "--max-dim",
        "64",
        "--out",
        str(out),
    ]
    rc = main(argv)
    printed = capsys.readouterr().out
    assert rc == 0 and asked == ["efficientnet_lite0"], printed
    assert "k-NN accuracy: first layer" in printed and f"bundle: {out}" in printed
    manifest = read_manifest(out)
    on_disk = {p.name for p in out.iterdir()}
    assert on_disk == set(manifest["files"]) | {MANIFEST}
    assert on_disk >= {"embeddings.npz", "projections.npz", "separability.csv", "separability.png", "cka.png",
                       "cka.npy", "embed.mp4", "images.csv", "report.html", "thumbnails.png"}  # fmt: skip
    names = manifest["chosen_layers"]
    with np.load(out / "embeddings.npz") as z:
        assert list(z.files) == names and z["stem"].shape == (300, 8)
        assert z["flat"].shape == (300, 64)  # 256 dims, reduced by the random projection
    with np.load(out / "projections.npz") as z:
        assert z["fc"].shape == (300, 2)
    rows = list(csv.DictReader((out / "separability.csv").open()))
    assert [r["name"] for r in rows] == names and all(0 <= float(r["knn"]) <= 1 for r in rows)
    assert next((r["dim"], r["stored_dim"]) for r in rows if r["name"] == "flat") == ("256", "64")
    assert count_frames(out / "embed.mp4") == len(names)
    assert np.load(out / "cka.npy").shape == (len(names),) * 2
    e = manifest["embed"]
    assert (
        e["images"] == 300 and e["classes"] == [str(d) for d in range(10)] and e["settings"]["forwards"] == 6
    )
    page = (out / "report.html").read_text()
    assert (
        'id="embed-data"' in page and "Content-Security-Policy" in page and "Separability over depth" in page
    )
    data = json.loads(page.split('id="embed-data">', 1)[1].split("</script>", 1)[0])
    assert [layer["name"] for layer in data["layers"]] == names and data["n"] == 300
    # the report rebuilds from the files alone, or says why it cannot
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0 and (out / "report.html").is_file()
    (out / "projections.npz").unlink()
    assert main(["report", str(out)]) == 2
    assert "without a 2-D layout for every layer" in capsys.readouterr().err


def test_report_escapes_names_and_notebook_display(tmp_path, digits_model):
    x = torch.randn(24, 3, SIZE, SIZE)
    labels = ["<b>cat</b>", "dog & co"] * 12
    emb = camanim.embed(digits_model, x, labels=labels, batch_size=8, k=3, folds=3)
    path = emb.save(tmp_path / "b", video=False)
    page = (path / "report.html").read_text()
    assert "<b>cat</b>" not in page and "&lt;b&gt;cat&lt;/b&gt;" in page
    html = emb._repr_html_()
    assert html.startswith("<div><iframe sandbox=") and "srcdoc=" in html
    assert write_report(path) == path / "report.html"


def test_resume_runs_only_the_missing_batches(tmp_path, digits_model):
    out = tmp_path / "r"
    kw = {"limit": 120, "batch_size": 20, "video": False, "report": False}

    def stop_after_two(stage, done, total):
        if stage == "batches" and done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_embed(digits_model, "digits", out, progress=stop_after_two, **kw)
    stage = staging_path(out)
    kept = sorted((stage / BATCHES).glob("batch_*.npz"))
    assert len(kept) == 2 and not out.exists()
    kept[1].write_bytes(kept[1].read_bytes()[:100])  # a torn file: that batch runs again
    emb, path = run_embed(digits_model, "digits", out, resume=True, **kw)
    assert emb.settings["resumed_batches"] == 1 and emb.settings["forwards"] == 5
    assert not stage.exists() and not (path / BATCHES).exists()
    fresh, _ = run_embed(digits_model, "digits", tmp_path / "fresh", **kw)
    for name in emb.names:
        np.testing.assert_allclose(emb.vectors[name], fresh.vectors[name], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(emb.cka, fresh.cka, rtol=1e-6)
    # other settings refuse to mix with the kept batches
    with pytest.raises(KeyboardInterrupt):
        run_embed(digits_model, "digits", tmp_path / "s", progress=stop_after_two, **kw)
    with pytest.raises(EmbedError, match="other settings"):
        run_embed(digits_model, "digits", tmp_path / "s", resume=True, **{**kw, "batch_size": 30})


# ------------------------------------------------------------------------------------------ in a browser

CHROMIUM = os.environ.get("CAMANIM_CHROMIUM", "/usr/bin/chromium")
HOVER_A_POINT = """() => {
  const c = document.getElementById('scatter'), box = c.getBoundingClientRect();
  const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data, s = c.width / box.width;
  for (let y = 0; y < c.height; y++) for (let x = 0; x < c.width; x++) {
    const o = 4 * (y * c.width + x);
    if (px[o + 3] > 200 && px[o] + px[o + 1] + px[o + 2] < 600) return [box.left + x / s, box.top + y / s];
  }
  return null;
}"""


def test_embed_report_in_a_browser(tmp_path, digits_model):
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the Python package playwright is not installed"
    )
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"no chromium browser at {CHROMIUM} (apt-get install -y chromium)")
    emb = camanim.embed(digits_model, "digits", limit=200, batch_size=50)
    out = emb.save(tmp_path / "b", video=False)
    names = list(emb.names)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"]
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            errors: list[str] = []
            requests: list[str] = []
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("request", lambda req: requests.append(req.url))
            page.goto((out / "report.html").as_uri())
            best = emb.best("knn")
            page.wait_for_function(
                "v => document.getElementById('scatter').dataset.layer === v", arg=str(best)
            )
            assert page.text_content("#layer-name") == names[best]
            assert page.text_content("#layer-pos") == f"{best + 1} / {len(names)}"
            assert "(best layer)" in page.text_content("#score-knn")
            page.click("h1")
            page.keyboard.press("Home")
            assert page.text_content("#layer-name") == names[0] and page.input_value("#slider") == "0"
            page.keyboard.press("ArrowRight")
            assert page.text_content("#layer-name") == names[1]
            # a point of the separability curve, and a row of the CKA heatmap, show their layer
            page.click(f"#curve circle[data-layer='{len(names) - 1}'] >> nth=0")
            assert page.text_content("#layer-name") == names[-1]
            page.locator("#cka").scroll_into_view_if_needed()
            box = page.locator("#cka").bounding_box()
            page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] - 5)  # bottom row: layer 1
            assert page.text_content("#layer-name") == names[0]
            assert "CKA" in page.text_content("#cka-note")
            # hovering a point shows its image's id and label
            page.locator("#scatter").scroll_into_view_if_needed()
            page.wait_for_timeout(300)  # the glide between layouts
            at = page.evaluate(HOVER_A_POINT)
            assert at is not None
            page.mouse.move(at[0], at[1])
            assert page.is_visible("#tip") and page.text_content("#tip-id").startswith("digits/")
            assert page.text_content("#tip-label").startswith("label: ")
            page.click("#legend button[data-class='3']")
            assert page.get_attribute("#legend button[data-class='3']", "aria-pressed") == "true"
            assert errors == [] and all(u.startswith(("file:", "data:")) for u in requests), (
                errors,
                requests,
            )
        finally:
            browser.close()
