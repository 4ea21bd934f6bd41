"""Devices: turn a user's device string into a ``torch.device`` that exists on this machine."""

from __future__ import annotations

import torch

from camanim.errors import DeviceError, close_matches


def available_devices() -> list[str]:
    """The devices this machine can run on: ``cpu``, ``cuda:N`` for each visible GPU, ``mps`` on Apple."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """Check a device (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``) before any model is built.

    Raises:
        DeviceError: the string is not a device, or the device does not exist here; the message lists the
            devices that do.
    """
    if spec is None:
        return torch.device("cpu")
    available = available_devices()
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(_message(f"{spec!r} is not a device", str(spec), available)) from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(_message("CUDA is not available on this machine", str(spec), available))
        index = 0 if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise DeviceError(_message(f"there is no GPU {index}", str(spec), available))
        return dev
    if str(dev) in available or dev.type in available:
        return dev
    raise DeviceError(_message(f"device {str(dev)!r} is not available here", str(spec), available))


def _message(what: str, spec: str, available: list[str]) -> str:
    hint = close_matches(spec, available, n=2)
    near = f"; did you mean {' or '.join(repr(h) for h in hint)}?" if hint else ""
    return f"{what}{near} (devices here: {', '.join(available)})"
