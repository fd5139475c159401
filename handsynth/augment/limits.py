"""Anatomical joint limits of the 15 MANO finger joints, and per-joint anatomical frames.

MANO expresses each finger joint's rotation as an axis-angle vector in the template's axes (the
parent's rotation applied). handsynth gives every joint an anatomical frame built from the MANO
file's own rest joints, so the limits hold for any MANO file (the official one or the test stand-in):

- twist axis ``a``: along the bone, from the joint to the next joint of the digit (the fingertip
  vertex for the last joint);
- bend axis ``b = a x p`` (``p``: palm direction, the side the palm faces): a positive rotation
  about ``b`` turns the bone towards the palm, i.e. positive bend = flexion, negative = extension;
- splay axis ``s`` (perpendicular to both), signed so that a positive rotation turns the bone
  towards the thumb side (radial abduction for fingers) on either hand.

A joint's *anatomical angles* are the components (bend, splay, twist) of its total rotation vector
(MANO's ``hands_mean`` + the pose, since handsynth runs MANO with ``flat_hand_mean=False``) along
``(b, s, a)``. For a pure flexion the bend component is exactly the flexion angle; limits are a box
on these three components (in degrees, :data:`LIMITS_DEG`).

Sources of the limits (active ranges of a healthy adult hand, zero = MANO's flat template hand):

- Flexion/extension of all joints and the thumb's CMC abduction: the American Academy of
  Orthopaedic Surgeons' normal ranges (AAOS, *Joint Motion: Method of Measuring and Recording*,
  1965; as tabulated in Norkin & White, *Measurement of Joint Motion*): finger MCP flexion 90 /
  hyperextension 45, PIP 100 / 0, DIP 90 / 10; thumb CMC palmar abduction 70, flexion 15,
  extension 20; thumb MCP 50 / 0; thumb IP 80 / 20.
- Finger MCP abduction/adduction 20 either way (AAOS); Lin, Wu & Huang, *Modeling the constraints of
  human hand motion* (HUMO 2000) use a tighter 15.
- Not in these sources (marked "tolerance" below, handsynth's choice): PIP, DIP and thumb IP are
  hinges with no splay or twist and finger MCPs have no active twist; MANO's joint axes do not lie
  exactly on the anatomical ones, so they get small tolerances (5 or 10 degrees). The MANO template's
  thumb is already partly abducted, so the CMC bend range reaches 30 degrees below it (adduction
  back to the index) besides AAOS's 70 of abduction, and the CMC gets 20 degrees of twist
  (the metacarpal pronates during opposition).
"""

from __future__ import annotations

import numpy as np

from handsynth.hand_model import TIP_VERTICES

# MANO joint indices 1..15 (pose[3:48] in this order): index 1-3, middle 4-6, pinky 7-9, ring 10-12,
# thumb 13-15; the parent of each joint and the next joint along the digit (None: the fingertip vertex).
JOINT_NAMES: tuple[str, ...] = (
    "index_mcp", "index_pip", "index_dip", "middle_mcp", "middle_pip", "middle_dip",
    "pinky_mcp", "pinky_pip", "pinky_dip", "ring_mcp", "ring_pip", "ring_dip",
    "thumb_cmc", "thumb_mcp", "thumb_ip",
)
DIGIT_TIPS = TIP_VERTICES                                # fingertip vertex id per digit
MANO_WRIST, MANO_INDEX1, MANO_MIDDLE1, MANO_PINKY1 = 0, 1, 4, 7

# (bend lo, bend hi, splay lo, splay hi, twist lo, twist hi) in degrees.
_FINGER_MCP = (-45.0, 90.0, -20.0, 20.0, -10.0, 10.0)   # AAOS; twist: tolerance
_FINGER_PIP = (0.0, 100.0, -5.0, 5.0, -5.0, 5.0)        # AAOS; splay, twist: tolerance
_FINGER_DIP = (-10.0, 90.0, -5.0, 5.0, -5.0, 5.0)       # AAOS; splay, twist: tolerance
_THUMB_CMC = (-30.0, 70.0, -15.0, 20.0, -20.0, 20.0)    # AAOS abduction 70, flexion 15 / extension 20
_THUMB_MCP = (0.0, 50.0, -10.0, 10.0, -10.0, 10.0)      # AAOS; splay, twist: tolerance
_THUMB_IP = (-20.0, 80.0, -5.0, 5.0, -5.0, 5.0)         # AAOS; splay, twist: tolerance
LIMITS_DEG = np.array(
    [_FINGER_MCP, _FINGER_PIP, _FINGER_DIP] * 4 + [_THUMB_CMC, _THUMB_MCP, _THUMB_IP], dtype=np.float64
).reshape(15, 3, 2)
"""(15 joints, [bend, splay, twist], [lo, hi]) in degrees, joints in MANO order (:data:`JOINT_NAMES`)."""

