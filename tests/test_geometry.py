"""Geometry against independent computations: real InterHand2.6M cameras, boxes, crops, visibility."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from handsynth.errors import HandsynthError
from handsynth.labels.schema import Camera
from handsynth.render import geometry as g
from handsynth.render.backend import configure_platform
from tests.conftest import SHARED

SAMPLE = SHARED / "samples" / "interhand26m-real"


def _real_views():
    """(K, R, t in metres, world joints in metres, pixels by InterHand's own mm formula, image size) per frame."""
    cams = json.loads((SAMPLE / "test_interhand2.6m_camera.json").read_text())
    joints = json.loads((SAMPLE / "test_interhand2.6m_joint_3d.json").read_text())
    data = json.loads((SAMPLE / "test_interhand2.6m_data.json").read_text())
    for img in data["images"]:
        cap, cam, fr = str(img["capture"]), str(img["camera"]), str(img["frame_idx"])
        c = cams[cap]
        campos = np.array(c["campos"][cam], dtype=float)                       # mm
        camrot = np.array(c["camrot"][cam], dtype=float)
        (fx, fy), (cx, cy) = c["focal"][cam], c["princpt"][cam]
        world_mm = np.array(joints[cap][fr]["world_coord"], dtype=float)
        valid = np.array(joints[cap][fr]["joint_valid"], dtype=float).reshape(-1) > 0
        # InterHand2.6M's formula, written out per point in millimetres.
        expected = []
        for X in world_mm:
            Xc = camrot @ (X - campos)
            expected.append([fx * Xc[0] / Xc[2] + cx, fy * Xc[1] / Xc[2] + cy])
        camera = Camera(focal=(fx, fy), princpt=(cx, cy), R=camrot, t=-camrot @ campos / 1000.0)
        yield camera, world_mm / 1000.0, np.array(expected), valid, (img["width"], img["height"])


def test_projection_matches_interhand_formula_on_real_cameras():
    views = list(_real_views())
    assert len(views) == 4
    for camera, world_m, expected, valid, (w, h) in views:
        uv = g.project(g.to_camera(camera, world_m), camera.K)
        np.testing.assert_allclose(uv, expected, rtol=0, atol=1e-6)
        # The sample's valid joints lie in the image: the convention is the one the photos use.
        inside = (uv[valid, 0] > 0) & (uv[valid, 0] < w) & (uv[valid, 1] > 0) & (uv[valid, 1] < h)
        assert inside.all()


def test_world_to_camera_is_rotation_then_translation():
    rng = np.random.default_rng(0)
    R = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    t = rng.normal(size=3)
    X = rng.normal(size=(5, 3))
    np.testing.assert_allclose(g.world_to_camera(X, R, t), np.array([R @ x + t for x in X]), atol=1e-12)


def test_tight_box_contains_and_touches_all_points():
    pts = np.random.default_rng(1).uniform(-50, 400, size=(778, 2))
    box = g.tight_box(pts)
    assert (pts[:, 0] >= box[0]).all() and (pts[:, 0] <= box[2]).all()
    assert (pts[:, 1] >= box[1]).all() and (pts[:, 1] <= box[3]).all()
    assert {box[0], box[2]} <= set(pts[:, 0]) and {box[1], box[3]} <= set(pts[:, 1])


def test_square_crop_box_is_centred_scaled_square_over_union():
    boxes = [np.array([10.0, 20.0, 50.0, 40.0]), np.array([60.0, 30.0, 70.0, 100.0])]
    crop = g.square_crop_box(boxes, scale=1.5)
    # union is (10, 20, 70, 100): centre (40, 60), longer side 80 -> side 120
    np.testing.assert_allclose(crop, [-20.0, 0.0, 100.0, 120.0])
    tiny = g.square_crop_box([np.array([5.0, 5.0, 5.5, 5.5])], scale=1.5, min_side=16)
    np.testing.assert_allclose(tiny[2:] - tiny[:2], [16.0, 16.0])


def test_crop_intrinsics_maps_pixels_like_cropping_and_resizing():
    rng = np.random.default_rng(2)
    K = np.array([[1200.0, 0, 170.0], [0, 1180.0, 250.0], [0, 0, 1]])
    pts = np.column_stack([rng.uniform(-0.1, 0.1, 50), rng.uniform(-0.1, 0.1, 50), rng.uniform(0.5, 1.5, 50)])
    box = np.array([100.0, 150.0, 260.0, 310.0])       # side 160
    K2 = g.crop_intrinsics(K, box, 512)
    uv = g.project(pts, K)
    # crop: subtract the box's edge, scale by 512/160; pixel centres at integers -> -0.5
    expected = (uv - box[:2]) * (512 / 160) - 0.5
    np.testing.assert_allclose(g.project(pts, K2), expected, atol=1e-9)
    # the box's edges land on the crop image's edges
    edges = np.array([[box[0], box[1], 1.0], [box[2], box[3], 1.0]])
    A = K2 @ np.linalg.inv(K)
    np.testing.assert_allclose((edges @ A.T)[:, :2], [[-0.5, -0.5], [511.5, 511.5]], atol=1e-9)


def test_visibility_reasons():
    front = np.array([[0.0, 0.0, 0.5], [0.05, 0.05, 0.55]])
    assert g.visibility(front, np.array([10.0, 10.0, 50.0, 50.0]), (100, 100)) is None
    behind = front * np.array([1, 1, -1])
    assert g.visibility(behind, None, (100, 100)) == g.BEHIND_CAMERA
    straddling = np.array([[0.0, 0.0, 0.5], [0.0, 0.0, 0.005]])
    assert g.visibility(straddling, None, (100, 100)) == g.BEHIND_CAMERA
    assert g.visibility(front, np.array([120.0, 10.0, 150.0, 50.0]), (100, 100)) == g.OUTSIDE_IMAGE
    assert g.visibility(front, np.array([-50.0, -60.0, -1.0, -2.0]), (100, 100)) == g.OUTSIDE_IMAGE
    # partly inside is renderable
    assert g.visibility(front, np.array([90.0, -20.0, 150.0, 5.0]), (100, 100)) is None


def test_configure_platform_respects_user_choice(monkeypatch):
    import OpenGL.platform  # noqa: F401  - binds the platform (EGL, set by conftest) as rendering does

    monkeypatch.delenv("HANDSYNTH_GL_PLATFORM", raising=False)
    monkeypatch.setenv("PYOPENGL_PLATFORM", "egl")
    assert configure_platform() == "egl"
    # OpenGL is already bound to EGL in this process: switching must fail clearly, not silently.
    monkeypatch.setenv("HANDSYNTH_GL_PLATFORM", "osmesa")
    with pytest.raises(HandsynthError, match="already imported"):
        configure_platform()
    monkeypatch.setenv("HANDSYNTH_GL_PLATFORM", "vulkan")
    with pytest.raises(HandsynthError, match="unknown OpenGL platform"):
        configure_platform()
    assert "OpenGL.platform" in sys.modules


def test_configure_platform_defaults_to_egl_before_opengl_import():
    import subprocess

    code = ("import os; os.environ.pop('PYOPENGL_PLATFORM', None); os.environ.pop('HANDSYNTH_GL_PLATFORM', None)\n"
            "from handsynth.render.backend import configure_platform\n"
            "print(configure_platform(), os.environ['PYOPENGL_PLATFORM'])\n"
            "import OpenGL.platform as p; print(type(p.PLATFORM).__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["egl", "egl", "OpenGL.platform.egl"]
