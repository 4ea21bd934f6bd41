"""Every command in the README runs: its ```bash blocks through ``camanim.cli.main``, its Python blocks and
the example notebook's cells.

The command lines are the README's own; to stay fast and offline, every model they name is replaced by a
tiny stand-in of the same name (:class:`tests.conftest.TinyCNN`, 64x64 input, the head size asked for,
checkpoints loaded into it): what is exercised is the CLI, the pipeline and the files each command writes,
not the big networks (other tests cover those). ``pip install`` is what ``.ci/run`` does and
``python -m pytest`` is this suite; both are recognised, not re-run.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

import camanim.cli
import camanim.compute.models
import camanim.pipelines.animate
import camanim.pipelines.compare
import camanim.pipelines.explain
import camanim.pipelines.ybroad
from camanim.compute.models import Preprocessing, class_names_for, load_state_dict_into, wrap_model
from tests.conftest import TinyCNN

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), re.S | re.M)


def bash_commands() -> list[list[str]]:
    """Every command of the README's bash blocks, split at ``&&``, as argv lists (comments dropped)."""
    out = []
    for block in blocks("bash"):
        for line in block.splitlines():
            for part in line.split("&&"):
                argv = shlex.split(part, comments=True)
                if argv:
                    out.append(argv)
    return out


def tiny_model(name: str = camanim.compute.models.DEFAULT_MODEL, weights="default", *, num_classes=None, **_):
    """The stand-in for :func:`camanim.models.load_model`: a seeded TinyCNN named ``name``."""
    n = num_classes or 1000
    torch.manual_seed(0)
    model = TinyCNN(classes=n).eval()
    if str(weights) not in ("default", "none"):
        load_state_dict_into(model, weights)
    return wrap_model(
        model, name=str(name), preprocessing=Preprocessing(size=(64, 64)), class_names=class_names_for(n)
    )


@pytest.fixture
def fast(monkeypatch, tmp_path):
    """Tiny stand-in models wherever ``load_model`` is bound, and a scratch working folder."""
    real = camanim.compute.models.load_model
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("camanim") and getattr(mod, "load_model", None) is real:
            monkeypatch.setattr(mod, "load_model", tiny_model)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _checkpoint(argv: list[str]) -> None:
    """Create the state dict a README command loads with ``--checkpoint`` (for the stand-in architecture)."""
    path = Path(argv[argv.index("--checkpoint") + 1])
    classes = int(argv[argv.index("--num-classes") + 1]) if "--num-classes" in argv else 1000
    if not path.exists():
        torch.manual_seed(1)
        torch.save(TinyCNN(classes=classes).state_dict(), path)


def _gallery(args: list[str], tmp: Path) -> int:
    spec = importlib.util.spec_from_file_location("make_gallery", ROOT / args[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([*args[1:], "--out", str(tmp / "gallery"), "--work", str(tmp / "gallery-work")])


def test_readme_lists_commands() -> None:
    commands = bash_commands()
    assert ["pip", "install", "-e", "."] in commands and ["camanim"] in commands
    assert ["python", "-m", "pytest", "-q"] in commands
    assert README.read_text().index("pip install -e . && camanim") < README.read_text().index("## Gallery")


def test_cli_at_a_glance_lists_every_subcommand() -> None:
    section = README.read_text().split("## Command line at a glance", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `camanim (\w+)`", section, re.M))
    parser = camanim.cli.build_parser()
    known = set(parser._subparsers._group_actions[0].choices)
    assert listed == known - {"run"}, (
        f"README misses {known - listed - {'run'}}, lists unknown {listed - known}"
    )
    for name in listed:  # each one at least parses and prints its help
        assert camanim.cli.main([name, "--help"]) == 0, name


def test_every_readme_command_runs(fast, capsys) -> None:
    ran = []
    for argv in bash_commands():
        if argv[:2] == ["pip", "install"] or argv[:3] == ["python", "-m", "pytest"]:
            continue  # installation (.ci/run does it) and this very suite
        if argv[0] == "camanim":
            if "--checkpoint" in argv:
                _checkpoint(argv)
            code = camanim.cli.main(argv[1:])
        elif argv[:2] == ["python", "scripts/make_gallery.py"]:
            code = _gallery(argv[1:], fast)
        else:
            pytest.fail(f"the README runs {shlex.join(argv)!r}, which this test does not know how to run")
        assert code == 0, f"{shlex.join(argv)} exited with {code}: {capsys.readouterr().err[-2000:]}"
        ran.append(shlex.join(argv))
    assert (fast / "out" / "anim" / "report.html").is_file()
    (default,) = (fast / "camanim-out").glob("*/report.html")  # the default run
    manifest = json.loads((default.parent / "manifest.json").read_text())
    assert manifest["model"] == {**manifest["model"], "name": "efficientnet_lite0", "weights": "user module"}
    assert {p.name for p in (fast / "gallery").iterdir()} >= {"fmgcam.jpg", "strip.jpg", "ybroad.png"}
    assert len(ran) >= 10, ran


def test_readme_python_runs(fast) -> None:
    for code in blocks("python"):
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    assert (fast / "out" / "chelsea" / "manifest.json").is_file()
    assert (fast / "out" / "chelsea-anim" / "report.html").is_file()


def test_tour_notebook_runs(fast) -> None:
    """examples/camanim_tour.ipynb is valid nbformat 4 and its code cells run in order."""
    pytest.importorskip("IPython", reason="the notebook displays through IPython (installed with Jupyter)")

    nb = json.loads((ROOT / "examples" / "camanim_tour.ipynb").read_text())
    assert nb["nbformat"] == 4 and nb["cells"]
    for cell in nb["cells"]:
        assert cell["cell_type"] in ("markdown", "code") and isinstance(cell["source"], list)
    namespace: dict = {"__name__": "tour"}
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), "camanim_tour.ipynb", "exec"), namespace)
    assert "<iframe" in namespace["anim"]._repr_html_()  # the viewer, attached by camanim.outputs
    assert (fast / "out" / "tour" / "report.html").is_file()
