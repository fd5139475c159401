"""Write a small demo input set: stand-in MANO files and an InterHand2.6M-format label set.

    python -m tests.make_demo demo
    handsynth render --labels demo/interhand/test_interhand2.6m_data.json --mano-dir demo/mano

The MANO files are the hand-shaped stand-in the tests use (MANO itself is licence-restricted and
never shipped). The labels are the real 4-frame InterHand2.6M excerpt (with photos) when the
project's ``shared/samples`` folder is beside the checkout, with MANO fits placed on the real
hands; otherwise a synthetic InterHand2.6M file set (data, camera, MANO_NeuralAnnot) of two hands
seen by four cameras in two frames, without photos.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from tests.fixtures.labels import SAMPLE, SAMPLE_PREFIX, build_interhand_set, mano_rest_arrays
from tests.fixtures.mano import build_mano_files


def _look_at(campos: np.ndarray, target: np.ndarray) -> np.ndarray:
    """World -> camera rotation (OpenCV axes) of a camera at ``campos`` looking at ``target``, y down."""
    z = (target - campos) / np.linalg.norm(target - campos)
    x = np.cross(z, [0.0, -1.0, 0.0])
    x /= np.linalg.norm(x)
    return np.stack([x, np.cross(z, x), z])


def write_synthetic_interhand(folder: Path, prefix: str = SAMPLE_PREFIX) -> Path:
    """An InterHand2.6M-format file set (units as the dataset's: mm for cameras, m for MANO)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    cams = {"400001": [0.0, -90.0, -1000.0], "400002": [600.0, -250.0, -750.0],
            "400003": [-600.0, -300.0, -750.0], "400004": [0.0, -800.0, -550.0]}
    target = np.array([0.0, -90.0, 0.0])  # mm: the hands' middle (fingers point along world -y)
    camera = {"0": {"campos": cams, "camrot": {}, "focal": {}, "princpt": {}}}
    for cam, pos in cams.items():
        camera["0"]["camrot"][cam] = _look_at(np.array(pos), target).tolist()
        camera["0"]["focal"][cam] = [1000.0, 1000.0]
        camera["0"]["princpt"][cam] = [256.0, 256.0]
    images, annotations, mano = [], [], {"0": {}}
    for frame in (0, 1):
        hands = {}
        for side, x in (("right", -0.06), ("left", 0.06)):
            pose = rng.normal(0.0, 0.2, 48)
            pose[:3] = Rotation.from_euler("xyz", [90.0, 0.0, 90.0 if side == "right" else -90.0],
                                           degrees=True).as_rotvec()
            hands[side] = {"pose": pose.tolist(), "shape": [0.0] * 10, "trans": [x, 0.0, 0.0]}
        mano["0"][str(frame)] = hands
        for cam in cams:
            image_id = len(images)
            images.append({"id": image_id, "file_name": f"Capture0/demo/cam{cam}/image{frame:04d}.jpg",
                           "width": 512, "height": 512, "capture": 0, "seq_name": "demo", "camera": cam,
                           "frame_idx": frame})
            annotations.append({"id": image_id, "image_id": image_id, "bbox": [0, 0, 512, 512],
                                "joint_valid": [[1]] * 42, "hand_type": "interacting", "hand_type_valid": 1})
    files = {"data": {"images": images, "annotations": annotations}, "camera": camera, "MANO_NeuralAnnot": mano}
    for kind, doc in files.items():
        (folder / f"{prefix}_{kind}.json").write_text(json.dumps(doc))
    return folder / f"{prefix}_data.json"


def make_demo(out: Path) -> Path:
    mano_dir = out / "mano"
    build_mano_files(mano_dir)
    if SAMPLE.exists():
        return build_interhand_set(out / "interhand", mano_arrays=mano_rest_arrays(mano_dir))
    return write_synthetic_interhand(out / "interhand")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to write (e.g. demo)")
    out = parser.parse_args().out
    labels = make_demo(out)
    print(f"handsynth render --labels {labels} --mano-dir {out / 'mano'}")