_NEXT = {1: 2, 2: 3, 3: "index", 4: 5, 5: 6, 6: "middle", 7: 8, 8: 9, 9: "pinky", 10: 11, 11: 12, 12: "ring",
         13: 14, 14: 15, 15: "thumb"}


def palm_direction(rest_joints: np.ndarray, side: str) -> np.ndarray:
    """Unit vector out of the palm of a MANO hand at rest (16 joints): for a right hand
    ``(index1 - wrist) x (pinky1 - wrist)``; the cross product flips for the mirrored left hand."""
    J = np.asarray(rest_joints, dtype=np.float64)
    palm = np.cross(J[MANO_INDEX1] - J[MANO_WRIST], J[MANO_PINKY1] - J[MANO_WRIST])
    return palm / np.linalg.norm(palm) * (1.0 if side == "right" else -1.0)


def joint_frames(rest_joints: np.ndarray, rest_vertices: np.ndarray, side: str) -> np.ndarray:
    """Anatomical axes (15, 3, 3) of a MANO model at rest: row 0 bend, row 1 splay, row 2 twist.

    ``rest_joints`` (16, 3) are MANO's joints and ``rest_vertices`` (778, 3) its template vertices, both
    with zero pose, zero shape and the flat (not mean) hand (see :func:`palm_direction`).
    """
    J = np.asarray(rest_joints, dtype=np.float64)
    V = np.asarray(rest_vertices, dtype=np.float64)
    palm = palm_direction(J, side)
    radial = J[MANO_INDEX1] - J[MANO_PINKY1]
    frames = np.zeros((15, 3, 3))
    for joint in range(1, 16):
        nxt = _NEXT[joint]
        end = V[DIGIT_TIPS[nxt]] if isinstance(nxt, str) else J[nxt]
        a = end - J[joint]
        a /= np.linalg.norm(a)
        b = np.cross(a, palm)
        b /= np.linalg.norm(b)
        s = np.cross(a, b)
        if np.dot(np.cross(s, a), radial) < 0:     # positive splay turns the bone towards the thumb side
            s = -s
        frames[joint - 1] = (b, s, a)
    return frames


def to_anatomical(rotvecs: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """(…, 15, 3) total joint rotation vectors -> (…, 15, 3) [bend, splay, twist] components, radians."""
    return np.einsum("jkc,...jc->...jk", frames, np.asarray(rotvecs, dtype=np.float64))


def from_anatomical(angles: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_anatomical` (the frames are orthonormal)."""
    return np.einsum("jkc,...jk->...jc", frames, np.asarray(angles, dtype=np.float64))


def clip_angles(angles: np.ndarray) -> tuple[np.ndarray, int]:
    """Clip (…, 15, 3) anatomical angles (radians) to :data:`LIMITS_DEG`; returns them and how many
    joints had at least one component outside."""
    lo, hi = np.deg2rad(LIMITS_DEG[..., 0]), np.deg2rad(LIMITS_DEG[..., 1])
    clipped = np.clip(angles, lo, hi)
    return clipped, int(np.any(clipped != angles, axis=-1).sum())


def within_limits(angles: np.ndarray, tol_deg: float = 1e-6) -> np.ndarray:
    """(…, 15) True where every component lies inside the limits (``tol_deg`` slack)."""
    deg = np.rad2deg(angles)
    return np.all((deg >= LIMITS_DEG[..., 0] - tol_deg) & (deg <= LIMITS_DEG[..., 1] + tol_deg), axis=-1)
