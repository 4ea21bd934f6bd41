"""Pretrained weights that must be downloaded: found in the local cache, or refused at once when their host
does not answer within :data:`PROBE_TIMEOUT_S` seconds (instead of minutes of retries offline)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

from camanim.errors import WeightsError

logger = logging.getLogger(__name__)


PROBE_TIMEOUT_S = 2.0
"""Seconds the host of uncached pretrained weights has to accept a connection before camanim gives up."""


def reachable(url: str, timeout: float | None = None) -> bool:
    """Whether the host serving ``url`` (or the proxy configured for it) accepts a TCP connection in time.

    Name resolution and connection run in a daemon thread joined for at most ``timeout`` seconds
    (:data:`PROBE_TIMEOUT_S` by default), since a resolver without a network can itself hang.
    """
    timeout = PROBE_TIMEOUT_S if timeout is None else timeout
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        via = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = via.hostname or host, via.port or 80
    answered: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                answered.append(True)
        except OSError:
            answered.append(False)

    thread = threading.Thread(target=connect, name="camanim-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered and answered[0])


@dataclass(frozen=True)
class WeightsSource:
    """Where pretrained weights come from: whether they are cached, the URL and the cache location."""

    cached: bool
    url: str
    where: str
    offline: bool = False  # downloads are switched off (HF_HUB_OFFLINE)


def timm_weights_source(bare: str) -> WeightsSource | None:
    """Where timm's pretrained weights for ``bare`` come from.

    ``None`` when timm loads them otherwise (a local file) or the source cannot be worked out; the caller
    then leaves everything to timm.
    """
    try:
        from huggingface_hub import constants as hf_constants
        from huggingface_hub import try_to_load_from_cache
        from timm.models._builder import _resolve_pretrained_source, resolve_pretrained_cfg
        from timm.models._hub import HF_WEIGHTS_NAME, _get_safe_alternatives, hf_split

        load_from, loc = _resolve_pretrained_source(resolve_pretrained_cfg(bare).to_dict())
        if load_from == "hf-hub":
            repo, filename = loc if isinstance(loc, (tuple, list)) else (loc, HF_WEIGHTS_NAME)
            repo, revision = hf_split(repo)
            names = [filename, *_get_safe_alternatives(filename)]
            cached = any(isinstance(try_to_load_from_cache(repo, n, revision=revision), str) for n in names)
            return WeightsSource(
                cached,
                f"{hf_constants.ENDPOINT}/{repo}",
                f"the Hugging Face cache {hf_constants.HF_HUB_CACHE}",
                offline=bool(hf_constants.HF_HUB_OFFLINE),
            )
        if load_from == "url":
            return hub_checkpoint_source(loc)
    except Exception as exc:  # a timm or huggingface_hub version with other internals
        logger.debug("cannot tell where timm keeps the weights of %s (%s)", bare, exc)
    return None


def hub_checkpoint_source(url: str) -> WeightsSource:
    """Weights downloaded by ``torch.hub.load_state_dict_from_url`` (torchvision, some timm models)."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    name = os.path.basename(urllib.parse.urlsplit(url).path)
    return WeightsSource((folder / name).is_file(), url, f"the torch hub folder {folder}")


def require_download(label: str, source: WeightsSource | None) -> None:
    """Raise :class:`WeightsError` at once when uncached pretrained weights cannot be downloaded.

    A few seconds' connection probe replaces the minute of retries the download would take without a network.
    """
    if source is None or source.cached:
        return
    host = urllib.parse.urlsplit(source.url).hostname or source.url
    if source.offline:
        why = "downloads are switched off (HF_HUB_OFFLINE)"
    elif not reachable(source.url):
        why = f"no network was reachable ({host} did not answer within {PROBE_TIMEOUT_S:g} s)"
    else:
        return
    raise WeightsError(
        f"the pretrained weights of {label} are not cached (in {source.where}) and {why}. Use --weights none "
        "(random weights) or --checkpoint PATH (a state dict you have), or run once with a network so they "
        "are downloaded and cached."
    )
