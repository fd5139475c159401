"""Camera geometry for rendering: world -> camera -> pixels, hand boxes, crop boxes and their intrinsics.

Conventions (the label schema's, OpenCV): camera x right, y down, z forward; lengths in metres.
World -> camera: X_cam = R @ X_world + t. Pixels: u = fx * X/Z + cx, v = fy * Y/Z + cy.
Pixel coordinates are continuous with pixel centres at integers: pixel (i, j) covers
[i - 0.5, i + 0.5] x [j - 0.5, j + 0.5], so a w x h image spans [-0.5, w - 0.5] x [-0.5, h - 0.5].
Boxes are (x0, y0, x1, y1) in those pixel coordinates.

All functions are pure numpy and work on float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from handsynth.labels.schema import Camera

BEHIND_CAMERA = "behind_camera"
OUTSIDE_IMAGE = "outside_image"
MIN_DEPTH = 0.01            # metres: points nearer than this (or behind) cannot be projected sensibly
DEFAULT_CROP_SCALE = 1.5    # side of the local crop relative to the hands' box (AttentionHand's local view)


def world_to_camera(points: np.ndarray, R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Map world points (..., 3) in metres to camera space: X_cam = R @ X + t (metres)."""
    points = np.asarray(points, dtype=np.float64)
    return points @ np.asarray(R, dtype=np.float64).T + np.asarray(t, dtype=np.float64)


def to_camera(camera: Camera, points_world: np.ndarray) -> np.ndarray:
    """Camera-space coordinates (..., 3, metres) of world points (e.g. MANO vertices or joints)."""
    return world_to_camera(points_world, camera.R, camera.t)


def project(points_cam: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Pinhole projection of camera-space points (..., 3) to pixels (..., 2): u = fx X/Z + cx, v = fy Y/Z + cy.

    Points must lie in front of the camera (Z > 0); check with :func:`visibility` first.
    """
    points_cam = np.asarray(points_cam, dtype=np.float64)
    K = np.asarray(K, dtype=np.float64)
    homog = points_cam @ K.T
    return homog[..., :2] / homog[..., 2:3]


def tight_box(points_2d: np.ndarray) -> np.ndarray:
    """The smallest box (x0, y0, x1, y1), in pixels, containing all 2D points (N, 2)."""
    points_2d = np.asarray(points_2d, dtype=np.float64).reshape(-1, 2)
    return np.concatenate([points_2d.min(axis=0), points_2d.max(axis=0)])


def union_box(boxes: Sequence[np.ndarray]) -> np.ndarray:
    """The smallest box (x0, y0, x1, y1) containing every box given."""
    stacked = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([stacked[:, :2].min(axis=0), stacked[:, 2:].max(axis=0)])


def square_crop_box(boxes: Sequence[np.ndarray], scale: float = DEFAULT_CROP_SCALE,
                    min_side: float = 16.0) -> np.ndarray:
    """A square box (x0, y0, x1, y1) about the centre of the union of ``boxes``.

    Its side is ``scale`` times the longer side of the union (at least ``min_side`` pixels), as
    AttentionHand's local view enlarges the hand box. It may extend past the image border; the
    part outside the image is black in the local crops.
    """
    box = union_box(boxes)
    centre = (box[:2] + box[2:]) / 2.0
    half = max(float(scale) * float(np.max(box[2:] - box[:2])), float(min_side)) / 2.0
    return np.concatenate([centre - half, centre + half])


def crop_intrinsics(K: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """Intrinsics (3, 3) of the square crop ``box`` of an image resized to ``size`` x ``size`` pixels.

    K' = C @ S @ T @ K: T moves the box's top-left edge to the origin, S scales by size / side,
    C shifts by -0.5 px so that pixel centres stay at integers (the box's edges map to the crop
    image's edges -0.5 and size - 0.5).
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    s = float(size) / (x1 - x0)
    T = np.array([[1.0, 0.0, -x0], [0.0, 1.0, -y0], [0.0, 0.0, 1.0]])
    S = np.diag([s, s, 1.0])
    C = np.array([[1.0, 0.0, -0.5], [0.0, 1.0, -0.5], [0.0, 0.0, 1.0]])
    return C @ S @ T @ np.asarray(K, dtype=np.float64)


def visibility(points_cam: np.ndarray, box: np.ndarray | None, image_size: tuple[int, int],
               min_depth: float = MIN_DEPTH) -> str | None:
    """Why a hand cannot be rendered, or None when it can.

    ``BEHIND_CAMERA`` when any vertex has Z <= ``min_depth`` metres (a mesh crossing the camera
    plane has no meaningful 2D box); ``OUTSIDE_IMAGE`` when its projected box ``box`` does not
    overlap the w x h image at all. ``box`` may be None when the depth test is all that is wanted.
    """
    if float(np.min(np.asarray(points_cam)[..., 2])) <= min_depth:
        return BEHIND_CAMERA
    if box is not None:
        w, h = image_size
        x0, y0, x1, y1 = (float(v) for v in box)
        if x1 < -0.5 or y1 < -0.5 or x0 > w - 0.5 or y0 > h - 0.5:
            return OUTSIDE_IMAGE
    return None
