"""HaMeR-compatible per-image annotations (``<key>.data.pyd``), an explicit compatibility option.

HaMeR (geopavlakos/hamer, ``ImageDataset.load_tars_as_webdataset``) reads tar shards of ``jpg`` (or
png) + ``data.pyd``: a pickled list with one dict per hand. The hamer layout writes one such sample per
image: ``<key>`` for the generated image and ``<key>-local`` for the generated local image. Per hand
(the hands of the image's block, see :mod:`handsynth.generate.frame`):

- ``keypoints_2d`` (21, 3) float32: pixels in THAT image (pixel centres at integers); last column the
  confidence: 1 for a joint inside the image, 0 for one outside it;
- ``keypoints_3d`` (21, 4) float32: camera-space joints in metres, last column confidence 1;
- ``hand_pose`` (48,) float32: axis-angle radians, [0:3] the global orientation in CAMERA space
  (the source's world orientation turned by the camera rotation), [3:48] the 15 finger rotations
  as absolute rotations (MANO's ``hands_mean`` added: HaMeR's MANO layer has no mean pose);
- ``betas`` (10,), ``has_hand_pose`` = ``has_betas`` = 1.0 (0-d arrays), ``right`` 1.0 / 0.0;
- ``center`` (2,): the centre of the hand's tight mesh box; ``scale`` (2,): a square of side
  ``margin`` x the box's longer side, / 200 (HaMeR crops ``max(scale) * 200`` around ``center``).

Hands with no joint inside the image are left out (an image may then hold an empty list).

The margin (``--hamer-margin``, default :data:`HAMER_MARGIN` = 2.2) keeps every joint inside HaMeR's
crop under its default training augmentation (hamer/configs_hydra/experiment/default.yaml): box scale
a = 1 + 0.3 clip(N, -1, 1) >= 0.7, rotation up to 60 degrees, shift up to 0.02 of the box per axis.
A joint lies within L / sqrt(2) of the box centre (L: the box's longer side); with crop side a * B
(B = margin * L, or more when HaMeR's BBOX_SHAPE widens it), it stays in the crop for every draw when
L / sqrt(2) + 0.02 sqrt(2) B <= 0.7 B / 2, i.e. margin >= 0.7071 / (0.35 - 0.0283) = 2.198. (HaMeR's
ViT sees the crop's central 192 of 256 columns; keeping joints there in the worst case would take
a margin of 3.0.) The tight box (margin 1) loses joints under augmentation.

Joint order is OpenPose's (wrist, thumb1-4, index1-4, middle1-4, ring1-4, pinky1-4), which is
both HaMeR's and handsynth's ``openpose21``. Left hands keep the LEFT MANO model's parameters;
HaMeR mirrors them itself when ``right`` is 0.

``data.pyd`` is a pickle that numpy 1.x and 2.x both read: arrays are pickled as
``numpy.ndarray(shape, dtype, bytearray(data))`` (writable on loading), so the file names no
``numpy._core`` / ``numpy.core`` module. Pickle can run arbitrary code when read: only load ``.pyd``
files you made. :func:`load_pyd` (used by verification) refuses everything but these arrays and plain
containers.
"""

from __future__ import annotations

import io as _io
import pickle
from typing import Any

import numpy as np
from scipy.spatial.transform import Rotation

PICKLE_PROTOCOL = 4          # fixed: byte-identical reruns
HAMER_MARGIN = 2.2           # crop side / the hand box's longer side (see the module docstring)
HAMER_FIELDS = ("keypoints_2d", "keypoints_3d", "hand_pose", "betas", "has_hand_pose", "has_betas",
                "center", "scale", "right")


def in_image(points: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Whether each (N, 2) pixel point lies inside a ``size`` (W, H) image ([-0.5, W - 0.5] x [-0.5, H - 0.5])."""
    points = np.asarray(points, dtype=np.float64)
    upper = np.asarray(size, dtype=np.float64) - 0.5
    return np.all((points >= -0.5) & (points <= upper), axis=-1)


def hamer_hands(label: dict[str, Any], block: dict[str, Any], hands_mean: dict[str, np.ndarray],
                margin: float = HAMER_MARGIN) -> list[dict[str, np.ndarray]]:
    """One HaMeR dict per hand with a joint in the image whose labels ``block`` gives (the ``image`` or
    ``local_image`` block of the sample; see the module docstring for fields and units).

    ``label`` is the render label (3D joints, MANO parameters, camera); ``hands_mean`` the (45,) MANO mean
    finger pose per side, from the MANO files the render run used."""
    R_cam = np.asarray(label["camera"]["R"], dtype=np.float64)
    size = tuple(block["size"])
    hands = []
    for hand, framed in zip(label["hands"], block["hands"]):
        kp2d = np.asarray(framed["joints_2d"], dtype=np.float64)
        visible = in_image(kp2d, size)
        if not visible.any():
            continue
        pose = np.asarray(hand["mano"]["pose"], dtype=np.float64)
        orient = Rotation.from_matrix(R_cam @ Rotation.from_rotvec(pose[:3]).as_matrix()).as_rotvec()
        fingers = pose[3:] + np.asarray(hands_mean[hand["side"]], dtype=np.float64)
        box = np.asarray(framed["box"], dtype=np.float64).reshape(2, 2)
        side = margin * float(np.max(box[1] - box[0]))
        hands.append({
            "keypoints_2d": np.concatenate([kp2d, visible[:, None]], axis=1).astype(np.float32),
            "keypoints_3d": np.concatenate([np.asarray(hand["joints_cam"], dtype=np.float64),
                                            np.ones((len(kp2d), 1))], axis=1).astype(np.float32),
            "hand_pose": np.concatenate([orient, fingers]).astype(np.float32),
            "betas": np.asarray(hand["mano"]["shape"], dtype=np.float32),
            "has_hand_pose": np.array(1.0, dtype=np.float32),
            "has_betas": np.array(1.0, dtype=np.float32),
            "center": box.mean(axis=0).astype(np.float32),
            "scale": np.full(2, side / 200.0, dtype=np.float32),
            "right": np.array(1.0 if hand["side"] == "right" else 0.0, dtype=np.float32),
        })
    return hands


class _PortablePickler(pickle.Pickler):
    """Pickles numpy arrays as ``numpy.ndarray(shape, dtype, bytearray(data))``: readable by numpy 1.x and
    2.x alike (numpy 2's own pickles name ``numpy._core``, which numpy < 1.26.1 lacks)."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is np.ndarray:
            if obj.dtype.hasobject:
                raise pickle.PicklingError("object arrays have no portable form")
            data = obj.copy(order="C")
            return np.ndarray, (data.shape, data.dtype.str, bytearray(data.tobytes()))
        return NotImplemented


def encode_pyd(hands: list[dict[str, np.ndarray]]) -> bytes:
    buf = _io.BytesIO()
    _PortablePickler(buf, protocol=PICKLE_PROTOCOL).dump(hands)
    return buf.getvalue()


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Builds numpy arrays (from :func:`encode_pyd`'s form or numpy's own), dtypes and scalars only; any
    other global is refused (no code runs). numpy refuses object arrays made from a buffer."""

    def find_class(self, module: str, name: str) -> Any:
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"):
            return super().find_class(module, name)
        if (module, name) in (("numpy", "ndarray"), ("numpy", "dtype"), ("builtins", "bytearray")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load '{module}.{name}' from a .pyd file")


def load_pyd(data: bytes) -> Any:
    """Read a ``data.pyd`` written by :func:`encode_pyd` without running code from it."""
    return _NumpyOnlyUnpickler(_io.BytesIO(data)).load()
