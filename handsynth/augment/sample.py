"""New labelled frames from a source label set: frame ``i`` is a pure function of (recipe, i).

:meth:`Augmenter.frame` tries candidates ``(i, 0)``, ``(i, 1)``, ... until one is accepted (at most
``max_attempts``). Candidate ``(i, k)`` draws everything from its own NumPy generator,
``SeedSequence(recipe.seed, spawn_key=(i, k))``, in a fixed order:

1. a source frame (uniformly among the frames with a valid hand); its valid hands are kept, with
   their world placement (global orientation, translation) and the source camera's world frame;
2. per hand (right first): with ``pose.interpolate``, a partner hand of the same side (uniformly
   among all source hands) and a weight t: per-joint slerp of the 15 finger rotations; the result
   is brought inside the anatomical limits (handsynth/augment/limits.py); with ``pose.perturb``,
   Gaussian noise on each joint's (bend, splay, twist) angles, clipped to the limits again;
3. with ``shape``: one set of 10 betas ~ N(0, sigma^2), clipped to +-clip, for both hands (one
   person), the translation corrected so that each wrist stays where it was;
4. with ``two_hands.perturb``: a rotation of the left hand about its wrist and a shift;
5. MANO forward; two hands whose meshes interpenetrate deeper than ``max_penetration_mm`` are
   rejected (counted);
6. with ``viewpoint``: azimuth, elevation (uniform on the sphere band), roll, hand share, offset,
   field of view and image size, and a camera placed so that every vertex and joint is in the image
   (handsynth/augment/camera.py); without it, the source camera, and candidates with a joint
   outside its image are rejected (counted).

Azimuth and elevation are measured in the reference hand's frame (the right hand when present): e1
along the fingers (wrist to middle knuckle), e3 out of the back of the hand; elevation +90 looks at
the back of the hand, -90 at the palm, azimuth 0 / elevation 0 at the fingertips. The image's "up"
is the finger direction, before roll.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from handsynth.augment import camera as cam
from handsynth.augment import limits
from handsynth.augment.penetration import penetration_depth
from handsynth.augment.recipe import AugmentRecipe
from handsynth.augment.rotation import compose, matrix, slerp
from handsynth.labels.schema import SIDES, Frame, Hand

FORMAT_VERSION = 1


@dataclass
class Candidate:
    """An accepted frame: the JSONL record and what the summary needs."""

    record: dict[str, Any]
    hands: list[tuple[str, np.ndarray]]          # (side, pose (48,)) per hand
    azimuth_deg: float | None
    elevation_deg: float | None
    clipped_joints: int


@dataclass
class FrameResult:
    index: int
    candidate: Candidate | None
    rejections: Counter = field(default_factory=Counter)          # by reason
    rejected_sources: Counter = field(default_factory=Counter)    # by source frame key


class Rejected(Exception):
    """A candidate failed a check; ``reason`` is the counter key, ``source`` the source frame's key."""

    def __init__(self, reason: str, source: str):
        super().__init__(reason)
        self.reason, self.source = reason, source


def _rng(seed: int, index: int, attempt: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, attempt)))


def _floats(array: Any) -> list:
    return np.asarray(array, dtype=np.float64).tolist()


