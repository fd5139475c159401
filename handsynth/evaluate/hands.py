"""Labelled hands in an image's own pixel frame: hand crops, and scoring detected keypoints against labels.

Conventions are render's (handsynth.render.geometry): pixel centres at integers, boxes (x0, y0, x1, y1).
Joint order is ``openpose21`` (wrist, then thumb, index, middle, ring, pinky, base to tip), which is
also MediaPipe's landmark order.

Scores per labelled hand (units in ``UNITS``):

- ``score``: the matched detection's confidence: MediaPipe's handedness score (its Tasks API reports no
  other per-hand score; hands below its 0.5 detection/presence thresholds are not reported), so 0 when no
  detection matches the hand and between 0.5 and 1 (how sure MediaPipe is of the hand's side) when one does.
- ``error_2d``: mean distance between the detected and the labelled 2D joints, divided by the hand's
  size (the longer side of the labels' tight mesh box): 0.1 means a tenth of the hand. Not aligned:
  both live in the same image frame, and a shift between them is what it measures.
- ``mse_2d``: mean squared 2D joint distance divided by the squared hand size.
- ``pck``: share of joints within ``t`` hand sizes, for each t in ``PCK_THRESHOLDS``.
- ``mse_3d``: mean squared distance (cm^2) between the detected world landmarks and the labels'
  camera-space joints after moving both wrists to the origin (root-aligned, no rotation alignment);
  ``mpjpe_3d``: mean distance in mm, same alignment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from handsynth.render import geometry

N_JOINTS = 21
CROP_SCALE = 1.5            # hand crops: the tight box squared and enlarged 1.5x (AttentionHand's local view)
CROP_SIZE = 299             # crops are cut straight at Inception's input size
MATCH_SCALE = 2.0           # detections match labelled hands by overlap of their keypoint boxes, squared and
MATCH_IOU = 0.1             # enlarged 2x, with IoU >= 0.1, one detection per hand (Hungarian assignment)
PCK_THRESHOLDS = (0.05, 0.1, 0.2)
UNITS = {
    "score": "MediaPipe handedness score of the matched detection, in [0.5, 1]; 0 when no detection matches",
    "error_2d": "mean 2D joint distance / hand size (longer side of the labels' tight mesh box), no alignment",
    "mse_2d": "mean squared 2D joint distance / hand size^2, no alignment",
    "pck": "share of joints within t hand sizes (2D), t in pck_thresholds",
    "mse_3d": "cm^2, mean squared 3D joint distance, both sets moved so the wrist is at the origin",
    "mpjpe_3d": "mm, mean 3D joint distance, wrist-aligned",
    "joints_2d": "the detected 2D joints, px in the image's frame (pixel centres at integers), openpose21 order",
}


@dataclass(frozen=True)
class LabelledHand:
    """One hand of the labels, in the image's own pixel frame."""

    side: str
    joints_2d: np.ndarray               # (21, 2) px
    box: np.ndarray                     # (4,) tight mesh box, px
    joints_cam: np.ndarray | None       # (21, 3) metres, camera space (None when unknown)

    @property
    def size(self) -> float:
        return float(max(self.box[2] - self.box[0], self.box[3] - self.box[1], 1e-6))


@dataclass(frozen=True)
class Detection:
    """One detected hand: side as seen in an unmirrored image, confidence, 2D (px) and world (m) joints."""

    side: str
    score: float
    joints_2d: np.ndarray               # (21, 2) px
    world: np.ndarray                   # (21, 3) metres, origin near the hand's centre


def crop_box(box: np.ndarray, scale: float = CROP_SCALE) -> np.ndarray:
    """The hand crop: ``box`` squared about its centre and enlarged ``scale`` times (may leave the image)."""
    return geometry.square_crop_box([np.asarray(box, dtype=np.float64)], scale)


