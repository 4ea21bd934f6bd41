"""The resume state of an animation bundle: what a partially written bundle holds and how ``--resume`` goes on.

:meth:`camanim.animation.Animation.save` writes into a staging folder ``.NAME.partial`` (see
:mod:`camanim.bundle`) and renames it once the manifest is written. Before any video it stages:

* ``input.npy`` and ``maps.npz``: the input tensor and the raw maps
  (:func:`camanim.explanation.write_explanation`);
* ``input.png`` (``input_s<b>.png`` per sample of a batch): the picture the model saw;
* ``animation.json`` (:data:`STATE_FILE`): what produced the maps (the request: model, weights, methods,
  layers, target, score...), the explanation's description, probabilities, class names, and the
  fingerprint of everything the videos depend on (:func:`fingerprint_of`).

An interrupted run continues in two steps:

* :func:`load_staged` (``animate(reuse=...)``, ``camanim animate --resume``) rebuilds the explanation from
  the staged files, so the model is not run again, when the new request and input tensor match exactly;
* ``save(resume=True)`` keeps the staged files and every video already there when the staged fingerprint
  equals the new animation's (:func:`matches_staged`, :func:`stage_explanation`); otherwise it renders
  everything again.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from camanim.compute.layers import Layer
from camanim.compute.models import Preprocessing
from camanim.outputs.animation.volume import geometry, is_volume, volume_settings
from camanim.outputs.bundle import Bundle, staging_path
from camanim.outputs.explanation import DISPLAY_FILE, write_explanation
from camanim.outputs.render import save_png
from camanim.outputs.volume_frames import panel_longest, view_image
from camanim.pipelines.animate import Animation
from camanim.pipelines.explain import Explanation, describe

__all__ = ["STATE_FILE", "load_staged", "matches_staged", "stage_explanation"]

logger = logging.getLogger(__name__)

#: Staged description of the explanation, read by ``reuse`` to skip the capture of an interrupted run.
STATE_FILE = "animation.json"

_STATE_FILES = {
    "input.npy": "input tensor (B, 3, H, W) float32",
    "maps.npz": "raw maps",
    STATE_FILE: "what produced the maps (read by --resume)",
}
_INPUT_ROLE = "the picture the model saw"


def _input_pngs(batch: int) -> list[str]:
    return ["input.png"] if batch == 1 else [f"input_s{b}.png" for b in range(batch)]


# ------------------------------------------------------------------------------------------------ save


def _read_state(folder: Path) -> dict | None:
    p = folder / STATE_FILE
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (ValueError, OSError):
        return None


def matches_staged(anim: Animation, folder: Path) -> bool:
    """Whether ``folder`` (a staging folder) holds the state of a run with ``anim``'s fingerprint, so its
    files and videos can be kept; a staged run with other maps or settings is logged."""
    staged = _read_state(folder)
    if staged is None:
        return False
    if staged.get("fingerprint") != anim.fingerprint():
        logger.warning("the interrupted run used other maps or settings: rendering every video again")
        return False
    return True


def stage_explanation(anim: Animation, bundle: Bundle, keep: bool) -> None:
    """Write the explanation files and :data:`STATE_FILE` into ``bundle``, or with ``keep`` (resuming from the
    same fingerprint) record the staged ones when all are there; either way the explanation's manifest sections
    are set."""
    ex = anim.explanation
    if keep and all(bundle.exists(rel) for rel in ("maps.npz", "input.npy", STATE_FILE)):
        for rel, role in _STATE_FILES.items():
            bundle.file(rel, role)
        if bundle.exists("regions.npy"):
            bundle.file("regions.npy", "the region a segmentation score is taken over")
        if bundle.exists(DISPLAY_FILE):
            bundle.file(DISPLAY_FILE, "the volume the model saw, (B, D, H, W, 3) uint8")
        for rel in _input_pngs(ex.display.shape[0]):
            bundle.file(rel, _INPUT_ROLE)
        bundle.manifest.update(describe(ex))
        return
    write_explanation(ex, bundle, overlays=False)
    for b, rel in enumerate(_input_pngs(ex.display.shape[0])):
        save_png(bundle.file(rel, _INPUT_ROLE), _picture(anim, b))
    state = {
        "request": anim.request,
        "fingerprint": anim.fingerprint(),
        "explanation": describe(ex),
        "probabilities": ex.probabilities.tolist(),
        "class_names": list(ex.class_names),
    }
    bundle.write_json(STATE_FILE, state, _STATE_FILES[STATE_FILE])


def _picture(anim: Animation, b: int) -> np.ndarray:
    """``input.png`` of sample ``b``: the picture, or for a volume its view (the animation's slices, no map)."""
    ex = anim.explanation
    if not is_volume(anim):
        return ex.display[b]
    geo = geometry(anim)
    view, point = volume_settings(anim)
    blank = np.zeros(geo.grid, np.float32)
    return view_image(blank, ex.display[b], geo, view, point, longest=panel_longest(anim.size), alpha=0.0)


# ----------------------------------------------------------------------------------------------- reuse


def _layer_from_dict(d: Mapping[str, Any]) -> Layer:
    return Layer(
        index=int(d["index"]),
        name=d["name"],
        module_name=d["module"],
        type=d["type"],
        kind=d["kind"],
        shape=tuple(d["shape"]),
        params=int(d["params"]),
        map_size=tuple(d["map_size"]) if d.get("map_size") else None,
        prefix_tokens=int(d.get("prefix_tokens", 0)),
        same_as=d.get("same_as"),
    )


def load_staged(
    folder: str | os.PathLike[str], request: Mapping[str, Any], x: torch.Tensor
) -> Explanation | None:
    """The explanation of an interrupted (or finished) animation bundle, when it was made by ``request``.

    Looks in the staging folder ``.NAME.partial`` first, then in ``NAME`` itself.

    Args:
        folder: the bundle folder given to :meth:`Animation.save`.
        request: what the new run asks for (model, weights, methods, layers, target, ...).
        x: the new run's input tensor ``(B, 3, H, W)``; must equal the staged ``input.npy`` exactly.

    Returns:
        The rebuilt :class:`~camanim.explanation.Explanation`, or None when there is nothing to reuse or it
        was made differently (the reason is logged).
    """
    root = Path(folder).expanduser().absolute()
    for where in (staging_path(root), root):
        state = _read_state(where)
        if state is None or not (where / "maps.npz").is_file() or not (where / "input.npy").is_file():
            continue
        if state.get("request") != json.loads(json.dumps(dict(request), default=str)):
            logger.info("not reusing %s: made with other settings (%s)", where, state.get("request"))
            return None
        staged_x = np.load(where / "input.npy", allow_pickle=False)
        if staged_x.shape != tuple(x.shape) or not np.array_equal(staged_x, x.numpy()):
            logger.info("not reusing %s: the input image differs", where)
            return None
        try:
            return _rebuild(where, state, staged_x)
        except (KeyError, ValueError, OSError) as err:
            logger.warning("not reusing %s: unreadable (%s)", where, err)
            return None
    return None


def _rebuild(where: Path, state: Mapping[str, Any], x: np.ndarray) -> Explanation:
    d = state["explanation"]
    prep = Preprocessing(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in d["model"]["preprocessing"].items()}
    )
    with np.load(where / "maps.npz", allow_pickle=False) as z:
        arrays = {k: torch.from_numpy(z[k]) for k in z.files}
    methods = tuple(m["name"] for m in d["methods"])
    layers = tuple(_layer_from_dict(la) for la in d["layers"])
    by_name = {la.name: la for la in layers}
    chosen = tuple(by_name[n] for n in d["chosen_layers"])
    maps = {m: {la.name: arrays[f"{m}/{la.name}"] for la in chosen} for m in methods}
    flags = {m: {la.name: tuple(d["flags"].get(m, {}).get(la.name, ())) for la in chosen} for m in methods}
    if (where / DISPLAY_FILE).is_file():  # a volume: the picture on the model's grid
        with np.load(where / DISPLAY_FILE, allow_pickle=False) as z:
            display = z["display"]
    else:
        display = np.stack(
            [np.asarray(Image.open(where / n).convert("RGB")) for n in _input_pngs(x.shape[0])]
        )
    targets = tuple(int(t["class"]) for t in d["targets"])
    return Explanation(
        model_name=d["model"]["name"],
        weights=d["model"]["weights"],
        preprocessing=prep,
        input=torch.from_numpy(x),
        display=display,
        probabilities=torch.tensor(state["probabilities"], dtype=torch.float32),
        targets=targets,
        target_names=tuple(t["name"] for t in d["targets"]),
        class_names=tuple(state["class_names"]),
        layers=layers,
        chosen=chosen,
        methods=methods,
        maps=maps,
        flags=flags,
        image_info={**d.get("image", {}), "maps_reused_from": str(where)},
        timings=dict(d.get("timings", {})),
    )
