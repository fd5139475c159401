"""The one in-memory label schema every reader produces.

Units: camera translation and MANO translation in metres; pixels for intrinsics and image
sizes. Conventions: a world point X maps to the camera as X_cam = R @ X + t, and to pixels as
u = fx * X_cam[0] / X_cam[2] + cx, v = fy * X_cam[1] / X_cam[2] + cy (OpenCV: x right, y down,
z forward). MANO parameters are expressed in the world frame the camera's R, t refer to.
``original`` keeps the source annotation exactly as read, so export can hand it on unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

Side = Literal["right", "left"]
SIDES: tuple[Side, Side] = ("right", "left")


@dataclass(frozen=True)
class Camera:
    focal: tuple[float, float]          # fx, fy in pixels
    princpt: tuple[float, float]        # cx, cy in pixels
    R: np.ndarray                       # (3, 3) world -> camera rotation
    t: np.ndarray                       # (3,) world -> camera translation, metres

    @property
    def K(self) -> np.ndarray:
        (fx, fy), (cx, cy) = self.focal, self.princpt
        return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


@dataclass(frozen=True)
class Hand:
    side: Side
    pose: np.ndarray                    # (48,) axis-angle: [0:3] global orient, [3:48] 15 finger joints
    shape: np.ndarray                   # (10,) MANO betas
    trans: np.ndarray                   # (3,) metres
    valid: bool = True
    bbox: tuple[float, float, float, float] | None = None   # source box [x, y, w, h] in pixels, if given


@dataclass
class Frame:
    key: str                            # handsynth.keys scheme: [a-z0-9_-]+, from the source ids
    source_format: str                  # "interhand26m" | "coco-neuralannot" | "handsynth-jsonl"
    image_size: tuple[int, int]         # width, height in pixels
    camera: Camera
    hands: list[Hand]
    image_path: Path | None = None      # the source RGB image, when known and present
    source_id: dict[str, Any] = field(default_factory=dict)   # ids that locate the frame in the source
    original: dict[str, Any] = field(default_factory=dict)    # the source annotation, unchanged
