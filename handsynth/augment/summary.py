"""How far the new poses are from the source poses, viewpoint coverage and rejection counts.

Pose distances compare finger articulation only (the 15 finger joints, not the global orientation,
which follows the viewpoint, nor the shape), per side:

- per-joint mean angle: the mean over the 15 joints of the geodesic angle between the two joint
  rotations MANO applies (pose + hands_mean), in degrees;
- root-aligned joint-position distance: the mean Euclidean distance over the 21 joints of the two
  hands posed with zero global orientation, zero shape and the wrist at the origin, in millimetres.

Each new hand's distance is to its nearest source hand of the same side (nearest by each measure on
its own). The source set's own spacing is each distinct source pose's distance to its nearest
*other* distinct source pose (InterHand2.6M repeats a pose once per camera: repeats are merged).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.spatial.transform import Rotation

CHUNK = 256
AZIMUTH_BINS = np.linspace(-180.0, 180.0, 13)      # 30-degree bins
ELEVATION_BINS = np.linspace(-90.0, 90.0, 7)       # 30-degree bins


def mean_joint_angle_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) mean over joints of the geodesic angle (degrees) between rotations a (N, J, 3) and
    b (M, J, 3), axis-angle."""
    qa = Rotation.from_rotvec(np.asarray(a).reshape(-1, 3)).as_quat().reshape(len(a), -1, 4)
    qb = Rotation.from_rotvec(np.asarray(b).reshape(-1, 3)).as_quat().reshape(len(b), -1, 4)
    out = np.empty((len(a), len(b)))
    for s in range(0, len(a), CHUNK):
        dot = np.abs(np.einsum("njc,mjc->nmj", qa[s:s + CHUNK], qb))
        out[s:s + CHUNK] = np.rad2deg(2.0 * np.arccos(np.clip(dot, 0.0, 1.0))).mean(-1)
    return out


def mean_joint_distance_mm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) mean over joints of the Euclidean distance between joint sets a (N, J, 3) and b (M, J, 3)."""
    out = np.empty((len(a), len(b)))
    for s in range(0, len(a), CHUNK):
        out[s:s + CHUNK] = np.linalg.norm(a[s:s + CHUNK, None] - b[None], axis=-1).mean(-1)
    return out


def _stats(values: np.ndarray) -> dict[str, float] | None:
    if not len(values):
        return None
    return {"mean": float(np.mean(values)), "median": float(np.median(values)), "min": float(np.min(values)),
            "max": float(np.max(values)), "n": int(len(values))}


def pose_distances(new_rot: np.ndarray, new_joints: np.ndarray, src_rot: np.ndarray,
                   src_joints: np.ndarray) -> dict[str, Any]:
    """Distances of new poses to their nearest source pose and the sources' own spacing (one side).

    ``*_rot``: (N, 15, 3) joint rotations; ``*_joints``: (N, 21, 3) root-aligned joints in mm.
    """
    _, unique = np.unique(np.round(src_rot.reshape(len(src_rot), -1), 9), axis=0, return_index=True)
    unique = np.sort(unique)
    src_rot, src_joints = src_rot[unique], src_joints[unique]
    out: dict[str, Any] = {"source_poses": int(len(unique)), "new_poses": int(len(new_rot))}
    for name, measure, a, b in (("angle_deg", mean_joint_angle_deg, new_rot, src_rot),
                                ("joints_mm", mean_joint_distance_mm, new_joints, src_joints)):
        nearest = measure(a, b).min(1) if len(a) and len(b) else np.zeros(0)
        if len(b) > 1:
            own = measure(b, b)
            np.fill_diagonal(own, np.inf)
            spacing = own.min(1)
        else:
            spacing = np.zeros(0)
        out[name] = {"new_to_nearest_source": _stats(nearest), "source_spacing": _stats(spacing)}
        if len(spacing) and len(nearest):
            out[name]["share_beyond_median_spacing"] = float(np.mean(nearest > np.median(spacing)))
    return out


def coverage(azimuths: list[float], elevations: list[float]) -> dict[str, Any]:
    """Azimuth x elevation histogram (30-degree bins) of the cameras, plus the marginals."""
    hist, _, _ = np.histogram2d(azimuths, elevations, bins=(AZIMUTH_BINS, ELEVATION_BINS))
    return {"azimuth_edges_deg": AZIMUTH_BINS.tolist(), "elevation_edges_deg": ELEVATION_BINS.tolist(),
            "counts": hist.astype(int).tolist(), "azimuth_counts": hist.sum(1).astype(int).tolist(),
            "elevation_counts": hist.sum(0).astype(int).tolist(),
            "cells_filled": int(np.count_nonzero(hist)), "cells": int(hist.size)}


def canonical_joints(forward: Callable, side: str, poses: np.ndarray, batch: int = 512) -> np.ndarray:
    """(N, 21, 3) joints in mm of ``poses`` (N, 48) with zero global orientation and shape, wrist at 0.

    ``forward`` is :meth:`handsynth.hand_model.HandModel.forward`.
    """
    poses = np.array(poses, dtype=np.float64).reshape(-1, 48)
    poses[:, :3] = 0.0
    out = np.zeros((len(poses), 21, 3))
    for s in range(0, len(poses), batch):
        chunk = poses[s:s + batch]
        joints = forward(side, chunk, np.zeros((len(chunk), 10)), np.zeros((len(chunk), 3))).joints
        joints = joints.detach().cpu().double().numpy()
        out[s:s + batch] = 1000.0 * (joints - joints[:, :1])
    return out
