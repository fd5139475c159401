"""The generated frame of a sample (image.fit crop | native | stretch): maps, per-image label blocks,
and the resampling of mesh images - on the real InterHand excerpt (334x512 and 512x334 frames) and a
synthetic landscape set (640x360, fx != fy)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from handsynth.generate.frame import (FrameMap, crop_map, frame_of, native_map, resample, resize_map,
                                      sample_frames)
from handsynth.render.geometry import crop_intrinsics


def labels_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "labels.jsonl").read_text().splitlines() if line.strip()]


def project(K, X) -> np.ndarray:
    """Pinhole projection written out here (not render.geometry): u = (K X)_0 / (K X)_2, ..."""
    X = np.asarray(X, dtype=np.float64)
    h = X @ np.asarray(K, dtype=np.float64).T
    return h[:, :2] / h[:, 2:]


def inside(points, size) -> np.ndarray:
    W, H = size
    p = np.asarray(points)
    return (p[:, 0] >= -0.5) & (p[:, 0] <= W - 0.5) & (p[:, 1] >= -0.5) & (p[:, 1] <= H - 0.5)


def covered(mesh: np.ndarray, points) -> bool:
    """Whether a non-black mesh pixel lies within 1 px of every point."""
    H, W = mesh.shape[:2]
    lit = mesh.max(axis=2) > 10
    for u, v in np.rint(np.asarray(points)).astype(int):
        if not lit[max(v - 1, 0):min(v + 2, H), max(u - 1, 0):min(u + 2, W)].any():
            return False
    return True


def check_block(block: dict, label: dict, size_expected) -> None:
    """The Done-when geometry of one image block against the render label (independent computations)."""
    assert block["size"] == list(size_expected)
    K, K_src = np.asarray(block["K"]), np.asarray([[label["camera"]["focal"][0], 0, label["camera"]["princpt"][0]],
                                                   [0, label["camera"]["focal"][1], label["camera"]["princpt"][1]],
                                                   [0, 0, 1]])
    s = block["from_source"]["scale"]
    assert isinstance(s, float)                                          # one uniform scale
    assert K[0, 0] / K[1, 1] == pytest.approx(K_src[0, 0] / K_src[1, 1], rel=1e-12)
    assert K[0, 0] == pytest.approx(s * K_src[0, 0], rel=1e-12) and K[0, 1] == K[1, 0] == 0.0
    assert len(block["hands"]) == len(label["hands"])
    for framed, hand in zip(block["hands"], label["hands"]):
        assert framed["side"] == hand["side"]
        np.testing.assert_allclose(project(K, hand["joints_cam"]), framed["joints_2d"], atol=0.05)
        offset = np.tile(block["from_source"]["offset"], 2)
        np.testing.assert_allclose(framed["box"], s * np.asarray(hand["box"]) + offset, atol=1e-9)


@pytest.fixture(scope="module", params=["real", "landscape"])
def run(request):
    return request.getfixturevalue({"real": "small_render_run", "landscape": "landscape_render_run"}[request.param])


@pytest.mark.parametrize("size", [64, 512])
def test_crop_is_the_largest_square_about_the_hands(run, size):
    for label in labels_of(run):
        W, H = label["image_size"]
        frames = sample_frames(label, "crop", size, (W, H), local=True)
        check_block(frames.image_block, label, (size, size))
        x0, y0, x1, y1 = frames.image.source_box()
        assert x1 - x0 == pytest.approx(y1 - y0) == pytest.approx(min(W, H))            # the largest square
        assert -0.5 - 1e-9 <= x0 and x1 <= W - 0.5 + 1e-9 and -0.5 - 1e-9 <= y0 and y1 <= H - 0.5 + 1e-9
        assert (x0 + 0.5) == pytest.approx(round(x0 + 0.5)) and (y0 + 0.5) == pytest.approx(round(y0 + 0.5))
        boxes = np.asarray([h["box"] for h in label["hands"]])
        union = np.concatenate([np.maximum(boxes[:, :2].min(0), -0.5),
                                np.minimum(boxes[:, 2:].max(0), [W - 0.5, H - 0.5])])
        if max(union[2] - union[0], union[3] - union[1]) <= min(W, H):                   # it fits: it is contained
            assert x0 <= union[0] + 1e-9 and y0 <= union[1] + 1e-9 and x1 >= union[2] - 1e-9 and y1 >= union[3] - 1e-9
        check_block(frames.local_block, label, (size, size))
        # the local block's K is render's own crop intrinsics at the generated size
        K_src = np.asarray(frames.image_block["K"])
        K_src = np.linalg.inv(frames.image.matrix()) @ K_src
        np.testing.assert_allclose(frames.local_block["K"], crop_intrinsics(K_src, label["crop_box"], size), atol=1e-9)


@pytest.mark.parametrize("size", [64, 512])
def test_native_keeps_the_aspect_with_one_recorded_scale(run, size):
    for label in labels_of(run):
        W, H = label["image_size"]
        frames = sample_frames(label, "native", size, (W, H), local=False)
        w, h = frames.image.size
        assert max(w, h) == size and w % 8 == 0 and h % 8 == 0
        assert abs(w / h - W / H) <= 8 / min(w, h)                                       # only the rounding
        check_block(frames.image_block, label, (w, h))
        # the whole frame but a few rounded-away pixels: the resized source covers the frame
        x0, y0, x1, y1 = frames.image.source_box()
        assert -0.5 - 1e-9 <= x0 and x1 <= W - 0.5 + 1e-9 and -0.5 - 1e-9 <= y0 and y1 <= H - 0.5 + 1e-9
        assert (W - (x1 - x0)) * frames.image.scale[0] <= 8 and (H - (y1 - y0)) * frames.image.scale[0] <= 8
        assert frames.local is None and frames.local_block is None


def test_native_of_the_real_portrait_frame_is_recorded_exactly():
    m = native_map((334, 512), 512)
    assert m.size == (336, 512) and m.scale == (336 / 334, 336 / 334)
    # source pixel edges -0.5 and 333.5 land on the frame's edges -0.5 and 335.5; rows are cut evenly
    np.testing.assert_allclose(m.apply([[-0.5, 255.5]]), [[-0.5, 255.5 * 336 / 334 + m.offset[1]]])
    np.testing.assert_allclose(m.apply([[333.5, -0.5]])[0, 0], 335.5)
    np.testing.assert_allclose(m.apply([[0, -0.5]])[0, 1] + m.apply([[0, 511.5]])[0, 1], 511.0)
    assert frame_of({"size": [336, 512], "from_source": m.record()}) == m


def test_stretch_is_recorded_per_axis():
    m = resize_map((334, 512), (64, 64))
    assert m.record() == {"scale": [64 / 334, 64 / 512], "offset": [32 / 334 - 0.5, 32 / 512 - 0.5]}
    assert frame_of({"size": [64, 64], "from_source": m.record()}) == m and not m.uniform


def test_resample_follows_the_map_with_pixel_centres_at_integers():
    """Images holding their own source coordinates (u at pixel centre u, likewise v) resampled through a
    map must read map^-1(i, j) at output pixel (i, j) - within 0.02 output px - while a convention off by
    half a source pixel would read 0.5 source px off."""
    W, H = 334, 512
    vv, uu = np.mgrid[0:H, 0:W].astype(np.float64)
    for m in (native_map((W, H), 64), crop_map((W, H), [[100, 300, 150, 380]], 64), resize_map((W, H), (40, 72)),
              FrameMap((50, 30), (0.3, 0.3), (-12.25, -40.5)), FrameMap((30, 30), (2.5, 2.5), (-100.0, -300.0))):
        jj, ii = np.mgrid[0:m.size[1], 0:m.size[0]].astype(np.float64)
        for axis, coord, want in ((0, uu, (ii - m.offset[0]) / m.scale[0]), (1, vv, (jj - m.offset[1]) / m.scale[1])):
            image = Image.fromarray((coord + 100.0).astype(np.float32), mode="F")
            got = np.asarray(resample(image, m, Image.Resampling.BILINEAR), dtype=np.float64) - 100.0
            error = np.abs(got - want)[3:-3, 3:-3]                # away from the image's own borders
            assert error.max() < 0.02 / m.scale[axis] and error.max() < 0.2, (m, axis, error.max())


def test_the_conditioning_mesh_covers_every_in_frame_joint(run):
    for label in labels_of(run):
        W, H = label["image_size"]
        mesh = Image.open(run / label["images"]["global"]).convert("RGB")
        local = Image.open(run / label["images"]["local"]).convert("RGB")
        for fit in ("crop", "native"):
            frames = sample_frames(label, fit, 128, (W, H), local=True)
            image = np.asarray(resample(mesh, frames.image))
            assert image.shape == (frames.image.size[1], frames.image.size[0], 3)
            for hand in frames.image_block["hands"]:
                joints = np.asarray(hand["joints_2d"])
                assert covered(image, joints[inside(joints, frames.image.size)])
            local_image = np.asarray(resample(local, frames.local_mesh))
            for hand in frames.local_block["hands"]:
                joints = np.asarray(hand["joints_2d"])
                assert inside(joints, (128, 128)).all() and covered(local_image, joints)


def test_crop_clamps_at_the_border_and_centres_far_apart_hands(landscape_render_run):
    by_key = {label["key"]: label for label in labels_of(landscape_render_run)}
    edge = sample_frames(by_key["edge-right"], "crop", 64, (640, 360), local=False).image.source_box()
    np.testing.assert_allclose(edge[[0, 2]], [640 - 360 - 0.5, 639.5])                # clamped to the right edge
    far = by_key["far-apart"]
    frames = sample_frames(far, "crop", 64, (640, 360), local=False)
    outside = [not inside(h["joints_2d"], (64, 64)).all() for h in frames.image_block["hands"]]
    assert any(outside)                                  # no square holds both; labels still list every hand
