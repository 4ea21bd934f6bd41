"""What every report page shares: its packaged assets, JSON safe inside ``<script>``, and the CSP hashes."""

from __future__ import annotations

import base64
import hashlib
import importlib.resources
import json
from typing import Any


def asset(name: str) -> str:
    """The text of a file packaged with the report (``report.js``, ``report.css``, templates)."""
    return importlib.resources.files("camanim.outputs.report").joinpath(name).read_text(encoding="utf-8")


def script_json(obj: Any) -> str:
    """JSON safe inside ``<script>``: no ``<``, ``>`` or ``&`` can end the block or open a comment."""
    text = json.dumps(obj, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    return (
        text.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def csp_hash(text: str) -> str:
    """The Content-Security-Policy source (``'sha256-...'``) that allows exactly this script or style."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


def markup(text: str) -> Any:
    """``text`` marked safe for the template (already escaped, or an asset)."""
    from markupsafe import Markup

    return Markup(text)
