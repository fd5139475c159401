"""HaMeR-compatible per-sample annotations (``<key>.data.pyd``), an explicit compatibility option.

HaMeR (geopavlakos/hamer, ``ImageDataset.load_tars_as_webdataset``) reads tar shards of ``jpg`` (or
png) + ``data.pyd``: a pickled list with one dict per hand. The fields written here, per hand:

- ``keypoints_2d`` (21, 3) float32: pixels in the GENERATED image (pixel centres at integers),
  last column confidence 1;
- ``keypoints_3d`` (21, 4) float32: camera-space joints in metres, last column confidence 1;
- ``hand_pose`` (48,) float32: axis-angle radians, [0:3] the global orientation in CAMERA space
  (the source's world orientation turned by the camera rotation), [3:48] the 15 finger rotations
  as absolute rotations (MANO's ``hands_mean`` added: HaMeR's MANO layer has no mean pose);
- ``betas`` (10,), ``has_hand_pose`` = ``has_betas`` = 1.0 (0-d arrays), ``right`` 1.0 / 0.0;
- ``center`` (2,): the centre of the hand's tight mesh box, ``scale`` (2,): its (width, height) / 200,
  both in generated-image pixels (HaMeR crops ``scale * 200`` around ``center``).

Joint order is OpenPose's (wrist, thumb1-4, index1-4, middle1-4, ring1-4, pinky1-4), which is
both HaMeR's and handsynth's ``openpose21``. Left hands keep the LEFT MANO model's parameters;
HaMeR mirrors them itself when ``right`` is 0.

Pickle can run arbitrary code when read: only load ``.pyd`` files you made. :func:`load_pyd`
(used by verification) refuses everything but numpy arrays and plain containers.
"""

from __future__ import annotations

import io as _io
import pickle
from typing import Any

import numpy as np
from scipy.spatial.transform import Rotation

PICKLE_PROTOCOL = 4          # fixed: byte-identical reruns; numpy arrays pickle in-band (no PickleBuffer)
HAMER_FIELDS = ("keypoints_2d", "keypoints_3d", "hand_pose", "betas", "has_hand_pose", "has_betas",
                "center", "scale", "right")


def image_point_map(source_size: tuple[int, int], image_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset) taking source-image pixels to generated-image pixels when the whole source
    frame was resized to ``image_size``: u' = (u + 0.5) * W'/W - 0.5 (pixel centres at integers)."""
    s = np.asarray(image_size, dtype=np.float64) / np.asarray(source_size, dtype=np.float64)
    return s, 0.5 * s - 0.5


def hamer_hands(label: dict[str, Any], image_size: tuple[int, int],
                hands_mean: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """One HaMeR dict per hand of a render label (see the module docstring for fields and units).

    ``image_size`` is the generated image's (width, height); ``hands_mean`` the (45,) MANO mean
    finger pose per side, from the MANO files the render run used.
    """
    scale, offset = image_point_map(tuple(label["image_size"]), image_size)
    R_cam = np.asarray(label["camera"]["R"], dtype=np.float64)
    hands = []
    for hand in label["hands"]:
        pose = np.asarray(hand["mano"]["pose"], dtype=np.float64)
        orient = Rotation.from_matrix(R_cam @ Rotation.from_rotvec(pose[:3]).as_matrix()).as_rotvec()
        fingers = pose[3:] + np.asarray(hands_mean[hand["side"]], dtype=np.float64)
        kp2d = np.asarray(hand["joints_2d"], dtype=np.float64) * scale + offset
        box = np.asarray(hand["box"], dtype=np.float64).reshape(2, 2) * scale + offset
        ones = np.ones((len(kp2d), 1))
        hands.append({
            "keypoints_2d": np.concatenate([kp2d, ones], axis=1).astype(np.float32),
            "keypoints_3d": np.concatenate([np.asarray(hand["joints_cam"], dtype=np.float64), ones],
                                           axis=1).astype(np.float32),
            "hand_pose": np.concatenate([orient, fingers]).astype(np.float32),
            "betas": np.asarray(hand["mano"]["shape"], dtype=np.float32),
            "has_hand_pose": np.array(1.0, dtype=np.float32),
            "has_betas": np.array(1.0, dtype=np.float32),
            "center": box.mean(axis=0).astype(np.float32),
            "scale": ((box[1] - box[0]) / 200.0).astype(np.float32),
            "right": np.array(1.0 if hand["side"] == "right" else 0.0, dtype=np.float32),
        })
    return hands


def encode_pyd(hands: list[dict[str, np.ndarray]]) -> bytes:
    return pickle.dumps(hands, protocol=PICKLE_PROTOCOL)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Builds numpy arrays, dtypes and scalars only; any other global is refused (no code runs)."""

    def find_class(self, module: str, name: str) -> Any:
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"):
            return super().find_class(module, name)
        if module == "numpy" and name in ("ndarray", "dtype"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load '{module}.{name}' from a .pyd file")


def load_pyd(data: bytes) -> Any:
    """Read a ``data.pyd`` written by :func:`encode_pyd` without running code from it."""
    return _NumpyOnlyUnpickler(_io.BytesIO(data)).load()
