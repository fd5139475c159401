"""The one sample-key scheme used by every stage.

Keys are lowercase letters, digits, '_' and '-' only (WebDataset splits a file name at its
first dot, so keys never contain one). They are derived from the source label id and the
variant index only, so they are stable across reruns and machines.
"""

from __future__ import annotations

import hashlib
import re

_ALLOWED = re.compile(r"^[a-z0-9_-]+$")
_BAD = re.compile(r"[^a-z0-9_-]+")
MAX_STEM = 96


def sanitize(text: str) -> str:
    """Map arbitrary text to the key alphabet, deterministically.

    Lowercases, replaces each run of other characters by '-', and strips separators at the
    ends. Long results are shortened with a content hash so distinct inputs stay distinct.
    """
    stem = _BAD.sub("-", str(text).lower()).strip("-_")
    if not stem:
        stem = "x"
    if len(stem) > MAX_STEM:
        digest = hashlib.sha1(str(text).encode()).hexdigest()[:10]
        stem = f"{stem[: MAX_STEM - 11]}-{digest}"
    return stem


def frame_key(*parts: object) -> str:
    """Key of a source frame from the parts that identify it (dataset, capture, camera, frame...)."""
    return "_".join(sanitize(str(p)) for p in parts)


def sample_key(frame: str, variant: int) -> str:
    """Key of generated variant ``variant`` of frame ``frame``."""
    if variant < 0:
        raise ValueError("variant index must be >= 0")
    return f"{frame}_v{variant:05d}"


def is_valid_key(key: str) -> bool:
    return bool(_ALLOWED.match(key))