def hand_crops(image, hands: list[LabelledHand], scale: float = CROP_SCALE, size: int = CROP_SIZE) -> list[np.ndarray]:
    """uint8 (size, size, 3) crops of a PIL RGB image, one per hand (black beyond the image border)."""
    from handsynth.render.stage import crop_image

    return [np.asarray(crop_image(image, crop_box(h.box, scale), size)) for h in hands]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match(hands: list[LabelledHand], detections: list[Detection]) -> list[int | None]:
    """For each labelled hand, the index of its detection or None (see MATCH_SCALE / MATCH_IOU)."""
    from scipy.optimize import linear_sum_assignment

    if not hands or not detections:
        return [None] * len(hands)
    boxes_h = [crop_box(geometry.tight_box(h.joints_2d), MATCH_SCALE) for h in hands]
    boxes_d = [crop_box(geometry.tight_box(d.joints_2d), MATCH_SCALE) for d in detections]
    iou = np.array([[_iou(a, b) for b in boxes_d] for a in boxes_h])
    rows, cols = linear_sum_assignment(-iou)
    found: list[int | None] = [None] * len(hands)
    for r, c in zip(rows, cols):
        if iou[r, c] >= MATCH_IOU:
            found[r] = int(c)
    return found


def score_hand(hand: LabelledHand, det: Detection | None) -> dict[str, Any]:
    """The per-hand record of the samples file (see the module docstring)."""
    if det is None:
        return {"side": hand.side, "detected": False, "score": 0.0}
    dist = np.linalg.norm(det.joints_2d - hand.joints_2d, axis=1)
    rel = dist / hand.size
    out: dict[str, Any] = {
        "side": hand.side, "detected": True, "score": round(float(det.score), 6),
        "detected_side": det.side, "handedness_agrees": det.side == hand.side,
        "error_2d": float(rel.mean()), "mse_2d": float(np.mean(rel ** 2)), "error_2d_px": float(dist.mean()),
        "pck": {str(t): float(np.mean(rel <= t)) for t in PCK_THRESHOLDS},
        "joints_2d": np.round(det.joints_2d, 2).tolist(),
    }
    if hand.joints_cam is not None:
        d3 = np.linalg.norm((det.world - det.world[0]) - (hand.joints_cam - hand.joints_cam[0]), axis=1)
        out["mse_3d"] = float(np.mean((d3 * 100.0) ** 2))
        out["mpjpe_3d"] = float(d3.mean() * 1000.0)
    return out


def score_sample(hands: list[LabelledHand], detections: list[Detection]) -> dict[str, Any]:
    """Per-hand records and the two numbers the export gate reads: ``hand_score`` (the lowest hand score)
    and ``keypoint_error`` (the highest error_2d; None when a hand was not detected)."""
    matched = match(hands, detections)
    records = [score_hand(h, detections[m] if m is not None else None) for h, m in zip(hands, matched)]
    errors = [r.get("error_2d") for r in records]
    return {"hands": records, "detections": len(detections),
            "hand_score": min((r["score"] for r in records), default=0.0),
            "keypoint_error": None if not errors or None in errors else max(errors)}


def aggregate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Set-level keypoint figures over every labelled hand of ``samples`` (score_sample records)."""
    hands = [h for s in samples for h in s["hands"]]
    found = [h for h in hands if h["detected"]]

    def mean(values):
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None

    return {
        "hands": len(hands), "detected": len(found),
        "detection_rate": len(found) / len(hands) if hands else None,
        "hand_conf": mean([h["score"] for h in hands]),
        "hand_conf_detected": mean([h["score"] for h in found]),
        "mse_2d": mean([h["mse_2d"] for h in found]),
        "error_2d": mean([h["error_2d"] for h in found]),
        "mse_3d": mean([h.get("mse_3d") for h in found]),
        "mpjpe_3d": mean([h.get("mpjpe_3d") for h in found]),
        "pck": {str(t): mean([h["pck"][str(t)] for h in found]) for t in PCK_THRESHOLDS},
        "handedness_disagreement": mean([0.0 if h["handedness_agrees"] else 1.0 for h in found]),
    }
