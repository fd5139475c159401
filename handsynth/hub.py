"""Where models come from: local folders, the Hugging Face cache, or the hub when it can be reached.

Without a network, huggingface_hub retries each file for minutes before failing. handsynth asks
the hub only when its host answers a quick TCP connect; otherwise it reads local folders and the
cache alone (as with ``HF_HUB_OFFLINE=1``) and fails at once with an error that says how to
provide the model offline.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

# The Stable Diffusion 1.5 weights AttentionHand builds on (recipes' model.base default).
DEFAULT_BASE_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_GUIDANCE = "models/attentionhand"          # where `handsynth convert` writes by default


def looks_like_path(model: str) -> bool:
    """Hub ids are 'name' or 'owner/name'; anything else (absolute, ./, ~, deeper paths) is a folder."""
    return Path(model).is_absolute() or model.startswith((".", "~")) or model.count("/") > 1 or "\\" in model


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub endpoint ($HF_ENDPOINT, default huggingface.co) accepts a connection within ``timeout``."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def local_files_only(model: str | Path) -> bool:
    """True when ``model`` must come from disk: an existing folder, HF_HUB_OFFLINE=1, or no hub to ask."""
    return Path(model).expanduser().exists() or os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable()
