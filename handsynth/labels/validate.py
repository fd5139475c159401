"""The one validator every label reader uses to turn raw source values into schema objects.

Each check raises :class:`handsynth.errors.InputError` naming the file, the record (an id or a
line number) and the field, and saying how to fix it. Readers describe where a value came from
with a :class:`Where` and build cameras and hands through :func:`make_camera` / :func:`make_hand`,
so every format gets the same checks: pose 48, shape 10 and trans 3 finite numbers, a proper
rotation (orthonormal, det +1), positive focal lengths, finite values everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from handsynth.errors import InputError
from handsynth.labels.schema import SIDES, Camera, Hand

ROTATION_TOL = 1e-3     # max |R R^T - I| and |det R - 1| accepted for a rotation matrix


@dataclass(frozen=True)
class Where:
    """Locates a record in a source file for error messages: ``record`` is e.g. "image id 5"."""

    file: Path
    record: str

    def at(self, field: str) -> str:
        return f"{self.file}, {self.record}, field '{field}'"

    def error(self, field: str, what: str, fix: str) -> InputError:
        return InputError(f"{self.record}: field '{field}' {what}", where=self.at(field), fix=fix)


def require(obj: Any, key: str, where: Where, *, field: str | None = None,
            holds: str = "") -> Any:
    """``obj[key]``, or an InputError naming the file, record and missing key."""
    name = field or key
    if not isinstance(obj, Mapping):
        parent = name.rsplit(".", 1)[0] if "." in name else "record"
        raise InputError(
            f"{where.record}: '{parent}' should be a JSON object holding '{key}', "
            f"got {type(obj).__name__}",
            where=where.at(name), fix="check the file against the format's documentation")
    if key not in obj:
        raise InputError(
            f"{where.record}: missing key '{key}'" + (f" ({holds})" if holds else ""),
            where=where.at(name),
            fix=f"add '{key}' to the record, or check that the file is the one you meant")
    return obj[key]


def require_list(obj: Any, key: str, where: Where, *, holds: str = "") -> list:
    """``obj[key]``, which must be a JSON list, else an InputError naming the file, record and key."""
    value = require(obj, key, where, holds=holds)
    if not isinstance(value, list):
        raise where.error(key, f"must be a list, got {type(value).__name__}",
                          f"write '{key}' as a JSON list, or check that the file is the one you meant")
    return value


def record_id(obj: Any, key: str, where: Where, *, holds: str = "") -> str | int:
    """``obj[key]`` as a record id: a non-empty string or an integer, else an InputError."""
    value = require(obj, key, where, holds=holds)
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise where.error(key, f"must be a non-empty string or an integer, got {_preview(value)}",
                          "give each record a unique id")
    return value


def numbers(value: Any, size: int, where: Where, field: str, *, unit: str = "") -> np.ndarray:
    """``value`` as a flat float64 array of exactly ``size`` finite numbers."""
    unit_txt = f" ({unit})" if unit else ""
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError):       # ragged nesting
        arr = np.asarray(None)
    if arr.dtype.kind not in "iuf" or arr.ndim == 0:
        raise where.error(field, f"must be a list of {size} numbers{unit_txt}, got "
                                 f"{_preview(value)}",
                          "write the values as a JSON list of numbers")
    arr = arr.astype(np.float64).reshape(-1)
    if arr.size != size:
        raise where.error(field, f"must hold {size} numbers{unit_txt}, got {arr.size}",
                          f"give exactly {size} values for '{field}'")
    if not np.isfinite(arr).all():
        i = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise where.error(field, f"holds a non-finite value ({float(arr[i])!r} at index {i})",
                          "replace NaN/Infinity by real numbers, or drop the record")
    return arr


def rotation(value: Any, where: Where, field: str) -> np.ndarray:
    """A 3x3 rotation matrix (orthonormal with det +1 within ROTATION_TOL)."""
    R = numbers(value, 9, where, field).reshape(3, 3)
    off = float(np.abs(R @ R.T - np.eye(3)).max())
    det = float(np.linalg.det(R))
    if off > ROTATION_TOL or abs(det - 1.0) > ROTATION_TOL:
        raise where.error(field, f"is not a rotation matrix (|R R^T - I| = {off:.2g}, det = {det:.4g})",
                          "give a 3x3 orthonormal world-to-camera rotation with determinant +1 "
                          "(rows are the camera axes in world coordinates)")
    return R


def make_camera(focal: Any, princpt: Any, R: Any, t: Any, where: Where, *,
                fields: tuple[str, str, str, str] = ("focal", "princpt", "R", "t"),
                t_scale: float = 1.0) -> Camera:
    """Validate and build a Camera; ``R``/``t`` None mean identity / zero.

    ``t`` is multiplied by ``t_scale`` to give metres (e.g. 1e-3 for millimetres).
    """
    f_focal, f_princpt, f_R, f_t = fields
    fxy = numbers(focal, 2, where, f_focal, unit="fx, fy in pixels")
    if (fxy <= 0).any():
        raise where.error(f_focal, f"must be positive, got {fxy.tolist()}",
                          "give focal lengths in pixels (fx, fy > 0)")
    cxy = numbers(princpt, 2, where, f_princpt, unit="cx, cy in pixels")
    rot = np.eye(3) if R is None else rotation(R, where, f_R)
    trans = np.zeros(3) if t is None else numbers(t, 3, where, f_t) * t_scale
    return Camera(focal=(float(fxy[0]), float(fxy[1])), princpt=(float(cxy[0]), float(cxy[1])),
                  R=rot, t=trans)


def make_hand(side: str, params: Any, where: Where, *, prefix: str, valid: bool = True,
              bbox: Any = None, bbox_field: str | None = None) -> Hand:
    """Validate a ``{"pose": [48], "shape": [10], "trans": [3]}`` mapping and build a Hand.

    ``prefix`` names the mapping in errors (e.g. "right" or "hands[0]"); ``bbox`` is an optional
    [x, y, w, h] source box in pixels.
    """
    if side not in SIDES:
        raise where.error(f"{prefix}.side" if prefix else "side",
                          f"must be 'right' or 'left', got {side!r}", "use 'right' or 'left'")
    get = lambda key: require(params, key, where, field=f"{prefix}.{key}",  # noqa: E731
                              holds="MANO parameters pose [48], shape [10], trans [3]")
    pose = numbers(get("pose"), 48, where, f"{prefix}.pose", unit="axis-angle, radians")
    shape = numbers(get("shape"), 10, where, f"{prefix}.shape", unit="MANO betas")
    trans = numbers(get("trans"), 3, where, f"{prefix}.trans", unit="metres")
    box = None
    if bbox is not None:
        b = numbers(bbox, 4, where, bbox_field or f"{prefix}.bbox", unit="x, y, w, h in pixels")
        box = (float(b[0]), float(b[1]), float(b[2]), float(b[3]))
    return Hand(side=side, pose=pose, shape=shape, trans=trans, valid=bool(valid), bbox=box)


def image_size(width: Any, height: Any, where: Where, *,
               fields: tuple[str, str] = ("width", "height")) -> tuple[int, int]:
    """(width, height) as positive integers."""
    out = []
    for value, field in zip((width, height), fields):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
                or value <= 0 or int(value) != value:
            raise where.error(field, f"must be a positive whole number of pixels, got {_preview(value)}",
                              "give the source image size in pixels")
        out.append(int(value))
    return out[0], out[1]


def _preview(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
