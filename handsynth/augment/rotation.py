"""Rotation helpers on axis-angle vectors (radians), batched over leading axes.

Thin, pure wrappers around :class:`scipy.spatial.transform.Rotation` (the field's standard
implementation): per-joint spherical linear interpolation, geodesic angles, composition.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation


def _flat(rotvec: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    rotvec = np.asarray(rotvec, dtype=np.float64)
    if rotvec.shape[-1] != 3:
        raise ValueError(f"axis-angle vectors need a last axis of 3, got shape {rotvec.shape}")
    return rotvec.reshape(-1, 3), rotvec.shape


def slerp(rotvec_a: np.ndarray, rotvec_b: np.ndarray, t: float | np.ndarray) -> np.ndarray:
    """Per-rotation spherical linear interpolation: ``a`` at t=0, ``b`` at t=1, along the shortest
    geodesic between them (R(t) = R_a exp(t log(R_a^T R_b))). Shapes (..., 3); ``t`` broadcasts over
    the leading axes."""
    a, shape = _flat(rotvec_a)
    b, _ = _flat(rotvec_b)
    ra, rb = Rotation.from_rotvec(a), Rotation.from_rotvec(b)
    delta = (ra.inv() * rb).as_rotvec()                 # shortest: as_rotvec returns angles in [0, pi]
    weight = np.broadcast_to(np.asarray(t, dtype=np.float64), shape[:-1]).reshape(-1, 1)
    return (ra * Rotation.from_rotvec(delta * weight)).as_rotvec().reshape(shape)


def geodesic(rotvec_a: np.ndarray, rotvec_b: np.ndarray) -> np.ndarray:
    """Angle in radians (in [0, pi]) of the rotation taking ``a`` to ``b``, per rotation; shape (...)."""
    a, shape = _flat(rotvec_a)
    b, _ = _flat(rotvec_b)
    return (Rotation.from_rotvec(a).inv() * Rotation.from_rotvec(b)).magnitude().reshape(shape[:-1])


def compose(rotvec_outer: np.ndarray, rotvec_inner: np.ndarray) -> np.ndarray:
    """Axis-angle of R_outer @ R_inner."""
    a, shape = _flat(rotvec_outer)
    b, _ = _flat(rotvec_inner)
    return (Rotation.from_rotvec(a) * Rotation.from_rotvec(b)).as_rotvec().reshape(shape)


def matrix(rotvec: np.ndarray) -> np.ndarray:
    """Rotation matrices (..., 3, 3) of axis-angle vectors (..., 3)."""
    a, shape = _flat(rotvec)
    return Rotation.from_rotvec(a).as_matrix().reshape(*shape[:-1], 3, 3)