class Augmenter:
    """Holds the source frames, the MANO model and the recipe; see the module docstring."""

    def __init__(self, recipe: AugmentRecipe, frames: list[Frame], model: Any):
        self.recipe = recipe
        self.model = model
        self.sources = [f for f in frames if any(h.valid for h in f.hands)]
        if not self.sources:
            raise ValueError("no source frame has a valid hand")
        self.pool: dict[str, list[tuple[int, Hand]]] = {side: [] for side in SIDES}
        for i, frame in enumerate(self.sources):
            for hand in frame.hands:
                if hand.valid:
                    self.pool[hand.side].append((i, hand))
        self.rest: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.frames: dict[str, np.ndarray] = {}
        self.faces: dict[str, np.ndarray] = {}
        for side in SIDES:
            if self.pool[side]:
                self.rest[side] = model.rest(side)
                self.frames[side] = limits.joint_frames(self.rest[side][0], self.rest[side][1], side)
                self.faces[side] = model.faces(side)

    # --- the parts of a candidate -------------------------------------------------------------

    def total_rotations(self, side: str, pose: np.ndarray) -> np.ndarray:
        """(15, 3) finger-joint rotations MANO applies (pose + hands_mean)."""
        return (np.asarray(pose, dtype=np.float64)[3:] + self.rest[side][2]).reshape(15, 3)

    def _finger_pose(self, rng: np.random.Generator, side: str, hand: Hand) -> tuple[np.ndarray, dict]:
        pose_cfg = self.recipe.pose
        total = self.total_rotations(side, hand.pose)
        info: dict[str, Any] = {"side": side, "interpolate": None, "perturb_deg": None}
        if pose_cfg.interpolate.enabled and rng.random() < pose_cfg.interpolate.probability:
            j = int(rng.integers(len(self.pool[side])))
            partner_frame, partner = self.pool[side][j]
            t = float(rng.uniform(*pose_cfg.interpolate.t))
            total = slerp(total, self.total_rotations(side, partner.pose), t)
            info["interpolate"] = {"with": self.sources[partner_frame].key, "side": side, "t": t}
        angles, outside = limits.clip_angles(limits.to_anatomical(total, self.frames[side]))
        info["source_joints_clipped"] = outside
        clipped = 0
        if pose_cfg.perturb.enabled:
            sigma = np.deg2rad([pose_cfg.perturb.sigma_deg.bend, pose_cfg.perturb.sigma_deg.splay,
                                pose_cfg.perturb.sigma_deg.twist])
            noise = rng.normal(size=(15, 3)) * sigma
            angles, clipped = limits.clip_angles(angles + noise)
            info["perturb_deg"] = _floats(np.rad2deg(noise))
        info["perturbed_joints_clipped"] = clipped
        total = limits.from_anatomical(angles, self.frames[side])
        pose = np.concatenate([np.asarray(hand.pose, dtype=np.float64)[:3], total.ravel() - self.rest[side][2]])
        return pose, info

    def _forward(self, side: str, pose: np.ndarray, old_shape: np.ndarray, new_shape: np.ndarray,
                 trans: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World vertices and joints with ``new_shape``, and the translation that keeps the wrist
        where ``old_shape`` had it (MANO's root joint does not move with the pose)."""
        out = self.model.forward(side, np.stack([pose, pose]), np.stack([old_shape, new_shape]), np.zeros((2, 3)))
        vertices = out.vertices.detach().cpu().double().numpy()
        joints = out.joints.detach().cpu().double().numpy()
        new_trans = np.asarray(trans, dtype=np.float64) + joints[0, 0] - joints[1, 0]
        return vertices[1] + new_trans, joints[1] + new_trans, new_trans

    def _basis(self, side: str, global_orient: np.ndarray) -> np.ndarray:
        J = self.rest[side][0]
        rot = matrix(global_orient)
        fingers = rot @ (J[limits.MANO_MIDDLE1] - J[limits.MANO_WRIST])
        back = rot @ -limits.palm_direction(J, side)
        return cam.hand_basis(fingers, back)

    # --- one candidate and one frame --------------------------------------------------------

    def candidate(self, index: int, attempt: int) -> Candidate:
        """Candidate ``attempt`` of frame ``index``; raises :class:`Rejected` when a check fails."""
        r = self.recipe
        rng = _rng(r.seed, index, attempt)
        src_index = int(rng.integers(len(self.sources)))
        src = self.sources[src_index]
        hands = sorted((h for h in src.hands if h.valid), key=lambda h: SIDES.index(h.side))
        poses, infos = [], []
        for hand in hands:
            pose, info = self._finger_pose(rng, hand.side, hand)
            poses.append(pose)
            infos.append(info)
        old_shapes = [np.asarray(h.shape, dtype=np.float64) for h in hands]
        if r.shape.enabled:
            betas = np.clip(rng.normal(0.0, r.shape.sigma, 10), -r.shape.clip, r.shape.clip)
            new_shapes = [betas] * len(hands)
        else:
            new_shapes = old_shapes
        trans = [np.asarray(h.trans, dtype=np.float64) for h in hands]
        relative = None
        if len(hands) == 2 and r.two_hands.perturb.enabled:
            turn = rng.normal(size=3) * np.deg2rad(r.two_hands.perturb.rotation_deg)
            shift = rng.normal(size=3) * r.two_hands.perturb.translation_m
            poses[1] = np.concatenate([compose(turn, poses[1][:3]), poses[1][3:]])
            trans[1] = trans[1] + shift
            relative = {"hand": hands[1].side, "rotation_deg": _floats(np.rad2deg(turn)), "translation_m": _floats(shift)}

        world = [self._forward(h.side, p, s0, s1, t) for h, p, s0, s1, t in zip(hands, poses, old_shapes, new_shapes, trans)]
        depth_mm = None
        if len(hands) == 2 and r.two_hands.check_penetration:
            depth_mm = 1000.0 * penetration_depth(world[0][0], self.faces[hands[0].side],
                                                  world[1][0], self.faces[hands[1].side])
            if depth_mm > r.two_hands.max_penetration_mm:
                raise Rejected("interpenetration", src.key)

        points = np.concatenate([np.concatenate([v, j]) for v, j, _ in world])
        view: dict[str, Any] | None = None
        azimuth = elevation = None
        if r.viewpoint.enabled:
            vp = r.viewpoint
            azimuth = float(rng.uniform(*vp.azimuth_deg))
            sin_lo, sin_hi = np.sin(np.deg2rad(vp.elevation_deg))
            elevation = float(np.rad2deg(np.arcsin(rng.uniform(sin_lo, sin_hi))))
            roll = float(rng.uniform(*vp.roll_deg))
            share = float(rng.uniform(*vp.hand_share))
            offset = rng.uniform(-vp.offset, vp.offset, 2) if vp.offset > 0 else np.zeros(2)
            fov = float(rng.uniform(*vp.fov_deg))
            size = tuple(int(n) for n in vp.image_sizes[int(rng.integers(len(vp.image_sizes)))])
            basis = self._basis(hands[0].side, poses[0][:3])
            view_dir = cam.orbit_direction(np.deg2rad(azimuth), np.deg2rad(elevation), basis)
            K = cam.intrinsics(size, np.deg2rad(fov))
            R, t, placed = cam.place_camera(points, view_dir, basis[0], basis[2], np.deg2rad(roll), share,
                                            (float(offset[0]), float(offset[1])), K, size, vp.margin_px)
            view = {"azimuth_deg": azimuth, "elevation_deg": elevation, "roll_deg": roll, "hand_share": share,
                    "offset": _floats(offset), "fov_deg": fov, "size": list(size), **placed}
        else:
            K, R, t, size = src.camera.K, src.camera.R, src.camera.t, src.image_size
            x = points @ np.asarray(R).T + np.asarray(t)
            uv = x[:, :2] / np.maximum(x[:, 2:], 1e-12) * [K[0, 0], K[1, 1]] + [K[0, 2], K[1, 2]]
            w, h = size
            if np.any(x[:, 2] <= 0) or np.any((uv < -0.5) | (uv > [w - 0.5, h - 0.5])):
                raise Rejected("out_of_frame", src.key)

        out_hands = []
        for hand, pose, shape, (_, _, new_trans) in zip(hands, poses, new_shapes, world):
            out_hands.append({"side": hand.side, "pose": _floats(pose), "shape": _floats(shape),
                              "trans": _floats(new_trans), "valid": True})
        record = {
            "id": f"aug-s{r.seed}-{index:07d}", "image": None, "width": int(size[0]), "height": int(size[1]),
            "K": _floats(K), "R": _floats(R), "t": _floats(t), "hands": out_hands,
            "augment": {
                "version": FORMAT_VERSION, "seed": r.seed, "index": index, "attempt": attempt,
                "source": {"key": src.key, "format": src.source_format, "id": _jsonable(src.source_id)},
                "viewpoint": view, "pose": infos,
                "shape": {"betas": _floats(new_shapes[0])} if r.shape.enabled else None,
                "two_hands": None if len(hands) < 2 else {"perturb": relative, "penetration_mm": depth_mm},
            },
        }
        clipped = sum(i["source_joints_clipped"] + i["perturbed_joints_clipped"] for i in infos)
        return Candidate(record, [(h.side, p) for h, p in zip(hands, poses)], azimuth, elevation, clipped)

    def frame(self, index: int) -> FrameResult:
        """The first accepted candidate of frame ``index`` (None after ``max_attempts`` rejections)."""
        result = FrameResult(index, None)
        for attempt in range(self.recipe.max_attempts):
            try:
                result.candidate = self.candidate(index, attempt)
                return result
            except Rejected as exc:
                result.rejections[exc.reason] += 1
                result.rejected_sources[exc.source] += 1
        return result


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
