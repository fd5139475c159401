"""Camera placement: orbit the hands, frame them at a target share of the image, off-centre.

Pure functions. Conventions as everywhere in handsynth: X_cam = R X + t, u = fx X/Z + cx,
v = fy Y/Z + cy (OpenCV axes: x right, y down, z forward), pixel centres at integers, so an image of
width W spans u in [-0.5, W - 0.5].

How a camera is placed (:func:`place_camera`). Take the bounding sphere of the points that must be
seen (centre ``c``: the middle of their box; radius ``r``). A cone of half-angle ``alpha`` around
the direction to ``c`` holds the sphere; the sphere lies inside the image iff ``c``'s distance to
each of the four side planes of the view frustum (shrunk by ``margin_px``) is at least ``r``. With
a = (cx - margin) / f, the planes x = +-a z give |X| <= a Z - r sqrt(1 + a^2) (likewise for y), so:

- the depth Z of ``c`` comes from the target share: the sphere's diameter at depth Z spans
  ``share`` of the image's shorter side (2 r f / Z = share * min(W, H)); when the frustum is too
  narrow for that, Z grows to the smallest depth at which the sphere fits (the realised share is
  recorded);
- the offset (ox, oy) in [-1, 1] puts ``c`` at X = ox (a Z - r sqrt(1 + a^2)), likewise Y: -1 and 1
  touch the image's edges, 0 centres the hands;
- the camera sits at distance |(X, Y, Z)| from ``c`` along the viewing direction (azimuth and
  elevation), is rolled about its optical axis, then turned by the small rotation that moves ``c``
  from the optical axis to (X, Y, Z).

Every point inside the sphere then projects inside the image and lies in front of the camera, by
construction.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation


def orbit_direction(azimuth: float, elevation: float, basis: np.ndarray) -> np.ndarray:
    """Unit vector from the hands' centre towards the camera, in world coordinates.

    ``basis`` rows (e1, e2, e3) are the orbit frame: azimuth turns about e3 starting from e1,
    elevation rises towards e3 (radians).
    """
    ce = np.cos(elevation)
    local = np.array([ce * np.cos(azimuth), ce * np.sin(azimuth), np.sin(elevation)])
    return local @ np.asarray(basis, dtype=np.float64)


def hand_basis(fingers: np.ndarray, back: np.ndarray) -> np.ndarray:
    """Orbit frame (3, 3) rows: e1 along the fingers, e3 out of the back of the hand, e2 = e3 x e1."""
    e3 = np.asarray(back, dtype=np.float64) / np.linalg.norm(back)
    e1 = np.asarray(fingers, dtype=np.float64) - np.dot(fingers, e3) * e3
    e1 /= np.linalg.norm(e1)
    return np.stack([e1, np.cross(e3, e1), e3])


def look_rotation(forward: np.ndarray, up: np.ndarray, fallback_up: np.ndarray, roll: float) -> np.ndarray:
    """World -> camera rotation whose optical axis (z) is ``forward`` and whose image "up" (-y) is the
    part of ``up`` across the optical axis (``fallback_up`` when ``up`` is nearly along it), rolled by
    ``roll`` radians about the optical axis (positive: the image content turns clockwise)."""
    z = np.asarray(forward, dtype=np.float64) / np.linalg.norm(forward)
    for hint in (up, fallback_up):
        across = np.asarray(hint, dtype=np.float64) - np.dot(hint, z) * z
        if np.linalg.norm(across) > 1e-3 * np.linalg.norm(hint):
            break
    y = -across / np.linalg.norm(across)
    x = np.cross(y, z)
    R0 = np.stack([x, y, z])
    c, s = np.cos(roll), np.sin(roll)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ R0


def intrinsics(size: tuple[int, int], fov_long: float) -> np.ndarray:
    """Pinhole K (square pixels, principal point at the image centre) for a field of view ``fov_long``
    (radians) across the image's longer side."""
    w, h = size
    f = (max(w, h) / 2.0) / np.tan(fov_long / 2.0)
    return np.array([[f, 0.0, (w - 1) / 2.0], [0.0, f, (h - 1) / 2.0], [0.0, 0.0, 1.0]])


def bounding_sphere(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Centre (middle of the box) and radius of a sphere holding all ``points`` (N, 3)."""
    points = np.asarray(points, dtype=np.float64)
    centre = (points.min(0) + points.max(0)) / 2.0
    return centre, float(np.linalg.norm(points - centre, axis=1).max())


def place_camera(points: np.ndarray, view_dir: np.ndarray, up: np.ndarray, fallback_up: np.ndarray,
                 roll: float, share: float, offset: tuple[float, float], K: np.ndarray,
                 size: tuple[int, int], margin_px: float = 2.0) -> tuple[np.ndarray, np.ndarray, dict]:
    """(R, t, info) of a camera that sees all ``points`` inside the image (see the module docstring).

    ``view_dir``: unit vector from the points' centre towards the camera; ``share`` the target
    diameter of their bounding sphere over the image's shorter side; ``offset`` (ox, oy) in [-1, 1].
    ``info`` holds the realised share and the distance from the camera to the centre (metres).
    """
    w, h = size
    f, cx, cy = float(K[0, 0]), float(K[0, 2]), float(K[1, 2])
    centre, radius = bounding_sphere(points)
    radius = max(radius, 1e-6)
    ax, ay = (cx - margin_px) / f, (cy - margin_px) / f
    if ax <= 0 or ay <= 0:
        raise ValueError(f"image {w}x{h} is too small for a margin of {margin_px} px")
    kx, ky = radius * np.sqrt(1.0 + ax * ax), radius * np.sqrt(1.0 + ay * ay)
    z_share = 2.0 * radius * f / (share * min(w, h))
    z_fit = max(kx / ax, ky / ay) * (1.0 + 1e-9)
    z = max(z_share, z_fit)
    X, Y = offset[0] * (ax * z - kx), offset[1] * (ay * z - ky)
    cam_c = np.array([X, Y, z])
    distance = float(np.linalg.norm(cam_c))
    R0 = look_rotation(-np.asarray(view_dir), up, fallback_up, roll)
    target = cam_c / distance
    axis = np.cross([0.0, 0.0, 1.0], target)
    angle = np.arctan2(np.linalg.norm(axis), target[2])
    turn = Rotation.from_rotvec(axis / np.linalg.norm(axis) * angle).as_matrix() if angle > 0 else np.eye(3)
    R = turn @ R0
    position = centre + distance * np.asarray(view_dir, dtype=np.float64)
    t = -R @ position
    return R, t, {"realised_share": float(2.0 * radius * f / (z * min(w, h))), "distance_m": distance,
                  "sphere_radius_m": radius}
